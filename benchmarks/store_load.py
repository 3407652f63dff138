"""3. Loading a fold's embedding matrix from the store vs np.load of the same bytes from .npy.

    python benchmarks/store_load.py [--db STORE] [--backbone NAME] [--n-rows 100000]

A fold = the training sources of one leave-source-out fold (all sources but the largest), read
through featstore's API (`Store.arrays`: DuckDB -> Arrow -> one NumPy buffer, with its metadata).
The same float32 matrix is saved as .npy and read back with np.load (warm page cache for both).
Run on the real store and on a synthetic store of --n-rows vectors (size matters: the fixed cost
of a query dominates small folds). Ratio = np.load time / store time (1.0: as fast as a bare file).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from _common import best_of, table
from featstore.api import open_store


def measure(db: Path, backbone: str, tmp: Path) -> list:
    with open_store(db) as fs:
        counts = fs.sql("SELECT source, count(*) n FROM images GROUP BY 1 ORDER BY n DESC")
        train = counts["source"].to_list()[1:]
        X, meta = fs.arrays(backbone, sources=train)
        npy = tmp / "fold.npy"
        np.save(npy, X)
        t_store = best_of(lambda: fs.arrays(backbone, sources=train), 5)
        t_npy = best_of(lambda: np.load(npy), 5)
        # the floor DuckDB itself sets: the same vectors, no metadata, no ordering, straight to NumPy
        table = f"embeddings_d{X.shape[1]}"
        q = (f"SELECT vector FROM {table} WHERE backbone = ? AND image_id IN (SELECT image_id FROM images "
             f"WHERE source IN ({', '.join('?' * len(train))}))")
        t_duck = best_of(lambda: fs.con.execute(q, [backbone, *train]).fetchnumpy(), 5)
    return [f"{X.shape[0]:,} x {X.shape[1]}", f"{X.nbytes / 2**20:.1f}", f"{t_store * 1e3:.1f}",
            f"{t_duck * 1e3:.1f}", f"{t_npy * 1e3:.1f}", f"{t_npy / t_store:.2f}", f"{t_duck / t_store:.2f}"]


def synthetic_store(path: Path, n: int, dim: int = 1024, n_sources: int = 6) -> str:
    """n random unit vectors as one embedding set, inserted in Arrow batches like `embed` does."""
    from datetime import datetime

    import pyarrow as pa

    from featstore.store import connect, ensure_embedding_table

    rng = np.random.default_rng(0)
    con = connect(path)
    table_name = ensure_embedding_table(con, dim)
    now = datetime.now()
    for start in range(0, n, 20_000):
        m = min(20_000, n - start)
        ids = [f"{i:064x}" for i in range(start, start + m)]
        src = [f"s{i % n_sources}" for i in range(start, start + m)]
        imgs = pa.table({"image_id": ids, "source": src, "label": ["covid"] * m, "width": [1] * m, "height": [1] * m,
                         "bit_depth": [8] * m, "format": ["PNG"] * m, "n_bytes": [1] * m, "path": ids,
                         "ingested_at": pa.array([now] * m, pa.timestamp("us"))})
        con.register("_i", imgs)
        con.execute("INSERT INTO images (image_id, source, label, width, height, bit_depth, format, n_bytes, path, "
                    "ingested_at) "
                    "SELECT * FROM _i")
        X = rng.standard_normal((m, dim), dtype=np.float32)
        emb = pa.table({"image_id": ids, "backbone": ["synthetic"] * m, "weights_id": ["none"] * m,
                        "preprocess": ["original"] * m, "dim": pa.array([dim] * m, pa.int32()),
                        "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), dim),
                        "embed_run": pa.array([0] * m, pa.int32()), "created_at": pa.array([now] * m, pa.timestamp("us"))})
        con.register("_e", emb)
        con.execute(f"INSERT INTO {table_name} SELECT * FROM _e")
    con.close()
    return "synthetic"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, help="an embedded store (default: only the synthetic one)")
    ap.add_argument("--backbone", default="mobilenetv3-nih-onnx")
    ap.add_argument("--n-rows", type=int, default=100_000)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.db:
            rows.append([f"{a.db.name} ({a.backbone})"] + measure(a.db, a.backbone, tmp))
        syn = tmp / "syn.duckdb"
        name = synthetic_store(syn, a.n_rows)
        rows.append([f"synthetic, {a.n_rows:,} rows"] + measure(syn, name, tmp))
    print("### 3. Fold load: store vs np.load\n")
    print("np.load of a page-cached .npy is one memcpy. The floor for any read from DuckDB is its own scan of "
          "the vector column (bare DuckDB scan: no metadata, no ordering); featstore's ratio to that floor "
          "is the last column.\n")
    print(table(["store", "fold (rows x dim)", "MiB", "featstore ms", "bare DuckDB scan ms", "np.load ms",
                 "np.load / featstore (bar >= 0.8)", "DuckDB scan / featstore"], rows))


if __name__ == "__main__":
    main()
