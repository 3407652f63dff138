"""The real set (../shared/cxr) for the tests that need it, built once per test session.

Ingesting and embedding its 4,074 images with mobilenetv3-nih-onnx takes about a minute on 2 cores, and
the copy matcher (featstore/copymatch.py) over a `duplicates` run's candidate pairs another one or two;
several tests need both. Both are computed once per session, in a folder all pytest-xdist workers share
(under a lock: the first comes, builds; the others wait, then read), and each test gets its own copy.
The matcher's verdict on a pair depends on the two files only (RANSAC is seeded), so a pair matched
once gives the same Match to every later run: the tests see what the matcher says, computed once."""
from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

from conftest import CXR, ONNX


def shared_dir(tmp_path_factory) -> Path:
    """This session's folder common to all xdist workers (each has its own basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    d = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "realset"
    d.mkdir(exist_ok=True)
    return d


@contextmanager
def locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the holder dies
        yield


def embedded_copy(tmp_path_factory, dest: Path) -> Path:
    """A store at dest with the real set ingested and embedded (mobilenetv3-nih-onnx), nothing else."""
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect

    d = shared_dir(tmp_path_factory)
    built = d / "embedded.duckdb"
    with locked(d / "embedded.lock"):
        if not built.exists():
            tmp = d / "embedding.duckdb"
            tmp.unlink(missing_ok=True)
            con = connect(tmp)
            I.ingest_rows(con, *I.manifest_rows(CXR / "manifest.csv")[:1], str(CXR / "manifest.csv"), workers=2)
            embed(con, create_backbone("mobilenetv3-nih-onnx", weights_dir=ONNX.parent), batch_size=64, workers=2)
            con.close()
            tmp.rename(built)  # only a whole store is ever seen as built
    shutil.copyfile(built, dest)
    return dest


def match_once(tmp_path_factory, monkeypatch) -> None:
    """duplicates.verify_pairs, its verdicts kept for the session: a pair is matched once."""
    from featstore import duplicates

    verify = duplicates.verify_pairs
    d = shared_dir(tmp_path_factory)
    memo_file = d / "matches.pkl"

    def verify_once(paths: dict, candidates, workers: int = 2, progress=None):
        key = {p: (paths[p[0]], paths[p[1]]) for p in candidates}
        with locked(d / "matches.lock"):
            memo = pickle.loads(memo_file.read_bytes()) if memo_file.exists() else {}
            todo = {p for p, k in key.items() if k not in memo}
            if todo:
                memo.update({key[p]: m for p, m in verify(paths, todo, workers, progress).items()})
                memo_file.write_bytes(pickle.dumps(memo))
        return {p: memo[k] for p, k in key.items()}

    monkeypatch.setattr(duplicates, "verify_pairs", verify_once)
