"""Do the verdict's intervals cover, and does its below-chance rule keep quiet by chance? By simulation, in
the regimes featstore meets: 2-6 sources, 5-500 images per source, patients with several images.

    python benchmarks/verdict_coverage.py [--sims 200] [--boot 300] [--quick] [--seed 0]

Prints Markdown (a section of benchmarks/RESULTS.md). Fixed seeds: the same arguments print the same rows.
Every interval the verdict (featstore/verdict.py) uses is checked against a truth known by construction:

- the shortcut estimand (`score.source_contrast`: cross-source minus same-source AUC of out-of-fold
  scores; patient-level, sources fixed): truth = the same sources' contrast at 5,000 images per source
  (`synth.oof_scores` with the same seed draws the same source shifts); 5,000 images per source;
- the drop on new sources (`score.cluster_bootstrap_gap`, t interval, the same sources seen and unseen as in
  LOSO) and the unseen mean per-source AUC (`score.cluster_bootstrap`): sources drawn from a population
  (binormal, per-source separation ~ N(mu, 0.5^2), patient random effects), truth = the population mean;
- the below-chance rule (`score.below_chance`, Holm over K sources): false-positive rate when every
  source's true AUC is 0.5, beside the old rule (the smallest per-source AUC with its own image-level
  percentile CI below 0.5).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featstore.score import (auc_ci, below_chance, cluster_bootstrap, cluster_bootstrap_gap,  # noqa: E402
                             source_contrast)
from featstore.synth import oof_scores  # noqa: E402

PATIENT_SD = 0.5
REGIMES = {  # the shortcut estimand's regimes (synth.oof_scores arguments besides prevalence)
    "null": dict(),
    "shift": dict(signal=1.0, shift=1.5),
    "shortcut": dict(shortcut=1.5),
    "confounded": dict(signal=1.0, shortcut=1.0),
}


def _prev(regime: str, K: int) -> list[float]:
    if regime == "shift":  # no source-label link
        return [0.55 if k % 2 == 0 else 0.45 for k in range(K)]
    return list(np.linspace(0.85, 0.1, K)) if K > 1 else [0.5]


def _wilson(k: int, n: int) -> str:
    lo, hi = _wilson_ci(k, n)
    return f"{k / n:.3f} [{lo:.2f}, {hi:.2f}]"


def _wilson_ci(k, n, z=1.96):
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def _truth(big, d):
    """The contrast these sources would give with these class counts: per pair of sources (positive from
    a, negative from b) the AUC at 5,000 images per source, weighted by the sample's pair counts."""
    from featstore.score import _contrast, _pair_wins

    names = sorted(set(big["source"].tolist()))
    idx = {n: i for i, n in enumerate(names)}
    K = len(names)
    sb = np.array([idx[x] for x in big["source"].tolist()])
    w, p = _pair_wins(big["y"], big["score"].astype(float), sb, K, np.ones((1, len(sb))))
    with np.errstate(invalid="ignore"):
        A = np.nan_to_num(w[0] / p[0])
    sd = np.array([idx[x] for x in d["source"].tolist()])
    npos = np.bincount(sd, weights=d["y"] == 1, minlength=K)
    nneg = np.bincount(sd, weights=d["y"] == 0, minlength=K)
    pairs = np.outer(npos, nneg)
    return float(_contrast((A * pairs)[None], pairs[None])[2][0])


def contrast_coverage(sims, boot, cells, seed0):
    rows = []
    for regime, kw in REGIMES.items():
        for K, n in cells:
            cover = fire = done = na = 0
            width = []
            for i in range(sims):
                seed = seed0 + 7919 * i + 31 * K + n
                prev = _prev(regime, K)
                d = oof_scores(prev, n, patient_sd=PATIENT_SD, seed=seed, **kw)
                big = oof_scores(prev, 5000, patient_sd=PATIENT_SD, seed=seed, **kw)
                truth = _truth(big, d)
                r = source_contrast(d["y"], d["score"], d["source"], d["patient"], n_boot=boot, seed=seed)
                if r["estimate"] is not None and r["lo"] is None:
                    na += 1  # too few minority-class patients: no interval (the verdict says n/a)
                if r["lo"] is None or truth is None:
                    continue
                done += 1
                cover += r["lo"] <= truth <= r["hi"]
                fire += r["lo"] > 0.05 and r["p"] < 0.05  # verdict: "uses the source" (one model: no Holm)
                width.append(r["hi"] - r["lo"])
            if done:
                rows.append([regime, K, n, done, na, _wilson(cover, done), f"{np.median(width):.3f}",
                             f"{fire / sims:.3f}"])
            else:
                rows.append([regime, K, n, 0, na, "n/a", "-", f"{fire / sims:.3f}"])
    return rows


def _binormal_sources(rng, deltas, n, shift=0.0):
    ys, ss, gs, ps = [], [], [], []
    for k, dl in enumerate(deltas):
        done, p = 0, 0
        while done < n:
            m = min(int(rng.integers(1, 4)), n - done)
            lab = int(rng.random() < 0.5)
            u = rng.normal(0, PATIENT_SD)
            for _ in range(m):
                ys.append(lab)
                ss.append((dl + shift) * lab + u + rng.normal())
                gs.append(f"s{k}")
                ps.append(f"s{k}-p{p}")
            done += m
            p += 1
    return np.array(ys), np.array(ss), np.array(gs, dtype=object), np.array(ps, dtype=object)


