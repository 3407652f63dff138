"""Embed: every image without an embedding for (backbone, weights, preprocessing), once.

Decoding and preprocessing run in worker processes: torch's DataLoader for torch models (pinned, bf16
batches on CUDA), a plain process pool for models that take NumPy arrays (ONNX graphs: the command never
imports torch, 2 s of its start-up). Each batch of vectors is written as one Arrow table in one
transaction, so a killed run leaves whole batches only and the next run picks up exactly the images
still missing.
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from datetime import datetime
from typing import Callable

import numpy as np
import pyarrow as pa

from featstore.backbones import Backbone
from featstore.decode import DecodeError, decode_bytes, read_file
from featstore.lungs import MaskError
from featstore.preprocess import PREPROCESSINGS, get_preprocess, to_input
from featstore.store import (delete_embed_errors_of, delete_embeddings_of, embedding_set_counts, embedding_table,
                             embedding_tables, ensure_embedding_table, finish_embed_run, image_count,
                             images_without_embedding, in_transaction, insert_embed_run, insert_frame,
                             interrupt_running_embed_runs, next_embed_run_id, registered, store_file_path, transaction,
                             upsert_embed_error_rows)


@dataclass
class EmbedReport:
    run_id: int
    backbone: str
    weights_id: str
    preprocess: str
    device: str
    n_todo: int = 0
    n_embedded: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (image_id, path, reason)
    seconds: float = 0.0
    status: str = "running"
    torn_shards: int = 0    # --engine ray: unreadable shard files a killed run left, dropped and redone

    @property
    def images_per_s(self) -> float:
        return self.n_embedded / self.seconds if self.seconds > 0 else 0.0


class ImageDataset:
    """(image_id, path[, lung mask PNG]) -> (image_id, path, float32 array | None, reason | None)."""

    def __init__(self, items: list[tuple], preprocess: str, size: int, channels: int, norm: tuple):
        self.items, self.size, self.channels, self.norm = items, size, channels, norm
        self.preprocess_name = preprocess
        self.fn = get_preprocess(preprocess)
        self.uint8 = self.fn.takes_uint8  # 8-bit images stay uint8 up to the model's own resize

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image_id, path, *mask = self.items[i]
        try:
            data = read_file(path)
            # the bytes decoded are the bytes hashed: a file replaced since ingest is never stored
            # under the old content's id (sha256 costs little next to decoding)
            if hashlib.sha256(data).hexdigest() != image_id:
                return image_id, path, None, CHANGED
            d = decode_bytes(data, str(path), draft=self.size, uint8=self.uint8)
            if reason := _non_finite(d.pixels, "pixel values"):
                return image_id, path, None, reason
            if mask:
                from featstore.masks import decode as decode_mask

                x = self.fn(d.pixels, decode_mask(mask[0]))
            else:
                x = self.fn(d.pixels)
            x = to_input(x, self.size, self.channels, self.norm)
            if reason := _non_finite(x, f"pixel values after preprocessing '{self.preprocess_name}'"):
                return image_id, path, None, reason
            return image_id, path, np.ascontiguousarray(x, np.float32), None
        except (DecodeError, MaskError) as e:
            return image_id, path, None, str(e)
        except Exception as e:  # a preprocessing bug must not kill the run; record it
            return image_id, path, None, f"unexpected {type(e).__name__}: {e}"


CHANGED = "file changed since ingest (its bytes no longer hash to the image id; ingest it again)"
NON_FINITE_EMBEDDING = "non-finite embedding"


def _non_finite(a: np.ndarray, what: str) -> str | None:
    """A reason if `a` holds NaN or Inf (a NaN image would top every neighbour list), else None."""
    a = np.asarray(a)
    if np.isfinite(a).all():
        return None
    n_nan = int(np.isnan(a).sum())
    return f"non-finite {what} ({n_nan} NaN, {int(np.isinf(a).sum())} Inf of {a.size})"


def finite_rows(ids: list, paths: list, feats: np.ndarray) -> tuple[list, np.ndarray, list]:
    """Split a batch of vectors: (ids, feats) that are finite everywhere, and (id, path, reason) for
    the others. Every batch passes here before it is stored."""
    ok = np.isfinite(feats).all(axis=1) if len(feats) else np.ones(0, bool)
    if ok.all():
        return ids, feats, []
    bad = [(i, p, NON_FINITE_EMBEDDING) for i, p, good in zip(ids, paths, ok) if not good]
    return [i for i, good in zip(ids, ok) if good], feats[ok], bad


def collate(samples, dtype=None):
    """A batch: (ids, paths, inputs or None, failures); inputs a NumPy float32 array, or a torch tensor of
    dtype (bf16 on CUDA: converted in the worker, half the bytes to share and copy)."""
    ok = [s for s in samples if s[2] is not None]
    bad = [(s[0], s[1], s[3]) for s in samples if s[2] is None]
    ids, paths = [s[0] for s in ok], [s[1] for s in ok]
    x = np.stack([s[2] for s in ok]) if ok else None
    if x is not None and dtype is not None:
        import torch

        x = torch.from_numpy(x).to(dtype)
    return ids, paths, x, bad


def _worker_init(parent_pid, _=None):
    from featstore.procs import die_with_parent

    die_with_parent(parent_pid)  # a killed embed takes its decoders with it, at once (not at their watchdog)
    # decoding is per-process; leave the cores to the model (torch reads the variable if imported later)
    os.environ["OMP_NUM_THREADS"] = "1"
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


class DecoderDied(RuntimeError):
    """A decode worker died under the run (the kernel's OOM killer, a crash in a decoder's C code): one line
    naming the images it had, what is stored, and what to do."""


def _decoder(ds: ImageDataset, parent_pid: int, tasks, results) -> None:
    """A DecodePool worker: (lo, hi) batches in, collated batches out, in order, until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the pool
    _worker_init(parent_pid)
    try:
        while (task := tasks.recv()) is not None:
            lo, hi = task
            results.send(collate([ds[i] for i in range(lo, hi)]))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping
        pass


