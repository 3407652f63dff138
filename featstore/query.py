"""Run SQL against the store and render the answer as a table, CSV, JSON or a file."""
from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pyarrow as pa


def run_sql(con, query: str, variables: dict[str, str] | None = None) -> pa.Table:
    """Run one query or a script (the last statement's result is returned).
    variables are set with SET VARIABLE, read in SQL with getvariable('name')."""
    for k, v in (variables or {}).items():
        if not k.isidentifier():
            raise ValueError(f"bad variable name '{k}'")
        con.execute(f"SET VARIABLE {k} = ?", [v])
    rel = con.sql(query)
    if rel is None:  # the last statement returned nothing (DDL, SET, ...)
        return pa.table({})
    return rel.to_arrow_table()


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


def render(table: pa.Table, fmt: str = "table") -> str:
    df = pl.from_arrow(table) if table.num_columns else pl.DataFrame()
    if isinstance(df, pl.Series):
        df = df.to_frame()
    if fmt == "csv":
        return _flat(df).write_csv()
    if fmt == "json":
        return df.write_json()
    if fmt != "table":
        raise ValueError(f"unknown format '{fmt}' (table, csv or json)")
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False)
    for c in df.columns:
        t.add_column(c, overflow="fold")
    for row in _flat(df, width=60).iter_rows():
        t.add_row(*["" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row])
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False).print(t)
    buf.write(f"({df.height} row{'s' if df.height != 1 else ''})\n")
    return buf.getvalue()


def write(table: pa.Table, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df = pl.from_arrow(table)
    suffix = out.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df.write_parquet(out)
    elif suffix == ".csv":
        _flat(df).write_csv(out)
    elif suffix in (".json", ".ndjson", ".jsonl"):
        (df.write_ndjson if suffix != ".json" else df.write_json)(out)
    else:
        raise ValueError(f"--out {out}: use a .csv, .parquet or .json file name")
    return out
