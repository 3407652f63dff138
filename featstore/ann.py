"""Approximate nearest neighbours: one usearch HNSW index per embedding set, kept beside the store.

`featstore neighbors`, `neighbors --summary` and `duplicates` need each image's k most
cosine-similar images. Exact search reads every vector: a DuckDB scan per query, a blocked matmul
(O(n^2)) for all images. From QUERY_ANN_MIN / ALL_ANN_MIN vectors on, an HNSW graph answers.

Files, in <store>.ann/ (made by featstore and marked by MARKER; a folder without it is never written):
  <set>.usearch   the graph and the unit vectors in float16 (usearch's format)
  <set>.rows.npy  per image, sorted by image_id: image_id, usearch key, store rowid, row fingerprint;
                  `slot[key]` is the row of that key (the ids <-> keys mapping)
  <set>.json      set identity, metric, dtype, dim, count, parameters, the index file's size and
                  mtime, and the fingerprint of the set's rows it holds
  <set>.lock      flock: one writer at a time; readers wait while a build is written
All are written to a temporary name and renamed.

Fresh? Every use compares count, xor and sum of hash(image_id, embed_run, created_at) over the
set's rows with the sidecar (one aggregate, a few ms). New rows only: added to the graph
(incremental). A row removed or re-embedded: rebuilt (HNSW deletions leave holes). An index that
does not match its sidecar, or that usearch cannot read: rebuilt, with one line saying why.
Not seen: a vector rewritten in place (SQL UPDATE) with the same embed_run and created_at -
featstore never does that (embedding again inserts a new row) - or index bytes damaged without
changing the file's size or mtime.

Answers: the graph proposes candidates (k + max(k, 10)); they are re-ranked by their exact cosine
(the store's float32 vectors), so the list is the exact top k whenever the graph found those k (recall@10 is
measured in benchmarks/ann.py). Ties go to the smaller image_id, as in exact search.

Determinism: vectors are inserted on one thread in image_id order (usearch draws node levels from
a fixed-seed generator; parallel insertion races and gives a different graph each time), so the
same rows give the same file, byte for byte. Search does not change the graph; its threads do not
change answers. A graph grown incrementally differs from a fresh build of the same rows (other
insertion order); their answers differ only where one of them misses a true neighbour.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from featstore.neighbors import normalize, pair_sims, rank  # noqa: F401 - one ranking for exact and approximate search
from featstore.spill import ROW_BLOCK, SpilledRows, scattered_rows
from featstore.store import (embedding_set_fingerprint, embedding_set_images, embedding_set_rows,
                             embedding_set_similarities, embedding_set_vector_batches, embedding_set_vectors,
                             embedding_set_vectors_at, most_similar_images, store_file_path)

FORMAT = 1
METRIC = "cos"
# f16: half the bytes of f32 (2 GiB at 1M x 1024). i8 would halve that again, but CNN embeddings sit
# in a narrow cone (../shared/cxr, mobilenetv3: median pairwise cosine 0.84, 10th neighbour 0.93) and
# i8 blurs exactly the differences that rank them: recall@10 after re-ranking 0.954 with 20
# candidates (0.997 with 40) on 100k x 1024 vectors shaped like them (featstore.testing), 0.994 on
# the real set; f16 0.998 and 0.9999.
DTYPE = "f16"
# Measured at 100k x 1024 (same data; the first trials with i8): connectivity 16 / expansion_add 48
# reached recall@10 0.991; 24/64 0.996; 32/64 0.998 for the same build time (expansion_add 128
# doubled it for 0.999). expansion_search 128: recall 0.998, 0.75 ms a query; 256: 1.000, 1.7 ms
# (benchmarks/ann.py prints the sweep).
CONNECTIVITY = 32
EXPANSION_ADD = 64
EXPANSION_SEARCH = 128
ADD_THREADS = 1  # deterministic graphs (see above); search uses every core
# Where the index starts to pay, measured on this 2-core machine (shared, load ~3) by
# `benchmarks/ann.py` at 1024-d (7c): one query, as a new `featstore neighbors` process, exact SQL vs
# index: 10 vs 12 ms at 1k vectors, 14 vs 12 at 2k, 27 vs 13 at 5k, 45 vs 13 at 10k. Equal near
# 1.5k once built, but the first query also pays the build (0.4 s at 5k): from 5k every later query
# saves half or more. Every image's k-NN (--summary, duplicates), exact vs index including its
# build: 1.0 vs 1.3 s at 5k, 3.6 vs 2.2 s at 10k -> equal near 7k.
QUERY_ANN_MIN = 5_000
ALL_ANN_MIN = 8_000
MARKER = "README-FEATSTORE-ANN.txt"


def to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


class AnnError(RuntimeError):
    """The index cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class EmbeddingSet:
    backbone: str
    weights_id: str
    preprocess: str
    dim: int

    @property
    def table(self) -> str:
        from featstore.store import embedding_table

        return embedding_table(self.dim)

    @property
    def key(self) -> tuple[str, str, str]:
        """The set's rows in its table, as the store layer's embedding_set_* functions take them."""
        return self.backbone, self.weights_id, self.preprocess

    @property
    def name(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.backbone}__{self.preprocess}")[:80] + "-" + h

    def label(self) -> str:
        return f"{self.backbone}/{self.preprocess}"


