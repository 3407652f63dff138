import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from featstore.backbones import create_backbone
from featstore.embed import embed
from featstore.store import connect


def _count(con, dim=320):
    return con.execute(f"SELECT count(*), count(DISTINCT image_id) FROM embeddings_d{dim}").fetchone()


def test_embed_once_then_nothing(ingested):
    con, _ = ingested
    bb = create_backbone("pixelstats")
    r = embed(con, bb, batch_size=16, workers=2)
    assert (r.n_todo, r.n_embedded, r.failed, r.status) == (96, 96, [], "completed"), \
        con.execute("SELECT file, reason FROM ingest_errors").fetchall()
    X = np.stack(con.execute("SELECT vector FROM embeddings_d320").fetchnumpy()["vector"])
    assert X.shape == (96, 320) and np.isfinite(X).all()
    again = embed(con, bb, batch_size=16, workers=2)
    assert again.n_todo == 0 and again.n_embedded == 0
    runs = con.execute("SELECT backbone, weights_id, preprocess, device, n_embedded, status FROM embed_runs "
                       "ORDER BY run_id").fetchall()
    assert runs == [("pixelstats", "none", "original", "cpu", 96, "completed"),
                    ("pixelstats", "none", "original", "cpu", 0, "completed")]
    # another preprocessing is another embedding set
    assert embed(con, bb, "clahe", batch_size=32, workers=0).n_embedded == 96
    assert _count(con) == (192, 96)


def test_interrupt_keeps_whole_batches_and_resumes(ingested):
    con, _ = ingested
    bb = create_backbone("pixelstats")

    def stop(b):
        if b == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed(con, bb, batch_size=10, workers=0, before_commit=stop)
    assert _count(con) == (20, 20)  # batches 0 and 1; batch 2 rolled back
    assert con.execute("SELECT status FROM embed_runs").fetchone()[0] == "interrupted"
    r = embed(con, bb, batch_size=10, workers=0)
    assert r.n_todo == 76 and r.n_embedded == 76
    assert _count(con) == (96, 96)


