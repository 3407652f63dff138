"""Time and peak memory of reading a whole embedding set into arrays (`Store.arrays`: what the sweep and the probe
load), on scale.py's synthetic store of N 1024-d vectors (built once in --workdir, reused), each reading in a
fresh process (issue 27: memory <= 8 GiB at 1M images).

    python benchmarks/read_memory.py [--n 1000000] [--memory default,2GB] [--other PATH] [--repeat 2]

--memory: FEATSTORE_DUCKDB_MEMORY for each reading ("default": unset, DuckDB's own 80 % of RAM). --other: a second
featstore checkout (e.g. `git worktree add /tmp/old <commit>`) read the same way, interleaved with this one, so
both sides share the same minutes. Each row says whether X is bit-identical (SHA-256) to this checkout's.
Not part of `make bench` (writing the 1M store alone takes about 4 min).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _common import REPO, table

from scale import BACKBONE, write_store

CHILD = """
import hashlib, sys, time
from featstore.api import open_store
t = time.perf_counter()
with open_store(sys.argv[1]) as fs:
    X, meta = fs.arrays(sys.argv[2])
took = time.perf_counter() - t
print("@@", took, X.shape[0], hashlib.sha256(memoryview(X)).hexdigest()[:16], hashlib.sha256(
    meta.write_ipc(None).getvalue()).hexdigest()[:16])
"""


def read_once(root: Path, db: Path, memory: str) -> tuple[float, float, int, str]:
    """(seconds, peak GiB, rows, hash of X and metadata) of one reading, in a new process importing root's featstore."""
    env = {k: v for k, v in os.environ.items() if k not in ("FEATSTORE_DUCKDB_MEMORY", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root)
    if memory != "default":
        env["FEATSTORE_DUCKDB_MEMORY"] = memory
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(db), BACKBONE], stdout=subprocess.PIPE, env=env,
                         text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)  # this child's own peak (DuckDB's threads are in it)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"the reading under {root} failed (exit {p.returncode})")
    took, n, hx, hm = out.rpartition("@@")[2].split()
    return float(took), usage.ru_maxrss / 2**20, int(n), f"{hx}/{hm}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "read-memory")
    ap.add_argument("--memory", default="default,2GB")
    ap.add_argument("--other", type=Path, default=None, help="another featstore checkout, read side by side")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    db = a.workdir / f"synthetic-{a.n}.duckdb"
    if not db.exists():
        write_store(str(db), a.n)
    roots = [("this checkout", REPO)] + ([("--other", a.other.resolve())] if a.other else [])
    rows, want = [], None
    for _ in range(a.repeat):
        for memory in a.memory.split(","):
            for label, root in roots:
                took, gib, n, h = read_once(root, db, memory)
                want = want or h
                rows.append([label, memory, f"{n:,}", f"{took:.1f}", f"{gib:.2f}", "yes" if h == want else "NO"])
                sys.stderr.write(f"read_memory: {label} {memory}: {took:.1f} s, {gib:.2f} GiB\n")
    print(f"### Reading {a.n:,} x 1024 vectors with `Store.arrays` (a fresh process each)\n")
    print(table(["code", "FEATSTORE_DUCKDB_MEMORY", "rows", "s", "peak GiB", "same X and metadata"], rows))


if __name__ == "__main__":
    main()