def resolve_set(con, backbone: str, preprocess: str = "original", weights_id: str | None = None) -> EmbeddingSet:
    from featstore.api import Store

    wid, dim = Store.over(con).embedding_set(backbone, preprocess, weights_id)
    return EmbeddingSet(backbone, wid, preprocess, int(dim))


def use_ann(method: str, n: int, threshold: int) -> bool:
    """method: auto (the index from `threshold` vectors on), ann, exact."""
    if method not in ("auto", "ann", "exact"):
        raise ValueError(f"search method '{method}': use auto, ann or exact")
    return method == "ann" or (method == "auto" and n >= threshold)


def store_path(con) -> Path | None:
    """The store's file, or None (in memory, a snapshot loaded into memory)."""
    p = store_file_path(con)
    return Path(p) if p and p != ":memory:" else None


def unit_vectors(con, s: "EmbeddingSet", batch: int = 20_000, spill=None):
    """(Xn, meta): the set's vectors as unit rows (float32 [n, d]) and their image_id, source, label
    (Polars), ordered by image_id - the rows Store.arrays gives. Read in batches straight into one
    matrix: about one copy of the vectors in memory, where Store.arrays peaks near five (DuckDB's
    result, its Arrow copy, the sorted copy, X, the normalised X: ~6 GiB for 300k x 1024).
    spill: a file path; the rows go there instead (Xn a featstore.spill.SpilledRows, the same floats),
    and the search reads them back as it needs them (3.8 GiB less in memory at 1M x 1024)."""
    import polars as pl
    import pyarrow.compute as pc

    meta = embedding_set_images(con, s.table, s.key)
    meta = meta.take(pc.sort_indices(meta, [("image_id", "ascending")]))
    ids = _as_bytes(meta.column("image_id").to_pylist())
    order = np.argsort(ids, kind="stable")
    ids_sorted = ids[order]
    if spill is None:
        Xn = np.zeros((len(ids), s.dim), dtype=np.float32)
    else:
        Xn = SpilledRows.create(spill, len(ids), s.dim)
    filled = np.zeros(len(ids), dtype=bool)
    reader = embedding_set_vector_batches(con, s.table, s.key, batch)
    for rb in reader:
        got = _as_bytes(rb.column(0).to_pylist()).astype(ids.dtype)
        at = np.minimum(np.searchsorted(ids_sorted, got), max(len(ids) - 1, 0))
        ok = ids_sorted[at] == got  # rows added since the first query are not in meta: left out
        rows = order[at[ok]]
        V = normalize(rb.column(1).flatten().to_numpy(zero_copy_only=False).reshape(-1, s.dim)[ok])
        if spill is None:
            Xn[rows] = V
        else:
            Xn.put(rows, V)
        filled[rows] = True
    if not filled.all():  # rows removed between the two reads
        Xn, meta = Xn[filled], meta.filter(filled)
    return Xn, pl.from_arrow(meta)


# --- the files -----------------------------------------------------------------------------------

def _folder(con) -> tuple[Path | None, str]:
    """<store>.ann/, made if need be; or (None, why it cannot be used)."""
    db = store_path(con)
    if db is None:
        return None, "the store is not a file"
    folder = db.with_name(db.name + ".ann")
    try:
        if not folder.exists():
            folder.mkdir()
            (folder / MARKER).write_text(
                "Approximate-nearest-neighbour indexes of the embedding sets in " + db.name + ", made by\n"
                "featstore (featstore/ann.py). They are rebuilt from the store when missing: safe to delete.\n")
        elif not folder.is_dir() or not (folder / MARKER).is_file():
            return None, f"{folder} exists and was not made by featstore"
        return folder, ""
    except OSError as e:
        return None, f"cannot write {folder}: {e.strerror or e}"


