import subprocess
import sys

import polars as pl
import pytest

from featstore import ingest as I
from featstore.store import SCHEMA_VERSION, StoreBusyError, connect

from conftest import CXR, ONNX, needs_cxr, needs_onnx


def test_schema_created_from_empty(tmp_path):
    con = connect(tmp_path / "new.duckdb")
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"images", "occurrences", "ingest_errors", "ingest_runs", "embed_runs", "embed_errors"} <= tables
    assert {"embeddings", "embedding_sets", "source_label_counts", "duplicate_groups", "label_conflicts"} <= views
    assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    con.close()
    con = connect(tmp_path / "new.duckdb")  # reopening applies nothing twice: one row per version
    assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_every_bad_input_is_recorded_with_its_reason(ingested):
    con, rep = ingested
    got = {(r[0].split("/")[-1], r[1]) for r in con.execute("SELECT file, reason FROM ingest_errors").fetchall()}
    reasons = {f: r for f, r in got}
    assert reasons["truncated.png"].startswith("truncated or corrupt PNG")
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["notes.png"].startswith("not an image")
    assert reasons["missing.png"] == "file not found"
    all_reasons = [r for _, r in got]
    assert any(r == "empty label" for r in all_reasons)
    assert any(r.startswith("unknown label 'maybe'") for r in all_reasons)
    assert any(r.startswith("duplicate manifest row") for r in all_reasons)
    assert len(rep.errors) == 7 and not rep.ok
    # nothing good was lost next to the bad rows: 4 sources x 24 + 3 copies
    assert rep.n_new_occurrences == 99
    assert rep.n_new_images == 96


def test_duplicates_across_sources_are_one_image_two_occurrences(ingested):
    con, rep = ingested
    assert rep.n_duplicate_groups == 3 and rep.n_cross_source_groups == 3
    assert rep.n_label_conflicts == 1
    n_img, n_occ = con.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM occurrences)").fetchone()
    assert (n_img, n_occ) == (96, 99)
    conflict = con.execute("SELECT count(DISTINCT label) FROM label_conflicts").fetchone()[0]
    assert conflict == 2


def test_ingest_twice_changes_nothing(ingested, synth_manifest):
    con, _ = ingested
    snapshot = lambda: [con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
                        for t in ("images", "occurrences")] + \
        [con.execute("SELECT file, source, reason, resolved FROM ingest_errors ORDER BY ALL").fetchall()]
    before = snapshot()
    rows, pre = I.manifest_rows(synth_manifest)
    rep = I.ingest_rows(con, rows, str(synth_manifest), workers=2)
    assert rep.n_new_images == 0 and rep.n_new_occurrences == 0 and rep.n_already == 99
    assert snapshot() == before


def test_fixed_file_resolves_its_error(con, tmp_path):
    from PIL import Image

    (tmp_path / "r" / "s" / "covid").mkdir(parents=True)
    f = tmp_path / "r" / "s" / "covid" / "a.png"
    f.write_bytes(b"")
    rows, pre = I.folder_rows(tmp_path / "r")
    assert [e.reason for e in I.ingest_rows(con, rows, "x", pre_rejected=pre).errors] == ["empty file (0 bytes)"]
    Image.new("L", (8, 8), 3).save(f)
    rows, pre = I.folder_rows(tmp_path / "r")
    assert I.ingest_rows(con, rows, "x", pre_rejected=pre).ok
    assert con.execute("SELECT count(*) FROM open_ingest_errors").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM ingest_errors WHERE resolved").fetchone()[0] == 1


def test_folder_layout(con, tmp_path):
    from PIL import Image

    for src, lab, n in [("site1", "covid", 2), ("site1", "non_covid", 1), ("site2", "non_covid", 2)]:
        d = tmp_path / "root" / src / lab
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("L", (16, 16), 10 * i + len(src + lab)).save(d / f"{i}.png")
    (tmp_path / "root" / "stray.png").write_bytes(b"x")
    rows, pre = I.folder_rows(tmp_path / "root")
    rep = I.ingest_rows(con, rows, "folder", pre_rejected=pre)
    assert rep.n_new_occurrences == 5
    assert [e.reason for e in rep.errors] == ["not in a ROOT/<source>/<label>/ folder"]
    counts = con.execute("SELECT source, label, n_occurrences FROM source_label_counts").fetchall()
    assert counts == [("site1", "covid", 2), ("site1", "non_covid", 1), ("site2", "non_covid", 2)]


