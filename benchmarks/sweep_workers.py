"""5 and 8. Sweep throughput with 1 vs 2 worker processes on one study, where the time goes,
and the sweep's peak memory.

    python benchmarks/sweep_workers.py [--db STORE] [--workers 1,2]

The study: featstore/studies/cxr_shortcut.yaml narrowed to logreg and lightgbm on mixed and loso (11
Optuna studies per head). Each worker count runs it from an empty Optuna journal and MLflow store,
so both do identical work; the results tables must be identical (checked). Peak memory is the
resident memory of the sweep process plus its workers, sampled every 0.1 s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import REPO, PeakMemory, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, required=True, help="a store with mobilenetv3-nih-onnx embeddings of the real set")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--trials", type=int, default=6)
    a = ap.parse_args()
    import yaml

    from featstore.sweep.run import run_study
    from featstore.sweep.config import parse_study

    raw = yaml.safe_load((REPO / "featstore" / "studies" / "cxr_shortcut.yaml").read_text())
    raw.update(study="bench-workers", heads={"logreg": {"trials": a.trials}, "lightgbm": {"trials": a.trials}},
               protocols={"mixed": {"folds": 5, "repeats": 1}, "loso": {}}, bootstrap=200)
    rows, phase_rows, results = [], [], {}
    base = None
    for w in (int(x) for x in a.workers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "fs.duckdb"
            shutil.copy(a.db, db)  # the sweep writes its results rows into the store
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            st = parse_study(dict(raw, workers=w))
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                rep = run_study(st, db, workdir=tmp, workers=w)
                wall = time.perf_counter() - t0
            key = sorted((r["protocol"], r["head"], str(r["fold"]), str(r["test_set"]), str(r["scope"]), round(r["auc"] or -1, 9))
                         for r in rep.rows)
            results[w] = key
            tps = rep.n_trials / wall
            base = base or tps
            rows.append([w, rep.n_tasks, rep.n_trials, f"{wall:.1f}", f"{tps:.2f}", f"{tps / base:.2f}",
                         f"{mem.gib:.2f}"])
            ph = rep.phases
            phase_rows.append([w] + [f"{ph[k]:.1f}" for k in ("load", "tasks", "search_sum", "refit_sum",
                                                              "score_track", "write")])
    same = len({str(v) for v in results.values()}) == 1
    print("### 5. Sweep throughput, 1 vs 2 workers\n")
    print(table(["workers", "Optuna studies", "trials", "wall s", "trials/s", "speed-up", "peak memory GiB"], rows))
    print(f"\nSame results table for every worker count: {'yes' if same else 'NO'}\n")
    print("Where the time goes (seconds; search and refit are summed over workers, so with 2 workers they "
          "can exceed the tasks wall time):\n")
    print(table(["workers", "load store + splits", "tasks (pool wall)", "search (sum)", "final refit + predict (sum)",
                 "score + MLflow", "write results"], phase_rows))
    if not same:
        raise SystemExit("results differ between worker counts")


if __name__ == "__main__":
    main()
