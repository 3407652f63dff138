"""The DuckDB file: open it, create or migrate the schema, manage embedding tables; and the SQL the
stages run (their reads and writes, the Parquet export). With the read API (api.py), the user-SQL sandbox
(query.py) and the result contract (results.py) it is the store layer: with sql/, the only place that holds
SQL (tests/test_architecture.py checks it)."""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import duckdb

from featstore.errors import disk_full  # noqa: F401 - where it was first offered

SCHEMA_VERSION = 9  # schema.sql is 1; sql/migrations/NNN_*.sql add the rest
DEFAULT_DB = "featstore.duckdb"


class StoreBusyError(RuntimeError):
    """Another process holds the DuckDB write lock."""


class NestedTransactionError(RuntimeError):
    """`transaction` entered while the connection already has one open (DuckDB has no nesting)."""


@contextmanager
def transaction(con):
    """BEGIN; COMMIT when the block ends normally; ROLLBACK on any exception (KeyboardInterrupt
    included) and re-raise it. The COMMIT is outside the rollback: a COMMIT that fails (disk full
    writing the WAL) has already ended the transaction in DuckDB, and a ROLLBACK after it would only
    raise "no transaction is active" over the real error. Nesting is refused, not flattened: an inner
    block's COMMIT would otherwise commit the outer one's work early."""
    if in_transaction(con):  # asked first: a refused BEGIN would abort the open transaction in DuckDB
        raise NestedTransactionError("a store transaction is already open on this connection; "
                                     "nested transactions are not supported")
    con.execute("BEGIN")
    try:
        yield con
    except BaseException:
        rollback_quietly(con)
        raise
    con.execute("COMMIT")


def in_transaction(con) -> bool:
    """Whether an explicit transaction is open: outside one every statement is its own transaction
    with a new id; inside, they share it. DuckDB has no flag to ask."""
    q = "SELECT txid_current()"
    return con.execute(q).fetchall() == con.execute(q).fetchall()


def rollback_quietly(con) -> None:
    """Roll back the open transaction; if DuckDB already ended it (a fatal I/O error, a failed
    COMMIT), the error being handled is the one to report, not this one."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def sql_dir() -> Path:
    """The schema, migrations and example queries: package data (in the repo, featstore/sql is a link
    to the top-level sql/ that users read, so there is one copy)."""
    return resources.files("featstore") / "sql"  # a Path: featstore installs as files, never zipped


def default_db_path() -> Path:
    env = os.environ.get("FEATSTORE_DB")
    if env is not None and not env.strip():
        raise FileNotFoundError(_EMPTY_ENV)
    return Path(env or DEFAULT_DB)


_EMPTY_ENV = ("FEATSTORE_DB is set but empty: unset it, or set it to a store file "
              f"(e.g. FEATSTORE_DB={DEFAULT_DB})")


def _check_path(path: Path) -> None:
    env = os.environ.get("FEATSTORE_DB")
    # typer turns FEATSTORE_DB="" into Path(""), i.e. "."
    if env is not None and not env.strip() and str(path) in (".", env):
        raise FileNotFoundError(_EMPTY_ENV)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a featstore file (nor a snapshot folder made by "
                                f"`featstore export --snapshot`)")


class NotAStoreError(ValueError):
    """--db names something that is not a DuckDB store (a data file, :memory:, md:, a device)."""


_DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq", ".json", ".ndjson", ".jsonl", ".arrow", ".feather",
                  ".xlsx", ".xls", ".sqlite", ".sqlite3")


def check_store_file(path: Path) -> None:
    """Refuse what DuckDB would open as something other than a store file: `:memory:` and `md:` or other
    URLs (an in-memory or remote database: nothing would be stored), names of data files (DuckDB opens
    an existing .csv/.parquet/.json as an in-memory database reading it), files that are not a DuckDB
    file (header magic "DUCK" at byte 8) and anything that is not a regular file (/dev/null)."""
    text = str(path)
    why = None
    if text.startswith(":") or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", text):
        why = "an in-memory or remote database name, where nothing would be stored"
    elif os.path.lexists(path):
        try:
            st = path.stat()
        except OSError as e:
            why = f"it cannot be read ({e.strerror})"
        else:
            import stat as S

            if not S.S_ISREG(st.st_mode):
                why = "not a regular file"
            elif st.st_size == 0:
                why = "an empty file (0 bytes)"
            else:
                try:
                    with open(path, "rb") as f:
                        head = f.read(12)
                except OSError as e:
                    why = f"it cannot be read ({e.strerror})"
                else:
                    if head[8:12] != b"DUCK":
                        why = "this file is not a DuckDB database"
    elif path.suffix.lower() in _DATA_SUFFIXES:
        why = f"a {path.suffix} name is a data file's, not a store's (stores are .duckdb files)"
    if why:
        raise NotAStoreError(f"--db {text} is not a DuckDB store: {why}")


def busy_message(path, error: Exception, read_only: bool) -> str:
    """Who holds the store, as far as DuckDB's lock error tells: a read-only open only fails while a
    writer holds it; a read-write open fails for readers too, and DuckDB then adds that a read-only
    open would work (the conflicting lock is a shared one)."""
    text = str(error)
    m = re.search(r"PID (\d+)", text)
    who = f"another process (pid {m.group(1)})" if m else "another process"
    if read_only or ("Conflicting lock" in text and "read-only mode" not in text):
        what = f"open for writing in {who}; wait for it to finish"
    elif "read-only mode" in text:
        what = (f"open read-only in {who} (a notebook, `featstore sql`, a report?), and a writer needs every "
                f"reader to close it; close it and run this again")
    else:
        what = f"open in {who} (a writer, or a reader that blocks writers); wait for it to finish or close it"
    return f"the store {path} is {what}. DuckDB said: {text}"


MEMORY_ENV = "FEATSTORE_DUCKDB_MEMORY"
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*(B|[KMGT]i?B)", re.IGNORECASE)


def _memory_limit(con) -> None:
    """DuckDB's memory limit from FEATSTORE_DUCKDB_MEMORY (e.g. 2GB), when set, for a store file (over the
    limit DuckDB spills into `<store>.tmp` beside it, and removes that). DuckDB's own default is 80 % of the
    machine's memory, and it keeps written pages cached up to it: ingesting 1M 1024-d vectors peaked at
    8.1 GiB by default, 2.3 GiB under 2GB, and took no longer (benchmarks/RESULTS.md, scale.py)."""
    from featstore.errors import UserError

    raw = os.environ.get(MEMORY_ENV, "").strip()
    if not raw:
        return
    m = _MEMORY.fullmatch(raw)
    if not m:
        raise UserError(f"{MEMORY_ENV}={raw[:40]!r} is not a memory size such as 2GB or 512MB; unset it for "
                        "DuckDB's default (80 % of this machine's memory)")
    unit = m.group(2).upper()
    size = float(m.group(1)) * (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0])
    if size < 64e6:  # below this the store's own queries run out of memory, later and less clearly
        raise UserError(f"{MEMORY_ENV}={raw!r} is below 64MB, too little for DuckDB to run the store's queries; "
                        "unset it for DuckDB's default (80 % of this machine's memory)")
    try:
        con.execute(f"SET memory_limit = '{raw}'")
    except duckdb.Error as e:
        if isinstance(e, duckdb.InvalidInputException) and "locked" in str(e).lower():
            return  # a sandboxed process (featstore.query.sandbox) keeps its limit
        raise UserError(f"{MEMORY_ENV}={raw!r}: {str(e).splitlines()[0]}") from e


def connect(db: str | os.PathLike | None = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the store; create/migrate the schema unless read-only."""
    path = Path(db) if db is not None else default_db_path()
    if path.is_dir() and (path / "load.sql").exists():
        return open_snapshot(path)
    _check_path(path)
    check_store_file(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"no featstore at {path} (run `featstore ingest` first, or pass --db)")
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            raise StoreBusyError(busy_message(path, e, read_only)) from e
        raise
    # never let a Python variable named like a table shadow it (DuckDB replacement scans)
    try:
        con.execute("SET python_enable_replacements = false")
    except duckdb.InvalidInputException:  # settings locked by a sandbox (featstore.query.sandbox) in this
        pass  # process; it turned external access off, and replacement scans with it
    try:
        _memory_limit(con)
    except BaseException:
        con.close()
        raise
    if not read_only:
        try:
            migrate(con)
        except BaseException:
            con.close()  # a failed migration must not leave the file open (and locked) in this process
            raise
    return con



