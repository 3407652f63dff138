"""Peak memory of `featstore probe`, step by step (issue 27: memory <= 8 GiB at 1M images), on scale.py's
synthetic store of N 1024-d vectors (built once in --workdir, reused).

    python benchmarks/probe_memory.py [--n 30000] [--workdir bench-work/probe-memory]

Prints, per step of the probe (loading, neighbours, GRL head, probing, MLflow, saving), the peak resident
memory of the process and its workers while that step ran (sampled every 20 ms), and the whole run's time.
Not part of `make bench` (scale.py's growth table has the probe's peak per size); this says which step it is.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from _common import REPO, _tree_rss, table

from scale import BACKBONE, write_store


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "probe-memory")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    db = a.workdir / f"synthetic-{a.n}.duckdb"
    if not db.exists():
        write_store(str(db), a.n)
    os.chdir(a.workdir)  # the probe's MLflow store lands here
    from featstore.probe import run_probe

    peak, step, stop = {}, ["start"], threading.Event()

    def sample():
        while not stop.is_set():
            peak[step[0]] = max(peak.get(step[0], 0), _tree_rss(os.getpid()))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    run_probe(db, BACKBONE, n_boot=200, maps=False, progress=lambda done, total, name: step.__setitem__(0, name))
    took = time.perf_counter() - t0
    stop.set()
    t.join()
    print(f"### `featstore probe` step by step, {a.n:,} x 1024 synthetic vectors ({took:.0f} s)\n")
    print(table(["step", "peak GiB (process + workers)"], [[k, f"{v / 2**30:.2f}"] for k, v in peak.items()]))


if __name__ == "__main__":
    main()
