"""Same data, same numbers: ingest order must not change a single result row."""
from __future__ import annotations

import polars as pl
import pytest

from featstore import ingest as I
from featstore.backbones import create_backbone
from featstore.sweep.run import run_study
from featstore.embed import embed
from featstore.store import connect
from featstore.sweep.config import parse_study
from featstore.synth import generate

VOLATILE = ("sweep_id", "created_at", "mlflow_run_id", "seconds", "code_version")


def _store(manifest, folder, reverse: bool):
    rows, pre = I.manifest_rows(manifest)
    db = folder / "fs.duckdb"
    con = connect(db)
    if reverse:  # the same rows, the other way round: every shared file is met in the other source first
        rows = rows[::-1]
    I.ingest_rows(con, rows, str(manifest), workers=1)
    embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
    con.close()
    return db


@pytest.mark.slow
def test_ingest_order_gives_identical_results(tmp_path, recording_tracker):
    m = generate(tmp_path / "data", n_per_source=24, size=96, seed=5, plant_duplicates=4)
    st = parse_study(dict(study="order", backbones=["pixelstats"], heads={"logreg": {"trials": 2}},
                          protocols={"loso": {}, "leave-pair-out": {}}, bootstrap=20))
    out = []
    for rev in (False, True):
        folder = tmp_path / ("rev" if rev else "fwd")
        folder.mkdir()
        db = _store(m, folder, rev)
        with connect(db, read_only=True) as con:
            shared = con.execute("SELECT count(*) FROM duplicate_groups WHERE cross_source").fetchall()[0][0]
        assert shared >= 3  # the planted copies span two sources
        rep = run_study(st, db, folder, f"sqlite:///{folder / 'mlflow.db'}")
        out.append(pl.DataFrame(rep.rows, infer_schema_length=None).drop(VOLATILE, strict=False)
                   .with_columns(pl.col("metrics").map_elements(str, return_dtype=pl.Utf8),
                                 pl.col("params").map_elements(str, return_dtype=pl.Utf8))
                   .sort("protocol", "fold", "test_set", "scope"))
    a, b = out
    assert a.height == b.height > 10
    diff = [c for c in a.columns if not a[c].equals(b[c])]
    assert not diff, f"columns that depend on ingest order: {diff}"
