"""Honest answers, the smaller guards: duplicates that cannot wreck a study, plain-words group collapse,
a report that picks the benchmark study and writes nothing when it fails."""
from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from featstore.cli import app


def test_implausible_duplicates_are_refused_and_keep_the_old_pairs(synth_stores, tmp_path):
    """Synthetic chests all look alike: the default thresholds would link most of them into a few
    giant groups (the demo: 5,680 pairs among 600 images), and the next sweep would die."""
    db = tmp_path / "fs.duckdb"
    shutil.copy(synth_stores["neutral"], db)
    ok = CliRunner().invoke(app, ["duplicates", "--db", str(db), "--workers", "1", "--phash-max", "0",
                                  "--sheet", str(tmp_path / "a.png")])
    assert ok.exit_code == 0, ok.output
    with duckdb.connect(str(db)) as con:
        before = con.execute("SELECT count(*) FROM near_duplicates").fetchall()[0][0]
        con.execute("INSERT INTO near_duplicates VALUES ('x', 'y', 's1', 's2', 'covid', 'covid', NULL, 0, "
                    "'phash', NULL, NULL, 0.98, 0, now())")
    r = CliRunner().invoke(app, ["duplicates", "--db", str(db), "--workers", "1", "--phash-max", "60",
                                 "--sheet", str(tmp_path / "b.png")])
    assert r.exit_code == 2, r.output
    assert "largest group joins" in r.output and "Nothing was linked" in r.output
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM near_duplicates").fetchall()[0][0] == before + 1
    assert not (tmp_path / "b.png").exists()


def test_plausibility_limits():
    from featstore.duplicates import ImplausibleDuplicates, check_plausible, components

    assert components([("a", "b"), ("b", "c"), ("d", "e")]) == [3, 2]
    check_plausible([(f"a{i}", f"b{i}") for i in range(100)], 4074, 10, 0.98)  # the real set: pairs, not groups
    with pytest.raises(ImplausibleDuplicates, match="largest group joins 40"):
        check_plausible([("hub", f"x{i}") for i in range(39)], 1000, 10, 0.98)
    with pytest.raises(ImplausibleDuplicates, match="pairs among 100 images"):
        check_plausible([(f"a{i}", f"b{i}") for i in range(60)], 100, 10, 0.98)


def test_group_collapse_is_explained():
    from featstore.split import make_folds, make_meta

    src = np.repeat(["a", "b", "c", "d"], 30)
    y = np.tile([0, 1], 60)
    links = [(i, i + 1) for i in range(0, 119) if src[i] == src[i + 1]]  # each source one group
    meta = make_meta(src, y, links=links)
    with pytest.raises(ValueError, match="form only 4.*near-duplicate links.*near_duplicates: ignore"):
        make_folds(meta, "mixed", folds=5)


def test_report_skips_the_probe_and_fails_cleanly(synth_stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "fs.duckdb"
    shutil.copy(synth_stores["confounded"], db)
    cfg = tmp_path / "s.yaml"
    cfg.write_text("study: bench\nbackbones: [pixelstats]\nheads: {logreg: {trials: 1}}\n"
                   "protocols: {loso: {}}\nbootstrap: 0\n")
    assert CliRunner().invoke(app, ["sweep", str(cfg), "--db", str(db)]).exit_code == 0
    assert CliRunner().invoke(app, ["probe", "--backbone", "pixelstats", "--db", str(db),
                                    "--bootstrap", "0"]).exit_code == 0
    r = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "report for bench" in r.output
    # a failing report (unknown study) writes nothing at all
    r = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "none"), "--study", "nope"])
    assert r.exit_code == 2
    assert not (tmp_path / "none").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".none-")]
    # the report replaces only its own files in an existing folder
    (tmp_path / "rep" / "notes.txt").write_text("mine")
    assert CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "rep")]).exit_code == 0
    assert (tmp_path / "rep" / "notes.txt").read_text() == "mine"


def _eight_styles():
    """Eight SYNTHETIC sources, alternately 85% and 10% COVID, each with its own acquisition fingerprint
    (switched off for the neutral store): enough sources for source-level intervals to decide."""
    from featstore.synth import SourceStyle

    markers = ["top-left", "top-right", "bottom-left", None]
    return tuple(SourceStyle(f"s{k}", 0.85 if k % 2 == 0 else 0.1, gamma=0.7 + 0.12 * k, marker=markers[k % 4],
                             border=(k * 3) % 11, border_value=0.95 if k % 3 == 0 else 0.0, noise=0.005 + 0.005 * k,
                             fov=0.85 + 0.04 * k, fmt=("png8", "png16", "jpeg")[k % 3]) for k in range(8))


