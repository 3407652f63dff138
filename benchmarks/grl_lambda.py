"""The GRL trade-off as a curve: what gradient reversal buys (less source in the representation) and what
it costs (task AUC), per lambda_max, on a store's embedding set; and whether each fit converged.

    python benchmarks/grl_lambda.py --db featstore.duckdb [--backbone mobilenetv3-nih-onnx]
        [--unseen actualmed figure1] [--lambdas 0 0.03 0.1 0.3 1 3 10] [--max-epochs 200]

Split: the `--unseen` sources are held out whole (both classes, so each has an AUC); the other sources'
images are split 80/20, patient-grouped and stratified by (source, label): the GRL head fits on the 80%
with those sources as domains; the 20% (seen) gives
- the source-probe AUC of the head's representation (`transform`, featstore.probe.domain_probe: logistic
  regression, 5-fold, macro one-vs-rest over the training sources) beside the raw embedding's,
- the within-source AUC: mean per-source AUC over the training sources that have both classes there,
and the unseen sources give their per-source AUC and its mean. Each fit reports its epochs, the kept epoch
and why it stopped ("lr drops": converged by the LR-drop schedule; "max_epochs": stopped by the cap).
A fit that stops on the cap is refitted with 3x the cap: the row says whether it then converged, and the
figures are that longer fit's. One seed: the uncertainty of each AUC is image-level (bootstrap 95% CI of
the unseen mean over images, sources fixed) — a curve over lambda_max, not a comparison of sources.
Output: a Markdown table on stdout (for benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> str:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    from featstore.api import open_store
    from featstore.heads import GRLHead
    from featstore.probe import domain_probe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--backbone", default="mobilenetv3-nih-onnx")
    ap.add_argument("--preprocess", default="original")
    ap.add_argument("--positive", default="covid")
    ap.add_argument("--unseen", nargs="+", default=["actualmed", "figure1"])
    ap.add_argument("--lambdas", nargs="+", type=float, default=[0, 0.03, 0.1, 0.3, 1, 3, 10])
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    with open_store(a.db) as fs:
        X, meta = fs.arrays(a.backbone, a.preprocess)
    X = X.astype(np.float64)
    src = meta["source"].to_numpy().astype(str)
    y = (meta["label"].to_numpy() == a.positive).astype(int)
    pid = np.array([f"{s}:{p}" if p is not None else f"img:{i}" for s, p, i in
                    zip(src, meta["patient_id"].to_list(), meta["image_id"].to_list())])
    unseen = np.isin(src, a.unseen)
    idx = np.flatnonzero(~unseen)
    strata = np.char.add(np.char.add(src[idx], "|"), y[idx].astype(str))
    fit_i, seen_i = next(StratifiedGroupKFold(5, shuffle=True, random_state=a.seed).split(idx, strata, pid[idx]))
    fit, seen = idx[fit_i], idx[seen_i]
    train_sources = sorted(set(src[fit]))
    both = [s for s in train_sources if len(set(y[seen][src[seen] == s])) == 2]
    raw_probe = domain_probe(X[seen], src[seen], n_boot=0)["auc"]

    def per_source(score, rows, sources):
        return {s: float(roc_auc_score(y[rows][src[rows] == s], score[src[rows] == s])) for s in sources}

    rng = np.random.default_rng(a.seed)

    def unseen_ci(h):
        """Image-level bootstrap of the mean per-source unseen AUC (sources fixed, images resampled within)."""
        rows = np.flatnonzero(unseen)
        s = h.decision_function(X[rows])
        reps = []
        for _ in range(200):
            vals = []
            for u in a.unseen:
                m = np.flatnonzero(src[rows] == u)
                pos, neg = m[y[rows][m] == 1], m[y[rows][m] == 0]
                b = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
                vals.append(roc_auc_score(y[rows][b], s[b]))
            reps.append(np.mean(vals))
        return np.percentile(reps, [2.5, 97.5])

    lines = [f"Backbone {a.backbone}/{a.preprocess}; fit on {len(fit)} images of {', '.join(train_sources)} "
             f"(domains = these sources), seen = {len(seen)} held-out images of them (patient-grouped), unseen = "
             f"{', '.join(a.unseen)} ({int(unseen.sum())} images). Raw-embedding source probe on the seen images: "
             f"**{raw_probe:.3f}**. Within-source AUC over {', '.join(both)} (the training sources with both classes). "
             "Uncertainty: image-level (one seed; unseen mean's bootstrap 95% CI, images resampled, sources fixed).",
             "",
             "| lambda_max | source probe (repr.) | within-source AUC | unseen AUC mean [95% CI] | "
             + " | ".join(f"unseen {u}" for u in a.unseen) + " | epochs (kept) | stopped by | seconds |",
             "|---:|---:|---:|---|" + "---:|" * len(a.unseen) + "---|---|---:|"]
    for lam in a.lambdas:
        t0 = time.time()
        h = GRLHead(lambda_max=lam, max_epochs=a.max_epochs, random_state=a.seed).fit(X[fit], y[fit], domains=src[fit])
        stop = h.stop_reason_
        if stop == "max_epochs":  # the cap, not the schedule, ended it: does a longer run converge?
            h = GRLHead(lambda_max=lam, max_epochs=3 * a.max_epochs, random_state=a.seed).fit(
                X[fit], y[fit], domains=src[fit])
            stop = f"cap {a.max_epochs}; with cap {3 * a.max_epochs}: {h.stop_reason_}"
        secs = time.time() - t0
        probe = domain_probe(h.transform(X[seen]), src[seen], n_boot=0)["auc"]
        within = per_source(h.decision_function(X[seen]), seen, both)
        uns = per_source(h.decision_function(X[unseen]), np.flatnonzero(unseen), a.unseen)
        lo, hi = unseen_ci(h)
        lines.append(f"| {lam:g} | {probe:.3f} | {np.mean(list(within.values())):.3f} | "
                     f"{np.mean(list(uns.values())):.3f} [{lo:.3f}, {hi:.3f}] | "
                     + " | ".join(f"{uns[u]:.3f}" for u in a.unseen)
                     + f" | {h.n_epochs_} ({h.best_epoch_}) | {stop} | {secs:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
