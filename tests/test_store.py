"""The store's one transaction layer (`store.transaction`): all of a block or none of it, whatever
ends the block, and no module writing BEGIN/COMMIT by hand."""
import re
import shutil
from pathlib import Path

import duckdb
import pytest

from featstore.store import SCHEMA_VERSION, NestedTransactionError, connect, migrate, schema_version, transaction

PKG = Path(__file__).resolve().parents[1] / "featstore"


@pytest.fixture
def db():
    c = duckdb.connect(":memory:")
    c.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    c.execute("INSERT INTO t VALUES (1)")
    yield c
    c.close()


def _rows(c) -> list[int]:
    return [x for (x,) in c.execute("SELECT x FROM t ORDER BY x").fetchall()]


def _no_transaction_open(c) -> bool:
    try:
        c.execute("BEGIN")
    except duckdb.TransactionException:
        return False
    c.execute("ROLLBACK")
    return True


def test_a_block_that_ends_normally_is_committed(db):
    with transaction(db) as c:
        c.execute("INSERT INTO t VALUES (2)")
        c.execute("DELETE FROM t WHERE x = 1")
    assert _rows(db) == [2]
    assert _no_transaction_open(db)


@pytest.mark.parametrize("kind", [ValueError, KeyboardInterrupt, SystemExit])
def test_anything_raised_inside_leaves_the_table_as_it_was(db, kind):
    error = kind(3)  # made here: a parameter object would keep this test's frames (and `db`) alive
    with pytest.raises(kind) as e:
        with transaction(db):
            db.execute("INSERT INTO t VALUES (2)")
            db.execute("DELETE FROM t WHERE x = 1")
            raise error
    assert e.value is error  # the caller's own error, re-raised
    assert _rows(db) == [1]
    assert _no_transaction_open(db)


def test_a_failing_statement_rolls_back_the_earlier_ones(db):
    with pytest.raises(duckdb.ConstraintException):
        with transaction(db):
            db.execute("INSERT INTO t VALUES (2)")
            db.execute("INSERT INTO t VALUES (1)")  # primary key
    assert _rows(db) == [1]
    assert _no_transaction_open(db)


def test_nesting_is_refused_and_leaves_the_outer_transaction_alone(db):
    with transaction(db):
        db.execute("INSERT INTO t VALUES (2)")
        with pytest.raises(NestedTransactionError, match="already open"):
            with transaction(db):
                db.execute("INSERT INTO t VALUES (3)")  # never runs
        db.execute("INSERT INTO t VALUES (4)")
    assert _rows(db) == [1, 2, 4]


def test_a_nested_block_left_uncaught_rolls_back_the_outer_one(db):
    with pytest.raises(NestedTransactionError):
        with transaction(db):
            db.execute("INSERT INTO t VALUES (2)")
            with transaction(db):
                pass
    assert _rows(db) == [1]
    assert _no_transaction_open(db)


def test_a_transaction_begun_by_hand_is_not_taken_over(db):
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(NestedTransactionError):
        with transaction(db):
            pass
    db.execute("COMMIT")  # still the caller's to end
    assert _rows(db) == [1, 2]


class _CommitFails:
    """A connection whose COMMIT fails as DuckDB's does on a full disk: DuckDB has already ended the
    transaction when the error arrives."""

    def __init__(self, con):
        self.con = con

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.con.execute("ROLLBACK")
            raise duckdb.TransactionException("TransactionContext Error: Failed to commit: No space left on device")
        return self.con.execute(sql, *args)


def test_a_failed_commit_raises_its_own_error_not_a_rollback_one(db):
    with pytest.raises(duckdb.TransactionException) as e:
        with transaction(_CommitFails(db)) as c:
            c.execute("INSERT INTO t VALUES (2)")
    assert "No space left on device" in str(e.value) and "rollback" not in str(e.value)
    assert _rows(db) == [1]
    assert _no_transaction_open(db)


# --- the sites ---------------------------------------------------------------------------------------

def test_no_module_writes_begin_or_commit_by_hand():
    """Every BEGIN/COMMIT/ROLLBACK goes through store.transaction (two sites once had no rollback)."""
    stmt = re.compile(r"""execute\(\s*["'](BEGIN|COMMIT|ROLLBACK)\b""", re.I)
    found = {p.name for p in PKG.glob("*.py") if p.name != "store.py" and stmt.search(p.read_text())}
    assert found == set()


