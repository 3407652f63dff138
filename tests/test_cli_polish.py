"""CLI polish: did-you-mean, choices in --help, progress in logs, refusing a missing store,
the wrong --folder depth said once."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from featstore.cli import app


def _run(*args, env=None):
    import gc

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    # in-process commands: a DuckDB object left for the collector keeps the file open in this process
    # (a real command's process ends); collect it so the next open, or a copy of the file, sees it closed
    gc.collect()
    r.text = " ".join(re.sub("[│╭╮╰╯─]", " ", r.output).split())  # rich wraps long lines, in boxes
    return r


def _folder(root: Path, layout=(("s1", "covid"), ("s1", "non_covid"), ("s2", "covid"), ("s2", "non_covid")), n=3):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, (src, lab) in enumerate(layout):
        d = root / src / lab
        d.mkdir(parents=True)
        for i in range(n):  # noise: no two images alike, even to dHash
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    """12 images in 2 sources, ingested and embedded with pixelstats through the CLI."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("tiny")
    db = tmp / "fs.duckdb"
    exe = str(Path(sys.executable).with_name("featstore"))  # own processes: nothing stays open in this one
    for args in (["ingest", "--folder", str(_folder(tmp / "data")), "--workers", "1"],
                 ["embed", "--backbone", "pixelstats", "--workers", "0"]):
        p = subprocess.run([exe, *args, "--db", str(db)], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
    return db


def _copy(db: Path, tmp_path: Path) -> Path:
    shutil.copy(db, tmp_path / "fs.duckdb")
    return tmp_path / "fs.duckdb"


# --- did you mean ---------------------------------------------------------------------------

@pytest.mark.slow
def test_embed_unknown_backbone_suggests_the_close_one(tiny_db, tmp_path):
    r = _run("embed", "--backbone", "mobilenet-nih", "--db", _copy(tiny_db, tmp_path))
    assert r.exit_code == 2 and "did you mean 'mobilenetv3-nih-onnx'" in r.text, r.output


def test_unknown_preprocessing_suggests_the_close_one(tiny_db):
    r = _run("probe", "--backbone", "pixelstats", "--preprocess", "clahee", "--db", tiny_db)
    assert r.exit_code == 2 and "did you mean 'clahe'" in r.text, r.output


def test_probe_unknown_embedding_set_suggests_the_stored_one(tiny_db):
    r = _run("probe", "--backbone", "pixelstat", "--db", tiny_db)
    assert r.exit_code == 2 and "did you mean 'pixelstats'" in r.text, r.output


@pytest.mark.parametrize("extra", [["--summary"], ["someimage"]])
def test_neighbors_unknown_backbone_is_one_line_with_a_suggestion(tiny_db, extra):
    r = _run("neighbors", *extra, "--backbone", "pixelstat", "--db", tiny_db)
    assert r.exit_code == 2 and "did you mean 'pixelstats'" in r.text and "Traceback" not in r.output, r.output


def test_sweep_unknown_source_in_the_config_is_one_line_with_a_suggestion(synth_stores, tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("study: typo\nbackbones: [pixelstats]\nheads: [logreg]\n"
                   "protocols: {seen-unseen: {train_sources: [synthetic-a, synthetc-c]}}\n")
    r = _run("sweep", cfg, "--db", synth_stores["confounded"], "--workdir", tmp_path,
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.text == (f"error: {cfg}: protocols.seen-unseen.train_sources: unknown source 'synthetc-c' (did you "
                      "mean 'synthetic-c'?); known: synthetic-a, synthetic-b, synthetic-c, synthetic-d"), r.output
    assert not (tmp_path / "mlflow.db").exists()  # refused before any work


# --- choices in --help ----------------------------------------------------------------------

def test_help_lists_choices_from_the_registries():
    from featstore.backbones import REGISTRY
    from featstore.preprocess import PREPROCESSINGS

    embed = _run("embed", "--help").output
    assert "[" + "|".join(PREPROCESSINGS)[:20] in embed  # the preprocess type column
    flat = " ".join(embed.split())
    assert all(name in flat for name in REGISTRY), embed
    assert "[auto|cpu|cuda]" in embed and "[local|ray]" in embed
    for cmd in ("ingest", "sql"):
        assert "<list[" not in _run(cmd, "--help").output
    assert "[table|csv|json]" in _run("sql", "--help").output


# --- progress ----------------------------------------------------------------------------------

def test_plain_progress_lines_every_ten_percent():
    from featstore.progress import Ticker

    c = Console(file=io.StringIO(), width=200)
    with Ticker("embed", c, tty=False) as t:
        for i in range(101):
            t.update(i, 100)
        for i in range(1, 4):
            t.update(i, 3, "next")
    lines = c.file.getvalue().splitlines()
    assert [ln.split(":")[1].split()[0] for ln in lines[:11]] == [f"{10 * k}/100" for k in range(11)]
    assert len(lines) == 14 and lines[-1].startswith("embed next: 3/3 (100%)")


@pytest.mark.parametrize("cmd", [["duplicates", "--workers", 1, "--sheet", "{tmp}/s.png"],
                                 ["masks", "--method", "classical-v1", "--workers", 1]])
def test_long_commands_log_plain_progress_when_not_a_terminal(tiny_db, tmp_path, cmd):
    db = _copy(tiny_db, tmp_path)
    r = _run(*[str(c).format(tmp=tmp_path) for c in cmd], "--db", db)
    assert r.exit_code == 0, r.output
    assert f"{cmd[0]}" in r.output and "(100%)" in r.output, r.output


def test_ingest_and_embed_log_plain_progress(tmp_path):
    db = tmp_path / "fs.duckdb"
    r = _run("ingest", "--folder", _folder(tmp_path / "data"), "--workers", 1, "--db", db)
    assert "ingest: 12/12 (100%)" in r.output, r.output
    r = _run("embed", "--backbone", "pixelstats", "--workers", 0, "--db", db)
    assert "embed: 12/12 (100%)" in r.text, r.output


@pytest.mark.slow
def test_probe_logs_its_steps(tiny_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store goes here
    r = _run("probe", "--backbone", "pixelstats", "--no-grl", "--no-maps", "--folds", 2, "--bootstrap", 10,
             "--db", _copy(tiny_db, tmp_path))
    assert r.exit_code == 0, r.output
    assert "probe neighbours:" in r.output and "probe probing:" in r.output, r.output
    assert "probe done: 5/5 (100%)" in r.output, r.output


# --- a missing store is refused, not created -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cmd", [["embed", "--backbone", "pixelstats"], ["duplicates"], ["masks"],
                                 ["probe", "--backbone", "pixelstats"], ["neighbors", "--summary"],
                                 ["export", "--parquet", "out"]])
def test_commands_that_need_images_refuse_a_missing_store(tmp_path, cmd):
    db = tmp_path / "nothere.duckdb"
    r = _run(*cmd, "--db", db)
    assert r.exit_code == 2, r.output
    assert str(db) in r.text and "featstore ingest" in r.text, r.output
    assert not db.exists() and not (tmp_path / "out").exists()


# --- the wrong --folder depth ------------------------------------------------------------------

def test_folder_one_level_too_deep_fails_once_up_front(tmp_path):
    from featstore.store import connect

    root = _folder(tmp_path / "data")
    db = tmp_path / "fs.duckdb"
    r = _run("ingest", "--folder", root / "s1", "--workers", 1, "--db", db)  # a source's folder, not ROOT
    assert r.exit_code == 1, r.output
    assert "ROOT/<source>/<label>/<image>" in r.text and "covid/0.png" in r.text and "parent" in r.text, r.output
    con = connect(db, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM ingest_errors").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 0
    finally:
        con.close()


def test_folder_with_a_few_strays_still_rejects_them_one_by_one(tmp_path):
    from featstore import ingest as I

    root = _folder(tmp_path / "data")
    (root / "stray.png").write_bytes(b"x")
    rows, pre = I.folder_rows(root)
    assert len(rows) == 12 and [e.reason for e in pre] == ["not in a ROOT/<source>/<label>/ folder"]
