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


@pytest.mark.slow
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


# --- hostile input ----------------------------------------------------------------------------------------

def _png_bytes(value: int, size=(12, 10)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    a = (np.arange(size[0] * size[1]).reshape(size) * 7 + value) % 256
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _ingest_manifest(con, m, **kw):
    rows, pre = I.manifest_rows(m, **{k: v for k, v in kw.items() if k in ("allowed_roots", "encoding")})
    return I.ingest_rows(con, rows, str(m), pre_rejected=pre, workers=1, labels=I.ANY_LABEL,
                         **{k: v for k, v in kw.items() if k == "max_bytes"})


def _errors(con) -> dict[str, str]:
    return {f.rsplit("/", 1)[-1]: r for f, r in con.execute("SELECT file, reason FROM ingest_errors").fetchall()}


def _cli(*args, timeout=300):
    """The real command in a child process: a hang fails the test (timeout) instead of hanging it."""
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "featstore.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_symlink_loop_in_a_manifest_is_recorded_not_fatal(con, tmp_path):
    (tmp_path / "ok.png").write_bytes(_png_bytes(1))
    (tmp_path / "loop1.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop1.png")
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\nloop1.png,s,covid\nok.png,s,covid\n")
    rep = _ingest_manifest(con, m)  # the old code raised RuntimeError here: nothing ingested
    assert rep.n_new_images == 1
    assert _errors(con) == {"loop1.png": "symlink loop"}


def test_fifo_and_devices_in_a_manifest_are_recorded_never_read(tmp_path):
    import os

    (tmp_path / "ok.png").write_bytes(_png_bytes(2))
    os.mkfifo(tmp_path / "pipe.png")  # the old code opened it and waited forever, holding the store
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\npipe.png,s,covid\n/dev/null,s,covid\nok.png,s,covid\n")
    db = tmp_path / "fs.duckdb"
    r = _cli("ingest", "--manifest", m, "--db", db, "--workers", "1", "--allow-root", tmp_path, "--allow-root", "/dev")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    con = connect(db, read_only=True)
    assert _errors(con) == {"pipe.png": "a FIFO (named pipe), not a regular file: not opened",
                            "null": "a device node, not a regular file: not read"}
    assert con.execute("SELECT count(*) FROM occurrences").fetchone()[0] == 1
    con.close()


def test_size_cap_refuses_unread_and_is_configurable(con, tmp_path):
    from featstore.decode import DEFAULT_MAX_BYTES

    (tmp_path / "ok.png").write_bytes(_png_bytes(3))
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(DEFAULT_MAX_BYTES + 10)  # sparse: the old code read all 512 MiB of zeros into memory
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\nhuge.png,s,covid\nok.png,s,covid\n")
    rep = _ingest_manifest(con, m)
    assert rep.n_new_images == 1
    assert _errors(con)["huge.png"].startswith(f"file too large ({DEFAULT_MAX_BYTES + 10} bytes")
    r = _cli("ingest", "--manifest", m, "--db", tmp_path / "b.duckdb", "--max-bytes", "100", "--workers", "1")
    assert r.returncode == 1 and "file too large" in r.stderr and "100-byte cap" in r.stderr, r.stderr


def test_folder_mode_is_fenced_like_a_manifest(con, tmp_path):
    import os

    root = tmp_path / "root"
    (root / "s" / "covid").mkdir(parents=True)
    (root / "s" / "covid" / "ok.png").write_bytes(_png_bytes(4))
    (tmp_path / "secret.png").write_bytes(_png_bytes(5))
    (root / "s" / "covid" / "escape.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "outside").mkdir()
    (root / "s" / "non_covid").symlink_to(tmp_path / "outside")
    (root / "s" / "covid" / "inside.png").symlink_to(root / "s" / "covid" / "ok.png")
    (root / "s" / "covid" / "loop.png").symlink_to(root / "s" / "covid" / "loop.png")
    os.mkfifo(root / "s" / "covid" / "pipe.png")
    rows, pre = I.folder_rows(root)
    rep = I.ingest_rows(con, rows, "folder", pre_rejected=pre, workers=1)
    # the old code ingested secret.png from outside the root and skipped the rest without a word
    assert con.execute("SELECT count(*) FROM occurrences WHERE path LIKE '%secret%'").fetchone()[0] == 0
    assert rep.n_new_occurrences == 1 and rep.n_new_images == 1  # inside.png resolves to ok.png: one row
    err = _errors(con)
    assert err["escape.png"].startswith("symlink to a path outside the folder root")
    assert err["non_covid"].startswith("symlink to a path outside the folder root")
    assert err["loop.png"] == "symlink loop"
    assert err["pipe.png"].startswith("a FIFO")
    rows, pre = I.folder_rows(root, allowed_roots=[root, tmp_path])  # --allow-root opens it on purpose
    assert any(r.path.endswith("secret.png") for r in rows)


def test_changed_file_is_noticed_on_reingest(con, tmp_path):
    import os

    f = tmp_path / "a.png"
    f.write_bytes(_png_bytes(6))
    (tmp_path / "b.png").write_bytes(_png_bytes(7))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\na.png,s,covid\nb.png,s,covid\n")
    _ingest_manifest(con, m)
    (old,) = con.execute("SELECT image_id FROM occurrences WHERE path LIKE '%a.png'").fetchone()
    f.write_bytes(_png_bytes(8, size=(14, 10)))
    rep = _ingest_manifest(con, m)  # the old code skipped the known path: old hash, new bytes
    assert (rep.n_changed, rep.n_new_images, rep.n_already) == (1, 1, 1) and rep.ok
    (new,) = con.execute("SELECT image_id FROM occurrences WHERE path LIKE '%a.png'").fetchone()
    assert new != old
    assert con.execute("SELECT old_image_id, new_image_id FROM ingest_changes").fetchall() == [(old, new)]
    assert con.execute("SELECT image_id FROM superseded_images").fetchall() == [(old,)]  # kept, and findable
    assert con.execute("SELECT height FROM images WHERE image_id = ?", [new]).fetchone()[0] == 14
    assert "1 file(s) changed" in rep.notes()[0]
    # touched, same bytes: hashed again, not a change; the new mtime is remembered
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    rep = _ingest_manifest(con, m)
    assert (rep.n_changed, rep.n_already, rep.n_new_occurrences) == (0, 2, 0)
    assert con.execute("SELECT mtime_ns FROM occurrences WHERE path LIKE '%a.png'").fetchone()[0] == 1_000_000_000
    assert con.execute("SELECT count(*) FROM ingest_changes").fetchone()[0] == 1


def test_rows_from_before_schema_5_are_hashed_once_then_trusted(con, tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(9))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\na.png,s,covid\n")
    _ingest_manifest(con, m)
    con.execute("UPDATE occurrences SET size_bytes = NULL, mtime_ns = NULL")  # as a migrated old store has them
    rep = _ingest_manifest(con, m)
    assert (rep.n_already, rep.n_changed) == (1, 0)
    assert con.execute("SELECT count(*) FROM occurrences WHERE size_bytes IS NULL").fetchone()[0] == 0


def test_migration_5_upgrades_a_version_4_store(tmp_path):
    import duckdb

    from featstore.store import SCHEMA_VERSION, migrate, sql_dir

    db = tmp_path / "v4.duckdb"
    c = duckdb.connect(str(db))
    c.execute((sql_dir() / "schema.sql").read_text())
    for v in (2, 3, 4):
        c.execute(next((sql_dir() / "migrations").glob(f"{v:03d}_*.sql")).read_text())
    c.execute("INSERT INTO schema_version (version) VALUES (1), (2), (3), (4)")
    c.execute("INSERT INTO occurrences (image_id, source, path, label, origin, ingest_run, ingested_at) "
              "VALUES ('x', 's', '/p', 'covid', 'o', 1, now())")
    assert migrate(c) == SCHEMA_VERSION
    assert c.execute("SELECT size_bytes, mtime_ns, age_raw FROM occurrences").fetchall() == [(None, None, None)]
    c.close()


def _latin1_manifest(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(10))
    (tmp_path / "b.png").write_bytes(_png_bytes(11))
    m = tmp_path / "m.csv"
    m.write_bytes("path,source,label\na.png,Clinique-Zé,covid\nb.png,Clinique-Zè,covid\n".encode("cp1252"))
    return m


def test_latin1_manifest_is_refused_not_merged(con, tmp_path):
    m = _latin1_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"not UTF-8 \(byte 0xe9 on line 2\).*--encoding"):
        I.manifest_rows(m)  # the old code read both sources as 'Clinique-Z\ufffd': one source
    rep = _ingest_manifest(con, m, encoding="cp1252")
    assert rep.ok
    assert sorted(s for (s,) in con.execute("SELECT source FROM occurrences").fetchall()) == \
        ["Clinique-Zè", "Clinique-Zé"]


def test_latin1_manifest_on_the_command_line(tmp_path):
    m = _latin1_manifest(tmp_path)
    db = tmp_path / "fs.duckdb"
    r = _cli("ingest", "--manifest", m, "--db", db)
    assert r.returncode == 1 and "--encoding" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("ingest", "--manifest", m, "--db", db, "--encoding", "cp1252")
    assert r.returncode == 0, r.stderr
    r = _cli("ingest", "--manifest", m, "--db", db, "--encoding", "klingon")
    assert r.returncode == 1 and "unknown encoding 'klingon'" in r.stderr, r.stderr


def test_utf8_and_utf16_with_a_bom_are_read(con, tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(12))
    text = "path,source,label\na.png,Clinique-Zé,covid\n"
    for i, data in enumerate([b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16")]):
        m = tmp_path / f"m{i}.csv"
        m.write_bytes(data)
        rows, _ = I.manifest_rows(m)
        assert [(r.source, r.label) for r in rows] == [("Clinique-Zé", "covid")]


@pytest.mark.parametrize("raw,age", [
    ("65", 65.0), ("65.5", 65.5), ("065Y", 65.0), ("65 years", 65.0), ("65y", 65.0), (" 7 ", 7.0), ("0", 0.0),
    ("65-70", None), ("-5", None), ("3 months", None), ("003M", None), ("abc", None), ("6,5", None),
    ("200", None), ("nan", None), ("inf", None), ("1e2", None),
])
def test_ages_parse_strictly(raw, age):
    assert I._age(raw) == age  # the old code: 65-70 -> 6570, -5 -> 5, 3 months -> 3


def test_unparsed_ages_are_kept_and_counted(con, tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png_bytes(20 + i))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label,age\n0.png,s,covid,065Y\n1.png,s,covid,65-70\n2.png,s,covid,-5\n3.png,s,covid,\n")
    rep = _ingest_manifest(con, m)
    got = dict(con.execute("SELECT age_raw, age FROM occurrences WHERE age_raw IS NOT NULL").fetchall())
    assert got == {"065Y": 65.0, "65-70": None, "-5": None}
    assert rep.n_age_unparsed == 2 and any("2 age value(s)" in n for n in rep.notes())
    r = _cli("ingest", "--manifest", m, "--db", tmp_path / "b.duckdb", "--workers", "1")
    assert r.returncode == 0 and "2 age value(s) are not a number of years" in r.stderr, r.stderr


def test_duplicate_header_names_are_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(30))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label,label\na.png,s,covid,non_covid\n")
    with pytest.raises(ValueError, match=r"duplicate column name\(s\): 'label' \(columns 3, 4\)"):
        I.manifest_rows(m)  # the old code used the first 'label' and renamed the second without a word


def test_special_manifest_is_refused_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="FIFO"):
        I.manifest_rows(tmp_path / "m.csv")


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs) to fill: needs root and mount rights, else skips."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.slow
def test_disk_full_during_ingest_is_one_line_and_the_store_is_intact(small_disk, tmp_path):
    import secrets

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    png = _png_bytes(40)
    for i in range(3000):
        (imgs / f"{i}.png").write_bytes(png)
    (imgs / "small.csv").write_text("path,source,label\n" + "".join(f"{i}.png,s,covid\n" for i in range(3)))
    # random notes do not compress: about 6 MB of rows for a 4 MiB disk
    (imgs / "big.csv").write_text("path,source,label,note\n" + "".join(
        f"{i}.png,s,covid,{secrets.token_hex(1000)}\n" for i in range(3, 3000)))
    db = small_disk / "fs.duckdb"
    r = _cli("ingest", "--manifest", imgs / "small.csv", "--db", db, "--workers", "1")
    assert r.returncode == 0, r.stderr
    r = _cli("ingest", "--manifest", imgs / "big.csv", "--db", db, "--workers", "1", timeout=300)
    # the old code: a 92-line traceback ending "cannot rollback - no transaction is active"
    assert r.returncode == 1 and "Traceback" not in r.stderr and "cannot rollback" not in r.stderr, r.stderr
    line = [x for x in r.stderr.splitlines() if "disk full" in x]
    assert len(line) == 1 and "nothing of this ingest was stored" in line[0] and "(1 images)" in line[0] \
        and str(db) in line[0] and "run the same command again" in line[0], r.stderr
    con = connect(db, read_only=True)  # intact: what the first ingest stored, nothing of the second
    assert con.execute("SELECT count(*) FROM occurrences").fetchone()[0] == 3
    con.close()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = _cli("ingest", "--manifest", imgs / "big.csv", "--db", db, "--workers", "1", timeout=300)
    assert r.returncode == 0, r.stderr  # after freeing space, the same command completes
    con = connect(db, read_only=True)
    assert con.execute("SELECT count(*) FROM occurrences").fetchone()[0] == 3000
    con.close()


def test_changed_file_that_no_longer_decodes_keeps_its_rows(con, tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(_png_bytes(50))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\na.png,s,covid\n")
    _ingest_manifest(con, m)
    before = con.execute("SELECT image_id, size_bytes FROM occurrences").fetchall()
    f.write_bytes(b"overwritten by a text editor\n")
    rep = _ingest_manifest(con, m)
    assert [e.reason for e in rep.errors] == ["not an image (no known image format) (ingested before; "
                                              "its stored rows are kept)"]
    assert con.execute("SELECT image_id, size_bytes FROM occurrences").fetchall() == before
    assert con.execute("SELECT count(*) FROM ingest_changes").fetchone()[0] == 0
