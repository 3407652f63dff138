import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from featstore.api import open_store
from featstore.backbones import create_backbone
from featstore.cli import app
from featstore.embed import embed
from featstore.export import export_parquet
from featstore.store import sql_dir

SQL_FILES = sorted(p.name for p in sql_dir().glob("*.sql") if p.name != "schema.sql")


@pytest.fixture
def store(ingested):
    con, _ = ingested
    embed(con, create_backbone("pixelstats"), batch_size=32, workers=0)
    db = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    con.close()
    return Path(db)


def _sql(db, *args):
    return CliRunner().invoke(app, ["sql", *args, "--db", str(db)])


def test_example_queries_are_there():
    assert {"counts_by_source_label.sql", "nearest_neighbours.sql", "source_centroids.sql",
            "ingest_failures.sql", "cross_source_duplicates.sql"} <= set(SQL_FILES)


@pytest.mark.slow
@pytest.mark.parametrize("name", SQL_FILES)
def test_every_example_query_runs_as_is(store, name):
    r = _sql(store, "-f", str(sql_dir() / name), "--format", "csv")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 2, f"{name} returned no rows"


def test_nearest_neighbours_with_variables(store):
    con = duckdb.connect(str(store), read_only=True)
    img = con.execute("SELECT image_id FROM images ORDER BY image_id DESC LIMIT 1").fetchone()[0]
    con.close()
    r = _sql(store, "-f", str(sql_dir() / "nearest_neighbours.sql"), "--var", f"image_id={img}", "--var", "k=3",
             "--format", "json")
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and img not in {x["image_id"] for x in rows}
    sims = [x["similarity"] for x in rows]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    # the same answer from numpy
    with open_store(store) as fs:
        X, meta = fs.arrays("pixelstats")
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    i = meta["image_id"].to_list().index(img)
    order = [j for j in np.argsort(-(Xn @ Xn[i])) if j != i][:3]
    assert [meta["image_id"][int(j)] for j in order] == [x["image_id"] for x in rows]


def test_sql_formats_and_files(store, tmp_path):
    r = _sql(store, "SELECT source, count(*) AS n FROM images GROUP BY 1 ORDER BY 1", "--format", "csv")
    assert r.stdout.splitlines()[0] == "source,n" and len(r.stdout.splitlines()) == 5
    r = _sql(store, "SELECT 1 AS a", "--format", "json")
    assert json.loads(r.stdout) == [{"a": 1}]
    r = _sql(store, "SELECT * FROM embeddings LIMIT 3", "--format", "table")
    assert r.exit_code == 0 and "(3 rows)" in r.stdout
    for ext in ("csv", "parquet", "json"):
        out = tmp_path / f"e.{ext}"
        r = _sql(store, "SELECT image_id, vector FROM embeddings", "--out", str(out))
        assert r.exit_code == 0 and out.stat().st_size > 0
    assert pl.read_parquet(tmp_path / "e.parquet").height == 96
    r = _sql(store, "SELECT * FROM no_such_table")
    assert r.exit_code == 1 and "no_such_table" in r.output
    r = _sql(store, "DELETE FROM images")  # read-only by default
    assert r.exit_code == 1


def test_export_is_readable_without_featstore(store, tmp_path):
    con = duckdb.connect(str(store), read_only=True)
    counts = export_parquet(con, tmp_path / "x")
    con.close()
    assert counts["embeddings"] == 96 and counts["images"] == 96
    parts = sorted(p.name for p in (tmp_path / "x" / "embeddings" / "backbone=pixelstats" / "preprocess=original").iterdir())
    assert parts == ["source=synthetic-a", "source=synthetic-b", "source=synthetic-c", "source=synthetic-d"]
    df = pl.read_parquet(tmp_path / "x" / "embeddings" / "**" / "*.parquet", hive_partitioning=True)
    assert df.height == 96 and {"image_id", "label", "source", "sources", "vector", "weights_id"} <= set(df.columns)
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/x/images/*/*.parquet', hive_partitioning=true)").fetchall()[0][0]
    assert n == 96


def test_api_arrays_and_filters(store):
    with open_store(store) as fs:
        X, meta = fs.arrays("pixelstats")
        assert X.shape == (96, 320) and X.dtype == np.float32
        df = fs.embeddings("pixelstats")
        np.testing.assert_array_equal(np.stack(df["vector"].to_numpy()), X)
        Xa, ma = fs.arrays("pixelstats", sources=["synthetic-a"], labels=["covid"])
        assert set(ma["source"]) == {"synthetic-a"} and set(ma["label"]) == {"covid"} and len(Xa) == ma.height > 0
        with pytest.raises(ValueError, match="no embeddings for backbone 'nope'"):
            fs.arrays("nope")


@pytest.mark.slow
def test_api_refuses_to_mix_weight_sets(store):
    from featstore.store import connect

    con = connect(store)
    embed(con, create_backbone("xrv-densenet121-res224-all", weights="random-init", seed=0), workers=0, limit=2)
    bb1 = create_backbone("xrv-densenet121-res224-all", weights="random-init", seed=1)
    embed(con, bb1, workers=0, limit=2)
    con.close()
    with open_store(store) as fs:
        with pytest.raises(ValueError, match="several weight sets"):
            fs.arrays("xrv-densenet121-res224-all")
        X, _ = fs.arrays("xrv-densenet121-res224-all", weights_id=bb1.weights_id)
        assert X.shape == (2, 1024)