def open_for_command(db=None, read_only: bool = False, must_exist: bool = False,
                     advice: bool = True) -> duckdb.DuckDBPyConnection:
    """connect() for a command: a missing path, a folder or a busy store is a UserError (one line).
    must_exist: commands that need ingested images refuse a missing store rather than create it empty.
    advice: a read-only open of a busy store suggests reading a snapshot meanwhile."""
    from featstore.errors import UserError

    try:
        if must_exist:
            path = Path(db) if db is not None else default_db_path()
            if not path.exists():
                raise UserError(f"no featstore at {path}: run `featstore ingest` first "
                                f"(or pass --db / set FEATSTORE_DB to an existing store)")
        return connect(db, read_only=read_only)
    except StoreBusyError as e:
        tip = ("\nMeanwhile a snapshot taken while the store was free can be read: `featstore export --snapshot "
               "DIR` (when idle), then --db DIR." if read_only and advice else "")
        raise UserError(str(e) + tip) from e
    except (FileNotFoundError, NotAStoreError, SnapshotError) as e:
        raise UserError(str(e)) from e


class SnapshotError(ValueError):
    """A snapshot folder featstore will not read: its load.sql is not what `featstore export --snapshot`
    writes."""


_LOAD_LINE = re.compile(r"""COPY\s+("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_]*)\s+FROM\s+'((?:[^']|'')*)'"""
                        r"""\s*\(\s*FORMAT\s+'?parquet'?\s*\)\s*;?""", re.I)


