"""Verdicts that are right, on known answers: simulated out-of-fold scores whose truth is known by
construction (featstore.synth.oof_scores), four regimes x three seeds, one regime with six sources and
one with single-class sources; then the real heads end to end on synthetic images (slow)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from featstore.score import below_chance, cluster_bootstrap_gap, source_contrast
from featstore.synth import oof_scores
from featstore.verdict import DROPS, SHORTCUT, judge

# regime -> (mixed k-fold scores: prevalence and structure; the held-out side: how much of the signal a
# model keeps on a source it never saw)
REGIMES = {
    # no disease signal, no source-label link in the score: sources differ in prevalence only
    "null": (dict(prevalence=[.85, .80, .10, .05]), 0.0),
    # a strong acquisition shift with no link to the label: the score moves per source; new sources
    # lose most of the signal (the drop on new sources), yet nothing ranks by the source
    "shift": (dict(prevalence=[.55, .55, .45, .45], signal=1.5, shift=1.5), 0.0),
    # a pure shortcut: the score is the source's positive rate, no disease signal at all
    "shortcut": (dict(prevalence=[.85, .80, .10, .05], shortcut=1.5), 0.0),
    # confounded: real signal and the shortcut together
    "confounded": (dict(prevalence=[.85, .80, .10, .05], signal=1.0, shortcut=1.0), 0.6),
    # more than four sources
    "shortcut-6": (dict(prevalence=[.9, .8, .6, .3, .1, .05], shortcut=1.5), 0.0),
    # single-class sources (all positive, all negative) beside two mixed ones
    "shortcut-one-class": (dict(prevalence=[1.0, .7, .3, 0.0], shortcut=1.5), 0.0),
    "null-6": (dict(prevalence=[.9, .8, .6, .3, .1, .05]), 0.0),
}


def _verdict(regime: str, seed: int):
    kw, keep = REGIMES[regime]
    seen = oof_scores(n_per_source=120, seed=seed, **kw)
    sc = source_contrast(seen["y"], seen["score"], seen["source"], seen["patient"], n_boot=300, seed=seed)
    # the held-out side: each source scored by a model that never saw it, with `keep` of the signal and
    # none of the shortcut (a new source's positive rate is unknown to the model)
    unseen = oof_scores(n_per_source=120, seed=1000 + seed, prevalence=[min(max(p, .3), .7) for p in kw["prevalence"]],
                        signal=keep * kw.get("signal", 0.0), shift=kw.get("shift", 0.0))
    g = cluster_bootstrap_gap(seen["y"], seen["score"], seen["source"], unseen["y"], unseen["score"],
                              unseen["source"], n_boot=300, seed=seed)
    from featstore.score import cluster_bootstrap

    cb = cluster_bootstrap(unseen["y"], unseen["score"], unseen["source"], n_boot=300, seed=seed)
    loso = dict(auc=cb["estimate"], auc_lo=cb["lo"], auc_hi=cb["hi"], n_sources=cb["n_sources"], gap=g["estimate"],
                gap_lo=g["lo"], gap_hi=g["hi"], gap_p=g["p"], uncertainty="source",
                metrics=dict(gap=dict(g, seen_from="mixed")))
    below = below_chance(unseen["y"], unseen["score"], unseen["source"], unseen["patient"], n_perm=300, seed=seed)
    return judge(loso, sc, below), roc_auc_score(seen["y"], seen["score"]), sc


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_known_answers(regime, seed):
    v, mixed_auc, sc = _verdict(regime, seed)
    if regime.startswith(("null", "shift")):
        assert v.verdict != SHORTCUT and v.uses_source != "yes", v.reason
        assert abs(sc["estimate"]) < 0.15 or sc["estimate"] < 0, sc
    if regime == "shift":  # a domain shift reads as a drop on new sources, never as a shortcut
        assert v.verdict == DROPS and v.transfer == "drops", v.reason
        assert "It drops on new sources" in v.transfer_text and "held-out sources" in v.transfer_text
    if regime.startswith(("shortcut", "confounded")) and mixed_auc >= 0.7:
        assert v.verdict == SHORTCUT and v.uses_source == "yes", (mixed_auc, v.reason)
        assert sc["same"] < sc["cross"] - 0.1
        # quotable, with the number of sources it rests on
        assert f"on {sc['n_sources']} sources" in v.uses_source_text
    if regime == "shortcut-one-class":  # single-class sources add cross-source pairs only
        assert sc["n_sources"] == 4 and sc["n_same_sources"] == 2


def test_contrast_is_zero_when_the_score_ignores_the_source():
    """Known answer: scores drawn from one distribution per label whatever the source: cross and same
    pairs are ranked alike, the contrast's interval holds 0 and excludes a source advantage of 0.05."""
    rng = np.random.default_rng(0)
    n = 3000
    src = rng.choice(["a", "b", "c"], n, p=[.5, .3, .2])
    y = (rng.random(n) < np.where(src == "a", .8, .2)).astype(int)
    s = y + rng.normal(size=n)
    r = source_contrast(y, s, src, n_boot=400, seed=0)
    assert r["lo"] < 0 < r["hi"] and r["hi"] < 0.05 and r["uncertainty"] == "patient-level"
    v = judge(None, r)
    assert v.uses_source == "no" and "excluded" in v.uses_source_text


