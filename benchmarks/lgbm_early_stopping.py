"""Issue 27: LightGBM early stopping (early_stopping_rounds on an inner split of the training rows) against
the full tree count, side by side: time, chosen trials, and whether the study's per-source test AUCs move
out of their intervals.

    python benchmarks/lgbm_early_stopping.py --db STORE [--protocols loso,seen-unseen] [--rounds 20]

The LightGBM studies of the chosen protocols of featstore/studies/cxr_shortcut.yaml (its trials, selection
and seed) run twice in one process on fresh Optuna journals, alternating fold by fold (a busy machine slows
both alike): "old" with the head's defaults, "new" with early_stopping_rounds fixed. Per (protocol, source)
the held-out test log-odds are pooled over folds; the table gives old AUC [95% bootstrap interval, 1000
resamples] and new AUC, and whether the new one lies inside the old interval. Sources with one class in a
test set have no AUC and are not listed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from _common import REPO, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, required=True, help="a store with mobilenetv3-nih-onnx embeddings of the real set")
    ap.add_argument("--protocols", default="loso,seen-unseen")
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    import optuna
    import yaml

    from featstore.score import auc_ci
    from featstore.sweep import fit as S
    from featstore.sweep.config import parse_study
    from featstore.sweep.plan import make_tasks, plan

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = yaml.safe_load((REPO / "featstore" / "studies" / "cxr_shortcut.yaml").read_text())
    raw["heads"]["lightgbm"].pop("fixed", None)  # old: the head's defaults, whatever the shipped config says
    st = parse_study(raw)
    (bb, pre, data, folds), = plan(st, a.db)
    protos = a.protocols.split(",")
    tasks = [t for t in make_tasks(st, bb, pre, data, folds) if t.head == "lightgbm" and t.protocol in protos]
    arms = {"old": {}, "new": {"early_stopping_rounds": a.rounds}}
    wall, cpu = defaultdict(float), defaultdict(float)
    scores = {arm: defaultdict(list) for arm in arms}   # (protocol, source) -> [(y, log-odds)]
    chosen = defaultdict(dict)
    trees = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, t in enumerate(tasks):
            for arm, fixed in arms.items():
                task = dataclasses.replace(t, fixed=fixed, study_name=f"{t.study_name}|{arm}")
                storage = S.open_storage(Path(tmp) / f"{arm}.journal")
                t0, c0 = time.perf_counter(), time.process_time()
                r = S.run_task(task, data.X, data.meta, storage)
                wall[arm] += time.perf_counter() - t0
                cpu[arm] += time.process_time() - c0
                if r.error:
                    sys.exit(f"{arm} {t.study_name}: {r.error}")
                chosen[t.study_name][arm] = {k: v for k, v in r.params.items() if k != "early_stopping_rounds"}
                if arm == "new":
                    trees.append(r.fit_info.get("best_iteration"))
                for name, te in t.fold.tests.items():
                    for s in np.unique(data.meta.source[te]):
                        at = data.meta.source[te] == s
                        scores[arm][(t.protocol, s)].append((data.meta.y[te][at], r.scores[name][at]))
            print(f"  {i + 1}/{len(tasks)} {t.protocol} {t.fold.name}: old {wall['old']:.0f} s, new {wall['new']:.0f} s",
                  file=sys.stderr, flush=True)
    rows, moved = [], 0
    for key in sorted(scores["old"]):
        (yo, so), (yn, sn) = ([np.concatenate(x) for x in zip(*scores[arm][key])] for arm in arms)
        auc, lo, hi, _ = auc_ci(yo, so, n_boot=1000)
        new = auc_ci(yn, sn, n_boot=0)[0]
        if auc is None:
            continue
        inside = lo is None or lo <= new <= hi
        moved += not inside
        rows.append([key[0], key[1], len(yo), f"{auc:.3f} [{lo:.3f}, {hi:.3f}]", f"{new:.3f}", f"{new - auc:+.3f}",
                     "yes" if inside else "NO"])
    same = sum(c["old"] == c["new"] for c in chosen.values())
    print(f"### Issue 27: LightGBM early stopping ({a.rounds} rounds, inner split) vs the full tree count\n")
    print(f"cxr_shortcut.yaml, LightGBM, protocols {', '.join(protos)}: {len(tasks)} studies x "
          f"{st.heads[[h.name for h in st.heads].index('lightgbm')].trials} trials per arm, alternating.\n")
    print(table(["protocol", "source (its test rows)", "n", "old AUC [95% CI]", "new AUC", "Δ", "new inside old CI"], rows))
    print(f"\nwall: old {wall['old']:.1f} s, new {wall['new']:.1f} s ({wall['new'] / wall['old']:.2f}x); "
          f"CPU: old {cpu['old']:.1f} s, new {cpu['new']:.1f} s ({cpu['new'] / cpu['old']:.2f}x). "
          f"Same hyperparameters chosen (tree cap aside): {same} of {len(chosen)} studies. Trees kept by the new "
          f"refits: {trees}. Per-source AUCs outside the old interval: {moved} of {len(rows)}.")


if __name__ == "__main__":
    main()
