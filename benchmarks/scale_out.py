"""Issue 6. `featstore embed --engine ray` vs the local path, and sweep trials/s with 1, 2 and 4
`featstore sweep-worker` processes sharing a PostgreSQL Optuna storage.

    python benchmarks/scale_out.py --workdir bench-work/scale [--workers 1,2,4] [--trials 4]

Embedding: the real set (../shared/cxr) ingested into two fresh stores, embedded by each engine with
the same backbone and batch size, one after the other; Ray's figure includes starting Ray on this
machine (also timed alone). Sweeps: cxr_shortcut.yaml narrowed to logreg and lightgbm under
leave-one-source-out; for each worker count a fresh database, N workers started together on a
Parquet snapshot of the store, wall time until the last exits. The trial sets must be identical
(checked): each study is claimed whole and run in order, whatever N.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, SHARED, bench_workdir, need_real_set, table

FEATSTORE = str(Path(sys.executable).with_name("featstore"))


def sh(*args, env=None):
    r = subprocess.run([FEATSTORE, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode not in (0, 1):
        raise SystemExit(f"featstore {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r


def embeds(work: Path, backbone: list[str], batch: int, limit: int | None):
    rows = []
    for engine in ("local", "ray"):
        db = work / f"{engine}.duckdb"
        db.unlink(missing_ok=True)
        sh("ingest", "--manifest", str(SHARED / "cxr" / "manifest.csv"), "--db", str(db))
        extra = ["--engine", "ray", "--shards", str(work / "shards")] if engine == "ray" else []
        t0 = time.perf_counter()
        sh("embed", *backbone, "--batch-size", str(batch), "--db", str(db), *extra,
           *(["--limit", str(limit)] if limit else []))
        wall = time.perf_counter() - t0
        import duckdb

        with duckdb.connect(str(db), read_only=True) as con:
            n, secs = con.execute("SELECT n_embedded, seconds FROM embed_runs ORDER BY run_id DESC LIMIT 1").fetchone()
        rows.append((engine, n, secs, wall))
    import ray

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.shutdown()
    return rows, time.perf_counter() - t0


def sweeps(work: Path, counts: list[int], trials: int, db: Path):
    import optuna
    import yaml

    from featstore.testing import local_postgres

    raw = yaml.safe_load((REPO / "featstore" / "studies" / "cxr_shortcut.yaml").read_text())
    raw.update(study="bench-scale", heads={"logreg": {"trials": trials}, "lightgbm": {"trials": trials}},
               protocols={"loso": {}}, bootstrap=0, db=None)
    cfg = work / "scale.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    snap = work / "snapshot"
    shutil.rmtree(snap, ignore_errors=True)
    sh("export", "--snapshot", str(snap), "--db", str(db))
    out, trial_sets = [], {}
    shutil.rmtree(work / "pg", ignore_errors=True)
    with local_postgres(work / "pg") as url:
        for n in counts:
            storage = url(f"optuna_{n}")
            t0 = time.perf_counter()
            procs = [subprocess.Popen([FEATSTORE, "sweep-worker", str(cfg), "--storage", storage, "--db", str(snap)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(n)]
            errs = [p.communicate()[1] for p in procs]
            wall = time.perf_counter() - t0
            for p, e in zip(procs, errs):
                if p.returncode:
                    raise SystemExit(f"sweep-worker failed:\n{e[-3000:]}")
            s = optuna.storages.RDBStorage(storage)
            got, owners = {}, set()
            for name in optuna.get_all_study_names(s):
                st = optuna.load_study(study_name=name, storage=s)
                owners.add(st.user_attrs.get("claimed_by"))
                got[name] = [(t.number, t.state.name, json.dumps(t.params, sort_keys=True), t.value)
                             for t in st.get_trials(deepcopy=False)]
            trial_sets[n] = got
            n_trials = sum(len(v) for v in got.values())
            out.append((n, len(got), n_trials, wall, n_trials / wall, len(owners)))
    same = len({json.dumps(v, sort_keys=True) for v in trial_sets.values()}) == 1
    return out, same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "scale")
    ap.add_argument("--db", type=Path, default=None, help="a store with mobilenetv3-nih-onnx embeddings of the "
                    "real set (default: the local-engine store this script makes)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--trials", type=int, default=4)
    a = ap.parse_args()
    need_real_set()
    work = bench_workdir(a.workdir.resolve())  # its stores, snapshot and PostgreSQL folder are remade here
    weights = ["--weights-dir", str(SHARED / "weights")]
    print("### 6. Scaling out: Ray embedding and PostgreSQL-backed sweep workers\n")
    print("Embedding, local engine vs `--engine ray` on this machine (Ray started by the command):\n")
    rows = []
    for label, bb, batch, limit in (("mobilenetv3-nih-onnx", ["--backbone", "mobilenetv3-nih-onnx", *weights], 32,
                                     None),
                                    ("xrv-densenet121 (random-init)", ["--backbone", "xrv-densenet121-res224-all",
                                                                       "--weights", "random-init"], 16, 512)):
        res, ray_start = embeds(work, bb, batch, limit)
        (_, n_l, s_l, w_l), (_, n_r, s_r, w_r) = res
        rows.append([label, n_l, f"{n_l / s_l:.0f}", f"{n_r / s_r:.0f}", f"{(n_r / s_r) / (n_l / s_l):.2f}",
                     f"{w_l:.1f}", f"{w_r:.1f}"])
    print(table(["backbone", "images", "local img/s", "ray img/s", "ray / local", "local command s",
                 "ray command s"], rows))
    print(f"\nStarting and stopping Ray alone on this machine: {ray_start:.1f} s (inside the Ray figures).\n")
    db = a.db or work / "local.duckdb"
    if not a.db:  # the second backbone's local store lacks the mobilenet set the sweep reads: embed it
        sh("embed", "--backbone", "mobilenetv3-nih-onnx", *weights, "--db", str(db))
    from featstore.testing import PostgresUnavailable

    try:
        res, same = sweeps(work, [int(x) for x in a.workers.split(",")], a.trials, db)
    except PostgresUnavailable as e:
        print(f"Sweep workers on PostgreSQL: SKIPPED: {e}")
        sys.exit(1)
    base = res[0][4]
    print("Sweep search, N `featstore sweep-worker` processes on one PostgreSQL storage (logreg + lightgbm, "
          f"leave-one-source-out, {a.trials} trials per study; worker start-up included):\n")
    print(table(["workers", "Optuna studies", "trials", "wall s", "trials/s", "vs 1 worker", "workers that got work"],
                [[n, s, t, f"{w:.1f}", f"{tps:.2f}", f"{tps / base:.2f}", o] for n, s, t, w, tps, o in res]))
    print(f"\nTrial sets identical across worker counts: {'yes' if same else 'NO'}. "
          f"This machine has {os.cpu_count()} cores, so beyond 2 workers they contend for them.")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