@pytest.fixture(scope="module")
def eight_sources(tmp_path_factory):
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect
    from featstore.synth import generate

    out = {}
    for name, conf in (("confounded", True), ("neutral", False)):
        f = tmp_path_factory.mktemp(f"eight-{name}")
        m = generate(f / "data", n_per_source=120, size=96, seed=3, confounders=conf, signal=0.1,
                     sources=_eight_styles())
        db = f / "fs.duckdb"
        con = connect(db)
        I.ingest_rows(con, I.manifest_rows(m)[0], str(m), workers=1)
        embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
        con.close()
        out[name] = db
    return out


def _headline_for(db, tmp_path, heads, bootstrap=200, protocols=("mixed", "loso", "leave-pair-out")):
    import polars as pl

    from featstore.sweep.run import run_study
    from featstore.report import headline, pooled_table
    from featstore.sweep.config import parse_study

    st = parse_study(dict(study="verdict", backbones=["pixelstats"], heads=heads,
                          protocols={p: ({"folds": 5} if p == "mixed" else {}) for p in protocols},
                          bootstrap=bootstrap))
    rep = run_study(st, db, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows = pl.DataFrame(rep.rows, infer_schema_length=None)
    return rows, headline(rows), pooled_table(rows)


def test_verdict_known_answers(eight_sources, tmp_path, recording_tracker):
    """Planted source confounders beside a disease signal the pixel statistics read almost perfectly
    within every source (same-source AUC ~0.999): nothing is left for the source to add, so cross-source
    pairs are ranked no better than same-source ones and the model is not called a shortcut, whatever
    the sources' positive rates (a pure shortcut, signal 0: tests/test_verdict.py). The same sources
    without confounders: generalises (no use of the source, and a drop of 0.10 on new sources excluded)."""
    import polars as pl

    heads = {"logreg": {"trials": 3}}
    rows, h, _ = _headline_for(eight_sources["confounded"], tmp_path / "c", heads)
    mixed = rows.filter((pl.col("kind") == "pooled") & (pl.col("protocol") == "mixed")).row(0, named=True)
    sc = (mixed["metrics"] if isinstance(mixed["metrics"], dict) else __import__("json").loads(mixed["metrics"]))
    assert sc["shortcut"]["same"] > 0.98 and sc["shortcut"]["hi"] < 0.05, sc["shortcut"]
    assert h["uses the source?"].to_list() == ["no"] and h["verdict"].to_list() != ["shortcut likely"]
    assert "; 8 sources, 8 with both classes)" in h["uses the source? cross − same-source AUC [CI]"][0]
    lpo = rows.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "leave-pair-out")).row(0, named=True)
    assert lpo["gap"] is None  # pairs share sources: no gap, no second "seen"
    sm = rows.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "loso")).row(0, named=True)
    assert sm["uncertainty"] == "source" and sm["auc_lo"] <= sm["auc"] <= sm["auc_hi"] <= 1
    assert sm["n_sources"] == 8 and sm["worst_source"] in {f"s{k}" for k in range(8)}
    rows, h, _ = _headline_for(eight_sources["neutral"], tmp_path / "n", heads)
    assert h["verdict"].to_list() == ["generalises"], h.to_dicts()


def test_a_shortcut_cannot_top_the_headline(eight_sources, tmp_path, recording_tracker):
    """Pooled LOSO rewards recognising the source (prevalence differs between sources): it stays out of
    the headline, which ranks models by the mean over held-out sources of per-source AUC."""
    import polars as pl

    rows, h, pooled = _headline_for(eight_sources["confounded"], tmp_path,
                                    {"logreg": {"trials": 2}, "lightgbm": {"trials": 2, "fixed": {"n_estimators": 50}}},
                                    bootstrap=50, protocols=("mixed", "loso"))
    sm = rows.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "loso"))
    assert h["head"][0] == sm.sort("auc", descending=True)["head"][0]
    assert not [c for c in h.columns if "pooled" in c.lower()]
    assert pooled.height == 2 and "pooled LOSO AUC [image CI]" in pooled.columns
