"""7. A million vectors: the approximate-nearest-neighbour index (featstore/ann.py) vs exact search.

    python benchmarks/ann.py [--n 100000] [--big 1000000] [--dim 1024] [--k 10]
                             [--crossover 1000,2000,5000,10000,20000] [--workdir DIR]

SYNTHETIC stores (featstore.testing.synthetic_store: vectors shaped like mobilenetv3's on the real
set - a narrow cone, clusters, 0.2% near copies; isotropic noise would be no test of anything).
- At --n: recall@10 of the index against exact search (a fixed sample of 500 images; the index's
  candidates re-ranked as `featstore neighbors --summary` does), for a few expansion_search values;
  one-image query latency: the store's exact SQL (`featstore neighbors --exact`), NumPy over the
  matrix in RAM, the index (search + exact re-rank, RAM), and `ann.nearest` (what `featstore
  neighbors` runs: freshness check, index files, store lookups); median of 25 images, the same
  answers checked against the SQL's.
- At --big (the issue's 1,000,000 x 1024; --big 0 skips): the store, the index build, peak memory
  and the index's size, query latency, recall on 200 images, the neighbour summary and the
  embedding duplicate search over every image.
- --dhash: the dHash rule of `duplicates` (multi-index hashing) at these hash counts, on mosaics of
  the real set's hashes, against all-pairs comparison (timed at 4,000, scaled by n^2).
- --crossover: exact vs index per query and for every image's k-NN at small sizes, where
  featstore.ann.QUERY_ANN_MIN / ALL_ANN_MIN come from.
Exact every-image k-NN is O(n^2): above 20k it is timed on 2,000 images and scaled by n/2,000
(said so). Load average is printed: on a shared machine every time here is an upper bound.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np

from _common import MANIFEST, PeakMemory, goal, table
from featstore import ann as A
from featstore.duplicates import embedding_pairs, hamming_pairs, pairs_among
from featstore.neighbors import exact_rows, knn_indices, neighbor_summary
from featstore.query import run_sql
from featstore.store import sql_dir
from featstore.testing import synthetic_store

QUERY = (sql_dir() / "nearest_neighbours.sql").read_text()
SAMPLE_EXACT = 2_000


def load() -> str:
    return "load average %.1f / %.1f / %.1f on %d cores" % (*os.getloadavg(), os.cpu_count())


def quiet(line: str) -> None:
    pass


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_ms(fn, items) -> float:
    times = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def open_set(db: Path):
    """The set as the commands read it (ann.unit_vectors)."""
    con = duckdb.connect(str(db), read_only=True)
    s = A.resolve_set(con, "synthetic")
    Xn, meta = A.unit_vectors(con, s)
    return con, s, Xn, meta


def drop(db: Path) -> None:
    """This script's store and its index folder (gigabytes at the large size)."""
    shutil.rmtree(db.with_name(db.name + ".ann"), ignore_errors=True)
    db.unlink(missing_ok=True)
    db.with_name(db.name + ".wal").unlink(missing_ok=True)


def exact_sample(Xn, rows, k):
    return exact_rows(Xn, rows, k)


def recall(found, exact) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(found, exact)]))