@pytest.mark.kill
def test_kill_9_mid_transaction_then_resume(ingested, tmp_path):
    con, _ = ingested
    db = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    con.close()
    script = textwrap.dedent(f"""
        import os, signal
        from featstore.store import connect
        from featstore.backbones import create_backbone
        from featstore.embed import embed
        con = connect({db!r})
        def die(b):
            if b == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # inside batch 3's open transaction
        embed(con, create_backbone("pixelstats"), batch_size=8, workers=2, before_commit=die)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    con = connect(db)
    assert _count(con) == (24, 24)
    assert con.execute("SELECT count(*) FROM embed_runs WHERE status = 'running'").fetchone()[0] == 1
    r = embed(con, create_backbone("pixelstats"), batch_size=8, workers=0)
    assert r.n_embedded == 72 and _count(con) == (96, 96)
    assert con.execute("SELECT status FROM embed_runs ORDER BY run_id").fetchall() == [("interrupted",), ("completed",)]
    con.close()


def test_decode_failure_is_recorded_and_skipped(ingested, tmp_path):
    con, _ = ingested
    victim = con.execute("SELECT image_id, path FROM images ORDER BY image_id LIMIT 1").fetchone()
    # this store's own copy of the file goes missing: the session's images are shared by every worker
    # (renaming one there failed other workers' ingests with "file not found")
    own = tmp_path / "victim.png"
    shutil.copy(victim[1], own)
    con.execute("UPDATE images SET path = ? WHERE image_id = ?", [str(own), victim[0]])
    own.rename(own.with_name("victim.png.gone"))
    r = embed(con, create_backbone("pixelstats"), batch_size=16, workers=0)
    own.with_name("victim.png.gone").rename(own)
    assert r.n_embedded == 95 and [f[0] for f in r.failed] == [victim[0]]
    assert con.execute("SELECT reason FROM embed_errors").fetchone()[0] == "file not found"
    assert embed(con, create_backbone("pixelstats"), batch_size=16, workers=0).n_embedded == 1


def test_random_init_is_recorded(ingested):
    con, _ = ingested
    bb = create_backbone("xrv-densenet121-res224-all", weights="random-init")
    r = embed(con, bb, batch_size=16, workers=0, limit=4)
    assert r.n_embedded == 4
    wid = f"random-init:seed0;input={bb.spec.pipeline.identity}"  # weights, then the input pipeline
    assert con.execute("SELECT DISTINCT weights_id, dim FROM embeddings").fetchall() == [(wid, 1024)]


def test_unknown_preprocess_fails_before_work(ingested):
    con, _ = ingested
    with pytest.raises(ValueError, match="unknown preprocessing 'sharpen'"):
        embed(con, create_backbone("pixelstats"), "sharpen")
    assert con.execute("SELECT count(*) FROM embed_runs").fetchone()[0] == 0


# --- models that take NumPy arrays (ONNX): decoded by a process pool, without torch --------------------

def _vectors(con, dim=8):
    return con.execute(f"SELECT image_id, vector FROM embeddings_d{dim} ORDER BY image_id").fetchall()


def test_an_onnx_model_is_fed_by_the_decode_pool_and_never_imports_torch(ingested, tiny_onnx, tmp_path):
    """`featstore embed` with an ONNX graph: 2 s less start-up without torch. The pool gives the vectors the
    DataLoader gives (same model, same images, other batch sizes), with or without worker processes."""
    import torch

    con, _ = ingested
    db = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    con.close()
    script = textwrap.dedent(f"""
        import sys
        from featstore.store import connect
        from featstore.backbones import create_backbone
        from featstore.embed import embed
        con = connect({db!r})
        r = embed(con, create_backbone("onnx", weights={str(tiny_onnx)!r}), batch_size=10, workers=2)
        print(r.n_embedded, len(r.failed), r.status, "torch" in sys.modules)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    n, n_failed, status, torch_loaded = p.stdout.split()
    assert (n, status, torch_loaded) == ("96", "completed", "False")
    pool = _vectors(con := connect(db))
    assert len(pool) == 96
    for workers, torch_loader in ((0, False), (2, True)):
        con.execute("DELETE FROM embeddings_d8")
        bb = create_backbone("onnx", weights=str(tiny_onnx))
        if torch_loader:  # the DataLoader's path, as a torch model takes it
            bb.input_dtype = torch.float32
        assert embed(con, bb, batch_size=7, workers=workers).n_embedded == 96
        assert _vectors(con) == pool, (workers, torch_loader)
    con.close()


def test_a_decode_worker_that_dies_fails_the_run_in_one_line_and_keeps_whole_batches(ingested, tiny_onnx,
                                                                                     monkeypatch):
    """A decoder killed under the run (the kernel's OOM killer, a crash in C) fails it at once with a line
    naming the images in flight, never hangs it; what was stored stays, and the next run goes on."""
    import os

    from typer.testing import CliRunner

    from featstore.cli import app
    from featstore.embed import DecoderDied, ImageDataset

    con, _ = ingested
    bb = create_backbone("onnx", weights=str(tiny_onnx))
    ids = [i for (i,) in con.execute("SELECT image_id FROM images ORDER BY image_id").fetchall()]
    fatal = ids[45]  # in the 5th batch of 10
    get = ImageDataset.__getitem__

    def dies_on_one(self, i):  # runs in the forked workers only (workers=2)
        if self.items[i][0] == fatal:
            os._exit(9)
        return get(self, i)

    monkeypatch.setattr(ImageDataset, "__getitem__", dies_on_one)
    with pytest.raises(DecoderDied, match=r"a decode worker died \(exit code 9; out of memory\?\) while decoding "
                                          r"\S+ to \S+; the batches before them are stored: run embed again"):
        embed(con, bb, batch_size=10, workers=2)
    n, distinct = con.execute("SELECT count(*), count(DISTINCT image_id) FROM embeddings_d8").fetchone()
    assert n == distinct and n % 10 == 0 and n <= 40  # whole batches only, none past the dead one
    assert con.execute("SELECT status FROM embed_runs").fetchall() == [("failed",)]
    # the command says it in one line (exit 1), no traceback
    db = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    con.close()
    r = CliRunner().invoke(app, ["embed", "--backbone", "onnx", "--weights", str(tiny_onnx), "--batch-size", "10",
                                 "--workers", "2", "--db", db])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert [ln for ln in r.output.splitlines() if "decode worker died" in ln][0].startswith("error: a decode worker")
    monkeypatch.setattr(ImageDataset, "__getitem__", get)
    con = connect(db)
    r = embed(con, bb, batch_size=10, workers=2)
    assert r.n_embedded + n == 96 and con.execute("SELECT count(*) FROM embeddings_d8").fetchone()[0] == 96
    con.close()


def test_a_decode_worker_killed_halfway_through_sending_a_batch_never_hangs_the_run(ingested, tiny_onnx):
    """The worker dies after writing half of a batch into its pipe (the OOM killer picks the process holding a
    big batch): the run sees the end of that worker's own pipe and fails with DecoderDied. A pipe shared by all
    workers (concurrent.futures' process pool) waits forever for the rest of the message."""
    con, _ = ingested
    db = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    con.close()
    script = textwrap.dedent(f"""
        import os, pickle, struct
        from multiprocessing.connection import Connection
        from featstore.store import connect
        from featstore.backbones import create_backbone
        from featstore.embed import DecoderDied, embed
        parent, send = os.getpid(), Connection.send

        def half_then_die(self, obj):
            if os.getpid() == parent:
                return send(self, obj)
            buf = pickle.dumps(obj)
            self._send(struct.pack("!i", len(buf)) + buf[:len(buf) // 2])
            os._exit(9)

        Connection.send = half_then_die
        con = connect({db!r})
        try:
            embed(con, create_backbone("onnx", weights={str(tiny_onnx)!r}), batch_size=32, workers=2)
        except DecoderDied as e:
            print("DecoderDied", str(e)[:40])
        print(con.execute("SELECT status FROM embed_runs").fetchall())
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines() == ["DecoderDied a decode worker died (exit code 9; out o", "[('failed',)]"], p.stdout
