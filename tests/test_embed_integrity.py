"""Embed stores only what it can vouch for (the embed side):

- an image whose pixels are NaN/Inf is an embed_errors row, never a vector (the run goes on);
- every batch of vectors is checked to be finite before it is stored;
- the bytes decoded must still hash to the image id ("file changed since ingest" otherwise);
- a full disk ends the run with one line saying what filled and what is stored; the store keeps
  whole batches and the same command resumes.

Both engines: the Ray engine's decode task and shard import are called directly (no Ray needed).
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from featstore import ingest as I
from featstore.backbones import PIXELSTATS_PIPELINE, Backbone, create_backbone
from featstore.embed import CHANGED, NON_FINITE_EMBEDDING, DiskFullError, ImageDataset, embed
from featstore.store import connect

FEATSTORE = str(Path(sys.executable).with_name("featstore"))


def _png(path: Path, seed: int, size: int = 64):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path, format="PNG")
    return path


def _float_tiff(path: Path, seed: int, poison: float | None = None, size: int = 64):
    a = np.random.default_rng(seed).random((size, size), dtype=np.float32)
    if poison is not None:
        a[10:20, 10:20] = poison
    Image.fromarray(a, mode="F").save(path, format="TIFF")
    return path


def _add_image(con, path: Path, source: str = "s1"):
    """An images row written directly, as ingest would have written it before it checked pixels:
    embed must be safe on its own, whatever a store already holds."""
    data = path.read_bytes()
    image_id = hashlib.sha256(data).hexdigest()
    con.execute("INSERT INTO images (image_id, source, label, width, height, bit_depth, format, n_bytes, path, "
                "ingested_at) VALUES (?, ?, 'covid', 64, 64, 32, 'TIFF', ?, ?, ?)",
                [image_id, source, len(data), str(path), datetime.now()])
    return image_id


@pytest.fixture
def small(tmp_path):
    """A store with 8 good PNGs ingested the normal way, in a folder of its own (files may be changed)."""
    d = tmp_path / "data"
    d.mkdir()
    lines = ["path,source,label"]
    for k in range(8):
        _png(d / f"g{k}.png", k)
        lines.append(f"g{k}.png,s{k % 2},{'covid' if k % 3 else 'non_covid'}")
    (d / "m.csv").write_text("\n".join(lines) + "\n")
    con = connect(tmp_path / "fs.duckdb")
    rows, pre = I.manifest_rows(d / "m.csv")
    assert I.ingest_rows(con, rows, "m", pre_rejected=pre, workers=1).n_new_images == 8
    yield con, d
    con.close()


def _vectors(con, dim):
    got = con.execute(f"SELECT image_id, vector FROM embeddings_d{dim}").fetchall()
    return {i: np.asarray(v, np.float32) for i, v in got}


def _errors(con):
    return {i: (p, r) for i, p, r in con.execute("SELECT image_id, path, reason FROM embed_errors").fetchall()}


# --- item 3: non-finite pixels and vectors -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["pixelstats", "xrv-densenet121-res224-all"])
def test_nan_and_inf_images_become_embed_errors_and_the_run_goes_on(small, backbone):
    """Before: pixelstats died with an index error on every rerun; a torch backbone stored NaN vectors
    and said 0 failed."""
    con, d = small
    bad = {_add_image(con, _float_tiff(d / "nan.tif", 1, np.nan)),
           _add_image(con, _float_tiff(d / "inf.tif", 2, np.inf))}
    good = _add_image(con, _float_tiff(d / "fine.tif", 3))
    bb = create_backbone(backbone, weights=None if backbone == "pixelstats" else "random-init")
    r = embed(con, bb, batch_size=4, workers=0)
    assert r.status == "completed" and r.n_todo == 11
    assert r.n_embedded == 9 and {f[0] for f in r.failed} == bad
    vecs = _vectors(con, bb.feature_dim)
    assert set(vecs) & bad == set() and good in vecs
    assert all(np.isfinite(v).all() for v in vecs.values())
    errs = _errors(con)
    for image_id in bad:  # a reason that says what is wrong (decode may catch it before embed does)
        assert re.search(r"non-finite|NaN|Inf|no finite", errs[image_id][1]), errs[image_id]
    again = embed(con, bb, batch_size=4, workers=0)  # a rerun retries them and fails the same way, cleanly
    assert again.status == "completed" and again.n_embedded == 0 and {f[0] for f in again.failed} == bad


def test_dataset_rejects_non_finite_pixels_after_decode_and_after_preprocessing(small, monkeypatch):
    """The embed-side check itself, whatever decode lets through."""
    import featstore.decode
    from featstore.decode import Decoded

    con, d = small
    image_id, path = con.execute("SELECT image_id, path FROM images ORDER BY image_id LIMIT 1").fetchone()
    ds = ImageDataset([(image_id, path)], "original", 64, 1, PIXELSTATS_PIPELINE)
    assert ds[0][3] is None and np.isfinite(ds[0][2]).all() and ds[0][2].dtype == np.float32

    nan = np.full((64, 64), 0.5, np.float32)
    nan[3, 4] = np.nan
    monkeypatch.setattr(featstore.decode, "_decode_pil", lambda data, draft, uint8=False: Decoded(nan, 64, 64, 32, "TIFF"))
    _, _, x, reason = ds[0]
    assert x is None and reason.startswith("non-finite pixel values") and "1 NaN" in reason
    monkeypatch.undo()

    ds.fn = lambda a: a / np.where(a > 0.5, 0.0, 1.0).astype(np.float32)  # a preprocessing that divides by 0
    _, _, x, reason = ds[0]
    assert x is None and reason.startswith("non-finite pixel values after preprocessing 'original'")


def test_every_batch_is_checked_finite_before_it_is_stored(small):
    """A backbone that returns NaN/Inf for some rows (finite input): those rows are embed_errors,
    the rest of each batch is stored, and the next run retries only them."""
    con, _ = small
    px = create_backbone("pixelstats")
    calls = []

    def flaky(batch):
        out = px(batch)
        calls.append(len(out))
        if len(calls) == 1:
            out[1, 5] = np.nan
        if len(calls) == 2:
            out[0, :] = np.inf
        return out

    bb = Backbone(px.spec, px.weights_id, flaky, px.feature_dim, "cpu")
    order = [i for (i,) in con.execute("SELECT image_id FROM images ORDER BY image_id").fetchall()]
    poisoned = {order[1], order[3]}  # batch 0 row 1, batch 1 row 0 (batch size 3)
    r = embed(con, bb, batch_size=3, workers=0)
    assert r.status == "completed" and r.n_embedded == 6
    assert {f[0]: f[2] for f in r.failed} == {i: NON_FINITE_EMBEDDING for i in poisoned}
    assert set(_vectors(con, 320)) == set(order) - poisoned
    assert {i: e[1] for i, e in _errors(con).items()} == {i: NON_FINITE_EMBEDDING for i in poisoned}
    assert all(np.isfinite(v).all() for v in _vectors(con, 320).values())
    assert con.execute("SELECT n_embedded, n_failed FROM embed_runs").fetchone() == (6, 2)
    again = embed(con, px, batch_size=3, workers=0)
    assert again.n_todo == 2 and again.n_embedded == 2 and set(_vectors(con, 320)) == set(order)


# --- item 6: content identity --------------------------------------------------------------------

def test_a_file_changed_since_ingest_is_not_embedded_under_the_old_id(small, monkeypatch):
    import featstore.decode
    import featstore.embed as E

    con, d = small
    victim, path = con.execute("SELECT image_id, path FROM images ORDER BY image_id LIMIT 1").fetchone()
    _png(Path(path), 999)  # another valid image at the same path
    reads = []
    real = featstore.decode.read_file
    monkeypatch.setattr(E, "read_file", lambda p: reads.append(p) or real(p), raising=False)
    r = embed(con, create_backbone("pixelstats"), batch_size=4, workers=0)
    assert r.status == "completed" and r.n_embedded == 7 and r.failed == [(victim, path, CHANGED)]
    assert victim not in _vectors(con, 320)
    assert _errors(con) == {victim: (path, CHANGED)} and CHANGED.startswith("file changed since ingest")
    assert sorted(reads) == sorted(p for (p,) in con.execute("SELECT path FROM images").fetchall())  # once each


def test_ray_decode_task_checks_content_identity_and_finite_pixels(small):
    """embed --engine ray decodes in _decode (a Ray task); called directly, no cluster needed."""
    from featstore.embed_ray import _decode

    con, d = small
    items = con.execute("SELECT image_id, path, source FROM images ORDER BY image_id LIMIT 3").fetchall()
    _png(Path(items[0][1]), 999)
    nan_id = _add_image(con, _float_tiff(d / "nan.tif", 1, np.nan))
    items.append((nan_id, str(d / "nan.tif"), "s1"))
    batch = {"image_id": np.array([i[0] for i in items], object), "path": np.array([i[1] for i in items], object),
             "source": np.array([i[2] for i in items], object), "mask": np.array([b""] * 4, object)}
    out = _decode(batch, "original", 64, 1, PIXELSTATS_PIPELINE)
    assert out["error"][0] == CHANGED and out["error"][1] == out["error"][2] == ""
    assert re.search(r"non-finite|NaN|no finite", out["error"][3])
    assert np.isfinite(out["x"]).all()


def _write_shard(shards: Path, ids: list, feats: np.ndarray) -> Path:
    """A Parquet shard as embed --engine ray's actors write it (pixelstats, original, source s0)."""
    part = shards / "backbone=pixelstats" / "preprocess=original" / "source=s0"
    part.mkdir(parents=True, exist_ok=True)
    f = part / f"{uuid.uuid4().hex}.parquet"
    pq.write_table(pa.table({
        "image_id": ids, "path": [f"/p/{i}" for i in ids], "weights_id": ["none"] * len(ids),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), feats.shape[1]),
        "error": [""] * len(ids)}), f)
    return f