@contextmanager
def _lock(path: Path, exclusive: bool):
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # only our own temporary file
        raise


class _Stale(Exception):
    """The files cannot be used as they are; the message says why."""


def _params(s: EmbeddingSet) -> dict:
    import usearch

    return dict(format=FORMAT, set=asdict(s), metric=METRIC, dtype=DTYPE, dim=s.dim, connectivity=CONNECTIVITY,
                expansion_add=EXPANSION_ADD, usearch=usearch.__version__)


# --- the index -----------------------------------------------------------------------------------

class AnnIndex:
    """A set's HNSW graph and its rows (image_id, key, rowid, fingerprint), fresh against the store."""

    def __init__(self, s: EmbeddingSet, index, rows: np.ndarray, path: Path | None = None):
        self.set, self.index, self.rows, self.path = s, index, rows, path

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return (self.path.stat().st_size if self.path else self.index.memory_usage) + self.rows.nbytes

    def keys_of(self, ids) -> np.ndarray:
        """usearch keys of these image_ids (-1 where absent)."""
        want = _as_bytes(ids)
        have = self.rows["id"]
        fits = np.char.str_len(want) <= have.dtype.itemsize  # a longer id is in no row (and must not be cut)
        want = want.astype(have.dtype)
        at = np.minimum(np.searchsorted(have, want), len(have) - 1)
        hit = fits & (have[at] == want)
        return np.where(hit, self.rows["key"][at].astype(np.int64), -1)

    def search(self, Q: np.ndarray, count: int, threads: int = 0) -> np.ndarray:
        """[q, count] keys of Q's approximate nearest vectors (-1 where fewer were found)."""
        count = min(count, len(self))
        self.index.expansion_search = max(EXPANSION_SEARCH, 2 * count)
        m = self.index.search(np.ascontiguousarray(Q, dtype=np.float32).reshape(-1, self.set.dim), count,
                              threads=threads)
        if m.keys.ndim == 1:  # one query: usearch hands back its valid matches only
            out = np.full((1, count), -1, dtype=np.int64)
            out[0, :len(m.keys)] = m.keys
            return out
        return np.where(np.arange(count)[None, :] < m.counts[:, None], m.keys.astype(np.int64), -1)

    def knn_rows(self, Xn: np.ndarray, ids, k: int, block: int = 2048, progress=None,
                 which: np.ndarray | None = None) -> np.ndarray:
        """[n, k] rows of Xn (unit vectors, one per id) most similar to each row, itself excluded:
        the exact top k among the graph's candidates, exact search where the graph found too few.
        which: only these rows (in this order), e.g. a sample to measure recall on."""
        n = len(Xn)
        k = min(k, n - 1)
        which = np.arange(n) if which is None else np.asarray(which)
        ids = np.asarray(ids)
        # key -> row of Xn (-1: a vector the caller does not have, e.g. an image since removed)
        key_row = np.full(len(self) + 1, -1, dtype=np.int64)
        keys = self.keys_of(ids)
        key_row[keys[keys >= 0]] = np.nonzero(keys >= 0)[0]
        count = k + max(k, 10) + 1
        out = np.empty((len(which), k), dtype=np.int64)
        short = []
        for start in range(0, len(which), block):
            if progress:
                progress(start, len(which), "searching the ANN index")
            at = np.arange(start, min(start + block, len(which)))
            rows = which[at]
            found = self.search(scattered_rows(Xn, rows), count)
            cand = np.where(found >= 0, key_row[found], -1)
            cand[cand == rows[:, None]] = -1  # not itself
            best = _rank(Xn, rows, cand, k)
            out[at] = best
            short += list(at[(best < 0).any(1)])
        if short:  # the graph returned fewer than k others: answer those rows exactly
            out[short] = _exact_rows(Xn, which[short], k)
        if progress:
            progress(len(which), len(which), "searching the ANN index")
        return out


def _in_memory(Xn) -> np.ndarray:
    return Xn.take(np.arange(len(Xn)), np.float32) if isinstance(Xn, SpilledRows) else Xn