class DecodePool:
    """Batches of ImageDataset decoded by `workers` forked processes, in order, for models that take NumPy
    arrays: batch b goes to worker b mod workers, at most 4 per worker ahead of the model (as the DataLoader's
    prefetch_factor=4). Each worker has its own pipes, so a worker that dies, even halfway through sending a
    batch, is seen at once (end of file, or its process sentinel) and fails the run with DecoderDied, never
    hangs it; leaving the `with` early kills the workers (they hold nothing to keep)."""

    AHEAD = 4

    def __init__(self, ds: ImageDataset, batch_size: int, workers: int):
        self.ds, self.workers = ds, max(0, min(workers, -(-len(ds) // batch_size)))
        self.bounds = [(lo, min(lo + batch_size, len(ds))) for lo in range(0, len(ds), batch_size)]
        self.procs: list = []  # (process, task sender, result receiver)

    def __enter__(self) -> DecodePool:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        for _ in range(self.workers):
            task_r, task_w = ctx.Pipe(duplex=False)
            res_r, res_w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_decoder, args=(self.ds, os.getpid(), task_r, res_w), daemon=True)
            p.start()
            task_r.close()  # only the worker holds these ends: its death is an end of file here
            res_w.close()
            self.procs.append((p, task_w, res_r))
        return self

    def __exit__(self, exc_type, *_) -> None:
        for p, task_w, _ in self.procs:
            if exc_type is None and p.is_alive():
                try:
                    task_w.send(None)
                except OSError:
                    pass
            else:
                p.kill()
        for p, task_w, res_r in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
            task_w.close()
            res_r.close()
        self.procs = []

    def _died(self, w: int, b: int) -> DecoderDied:
        p = self.procs[w][0]
        p.join(1)
        how = f"killed by signal {-p.exitcode}" if p.exitcode and p.exitcode < 0 else f"exit code {p.exitcode}"
        lo, hi = self.bounds[b]
        return DecoderDied(f"a decode worker died ({how}; out of memory?) while decoding {self.ds.items[lo][1]} to "
                           f"{self.ds.items[hi - 1][1]}; the batches before them are stored: run embed again to "
                           f"go on")

    def _send(self, b: int) -> None:
        w = b % self.workers
        try:
            self.procs[w][1].send(self.bounds[b])
        except OSError as e:
            raise self._died(w, b) from e

    def __iter__(self):
        if not self.procs:
            for lo, hi in self.bounds:
                yield collate([self.ds[i] for i in range(lo, hi)])
            return
        from multiprocessing.connection import wait

        n = len(self.bounds)
        for b in range(min(n, self.AHEAD * self.workers)):
            self._send(b)
        for b in range(n):
            w = b % self.workers
            p, _, res_r = self.procs[w]
            wait([res_r, p.sentinel])  # a result, or the worker's end (then reading gives EOF)
            try:
                batch = res_r.recv()
            except (EOFError, OSError) as e:
                raise self._died(w, b) from e
            if b + self.AHEAD * self.workers < n:
                self._send(b + self.AHEAD * self.workers)
            yield batch


def todo(con, backbone: Backbone, preprocess: str, limit: int | None = None) -> list[tuple[str, str]]:
    table = ensure_embedding_table(con, backbone.feature_dim)
    return images_without_embedding(con, table, (backbone.name, backbone.weights_id, preprocess), limit)


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2)))