def snapshot_files(path: Path, known: set[str]) -> list[tuple[str, Path]]:
    """(table, Parquet file) for each table of a snapshot, read from its load.sql without running
    it: every statement must be DuckDB's plain `COPY <table> FROM '<file>.parquet' (FORMAT parquet)`
    naming a featstore table (`known`, or an embedding table) and a regular file in the folder
    itself; anything else is refused."""
    load = path / "load.sql"
    if load.stat().st_size > 1 << 20:
        raise SnapshotError(f"{load}: too large for the load.sql of a featstore snapshot")
    try:
        statements = duckdb.extract_statements(load.read_text(encoding="utf-8"))
    except (duckdb.Error, UnicodeDecodeError) as e:
        raise SnapshotError(f"{load}: not the load.sql of a featstore snapshot ({str(e).splitlines()[0]})") from e
    out = []
    for st in statements:
        q = " ".join(st.query.split())
        m = _LOAD_LINE.fullmatch(q)
        if m is None:
            raise SnapshotError(f"{load}: not a featstore snapshot, it holds `{q[:80]}` (featstore reads only "
                                f"`COPY <table> FROM '<file>' (FORMAT parquet)` lines; nothing of it was run)")
        table = m.group(1).strip('"').replace('""', '"')
        if table not in known and not re.fullmatch(r"embeddings_d\d+", table):
            raise SnapshotError(f"{load}: table {table!r} is not a featstore table; nothing of it was run")
        f = path / Path(m.group(2).replace("''", "'")).name  # the folder may have moved since the export
        if f.is_symlink() or not f.is_file():
            raise SnapshotError(f"{load}: {f} is not a file in the snapshot folder; nothing of it was run")
        out.append((table, f))
    return out


def open_snapshot(path: Path) -> duckdb.DuckDBPyConnection:
    """A snapshot (`featstore export --snapshot DIR`: DuckDB's EXPORT DATABASE as Parquet) loaded
    into memory in bulk. Sweep workers read this, so none waits on the store's single writer;
    writes go nowhere. Its schema.sql and load.sql are never run (a folder from someone else could
    hold any statement): the schema is featstore's own, and each table's Parquet file is read by
    pyarrow and inserted, so no SQL from the folder executes and DuckDB touches no file."""
    import pyarrow.parquet as pq

    con = duckdb.connect(":memory:")
    try:
        con.execute("SET python_enable_replacements = false")
        # no FEATSTORE_DUCKDB_MEMORY here: an in-memory database over its limit spills into ./.tmp, a folder
        # in whatever directory the worker runs in
        migrate(con)
        known = {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        for table, f in snapshot_files(path, known):
            m = re.fullmatch(r"embeddings_d(\d+)", table)
            if m:
                ensure_embedding_table(con, int(m.group(1)))
            try:
                data = pq.read_table(f)
            except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
                raise SnapshotError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0]})") from e
            if table == "schema_version":
                newer = [v for v in data.column("version").to_pylist() if v and v > SCHEMA_VERSION] \
                    if "version" in data.column_names else []
                if newer:
                    raise SnapshotError(f"{path} was made by a newer featstore (schema {max(newer)}; this one "
                                        f"reads up to {SCHEMA_VERSION})")
                continue  # migrate() above wrote this featstore's own
            with registered(con, "_snapshot_table", data):
                try:
                    con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM _snapshot_table')
                except duckdb.Error as e:
                    raise SnapshotError(f"{f}: does not fit featstore's table {table} "
                                        f"({str(e).splitlines()[0]})") from e
    except BaseException:
        con.close()
        raise
    return con


def export_snapshot(con, out: str | os.PathLike) -> Path:
    """Every table and view of the store, as Parquet plus the schema, in a new folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not empty; give a new folder for the snapshot")
    con.execute(f"EXPORT DATABASE '{_quote(out)}' (FORMAT parquet)")
    return out


_EXPORT_META = "i.image_id, i.label, i.class, i.patient_id, i.view, i.sex, i.age, i.source"


def write_parquet_tables(con, dest: Path) -> dict[str, int]:
    """The store's tables as Parquet under dest (featstore/export.py's layout: images, occurrences and
    embeddings Hive-partitioned by source, ingest_errors and embed_runs one file each); rows per table."""
    counts = {}
    sources = "(SELECT image_id, list(DISTINCT source ORDER BY source) AS sources FROM occurrences GROUP BY image_id)"

    def copy(query: str, target: Path, partition: str | None = None, pattern: str = "data_{i}") -> int:
        n = con.execute(f"SELECT count(*) FROM ({query})").fetchone()[0]
        if partition:
            # the target path is bound, not pasted: a folder name may hold a quote
            con.execute(f"COPY ({query}) TO ? (FORMAT parquet, PARTITION_BY ({partition}), "
                        f"FILENAME_PATTERN '{pattern}', OVERWRITE_OR_IGNORE)", [str(target)])
        else:
            con.execute(f"COPY ({query}) TO ? (FORMAT parquet)", [str(target)])
        return n

    counts["images"] = copy(f"SELECT i.*, s.sources FROM images i LEFT JOIN {sources} s USING (image_id)",
                            dest / "images", "source")
    counts["occurrences"] = copy("SELECT * FROM occurrences", dest / "occurrences", "source")
    n_emb = 0
    for table, dim in embedding_tables(con):
        if con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
            q = (f"SELECT {_EXPORT_META}, s.sources, e.backbone, e.weights_id, e.preprocess, e.dim, e.vector, "
                 f"e.created_at FROM {table} e JOIN images i USING (image_id) LEFT JOIN {sources} s USING (image_id)")
            # one file name per table: two tables (e.g. two `onnx` models) can share a partition
            n_emb += copy(q, dest / "embeddings", "backbone, preprocess, source", f"d{dim}_{{i}}")
    counts["embeddings"] = n_emb
    counts["ingest_errors"] = copy("SELECT * FROM ingest_errors", dest / "ingest_errors.parquet")
    counts["embed_runs"] = copy("SELECT * FROM embed_runs", dest / "embed_runs.parquet")
    return counts


def _quote(path) -> str:
    return str(path).replace("'", "''")


def schema_version(con) -> int:
    try:
        row = con.execute("SELECT max(version) FROM schema_version").fetchall()[0]  # fetchall: no open result left
    except duckdb.CatalogException:
        return 0
    return row[0] or 0


def migrate(con) -> int:
    """Apply schema.sql (version 1) and any sql/migrations/NNN_*.sql above the store's version."""
    current = schema_version(con)
    steps = {1: sql_dir() / "schema.sql"}
    mig = sql_dir() / "migrations"
    if mig.is_dir():
        for f in sorted(mig.glob("[0-9][0-9][0-9]_*.sql")):
            steps[int(f.name[:3])] = f
    todo = sorted(v for v in steps if v > current)
    for version in todo:
        with transaction(con):
            con.execute(steps[version].read_text())
            con.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
    if todo or not _views_current(con):  # a plain open writes nothing: it must work on a full disk
        refresh_embedding_views(con)
    return schema_version(con)


