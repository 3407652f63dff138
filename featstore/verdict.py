"""One verdict per model: did it learn the disease or the source? Two questions, two answers, rules over
result rows only.

A model is one (backbone, preprocess, head, selection). The verdict answers apart:

(a) *Does it use the source?* The shortcut estimand (`score.source_contrast`), on the model's out-of-fold
    mixed k-fold predictions: AUC over positive-negative pairs from different sources minus AUC over pairs
    from the same source. A model whose score does not depend on the source given the label ranks both
    alike (0, whatever the sources); an acquisition shift unrelated to the label only blurs cross-source
    pairs (<= 0); a model that scores the source, where sources differ in positive rate, ranks
    cross-source pairs far better (a pure shortcut: same-source AUC 0.5). Its interval resamples patients
    within the sources (the question is about this model on these sources).
      yes      the 95% CI lies above MARGIN and the one-sided p (H0: contrast <= MARGIN), Holm-adjusted over
               the report's models, is below ALPHA;
      no       the 95% CI lies below MARGIN (an advantage of MARGIN is excluded);
      unclear  otherwise; n/a without a source with both classes or without cross-source pairs.
(b) *Does it transfer?* The drop on new sources: seen (the same head's mixed k-fold, per source) minus
    unseen (leave-one-source-out or seen-unseen, per source) mean per-source AUC, with its source-level t
    interval (`score.cluster_bootstrap_gap`), and held-out sources scored below chance (`score.below_chance`:
    per source, Holm over the K sources). A drop says the model does worse on sources it never saw: a
    domain shift does that too, so it is never called a shortcut.
      drops    the drop's 95% CI lies above DROP (Holm-adjusted p below ALPHA), or a held-out source is
               scored below chance (Holm over its sources);
      holds    the drop's 95% CI lies below MAX_GAP, the unseen mean's CI above 0.5, no source below chance;
      unclear  otherwise; n/a without a held-out source with both classes.

The verdict, first match wins: *shortcut likely* (a = yes); *drops on new sources* (b = drops);
*generalises* (a = no and b = holds); *inconclusive*. The domain probe's AUC for the same embedding set,
where run, is shown beside it: the source *can* be read from the embeddings, not that this head read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MARGIN = 0.05    # a cross-source advantage (AUC) worth calling the use of the source
DROP = 0.05      # a seen-to-unseen drop in AUC worth reporting when it is surely larger
MAX_GAP = 0.10   # a model "holds" on new sources only if a drop this large is excluded
ALPHA = 0.05     # after Holm over the report's models
SHORTCUT, DROPS, GENERALISES, INCONCLUSIVE = "shortcut likely", "drops on new sources", "generalises", "inconclusive"
VERDICTS = (SHORTCUT, DROPS, GENERALISES, INCONCLUSIVE)


@dataclass
class Verdict:
    verdict: str
    reason: str                       # both answers in one line (uses_source_text; transfer_text; probe)
    uses_source: str = "n/a"          # yes | no | unclear | n/a
    uses_source_text: str = ""        # a sentence a reviewer can quote
    transfer: str = "n/a"             # drops | holds | unclear | n/a
    transfer_text: str = ""
    fields: dict = field(default_factory=dict)  # the numbers behind both answers


def _f(x):
    return None if x is None else float(x)


def _ci(x, lo, hi) -> str:
    return f"{x:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})" if lo is not None and hi is not None else f"{x:+.3f} (no CI)"


def uses_source(sc: dict | None, p_adj: float | None = None) -> tuple[str, str, dict]:
    """Answer (a) from a `score.source_contrast` dict; p_adj: its p after Holm over the report's models."""
    if not sc or sc.get("estimate") is None:
        why = (sc or {}).get("note") or "no mixed k-fold predictions over several sources"
        return "n/a", f"Does it use the source? Not measured: {why}.", {}
    est, lo, hi = float(sc["estimate"]), _f(sc.get("lo")), _f(sc.get("hi"))
    if lo is None and sc.get("note"):
        return "n/a", (f"Does it use the source? Not decidable: cross-source minus same-source AUC "
                       f"{est:+.3f} on {sc.get('n_sources')} sources, but {sc['note']}."), \
            dict(shortcut=est, shortcut_sources=sc.get("n_sources"))
    p = _f(sc.get("p"))
    p_adj = p if p_adj is None else p_adj
    f = dict(shortcut=est, shortcut_lo=lo, shortcut_hi=hi, shortcut_p=p, shortcut_p_adj=p_adj,
             auc_cross_source=_f(sc.get("cross")), auc_same_source=_f(sc.get("same")),
             shortcut_sources=sc.get("n_sources"), shortcut_same_sources=sc.get("n_same_sources"),
             shortcut_uncertainty=sc.get("uncertainty"))
    rests = (f"on {sc.get('n_sources')} sources ({sc.get('n_same_sources')} with both classes for the "
             f"same-source pairs; {sc.get('uncertainty') or 'no'} uncertainty)")
    pairs = (f"pairs from different sources are ranked with AUC {float(sc['cross']):.3f}, pairs from the same "
             f"source with {float(sc['same']):.3f}: a difference of {_ci(est, lo, hi)}")
    if lo is not None and lo > MARGIN and p_adj is not None and p_adj < ALPHA:
        return "yes", (f"It uses the source: {pairs}, {rests}; Holm-adjusted p {p_adj:.2g} for a difference "
                       f"no larger than {MARGIN}."), f
    if hi is not None and hi < MARGIN:
        return "no", (f"No sign that it uses the source: {pairs}, {rests}; an advantage of {MARGIN} for "
                      f"cross-source pairs is excluded."), f
    return "unclear", f"Whether it uses the source is unclear: {pairs}, {rests}.", f


