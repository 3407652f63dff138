"""Helpers for tests and benchmarks: a throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql
package), for sweeps that share Optuna and MLflow storage; SYNTHETIC embedding vectors shaped like a
CNN's (for the nearest-neighbour index at sizes no real set here reaches)."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can run here; the message says why."""


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@contextlib.contextmanager
def local_postgres(root: Path):
    """Start a server with its data under root; yield url(dbname) -> the URL of a new database;
    stop it (immediately: it is throwaway) on exit."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable("PostgreSQL server not installed (Debian: apt-get install postgresql; "
                                  "`make test` tries)")
    root = Path(root)
    data, sock = root / "data", root / "sock"
    sock.mkdir(parents=True, exist_ok=True)
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the package's postgres user
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        for d in (root, sock):
            shutil.chown(d, "postgres")
        for p in [root, *root.parents]:  # the server must be able to reach its data folder
            if p != Path("/"):
                p.chmod(p.stat().st_mode | 0o011)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
    # pg_ctl daemonises the server, so it would outlive a killed test run: a reaper stops it when this
    # process dies (its stdin pipe closes; kill -9 included: SIGTERM from the kernel, PR_SET_PDEATHSIG).
    # The server starts only once the reaper says it is ready: a SIGTERM that came while the reaper was
    # still starting would end it before its handler was in place, and the server would run on.
    with open(root / "reaper.log", "ab") as log:
        reaper = start_reaper(data, stop, log)
    try:
        run = dict(check=True, capture_output=True, text=True, timeout=120)
        try:
            subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-U", "featstore",
                                      "--auth=trust", "-E", "UTF8", "--no-sync"], **run)
            subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                                      "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                                            f"-c max_connections=200", "start"], **run)
        except subprocess.CalledProcessError as e:
            raise PostgresUnavailable(f"PostgreSQL would not start: {(e.stderr or e.stdout).strip()[-300:]}") from e

        createdb = bin_dir / "createdb" if (bin_dir / "createdb").exists() else shutil.which("createdb")

        def url(name: str) -> str:
            # the server's own client makes the database (and quotes its name): no SQL of ours
            if createdb is None:
                raise PostgresUnavailable(f"PostgreSQL's createdb is neither in {bin_dir} nor on PATH")
            try:
                subprocess.run([str(createdb), "-h", "127.0.0.1", "-p", str(port), "-U", "featstore", "--", name],
                               **run)
            except subprocess.CalledProcessError as e:
                raise RuntimeError(f"createdb {name!r} failed: {(e.stderr or e.stdout).strip()[-300:]}") from e
            return f"postgresql+psycopg2://featstore@127.0.0.1:{port}/{name}"

        def check() -> None:
            """Raise, with the server's log, if the server is no longer running."""
            r = subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "status"], capture_output=True,
                               text=True, timeout=60)
            if r.returncode != 0:
                log = (root / "log").read_text(errors="replace")[-3000:] if (root / "log").exists() else "(no log)"
                raise AssertionError(f"the throwaway PostgreSQL server is gone: {r.stdout.strip()}\n{log}")
        url.check = check
        yield url
    finally:
        reaper.kill()
        reaper.wait()
        reaper.stdout.close()
        subprocess.run(stop, capture_output=True, timeout=60)


def start_reaper(data: Path, stop: list[str], stderr) -> subprocess.Popen:
    """The process that stops the server whose data folder is `data` (`stop`: the pg_ctl command) when this
    process dies or closes the reaper's stdin; returned once its handler is in place. stderr: a file for
    what it says when pg_ctl could not stop the server (or subprocess.PIPE)."""
    reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(data), *stop], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=stderr, preexec_fn=_sigterm_with_parent)
    if reaper.stdout.readline().strip() != b"ready":
        reaper.kill()
        reaper.wait()
        raise PostgresUnavailable(f"the PostgreSQL server's reaper did not start (exit status {reaper.returncode})")
    return reaper


# Stops the server when its stdin closes or SIGTERM comes: pg_ctl first; if the postmaster is still
# there after it (pg_ctl failed or timed out), SIGQUIT (what -m immediate sends), then SIGKILL.
_REAPER = """import os, select, signal, subprocess, sys
data, stop_cmd = sys.argv[1], sys.argv[2:]

def gone(pid, seconds):
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(seconds * 1000))

def stop(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stdin's end and the SIGTERM both come: stop once
    try:
        subprocess.run(stop_cmd, capture_output=True, timeout=60)
    except Exception as e:
        print("pg_ctl stop:", repr(e), file=sys.stderr, flush=True)
    try:
        pid = int(open(os.path.join(data, "postmaster.pid")).read().split()[0])
    except (OSError, ValueError, IndexError):
        os._exit(0)  # no pid file: the server is down
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        print(f"the server (pid {pid}) is still running after pg_ctl stop: {sig.name}", file=sys.stderr, flush=True)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        if gone(pid, 10):
            break
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
sys.stdin.buffer.read()
stop()
"""