def _views_current(con) -> bool:
    """Whether `embeddings` and `embedding_sets` exist and the first unions exactly today's tables."""
    views = dict(con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal AND view_name IN "
                             "('embeddings', 'embedding_sets')").fetchall())
    if len(views) != 2:
        return False
    return set(re.findall(r"\bembeddings_d\d+\b", views["embeddings"])) == {t for t, _ in embedding_tables(con)}


def embedding_table(dim: int) -> str:
    return f"embeddings_d{int(dim)}"


def embedding_tables(con) -> list[tuple[str, int]]:
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE 'embeddings_d%' ORDER BY table_name"
    ).fetchall()
    out = []
    for (name,) in rows:
        m = re.fullmatch(r"embeddings_d(\d+)", name)
        if m:
            out.append((name, int(m.group(1))))
    return out


def ensure_embedding_table(con, dim: int) -> str:
    name = embedding_table(dim)
    if name not in {t for t, _ in embedding_tables(con)}:
        con.execute(
            f"""CREATE TABLE IF NOT EXISTS {name} (
                image_id   VARCHAR NOT NULL,
                backbone   VARCHAR NOT NULL,
                weights_id VARCHAR NOT NULL,
                preprocess VARCHAR NOT NULL,
                dim        INTEGER NOT NULL,
                vector     FLOAT[{int(dim)}] NOT NULL,
                embed_run  INTEGER NOT NULL,
                created_at TIMESTAMP NOT NULL,
                PRIMARY KEY (image_id, backbone, weights_id, preprocess)
            )"""
        )
        refresh_embedding_views(con)
    return name


def refresh_embedding_views(con) -> None:
    """`embeddings` unions every per-dimension table. DuckDB cannot union FLOAT[576]
    with FLOAT[1024], so the view's vector is FLOAT[] (a list); the tables keep FLOAT[d]."""
    tables = embedding_tables(con)
    if tables:
        body = " UNION ALL ".join(
            f"SELECT image_id, backbone, weights_id, preprocess, dim, vector::FLOAT[] AS vector, "
            f"embed_run, created_at FROM {t}" for t, _ in tables
        )
    else:
        body = (
            "SELECT NULL::VARCHAR AS image_id, NULL::VARCHAR AS backbone, NULL::VARCHAR AS weights_id, "
            "NULL::VARCHAR AS preprocess, NULL::INTEGER AS dim, NULL::FLOAT[] AS vector, "
            "NULL::INTEGER AS embed_run, NULL::TIMESTAMP AS created_at WHERE false"
        )
    con.execute(f"CREATE OR REPLACE VIEW embeddings AS {body}")
    con.execute(
        """CREATE OR REPLACE VIEW embedding_sets AS
           SELECT backbone, weights_id, preprocess, dim, count(*) AS n_images,
                  min(created_at) AS first_at, max(created_at) AS last_at
           FROM embeddings GROUP BY ALL ORDER BY backbone, preprocess, weights_id"""
    )


@contextmanager
def registered(con, name: str, data):
    """`data` (Arrow table, or Polars frame) as a view `name` for the statements of the block, then
    gone, whatever happens: the one way featstore hands row sets (ids, batches) to SQL."""
    con.register(name, data.to_arrow() if hasattr(data, "to_arrow") else data)
    try:
        yield name
    finally:
        try:  # DuckDB 2.0 refuses unregister while a result (a fetchone's) is still open
            con.complete()
        except duckdb.Error:  # a statement that failed has no result left to finish
            pass
        con.unregister(name)


def insert_frame(con, table: str, df) -> None:
    """Insert a Polars frame's or an Arrow table's columns (by name) into a store table in one statement."""
    cols = ", ".join(f'"{c}"' for c in (df.column_names if hasattr(df, "column_names") else df.columns))
    with registered(con, "_batch", df):
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _batch")


def write_attribution(con, rows) -> None:
    """`featstore attribution`'s rows (featstore/attribution.py), in one transaction."""
    with transaction(con):
        insert_frame(con, "attribution", rows)


