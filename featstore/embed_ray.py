"""Embed at scale (`featstore embed --engine ray`): the local path's decode and backbone code, run by
Ray Data on every CPU/GPU worker of a cluster (or of this machine).

read (the images the store lacks) -> decode + preprocess (CPU tasks) -> batch inference (one
backbone per actor, a GPU each when there are GPUs) -> Parquet shards, Hive-partitioned by
backbone, preprocessing and source -> one set-based INSERT into the store, which then deletes them.

Idempotent like the local path: shards left by a killed run are imported first, and only images
still missing are sent to workers. A worker that dies loses its in-flight block, which Ray retries
(or the next run redoes); a torn shard file is dropped at import and its images embedded again.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featstore.embed import NON_FINITE_EMBEDDING, EmbedReport, EmbedRun, ImageDataset, hold_for_tests
from featstore.preprocess import get_preprocess
from featstore.store import (embed_errors_of_run, ensure_embedding_table, image_sources, insert_new_embeddings,
                             shard_table, transaction, upsert_embed_errors)


def _decode(batch: dict, preprocess: str, size: int, channels: int, norm: tuple) -> dict:
    """Ray task (fused into the model actor when Ray can): the local DataLoader's per-image code."""
    items = [(i, p, m) if len(m) else (i, p) for i, p, m in zip(batch["image_id"], batch["path"], batch["mask"])]
    ds = ImageDataset(items, preprocess, size, channels, norm)
    xs, errors = np.zeros((len(items), channels, size, size), np.float32), []
    for k in range(len(items)):
        _, _, x, reason = ds[k]
        if x is not None:
            xs[k] = x
        errors.append(reason or "")
    return {"image_id": batch["image_id"], "path": batch["path"], "source": batch["source"], "x": xs,
            "error": np.array(errors, dtype=object)}


class _Embedder:
    """Ray actor: one backbone, loaded once, applied to decoded blocks."""

    def __init__(self, name, weights=None, weights_dir=None, output=None, device="cpu", preprocess="original",
                 threads=None):
        import torch

        from featstore.backbones import create_backbone

        if threads:  # Ray pins a CPU actor to its num_cpus threads; decoding shares this process (fused)
            torch.set_num_threads(threads)

        self.bb = create_backbone(name, weights=weights, weights_dir=weights_dir, device=device, output=output)
        self.preprocess = preprocess
        self.n_done = 0  # blocks returned (the kill tests' hold hook counts them)

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        hold_for_tests(self.n_done)
        self.n_done += 1
        ok = np.array([not e for e in batch["error"]], bool)
        d = self.bb.feature_dim
        feats = np.zeros((len(ok), d), np.float32)
        if ok.any():
            x = np.ascontiguousarray(batch["x"][ok])
            if self.bb.input_dtype is not None:  # a torch model: its dtype (bf16 on CUDA)
                x = torch.from_numpy(x).to(self.bb.input_dtype)
            feats[ok] = self.bb(x)
        n = len(ok)
        return pa.table({
            "image_id": pa.array(batch["image_id"], pa.string()),
            "path": pa.array(batch["path"], pa.string()),
            "source": pa.array(batch["source"], pa.string()),
            "backbone": pa.array([self.bb.name] * n, pa.string()),
            "preprocess": pa.array([self.preprocess] * n, pa.string()),
            "weights_id": pa.array([self.bb.weights_id] * n, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), d),
            "error": pa.array(list(batch["error"]), pa.string()),
        })


def _shard_files(shards: Path, backbone: str, preprocess: str) -> list[Path]:
    return sorted((shards / f"backbone={backbone}" / f"preprocess={preprocess}").glob("source=*/*.parquet"))


def import_shards(con, shards: Path, backbone, preprocess: str, run_id: int) -> tuple[int, int, int]:
    """Shards -> store in one transaction, set-based; rows already stored are skipped (a retried Ray
    task may have written a block twice). Returns (embedded, failed, torn files dropped)."""
    files, torn = [], 0
    for f in _shard_files(Path(shards), backbone.name, preprocess):
        try:
            pq.ParquetFile(f).metadata  # a run killed mid-write leaves a file without a footer
            files.append(f)
        except Exception:  # noqa: BLE001 - any unreadable shard is redone, not trusted
            f.unlink(missing_ok=True)
            torn += 1
    if not files:
        return 0, 0, torn
    table = ensure_embedding_table(con, backbone.feature_dim)
    d = backbone.feature_dim
    names = [str(f) for f in files]
    # one row per image (a retried block can appear twice): a success over a failure. A vector with NaN or
    # Inf is no success: it becomes an embed_errors row, here where every shard is stored
    with transaction(con), shard_table(con, "_shard", names, backbone.weights_id, NON_FINITE_EMBEDDING) as shard:
        n_ok = insert_new_embeddings(con, table, shard, d, run_id)
        n_bad = upsert_embed_errors(con, shard, run_id)
    for f in files:  # stored now; a kill before this line only means a no-op import next time
        f.unlink(missing_ok=True)
    return n_ok, n_bad, torn