def embed(con, backbone: Backbone, preprocess: str = "original", batch_size: int = 32,
          workers: int | None = None, limit: int | None = None,
          progress: Callable[[int, int], None] | None = None,
          before_commit: Callable[[int], None] | None = None) -> EmbedReport:
    """Embed the missing images. progress(done, total) is called after each batch;
    before_commit(batch_index) runs inside each batch's transaction (tests use it to
    kill the process mid-write). Lung variants read the stored lung masks and make none: make them
    first with masks.ensure_masks (`featstore embed` does); an image whose mask was refused, or
    that has none, is recorded in embed_errors with the mask's reason ("no lung mask [mask method
    none]" when there is no mask)."""
    get_preprocess(preprocess)  # unknown names fail before any work
    workers = default_workers() if workers is None else workers
    with EmbedRun(con, backbone, preprocess, batch_size, workers, limit=limit) as run:
        rep = run.report
        items, refused = run.attach_masks(run.items)
        if progress and refused:
            progress(len(refused), rep.n_todo)
        if items:
            spec = backbone.spec
            ds = ImageDataset(items, preprocess, spec.input_size, spec.channels, spec.norm)

            def write(b, ids, feats, bad):
                run.write_batch(ids, feats, bad, b, before_commit)

            done = len(rep.failed)
            # batch b is written while batch b+1 runs through the model
            with _loader(ds, backbone, batch_size, workers) as loader, _Writer(write) as writer:
                try:
                    for b, (ids, paths, x, bad) in enumerate(loader):
                        feats = backbone(x) if x is not None else np.zeros((0, backbone.feature_dim), np.float32)
                        n = len(ids) + len(bad)
                        ids, feats, nonfinite = finite_rows(ids, paths, feats)
                        writer.put(b, ids, feats, bad + nonfinite)
                        done += n
                        if progress:
                            progress(done, rep.n_todo)
                except RuntimeError as e:  # torch's words for DecodePool's DecoderDied
                    if type(e) is RuntimeError and str(e).startswith("DataLoader worker"):
                        raise DecoderDied(f"a decode worker died ({str(e).strip()}; out of memory?); the batches "
                                          f"before are stored: run embed again to go on") from e
                    raise
    return rep


@contextmanager
def _loader(ds: ImageDataset, backbone: Backbone, batch_size: int, workers: int):
    if backbone.input_dtype is None:  # NumPy in: no torch in this process or its workers
        with DecodePool(ds, batch_size, workers) as pool:
            yield pool
        return
    from torch.utils.data import DataLoader

    yield DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                     collate_fn=partial(collate, dtype=backbone.input_dtype), pin_memory=backbone.device == "cuda",
                     worker_init_fn=partial(_worker_init, os.getpid()) if workers else None,
                     prefetch_factor=4 if workers else None, persistent_workers=False)


def _weights_source(backbone: Backbone) -> str | None:
    """embed_runs.weights_source: where the weights were found (folder / file, revision, files), JSON."""
    import json

    src = getattr(backbone, "weights_source", None)
    return json.dumps(src) if src else None