def test_contrast_counts_pairs_exactly():
    # two sources; same-source pairs: a: 1 pos x 1 neg, b: 1 x 1; cross: a+ vs b-, b+ vs a-
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.4, 0.6])  # a+ > a-, b+ < b-; a+ > b-, b+ > a-
    r = source_contrast(y, s, np.array(["a", "a", "b", "b"]), n_boot=0)
    assert r["same"] == 0.5 and r["cross"] == 1.0 and r["estimate"] == 0.5
    assert r["n_pairs_same"] == 2 and r["n_pairs_cross"] == 2
    r = source_contrast(y, s, np.array(["a", "a", "a", "a"]), n_boot=0)
    assert r["estimate"] is None and "one source" in r["note"]
    r = source_contrast(np.array([1, 1, 0, 0]), s, np.array(["a", "a", "b", "b"]), n_boot=0)
    assert r["estimate"] is None and "no source has both classes" in r["note"]


def test_patients_resampled_as_clusters_widen_the_interval():
    """Images of one patient share a random effect: resampling images as if independent understates
    the spread; resampling patients does not."""
    d = oof_scores([.8, .6, .4, .2], n_per_source=200, shortcut=1.0, patient_sd=1.5, images_per_patient=6, seed=3)
    pat = source_contrast(d["y"], d["score"], d["source"], d["patient"], n_boot=400, seed=0)
    img = source_contrast(d["y"], d["score"], d["source"], None, n_boot=400, seed=0)
    assert pat["estimate"] == img["estimate"] and pat["se"] > 1.3 * img["se"]


def test_source_level_contrast_is_na_with_two_sources():
    d = oof_scores([.8, .2], n_per_source=100, shortcut=1.5, seed=0)
    r = source_contrast(d["y"], d["score"], d["source"], d["patient"], n_boot=100, resample_sources=True)
    assert r["estimate"] is not None and r["lo"] is None and "n/a" in r["note"]


def test_below_chance_is_a_minimum_over_sources():
    """Six sources whose true AUC is 0.5: the smallest per-source AUC is often well below 0.5, yet Holm
    over the six keeps the rule quiet; a source truly below chance is found."""
    d = oof_scores([.5] * 6, n_per_source=40, seed=5)
    b = below_chance(d["y"], d["score"], d["source"], d["patient"], n_perm=400)
    assert b["n_tests"] == 6 and not b["any"]
    s = d["score"].copy()
    m = d["source"] == "src2"
    s[m] = s[m] - 3 * d["y"][m]  # src2 ranks inverted
    b = below_chance(d["y"], s, d["source"], d["patient"], n_perm=400)
    assert b["any"] and b["worst"] == "src2" and b["per_source"]["src2"]["p_holm"] < 0.05