def embed_ray(con, backbone, create_args: dict, preprocess: str = "original", batch_size: int = 32,
              shards: str | Path = "featstore-shards", address: str | None = None, actors: int | None = None,
              limit: int | None = None) -> EmbedReport:
    """Embed the images the store lacks through Ray Data. `backbone` (built here) gives the store
    its identity; `create_args` rebuild it in each actor. `address`: None starts Ray on this machine,
    "auto" or "ray://head:10001" joins a cluster (whose workers must see the image paths, the
    weights and this package). Lung variants read stored masks only, as `embed.embed` does."""
    # Ray Data books the cluster's CPUs for a dataset and renews the booking every 10 s; a driver that
    # was killed never releases its booking, which by default holds them 180 s, so the next run (a
    # resume after kill -9) stalled ~3 min with "0 CPU". 30 s: three missed renewals. Read when ray.data
    # is imported; a value the user set wins.
    os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")
    import ray

    get_preprocess(preprocess)
    shards = Path(shards).resolve()
    # the todo is asked for after a killed run's shards are imported
    run = EmbedRun(con, backbone, preprocess, batch_size, actors or 0, device=f"ray:{backbone.device}",
                   limit=limit, find_todo=False)
    run.extra = f"; shards already written in {shards} are kept and imported by the next run"
    with run:
        rep = run.report
        ok, bad, torn = import_shards(con, shards, backbone, preprocess, rep.run_id)  # a killed run's work
        rep.n_embedded += ok
        rep.torn_shards = torn
        items = run.todo()
        rep.n_todo = len(items) + ok + bad
        items, _ = run.attach_masks(items)
        if items:
            ids = [i[0] for i in items]
            src = image_sources(con, ids)
            todo_table = pa.table({"image_id": ids, "path": [i[1] for i in items],
                                   "source": [src[i] for i in ids],
                                   "mask": [i[2] if len(i) > 2 else b"" for i in items]})
            run.writing = f"the shards folder {shards}"
            _run_ray(ray, todo_table, backbone, create_args, preprocess, batch_size, shards, address, actors)
            run.writing = None
            ok, bad, torn = import_shards(con, shards, backbone, preprocess, rep.run_id)
            rep.n_embedded += ok
            rep.torn_shards += torn
            rep.failed = embed_errors_of_run(con, rep.run_id)
    return rep


def _run_ray(ray, table, backbone, create_args, preprocess, batch_size, shards, address, actors):
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith(("FEATSTORE_", "TORCHXRAYVISION"))}})
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        spec = backbone.spec
        n_blocks = max(1, -(-table.num_rows // batch_size))  # a block = a batch: what a dead worker can lose
        ds = ray.data.from_arrow(table, override_num_blocks=n_blocks)
        ds = ds.map_batches(_decode, batch_size=None, batch_format="numpy", num_cpus=1, fn_kwargs=dict(
            preprocess=preprocess, size=spec.input_size, channels=spec.channels, norm=tuple(spec.norm)))
        n = actors or gpus or 1
        if gpus:
            model, threads = dict(num_gpus=1, concurrency=n), None
        else:  # Ray fuses decoding into the model actors; leave one CPU for Ray's write tasks, and let
            # each actor's torch use its share of the cores (Ray would pin it to num_cpus threads)
            model, threads = dict(num_cpus=max(1, (cpus - 1) // n), concurrency=n), max(1, cpus // n)
        args = {**create_args, "device": "cuda" if gpus else "cpu", "preprocess": preprocess, "threads": threads}
        ds = ds.map_batches(_Embedder, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=args,
                            **model)
        # file names carry Ray's write UUID: a re-run never overwrites a shard not yet imported
        ds.write_parquet(str(shards), partition_cols=["backbone", "preprocess", "source"])
    finally:
        if started:
            ray.shutdown()

