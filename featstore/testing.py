"""Helpers for tests and benchmarks: a throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql
package), for sweeps that share Optuna and MLflow storage."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
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
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-U", "featstore", "--auth=trust",
                                  "-E", "UTF8", "--no-sync"], **run)
        subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                                  "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                                        f"-c max_connections=200", "start"], **run)
    except subprocess.CalledProcessError as e:
        raise PostgresUnavailable(f"PostgreSQL would not start: {(e.stderr or e.stdout).strip()[-300:]}") from e

    def url(name: str) -> str:
        import psycopg2

        c = psycopg2.connect(host="127.0.0.1", port=port, user="featstore", dbname="postgres")
        c.autocommit = True
        c.cursor().execute(f'CREATE DATABASE "{name}"')
        c.close()
        return f"postgresql+psycopg2://featstore@127.0.0.1:{port}/{name}"
    def check() -> None:
        """Raise, with the server's log, if the server is no longer running."""
        r = subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "status"], capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            log = (root / "log").read_text(errors="replace")[-3000:] if (root / "log").exists() else "(no log)"
            raise AssertionError(f"the throwaway PostgreSQL server is gone: {r.stdout.strip()}\n{log}")
    url.check = check
    try:
        yield url
    finally:
        subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