def attribution_rows(con, run_id: str | None = None):
    """The `attribution` rows of one run (default: the latest), as a Polars frame; empty when none."""
    import polars as pl

    if "attribution" not in {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}:
        return pl.DataFrame()
    if run_id is None:
        run_id = con.execute("SELECT max(run_id) FROM attribution").fetchall()[0][0]  # fetchall: no open result
    return pl.from_arrow(con.sql("SELECT * FROM attribution WHERE run_id = ? ORDER BY source, label, image_id",
                                 params=[run_id]).to_arrow_table())


# --- the stages' reads and writes: embedding runs and batches, the ANN index ---
# An embedding set is the rows of one embedding table (`table`, of its dim) with one key: (backbone,
# weights_id, preprocess).
_SET_ROWS = "backbone = ? AND weights_id = ? AND preprocess = ?"
_FP = "hash(image_id, embed_run, created_at)"  # a row's fingerprint: re-embedding it changes it


def images_without_embedding(con, table: str, key, limit: int | None = None) -> list[tuple[str, str]]:
    """(image_id, path) of the images with no row of the embedding set `key` in `table`, by image_id (the
    first `limit`)."""
    q = f"""SELECT i.image_id, i.path FROM images i
            WHERE NOT EXISTS (SELECT 1 FROM {table} e WHERE e.image_id = i.image_id
                              AND e.backbone = ? AND e.weights_id = ? AND e.preprocess = ?)
            ORDER BY i.image_id"""
    if limit:
        q += f" LIMIT {int(limit)}"
    return con.execute(q, list(key)).fetchall()


def interrupt_running_embed_runs(con) -> None:
    """Mark interrupted the embed_runs rows still 'running' (their process died: DuckDB has one writer)."""
    con.execute("UPDATE embed_runs SET status = 'interrupted' WHERE status = 'running'")


def next_embed_run_id(con) -> int:
    """A new embed run's id: the next value of embed_run_seq."""
    return con.execute("SELECT nextval('embed_run_seq')").fetchone()[0]


def insert_embed_run(con, values: list) -> None:
    """A new embed run's embed_runs row, 'running': run_id, backbone, weights_id, preprocess, dim, device,
    batch_size, workers, n_todo, started_at, weights_source."""
    con.execute(
        "INSERT INTO embed_runs (run_id, backbone, weights_id, preprocess, dim, device, batch_size, workers, "
        "n_todo, status, started_at, weights_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
        values)


def finish_embed_run(con, values: list) -> None:
    """An embed run's row at its end: n_todo, n_embedded, n_failed, seconds, images_per_s, status,
    finished_at, then its run_id."""
    con.execute(
        "UPDATE embed_runs SET n_todo = ?, n_embedded = ?, n_failed = ?, seconds = ?, images_per_s = ?, "
        "status = ?, finished_at = ? WHERE run_id = ?",
        values)


def upsert_embed_error_rows(con, failed, backbone: str, preprocess: str, run_id: int, time) -> None:
    """(image_id, path, reason) rows into embed_errors as run_id's at `time`, one statement each; an image's
    earlier row for the same backbone and preprocessing takes the new reason, run and time."""
    for image_id, path, reason in failed:
        con.execute(
            """INSERT INTO embed_errors VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (image_id, backbone, preprocess) DO UPDATE SET reason = excluded.reason,
                 embed_run = excluded.embed_run, time = excluded.time""",
            [image_id, path, backbone, preprocess, reason, run_id, time])


def delete_embeddings_of(con, table: str, ids: str, preprocesses: list[str]) -> int:
    """Delete the rows of the embedding table `table` of the images in the table `ids` (an image_id column)
    made with one of `preprocesses`; returns how many."""
    return con.execute(f"DELETE FROM {table} WHERE list_contains(?, preprocess) "
                       f"AND image_id IN (SELECT image_id FROM {ids})", [preprocesses]).fetchone()[0]


def delete_embed_errors_of(con, ids: str, preprocesses: list[str]) -> None:
    """Delete the embed_errors rows of the images in the table `ids` (an image_id column) for one of
    `preprocesses`."""
    con.execute("DELETE FROM embed_errors WHERE list_contains(?, preprocess) "
                f"AND image_id IN (SELECT image_id FROM {ids})", [preprocesses])


def embedding_set_counts(con, table: str, key, run_id: int | None) -> tuple[int, int]:
    """(rows embed run run_id made, all rows) of the embedding set `key` in `table`."""
    return con.execute(
        f"""SELECT count(*) FILTER (WHERE embed_run = ?), count(*)
            FROM {table}
            WHERE backbone = ? AND weights_id = ? AND preprocess = ?""",
        [run_id] + list(key)).fetchone()


def embedding_set_fingerprint(con, table: str, key) -> tuple[int, int, int]:
    """(count, bit_xor, sum) of the fingerprints hash(image_id, embed_run, created_at) of the set's rows: any
    row added, removed or re-embedded changes them."""
    return con.execute(f"SELECT count(*), coalesce(bit_xor({_FP}), 0), coalesce(sum({_FP}::HUGEINT), 0) "
                       f"FROM {table} WHERE {_SET_ROWS}", list(key)).fetchall()[0]


def embedding_set_rows(con, table: str, key):
    """image_id, rid (store rowid) and fp (fingerprint, as embedding_set_fingerprint sums) of the set's
    rows, as an Arrow table, in no order."""
    return con.sql(f"SELECT image_id, rowid AS rid, {_FP} AS fp FROM {table} WHERE {_SET_ROWS}",
                   params=list(key)).to_arrow_table()