def _pop_auc(mu, tau, shift=0.0):
    """E over sources of Phi(delta / sqrt(2 (1 + patient_sd^2))), delta ~ N(mu + shift, tau^2): by quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(60)
    return float(np.sum(w * stats.norm.cdf((mu + shift + tau * x) / math.sqrt(2 * (1 + PATIENT_SD ** 2))))
                 / np.sum(w))


def drop_coverage(sims, boot, cells, seed0, mu=1.0, tau=0.5, gain=0.6):
    """LOSO-like: the same K sources seen (separation + gain) and unseen; truth = population means."""
    rows = []
    true_gap = _pop_auc(mu, tau, gain) - _pop_auc(mu, tau)
    true_mean = _pop_auc(mu, tau)
    for K, n in cells:
        cg = cm = done = 0
        wg, wm = [], []
        for i in range(sims):
            rng = np.random.default_rng([seed0, K, n, i])
            deltas = rng.normal(mu, tau, K)
            yu, su, gu, pu = _binormal_sources(rng, deltas, n)
            ys, ss, gs, ps = _binormal_sources(rng, deltas, n, shift=gain)
            g = cluster_bootstrap_gap(ys, ss, gs, yu, su, gu, group_seen=ps, group_unseen=pu, n_boot=boot, seed=i)
            m = cluster_bootstrap(yu, su, gu, group=pu, n_boot=boot, seed=i)
            if g["lo"] is None or m["lo"] is None:
                continue
            done += 1
            cg += g["lo"] <= true_gap <= g["hi"]
            cm += m["lo"] <= true_mean <= m["hi"]
            wg.append(g["hi"] - g["lo"])
            wm.append(m["hi"] - m["lo"])
        rows.append([K, n, done, _wilson(cg, done), f"{np.median(wg):.3f}", _wilson(cm, done), f"{np.median(wm):.3f}"])
    return rows


def below_fpr(sims, cells, seed0, n_perm):
    rows = []
    for K, n in cells:
        new = old = 0
        for i in range(sims):
            d = oof_scores([0.5] * K, n, patient_sd=PATIENT_SD, seed=seed0 + 104729 * i + K * 1000 + n)
            b = below_chance(d["y"], d["score"], d["source"], d["patient"], n_perm=n_perm, seed=i)
            new += b["any"]
            # the old rule: the worst source's own image-level percentile CI entirely below 0.5
            worst = None
            for s in np.unique(d["source"]):
                m = d["source"] == s
                a, lo, hi, _ = auc_ci(d["y"][m], d["score"][m], n_boot=200, seed=i)
                if a is not None and (worst is None or a < worst[0]):
                    worst = (a, hi)
            old += bool(worst and worst[1] is not None and worst[1] < 0.5)
        rows.append([K, n, sims, _wilson(new, sims), _wilson(old, sims)])
    return rows


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=200)
    ap.add_argument("--boot", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny run (what the test runs): 3 simulations a cell")
    ap.add_argument("--parts", default="contrast,drop,below", help="which tables (comma-separated)")
    a = ap.parse_args(argv)
    sims = 3 if a.quick else a.sims
    boot = 50 if a.quick else a.boot
    t0 = time.perf_counter()
    if a.quick:
        c_cells, d_cells, b_cells = [(3, 100)], [(3, 20)], [(3, 10)]
    else:
        c_cells = [(2, 20), (4, 5), (4, 150), (6, 50)]
        d_cells = [(2, 50), (3, 20), (4, 150), (6, 50)]
        b_cells = [(2, 50), (4, 10), (6, 5), (6, 50)]
    out = []

    def emit(*lines):  # print as each part is done: a long run shows its progress
        out.extend(lines)
        print("\n".join(lines), flush=True)

    emit("## Verdict intervals: coverage and false positives (benchmarks/verdict_coverage.py)", "",
         f"`python benchmarks/verdict_coverage.py --sims {sims} --boot {boot} --seed {a.seed}"
         + (" --quick" if a.quick else "") + "`; nominal 95%; "
         "patients of 1-3 images with a shared random effect (sd 0.5). Coverage with its Wilson 95% interval "
         "(the Monte Carlo error of the simulation itself).", "")
    parts = set(a.parts.split(","))
    if "contrast" in parts:
        emit("### Shortcut estimand (cross-source − same-source AUC; patient-level, sources fixed)", "",
         "Truth: the same sources (their shifts) at 5,000 images each, per pair of sources, weighted by the "
         "sample's class counts. *fires*: the verdict's \"uses the source\" (95% CI above 0.05, one-sided "
         "p < 0.05); it must stay ≤ 0.05 in null and shift.", "",
         table(["regime", "sources", "images/source", "sims with an interval", "n/a (too few patients)",
                "coverage", "median width", "fires (of all sims)"],
               contrast_coverage(sims, boot, c_cells, a.seed)), "")
    if "drop" in parts:
        emit("### Drop on new sources and unseen mean (source-level, t interval with the sources' df)", "",
         "Sources drawn from a population (binormal separation ~ N(1, 0.5²); seen = +0.6); truth: the "
         "population means. With 2 sources the interval is t(1), as wide as that is.", "",
         table(["sources", "images/source", "sims", "drop: coverage", "drop: median width", "unseen mean: coverage",
                "unseen mean: median width"], drop_coverage(sims, boot, d_cells, a.seed)), "")
    if "below" in parts:
        emit("### Below-chance rule: false-positive rate when every source's true AUC is 0.5", "",
         table(["sources", "images/source", "sims", "Holm over sources (now)", "worst source's own CI (before)"],
               below_fpr(sims, b_cells, a.seed, n_perm=200 if a.quick else 500)), "")
    emit(f"({time.perf_counter() - t0:.0f} s)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