def _sigterm_with_parent():
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def synthetic_vectors(n: int, dim: int, seed: int = 0, start: int = 0, n_sources: int = 6,
                      duplicate_share: float = 0.002):
    """Rows start..start+n of a SYNTHETIC embedding set (float32 [n, dim]), the same rows whatever
    the blocks they are made in. Shaped like mobilenetv3-nih-onnx's vectors of ../shared/cxr: a
    shared mean direction holding ~83% of the squared norm (median pairwise cosine ~0.85, the 10th
    neighbour ~0.93), clusters per source in a 32-d latent space (~80% of the rest), isotropic noise;
    duplicate_share of the rows are near copies (cosine > 0.99) of an earlier row of their block.
    Isotropic Gaussian vectors would be the wrong test: nothing real looks like them, and no index
    finds their neighbours (all distances are alike)."""
    import numpy as np

    g = np.random.default_rng(seed)
    latent = 32
    mean = g.standard_normal(dim).astype(np.float32)
    mean *= 4.0 / np.linalg.norm(mean)
    decay = (1.0 / np.sqrt(np.arange(1, latent + 1))).astype(np.float32)
    W = g.standard_normal((latent, dim)).astype(np.float32) * decay[:, None] / np.sqrt(dim) * 0.66
    centres = g.standard_normal((n_sources * 8, latent)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    block = 20_000
    first = start // block * block
    for b0 in range(first, start + n, block):  # fixed 20k-row blocks, each from its own generator
        r = np.random.default_rng([seed, b0 // block])
        m = block
        c = r.integers(0, len(centres), m)
        z = centres[c] + 0.7 * r.standard_normal((m, latent), dtype=np.float32)
        X = mean + z @ W + r.standard_normal((m, dim), dtype=np.float32) * np.float32(0.85 / np.sqrt(dim))
        dup = np.nonzero(r.random(m) < duplicate_share)[0]
        dup = dup[dup > 0]
        src = (r.random(len(dup)) * dup).astype(np.int64)  # an earlier row of the block
        X[dup] = X[src] + r.standard_normal((len(dup), dim), dtype=np.float32) * np.float32(0.05 / np.sqrt(dim))
        lo, hi = max(start, b0), min(start + n, b0 + block)
        out[lo - start:hi - start] = X[lo - b0:hi - b0]
    return out


def synthetic_store(path, n: int, dim: int, seed: int = 0, start: int = 0, n_sources: int = 6,
                    backbone: str = "synthetic", embed_run: int = 0) -> list[str]:
    """Add rows start..start+n of synthetic_vectors to a store (created if need be) as one embedding
    set, with an image row each (SYNTHETIC: no image file behind it). image_ids are hashes, so rows
    added later sort among the earlier ones. Returns the new image_ids."""
    import hashlib
    from datetime import datetime

    import numpy as np
    import pyarrow as pa

    from featstore.store import connect, ensure_embedding_table, insert_frame

    con = connect(path)
    try:
        table = ensure_embedding_table(con, dim)
        now = datetime.now()
        out = []
        for b0 in range(start, start + n, 20_000):
            m = min(20_000, start + n - b0)
            idx = range(b0, b0 + m)
            ids = [hashlib.sha256(f"synthetic:{seed}:{i}".encode()).hexdigest() for i in idx]
            lab = np.random.default_rng([seed, b0]).random(m) < 0.5
            src, label = [f"synthetic-{i % n_sources}" for i in idx], ["covid" if x else "non_covid" for x in lab]
            at = pa.array([now] * m, pa.timestamp("us"))
            insert_frame(con, "images", pa.table({
                "image_id": ids, "source": src, "label": label, "width": [1] * m, "height": [1] * m,
                "bit_depth": [8] * m, "format": ["PNG"] * m, "n_bytes": [1] * m, "path": ids, "ingested_at": at}))
            insert_frame(con, "occurrences", pa.table({
                "image_id": ids, "source": src, "path": ids, "label": label,
                "origin": ["featstore.testing.synthetic_store"] * m, "ingest_run": [0] * m, "ingested_at": at}))
            X = synthetic_vectors(m, dim, seed, start=b0)
            insert_frame(con, table, pa.table({
                "image_id": ids, "backbone": [backbone] * m, "weights_id": ["none"] * m,
                "preprocess": ["original"] * m, "dim": pa.array([dim] * m, pa.int32()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), dim),
                "embed_run": pa.array([embed_run] * m, pa.int32()),
                "created_at": pa.array([now] * m, pa.timestamp("us"))}))
            out += ids
        return out
    finally:
        con.close()