def test_ray_import_stores_no_non_finite_vector(small, tmp_path):
    """Shards (as Ray's actors write them) with a NaN and an Inf vector: import records them in
    embed_errors and stores the rest."""
    from featstore.embed_ray import import_shards

    con, _ = small
    bb = create_backbone("pixelstats")
    ids = [i for (i,) in con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 4").fetchall()]
    feats = np.random.default_rng(0).random((4, 320), dtype=np.float32)
    feats[1, 7], feats[2, 0] = np.nan, -np.inf
    _write_shard(tmp_path / "shards", ids, feats)
    run_id = con.execute("SELECT nextval('embed_run_seq')").fetchone()[0]
    n_ok, n_bad, torn = import_shards(con, tmp_path / "shards", bb, "original", run_id)
    assert (n_ok, n_bad, torn) == (2, 2, 0)
    assert set(_vectors(con, 320)) == {ids[0], ids[3]}
    assert {i: e[1] for i, e in _errors(con).items()} == {ids[1]: NON_FINITE_EMBEDDING, ids[2]: NON_FINITE_EMBEDDING}


# --- item 12: disk full --------------------------------------------------------------------------

class _FailingStore:
    """The store's connection, except that the `at`-th statement starting with `verb` fails as DuckDB's
    do on a full disk or a fatal I/O error: DuckDB has already ended (rolled back) the transaction
    when the error arrives."""

    def __init__(self, con, verb: str, at: int, error: Exception, in_transaction: bool = True):
        self._con, self._verb, self._at, self._n, self._error = con, verb, at, 0, error
        self._in_transaction = in_transaction  # False: an autocommit statement, nothing to end

    def __getattr__(self, name):
        return getattr(self._con, name)

    def execute(self, sql, *args):
        if sql.strip().upper().startswith(self._verb):
            self._n += 1
            if self._n == self._at:
                if self._in_transaction:
                    self._con.execute("ROLLBACK")
                raise self._error
        return self._con.execute(sql, *args)


ENOSPC_AT_COMMIT = duckdb.TransactionException(
    'TransactionContext Error: Failed to commit: Could not write file "/full/fs.duckdb.wal": No space left on device')


def test_a_failed_commit_gives_one_clear_error_and_whole_batches(ingested):
    """Before: the ROLLBACK after DuckDB's own abort raised "cannot rollback - no transaction is
    active" over the real error. Simulated ENOSPC at DuckDB's COMMIT (the tmpfs test below is the real one)."""
    con, _ = ingested
    bb = create_backbone("pixelstats")
    with pytest.raises(DiskFullError) as e:
        embed(_FailingStore(con, "COMMIT", 4, ENOSPC_AT_COMMIT), bb, batch_size=10, workers=0)
    msg = str(e.value)
    assert "\n" not in msg and "cannot rollback" not in msg
    assert msg.startswith("disk full: no space left writing /full/fs.duckdb.wal")
    assert "30 embeddings committed by this run, in whole batches; 30 of 96 images" in msg
    assert "run the same command to resume" in msg
    assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM embeddings_d320").fetchone() == (30, 30)
    assert con.execute("SELECT status, n_embedded FROM embed_runs").fetchone() == ("failed", 30)
    r = embed(con, bb, batch_size=10, workers=0)
    assert r.n_todo == 66 and r.n_embedded == 66


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_rerun_on_a_disk_still_full_gets_the_same_one_line_error(small, engine, tmp_path):
    """The first write of a run (its embed_runs row) fails: DiskFullError, not a traceback."""
    from featstore.embed_ray import embed_ray

    con, _ = small
    bb = create_backbone("pixelstats")
    embed(con, bb, batch_size=4, workers=0, limit=4)
    full = _FailingStore(con, "INSERT INTO EMBED_RUNS", 1, ENOSPC_AT_COMMIT, in_transaction=False)
    with pytest.raises(DiskFullError) as e:
        if engine == "local":
            embed(full, bb, batch_size=4, workers=0)
        else:
            embed_ray(full, bb, dict(name="pixelstats"), shards=tmp_path / "shards")
    assert str(e.value).startswith("disk full: no space left writing /full/fs.duckdb.wal. Stored: 0 embeddings "
                                   "committed by this run, in whole batches; 4 of 8 images have pixelstats/original")
    assert con.execute("SELECT count(*) FROM embed_runs").fetchone()[0] == 1


def test_disk_full_while_ray_shards_are_imported_keeps_the_shards(small, tmp_path):
    """embed --engine ray first imports shards a killed run left; the store's disk is full at that
    COMMIT: one clear error, nothing half-stored, the shard kept for the next import."""
    from featstore.embed_ray import embed_ray, import_shards

    con, _ = small
    bb = create_backbone("pixelstats")
    ids = [i for (i,) in con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 3").fetchall()]
    shard = _write_shard(tmp_path / "shards", ids, np.random.default_rng(1).random((3, 320), dtype=np.float32))
    with pytest.raises(DiskFullError) as e:
        embed_ray(_FailingStore(con, "COMMIT", 1, ENOSPC_AT_COMMIT), bb, dict(name="pixelstats"),
                  shards=tmp_path / "shards")
    msg = str(e.value)
    assert msg.startswith("disk full: no space left writing /full/fs.duckdb.wal") and "\n" not in msg
    assert "0 embeddings committed by this run" in msg
    assert f"shards already written in {tmp_path / 'shards'} are kept" in msg
    assert shard.exists() and con.execute("SELECT count(*) FROM embeddings_d320").fetchone()[0] == 0
    assert con.execute("SELECT status FROM embed_runs").fetchall() == [("failed",)]
    assert import_shards(con, tmp_path / "shards", bb, "original", 99) == (3, 0, 0) and not shard.exists()


def test_an_error_that_ended_the_transaction_is_the_error_reported(ingested):
    """A statement inside the batch's transaction fails and DuckDB ends the transaction with it (a
    fatal I/O error): the caller gets that error, not "cannot rollback - no transaction is active"."""
    con, _ = ingested
    fatal = duckdb.IOException("IO Error: Could not read from file: Input/output error")
    with pytest.raises(duckdb.IOException, match="Input/output error"):
        embed(_FailingStore(con, "INSERT INTO EMBEDDINGS", 2, fatal), create_backbone("pixelstats"), batch_size=10,
              workers=0)
    assert con.execute("SELECT count(*) FROM embeddings_d320").fetchone()[0] == 10


def _mount_tmpfs(where: Path, size: int):
    where.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True, timeout=30)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {p.stderr.strip() or p.returncode}")


@pytest.mark.slow
def test_disk_full_during_embed_for_real_on_a_small_tmpfs(synth_manifest, tmp_path):
    """The store on a tmpfs that fills mid-run: one line naming the WAL file and what is stored,
    exit 3, whole batches kept; with space again the same command finishes the job."""
    base = tmp_path / "base.duckdb"
    con = connect(base)
    rows, pre = I.manifest_rows(synth_manifest)
    I.ingest_rows(con, rows, str(synth_manifest), pre_rejected=pre, workers=1)
    n_img = con.execute("SELECT count(*) FROM images").fetchone()[0]
    con.close()
    mnt = tmp_path / "full"
    # room for the store plus ~5 of its 12 batches' WAL (~11 KB each with pixelstats, batch 8)
    _mount_tmpfs(mnt, os.path.getsize(base) + 64 * 1024)
    try:
        db = mnt / "fs.duckdb"
        shutil.copy(base, db)
        args = [FEATSTORE, "embed", "--backbone", "pixelstats", "--workers", "0", "--batch-size", "8", "--db", str(db)]
        p = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert p.returncode == 3, p.stderr[-3000:]
        assert "Traceback" not in p.stderr and "cannot rollback" not in p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: disk full: no space left writing {db}.wal"), p.stderr
        n = int(re.search(r"Stored: (\d+) embeddings committed by this run, in whole batches", lines[0]).group(1))
        assert 0 < n < n_img and n % 8 == 0, f"the tmpfs no longer fills mid-run ({n} of {n_img} stored)"
        assert "run the same command to resume" in lines[0]
        p = subprocess.run(args, capture_output=True, text=True, timeout=600)  # space not freed yet
        assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert [ln for ln in p.stderr.splitlines() if ln.startswith("error: disk full: ")], p.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True, timeout=30)
        with duckdb.connect(str(db)) as c:
            assert c.execute("SELECT count(*), count(DISTINCT image_id) FROM embeddings_d320").fetchone() == (n, n)
        p = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        with duckdb.connect(str(db)) as c:
            assert c.execute("SELECT count(*), count(DISTINCT image_id) FROM embeddings_d320").fetchone() == \
                (n_img, n_img)
            assert c.execute("SELECT status FROM embed_runs ORDER BY run_id").fetchall()[-1] == ("completed",)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
