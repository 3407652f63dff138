"""The CLI is thin: each command builds a job object, runs it and renders the result; the job refuses
bad options before any work, runs from Python alike, and its errors become exit statuses in one place
(cli.Commands)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _source import parse

from featstore.cli import app
from featstore.errors import CommandError, Failed, Interrupted, NoSpace, SqlFailed, UserError

CLI = Path(__file__).resolve().parents[1] / "featstore" / "cli.py"


def _run(*args):
    import gc

    r = CliRunner().invoke(app, [str(a) for a in args])
    gc.collect()  # an in-process DuckDB object left for the collector keeps the file open
    r.text = " ".join(r.output.split())
    return r


def test_the_cli_exits_in_one_place():
    exits = []
    for node in ast.walk(parse(CLI)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            if name == "Exit" or (owner == "sys" and name == "exit"):
                exits.append(node.lineno)
    assert len(exits) == 1, f"typer.Exit / sys.exit at cli.py lines {exits}: raise a featstore.errors type instead"


def test_jobs_refuse_bad_options_before_touching_the_store(tmp_path):
    from featstore.export import ExportJob
    from featstore.jobs import EmbedJob, IngestJob
    from featstore.query import SqlJob

    db = tmp_path / "fs.duckdb"
    for make, said in [(lambda: IngestJob(db=db), "exactly one of --manifest, --folder, --dataset"),
                       (lambda: IngestJob(folder=tmp_path, manifest=tmp_path / "m.csv", db=db), "exactly one of"),
                       (lambda: IngestJob(dataset="nih", db=db), "--dataset needs --imgpath"),
                       (lambda: EmbedJob("pixelstats", engine="spark", db=db), "--engine spark"),
                       (lambda: SqlJob(db=db), "give a QUERY or -f FILE"),
                       (lambda: SqlJob("SELECT 1", var=["k"], db=db), "--var k: expected NAME=VALUE"),
                       (lambda: SqlJob("SELECT 1", out=tmp_path / "a.xlsx", db=db), ".csv, .parquet or .json"),
                       (lambda: ExportJob(db=db), "give --parquet DIR and/or --snapshot DIR")]:
        with pytest.raises(UserError, match=".") as e:
            make()
        assert said in str(e.value) and e.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_a_job_runs_from_python_and_says_why_it_cannot(synth_stores, tmp_path):
    from featstore.jobs import NeighborsJob
    from featstore.query import SqlJob

    db = synth_stores["neutral"]
    t = NeighborsJob(backbone="pixelstats", summary=True, k=5, db=db).run()
    assert t.num_rows > 0 and "source" in t.column_names
    assert SqlJob("SELECT count(*) AS n FROM images", db=db).run().column("n")[0].as_py() > 0
    with pytest.raises(UserError, match="did you mean 'pixelstats'"):
        NeighborsJob(backbone="pixelstat", summary=True, db=db).run()
    with pytest.raises(UserError, match="matches 0 images"):
        NeighborsJob("no-such-image", backbone="pixelstats", db=db).run()
    with pytest.raises(SqlFailed):
        SqlJob("SELECT * FROM no_such_table", db=db).run()
    with pytest.raises(UserError, match="no featstore at"):
        NeighborsJob(summary=True, db=tmp_path / "none.duckdb").run()


@pytest.mark.parametrize("error, code, line", [
    (UserError("bad [input]"), 2, "error: bad [input]"),  # never read as markup
    (Failed("it broke"), 1, "error: it broke"),
    (SqlFailed("no such table"), 1, "SQL error: no such table"),
    (NoSpace("disk full: free some"), 3, "error: disk full: free some"),
    (Interrupted("kept 3 batches"), 130, "interrupted: kept 3 batches"),
    (CommandError("the server stopped (exit code 7)", 7), 7, "error: the server stopped (exit code 7)"),
])
def test_each_error_kind_is_one_line_and_its_exit_status(monkeypatch, tmp_path, error, code, line):
    from featstore import jobs

    def fail(self, *a, **kw):
        raise error

    monkeypatch.setattr(jobs.NeighborsJob, "run", fail)
    r = _run("neighbors", "--summary", "--db", tmp_path / "x.duckdb")
    assert r.exit_code == code and r.output.strip() == line and "Traceback" not in r.output, r.output


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    from featstore import jobs

    def bug(self, *a, **kw):
        raise KeyError("a bug")

    monkeypatch.setattr(jobs.NeighborsJob, "run", bug)
    r = _run("neighbors", "--summary", "--db", tmp_path / "x.duckdb")
    assert r.exit_code == 1 and isinstance(r.exception, KeyError), r.output


def test_allow_root_widens_the_default_root_without_replacing_it(tmp_path):
    from featstore import ingest as I

    here, there, elsewhere = tmp_path / "here", tmp_path / "there", tmp_path / "elsewhere"
    for d in (here, there, elsewhere):
        d.mkdir()
        (d / "a.png").write_bytes(b"x")
    m = here / "m.csv"
    m.write_text("path,source,label\na.png,s,covid\n../there/a.png,s,covid\n../elsewhere/a.png,s,covid\n")
    rows, refused = I.manifest_rows(m, extra_roots=[there])
    assert [Path(r.path).parent.name for r in rows] == ["here", "there"]
    assert [e.file for e in refused] == ["../elsewhere/a.png"] and "outside the allowed root" in refused[0].reason


@pytest.mark.slow
def test_masks_redo_says_how_many_lung_variant_embeddings_it_dropped(tmp_path):
    # the masks job (front end) joins the preprocess stage's masks and the embed stage's embeddings
    import duckdb

    from featstore.jobs import MasksJob
    from featstore.synth import generate

    db = tmp_path / "fs.duckdb"
    assert _run("ingest", "--manifest", generate(tmp_path / "data", n_per_source=3, size=96, seed=2),
                "--workers", 1, "--db", db).exit_code == 0
    for p in ("original", "lungs-isolated"):
        r = _run("embed", "--backbone", "pixelstats", "--preprocess", p, "--masks", "classical-v1", "--workers", 0,
                 "--db", db)
        assert r.exit_code == 0, r.output

    def count(preprocess):
        with duckdb.connect(str(db), read_only=True) as c:
            return c.execute("SELECT count(*) FROM embeddings WHERE preprocess = ?", [preprocess]).fetchone()[0]

    lung, orig = count("lungs-isolated"), count("original")
    assert lung > 0 and orig > 0
    r = _run("masks", "--redo", "--method", "classical-v1", "--workers", 1, "--db", db)
    assert r.exit_code == 0, r.output
    assert f"{lung} lung-variant embeddings deleted for re-made masks" in r.text, r.output
    assert (count("lungs-isolated"), count("original")) == (0, orig)
    # nothing is built on the new masks yet: a second redo drops nothing
    rep, summary, n = MasksJob(method="classical-v1", redo=True, workers=1, db=db).run()
    assert n == 0 and len(rep.remade) == rep.n_todo > 0 and summary.num_rows > 0