def embedding_set_images(con, table: str, key):
    """image_id, source and label of the set's rows whose image is in images, as an Arrow table, in no
    order."""
    return con.sql(f"SELECT e.image_id, i.source, i.label FROM {table} e JOIN images i USING (image_id) "
                   f"WHERE {_SET_ROWS}", params=list(key)).to_arrow_table()


def embedding_set_vector_batches(con, table: str, key, batch: int):
    """image_id and vector of the set's rows whose image is in images, as an Arrow reader of `batch` rows at
    a time, in no order."""
    return con.sql(f"SELECT image_id, vector FROM {table} SEMI JOIN images USING (image_id) WHERE {_SET_ROWS}",
                   params=list(key)).to_arrow_reader(batch)


def embedding_set_vectors(con, table: str, key, image_ids: list[str] | None = None):
    """image_id and vector of the set's rows (every one, or those of image_ids), as an Arrow table, in no
    order."""
    if image_ids is None:
        return con.sql(f"SELECT image_id, vector FROM {table} WHERE {_SET_ROWS}", params=list(key)).to_arrow_table()
    import pyarrow as pa

    with registered(con, "_ann_ids", pa.table({"image_id": image_ids})):
        return con.sql(f"SELECT image_id, vector FROM {table} SEMI JOIN _ann_ids USING (image_id) WHERE {_SET_ROWS}",
                       params=list(key)).to_arrow_table()


def embedding_set_vectors_at(con, table: str, key, rowids: list[int] | None = None,
                             image_ids: list[str] | None = None):
    """image_id and vector of the set's rows at these store rowids, or (rowids None) of these image_ids: a
    few, each a list in the statement; as an Arrow table, in no order."""
    if rowids is not None:
        return con.sql(f"SELECT image_id, vector FROM {table} WHERE rowid = ANY(?::BIGINT[]) AND {_SET_ROWS}",
                       params=[rowids] + list(key)).to_arrow_table()
    return con.sql(f"SELECT image_id, vector FROM {table} WHERE image_id = ANY(?::VARCHAR[]) AND {_SET_ROWS}",
                   params=[image_ids] + list(key)).to_arrow_table()


def embedding_set_similarities(con, table: str, key, vector: list[float], rowids: list[int] | None = None,
                               image_ids: list[str] | None = None):
    """image_id and sim, the cosine similarity of `vector` to the vector of each of the set's rows at these
    store rowids, or (rowids None) of these image_ids, computed as sql/nearest_neighbours.sql does; as an
    Arrow table, in no order."""
    if rowids is not None:
        return con.sql(f"SELECT image_id, list_cosine_similarity(vector::FLOAT[], ?::FLOAT[]) AS sim "
                       f"FROM {table} WHERE rowid = ANY(?::BIGINT[]) AND {_SET_ROWS}",
                       params=[vector, rowids] + list(key)).to_arrow_table()
    return con.sql(f"SELECT image_id, list_cosine_similarity(vector::FLOAT[], ?::FLOAT[]) AS sim "
                   f"FROM {table} WHERE image_id = ANY(?::VARCHAR[]) AND {_SET_ROWS}",
                   params=[vector, image_ids] + list(key)).to_arrow_table()


def most_similar_images(con, sims, k: int):
    """The k most similar of `sims` (Arrow: image_id, sim; ties to the smaller image_id) with their
    image's source, label, class, path and the similarity to 4 places: the columns and order of
    sql/nearest_neighbours.sql, as an Arrow table."""
    with registered(con, "_ann_top", sims):
        return con.sql(f"""
            WITH top AS (SELECT * FROM _ann_top ORDER BY sim DESC, image_id LIMIT {int(k)})
            SELECT t.image_id, i.source, i.label, i.class, round(t.sim, 4) AS similarity, i.path
            FROM top t JOIN images i USING (image_id)
            ORDER BY t.sim DESC, t.image_id""").to_arrow_table()


# --- the stages' reads and writes: lung masks, Ray's embedding shards, duplicates ---

def images_to_mask(con, image_ids: list[str] | None = None, redo: bool = False) -> list[tuple[str, str]]:
    """(image_id, path) of the images (every one, or those of image_ids) that have no lung_masks row yet,
    or with redo of all of them, by image_id."""
    import polars as pl

    where = "" if image_ids is None else "WHERE image_id IN (SELECT image_id FROM _want)"
    have = "" if redo else f"{'AND' if where else 'WHERE'} image_id NOT IN (SELECT image_id FROM lung_masks)"
    q = f"SELECT image_id, path FROM images {where} {have} ORDER BY image_id"
    if image_ids is None:
        return con.execute(q).fetchall()
    with registered(con, "_want", pl.DataFrame({"image_id": list(image_ids)}, schema={"image_id": pl.Utf8})):
        return con.execute(q).fetchall()


def manifest_mask_paths(con, image_ids: list[str]) -> dict[str, str]:
    """image_id -> the first mask file (the manifest's mask_path) any of its occurrences names, for those of
    image_ids that have one."""
    import polars as pl

    if not image_ids:
        return {}
    with registered(con, "_ids", pl.DataFrame({"image_id": image_ids})):
        rows = con.execute("""SELECT image_id, min(json_extract_string(extra, '$.mask_path')) FROM occurrences
                              WHERE image_id IN (SELECT image_id FROM _ids)
                                AND json_extract_string(extra, '$.mask_path') IS NOT NULL GROUP BY 1""").fetchall()
    return dict(rows)