def _rank(Xn, rows: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """neighbors.rank, also for unit vectors in a file: the block's rows and candidates read into a small
    matrix, ranked there (the same floats; ties go to the lower row, as the row order is kept)."""
    if not isinstance(Xn, SpilledRows):
        return rank(Xn, rows, cand, k)
    U = np.unique(np.concatenate([rows, cand[cand >= 0]]))
    best = rank(Xn.take_scattered(U), np.searchsorted(U, rows),
                np.where(cand >= 0, np.searchsorted(U, np.maximum(cand, 0)), -1), k)
    return np.where(best >= 0, U[np.maximum(best, 0)], -1)


def _exact_rows(Xn, rows: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """neighbors.exact_rows, also for unit vectors in a file: each block of the file scored against a chunk
    of the rows, its best k + 5 kept (with any within rounding of them), the k best of all ranked by rank."""
    from featstore.neighbors import candidates, exact_rows

    if not isinstance(Xn, SpilledRows):
        return exact_rows(Xn, rows, k)
    n = len(Xn)
    k = min(k, n - 1)
    out = np.empty((len(rows), k), dtype=np.int64)
    for a in range(0, len(rows), chunk):
        r = np.asarray(rows[a:a + chunk], dtype=np.int64)
        Q, parts = Xn.take_scattered(r), []
        for b0 in range(0, n, ROW_BLOCK):
            B = Xn.take(np.arange(b0, min(b0 + ROW_BLOCK, n)), np.float32)
            S = Q @ B.T
            own = (r >= b0) & (r < b0 + len(B))
            S[np.nonzero(own)[0], r[own] - b0] = -np.inf  # not itself
            part = candidates(S, min(k + 5, len(B)), Xn.dim)
            parts.append(np.where(part >= 0, part + b0, -1))
        cand = np.concatenate(parts, 1)
        cand[cand == r[:, None]] = -1  # itself, where its block had no k + 5 others
        out[a:a + chunk] = _rank(Xn, r, cand, k)
    return out


def _load(folder: Path, s: EmbeddingSet, view: bool):
    """(sidecar, AnnIndex) from the files, or _Stale(reason). None when there are none."""
    from usearch.index import Index

    side, idx_path, rows_path = (folder / f"{s.name}{ext}" for ext in (".json", ".usearch", ".rows.npy"))
    if not side.exists() and not idx_path.exists():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise _Stale(f"its sidecar {side.name} is unreadable ({type(e).__name__})")
    if not isinstance(meta, dict) or {k: meta.get(k) for k in _params(s)} != _params(s):
        raise _Stale(f"{side.name} was written for other parameters or another usearch version")
    try:
        st = idx_path.stat()
    except OSError:
        raise _Stale(f"{idx_path.name} is missing")
    if (st.st_size, st.st_mtime_ns) != (meta.get("index_bytes"), meta.get("index_mtime_ns")):
        raise _Stale(f"{idx_path.name} changed after it was written (size or time differs from {side.name})")
    try:
        rows = np.load(rows_path, mmap_mode="r" if view else None)
        if rows.dtype.names != _rows_dtype(1).names or rows.shape != (meta.get("count"),):
            raise ValueError("shape")
        index = Index(ndim=s.dim, metric=METRIC, dtype=DTYPE, connectivity=CONNECTIVITY,
                      expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)
        (index.view if view else index.load)(str(idx_path))
    except (OSError, ValueError, RuntimeError) as e:
        raise _Stale(f"it cannot be read ({type(e).__name__}: {str(e)[:120]})")
    if len(index) != meta["count"] or index.ndim != s.dim:
        raise _Stale(f"{idx_path.name} holds {len(index):,} vectors, its sidecar says {meta['count']:,}")
    return meta, AnnIndex(s, index, rows, idx_path)


def _fingerprint(con, s: EmbeddingSet) -> dict:
    n, x, total = embedding_set_fingerprint(con, s.table, s.key)
    return {"count": int(n), "xor": str(x), "sum": str(total)}


def _current_rows(con, s: EmbeddingSet) -> np.ndarray:
    """The set's rows in the store now, sorted by image_id (key and slot unset)."""
    import pyarrow.compute as pc

    tbl = embedding_set_rows(con, s.table, s.key)
    tbl = tbl.take(pc.sort_indices(tbl, [("image_id", "ascending")]))
    ids = np.array(tbl.column("image_id").to_pylist(), dtype=object)
    width = max((len(i.encode()) for i in ids), default=1)
    rows = np.zeros(len(ids), dtype=_rows_dtype(width))
    rows["id"] = [i.encode() for i in ids]
    rows["rowid"] = tbl.column("rid").to_numpy()
    rows["fp"] = tbl.column("fp").to_numpy()
    return rows


def _as_bytes(ids) -> np.ndarray:
    ids = np.asarray(ids)
    return ids if ids.dtype.kind == "S" else np.array([str(i).encode() for i in ids.tolist()])


def _rows_dtype(width: int) -> np.dtype:
    return np.dtype([("id", f"S{max(width, 1)}"), ("key", "<u8"), ("rowid", "<i8"), ("fp", "<u8"), ("slot", "<i8")])


def _positions(ids: np.ndarray, xids) -> np.ndarray:
    """Row of each image_id (bytes) in the caller's list xids, -1 where absent."""
    if xids is None or not len(ids):
        return np.full(len(ids), -1, dtype=np.int64)
    xb = _as_bytes(xids)
    width = max(xb.dtype.itemsize, ids.dtype.itemsize)
    xb, ids = xb.astype(f"S{width}"), ids.astype(f"S{width}")
    order = np.argsort(xb, kind="stable")
    at = np.minimum(np.searchsorted(xb[order], ids), len(xb) - 1)
    return np.where(xb[order][at] == ids, order[at], -1)


def _vectors(con, s: EmbeddingSet, ids: np.ndarray, Xn: np.ndarray | None, pos: np.ndarray) -> np.ndarray:
    """Unit vectors of these image_ids (bytes): rows `pos` of the caller's matrix, the store where -1."""
    out = np.empty((len(ids), s.dim), dtype=np.float32)
    hit = pos >= 0
    if hit.any():
        out[hit] = scattered_rows(Xn, pos[hit])
    if not hit.all():
        want = [b.decode() for b in ids[~hit]]
        tbl = embedding_set_vectors(con, s.table, s.key, want)
        got = {i: n for n, i in enumerate(tbl.column("image_id").to_pylist())}
        vec = tbl.column("vector").combine_chunks()
        V = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), s.dim)
        out[~hit] = normalize(V[[got[i] for i in want]])
    return out


