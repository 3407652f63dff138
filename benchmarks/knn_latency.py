"""6. Exact nearest-neighbour query latency: DuckDB (the store's own query) vs NumPy.

    python benchmarks/knn_latency.py [--sizes 10000,100000] [--dim 1024] [--k 10]

For each size, a store of random 1024-d vectors (synthetic; latency depends on n and d only).
DuckDB: sql/nearest_neighbours.sql exactly as `featstore neighbors` runs it (cosine over the
`embeddings` view, joined to images, top k). NumPy: the matrix already in memory, pre-normalised,
one matrix-vector product and argpartition - the fastest exact answer, without the store.
Both return the same k neighbours (checked). Median of 7 queries for random query images.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np

from _common import table
from featstore.query import run_sql
from featstore.store import sql_dir
from store_load import synthetic_store


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args()
    query = (sql_dir() / "nearest_neighbours.sql").read_text()
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "knn.duckdb"
            synthetic_store(db, n, a.dim)
            con = duckdb.connect(str(db), read_only=True)
            ids = np.array([r[0] for r in con.execute(f"SELECT image_id FROM embeddings_d{a.dim} ORDER BY rowid").fetchall()])
            X = np.stack(con.execute(f"SELECT vector FROM embeddings_d{a.dim} ORDER BY rowid").fetchnumpy()["vector"])
            Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
            rng = np.random.default_rng(0)
            t_duck, t_np = [], []
            for qi in rng.choice(n, 7, replace=False):
                t0 = time.perf_counter()
                got = run_sql(con, query, {"image_id": ids[qi], "k": str(a.k)}).column("image_id").to_pylist()
                t_duck.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s = Xn @ Xn[qi]
                s[qi] = -np.inf
                top = np.argpartition(-s, a.k)[:a.k]
                top = top[np.argsort(-s[top])]
                t_np.append(time.perf_counter() - t0)
                assert set(got) == set(ids[top]), "DuckDB and NumPy disagree on the neighbours"
            con.close()
            d, m = statistics.median(t_duck) * 1e3, statistics.median(t_np) * 1e3
            rows.append([f"{n:,}", a.dim, f"{d:.1f}", f"{m:.1f}", f"{m / d:.2f}"])
    print("### 6. Exact k-NN latency (k=%d): DuckDB vs NumPy\n" % a.k)
    print(table(["stored vectors", "dim", "DuckDB ms (featstore neighbors)", "NumPy ms (in RAM, pre-normalised)",
                 "NumPy / DuckDB"], rows))


if __name__ == "__main__":
    main()