def lung_mask_rows(con, image_ids: list[str]) -> list[tuple]:
    """(image_id, mask PNG or None, method, reason) of the lung_masks rows of these images."""
    import polars as pl

    with registered(con, "_ids", pl.DataFrame({"image_id": image_ids}, schema={"image_id": pl.Utf8})):
        return con.execute("SELECT image_id, mask, method, reason FROM lung_masks "
                           "WHERE image_id IN (SELECT image_id FROM _ids)").fetchall()


def _drop_quietly(con, name: str) -> None:
    try:
        con.execute(f"DROP TABLE IF EXISTS {name}")
    except duckdb.Error:  # a store already broken (or a transaction aborted): the error in flight is the one to report
        pass


@contextmanager
def scratch_table(con, name: str, like: str):
    """An empty temporary table `name` with the columns of the store table `like`, for the block; dropped
    after it, whatever happens. Yields the name."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {like} LIMIT 0")
    try:
        yield name
    finally:
        _drop_quietly(con, name)


def insert_or_replace_from(con, table: str, staged: str) -> None:
    """Every row of the table `staged` (same columns, by name) into `table`, replacing the rows with the
    same primary key."""
    con.execute(f"INSERT OR REPLACE INTO {table} BY NAME SELECT * FROM {staged}")


def image_ids_in(con, table: str) -> list[str]:
    """The image_id column of a table (a store table or a connection's scratch one), sorted."""
    return [i for (i,) in con.execute(f"SELECT image_id FROM {table} ORDER BY 1").fetchall()]


@contextmanager
def shard_table(con, name: str, files: list[str], weights_id: str, non_finite: str):
    """Ray's Parquet shards (featstore/embed_ray.py) as a temporary table `name` for the block, rows of
    `weights_id` only, one per image (a retried block can appear twice): a success over a failure. A vector
    with NaN or Inf is no success: its error becomes `non_finite`. Dropped after the block, whatever
    happens; run it inside a transaction. Yields the name."""
    con.execute(f"""CREATE TEMP TABLE {name} AS
        SELECT * FROM (
          SELECT * REPLACE (CASE WHEN error = ''
                                 AND NOT list_bool_and(list_transform(vector, lambda v: isfinite(v)))
                            THEN ? ELSE error END AS error)
          FROM read_parquet(?, hive_partitioning = true, filename = true) WHERE weights_id = ?)
        QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY error <> '', filename) = 1""",
                [non_finite, files, weights_id])
    try:
        yield name
    finally:
        _drop_quietly(con, name)


def insert_new_embeddings(con, table: str, shard: str, dim: int, run_id: int) -> int:
    """The successful rows (error '') of a shard_table into the embedding table `table` (of `dim`), as
    made by run_id now, skipping those it already holds; returns how many were inserted."""
    d = int(dim)
    return con.execute(f"""INSERT INTO {table}
        SELECT s.image_id, s.backbone, s.weights_id, s.preprocess, {d}, s.vector::FLOAT[{d}], ?, now()::TIMESTAMP
        FROM {shard} s WHERE s.error = '' AND NOT EXISTS (
          SELECT 1 FROM {table} e WHERE e.image_id = s.image_id AND e.backbone = s.backbone
            AND e.weights_id = s.weights_id AND e.preprocess = s.preprocess)""", [run_id]).fetchone()[0]


def upsert_embed_errors(con, shard: str, run_id: int) -> int:
    """The failed rows (error not '') of a shard_table into embed_errors as run_id's, now; an image's
    earlier row for the same backbone and preprocessing takes the new reason, run and time. Returns how
    many rows were written."""
    return con.execute(f"""INSERT INTO embed_errors
        SELECT image_id, path, backbone, preprocess, error, ?, now()::TIMESTAMP FROM {shard} WHERE error <> ''
        ON CONFLICT (image_id, backbone, preprocess) DO UPDATE SET reason = excluded.reason,
          embed_run = excluded.embed_run, time = excluded.time""", [run_id]).fetchone()[0]


def image_sources(con, image_ids: list[str]) -> dict[str, str]:
    """image_id -> source (the images table's) of these images."""
    return dict(con.execute("SELECT image_id, source FROM images WHERE image_id IN (SELECT unnest(?))",
                            [image_ids]).fetchall())


def embed_errors_of_run(con, run_id: int) -> list[tuple[str, str, str]]:
    """(image_id, path, reason) of the embed_errors rows an embed run wrote."""
    return [tuple(f) for f in con.execute("SELECT image_id, path, reason FROM embed_errors WHERE embed_run = ?",
                                          [run_id]).fetchall()]


def images_without_hashes(con) -> list[tuple[str, str]]:
    """(image_id, path) of the images with no image_hashes row yet, by image_id."""
    return con.execute("SELECT image_id, path FROM images WHERE image_id NOT IN "
                       "(SELECT image_id FROM image_hashes) ORDER BY image_id").fetchall()


def hashed_images(con):
    """image_id, source, label, path and dhash of every image with an image_hashes row, by image_id, as a
    Polars frame."""
    import polars as pl

    return pl.from_arrow(con.sql("SELECT i.image_id, i.source, i.label, i.path, h.dhash FROM images i "
                                 "JOIN image_hashes h USING (image_id) ORDER BY i.image_id").to_arrow_table())


def image_paths(con) -> dict[str, str]:
    """image_id -> path of every image."""
    return dict(con.execute("SELECT image_id, path FROM images").fetchall())


def delete_all_rows(con, table: str) -> None:
    """Empty a store table (inside the caller's transaction, when one is open)."""
    con.execute(f"DELETE FROM {table}")


# --- the stages' reads and writes: ingest runs, occurrences, rejections ---

def store_file_path(con) -> str | None:
    """The store's file as DuckDB names it; None for an in-memory database."""
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    return row[0][0] if row else None


def occurrence_files(con) -> list[tuple]:
    """(source, path, image_id, size_bytes, mtime_ns) of every occurrence: what the store knows of each file."""
    return con.execute("SELECT source, path, image_id, size_bytes, mtime_ns FROM occurrences").fetchall()


def stored_image_ids(con, image_ids: list[str]) -> set[str]:
    """Those of image_ids that the images table holds."""
    import polars as pl

    with registered(con, "_ids", pl.DataFrame({"image_id": image_ids})):
        return {x for (x,) in con.execute("SELECT image_id FROM images JOIN _ids USING (image_id)").fetchall()}


def image_count(con) -> int:
    """How many images the store holds."""
    return con.execute("SELECT count(*) FROM images").fetchall()[0][0]


def next_ingest_run_id(con) -> int:
    """A new ingest run's id: the next value of ingest_run_seq."""
    return con.execute("SELECT nextval('ingest_run_seq')").fetchall()[0][0]


def delete_occurrences_of(con, files) -> None:
    """Delete the occurrences of these files (a frame of source, path)."""
    with registered(con, "_changed", files):
        con.execute("DELETE FROM occurrences WHERE (source, path) IN (SELECT source, path FROM _changed)")


def update_occurrence_file_stats(con, stats) -> None:
    """Set size_bytes and mtime_ns of the occurrences in `stats` (a frame of source, path, size_bytes, mtime_ns)."""
    with registered(con, "_same", stats):
        con.execute("""UPDATE occurrences SET size_bytes = s.size_bytes, mtime_ns = s.mtime_ns
                       FROM _same s WHERE occurrences.source = s.source AND occurrences.path = s.path""")


def resolve_ingest_errors(con, files) -> None:
    """Mark resolved the open ingest_errors rows of these files (a frame of source, path), now ingested."""
    with registered(con, "_ok", files):
        con.execute("""UPDATE ingest_errors SET resolved = true
                       WHERE NOT resolved AND (source, file) IN (SELECT source, path FROM _ok)""")


def upsert_ingest_errors(con, rejected, origin: str, run_id: int, now) -> None:
    """Rejections (a frame of file, source, reason, row_number; one row per file, source and reason) into
    ingest_errors as run_id's, seen now, in one statement; a row already there is seen again, unresolved."""
    with registered(con, "_rejected", rejected):
        con.execute(
            """INSERT INTO ingest_errors (file, source, reason, origin, row_number, ingest_run, time, last_seen)
               SELECT file, source, reason, ?, row_number, ?, ?, ? FROM _rejected
               ON CONFLICT (file, source, reason) DO UPDATE SET
                 last_seen = excluded.last_seen, ingest_run = excluded.ingest_run,
                 row_number = excluded.row_number, resolved = false""",
            [origin, run_id, now, now])


def upsert_ingest_failure(con, file: str, source: str, reason: str, origin: str, now) -> None:
    """One input that could not be read (a manifest, a folder) into ingest_errors, seen now; a row already
    there is seen again, unresolved."""
    con.execute(
        """INSERT INTO ingest_errors (file, source, reason, origin, time, last_seen) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (file, source, reason) DO UPDATE SET last_seen = excluded.last_seen, resolved = false""",
        [file, source, reason, origin, now, now],
    )


def insert_ingest_run(con, values: list) -> None:
    """One ingest_runs row: run_id, origin, n_rows, n_new_images, n_new_occurrences, n_already, n_errors,
    seconds, started_at, finished_at."""
    con.execute(
        """INSERT INTO ingest_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        values,
    )


def canonical_images(con) -> None:
    """An image's own row (source, label, patient, ...) is that of its occurrence with the smallest
    (source, path), whatever order the files were ingested in: the same data in any order gives the
    same store, the same splits and the same results. Protocols treat a file shared by collections as
    belonging to all of them (`occurrences`)."""
    con.execute("""
        UPDATE images SET source = o.source, label = o.label, class = o.class, patient_id = o.patient_id,
                          view = o.view, sex = o.sex, age = o.age, path = o.path
        FROM (SELECT DISTINCT ON (image_id) image_id, source, path, label, class, patient_id, view, sex, age
              FROM occurrences ORDER BY image_id, source, path) o
        WHERE images.image_id = o.image_id AND (images.source <> o.source OR images.path <> o.path)""")


def stored_counts(con) -> tuple[int, int]:
    """(images, occurrences) in the store: what an interrupted ingest reports it kept."""
    return con.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM occurrences)").fetchone()


def duplicate_group_counts(con) -> tuple[int, int, int]:
    """(groups of identical files, those across sources, those with conflicting labels): duplicate_groups."""
    return con.execute(
        "SELECT count(*), count(*) FILTER (cross_source), count(*) FILTER (label_conflict) FROM duplicate_groups"
    ).fetchone()
