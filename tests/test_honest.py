"""Honest answers, the smaller guards: duplicates that cannot wreck a study, plain-words group collapse,
a report that picks the benchmark study and writes nothing when it fails."""
from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

import frozen_rows
from featstore.cli import app


def test_implausible_duplicates_are_refused_and_keep_the_old_pairs(synth_stores, tmp_path):
    """Synthetic chests all look alike: the default thresholds would link most of them into a few
    giant groups (the demo: 5,680 pairs among 600 images), and the next sweep would die."""
    db = tmp_path / "fs.duckdb"
    shutil.copy(synth_stores["neutral"], db)
    # the old pairs (--no-match: the matcher would check ~7,000 candidates of these look-alike chests for 24 CPU s
    # and add none; test_ann's planted copies run it)
    ok = CliRunner().invoke(app, ["duplicates", "--db", str(db), "--workers", "1", "--phash-max", "0", "--no-match",
                                  "--sheet", str(tmp_path / "a.png")])
    assert ok.exit_code == 0, ok.output
    with duckdb.connect(str(db)) as con:
        before = con.execute("SELECT count(*) FROM near_duplicates").fetchall()[0][0]
        con.execute("INSERT INTO near_duplicates VALUES ('x', 'y', 's1', 's2', 'covid', 'covid', NULL, 0, "
                    "'phash', NULL, NULL, 0.98, 0, now())")
    # the refusal follows from the pairs the hash alone links (the matcher would only add to them, after
    # checking every one of the thousands of candidates within 60 bits): it is not what is tested here
    r = CliRunner().invoke(app, ["duplicates", "--db", str(db), "--workers", "1", "--phash-max", "60",
                                 "--no-match", "--sheet", str(tmp_path / "b.png")])
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


@pytest.mark.slow
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
    # the probe's stored evidence, both representations, laid out (tests/test_report.py: never from MLflow)
    assert {"pixelstats_original_domain_auc.png", "pixelstats_original_map_grl.png",
            "map_pixelstats_original.png"} <= {p.name for p in (tmp_path / "rep").iterdir()}
    # a failing report (unknown study) writes nothing at all
    r = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "none"), "--study", "nope"])
    assert r.exit_code == 2
    assert not (tmp_path / "none").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".none-")]
    # the report replaces only its own files in an existing folder
    (tmp_path / "rep" / "notes.txt").write_text("mine")
    assert CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "rep")]).exit_code == 0
    assert (tmp_path / "rep" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def eight_sources(tmp_path_factory):
    return frozen_rows.eight_source_stores(tmp_path_factory.mktemp("eight"))


def _headline_for(case, frozen):
    """A case's rows from one frozen set (tests/frozen_rows.py; checked against fresh sweeps below), its
    headline and pooled table."""
    from featstore.report import headline, pooled_table

    rows = frozen_rows.load(case, frozen)
    return rows, headline(rows), pooled_table(rows)


def test_each_frozen_set_is_named_after_the_platform_it_was_made_on():
    """The sets the verdict tests read (a set whose .platform file is missing or edited would be read as
    another platform's, or collapse into it)."""
    files = sorted(frozen_rows.FROZEN_DIR.glob("*.parquet"))
    assert files, f"no frozen rows in {frozen_rows.FROZEN_DIR}"
    made = frozen_rows.sets()
    assert len(made) == len(files) and all(path.stem == frozen_rows.tag(plat) for plat, path in made.items()), made


# every committed set, whatever this machine's platform: the rules must hold on each platform's rows
FROZEN_SETS = pytest.mark.parametrize("frozen", list(frozen_rows.sets().values()), ids=lambda p: p.stem)


@pytest.mark.slow
def test_frozen_verdict_rows_are_what_the_sweeps_give(eight_sources, tmp_path, recording_tracker):
    """The three sweeps again, every kept column compared with the set of tests/data/verdict_rows/ made
    on this machine's numeric platform: the frozen rows the verdict tests read cannot drift from what
    featstore computes."""
    import polars as pl

    here, made = frozen_rows.platform(), frozen_rows.sets()
    if here not in made:
        pytest.skip(f"no frozen rows were made on this machine's numeric kernels ({here}), only on "
                    f"{' | '.join(made) or 'none'}: their last bits, and Optuna's near-ties, differ; add this "
                    "platform's set with `PYTHONPATH=. python tests/frozen_rows.py` to check here")
    frozen_rows.write(frozen_rows.generate(tmp_path, eight_sources), tmp_path / "fresh.parquet")
    fresh, frozen = pl.read_parquet(tmp_path / "fresh.parquet"), pl.read_parquet(made[here])
    assert fresh.columns == frozen.columns and fresh.height == frozen.height > 0
    diff = [c for c in frozen.columns if not fresh[c].equals(frozen[c])]
    assert not diff, f"columns that differ from the frozen rows (regenerate: python tests/frozen_rows.py): {diff}"


@pytest.mark.slow
@FROZEN_SETS
def test_verdict_known_answers(frozen):
    """Planted source confounders beside a disease signal the pixel statistics read well within every
    source (same-source AUC 0.999 on AVX-512 kernels, 0.963 on AVX2 ones, where the last bits tip which of
    the three near-tied trials is chosen): little is left for the source to add, so cross-source pairs
    are ranked at most a little better than same-source ones (the interval's top under 0.05, the
    materiality margin) and the model is not called a shortcut, whatever
    the sources' positive rates (a pure shortcut, signal 0: tests/test_verdict.py). The same sources
    without confounders: generalises (no use of the source, and a drop of 0.10 on new sources excluded)."""
    import polars as pl

    rows, h, _ = _headline_for("confounded", frozen)
    mixed = rows.filter((pl.col("kind") == "pooled") & (pl.col("protocol") == "mixed")).row(0, named=True)
    sc = (mixed["metrics"] if isinstance(mixed["metrics"], dict) else __import__("json").loads(mixed["metrics"]))
    assert sc["shortcut"]["same"] > 0.95 and sc["shortcut"]["hi"] < 0.05, sc["shortcut"]
    assert h["uses the source?"].to_list() == ["no"] and h["verdict"].to_list() != ["shortcut likely"]
    assert "; 8 sources, 8 with both classes)" in h["uses the source? cross − same-source AUC [CI]"][0]
    lpo = rows.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "leave-pair-out")).row(0, named=True)
    assert lpo["gap"] is None  # pairs share sources: no gap, no second "seen"
    sm = rows.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "loso")).row(0, named=True)
    assert sm["uncertainty"] == "source" and sm["auc_lo"] <= sm["auc"] <= sm["auc_hi"] <= 1
    assert sm["n_sources"] == 8 and sm["worst_source"] in {f"s{k}" for k in range(8)}
    rows, h, _ = _headline_for("neutral", frozen)
    assert h["verdict"].to_list() == ["generalises"], h.to_dicts()


@FROZEN_SETS
def test_a_shortcut_cannot_top_the_headline(frozen):
    """Pooled LOSO rewards recognising the source (prevalence differs between sources): it stays out of
    the headline, which ranks models by the mean over held-out sources of per-source AUC."""
    import polars as pl

    rows, h, pooled = _headline_for("shortcut", frozen)
    sm = rows.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "loso"))
    assert h["head"][0] == sm.sort("auc", descending=True)["head"][0]
    assert not [c for c in h.columns if "pooled" in c.lower()]
    assert pooled.height == 2 and "pooled LOSO AUC [image CI]" in pooled.columns
