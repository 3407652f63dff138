"""Run SQL against the store and render the answer as a table, CSV, JSON or a file.

User SQL (`featstore sql`) runs sandboxed: DuckDB touches no file but the store (and folders or
files given with --allow-read), installs and loads no extension, and its configuration is locked;
statements that write files or reach other databases (COPY, EXPORT, ATTACH, ...) are refused before
anything runs, because DuckDB's own fence still lets COPY ... (USE_TMP_FILE false) overwrite the
store file itself, and lets COPY/EXPORT write inside allowed folders.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa


class SandboxError(ValueError):
    """A statement featstore's SQL sandbox does not run."""


# statement types that only read, or write into the store itself (a read-only connection refuses those)
_ALLOWED = {"SELECT", "SET", "VARIABLE_SET", "CALL", "TRANSACTION", "MULTI", "INSERT", "UPDATE", "DELETE",
            "CREATE", "DROP", "ALTER", "MERGE_INTO", "VACUUM", "ANALYZE", "CREATE_FUNC"}
_WHY = {"COPY": "COPY writes or reads files; write an answer with --out FILE, read a file with "
                "read_csv/read_parquet and --allow-read PATH",
        "EXPORT": "EXPORT DATABASE writes files; use `featstore export`",
        "ATTACH": "ATTACH opens other databases", "DETACH": "DETACH is not needed here",
        "LOAD": "INSTALL/LOAD of extensions is off (no network, no foreign code)",
        "PREPARE": "PREPARE/EXECUTE could hide a refused statement", "EXECUTE": "PREPARE/EXECUTE is off",
        "PRAGMA": "PRAGMA and IMPORT DATABASE are off: they can import databases and copy files; read settings "
                  "and table layouts with the table functions, e.g. SELECT * FROM pragma_table_info('images')"}


def check_statements(text: str) -> None:
    """Refuse, before anything runs, any statement the sandbox does not allow."""
    for st in duckdb.extract_statements(text):
        q = st.query.strip()
        try:
            kind = st.type.name
        except ValueError:  # e.g. UPDATE EXTENSIONS: a statement type the Python API cannot name
            kind = "?"
        # PRAGMA is refused whole: IMPORT DATABASE and COPY FROM DATABASE parse as PRAGMAs, and
        # import_database runs a folder's schema.sql/load.sql (any COPY ... TO in it) unchecked
        ok = kind in _ALLOWED
        if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: check that one too
            m = re.match(r"explain\s+(?:analy[sz]e\s+)?", q, re.I)
            if m:
                try:
                    check_statements(q[m.end():])
                    ok = True
                except duckdb.Error:  # e.g. a comment between EXPLAIN and ANALYZE: refuse, do not guess
                    pass
        if not ok:
            short = " ".join(q.split())[:80]
            why = _WHY.get(kind, f"{kind if kind != '?' else 'this kind of'} statement is not run by featstore sql")
            raise SandboxError(f"not allowed in featstore sql: {short} ({why})")


def sandbox(con, allow_read=()) -> None:
    """Lock this DuckDB database down for user SQL: no file access except the store and allow_read
    (files or folders), no extension install/load/autoload, configuration locked. It holds for every
    connection to the same database in this process, and cannot be undone."""
    dirs, files = [], []
    for p in allow_read:
        p = Path(p).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"--allow-read {p}: no such file or folder")
        p = p.resolve()
        if p.is_dir():  # DuckDB matches folders as prefixes: end with / so that DIR does not allow DIR2
            dirs.append(str(p).rstrip(os.sep) + os.sep)
        else:
            files.append(str(p))
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET allowed_paths = ?", [files])
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions",
                    "allow_community_extensions"):
        con.execute(f"SET {setting} = false")
    con.execute("SET allow_extension_repositories = 'forbidden'")
    con.execute("SET lock_configuration = true")


def run_user_sql(con, query: str, variables: dict[str, str] | None = None, allow_read=()) -> pa.Table:
    """run_sql for SQL from a user: the statements are checked, then the database is sandboxed; columns
    of types with no plain Arrow/Polars form come back as DuckDB's own text of them."""
    check_statements(query)
    sandbox(con, allow_read)
    return run_sql(con, query, variables, as_text=True)


