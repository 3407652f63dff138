"""The hostile corpus: well over 80 generated files and manifest rows - every kind of bad input
featstore has met (broken PNG/JPEG/DICOM, NaN/Inf TIFF and NIfTI, FIFOs, device nodes, symlink loops
and escapes, a sparse file over the size cap, Latin-1 names and manifests, odd ages, duplicate rows and
headers) mixed with good images - goes through the real `featstore ingest` command in a child process.
Asserted: no traceback, no hang (a timeout fails the test), every good file ingested, every rejection
in `ingest_errors` with its reason, and every manifest row accounted for."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from featstore.decode import DEFAULT_MAX_BYTES
from featstore.store import connect

TIMEOUT = 300  # a safety net against hangs (a FIFO opened, /dev/zero read), not a timing assumption


def _run(*args, env_extra=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400", **(env_extra or {})}
    env.pop("FEATSTORE_MAX_BYTES", None)
    return subprocess.run([sys.executable, "-m", "featstore.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)


def _img(seed: int, shape=(24, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(arr, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format=fmt)
    return buf.getvalue()


def _png(seed):
    return _save(_img(seed), "PNG")


def _png16(seed):
    return _save((_img(seed).astype(np.uint16) * 257 + seed).astype(np.uint16), "PNG")


def _jpeg(seed):
    return _save(_img(seed), "JPEG")


def _float_tiff(seed, bad=None):
    a = np.random.default_rng(seed).random((16, 12)).astype(np.float32)
    if bad is not None:
        a[3, 4] = bad
    return _save(a, "TIFF", mode="F")


def _nifti(seed, bad=None, shape=(12, 16)):
    import nibabel as nib

    a = np.random.default_rng(seed).random(shape).astype(np.float32)
    if bad is not None:
        a.flat[5] = bad
    return nib.Nifti1Image(a, np.eye(4)).to_bytes()


def _dicom(seed):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_decode import _dicom as make

    return make(np.random.default_rng(seed).integers(0, 4096, (20, 16)).astype(np.uint16))


def _flip(data: bytes, where: float, byte: int) -> bytes:
    b = bytearray(data)
    b[int(where * len(b))] ^= byte
    return bytes(b)


class Corpus:
    """Writes files under data/ and collects manifest rows, each with what must happen to it."""

    def __init__(self, base: Path):
        self.base, self.data = base, base / "data"
        self.data.mkdir()
        self.rows: list[tuple[str, str, str, str]] = []   # path, source, label, age
        self.good: dict[tuple[str, str], str] = {}         # (source, resolved path) -> manifest path
        self.bad: list[tuple[str, str, str]] = []          # (manifest path, source, reason substring)
        self.files = 0

    def write(self, name, data: bytes):
        p = self.data / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        self.files += 1
        return p

    def good_row(self, name, source="site-a", label="covid", age=""):
        self.rows.append((name, source, label, age))
        self.good[(source, str((self.data / name).resolve()))] = name

    def bad_row(self, name, reason, source="site-a", label="covid", age=""):
        self.rows.append((name, source, label, age))
        self.bad.append((name, source, reason))


def build(base: Path) -> Corpus:
    c = Corpus(base)
    seed = iter(range(1000))
    # --- good images, every supported format, some under misleading names --------------------------
    for i in range(12):
        c.write(f"png/{i}.png", _png(next(seed)))
        c.good_row(f"png/{i}.png", age=["65", "065Y", "65 years", "65-70", "-5", "3 months", "abc", "", "7.5",
                                         "200", "6,5", "0"][i])
    for i in range(5):
        c.write(f"png16/{i}.png", _png16(next(seed)))
        c.good_row(f"png16/{i}.png", label="non_covid")
    for i in range(6):
        c.write(f"jpeg/{i}.jpg", _jpeg(next(seed)))
        c.good_row(f"jpeg/{i}.jpg", source="site-b")
    for i in range(4):
        c.write(f"dicom/{i}.dcm", _dicom(next(seed)))
        c.good_row(f"dicom/{i}.dcm", source="site-b", label="non_covid")
    for i in range(3):
        c.write(f"nifti/{i}.nii", _nifti(next(seed)))
        c.good_row(f"nifti/{i}.nii", source="site-c")
        c.write(f"tiff/{i}.tif", _float_tiff(next(seed)))
        c.good_row(f"tiff/{i}.tif", source="site-c", label="non_covid")
    for name, data in [("wrong/png_as.jpg", _png(next(seed))), ("wrong/png_as.dcm", _png(next(seed))),
                       ("wrong/png_as.nii", _png(next(seed))), ("wrong/jpeg_as.png", _jpeg(next(seed))),
                       ("wrong/jpeg_as.dcm", _jpeg(next(seed))), ("wrong/no_extension", _png(next(seed)))]:
        c.write(name, data)
        c.good_row(name, source="site-c")
    # non-ASCII names and two sources that only differ by an accent: must stay two sources
    for name, src in [("latin/café.png", "Clinique-Zé"), ("latin/naïve é.png", "Clinique-Zé"),
                      ("latin/Zürich ü.png", "Clinique-Zè"), ("latin/Ørsted.png", "Clinique-Zè"),
                      ("latin/[bold]markup[/].png", "Clinique-Zè")]:
        c.write(name, _png(next(seed)))
        c.good_row(name, source=src)
    # one file under two sources: one image, two occurrences (both good)
    c.write("shared/x.png", _png(next(seed)))
    c.good_row("shared/x.png", source="site-a")
    c.good_row("shared/x.png", source="site-b", label="non_covid")
    # a symlink that stays inside the root is fine
    (c.data / "links").mkdir()
    (c.data / "links" / "inside.png").symlink_to(c.data / "png" / "0.png")
    c.good_row("links/inside.png", source="site-d")

    # --- bad files ----------------------------------------------------------------------------------
    png, jpeg, dcm = _png(next(seed)), _jpeg(next(seed)), _dicom(next(seed))
    for i, frac in enumerate((0.3, 0.6, 0.9)):
        c.write(f"broken/trunc{i}.png", png[:int(len(png) * frac)])
        c.bad_row(f"broken/trunc{i}.png", "truncated or corrupt PNG")
    for i, frac in enumerate((0.5, 0.8)):
        c.write(f"broken/trunc{i}.jpg", jpeg[:int(len(jpeg) * frac)])
        c.bad_row(f"broken/trunc{i}.jpg", "JPEG")
    for i, frac in enumerate((0.1, 0.95)):
        c.write(f"broken/trunc{i}.dcm", dcm[:int(len(dcm) * frac)])
        c.bad_row(f"broken/trunc{i}.dcm", "DICOM")
    c.write("broken/flipsig.png", _flip(png, 0.0, 0xFF))
    c.bad_row("broken/flipsig.png", "not an image")
    c.write("broken/flipihdr.png", _flip(png, 0.6 * 33 / len(png), 0x01))  # in IHDR: CRC mismatch
    c.bad_row("broken/flipihdr.png", "truncated or corrupt PNG")
    for i, (src, where) in enumerate([(png, 0.5), (png, 0.8), (jpeg, 0.4), (jpeg, 0.7), (dcm, 0.5), (dcm, 0.99)]):
        # bit flips inside the data may still decode: either way accounted for (see the test), never a crash
        c.write(f"flipped/{i}.bin", _flip(src, where, 0x5A))
        c.rows.append((f"flipped/{i}.bin", "site-e", "covid", ""))
    for i in range(3):
        c.write(f"empty/{i}.png", b"")
        c.bad_row(f"empty/{i}.png", "empty file (0 bytes)")
    c.write("broken/text.png", b"patient notes, not an image\n" * 20)
    c.bad_row("broken/text.png", "not an image")
    c.write("broken/zero.png", b"\x89PNG\r\n\x1a\n" + bytes.fromhex(
        "0000000d4948445200000000000000100800000000") + b"\x00" * 4)  # IHDR says 0 x 16
    c.bad_row("broken/zero.png", "")
    for i, bad in enumerate((np.nan, np.inf, -np.inf)):
        c.write(f"nonfinite/{i}.tif", _float_tiff(next(seed), bad))
        c.bad_row(f"nonfinite/{i}.tif", "non-finite pixel values (")
        c.write(f"nonfinite/{i}.nii", _nifti(next(seed), bad))
        c.bad_row(f"nonfinite/{i}.nii", "non-finite pixel values (")
    c.write("broken/volume.nii", _nifti(next(seed), shape=(4, 4, 3)))
    c.bad_row("broken/volume.nii", "not 2-D")
    # --- special files --------------------------------------------------------------------------
    for i in range(2):
        os.mkfifo(c.data / f"fifo{i}.png")
        c.files += 1
        c.bad_row(f"fifo{i}.png", "FIFO")
    for dev in ("/dev/zero", "/dev/null", "/dev/urandom"):
        c.bad_row(dev, "device node")
    (c.data / "loop_a.png").symlink_to(c.data / "loop_b.png")
    (c.data / "loop_b.png").symlink_to(c.data / "loop_a.png")
    (c.data / "loop_self.png").symlink_to(c.data / "loop_self.png")
    c.files += 3
    for n in ("loop_a.png", "loop_self.png"):
        c.bad_row(n, "symlink loop")
    (base / "secret.png").write_bytes(_png(next(seed)))
    (c.data / "escape.png").symlink_to(base / "secret.png")
    (c.data / "to_zero.png").symlink_to("/dev/zero")
    (c.data / "dangling.png").symlink_to(c.data / "gone.png")
    c.files += 3
    c.bad_row("escape.png", "outside the allowed root")
    c.bad_row("../secret.png", "outside the allowed root")
    c.bad_row("/etc/passwd", "outside the allowed root")
    c.bad_row("to_zero.png", "device node", source="site-z")  # inside --allow-root /dev: a device, not read
    c.bad_row("dangling.png", "broken symlink")
    c.bad_row("png", "is a directory")
    with open(c.data / "huge.png", "wb") as f:
        f.truncate(DEFAULT_MAX_BYTES + 4096)  # sparse: instant, uses no disk
    c.files += 1
    c.bad_row("huge.png", "file too large")
    # a symlink whose target name is not UTF-8 (an old Latin-1 archive): recorded, not a crash
    latin = os.fsencode(c.data / "latin") + b"/caf\xe9.png"
    with open(latin, "wb") as f:
        f.write(_png(next(seed)))
    (c.data / "to_latin1.png").symlink_to(os.fsdecode(latin))
    c.files += 2
    c.bad_row("to_latin1.png", "not valid UTF-8")
    # --- bad rows ---------------------------------------------------------------------------------
    c.bad_row("missing.png", "file not found")
    c.bad_row("png/1.png", "duplicate manifest row")
    c.bad_row("jpeg/2.jpg", "duplicate manifest row", source="site-b")
    c.bad_row("png/3.png", "unknown label 'maybe'", label="maybe")
    c.bad_row("png/4.png", "empty label", source="site-x", label="")
    c.bad_row("", "empty path")
    return c


def _write_manifest(c: Corpus) -> Path:
    import csv

    m = c.data / "manifest.csv"
    with open(m, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "source", "label", "age"])
        w.writerows(c.rows)
    return m


def _reasons(con):
    return con.execute("SELECT file, source, reason FROM ingest_errors").fetchall()


def _match(file: str, manifest_path: str, data: Path) -> bool:
    """Whether an ingest_errors.file names this manifest path (as written, or resolved)."""
    if not manifest_path:
        return file.startswith("<row")
    shown = lambda p: str(p).encode("utf-8", "backslashreplace").decode()  # as the store keeps odd names
    names = {manifest_path, shown(data / manifest_path)}
    try:
        names.add(shown((data / manifest_path).resolve()))
    except RuntimeError:  # a symlink loop: recorded under the name as written
        pass
    return file in names


@pytest.mark.slow
def test_hostile_corpus_ingests_without_crash_hang_or_loss(tmp_path):
    c = build(tmp_path)
    m = _write_manifest(c)
    assert c.files >= 80 and len(c.rows) >= 80, (c.files, len(c.rows))
    db = tmp_path / "fs.duckdb"
    r = _run("ingest", "--manifest", m, "--db", db, "--workers", "2", "--allow-root", c.data, "--allow-root", "/dev")
    out = r.stdout + r.stderr
    assert "Traceback" not in out and r.returncode == 1, out
    con = connect(db, read_only=True)
    try:
        # 0 good rows lost
        occ = set(con.execute("SELECT source, path FROM occurrences").fetchall())
        assert set(c.good) <= occ, sorted(set(c.good) - occ)
        # every reject recorded with its reason
        recorded = _reasons(con)
        for path, source, why in c.bad:
            hits = [reason for f, s, reason in recorded if _match(f, path, c.data) and why in reason]
            assert hits, f"{path!r}: no ingest_errors row with {why!r}; have " \
                         f"{[x for x in recorded if _match(x[0], path, c.data)]}"
        # every manifest row is an occurrence or an error: nothing vanished
        n_rows, n_occ, n_err = con.execute("SELECT n_rows, n_new_occurrences, n_errors FROM ingest_runs").fetchone()
        assert n_rows == len(c.rows) and n_occ + n_err == n_rows
        # no non-finite image got in; sources that differ by an accent stayed apart
        assert con.execute("SELECT count(DISTINCT source) FROM occurrences WHERE source LIKE 'Clinique-Z%'"
                           ).fetchone()[0] == 2
        ages = dict(con.execute("SELECT age_raw, age FROM occurrences WHERE source = 'site-a' AND age_raw IS NOT NULL"
                                ).fetchall())
        assert ages == {"65": 65.0, "065Y": 65.0, "65 years": 65.0, "65-70": None, "-5": None, "3 months": None,
                        "abc": None, "7.5": 7.5, "200": None, "6,5": None, "0": 0.0}
        assert "6 age value(s) are not a number of years" in out
        # the secret file beside the root was never read into the store
        assert not any("secret" in p for _, p in occ)
    finally:
        con.close()
    # the same command again: no hang, no traceback, nothing new, nothing lost
    r = _run("ingest", "--manifest", m, "--db", db, "--workers", "2", "--allow-root", c.data, "--allow-root", "/dev")
    assert "Traceback" not in r.stdout + r.stderr and r.returncode == 1, r.stderr
    con = connect(db, read_only=True)
    assert con.execute("SELECT n_new_occurrences, n_already FROM ingest_runs ORDER BY run_id DESC LIMIT 1"
                       ).fetchone() == (0, n_occ)
    con.close()


@pytest.mark.slow
def test_hostile_manifests_are_refused_in_one_line_and_recorded(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    (tmp_path / "b.png").write_bytes(_png(2))
    cases = {
        "latin1.csv": ("path,source,label\na.png,Clinique-Zé,covid\nb.png,Clinique-Zè,covid\n".encode("cp1252"),
                       "--encoding"),
        "dupes.csv": (b"path,source,label,source\na.png,s,covid,t\n", "duplicate column name(s): 'source'"),
        "binary.csv": (bytes(range(256)) * 4, "--encoding"),
    }
    db = tmp_path / "fs.duckdb"
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        r = _run("ingest", "--manifest", tmp_path / name, "--db", db)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and why in lines[0] and name in lines[0], r.stderr
    os.mkfifo(tmp_path / "fifo.csv")
    r = _run("ingest", "--manifest", tmp_path / "fifo.csv", "--db", db)
    assert r.returncode == 1 and "FIFO" in r.stderr, r.stderr
    con = connect(db, read_only=True)
    got = {Path(f).name: reason for f, reason in con.execute("SELECT file, reason FROM ingest_errors").fetchall()}
    con.close()
    assert set(got) == {"latin1.csv", "dupes.csv", "binary.csv", "fifo.csv"}
    r = _run("ingest", "--manifest", tmp_path / "latin1.csv", "--db", db, "--encoding", "cp1252")
    assert r.returncode == 0, r.stderr
    con = connect(db, read_only=True)
    assert sorted(s for (s,) in con.execute("SELECT source FROM occurrences").fetchall()) == \
        ["Clinique-Zè", "Clinique-Zé"]
    con.close()


def test_hostile_folder_tree(tmp_path):
    root = tmp_path / "root"
    d = root / "site" / "covid"
    d.mkdir(parents=True)
    good = []
    for i in range(6):
        (d / f"{i}.png").write_bytes(_png(100 + i))
        good.append(str((d / f"{i}.png").resolve()))
    (d / "ü é.png").write_bytes(_png(120))
    good.append(str((d / "ü é.png").resolve()))
    (tmp_path / "outside.png").write_bytes(_png(130))
    (d / "escape.png").symlink_to(tmp_path / "outside.png")
    (d / "zero.png").symlink_to("/dev/zero")
    (d / "loop.png").symlink_to(d / "loop.png")
    os.mkfifo(d / "fifo.png")
    with open(os.fsencode(d) + b"/caf\xe9.png", "wb") as f:
        f.write(_png(140))
    (root / "site" / "non_covid").symlink_to(tmp_path)  # a folder link out of the root
    (d / "empty.png").write_bytes(b"")
    db = tmp_path / "fs.duckdb"
    r = _run("ingest", "--folder", root, "--db", db, "--workers", "1")
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr
    con = connect(db, read_only=True)
    paths = {p for (p,) in con.execute("SELECT path FROM occurrences").fetchall()}
    got = {Path(f).name: reason for f, reason in con.execute("SELECT file, reason FROM ingest_errors").fetchall()}
    con.close()
    assert paths == set(good)
    assert got["escape.png"].startswith("symlink to a path outside the folder root")
    assert got["zero.png"].startswith("symlink to a path outside the folder root")
    assert got["non_covid"].startswith("symlink to a path outside the folder root")
    assert got["loop.png"] == "symlink loop"
    assert got["fifo.png"].startswith("a FIFO")
    assert got["caf\\udce9.png"].startswith("file name is not valid UTF-8")
    assert got["empty.png"] == "empty file (0 bytes)"


# --- still let in, or still lost: the commands around the store, tried as a hostile or careless user --------
# Each test below failed on the code before its fix (noted per test). In-process (CliRunner) where the
# command allows it, so the file stays quick; stores are tiny and made by hand.

def _cli(*args, env=None):
    from typer.testing import CliRunner

    from featstore.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    r.text = " ".join(r.output.split())  # rich wraps long lines
    return r


def _tiny(db: Path, sources=("a", "b"), n=3) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_safety import _tiny_store

    return _tiny_store(db, sources, n)


def _error_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith(("error:", "SQL error:"))]


def _evil_folder(folder: Path, schema: str, load: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "schema.sql").write_text(schema)
    (folder / "load.sql").write_text(load)
    return folder


def test_sql_pragma_cannot_import_a_database_that_overwrites_the_store(tmp_path):
    """Item 10a (before: `PRAGMA import_database` passed the prefix check, and its schema.sql's COPY
    replaced the store with a 14-byte CSV, in read-only mode)."""
    db = _tiny(tmp_path / "victim.duckdb")
    before = db.read_bytes()
    allowed = tmp_path / "allowed"
    evil = _evil_folder(allowed / "evil", f"COPY (SELECT 'pwned' AS x) TO '{db}' (FORMAT csv, USE_TMP_FILE false);\n")
    for q in (f"PRAGMA import_database('{evil}')", f"IMPORT DATABASE '{evil}'",
              f"EXPLAIN ANALYZE PRAGMA import_database('{evil}')", "PRAGMA copy_database('memory', 'x')",
              f"SELECT 1; PRAGMA import_database('{evil}')"):
        r = _cli("sql", "--db", db, "--allow-read", allowed, q)
        assert r.exit_code == 1 and "not allowed in featstore sql" in r.text, (q, r.output)
        assert db.read_bytes() == before, q
    # a PRAGMA that only reads is refused too, and the refusal says what to use instead
    r = _cli("sql", "--db", db, "PRAGMA table_info('images')")
    assert r.exit_code == 1 and "pragma_table_info" in r.text, r.output
    r = _cli("sql", "--db", db, "SELECT count(*) AS n FROM pragma_table_info('images')")
    assert r.exit_code == 0 and "(1 row)" in r.output, r.output


def test_a_snapshot_folder_from_a_stranger_runs_none_of_its_sql(tmp_path):
    """Item 10b (before: `--db FOLDER` with a load.sql ran IMPORT DATABASE before any sandbox: its
    schema.sql copied /etc/hostname out and overwrote a user file, on `sql "SELECT 42"` and `export`)."""
    user = tmp_path / "thesis.txt"
    user.write_text("my thesis")
    leak = tmp_path / "leak.csv"
    schema = (f"COPY (SELECT * FROM read_text('/etc/hostname')) TO '{leak}' (FORMAT csv);\n"
              f"COPY (SELECT 'gone' AS x) TO '{user}' (FORMAT csv);\n")
    quiet = _evil_folder(tmp_path / "snapevil", schema)
    loud = _evil_folder(tmp_path / "snaploud", schema, f"COPY images FROM '/etc/passwd' (FORMAT csv);\n"
                                                     f"COPY (SELECT 1) TO '{user}';\n")
    for snap in (quiet, loud):
        for args in (("sql", "--db", snap, "SELECT 42 AS x"),
                     ("export", "--db", snap, "--parquet", tmp_path / f"out-{snap.name}")):
            r = _cli(*args)
            assert not leak.exists() and user.read_text() == "my thesis", (args, r.output)
            assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    # a load.sql that is not plain `COPY <table> FROM '<file in the folder>'` is refused in one line
    r = _cli("sql", "--db", loud, "SELECT 42 AS x")
    assert r.exit_code == 2 and len(_error_lines(r.output)) == 1 and "load.sql" in r.text, r.output


def test_a_real_snapshot_still_reads_as_the_store(tmp_path):
    """Item 10b, the other side: featstore's own snapshot reads (tables, embedding sets, views) without
    its SQL being run."""
    db = _tiny(tmp_path / "fs.duckdb")
    r = _cli("export", "--db", db, "--snapshot", tmp_path / "snap")
    assert r.exit_code == 0, r.output
    for q, want in (("SELECT count(*) AS n FROM images", "6"),
                    ("SELECT n_images FROM embedding_sets WHERE backbone = 'tiny'", "6"),
                    ("SELECT count(*) AS n FROM embeddings_d4", "6")):
        r = _cli("sql", "--db", tmp_path / "snap", "--format", "csv", q)
        assert r.exit_code == 0 and r.output.split() == [r.output.split()[0], want], (q, r.output)


@pytest.mark.parametrize("kind", ["csv", "parquet", "json", "memory", "md", "empty", "devnull", "text"])
def test_a_db_that_is_not_a_duckdb_store_is_refused(tmp_path, kind):
    """Item 14 (before: an existing .csv/.parquet/.json or :memory: opened as an in-memory database and
    `ingest` reported new images with rc 0 and nothing stored; md: tried a network install; a 0-byte
    file or /dev/null gave a traceback)."""
    (tmp_path / "a.png").write_bytes(_png(1))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\na.png,s,covid\n")
    db = {"csv": tmp_path / "x.csv", "parquet": tmp_path / "x.parquet", "json": tmp_path / "x.json",
          "memory": ":memory:", "md": "md:foo", "empty": tmp_path / "empty.duckdb", "devnull": "/dev/null",
          "text": tmp_path / "notes.duckdb"}[kind]
    content = {"csv": b"a,b\n1,2\n", "json": b'{"a": 1}\n', "empty": b"", "text": b"patient notes\n" * 10}
    if kind == "parquet":
        pl.DataFrame({"a": [1]}).write_parquet(db)
    elif kind in content:
        Path(db).write_bytes(content[kind])
    before = Path(db).read_bytes() if kind not in ("memory", "md", "devnull") else None
    for args in (("ingest", "--manifest", m, "--db", db, "--workers", "1"), ("sql", "--db", db, "SELECT 1 AS x"),
                 ("export", "--db", db, "--parquet", tmp_path / "exp"),
                 ("sweep", "synthetic_demo", "--db", db, "--workdir", tmp_path, "--trials", "1")):
        r = _cli(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)
        lines = _error_lines(r.output)
        assert len(lines) == 1 and "not a DuckDB store" in r.text, (args, r.output)
        if before is not None:
            assert Path(db).read_bytes() == before
    assert not list(tmp_path.glob("*.wal")) and not (tmp_path / "md:foo").exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_killed_export_never_reads_as_complete_and_the_next_overwrite_cleans_up(tmp_path, monkeypatch):
    """Item 13 (before: the manifest was written before the files moved, so a kill left it claiming every
    file; the hidden staging folder survived a later --overwrite)."""
    import featstore.export as E

    db = _tiny(tmp_path / "fs.duckdb")
    out = tmp_path / "exp"
    assert _cli("export", "--db", db, "--parquet", out).exit_code == 0
    first = _tree(out)
    real, calls = os.rename, [0]

    def killed(a, b):  # the process dies after two files have moved
        calls[0] += 1
        if calls[0] > 2:
            raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(E.os, "rename", killed)
    con = connect(db, read_only=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            E.export_parquet(con, out, overwrite=True)
    finally:
        con.close()
    monkeypatch.setattr(E.os, "rename", real)
    assert not (out / E.MANIFEST).exists(), "a killed export must not read as complete"
    r = _cli("export", "--db", db, "--parquet", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not [p for p in out.iterdir() if p.name.startswith(".featstore-export") or "partial" in p.name]
    assert _tree(out).keys() == first.keys()
    listed = __import__("json").loads((out / E.MANIFEST).read_text())
    assert all((out / f).stat().st_size == n for f, n in listed["files"].items())
    got = pl.read_parquet(out / "embeddings" / "**" / "*.parquet", hive_partitioning=True)
    assert got.height == listed["counts"]["embeddings"] == 6


def test_export_overwrite_needs_a_previous_export(tmp_path):
    """Item 13 (before: `--overwrite` into a folder with user files and no earlier export wrote into it)."""
    db = _tiny(tmp_path / "fs.duckdb")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("mine")
    r = _cli("export", "--db", db, "--parquet", out, "--overwrite")
    assert r.exit_code == 2 and "no featstore export" in r.text, r.output
    assert _tree(out) == {"thesis.txt": b"mine"}


@pytest.mark.parametrize("here", [False, True])
def test_demo_never_deletes_what_it_did_not_make(tmp_path, monkeypatch, here):
    """Item 11 (before: `demo --out DIR` removed DIR whole: DIR/thesis.txt and DIR/sub/ gone; with
    `--out .` every file of the current folder)."""
    import featstore.demo as D

    def stop(*a, **k):  # the demo's work is not what is tested: only what happens to the folder first
        raise RuntimeError("generate reached")
    monkeypatch.setattr(D, "generate", stop)
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("four years")
    (folder / "sub" / "data.csv").write_text("a,b\n")
    before = _tree(folder)
    if here:
        monkeypatch.chdir(folder)
    r = _cli("demo", "--out", "." if here else folder)
    assert r.exit_code == 2 and "did not make" in r.text, r.output
    assert _tree(folder) == before


def test_demo_replaces_its_own_files_only(tmp_path, monkeypatch):
    """Item 11: a folder a previous demo made is replaced (its files only); a file the user added there
    since stops the demo before anything is removed."""
    import featstore.demo as D

    def fake(data, *a, **k):  # a demo run that writes a few files (in DIR/data), then fails
        Path(data).mkdir(parents=True)
        (Path(data) / "m.csv").write_text("made")
        raise RuntimeError("stopped here")
    monkeypatch.setattr(D, "generate", fake)
    folder = tmp_path / "demo"
    r = _cli("demo", "--out", folder)
    assert isinstance(r.exception, RuntimeError) and (folder / "data" / "m.csv").exists()
    (folder / "data" / "mine.txt").write_text("mine")
    r = _cli("demo", "--out", folder)
    assert r.exit_code == 2 and "data/mine.txt" in r.text, r.output
    assert (folder / "data" / "m.csv").exists() and (folder / "data" / "mine.txt").exists()
    (folder / "data" / "mine.txt").unlink()
    r = _cli("demo", "--out", folder)  # its own files only: replaced
    assert isinstance(r.exception, RuntimeError) and (folder / "data" / "m.csv").read_text() == "made"


def _fake_report(monkeypatch, fail_at: str | None = None):
    """report.write_report's renderer replaced by one that writes the report's file names (the
    write-out path is what is tested, not the rendering)."""
    import itertools

    import featstore.report as R
    run = itertools.count(1)

    def render(con, out, *a, **k):
        names = ["dumbbell_seen_unseen.png", "headline.json", "report.html", "report.md"]
        i = next(run)
        for n in names:
            if n == fail_at:
                raise RuntimeError(f"failed at {n}")
            (out / n).write_text(f"new {n}" if n == "report.md" else f"run {i}: {n}")
        return dict(files=names)
    monkeypatch.setattr(R, "_write_report", render)
    return R


def test_report_never_overwrites_a_users_files(tmp_path, monkeypatch):
    """Item 12 (before: `report --out DIR` replaced a user's report.md / headline.json / figures of the
    same names)."""
    R = _fake_report(monkeypatch)
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    (out / "headline.json").write_text("{}")
    with pytest.raises(FileExistsError, match="report.md"):
        R.write_report(None, out)
    assert _tree(out) == {"report.md": b"my notes", "headline.json": b"{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]
    # a previous report's own files are replaced, a user's file beside them is kept
    (out / "report.md").unlink()
    (out / "headline.json").unlink()
    (out / "thesis.txt").write_text("mine")
    R.write_report(None, out)
    R.write_report(None, out)
    assert _tree(out)["thesis.txt"] == b"mine" and _tree(out)["report.md"] == b"new report.md"


def test_a_report_that_cannot_be_placed_writes_nothing(tmp_path, monkeypatch):
    """Item 12 (before: a report.html that is a folder stopped the report after 4 files were replaced)."""
    R = _fake_report(monkeypatch)
    out = tmp_path / "rep"
    R.write_report(None, out)
    (out / "report.html").unlink()
    (out / "report.html").mkdir()
    before = _tree(out)
    with pytest.raises(FileExistsError, match="report.html"):
        R.write_report(None, out)
    assert _tree(out) == before and (out / "report.html").is_dir()
    _fake_report(monkeypatch, fail_at="report.html")
    with pytest.raises(RuntimeError):
        R.write_report(None, out)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


class _Counting:
    """A store connection that counts the statements writing ingest_errors."""

    def __init__(self, con):
        self._con, self.n = con, 0

    def execute(self, q, *a, **k):
        self.n += "INTO ingest_errors" in q
        return self._con.execute(q, *a, **k)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_many_rejections_are_written_in_one_statement(tmp_path):
    """Item 16 (before: one INSERT ... ON CONFLICT per rejection: a 200,000-row manifest of missing files
    ran for more than 10 minutes after reaching 100%)."""
    from featstore import ingest as I

    (tmp_path / "a.png").write_bytes(_png(1))
    n = 3000
    rows = ["path,source,label", "a.png,s,covid"] + [f"missing/{i}.png,s{i % 3},covid" for i in range(n)]
    m = tmp_path / "m.csv"
    m.write_text("\n".join(rows) + "\n")
    con = connect(tmp_path / "fs.duckdb")
    try:
        counting = _Counting(con)
        rows_, pre = I.manifest_rows(m)
        rep = I.ingest_rows(counting, rows_, str(m), workers=1)
        assert rep.n_new_images == 1 and len(rep.errors) == n
        assert counting.n == 1  # one statement, whatever the number of rejections
        got = con.execute("SELECT count(*), count(DISTINCT file), min(row_number), max(row_number) "
                          "FROM ingest_errors WHERE reason = 'file not found'").fetchone()
        assert got == (n, n, 2, n + 1)
        # the same manifest again: the same rows updated (last_seen, ingest_run), none added
        rep = I.ingest_rows(counting, *I.manifest_rows(m)[:1], str(m), workers=1)
        assert counting.n == 2 and con.execute("SELECT count(*), count(DISTINCT ingest_run) FROM ingest_errors"
                                               ).fetchone() == (n, 1)
        assert con.execute("SELECT min(ingest_run) FROM ingest_errors").fetchone()[0] == rep.run_id
    finally:
        con.close()


def test_a_huge_cell_is_cut_in_the_reason_and_on_the_terminal(tmp_path):
    """Item 16 (before: a 10 MB label was echoed whole into the reason and the terminal)."""
    (tmp_path / "a.png").write_bytes(_png(1))
    big = "x" * 2_000_000
    m = tmp_path / "m.csv"
    m.write_text(f"path,source,label\na.png,s,{big}\n")
    db = tmp_path / "fs.duckdb"
    r = _run("ingest", "--manifest", m, "--db", db, "--workers", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stdout) + len(r.stderr) < 20_000 and "2,000,000 characters" in r.stderr
    con = connect(db, read_only=True)
    (reason,) = con.execute("SELECT reason FROM ingest_errors").fetchone()
    con.close()
    assert reason.startswith("unknown label 'xxx") and "(2,000,000 characters)" in reason and len(reason) < 1100


@pytest.fixture
def full_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs), returned with a function that fills it: needs root and mount
    rights, else skips (the write-out of `sql --out` is also tested by an injected error below)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")

    def fill():
        with open(d / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
    try:
        yield d, fill
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.slow
def test_commands_on_a_full_disk_open_the_store_and_fail_in_one_line(full_disk, tmp_path):
    """Item 17 (before: every read-write open recreated the embedding views, so on a full disk `ingest` and
    `duplicates` died with a TransactionException traceback before doing anything)."""
    disk, fill = full_disk
    db = disk / "fs.duckdb"
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    first = tmp_path / "first.csv"
    first.write_text("path,source,label\n" + "".join(f"{i}.png,s{i % 2},covid\n" for i in range(6)))
    assert _run("ingest", "--manifest", first, "--db", db, "--workers", "1").returncode == 0
    (tmp_path / "a.png").write_bytes(_png(99))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\na.png,s,covid\n")
    fill()
    for args in (("ingest", "--manifest", m, "--db", db, "--workers", "1"),
                 ("duplicates", "--db", db, "--workers", "1", "--sheet", tmp_path / "sheet.png"),
                 ("sql", "--write", "--db", db, "SELECT count(*) AS n FROM images")):
        r = _run(*args)
        assert "Traceback" not in r.stderr and "TransactionException" not in r.stderr, (args, r.stderr[-3000:])
        if args[0] == "sql":  # writes nothing: answers
            assert r.returncode == 0 and "6" in r.stdout, r.stderr
        else:
            lines = [x for x in r.stderr.splitlines() if "disk full" in x]
            assert r.returncode in (1, 3) and len(lines) == 1, (args, r.stderr[-3000:])
    (disk / "filler").unlink()
    con = connect(db, read_only=True)  # intact
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 6
    con.close()


def test_sql_out_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    """Item 17 (before: `sql --out existing.csv` on a full disk replaced the old file with a truncated one):
    the write fails midway (injected ENOSPC after part of the file), the old file stays whole."""
    import errno

    import polars

    db = _tiny(tmp_path / "fs.duckdb")
    out = tmp_path / "answer.csv"
    out.write_text("the previous answer\n")
    real = polars.DataFrame.write_csv

    def half(self, file=None, *a, **k):
        if file is None:
            return real(self, file, *a, **k)
        Path(file).write_text(real(self)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(polars.DataFrame, "write_csv", half)
    r = _cli("sql", "--db", db, "--out", out, "SELECT * FROM images")
    assert r.exit_code != 0 and "No space left on device" in r.text, r.output
    assert out.read_text() == "the previous answer\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.csv", "fs.duckdb"]


MARKUP = "[/x]"  # rich reads it as a closing tag: a crash wherever data was printed as markup


def test_sql_prints_markup_and_odd_types_as_they_are(tmp_path):
    """Item 15 (before: `SELECT '[/x]'` crashed `sql` (rich MarkupError), [bold]..[/bold] vanished from
    names, and INTERVAL, UNION, BLOB, VARIANT, BIGNUM, MAP columns crashed polars)."""
    db = _tiny(tmp_path / "fs.duckdb")
    q = ("SELECT '[/x]' AS \"[bold]c[/bold]\", '[bold]f.png[/bold]' AS f, INTERVAL 3 DAY AS i, "
         "union_value(k := 1)::UNION(k INT, s VARCHAR) AS u, '\\xAA'::BLOB AS b, 1::VARIANT AS v, "
         "12345678901234567890123::BIGNUM AS n, '{\"a\": 1}'::JSON AS j, MAP {'a': 1} AS m, "
         "[INTERVAL 1 HOUR] AS li")
    r = _cli("sql", "--db", db, q)
    assert r.exit_code == 0, r.output
    for text in ("[bold]c[/bold]", "[/x]", "[bold]f.png[/bold]", "3 days", "12345678901234567890123", "\\xaa"):
        assert text in r.output, (text, r.output)
    r = _cli("sql", "--db", db, "--format", "csv", q)
    assert r.exit_code == 0 and r.output.splitlines()[1].startswith("[/x],[bold]f.png[/bold],3 days,1,\\xaa,1,"), \
        r.output
    assert _cli("sql", "--db", db, "--format", "json", q).exit_code == 0
    for name in ("a.parquet", "a.csv", "a.json"):
        r = _cli("sql", "--db", db, "--out", tmp_path / name, q)
        assert r.exit_code == 0, (name, r.output)
    got = pl.read_parquet(tmp_path / "a.parquet")
    assert got["i"][0] == "3 days" and got["b"][0] == b"\xaa" and got["[bold]c[/bold]"][0] == MARKUP


def test_csv_header_cells_are_neutralised(tmp_path):
    """Item 15 (before: a source named `=1+2` became a formula in a PIVOT's CSV header)."""
    db = _tiny(tmp_path / "fs.duckdb", sources=("=1+2", "@SUM(A1)", "b"), n=2)
    r = _cli("sql", "--db", db, "--format", "csv",
             "PIVOT (SELECT source, label FROM images) ON source USING count(*) GROUP BY label ORDER BY label")
    assert r.exit_code == 0, r.output
    header = r.output.splitlines()[0].split(",")
    assert header == ["label", "'=1+2", "'@SUM(A1)", "b"], header


def test_neighbors_and_masks_print_a_source_named_like_markup(tmp_path):
    """Item 15 (before: a source named `[/x]` crashed `neighbors --summary`, and `masks` after storing
    its masks, exit 1)."""
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\n" + "".join(f"{i}.png,{MARKUP if i % 2 else 'b'},covid\n" for i in range(6)))
    db = tmp_path / "fs.duckdb"
    assert _cli("ingest", "--manifest", m, "--db", db, "--workers", "1").exit_code == 0
    r = _cli("masks", "--db", db, "--method", "classical-v1", "--workers", "1")
    assert r.exit_code == 0 and MARKUP in r.output, r.output
    con = connect(db)
    t = __import__("featstore.store", fromlist=["x"]).ensure_embedding_table(con, 4)
    con.execute(f"INSERT INTO {t} SELECT image_id, 'tiny', 'none', 'original', 4, "
                f"[hash(image_id) % 7, 1, 2, 3]::FLOAT[4], 1, now() FROM images")
    con.close()
    r = _cli("neighbors", "--summary", "--db", db, "--k", "2", "--exact")
    assert r.exit_code == 0 and MARKUP in r.output, r.output


def test_odd_source_names_are_valid_mlflow_metric_names(tmp_path):
    """Item 15 (before: a source named with `//` crashed the sweep in MLflow with 0 rows: metric names
    may not be changed by path normalisation)."""
    from featstore import results as R
    from featstore.track import Tracker

    odd = ["a//b", "../x", "/x", "x/", "./x", "[/x]", "=1+2", "a/./b", "plain"]
    names = {R.mlflow_name("auc", "unseen", s): s for s in odd}
    assert len(names) == len(odd)  # none collapses onto another
    t = Tracker("odd", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rid = t.run("unit", metrics={n: i / 10 for i, n in enumerate(names)}, params={"held_out": ",".join(odd)})
    run = t.client.get_run(rid)
    assert set(run.data.metrics) == set(names) and run.data.params["held_out"] == ",".join(odd)


def test_report_markdown_cannot_link_or_fetch():
    """Item 15 (before: Markdown link and image syntax in data passed through report.md, so a viewer
    would fetch a remote image or offer a javascript: link)."""
    from markdown_it import MarkdownIt

    from featstore.report import _md, markdown_table

    evil = ["![x](https://evil.example/track.png)", "[click](javascript:alert(1))", "<img src=x>",
            "[a]: https://evil.example", "`code`", "a|b"]
    md = MarkdownIt("commonmark").enable("table")
    for text in evil:
        out = md.render(_md(text))
        assert "<img" not in out and "<a " not in out and "<code" not in out, (text, out)
        assert md.renderInline(_md(text)).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">") \
            .replace("&quot;", '"') == text
    table = md.render(markdown_table(pl.DataFrame({"source": evil, "auc": [0.5] * len(evil)})))
    assert "<img" not in table and "<a " not in table and table.count("<tr>") == len(evil) + 1


def test_map_legend_keeps_a_source_named_proto(tmp_path):
    """Item 15 (before: a source named `__proto__` showed as `[object Object]` in the map's legend: the
    counts lived in a plain object). The report's own script runs in node on a minimal page."""
    import json
    import re
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from importlib.resources import files

    html = (files("featstore") / "templates" / "report.html.j2").read_text(encoding="utf-8")
    script = re.findall(r"<script>(.*?)</script>", html, re.S)[-1]
    data = {"points": [{"x": 0.1, "y": 0.2, "id": "a", "source": "__proto__", "label": "covid"},
                       {"x": 0.3, "y": 0.4, "id": "b", "source": "constructor", "label": "covid"},
                       {"x": 0.5, "y": 0.6, "id": "c", "source": "__proto__", "label": "non_covid"}],
            "palettes": {"source": {"__proto__": "#111111", "constructor": "#222222"},
                         "label": {"covid": "#333333", "non_covid": "#444444"}}}
    page = """
    const texts = [], fills = [];
    function el(sel) { return { hidden: false, style: {}, textContent: "", children: [],
      appendChild(c) { this.children.push(c); if (c.text !== undefined) texts.push(c.text); },
      querySelector(s) { return el(s); }, addEventListener() {}, getBoundingClientRect() { return {left: 0, top: 0}; },
      classList: { toggle() {} } }; }
    const ctx = { clearRect() {}, beginPath() {}, arc() {}, fill() {}, stroke() {},
                  set fillStyle(v) { fills.push(v); }, get fillStyle() { return ""; } };
    const root = el("root");
    root.querySelector = (s) => s === ".imap-data" ? { textContent: DATA } :
                                s === "canvas" ? Object.assign(el(s), { width: 100, height: 100, getContext: () => ctx }) :
                                s === ".imap-legend" ? LEGEND : el(s);
    root.querySelectorAll = () => [];
    const LEGEND = el("legend");
    globalThis.window = { addEventListener() {} };
    globalThis.document = { querySelectorAll: () => [root], createElement: (t) => el(t),
                            createTextNode: (t) => ({ text: t }) };
    """.replace("DATA", json.dumps(json.dumps(data)))
    (tmp_path / "page.js").write_text(page + script + "\nconsole.log(JSON.stringify({texts, fills}));")
    r = subprocess.run([node, tmp_path / "page.js"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["texts"] == ["__proto__ (2)", "constructor (1)"]
    assert got["fills"] == ["#111111", "#222222", "#111111"]


# --- item 18: smaller holes -------------------------------------------------------------------------

_JOURNAL = r"""
import logging, sys
import optuna
from featstore.sweep.fit import journal
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
optuna.logging.enable_propagation()
study = optuna.create_study(study_name="s", storage=journal(sys.argv[1]))
study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
print("trials", len(study.trials))
"""


@pytest.mark.slow
def test_a_journal_lock_left_by_a_dead_process_is_taken_at_once(tmp_path):
    """Item 18 (before: a leftover optuna/<study>.journal.lock stalled a resumed sweep 30 s with three
    "forcibly releasing" warnings; one whose link points nowhere made Optuna's loop spin for ever). The
    lock names a process that has exited: it is taken without the grace-period wait, whose warnings
    would show; the timeout is only a safety net against the old spin."""
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "optuna" / "s.journal"
    path.parent.mkdir()
    os.symlink(f"{path}#featstore-holder={dead.pid}@{socket.gethostname()}", f"{path}.lock")
    r = subprocess.run([sys.executable, "-c", _JOURNAL, str(path)], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and "trials 2" in r.stdout, r.stdout + r.stderr
    assert "lock" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert not os.path.lexists(f"{path}.lock")
    # the lock names its holder: this process
    from featstore.journal_lock import HolderSymlinkLock

    lock = HolderSymlinkLock(str(path))
    assert lock.acquire() and lock.holder() == (os.getpid(), socket.gethostname())
    lock.release()


@pytest.mark.parametrize("name, value", [("FEATSTORE_WRITE_WAIT_S", "soon"), ("FEATSTORE_SWEEP_GRACE_S", "-3"),
                                         ("FEATSTORE_SWEEP_GRACE_S", "1.5"), ("FEATSTORE_SWEEP_HEARTBEAT_S", "nan")])
def test_bad_timing_variables_are_one_line(tmp_path, name, value):
    """Item 18 (before: a bad FEATSTORE_WRITE_WAIT_S / FEATSTORE_SWEEP_GRACE_S crashed with a traceback
    (the latter at import)). Checked before the model libraries load: the answer takes well under a second."""
    db = _tiny(tmp_path / "fs.duckdb")
    r = _run("sweep", "synthetic_demo", "--db", db, "--workdir", tmp_path, "--trials", "1",
             env_extra={name: value})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and name in lines[0] and repr(value) in lines[0], r.stderr


def test_masks_print_ten_percent_lines_into_a_log(tmp_path):
    """Item 18 (before: `masks` with stderr not a terminal printed no 10% lines: progress came only
    when every mask was made)."""
    n = 40
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    m = tmp_path / "m.csv"
    m.write_text("path,source,label\n" + "".join(f"{i}.png,s,covid\n" for i in range(n)))
    db = tmp_path / "fs.duckdb"
    assert _run("ingest", "--manifest", m, "--db", db, "--workers", "1").returncode == 0
    r = _run("masks", "--db", db, "--method", "classical-v1", "--workers", "2")
    assert r.returncode == 0, r.stderr
    shares = [int(x.split("(")[1].split("%")[0]) for x in r.stderr.splitlines() if x.startswith("masks: ")]
    assert len(set(shares)) >= 6 and shares[-1] == 100, r.stderr


def test_too_many_folds_name_the_real_cause():
    """Item 18 (before: `folds: 100000` blamed near-duplicate links when there were none)."""
    from featstore.split import make_meta, mixed

    meta = make_meta(["a", "b"] * 10, [0, 1] * 10)
    with pytest.raises(ValueError) as e:
        mixed(meta, folds=100000)
    assert "only 20 images" in str(e.value) and "near-duplicate" not in str(e.value)


_REAPER = r"""
import ctypes, json, os, signal, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans become ours
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

def children(pid):
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except OSError:
            pass
    return out

import select
while len(children(p.pid)) < 2:  # the DataLoader workers are up
    if p.poll() is not None:
        print(json.dumps({"error": "embed ended first", "stderr": p.stderr.read()[-2000:]}))
        sys.exit(0)
    select.select([], [], [], 0.01)
kids = children(p.pid)
os.kill(p.pid, signal.SIGKILL)
p.wait()
ends, polls = {}, 0
while set(kids) - set(ends):  # every orphaned worker, reaped as it ends: how it ended
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0:  # none ended yet
        polls += 1
        if polls > 12000:  # a safety net (about 2 min), not a measure: what still lives is reported, then killed
            for k in set(kids) - set(ends):
                ends[k] = ("survived", 0)
                os.kill(k, signal.SIGKILL)
            break
        select.select([], [], [], 0.01)
        continue
    if pid in kids and pid not in ends:  # (a survivor killed by the safety net stays "survived")
        ends[pid] = ("signal", os.WTERMSIG(status)) if os.WIFSIGNALED(status) else ("exit", os.WEXITSTATUS(status))
for k in children(os.getpid()):  # anything else the embed left: not this test's subject, but not left running
    os.kill(k, signal.SIGKILL)
print(json.dumps({"ends": list(ends.values()), "n": len(kids)}))
"""


@pytest.mark.slow
def test_dataloader_workers_die_with_a_killed_embed(tmp_path):
    """Item 18 (before: the DataLoader workers of a killed `embed` lived on until their own watchdog
    noticed, ~6 s later, and then exited normally). Event-driven: the test process adopts the orphans
    (a subreaper) and reads how each ended: killed by the kernel when its parent died."""
    import json

    n = 200
    data = tmp_path / "data"
    data.mkdir()
    for i in range(n):
        (data / f"{i}.png").write_bytes(_save(np.random.default_rng(i).integers(0, 256, (128, 128), dtype=np.uint8),
                                              "PNG"))
    m = data / "m.csv"
    m.write_text("path,source,label\n" + "".join(f"{i}.png,s,covid\n" for i in range(n)))
    db = tmp_path / "fs.duckdb"
    assert _run("ingest", "--manifest", m, "--db", db, "--workers", "2").returncode == 0
    r = subprocess.run([sys.executable, "-c", _REAPER, sys.executable, "-m", "featstore.cli", "embed", "--backbone",
                        "pixelstats", "--db", db, "--workers", "2", "--batch-size", "1"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in got, got
    assert got["n"] >= 2 and len(got["ends"]) == got["n"]
    # SIGKILL from the kernel (PR_SET_PDEATHSIG); exit 1: a worker that saw its parent gone at start
    assert all(e in (["signal", 9], ["exit", 1]) for e in got["ends"]), got
