"""Peak memory of `featstore probe`, step by step (issue 27: memory <= 8 GiB at 1M images), on scale.py's
synthetic store of N 1024-d vectors (built once in --workdir, reused).

    python benchmarks/probe_memory.py [--n 30000] [--workdir bench-work/probe-memory] [--no-grl] [--no-neighbours]
    python benchmarks/probe_memory.py --n 300000 --neighbours-only   # the neighbour summary alone

`--no-grl` leaves out the GRL head's step (the fit of one head, which the 8 GiB bar exempts, and hours at 1M
on 2 cores). `--no-neighbours` stores an empty neighbour summary instead of searching (its memory at 1M is
the index's: benchmarks/ann.py), to time the other steps at 1M in minutes. To compare with another checkout side by side, run the script again with PYTHONPATH=CHECKOUT:
the featstore it measured is named in the output.

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


def _no_neighbours():
    """The neighbour summary's columns with no rows (neighbor_summary of four made-up images, emptied)."""
    import numpy as np

    from featstore.neighbors import neighbor_summary

    return neighbor_summary(None, np.array(["a", "a", "b", "b"]), np.array(["x", "y", "x", "y"]), k=1,
                            idx=np.array([[1], [0], [3], [2]])).clear()


def neighbours_only(db: Path) -> None:
    """One neighbour summary as the probe makes it (its unit vectors in a file where this featstore does that),
    for side-by-side runs of two checkouts with PYTHONPATH=."""
    import inspect
    import resource
    import tempfile

    import duckdb

    from featstore import probe

    with duckdb.connect(str(db), read_only=True) as con, tempfile.TemporaryDirectory() as tmp:
        kw = {"spill_dir": tmp} if "spill_dir" in inspect.signature(probe.neighbor_table).parameters else {}
        t0 = time.perf_counter()
        nb = probe.neighbor_table(con, BACKBONE, "original", **kw)
        took = time.perf_counter() - t0
    print(f"neighbour summary: {took:.1f} s, ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}"
          f" GiB, unit vectors in a file: {bool(kw)}, rows' hash {nb.hash_rows().sum()} (featstore from "
          f"{Path(probe.__file__).parent})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "probe-memory")
    ap.add_argument("--no-grl", action="store_true", help="leave out the GRL head's step (one head's fit)")
    ap.add_argument("--no-neighbours", action="store_true", help="an empty neighbour summary instead of the search")
    ap.add_argument("--neighbours-only", action="store_true",
                    help="only the neighbour summary (probe.neighbor_table), timed, with ru_maxrss and its rows' hash")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    db = a.workdir / f"synthetic-{a.n}.duckdb"
    if not db.exists():
        write_store(str(db), a.n)
    os.chdir(a.workdir)  # the probe's MLflow store lands here
    import resource

    import featstore
    from featstore import probe
    from featstore.probe import run_probe

    if a.neighbours_only:
        neighbours_only(db)
        return
    if a.no_neighbours:  # the summary's columns, no rows
        probe.neighbor_table = lambda con, backbone, preprocess, k=10, spill_dir=None: _no_neighbours()

    peak, step, stop = {}, ["start"], threading.Event()

    def sample():
        while not stop.is_set():
            peak[step[0]] = max(peak.get(step[0], 0), _tree_rss(os.getpid()))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    took = {}

    def progress(done, total, name):
        took[step[0]] = time.perf_counter() - t0 - sum(took.values())
        step[0] = name

    run_probe(db, BACKBONE, n_boot=200, maps=False, grl=not a.no_grl, progress=progress)
    stop.set()
    t.join()
    whole = sum(took.values())
    print(f"### `featstore probe` step by step, {a.n:,} x 1024 synthetic vectors ({whole:.0f} s"
          f"{', no GRL head' if a.no_grl else ''}; featstore from {Path(featstore.__file__).parent})\n")
    print(table(["step", "s", "peak GiB (process + workers, sampled every 20 ms)"],
                [[k, f"{took.get(k, 0):.1f}", f"{v / 2**30:.2f}"] for k, v in peak.items() if k != "done"]))
    print(f"\nThe process's own peak resident size (ru_maxrss): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