def transfer(loso: dict | None, below: dict | None = None, p_adj: float | None = None) -> tuple[str, str, dict]:
    """Answer (b) from the LOSO (or seen-unseen) source-mean row and `score.below_chance` on its held-out
    sources; p_adj: the drop's p after Holm over the report's models."""
    f: dict = {}
    bad = None
    if below and below.get("any"):
        w = below["worst"]
        b = below["per_source"][w]
        bad = (f"{w} is scored below chance (AUC {b['auc']:.3f}, Holm-adjusted p {b['p_holm']:.2g} over "
               f"{below['n_tests']} held-out sources)")
        f.update(below_chance_source=w, below_chance_auc=b["auc"], below_chance_p_adj=b["p_holm"])
    if not loso or loso.get("auc") is None:
        if bad:
            return "drops", f"It drops on new sources: {bad}.", f
        return "n/a", "Does it transfer? Not measured: no held-out source with both classes (run loso or seen-unseen).", f
    u, u_lo, u_hi = float(loso["auc"]), _f(loso.get("auc_lo")), _f(loso.get("auc_hi"))
    n_u = loso.get("n_sources")
    g, g_lo, g_hi = _f(loso.get("gap")), _f(loso.get("gap_lo")), _f(loso.get("gap_hi"))
    gi = (loso.get("metrics") or {}).get("gap") or {}
    p = _f(loso.get("gap_p"))
    p_adj = p if p_adj is None else p_adj
    f.update(auc_unseen_mean=u, auc_unseen_mean_lo=u_lo, auc_unseen_mean_hi=u_hi, unseen_sources=n_u,
             drop=g, drop_lo=g_lo, drop_hi=g_hi, drop_p=p, drop_p_adj=p_adj, seen=_f(gi.get("seen")),
             drop_sources=gi.get("n_unseen"), drop_uncertainty=loso.get("uncertainty"))
    unseen = (f"mean per-source AUC on {n_u} new source{'s' if n_u != 1 else ''} {u:.3f}"
              + (f" (95% CI {u_lo:.3f} to {u_hi:.3f})" if u_lo is not None else " (no CI)"))
    if g is None:
        drop_txt = "no seen side to compare with (add the mixed protocol)"
    else:
        seen = f"seen {float(gi['seen']):.3f} " if gi.get("seen") is not None else ""
        drop_txt = (f"{seen}minus unseen: a drop of {_ci(g, g_lo, g_hi)} over {gi.get('n_unseen', n_u)} "
                    f"held-out sources (source-level)")
    if bad or (g_lo is not None and g_lo > DROP and p_adj is not None and p_adj < ALPHA):
        return "drops", f"It drops on new sources: {'; '.join(x for x in (bad, drop_txt) if x)}; {unseen}.", f
    if g_hi is not None and g_hi < MAX_GAP and u_lo is not None and u_lo > 0.5:
        return "holds", (f"It holds on new sources: {drop_txt}, a drop of {MAX_GAP} is excluded; {unseen}; no "
                         f"held-out source below chance."), f
    return "unclear", f"Whether it transfers is unclear: {drop_txt}; {unseen}.", f