class EmbedRun:
    """One run of either engine (embed, embed_ray): its embed_runs row, the todo query, the writes
    made under it and a full disk told in one line. Opening marks 'running' rows of dead processes
    interrupted and inserts this run's row; leaving the `with` closes it with its counts and how it
    ended ('completed', 'interrupted' on Ctrl-C, else 'failed'). `items` holds the todo found at
    opening (find_todo; the ray engine asks later, after importing a killed run's shards)."""

    def __init__(self, con, backbone: Backbone, preprocess: str, batch_size: int, workers: int,
                 device: str | None = None, limit: int | None = None, find_todo: bool = True):
        self.con, self.backbone, self.preprocess, self.limit = con, backbone, preprocess, limit
        self.writing: str | None = None  # what is being written when not the store (disk-full message)
        self.extra = ""                  # said after "the store is intact" in the disk-full message
        try:  # a rerun on a disk still full fails here, with the same one-line error
            self.table = ensure_embedding_table(con, backbone.feature_dim)
            # a 'running' run found now belongs to a process that died (DuckDB has one writer)
            interrupt_running_embed_runs(con)
            self.items = self.todo() if find_todo else []
            run_id = next_embed_run_id(con)
            self.report = EmbedReport(run_id, backbone.name, backbone.weights_id, preprocess,
                                      device or backbone.device, n_todo=len(self.items))
            insert_embed_run(con, [run_id, backbone.name, backbone.weights_id, preprocess, backbone.feature_dim,
                                   self.report.device, batch_size, workers, len(self.items), datetime.now(),
                                   _weights_source(backbone)])
        except Exception as e:
            raise_if_disk_full(con, e, backbone, preprocess)
            raise

    def __enter__(self) -> EmbedRun:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, e, tb) -> None:
        rep = self.report
        if exc_type is None:
            rep.status = "completed"
        elif issubclass(exc_type, KeyboardInterrupt):
            rep.status = "interrupted"
        try:
            if isinstance(e, Exception):
                raise_if_disk_full(self.con, e, self.backbone, self.preprocess, rep.run_id, what=self.writing,
                                   extra=self.extra)
        finally:
            rep.seconds = time.perf_counter() - self.t0
            self._close()

    def _close(self) -> None:
        """The row's counts, speed and how the run ended ('failed' if it never said). On a failing run
        a store that cannot take even this row (disk full) must not replace the run's own error: the
        row stays 'running' and the next run marks it 'interrupted'."""
        rep = self.report
        try:
            finish_embed_run(self.con, [rep.n_todo, rep.n_embedded, len(rep.failed), rep.seconds, rep.images_per_s,
                                        rep.status if rep.status != "running" else "failed", datetime.now(),
                                        rep.run_id])
        except Exception:  # noqa: BLE001 - on a failing run the error in flight is the one to report
            if rep.status == "completed":
                raise

    def todo(self) -> list[tuple[str, str]]:
        return todo(self.con, self.backbone, self.preprocess, self.limit)

    def attach_masks(self, items: list) -> tuple[list, list]:
        """Lung variants: (items with their stored mask PNG, failures). An image whose mask was
        refused, or that has none, is recorded as failed with the mask's reason and left out."""
        if not items or not get_preprocess(self.preprocess).needs_mask:
            return items, []
        from featstore.masks import load_masks

        found = load_masks(self.con, [i for i, _ in items])
        ok, bad = [], []
        for image_id, path in items:
            png, method, reason = found.get(image_id, (None, "none", "no lung mask"))
            if png is None:
                bad.append((image_id, path, f"{reason} [mask method {method}]"))
            else:
                ok.append((image_id, path, png))
        self.record_failed(bad)
        return ok, bad

    def record_failed(self, bad: list[tuple[str, str, str]]) -> None:
        """(image_id, path, reason) refused before any model saw them, stored under this run."""
        self.write_batch([], np.zeros((0, self.backbone.feature_dim)), bad)

    def write_batch(self, ids: list, feats: np.ndarray, bad: list[tuple[str, str, str]], b: int = -1,
                    before_commit: Callable[[int], None] | None = None) -> None:
        """A batch's vectors and its failures in one transaction, then counted in the report.
        before_commit(b) runs inside the transaction."""
        con, table, backbone, preprocess = self.con, self.table, self.backbone, self.preprocess
        run_id = self.report.run_id
        now = datetime.now()
        n, d = feats.shape
        vec = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(feats, np.float32).ravel()), d)
        batch = pa.table({
            "image_id": pa.array(ids, pa.string()),
            "backbone": pa.array([backbone.name] * n, pa.string()),
            "weights_id": pa.array([backbone.weights_id] * n, pa.string()),
            "preprocess": pa.array([preprocess] * n, pa.string()),
            "dim": pa.array([d] * n, pa.int32()),
            "vector": vec,
            "embed_run": pa.array([run_id] * n, pa.int32()),
            "created_at": pa.array([now] * n, pa.timestamp("us")),
        })
        with transaction(con):  # one per batch: a killed run keeps its whole batches and resumes after them
            if n:
                # plain INSERT: `todo` excluded what exists and DuckDB has one writer, so a duplicate here
                # is a bug the primary key should shout about (ON CONFLICT costs a third of the write)
                insert_frame(con, table, batch)
            upsert_embed_error_rows(con, bad, backbone.name, preprocess, run_id, now)
            if before_commit:
                before_commit(b)
        self.report.n_embedded += len(ids)  # counted once committed
        self.report.failed.extend(bad)
        if b >= 0:
            hold_for_tests(b + 1)