# DuckDB types whose Arrow form Polars cannot import or write (or panics on): shown as DuckDB's text
_TEXT_TYPES = re.compile(r"\b(INTERVAL|UNION|VARIANT|BIGNUM|BIT|MAP|JSON|GEOMETRY)\b")


def run_sql(con, query: str, variables: dict[str, str] | None = None, as_text: bool = False) -> pa.Table:
    """Run one query or a script (the last statement's result is returned).
    variables are set with SET VARIABLE, read in SQL with getvariable('name'). as_text: columns of the
    types above (also nested) are cast to VARCHAR."""
    for k, v in (variables or {}).items():
        if not k.isidentifier():
            raise ValueError(f"bad variable name '{k}'")
        con.execute(f"SET VARIABLE {k} = ?", [v])
    rel = con.sql(query)
    if rel is None:  # the last statement returned nothing (DDL, SET, ...)
        return pa.table({})
    if as_text and any(_TEXT_TYPES.search(str(t)) for t in rel.types):
        q = lambda c: '"' + c.replace('"', '""') + '"'
        rel = rel.project(", ".join(f"CAST({q(c)} AS VARCHAR) AS {q(c)}" if _TEXT_TYPES.search(str(t)) else q(c)
                                    for c, t in zip(rel.columns, rel.types)))
    return rel.to_arrow_table()


_FORMULA = r"^[=+\-@\t\r]"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def csv_safe(df: pl.DataFrame, header: bool = True) -> pl.DataFrame:
    """Text cells a spreadsheet would run as a formula (=, +, -, @, tab, CR first; OWASP) get a
    leading single quote; numbers, and text that is just a number such as "-5", stay as they are.
    The header cells too (a column named by the data, e.g. a PIVOT over source names)."""
    text = [n for n, t in df.schema.items() if t in (pl.Utf8, pl.Categorical, pl.Enum)]
    df = df.with_columns(
        pl.when(pl.col(n).cast(pl.Utf8).str.contains(_FORMULA) & ~pl.col(n).cast(pl.Utf8).str.contains(_NUMBER))
        .then(pl.lit("'") + pl.col(n).cast(pl.Utf8)).otherwise(pl.col(n).cast(pl.Utf8)).alias(n) for n in text)
    if not header:
        return df
    safe = {n: "'" + n for n in df.columns if re.match(_FORMULA, n) and not re.match(_NUMBER, n)}
    return df.rename(safe) if safe and not set(safe.values()) & set(df.columns) else df


def _flat(df: pl.DataFrame, width: int | None = None) -> pl.DataFrame:
    """Nested columns (vectors, lists, structs) as short text, for CSV and terminal tables."""
    nested = [n for n, t in df.schema.items() if isinstance(t, (pl.List, pl.Array, pl.Struct))]
    return df.with_columns(
        df.get_column(n).map_elements(lambda v: _short(v, width), return_dtype=pl.Utf8) for n in nested)


def _short(v, width):
    if hasattr(v, "to_list"):
        v = v.to_list()
    if isinstance(v, list) and v and isinstance(v[0], float):
        text = "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    else:
        text = str(v)
    if width and len(text) > width:
        return text[: width - 1] + "…"
    return text


_PLAIN = (pl.Utf8, pl.Boolean, pl.Date, pl.Time, pl.Null)


def _plain(dtype, binary_ok: bool = False) -> bool:
    """Whether Polars can hold and write this column as it is (nested: if every part can)."""
    if isinstance(dtype, (pl.List, pl.Array)):
        return _plain(dtype.inner, binary_ok)
    if isinstance(dtype, pl.Struct):
        return all(_plain(f.dtype, binary_ok) for f in dtype.fields)
    return (dtype.is_numeric() or dtype in _PLAIN or isinstance(dtype, (pl.Datetime, pl.Duration, pl.Decimal,
                                                                         pl.Categorical, pl.Enum))
            or (binary_ok and dtype == pl.Binary))


def _as_text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    return str(v)


