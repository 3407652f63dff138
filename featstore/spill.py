"""A float32 matrix kept in a file instead of memory (issue 27: 8 GiB at 1M x 1024, where the set alone is
3.8 GiB). The probe's folds read it a block of rows at a time with plain reads; the neighbour search reads
scattered rows through a short-lived map. Either way the pages stay in the OS cache, not in the process."""
from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np


ROW_BLOCK = 16_384      # rows per block when rows are copied out (64 MiB of float32 at 1024-d)


class SpilledRows:
    """A float32 matrix in a file. Indexing with a mask or indices gives a view (nothing read); `take` reads
    rows, `take_scattered` reads few rows spread over the file."""

    def __init__(self, path, n: int, dim: int, rows: np.ndarray | None = None):
        self.path, self.n_file, self.dim = Path(path), int(n), int(dim)
        self.rows = np.arange(self.n_file) if rows is None else np.asarray(rows, dtype=np.int64)

    @classmethod
    def write(cls, X: np.ndarray, path) -> "SpilledRows":
        X = np.asarray(X)
        with open(path, "wb") as f:
            for a in range(0, len(X), ROW_BLOCK):  # a block at a time: a float64 or strided X is never copied whole
                f.write(np.ascontiguousarray(X[a:a + ROW_BLOCK], dtype=np.float32).tobytes())
        return cls(path, *X.shape)

    @classmethod
    def create(cls, path, n: int, dim: int) -> "SpilledRows":
        """An n x dim file to fill with `put`, its space reserved now: a full disk is an OSError here, not a
        SIGBUS when a mapped page cannot be written."""
        size = int(n) * int(dim) * 4
        with open(path, "wb") as f:
            try:
                if size:
                    os.posix_fallocate(f.fileno(), 0, size)
            except (AttributeError, OSError) as e:  # macOS has none; some file systems refuse it
                if getattr(e, "errno", None) not in (None, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                zeros = bytes(min(size, ROW_BLOCK * 4096))
                for a in range(0, size, len(zeros)):  # written, so allocated: a full disk raises here too
                    f.write(zeros[:size - a])
        return cls(path, n, dim)

    def put(self, idx, V: np.ndarray) -> None:
        """Write V's rows at rows `idx` of this view (through a map of the file dropped after each ROW_BLOCK
        rows: the written pages go to the OS cache, not this process's memory)."""
        pos = self._pos(idx)
        V = np.asarray(V, dtype=np.float32).reshape(len(pos), self.dim)
        for a in range(0, len(pos), ROW_BLOCK):
            with _mapped(self.path, self.n_file, self.dim, write=True) as (_, A):
                A[pos[a:a + ROW_BLOCK]] = V[a:a + ROW_BLOCK]
                del A

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> "SpilledRows":
        return SpilledRows(self.path, self.n_file, self.dim, self.rows[key])

    def _pos(self, idx) -> np.ndarray:
        """The file's rows for rows `idx` of this view (indices, or a boolean mask)."""
        idx = np.asarray(idx)
        return self.rows[idx if idx.dtype == bool else idx.astype(np.int64)]

    def take(self, idx, dtype=np.float64) -> np.ndarray:
        """Rows `idx` of this view, in that order, as `dtype`: the file read once, a block at a time (for many
        rows: each read spans up to ROW_BLOCK rows)."""
        pos = self._pos(idx)
        order = np.argsort(pos, kind="stable")
        at = pos[order]
        out = np.empty((len(pos), self.dim), dtype)
        width = self.dim * 4
        with open(self.path, "rb") as f:
            lo = 0
            while lo < len(at):
                b0 = int(at[lo])  # the next block starts at the next row wanted
                hi = int(np.searchsorted(at, b0 + ROW_BLOCK))
                n = int(at[hi - 1]) - b0 + 1
                f.seek(b0 * width)
                block = np.frombuffer(f.read(n * width), dtype=np.float32).reshape(n, self.dim)
                out[order[lo:hi]] = block[at[lo:hi] - b0]
                lo = hi
        return out

    def take_scattered(self, idx, dtype=np.float32) -> np.ndarray:
        """Rows `idx` of this view as `dtype`, for rows spread thinly over the file (a search's candidates):
        only their pages are touched, through a map of the file dropped after each ROW_BLOCK rows, so the
        process never holds more than that block's pages of it."""
        pos = self._pos(idx)
        out = np.empty((len(pos), self.dim), dtype)
        for a in range(0, len(pos), ROW_BLOCK):
            with _mapped(self.path, self.n_file, self.dim) as (_, A):
                out[a:a + ROW_BLOCK] = A[pos[a:a + ROW_BLOCK]]
                del A
        return out


class _mapped:
    """(mmap, [n, dim] float32 view of it) for a with block; the map is closed at its end (the caller deletes
    its view first), which takes its pages out of this process's resident memory."""

    def __init__(self, path, n: int, dim: int, write: bool = False):
        self.path, self.n, self.dim, self.write = path, n, dim, write

    def __enter__(self):
        with open(self.path, "r+b" if self.write else "rb") as f:
            size = self.n * self.dim * 4
            self.m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE if self.write else mmap.ACCESS_READ)
        return self.m, np.frombuffer(self.m, dtype=np.float32, count=self.n * self.dim).reshape(self.n, self.dim)

    def __exit__(self, kind, err, tb):
        try:
            self.m.close()
        except BufferError:  # a view outlived the block because it raised: that error is the one to see
            if kind is None:
                raise


def take_rows(Z, idx, dtype=np.float64) -> np.ndarray:
    """Rows `idx` of Z (an array or SpilledRows) as a new `dtype` array, copied a block at a time, so a float32
    set never has a whole float32 copy of the fold beside the float64 one."""
    if isinstance(Z, SpilledRows):
        return Z.take(idx, dtype)
    Z, idx = np.asarray(Z), np.asarray(idx)
    out = np.empty((len(idx), Z.shape[1]), dtype)
    for a in range(0, len(idx), ROW_BLOCK):
        out[a:a + ROW_BLOCK] = Z[idx[a:a + ROW_BLOCK]]
    return out


def scattered_rows(Z, idx) -> np.ndarray:
    """Rows `idx` of Z (an array or SpilledRows) as float32: few rows from anywhere."""
    return Z.take_scattered(idx) if isinstance(Z, SpilledRows) else np.asarray(Z)[np.asarray(idx, dtype=np.int64)]