def _store(folder, shares, signal):
    """Four SYNTHETIC sources with their acquisition fingerprints, embedded with pixelstats."""
    from dataclasses import replace

    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect
    from featstore.synth import SOURCES, generate

    m = generate(folder / "data", n_per_source=60, size=96, seed=5, confounders=True, signal=signal,
                 sources=tuple(replace(s, covid_share=c) for s, c in zip(SOURCES, shares)))
    con = connect(folder / "fs.duckdb")
    I.ingest_rows(con, I.manifest_rows(m)[0], str(m), workers=1)
    embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
    con.close()
    return folder / "fs.duckdb"


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["pure-shortcut", "shift"])
def test_real_heads_end_to_end(regime, tmp_path):
    """The heads fitted for real on synthetic images: a pure shortcut (fingerprints on, positive rates
    .85/.80/.10/.05, no disease signal) is "shortcut likely" for every model whose mixed AUC >= 0.7; a
    domain shift (fingerprints on, positive rates .55/.55/.45/.45) is never "shortcut likely"."""
    import polars as pl

    from featstore.sweep.run import run_study
    from featstore.report import headline
    from featstore.sweep.config import parse_study

    shares, signal = ((.85, .80, .10, .05), 0.0) if regime == "pure-shortcut" else ((.55, .55, .45, .45), 0.1)
    db = _store(tmp_path, shares, signal)
    st = parse_study(dict(study="v", backbones=["pixelstats"], bootstrap=200,
                          heads={"logreg": {"trials": 2}, "lightgbm": {"trials": 1, "fixed": {"n_estimators": 50}}},
                          protocols={"mixed": {"folds": 3}, "loso": {}}))
    rep = run_study(st, db, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows = pl.DataFrame(rep.rows, infer_schema_length=None)
    h = headline(rows)
    mixed = rows.filter((pl.col("kind") == "pooled") & (pl.col("protocol") == "mixed"))
    auc = dict(zip(mixed["head"].to_list(), mixed["auc"].to_list()))
    assert h.height == 2
    for r in h.iter_rows(named=True):
        if regime == "shift":
            assert r["verdict"] != SHORTCUT, r
        elif auc[r["head"]] >= 0.7:
            assert r["verdict"] == SHORTCUT and r["uses the source?"] == "yes", (auc, r)
        assert "4 sources" in r["uses the source? cross − same-source AUC [CI]"]


@pytest.mark.slow
def test_coverage_script_runs(tmp_path):
    """benchmarks/verdict_coverage.py (the RESULTS.md section) at a tiny size, so it cannot rot."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "verdict_coverage.py"
    r = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for regime in ("null", "shift", "shortcut", "confounded"):
        assert f"| {regime} | 3 | 100 | " in out
    assert "| 3 | 20 | 3 |" in out and "| 3 | 10 | 3 |" in out and "Holm over sources" in out


def test_patients_are_clusters_in_the_per_source_auc_interval():
    from featstore.score import cluster_bootstrap

    d = oof_scores([.5] * 4, 200, signal=1.0, patient_sd=1.5, images_per_patient=6, seed=1)
    pat = cluster_bootstrap(d["y"], d["score"], d["source"], group=d["patient"], n_boot=300, resample_sources=False)
    img = cluster_bootstrap(d["y"], d["score"], d["source"], n_boot=300, resample_sources=False)
    assert pat["estimate"] == img["estimate"] and pat["se"] > 1.4 * img["se"]
    # one image per patient: the same resamples as the image bootstrap
    one = cluster_bootstrap(d["y"], d["score"], d["source"], group=np.arange(len(d["y"])), n_boot=300,
                            resample_sources=False)
    assert one["se"] == img["se"]


def test_too_few_minority_patients_give_no_interval():
    """5 images per source: the patient-level interval would cover about half the time (RESULTS.md), so
    there is none, the note gives the number and the verdict's first answer is n/a."""
    d = oof_scores([.85, .6, .35, .1], 5, shortcut=1.5, seed=0)
    r = source_contrast(d["y"], d["score"], d["source"], d["patient"], n_boot=100)
    assert r["estimate"] is not None and r["lo"] is None and r["p"] is None and r["n_minority"] < 20
    assert f"only {r['n_minority']} minority-class patients" in r["note"]
    v = judge(None, r)
    assert v.uses_source == "n/a" and "Not decidable" in v.uses_source_text
