"""Nearest neighbours ([Goldstein2021]): similar images by cosine similarity of their embeddings.

One image: `sql/nearest_neighbours.sql`, in DuckDB. The whole store: for every image, the share of
its k nearest neighbours that come from its own source and that carry its own label, summarised per
source beside what chance would give. Neighbours that share the source far more often than the
label say the embedding encodes where an image came from more than what it shows.
Exact here; from featstore.ann.ALL_ANN_MIN images on, the commands take the k-NN from the
approximate index (featstore/ann.py), ranked the same way.
"""
from __future__ import annotations

import numpy as np
import polars as pl


def knn_indices(X: np.ndarray, k: int, block: int = 2048, normalized: bool = False) -> np.ndarray:
    """[n, k] indices of each row's k most cosine-similar other rows (exact, blocked matmul).
    Ranked as the ANN index ranks its candidates (`rank`, below): by one fixed per-pair cosine,
    ties to the lower index, so exact and approximate answers agree to the last place."""

    Xn = X if normalized else normalize(X)
    k = min(k, len(X) - 1)
    take = min(k + 5, len(X) - 1)  # a margin: the matmul's rounding may differ from the re-rank's at the border
    out = np.empty((len(X), k), dtype=np.int64)
    for start in range(0, len(X), block):
        S = Xn[start:start + block] @ Xn.T
        rows = np.arange(start, start + S.shape[0])
        S[np.arange(S.shape[0]), rows] = -np.inf  # not itself
        out[start:start + block] = rank(Xn, rows, candidates(S, take, Xn.shape[1]), k)
    return out


def candidates(S: np.ndarray, take: int, dim: int) -> np.ndarray:
    """[b, >= take] columns of each row's `take` highest scores, and every column within the product's rounding
    of the lowest of them (-1 pads): with more equal vectors than places, rank's rule (the lower index) picks
    among all of them, not among those argpartition, or the matmul's last bit, happened to keep."""
    part = np.argpartition(-S, take - 1, axis=1)[:, :take]
    # S's matmul and rank's per-pair sum round differently, each by at most dim * eps / 2 for unit vectors
    least = S[np.arange(len(S))[:, None], part].min(1) - dim * np.finfo(S.dtype).eps
    wide = S >= least[:, None]
    counts = wide.sum(1)
    if (counts == take).all():  # no other column that close: argpartition's are all of them
        return part
    r, c = np.nonzero(wide)  # row-major: each row's columns together, in order
    out = np.full((len(S), int(counts.max())), -1, dtype=np.int64)
    out[r, np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)] = c
    return out


def exact_rows(Xn: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """knn_indices for some rows only (unit vectors)."""

    take = min(k + 5, len(Xn) - 1)
    S = Xn[rows] @ Xn.T
    S[np.arange(len(rows)), rows] = -np.inf
    part = candidates(S, take, Xn.shape[1])
    return rank(Xn, rows, part, k)


def neighbor_summary(X: np.ndarray | None, source, label, k: int = 10, idx: np.ndarray | None = None) -> pl.DataFrame:
    """idx: the k-NN already found (e.g. by featstore.ann.knn); else exact, from X."""
    source, label = np.asarray(source).astype(str), np.asarray(label).astype(str)
    idx = knn_indices(X, k) if idx is None else idx
    same_src = (source[idx] == source[:, None]).mean(1)
    same_lab = (label[idx] == label[:, None]).mean(1)
    n = len(source)
    _, inv, counts = np.unique(label, return_inverse=True, return_counts=True)
    label_chance = (counts[inv] - 1) / (n - 1)  # per image: a random other image has its label this often
    rows = []
    for s in sorted(set(source)):
        m = source == s
        # chance: a random other image shares the source / the label this often
        chance_src = (m.sum() - 1) / (n - 1)
        chance_lab = float(np.mean(label_chance[m]))
        rows.append(dict(source=s, n=int(m.sum()), k=int(idx.shape[1]),
                         same_source=float(same_src[m].mean()), same_source_chance=float(chance_src),
                         same_label=float(same_lab[m].mean()), same_label_chance=chance_lab))
    return pl.DataFrame(rows)


def normalize(X: np.ndarray) -> np.ndarray:
    """Unit rows, float32, C order (a new array)."""
    X = np.asarray(X, dtype=np.float32)
    return np.ascontiguousarray(X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def pair_sims(Xn: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Cosine of row i with each of its candidates, [b, c]. One fixed summation per pair, whatever
    the batch: exact and approximate search rank by the same numbers."""
    # a product and a sum along the contiguous last axis: NumPy's pairwise sum depends on the row alone
    return (Xn[cand] * Xn[rows][:, None, :]).sum(-1)


def rank(Xn: np.ndarray, rows: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """The k best candidates per row ([b, c] row indices, -1 = none): highest cosine, then lowest index."""
    ok = cand >= 0
    s = pair_sims(Xn, rows, np.where(ok, cand, 0))
    s = np.where(ok, s, -np.inf)
    big = np.where(ok, cand, np.iinfo(np.int64).max)
    order = np.lexsort((big, -s), axis=1)[:, :k]
    return np.take_along_axis(cand, order, 1)