def exact_all_seconds(Xn, k) -> tuple[float, str]:
    """Every image's exact k-NN: measured below 20k images, else 2,000 images' time x n / 2,000."""
    n = len(Xn)
    if n <= 20_000:
        return timed(lambda: knn_indices(Xn, k, normalized=True))[1], "measured"
    rows = np.arange(0, n, n // SAMPLE_EXACT)[:SAMPLE_EXACT]
    t = sum(timed(lambda b=b: exact_rows(Xn, rows[b:b + 500], k))[1] for b in range(0, len(rows), 500))
    return t * n / len(rows), f"{len(rows):,} images timed, x {n / len(rows):,.0f}"


def query_latencies(con, s, Xn, meta, ann, k, n_q=25):
    """Median ms per one-image query, four ways; and how many answers match the SQL's."""
    ids = meta["image_id"].to_numpy()
    rng = np.random.default_rng(1)
    qs = rng.choice(len(ids), n_q, replace=False)
    key_row = np.full(len(ann) + 1, -1, dtype=np.int64)
    keys = ann.keys_of(ids)
    key_row[keys] = np.arange(len(ids))
    sql = lambda i: run_sql(con, QUERY, {"image_id": ids[i], "backbone": "synthetic", "k": str(k)})  # noqa: E731

    def numpy_exact(i):
        sims = Xn @ Xn[i]
        sims[i] = -np.inf
        top = np.argpartition(-sims, k)[:k]
        return top[np.argsort(-sims[top])]

    def index_only(i):
        found = ann.search(Xn[i:i + 1], k + max(k, 10) + 1)
        cand = np.where(found >= 0, key_row[found], -1)
        cand[cand == i] = -1
        return A.rank(Xn, np.array([i]), cand, k)[0]

    nearest = lambda i: A.nearest(con, s, ids[i], k, say=quiet)  # noqa: E731

    def nearest_cold(i):  # as a new `featstore neighbors` process: the index files mapped anew
        A._CACHE.clear()
        return nearest(i)

    same = sum(sql(i).column("image_id").to_pylist() == nearest(i).column("image_id").to_pylist() for i in qs)
    return dict(sql=median_ms(sql, qs), numpy=median_ms(numpy_exact, qs), index=median_ms(index_only, qs),
                nearest=median_ms(nearest, qs), cold=median_ms(nearest_cold, qs), same=same, n_q=n_q)


def at_n(n: int, dim: int, k: int, work: Path) -> list[str]:
    db = work / f"ann-{n}.duckdb"
    t_store = write_store(db, n, dim)
    con, s, Xn, meta = open_set(db)
    ids = meta["image_id"].to_numpy()
    ann, t_build = timed(lambda: A.open_index(con, s, Xn, ids, say=quiet))
    sample = np.random.default_rng(0).choice(n, 500, replace=False)
    exact = exact_sample(Xn, sample, k)
    sweep = []
    default_ef = A.EXPANSION_SEARCH
    for ef in (64, 128, 256):
        A.EXPANSION_SEARCH = ef
        found, t = timed(lambda: ann.knn_rows(Xn, ids, k, which=sample))
        sweep.append([ef, f"{recall(found, exact):.4f}", f"{t / len(sample) * 1e3:.2f}",
                      "**default**" if ef == default_ef else ""])
    A.EXPANSION_SEARCH = default_ef
    rec = recall(ann.knn_rows(Xn, ids, k, which=sample), exact)
    lat = query_latencies(con, s, Xn, meta, ann, k)
    idx_all, t_all = timed(lambda: ann.knn_rows(Xn, ids, k))
    _, t_sum = timed(lambda: neighbor_summary(None, meta["source"], meta["label"], k, idx=idx_all))
    _, t_dup = timed(lambda: embedding_pairs(con, s, Xn, ids, k, 0.98, search="ann", say=quiet))
    t_exact_all, how = exact_all_seconds(Xn, k)
    con.close()
    goal(f"4. recall@10 of the index vs exact at {n:,} vectors (ann.py 7a)", "≥ 0.99", f"{rec:.4f}", rec >= 0.99)
    out = [f"### 7a. Nearest neighbours at {n:,} x {dim} (k={k}): index vs exact\n",
           f"SYNTHETIC store ({t_store:.0f} s to write), index built in {t_build:.0f} s "
           f"({ann.nbytes / 2**20:,.0f} MiB on disk); {load()} (a shared machine: times are upper bounds).\n",
           table(["measure", "goal", "measured", "met"], [
               [f"recall@10 vs exact ({len(sample)} images)", "≥ 0.99", f"{rec:.4f}", "yes" if rec >= 0.99 else "no"],
               ["one query, index (search + exact re-rank, RAM)", "faster than exact", f"{lat['index']:.2f} ms", ""],
               ["one query, `ann.nearest` (what `featstore neighbors` runs): new process / warm",
                "", f"{lat['cold']:.1f} / {lat['nearest']:.1f} ms", ""],
               ["one query, exact: DuckDB SQL (`--exact`)", "", f"{lat['sql']:.1f} ms", ""],
               ["one query, exact: NumPy, matrix in RAM", "", f"{lat['numpy']:.1f} ms", ""],
               ["queries answered with the SQL's 10 neighbours exactly", "", f"{lat['same']}/{lat['n_q']}", ""],
               ["every image's k-NN, index (summary's search)", "", f"{t_all:.1f} s", ""],
               ["every image's k-NN, exact (blocked matmul)", "", f"{t_exact_all:.0f} s ({how})", ""],
               ["neighbour summary over the k-NN", "", f"{t_sum:.2f} s", ""],
               ["embedding duplicate search (k-NN + pairs, index warm)", "", f"{t_dup:.1f} s", ""]]),
           "\nexpansion_search sweep (recall on the same sample; ms per query, searched in batches):\n",
           table(["expansion_search", "recall@10", "ms / query", ""], sweep)]
    drop(db)
    return out


def write_store(db: Path, n: int, dim: int) -> float:
    """The synthetic store, written by a child process: DuckDB's buffers from writing it would
    otherwise stay in this process's resident memory and blur what the index costs."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    p = mp.get_context("spawn").Process(target=synthetic_store, args=(db, n, dim), kwargs=dict(seed=0))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"writing the synthetic store {db} failed (exit code {p.exitcode})")
    return time.perf_counter() - t0


def big(n: int, dim: int, k: int, work: Path) -> list[str]:
    db = work / f"ann-big-{n}.duckdb"
    rows = []
    t_store = write_store(db, n, dim)
    with PeakMemory() as mem_load:
        con, s, Xn, meta = open_set(db)
    ids = meta["image_id"].to_numpy()
    base = mem_load.peak
    with PeakMemory() as mem:
        ann, t_build = timed(lambda: A.open_index(con, s, Xn, ids, say=quiet))
    size = ann.nbytes
    sample = np.random.default_rng(0).choice(n, 200, replace=False)
    rec = recall(ann.knn_rows(Xn, ids, k, which=sample), exact_sample(Xn, sample, k))
    lat = query_latencies(con, s, Xn, meta, ann, k)
    with PeakMemory() as mem_all:
        idx_all, t_all = timed(lambda: ann.knn_rows(Xn, ids, k))
    _, t_sum = timed(lambda: neighbor_summary(None, meta["source"], meta["label"], k, idx=idx_all))
    # `duplicates` runs this same k-NN (ann.knn), then keeps the close pairs: timed once, not twice
    pairs, t_pairs = timed(lambda: pairs_among(Xn, ids, idx_all, 0.98))
    t_dup = t_all + t_pairs
    del idx_all
    t_exact_all, how = exact_all_seconds(Xn, k)
    con.close()
    mins = lambda t: f"{t / 60:.1f} min"  # noqa: E731
    rows += [
        ["store (SYNTHETIC vectors + images rows)", "", mins(t_store), ""],
        ["index build (one thread: deterministic)", "minutes", mins(t_build), "yes" if t_build < 3600 else "no"],
        ["index size on disk (f16 vectors + graph + rows)", "stated", f"{size / 2**30:.2f} GiB", "yes"],
        ["peak RSS reading the vectors (DuckDB's cache + the unit-vector matrix)", "stated",
         f"{base / 2**30:.1f} GiB (the matrix {Xn.nbytes / 2**30:.1f} GiB)", "yes"],
        ["peak RSS while building the index (all of the process)", "stated", f"{mem.gib:.1f} GiB", "yes"],
        [f"recall@10 vs exact ({len(sample)} images)", "≥ 0.99", f"{rec:.4f}", "yes" if rec >= 0.99 else "no"],
        ["one query, index (search + exact re-rank, RAM)", "≤ 10 ms", f"{lat['index']:.2f} ms",
         "yes" if lat["index"] <= 10 else "no"],
        ["one query, `ann.nearest` (freshness check, files, store lookups): new process / warm", "",
         f"{lat['cold']:.1f} / {lat['nearest']:.1f} ms", ""],
        ["one query, exact: DuckDB SQL (`--exact`)", "", f"{lat['sql']:.0f} ms", ""],
        ["queries answered with the SQL's 10 neighbours exactly", "", f"{lat['same']}/{lat['n_q']}", ""],
        ["neighbour summary: every image's k-NN + summary (index warm)", "minutes", mins(t_all + t_sum),
         "yes" if t_all + t_sum < 3600 else "no"],
        ["embedding duplicate search: the same k-NN + pairs ≥ 0.98 (index warm)", "minutes",
         f"{mins(t_dup)} ({len(pairs):,} pairs; peak RSS {mem_all.gib:.1f} GiB)", "yes" if t_dup < 3600 else "no"],
        ["every image's k-NN, exact", "", f"{t_exact_all / 3600:.1f} h ({how})", ""]]
    drop(db)
    goal(f"4. one kNN query at {n:,} x {dim} (ann.py 7b)", "≤ 10 ms", f"{lat['index']:.2f} ms", lat["index"] <= 10)
    goal(f"4. neighbour summary at {n:,} (ann.py 7b)", "minutes", mins(t_all + t_sum), t_all + t_sum < 3600)
    goal(f"4. embedding duplicate search at {n:,} (ann.py 7b)", "minutes", mins(t_dup), t_dup < 3600)
    goal(f"4. memory at {n:,} (ann.py 7b)", "stated", f"peak RSS {max(mem.gib, mem_all.gib):.1f} GiB", None)
    return [f"### 7b. {n:,} x {dim} vectors (the issue's million-image bar)\n",
            f"{load()} at the end (a shared machine: times are upper bounds). The index serves the embedding "
            "rule of `featstore duplicates`; its dHash rule is timed in 7d.\n",
            table(["measure", "goal", "measured", "met"], rows)]


def real_hashes() -> np.ndarray | None:
    """[n, 256] bits: the dHash of every image of the real set, as `featstore duplicates` makes them."""
    import csv

    from featstore.duplicates import _hash_one
    from featstore.procs import process_pool

    if not MANIFEST.exists():
        return None
    with open(MANIFEST) as f:
        paths = [str(MANIFEST.parent / r["path"]) for r in csv.DictReader(f)]
    with process_pool(os.cpu_count() or 2) as ex:
        hashes = [h for h in ex.map(_hash_one, paths, chunksize=64) if h is not None]
    return np.unpackbits(np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), -1), axis=1)


def dhash_rule(sizes, max_dist: int = 10) -> list[str]:
    """`duplicates`' dHash rule (featstore.duplicates.hamming_pairs, multi-index hashing) at n hashes.
    Its cost is the pairs that share a chunk, so it depends on how alike the hashes are: the n hashes
    are mosaics of the real set's, each chunk taken from a random real image, so every chunk's values
    are exactly as skewed as on real chest X-rays (random hashes would share no chunk: no test)."""
    from featstore.duplicates import all_pairs

    real = real_hashes()
    rng = np.random.default_rng(0)
    n_chunks = max_dist + 1

    def hashes(n):
        if real is None:  # said in the heading
            return [bytes(r) for r in rng.integers(0, 256, (n, 32), dtype=np.uint8)]
        out = np.empty((n, 256), np.uint8)
        for c in range(n_chunks):
            cols = np.arange(c, 256, n_chunks)
            out[:, cols] = real[rng.integers(0, len(real), n)][:, cols]
        return [r.tobytes() for r in np.packbits(out, axis=1)]

    h = hashes(4_000)
    ids = np.arange(len(h))
    (found, t_idx), (brute, t_all) = timed(lambda: hamming_pairs(ids, h, max_dist)), timed(
        lambda: all_pairs(ids, h, max_dist))
    rows = [[f"{len(h):,}", f"{t_idx:.2f} s", f"{t_all:.2f} s (timed)", "yes" if found == brute else "NO",
             f"{len(found):,}", "", ""]]
    for n in sizes:
        h = hashes(n)
        ids = np.arange(n)
        with PeakMemory() as mem:
            found, t_idx = timed(lambda: hamming_pairs(ids, h, max_dist, workers=os.cpu_count() or 2))
        t_scaled = t_all * (n / 4_000) ** 2
        goal(f"4. dHash duplicate rule at {n:,} hashes (ann.py 7d)", "minutes", f"{t_idx / 60:.1f} min", t_idx < 3600)
        rows.append([f"{n:,}", f"{t_idx / 60:.1f} min", f"{t_scaled / 3600:.1f} h (4,000 timed, x (n / 4,000)^2)",
                     "", f"{len(found):,}", f"{mem.gib:.1f} GiB", "yes" if t_idx < 3600 else "no"])
    what = ("mosaics of the real set's dHashes (each of the 11 chunks from a random real image)" if real is not None
            else "RANDOM hashes (the real set is absent: no chunk is shared, so this understates the cost)")
    return [f"### 7d. `duplicates`' dHash rule: pairs within {max_dist} of 256 bits\n",
            f"Multi-index hashing (featstore/duplicates.py): only pairs sharing one of {n_chunks} interleaved "
            f"{256 // n_chunks}-bit chunks are compared; exact by the pigeonhole principle (same pairs as all-pairs: "
            f"checked at 4,000). Hashes: {what}. {load()}.\n",
            table(["hashes", "multi-index (all cores)", "all pairs", "same pairs as all-pairs", "pairs found",
                   "peak RSS", "minutes, not hours"], rows)]


def crossover(sizes, dim: int, k: int, work: Path) -> list[str]:
    rows = []
    for n in sizes:
        db = work / f"ann-x{n}.duckdb"
        synthetic_store(db, n, dim, seed=0)
        con, s, Xn, meta = open_set(db)
        ids = meta["image_id"].to_numpy()
        ann, t_build = timed(lambda: A.open_index(con, s, Xn, ids, say=quiet))
        lat = query_latencies(con, s, Xn, meta, ann, k, n_q=15)
        _, t_exact = timed(lambda: knn_indices(Xn, k, normalized=True))
        _, t_ann = timed(lambda: A.knn(con, s, Xn, ids, k, method="ann", say=quiet))
        con.close()
        rows.append([f"{n:,}", f"{lat['sql']:.1f}", f"{lat['cold']:.1f}", f"{t_exact:.2f}", f"{t_ann:.2f}",
                     f"{t_build:.1f}", f"{t_ann + t_build:.2f}"])
        drop(db)
    return [f"### 7c. Where the index starts to pay ({dim}-d, k={k})\n",
            f"Defaults in featstore/ann.py: the index from {A.QUERY_ANN_MIN:,} vectors for one query, from "
            f"{A.ALL_ANN_MIN:,} for every image's k-NN (`--summary`, `duplicates`); {load()}.\n",
            table(["vectors", "one query: exact SQL ms", "one query: index ms (new process)",
                   "all k-NN: exact s", "all k-NN: index s (built)", "index build s (once)",
                   "all k-NN: index s incl. build"], rows)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=1_000_000, help="the large store's size (0: skip)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--crossover", default="1000,2000,5000,10000,20000", help="sizes ('' to skip)")
    ap.add_argument("--dhash", default="100000,1000000", help="hash counts for the dHash rule ('' to skip)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: a temporary folder)")
    a = ap.parse_args()
    if a.workdir:
        a.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ann-bench-", dir=a.workdir))
    try:
        parts = []
        if a.crossover:
            parts += crossover([int(x) for x in a.crossover.split(",")], a.dim, a.k, work)
            print("\n".join(parts), flush=True)
        if a.n:
            p = at_n(a.n, a.dim, a.k, work)
            print("\n\n" + "\n".join(p), flush=True)
        if a.big:
            p = big(a.big, a.dim, a.k, work)
            print("\n\n" + "\n".join(p), flush=True)
        if a.dhash:
            p = dhash_rule([int(x) for x in a.dhash.split(",")])
            print("\n\n" + "\n".join(p), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # made by mkdtemp above: ours


if __name__ == "__main__":
    main()