def test_a_failed_migration_leaves_the_store_at_its_version(tmp_path, monkeypatch):
    import featstore.store as S

    con = connect(tmp_path / "fs.duckdb")
    con.close()
    sql = tmp_path / "sql"
    shutil.copytree(S.sql_dir(), sql)
    (sql / "migrations" / f"{SCHEMA_VERSION + 1:03d}_broken.sql").write_text(
        "CREATE TABLE half_made (x INTEGER); SELECT no_such_column FROM images;")
    monkeypatch.setattr(S, "sql_dir", lambda: sql)
    with pytest.raises(duckdb.BinderException) as failed:  # kept: its traceback holds connect()'s frame
        connect(tmp_path / "fs.duckdb")
    # the failed open closed its connection: another configuration may open the file (before: "different
    # configuration than existing connections" while the error was held, and other processes were locked out)
    duckdb.connect(str(tmp_path / "fs.duckdb"), read_only=True).close()
    del failed
    c = duckdb.connect(str(tmp_path / "fs.duckdb"))
    try:
        assert schema_version(c) == SCHEMA_VERSION
        assert c.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'half_made'").fetchone()[0] == 0
        (sql / "migrations" / f"{SCHEMA_VERSION + 1:03d}_broken.sql").write_text("CREATE TABLE made (x INTEGER);")
        assert migrate(c) == SCHEMA_VERSION + 1
    finally:
        c.close()


def test_an_interrupted_ingest_stores_nothing_and_leaves_no_transaction_open(con, synth_manifest, monkeypatch):
    """Before: only Exception rolled back; a Ctrl-C left the ingest's transaction open on the connection."""
    from featstore import ingest as I

    rows, _ = I.manifest_rows(synth_manifest)
    rows = list(rows)
    I.ingest_rows(con, rows[:10], str(synth_manifest), workers=1)
    before = con.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM occurrences), "
                         "(SELECT count(*) FROM ingest_runs)").fetchone()

    def interrupted(c):
        raise KeyboardInterrupt

    monkeypatch.setattr(I, "canonical_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        I.ingest_rows(con, rows, str(synth_manifest), workers=1)
    assert _no_transaction_open(con)
    assert con.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM occurrences), "
                       "(SELECT count(*) FROM ingest_runs)").fetchone() == before


def test_registered_rows_are_gone_after_the_block_even_when_it_fails(tmp_path):
    import duckdb
    import pyarrow as pa

    from featstore.store import registered

    con = connect(tmp_path / "fs.duckdb")
    with registered(con, "_ids", pa.table({"image_id": ["a", "b"]})):
        assert con.execute("SELECT count(*) FROM _ids").fetchone() == (2,)
    with pytest.raises(ZeroDivisionError):
        with registered(con, "_ids", pa.table({"image_id": ["c"]})):
            1 / 0
    with pytest.raises(duckdb.CatalogException):
        con.execute("SELECT * FROM _ids")


@pytest.mark.parametrize("value, setting", [("2GB", "1.8 GiB"), ("512MiB", "512.0 MiB"), (" 1.5 gb ", "1.3 GiB")])
def test_the_duckdb_memory_limit_comes_from_the_environment(tmp_path, monkeypatch, value, setting):
    default = connect(tmp_path / "a.duckdb").execute("SELECT current_setting('memory_limit')").fetchone()[0]
    monkeypatch.setenv("FEATSTORE_DUCKDB_MEMORY", value)
    con = connect(tmp_path / "a.duckdb")
    assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == setting != default


@pytest.mark.parametrize("value", ["lots", "3", "0B", "1B", "10MB", "-1GB", "1GB'; DROP TABLE images; --"])
def test_a_bad_duckdb_memory_limit_is_one_line_naming_the_variable(tmp_path, monkeypatch, value):
    from typer.testing import CliRunner

    from featstore.cli import app
    from featstore.errors import UserError

    connect(tmp_path / "a.duckdb").close()
    monkeypatch.setenv("FEATSTORE_DUCKDB_MEMORY", value)
    with pytest.raises(UserError, match="FEATSTORE_DUCKDB_MEMORY=.*(not a memory size|below 64MB)"):
        connect(tmp_path / "a.duckdb")
    r = CliRunner().invoke(app, ["sql", "SELECT 1", "--db", str(tmp_path / "a.duckdb")])
    assert r.exit_code == 2 and "FEATSTORE_DUCKDB_MEMORY" in r.output and "Traceback" not in r.output
    monkeypatch.delenv("FEATSTORE_DUCKDB_MEMORY")
    assert connect(tmp_path / "a.duckdb").execute("SELECT count(*) FROM images").fetchone() == (0,)  # untouched