def test_parquet_manifest_with_other_column_names(con, synth_manifest, tmp_path):
    df = pl.read_csv(synth_manifest, infer_schema=False).filter(pl.col("source") == "synthetic-a")
    df = df.filter(pl.col("label").is_in(["covid", "non_covid"])).unique("path", maintain_order=True)
    df = df.rename({"path": "file", "label": "covid_status", "source": "site"})
    m = tmp_path / "m.parquet"
    df.write_parquet(m)
    with pytest.raises(ValueError, match="lacks column"):
        I.manifest_rows(m)
    cols = I.ColumnMap(path="file", label="covid_status", source="site")
    rows, _ = I.manifest_rows(m, cols)  # relative to the manifest's folder: not there
    rep = I.ingest_rows(con, rows, str(m))
    assert rep.n_new_images == 0 and {e.reason for e in rep.errors} == {"file not found"}
    rows, _ = I.manifest_rows(m, cols, root=synth_manifest.parent)
    rep = I.ingest_rows(con, rows, str(m))
    assert rep.ok and rep.n_new_images == df.height
    # the first attempt's wrong paths stay on record: those files really do not exist
    assert con.execute("SELECT count(*) FROM open_ingest_errors").fetchone()[0] == df.height


def test_unreadable_manifest_is_recorded(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from featstore.cli import app

    bad = tmp_path / "m.csv"
    bad.write_bytes(b'path,source,label\n"a.png,s,covid\n\xff\xfe,"x\n')
    db = tmp_path / "fs.duckdb"
    r = CliRunner().invoke(app, ["ingest", "--manifest", str(tmp_path / "none.csv"), "--db", str(db)])
    assert r.exit_code == 1
    con = connect(db)
    assert con.execute("SELECT reason FROM ingest_errors").fetchone()[0] == "manifest not found"


def test_cli_exit_status_says_whether_anything_failed(synth_manifest, tmp_path):
    from typer.testing import CliRunner

    from featstore.cli import app

    db = str(tmp_path / "fs.duckdb")
    r = CliRunner().invoke(app, ["ingest", "--manifest", str(synth_manifest), "--db", db, "--workers", "1"])
    assert r.exit_code == 1, r.output
    assert "7 rejected" in r.output
    good = tmp_path / "good.csv"
    pl.read_csv(synth_manifest, infer_schema=False).filter(pl.col("source") == "synthetic-c").with_columns(
        (str(synth_manifest.parent) + "/" + pl.col("path")).alias("path")).write_csv(good)
    r = CliRunner().invoke(app, ["ingest", "--manifest", str(good), "--db", db])
    assert r.exit_code == 1 and "path outside the allowed root" in r.output  # absolute paths elsewhere
    r = CliRunner().invoke(app, ["ingest", "--manifest", str(good), "--db", db,
                                 "--allow-root", str(synth_manifest.parent)])
    assert r.exit_code == 0, r.output


def test_second_writer_gets_a_clear_message(tmp_path):
    db = tmp_path / "fs.duckdb"
    connect(db).close()
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import duckdb,sys,time; c=duckdb.connect({str(db)!r}); print('ok', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(StoreBusyError, match="open for writing in another process"):
            connect(db)
    finally:
        holder.kill()
        holder.wait()


@needs_cxr
def test_real_manifest_ingests_as_documented(tmp_path):
    con = connect(tmp_path / "real.duckdb")
    rows, pre = I.manifest_rows(CXR / "manifest.csv")
    rep = I.ingest_rows(con, rows, "real", workers=2)
    assert rep.ok, rep.errors[:5]
    assert (rep.n_rows, rep.n_images, rep.n_occurrences) == (4074, 3971, 4074)
    assert (rep.n_duplicate_groups, rep.n_cross_source_groups) == (102, 95)
    # the manifest's own columns are kept (orig size/format, licence, ...)
    extra = con.execute("SELECT extra->>'orig_format' FROM occurrences WHERE extra IS NOT NULL LIMIT 1").fetchone()[0]
    assert extra in ("JPEG", "PNG", "DICOM")
    if ONNX.exists():
        from featstore.backbones import create_backbone
        from featstore.embed import embed

        bb = create_backbone("mobilenetv3-nih-onnx", weights_dir=ONNX.parent)
        r = embed(con, bb, batch_size=32, workers=2, limit=96)
        assert r.n_embedded == 96 and not r.failed
        X = con.execute("SELECT vector FROM embeddings_d576").fetchnumpy()["vector"]
        assert len(X) == 96