def _all_vectors(con, s: EmbeddingSet) -> tuple[np.ndarray, list]:
    """Every unit vector of the set and its image_id (one scan)."""
    tbl = embedding_set_vectors(con, s.table, s.key)
    vec = tbl.column("vector").combine_chunks()
    X = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), s.dim)
    return normalize(X), tbl.column("image_id").to_pylist()


def _add(con, s, index, keys: np.ndarray, ids: np.ndarray, Xn, xids, progress=None, block: int = 20_000) -> None:
    """Insert these rows' vectors under their keys, a block at a time (no second copy of the matrix)."""
    pos = _positions(ids, xids)
    for start in range(0, len(keys), block):
        if progress:
            progress(start, len(keys), "building the ANN index")
        sl = slice(start, start + block)
        index.add(keys[sl], _vectors(con, s, ids[sl], Xn, pos[sl]), threads=ADD_THREADS)
    if progress:
        progress(len(keys), len(keys), "building the ANN index")


def _new_index(s: EmbeddingSet):
    from usearch.index import Index

    return Index(ndim=s.dim, metric=METRIC, dtype=DTYPE, connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD,
                 expansion_search=EXPANSION_SEARCH)


def _save(folder: Path, s: EmbeddingSet, ann: AnnIndex, fp: dict, built_at: str) -> None:
    idx_path = folder / f"{s.name}.usearch"
    _atomic_write(folder / f"{s.name}.rows.npy", lambda t: _save_npy(t, np.asarray(ann.rows)))
    _atomic_write(idx_path, lambda t: ann.index.save(str(t)))
    st = idx_path.stat()
    meta = dict(_params(s), count=len(ann), index_bytes=st.st_size, index_mtime_ns=st.st_mtime_ns,
                fingerprint=fp, built_at=built_at, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                parameters_why="featstore/ann.py")
    _atomic_write(folder / f"{s.name}.json", lambda t: t.write_text(json.dumps(meta, indent=1)))
    ann.path = idx_path


def _save_npy(path: Path, a: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, a)