def _frame(table: pa.Table, binary_ok: bool = False) -> pl.DataFrame:
    """The answer as a Polars frame. A column Polars cannot import or write (INTERVAL, UNION, VARIANT,
    BIGNUM, MAP, BLOB outside Parquet, ...) becomes text, value by value, instead of failing the command."""
    cols = []
    for name, col in zip(table.column_names, table.columns):
        try:
            s = pl.from_arrow(col)
            s = s.to_series() if isinstance(s, pl.DataFrame) else s
            if _plain(s.dtype, binary_ok):
                cols.append(s.alias(name))
                continue
        except BaseException as e:  # ComputeError, or a Rust panic (pyo3's PanicException is a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        cols.append(pl.Series(name, [_as_text(v) for v in col.to_pylist()], dtype=pl.Utf8))
    return pl.DataFrame(cols) if cols else pl.DataFrame()


def render(table: pa.Table, fmt: str = "table") -> str:
    if fmt not in ("table", "csv", "json"):
        raise ValueError(f"unknown format '{fmt}' (table, csv or json)")
    df = _frame(table)
    if fmt == "csv":
        return csv_safe(_flat(df), header=True).write_csv()
    if fmt == "json":
        return df.write_json()
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(show_lines=False)
    for c in df.columns:  # names and cells are data: Text, never parsed as rich markup ("[/x]")
        t.add_column(Text(c), overflow="fold")
    for row in _flat(df, width=60).iter_rows():
        t.add_row(*[Text("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))) for v in row])
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False).print(t)
    buf.write(f"({df.height} row{'s' if df.height != 1 else ''})\n")
    return buf.getvalue()


OUT_SUFFIXES = (".parquet", ".pq", ".csv", ".json", ".ndjson", ".jsonl")


def write(table: pa.Table, out: str | Path) -> Path:
    """The answer as a file, written beside `out` under a temporary name and renamed over it when
    whole: a full disk or a crash midway leaves the old file as it was, never a truncated one."""
    import tempfile

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: use a .csv, .parquet or .json file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    df = _frame(table, binary_ok=suffix in (".parquet", ".pq"))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if suffix in (".parquet", ".pq"):
            df.write_parquet(tmp)
        elif suffix == ".csv":
            csv_safe(_flat(df)).write_csv(tmp)
        else:
            (df.write_ndjson if suffix != ".json" else df.write_json)(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


@dataclass
class SqlJob:
    """`featstore sql`: the user's SQL (QUERY or -f FILE), sandboxed, on the store, read-only unless
    `writable`; the answer written to `out` (.csv, .parquet, .json) or rendered as `fmt`."""
    query: str | None = None
    file: Path | None = None
    fmt: str = "table"
    out: Path | None = None
    var: list[str] = field(default_factory=list)  # NAME=VALUE, read in SQL as getvariable('NAME')
    writable: bool = False
    allow_read: list[Path] = field(default_factory=list)
    db: Path | None = None

    def __post_init__(self):
        from featstore.errors import UserError

        if (self.query is None) == (self.file is None):
            raise UserError("give a QUERY or -f FILE")
        if self.out and Path(self.out).suffix.lower() not in OUT_SUFFIXES:  # before the SQL runs (it may write)
            raise UserError(f"--out {self.out}: use a .csv, .parquet or .json file name")
        self.variables = {}
        for v in self.var:
            if "=" not in v:
                raise UserError(f"--var {v}: expected NAME=VALUE")
            k, val = v.split("=", 1)
            self.variables[k] = val

    def run(self) -> pa.Table:
        from featstore.errors import SqlFailed, UserError
        from featstore.store import open_for_command

        text = Path(self.file).read_text() if self.file else self.query
        con = open_for_command(self.db, read_only=not self.writable)
        try:
            table = run_user_sql(con, text, self.variables, self.allow_read)
        except FileNotFoundError as e:  # an --allow-read path
            raise UserError(str(e)) from e
        except (duckdb.Error, ValueError) as e:
            raise SqlFailed(str(e)) from e
        finally:  # the sandbox holds for the database, not the connection: let it go with it
            con.close()
        if self.out:
            try:
                write(table, self.out)
            except (ValueError, OSError) as e:
                raise UserError(f"--out {self.out}: {e}") from e
        return table

    def text(self, table: pa.Table) -> str:
        """The answer as `fmt` text."""
        from featstore.errors import UserError

        try:
            return render(table, self.fmt)
        except ValueError as e:
            raise UserError(str(e)) from e