def hold_for_tests(done: int) -> None:
    """Fault-injection point for the kill -9 tests: with FEATSTORE_TEST_HOLD_EMBED=PATH:K, the first
    process to have K batches done (committed by the local engine; returned by a Ray actor, which
    then holds on its next block) writes PATH and never returns, so a test kills an embed run on an
    event, with a fast backbone, rather than racing the clock on a slow one. PATH is created once:
    a restarted Ray actor goes on. Unset: nothing happens."""
    spec = os.environ.get("FEATSTORE_TEST_HOLD_EMBED")
    if not spec:
        return
    path, _, k = spec.rpartition(":")
    if done != int(k):
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # held once already
        return
    os.write(fd, f"{os.getpid()} {done}\n".encode())
    os.close(fd)
    while True:
        time.sleep(3600)


def forget_lung_variants(con, image_ids: list[str]) -> int:
    """Delete the lung-variant embeddings (and their embed_errors rows) of `image_ids`, whose lung masks
    were re-made: they were built on the old masks. Returns the embeddings deleted. One transaction:
    the caller's when one is open (masks.ensure_masks's on_replace, replacing the masks), else its own."""
    if not image_ids:
        return 0
    if not in_transaction(con):
        with transaction(con):
            return forget_lung_variants(con, image_ids)
    variants = list(PREPROCESSINGS.where(lambda p: p.needs_mask))
    n = 0
    with registered(con, "_forget_ids", pa.table({"image_id": pa.array(list(image_ids), pa.string())})):
        for table, _ in embedding_tables(con):
            n += delete_embeddings_of(con, table, "_forget_ids", variants)
        delete_embed_errors_of(con, "_forget_ids", variants)
    return n


class DiskFullError(RuntimeError):
    """The disk under the store (or the shards) filled during embed; the message is one line saying
    what filled, what is stored and what to do."""

    @classmethod
    def opening(cls, e: BaseException, db) -> DiskFullError:
        from featstore.store import default_db_path

        what = _full_file(e) or str(db or default_db_path())
        return cls(f"disk full: no space left writing {what}, so the store cannot even be opened for writing; "
                   f"it is intact and nothing was embedded by this run. Free space on that disk (or move the store "
                   f"to a larger one and pass --db) and run the same command to resume.")


def _full_file(e: BaseException) -> str | None:
    m = re.search(r'(?:file|path) "([^"]+)"', str(e))  # DuckDB names the file it could not write
    return m.group(1) if m else None


_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "No space left on device", "Disk quota exceeded")


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain; DuckDB and Ray report them only as text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in _FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def raise_if_disk_full(con, e: BaseException, backbone, preprocess: str, run_id: int | None = None,
                       what: str | None = None, extra: str = "") -> None:
    """If `e` is a full disk, raise DiskFullError: what filled, what the store holds (counted in the
    store: reads still work after a failed commit), what to do."""
    if not is_disk_full(e):
        return
    import duckdb

    what = what or _full_file(e) or _store_path(con) or "the store"
    try:
        n_img = image_count(con)
        try:
            n_run, n_set = embedding_set_counts(con, embedding_table(backbone.feature_dim),
                                                (backbone.name, backbone.weights_id, preprocess), run_id)
        except duckdb.CatalogException:  # the disk filled before the table could be made
            n_run = n_set = 0
        stored = (f"{n_run} embeddings committed by this run, in whole batches; {n_set} of {n_img} images have "
                  f"{backbone.name}/{preprocess} embeddings")
    except Exception:  # noqa: BLE001 - the store could not even be read; say so rather than guess
        stored = "the store could not be read to count what is stored"
    raise DiskFullError(
        f"disk full: no space left writing {what}. Stored: {stored}; only whole batches are kept and the store "
        f"is intact{extra}. Free space on that disk (or move the store to a larger one and pass --db) and run "
        f"the same command to resume.") from e


def _store_path(con) -> str | None:
    try:
        return store_file_path(con)
    except Exception:  # noqa: BLE001
        return None


class _Writer:
    """One background thread doing the store writes, in order. An error there (or a
    KeyboardInterrupt from a test hook) stops further writes and is raised in the caller."""

    def __init__(self, fn):
        self.fn, self.q, self.error = fn, queue.Queue(maxsize=2), None
        self.t = threading.Thread(target=self._run, name="featstore-writer", daemon=True)

    def __enter__(self):
        self.t.start()
        return self

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.fn(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.error = e

    def put(self, *item):
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def __exit__(self, exc_type, *rest):
        self.q.put(None)
        self.t.join()
        if self.error is not None and exc_type is None:
            raise self.error