def open_index(con, s: EmbeddingSet, Xn: np.ndarray | None = None, ids=None, say=to_stderr, progress=None) -> AnnIndex:
    """The set's index, fresh against the store: read from <store>.ann/, grown by the set's new rows,
    or (re)built. Xn/ids: the set's unit vectors the caller already holds (spares reading them again)."""
    fp = _fingerprint(con, s)
    if fp["count"] == 0:
        raise AnnError(f"no embeddings in {s.label()}")
    folder, why = _folder(con)
    if folder is None:
        return _build(con, s, fp, Xn, ids, say, progress, None, f"in memory for this run: {why}")
    cached = _CACHE.get(str(folder / s.name))
    if cached is not None and cached[0] == fp and cached[1] == _stamp(folder, s):
        return cached[2]
    lock = folder / f"{s.name}.lock"
    try:
        with _lock(lock, exclusive=False):
            got = _load(folder, s, view=True)
            if got is not None and got[0].get("fingerprint") == fp:
                return _remember(folder, s, fp, got[1])
    except _Stale:
        pass  # said and handled below, under the writer's lock
    except OSError as e:
        return _build(con, s, fp, Xn, ids, say, progress, None,
                      f"in memory for this run: cannot lock {lock}: {e.strerror or e}")
    with _lock(lock, exclusive=True):
        try:
            got = _load(folder, s, view=False)  # another process may have brought it up to date meanwhile
        except _Stale as e:
            say(f"ANN index of {s.label()} ({folder / s.name}.usearch): {e}; rebuilding it")
            return _build(con, s, fp, Xn, ids, say, progress, folder, None)
        if got is None:
            return _build(con, s, fp, Xn, ids, say, progress, folder, "first use")
        if got[0].get("fingerprint") == fp:
            return _remember(folder, s, fp, got[1])
        meta, ann = got
        now = _current_rows(con, s)
        old = np.asarray(ann.rows)
        width = max(now["id"].dtype.itemsize, old["id"].dtype.itemsize)
        now_ids, old_ids = now["id"].astype(f"S{width}"), old["id"].astype(f"S{width}")
        at = np.minimum(np.searchsorted(now_ids, old_ids), max(len(now) - 1, 0))
        kept = (now_ids[at] == old_ids) if len(now) else np.zeros(len(old), bool)
        if not kept.all() or (now["fp"][at] != old["fp"]).any():
            n_gone, n_changed = int((~kept).sum()), int((kept & (now["fp"][at] != old["fp"])).sum())
            say(f"ANN index of {s.label()}: {n_gone:,} rows removed and {n_changed:,} re-embedded since it was "
                f"built; rebuilding it")
            return _build(con, s, fp, Xn, ids, say, progress, folder, None)
        new = np.ones(len(now), bool)
        new[at] = False
        rows = np.zeros(len(now), dtype=_rows_dtype(width))
        rows["id"], rows["rowid"], rows["fp"] = now_ids, now["rowid"], now["fp"]
        rows["key"][at] = old["key"]
        rows["key"][new] = np.arange(len(old), len(now), dtype=np.uint64)
        rows["slot"][rows["key"].astype(np.int64)] = np.arange(len(rows))
        say(f"ANN index of {s.label()}: adding {int(new.sum()):,} new vectors to its {len(old):,}")
        _add(con, s, ann.index, rows["key"][new], rows["id"][new], Xn, ids, progress)
        grown = AnnIndex(s, ann.index, rows)
        if _persist(folder, s, grown, fp, meta.get("built_at", ""), say):
            _remember(folder, s, fp, grown)
        return grown


def _build(con, s, fp, Xn, ids, say, progress, folder, why: str | None) -> AnnIndex:
    """A new graph of every row of the set; why: said in one line (None: the caller has said it)."""
    rows = _current_rows(con, s)
    rows["key"] = np.arange(len(rows), dtype=np.uint64)  # image_id order: the same rows give the same graph
    rows["slot"] = np.arange(len(rows))
    if why:
        say(f"building the ANN index of {s.label()} ({len(rows):,} vectors, {why}; "
            f"about a minute per 100k vectors on 2 cores)")
    if Xn is None:
        Xn, ids = _all_vectors(con, s)
    index = _new_index(s)
    _add(con, s, index, rows["key"], rows["id"], Xn, ids, progress)
    ann = AnnIndex(s, index, rows)
    if folder is not None and _persist(folder, s, ann, fp, time.strftime("%Y-%m-%dT%H:%M:%S"), say):
        _remember(folder, s, fp, ann)
    return ann


