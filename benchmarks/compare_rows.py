"""Same rows before and after a change to the sweep: dump a store's `results` and `predictions` to Parquet,
then compare two dumps column by column.

    python benchmarks/compare_rows.py dump  STORE.duckdb OUT_DIR     # results.parquet, predictions.parquet
    python benchmarks/compare_rows.py compare BEFORE_DIR AFTER_DIR   # exit 1 on any difference

Every stored column is kept except those a re-run changes by construction (RUN_COLUMNS: when and where it
ran), which the dump lists in its columns.json. Rows are dumped in a fixed order (ORDER BY every kept
column), so the order the sweep wrote them in does not matter; values must be identical
(floats too: the sweep is seeded), and a difference is shown per column with its first rows.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import polars as pl

TABLES = ("results", "predictions")
# what a re-run changes by construction: the sweep's id and wall time, its MLflow run ids, the commit,
# the write time, and when `featstore duplicates` found the near-duplicate links (the demo re-runs it)
RUN_COLUMNS = ("sweep_id", "seconds", "mlflow_run_id", "code_version", "created_at", "neardup_found_at")


def dump(db: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    got = {}
    with duckdb.connect(str(db), read_only=True) as con:
        for t in TABLES:
            cols = [c for (c,) in con.execute(f"SELECT column_name FROM (DESCRIBE {t})").fetchall()]
            keep = [c for c in cols if c not in RUN_COLUMNS]
            # a fixed row order from the values alone (all kept columns), whatever order the sweep wrote in
            df = pl.from_arrow(con.sql(f"SELECT {', '.join(map(_q, keep))} FROM {t} ORDER BY ALL").to_arrow_table())
            df.write_parquet(out / f"{t}.parquet")
            got[t] = dict(rows=df.height, columns=keep, dropped=[c for c in cols if c in RUN_COLUMNS])
    (out / "columns.json").write_text(json.dumps(got, indent=1))
    return got


def _q(c: str) -> str:
    return '"' + c.replace('"', '""') + '"'


def compare(a: Path, b: Path) -> list[str]:
    problems = []
    for t in TABLES:
        x, y = pl.read_parquet(a / f"{t}.parquet"), pl.read_parquet(b / f"{t}.parquet")
        if x.columns != y.columns:
            problems.append(f"{t}: columns differ: only before {sorted(set(x.columns) - set(y.columns))}, "
                            f"only after {sorted(set(y.columns) - set(x.columns))}")
            continue
        if x.height != y.height:
            problems.append(f"{t}: {x.height} rows before, {y.height} after")
            continue
        same = 0
        for c in x.columns:
            if x[c].equals(y[c]):  # nulls in the same places, values identical
                same += 1
                continue
            bad = [i for i, (u, v) in enumerate(zip(x[c].to_list(), y[c].to_list())) if u != v]
            problems.append(f"{t}.{c}: {len(bad)} of {x.height} rows differ, e.g. row {bad[0]}: "
                            f"{str(x[c][bad[0]])[:120]!r} vs {str(y[c][bad[0]])[:120]!r}")
        print(f"{t}: {x.height} rows x {len(x.columns)} columns compared, {same} columns identical")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "dump":
        for t, d in dump(Path(argv[1]), Path(argv[2])).items():
            print(f"{t}: {d['rows']} rows, {len(d['columns'])} columns kept; left out (run-time): {d['dropped']}")
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        problems = compare(Path(argv[1]), Path(argv[2]))
        print("\n".join(problems) if problems else "identical: every kept column of every row")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