def judge(loso: dict | None, shortcut: dict | None = None, below: dict | None = None,
          probe_auc: float | None = None, p_shortcut_adj: float | None = None,
          p_drop_adj: float | None = None) -> Verdict:
    """`loso`: the model's LOSO (or seen-unseen) source-mean row; `shortcut`: `score.source_contrast` of its
    mixed out-of-fold predictions; `below`: `score.below_chance` of its held-out sources; the p's after
    Holm over the report's models (None: unadjusted, one model)."""
    a, a_txt, fa = uses_source(shortcut, p_shortcut_adj)
    b, b_txt, fb = transfer(loso, below, p_drop_adj)
    probe = f" Source probe AUC {probe_auc:.2f} (the source can be read from the embeddings)." \
        if probe_auc is not None else ""
    if a == "yes":
        v = SHORTCUT
    elif b == "drops":
        v = DROPS
    elif a == "no" and b == "holds":
        v = GENERALISES
    else:
        v = INCONCLUSIVE
    return Verdict(v, f"{a_txt} {b_txt}{probe}", a, a_txt, b, b_txt, dict(fa, **fb, probe_auc=probe_auc))


def mixed_metrics(g) -> dict:
    """The mixed unit's pooled out-of-fold row (first repeat) metrics: the shortcut estimand and the seen."""
    import json

    import polars as pl

    m = g.filter((pl.col("protocol") == "mixed") & (pl.col("kind") == "pooled") & (pl.col("scope") == "all")
                 & (pl.col("test_set") == "seen")).sort("repeat")
    if not m.height:
        return {}
    x = m.row(0, named=True).get("metrics")
    return (json.loads(x) if isinstance(x, str) else x) or {}


def model_verdicts(res, probe: dict | None = None) -> list[dict]:
    """Every model of one table (one sweep's result rows, `res`), in row order: its LOSO and seen-unseen
    source-mean rows (`lo`, `su`, `main` = lo or su), its mixed metrics (`mm`), the shortcut estimand
    (`sc`), the Holm-adjusted p of each question over these models (`pa`, `pb`) and its `verdict`. The
    report's headline and the MLflow model runs both read this, so they never disagree."""
    import polars as pl

    from featstore.results import MODEL, source_mean
    from featstore.score import holm

    models = []
    for key, g in res.filter(pl.col("status") == "ok").group_by(MODEL, maintain_order=True):
        lo, su = source_mean(g, "loso"), source_mean(g, "seen-unseen")
        models.append(dict(key=key, g=g, lo=lo, su=su, main=lo or su, mm=mixed_metrics(g)))
    p_sc = holm([(m["mm"].get("shortcut") or {}).get("p") for m in models])
    p_dr = holm([(m["main"] or {}).get("gap_p") for m in models])
    for m, pa, pb in zip(models, p_sc, p_dr):
        main, sc = m["main"], m["mm"].get("shortcut") or {}
        m.update(sc=sc, pa=pa, pb=pb, verdict=judge(
            main, sc or None, ((main or {}).get("metrics") or {}).get("below_chance"),
            (probe or {}).get((m["key"][0], m["key"][1])), pa, pb))
    return models