def _persist(folder, s, ann, fp, built_at, say) -> bool:
    try:
        _save(folder, s, ann, fp, built_at)
        return True
    except OSError as e:
        say(f"could not save the ANN index ({folder}: {e.strerror or e}): kept in memory for this run")
        return False


# Indexes this process has open, by file: a second query in the same process (a notebook, the
# benchmark) skips mapping the file again (~10 ms at 100k vectors, more at 1M), never the freshness check.
_CACHE: dict[str, tuple[dict, tuple, AnnIndex]] = {}


def _stamp(folder: Path, s: EmbeddingSet) -> tuple | None:
    try:
        st = (folder / f"{s.name}.usearch").stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def _remember(folder: Path, s: EmbeddingSet, fp: dict, ann: AnnIndex) -> AnnIndex:
    _CACHE[str(folder / s.name)] = (fp, _stamp(folder, s), ann)
    return ann


def forget(con, s: EmbeddingSet) -> None:
    """Drop this process's open index of the set (a long command done with it: at 1M vectors a freshly built
    graph holds 2.3 GiB); the next use maps the file again."""
    db = store_path(con)  # not _folder: that makes <store>.ann/, which a store searched exactly never had
    if db is not None:
        _CACHE.pop(str(db.with_name(db.name + ".ann") / s.name), None)


# --- what the commands call ----------------------------------------------------------------------

def knn(con, s: EmbeddingSet, Xn: np.ndarray, ids, k: int, method: str = "auto", say=to_stderr,
        progress=None) -> np.ndarray:
    """[n, min(k, n-1)] row indices of each row's most cosine-similar other rows (Xn: unit vectors
    of the set, one per image_id in ids; an array, or a SpilledRows file the index search reads back as it
    needs it). Exact below ALL_ANN_MIN rows (or method="exact": that loads a SpilledRows whole)."""
    from featstore.neighbors import knn_indices

    if not use_ann(method, len(Xn), ALL_ANN_MIN) or len(Xn) < 2:
        return knn_indices(_in_memory(Xn), k, normalized=True)
    ann = open_index(con, s, Xn, ids, say, progress)
    return ann.knn_rows(Xn, ids, k, progress=progress)


def nearest(con, s: EmbeddingSet, image_id: str, k: int = 10, say=to_stderr):
    """The k images most similar to one image (Arrow table; the columns and order of
    sql/nearest_neighbours.sql): candidates from the index, similarity and order computed by DuckDB
    exactly as that query computes them."""
    import pyarrow as pa

    ann = open_index(con, s, say=say)
    key = int(ann.keys_of([image_id])[0])
    sims = pa.table({"image_id": pa.array([], pa.string()), "sim": pa.array([], pa.float32())})
    q = None
    if key >= 0:  # else the image has no vector in this set: no neighbours, as the SQL says
        row = ann.rows[ann.rows["slot"][key]]
        q = _fetch(con, s, [int(row["rowid"])], [row["id"].decode()])
    if q is not None:
        found = ann.search(normalize(q), k + max(k, 10) + 1)[0]
        sel = ann.rows[ann.rows["slot"][found[(found >= 0) & (found != key)]]]
        cand_ids = [b.decode() for b in sel["id"]]
        qv = [float(x) for x in q[0]]  # float32 values, exactly, as the SQL's q.vector
        # rowid = ANY(list) reads just those rows; the image_id check catches rowids moved since
        sims = embedding_set_similarities(con, s.table, s.key, qv, rowids=[int(r) for r in sel["rowid"]])
        if sorted(sims.column("image_id").to_pylist()) != sorted(cand_ids):
            sims = embedding_set_similarities(con, s.table, s.key, qv, image_ids=cand_ids)
    return most_similar_images(con, sims, k)


def _fetch(con, s: EmbeddingSet, rowids: list[int], expect: list[str]) -> np.ndarray | None:
    """Vectors by store rowid, checked against the image_ids they should be (None if they moved)."""
    tbl = embedding_set_vectors_at(con, s.table, s.key, rowids=rowids)
    got = tbl.column("image_id").to_pylist()
    if got != expect:
        tbl = embedding_set_vectors_at(con, s.table, s.key, image_ids=expect)
        got = tbl.column("image_id").to_pylist()
        if sorted(got) != sorted(expect):
            return None
    vec = tbl.column("vector").combine_chunks()
    V = vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), s.dim)
    return V[[got.index(e) for e in expect]]
