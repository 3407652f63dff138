"""Issue 14, goal 3: Optuna trials/s per head on the real set, the sweep's speed levers on vs off,
measured side by side in one process (the off path is the one the levers replaced).

    python benchmarks/sweep_heads.py --db STORE [--folds 2] [--repeats 1]

Each head runs the studies of the first --folds leave-one-source-out folds of
featstore/studies/cxr_shortcut.yaml (its trial counts, train-val selection, seed 0) on a fresh
Optuna journal, one process, once with the levers ("on") and once without ("off"), alternating so
that a busy machine slows both alike. Levers: one BLAS/OpenMP/torch thread per study
(sweep.single_threaded), the selection split drawn once per fold (sweep.plan.attach_splits), the
split's arrays sliced and the logistic head's scaler fitted once per study (HeadSpec.prepare), GRL
trials stopped at the first validation plateau (HeadSpec.search_defaults; the refit is unchanged).
"Same hyperparameters": the studies chose the same hyperparameters with the levers on and off;
"max abs Δ val score": the largest difference between the two paths' validation scores of the chosen
trials (the scaler fitted once per study moves logreg's scores in the last digits; GRL search trials that
stop at their first plateau score differently by design: their refit keeps the full schedule).
The whole study's wall time beside the 120 s goal is in end_to_end.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

from _common import REPO, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, required=True, help="a store with mobilenetv3-nih-onnx embeddings of the real set")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--heads", default="", help="comma-separated heads (default: the study's)")
    a = ap.parse_args()
    import optuna
    import yaml

    from featstore import heads as H
    from featstore.sweep import fit as S
    from featstore.sweep import plan as P
    from featstore.sweep.plan import make_tasks, plan
    from featstore.sweep.config import parse_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = parse_study(yaml.safe_load((REPO / "featstore" / "studies" / "cxr_shortcut.yaml").read_text()))
    (bb, pre, data, folds), = plan(st, a.db)
    tasks = make_tasks(st, bb, pre, data, folds)
    on_spec, real_single = dict(H.HEADS), S.single_threaded

    def run(head, levers: bool):
        ts = [dataclasses.replace(t, splits=None) for t in tasks if t.head == head and t.protocol == "loso"][:a.folds]
        if levers:
            H.HEADS.update(on_spec)
            S.single_threaded = real_single
        else:  # the per-trial path: default threads, split per study, scaler per trial
            H.HEADS[head] = dataclasses.replace(on_spec[head], prepare=None, search_defaults={})
            S.single_threaded = contextlib.nullcontext
        try:
            with tempfile.TemporaryDirectory() as tmp:
                storage = S.open_storage(Path(tmp) / "j.journal")
                t0 = time.perf_counter()
                if levers:
                    P.attach_splits(ts, data.meta)
                res = [S.run_task(t, data.X, data.meta, storage) for t in ts]
                wall = time.perf_counter() - t0
        finally:
            H.HEADS.update(on_spec)
            S.single_threaded = real_single
        n = sum(len(r.trials) for r in res)
        refit = sum(r.fit_seconds for r in res)
        return n, wall - refit, refit, [(r.params, r.val_score) for r in res]

    rows = []
    import sys

    for head in [h for h in a.heads.split(",") if h] or [h.name for h in st.heads]:
        acc = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}
        chosen = {}
        for _ in range(a.repeats):
            for levers in (False, True):
                n, search, refit, sel = run(head, levers)
                acc[levers][0] += n
                acc[levers][1] += search
                acc[levers][2] += refit
                chosen[levers] = sel
        off, on = acc[False][0] / acc[False][1], acc[True][0] / acc[True][1]
        same = sum(p_on == p_off for (p_on, _), (p_off, _) in zip(chosen[True], chosen[False]))
        dval = max((abs(v_on - v_off) for (_, v_on), (_, v_off) in zip(chosen[True], chosen[False])), default=0.0)
        rows.append([head, acc[True][0] // a.repeats, f"{off:.2f}", f"{on:.2f}", f"{on / off:.2f}",
                     f"{acc[False][2]:.1f}", f"{acc[True][2]:.1f}", f"{same} of {len(chosen[True])} studies",
                     f"{dval:.4f}"])
        print("  ", " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)  # progress: a row per head
    print("### Issue 14, goal 3: trials/s per head, speed levers off vs on (one process, alternating)\n")
    print(f"First {a.folds} leave-one-source-out folds of cxr_shortcut.yaml per head, {a.repeats} repeat(s); "
          "search = Optuna trials with their journal writes; refit = final fit + test predictions.\n")
    print(table(["head", "trials", "trials/s off", "trials/s on", "on / off", "refit s off", "refit s on",
                 "same hyperparameters", "max abs Δ val score"], rows))


if __name__ == "__main__":
    main()
