"""Nearest neighbours (paper 004): similar images by cosine similarity of their embeddings.

One image: `sql/nearest_neighbours.sql`, in DuckDB. The whole store: for every image, the share of
its k nearest neighbours that come from its own source and that carry its own label, summarised per
source beside what chance would give. Neighbours that share the source far more often than the
label say the embedding encodes where an image came from more than what it shows.
"""
from __future__ import annotations

import numpy as np
import polars as pl


def knn_indices(X: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """[n, k] indices of each row's k most cosine-similar other rows (exact, blocked matmul)."""
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    Xn = Xn.astype(np.float32)
    k = min(k, len(X) - 1)
    out = np.empty((len(X), k), dtype=np.int64)
    for start in range(0, len(X), block):
        S = Xn[start:start + block] @ Xn.T
        S[np.arange(S.shape[0]), np.arange(start, start + S.shape[0])] = -np.inf  # not itself
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(S, part, 1), axis=1, kind="stable")
        out[start:start + block] = np.take_along_axis(part, order, 1)
    return out


def neighbour_summary(X: np.ndarray, source, label, k: int = 10) -> pl.DataFrame:
    source, label = np.asarray(source).astype(str), np.asarray(label).astype(str)
    idx = knn_indices(X, k)
    same_src = (source[idx] == source[:, None]).mean(1)
    same_lab = (label[idx] == label[:, None]).mean(1)
    n = len(source)
    rows = []
    for s in sorted(set(source)):
        m = source == s
        # chance: a random other image shares the source / the label this often
        chance_src = (m.sum() - 1) / (n - 1)
        chance_lab = float(np.mean([(np.sum(label == v) - 1) / (n - 1) for v in label[m]]))
        rows.append(dict(source=s, n=int(m.sum()), k=int(idx.shape[1]),
                         same_source=float(same_src[m].mean()), same_source_chance=float(chance_src),
                         same_label=float(same_lab[m].mean()), same_label_chance=chance_lab))
    return pl.DataFrame(rows)
