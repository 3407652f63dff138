"""One verdict per model: did it learn the disease or the source? Rules over result rows only.

A model is one (backbone, preprocess, head, selection). Its evidence is its unit-level rows of kind
`source-mean` (featstore/results.py), each with source-level 95% CIs:
  - LOSO (or seen-unseen): the mean over held-out sources of per-source AUC, the worst source, and the
    *within-source* gap: seen (the same head's mixed k-fold, per source) minus unseen (per source);
  - leave-pair-out: the *cross-source* gap: mixed k-fold pooled AUC minus the mean AUC over held-out
    pairs of a mostly-positive and a mostly-negative source. A model that learned which source looks
    like which label scores well pooled over the sources it saw and near chance on a new pair.
The domain probe's AUC for the same embedding set (`featstore probe`), where run, is shown beside it:
it says the source *can* be read from the embeddings, not that this head read it, so it never decides.

The rules, first match wins:
  shortcut likely  a gap's 95% CI lies entirely above DROP, or a held-out source is scored below chance
                   with its own 95% CI entirely under 0.5;
  generalises      both gaps are measured and have their 95% CIs below MAX_GAP (a drop that large is
                   excluded), the unseen mean per-source AUC is above 0.5 with its CI, and no held-out
                   source is below 0.5;
  inconclusive     anything else: too few sources, intervals too wide, no seen/unseen contrast.
"""
from __future__ import annotations

from dataclasses import dataclass

DROP = 0.05      # a seen-to-unseen drop in AUC worth calling a shortcut when it is surely larger
MAX_GAP = 0.10   # a model "generalises" only if a drop this large is excluded
SHORTCUT, GENERALISES, INCONCLUSIVE = "shortcut likely", "generalises", "inconclusive"


@dataclass
class Verdict:
    verdict: str
    reason: str


def _f(x):
    return None if x is None else float(x)


def _gap(row, what):
    if not row or row.get("gap") is None:
        return None
    return dict(what=what, gap=float(row["gap"]), lo=_f(row.get("gap_lo")), hi=_f(row.get("gap_hi")))


def _txt(g):
    ci = f" (95% CI {g['lo']:.3f} to {g['hi']:.3f})" if g["lo"] is not None else " (no CI)"
    return f"{g['what']} gap {g['gap']:+.3f}{ci}"


def judge(loso: dict | None, pairs: dict | None = None, probe_auc: float | None = None) -> Verdict:
    """`loso`: the model's LOSO (or seen-unseen) source-mean row; `pairs`: its leave-pair-out one."""
    probe = f"; source probe AUC {probe_auc:.2f}" if probe_auc is not None else ""
    gaps = [g for g in (_gap(loso, "within-source"), _gap(pairs, "cross-source")) if g]
    for g in gaps:
        if g["lo"] is not None and g["lo"] > DROP:
            return Verdict(SHORTCUT, f"{_txt(g)}: seen sources beat unseen ones by more than {DROP}{probe}")
    worst = ((loso or {}).get("metrics") or {}).get("worst") or {}
    if worst.get("hi") is not None and float(worst["hi"]) < 0.5:
        return Verdict(SHORTCUT, f"{worst.get('source')} scored below chance: AUC {float(worst['auc']):.3f} "
                                 f"(95% CI up to {float(worst['hi']):.3f}){probe}")
    if not loso or loso.get("auc") is None:
        return Verdict(INCONCLUSIVE, "no held-out source with both classes (run loso or seen-unseen)" + probe)
    u, u_lo = float(loso["auc"]), _f(loso.get("auc_lo"))
    worst_auc = _f(loso.get("auc_worst"))
    seen = "; ".join(_txt(g) for g in gaps) or "no seen/unseen contrast (add the mixed protocol)"
    unseen = f"unseen mean {u:.3f}" + (f" (95% CI {u_lo:.3f} to {float(loso['auc_hi']):.3f})" if u_lo is not None
                                        else " (no CI)")
    if len(gaps) < 2:
        seen += "; generalising needs both gaps (mixed, loso or seen-unseen, and leave-pair-out)"
    if (len(gaps) == 2 and all(g["hi"] is not None and g["hi"] < MAX_GAP for g in gaps) and u_lo is not None
            and u_lo > 0.5
            and (worst_auc is None or worst_auc >= 0.5)):
        return Verdict(GENERALISES, f"{seen}: a drop of {MAX_GAP} is excluded; {unseen}{probe}")
    return Verdict(INCONCLUSIVE, f"{seen}; {unseen}{probe}")
