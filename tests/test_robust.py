"""Shortcut-robust heads, the rules that select them and the metrics that judge them, on known answers.

Synthetic vectors (no images): a weak disease direction and a strong source fingerprint, in sources whose
COVID share differs (90% vs 10%): a source x label confounder planted by construction."""
import numpy as np
import optuna
import pytest
from sklearn.metrics import roc_auc_score

from featstore.heads import create_head
from featstore.score import ece, group_metrics, robust_metrics, subgroup_metrics
from featstore.split import SELECTIONS, age_band, source_probe_auc, worst_class_accuracy, worst_group_accuracy


def _confounded(n, seed, prev=(0.9, 0.1), fingerprint=3.0, signal=1.0):
    rng = np.random.default_rng(seed)
    src = np.repeat(["A", "B"], n)
    y = np.concatenate([rng.random(n) < p for p in prev]).astype(int)
    X = rng.normal(size=(len(y), 8))
    X[:, 0] += signal * y
    X[:, 1:3] += fingerprint * (src == "A")[:, None]
    return X, y, src


ROBUST = {"dfr": {}, "groupdro": {}, "reweight": {}}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_heads_raise_worst_group_auc_over_logistic_regression(seed):
    """The logistic head learns the fingerprint (it predicts the label in training): the positives of the
    mostly-negative source rank below the negatives. Group-balanced DFR, GroupDRO and reweighting do
    not lean on it: worst-group AUC rises by > 0.05 on fresh images from the same sources."""
    X, y, src = _confounded(300, seed)
    Xt, yt, st = _confounded(300, seed + 100)
    base = create_head("logreg", C=1.0).fit(X, y, domains=src)
    wg = {}
    for name in ["logreg", *ROBUST]:
        h = base if name == "logreg" else create_head(name, **ROBUST[name]).fit(X, y, domains=src)
        wg[name] = group_metrics(yt, h.decision_function(Xt), st, h.predict_proba(Xt)[:, 1])
    for name in ROBUST:
        assert wg[name]["worst_group_auc"] > wg["logreg"]["worst_group_auc"] + 0.05, (name, wg)
        assert wg[name]["worst_group_accuracy"] > wg["logreg"]["worst_group_accuracy"] + 0.2, (name, wg)


def test_without_a_confounder_the_robust_heads_cost_little():
    """Built to catch a head that is 'robust' by being weak: sources with the same COVID share (no
    confounder), the fingerprint still there; the robust heads stay within 0.03 AUC of logistic regression."""
    from sklearn.metrics import roc_auc_score

    X, y, src = _confounded(300, 7, prev=(0.5, 0.5))
    Xt, yt, _ = _confounded(300, 107, prev=(0.5, 0.5))
    ref = roc_auc_score(yt, create_head("logreg", C=1.0).fit(X, y, domains=src).decision_function(Xt))
    for name in ROBUST:
        a = roc_auc_score(yt, create_head(name, **ROBUST[name]).fit(X, y, domains=src).decision_function(Xt))
        assert a > ref - 0.03, (name, a, ref)


def test_robust_heads_are_deterministic_and_use_only_what_they_are_given():
    X, y, src = _confounded(100, 3)
    for name in ROBUST:
        a = create_head(name, random_state=5).fit(X, y, domains=src).decision_function(X)
        b = create_head(name, random_state=5).fit(X, y, domains=src).decision_function(X)
        assert np.array_equal(a, b), name
        # without sources the groups are the labels: class balancing, still a working classifier
        h = create_head(name).fit(X, y)
        assert (h.predict(X) == y).mean() > 0.6


def test_dfr_draws_balanced_subsets_from_its_held_out_part():
    X, y, src = _confounded(200, 4)
    h = create_head("dfr", holdout=0.5, min_group=1).fit(X, y, domains=src)
    # 4 groups (A|1 ~180, A|0 ~20, B|1 ~20, B|0 ~180); the held-out half's smallest group sets the size
    smallest = min(((src == s) & (y == v)).sum() for s in "AB" for v in (0, 1))
    assert h.n_groups_ == 4 and abs(h.group_size_ - smallest / 2) <= 1 and abs(h.n_held_out_ - 200) <= 2


def test_groupdro_weights_the_worst_group():
    X, y, src = _confounded(200, 5)
    """Its point: a lower worst-group training loss than the same head with the group weights frozen
    uniform (eta=0: plain average loss, which the big groups dominate); the weights leave uniform."""
    dro = create_head("groupdro", eta=0.05).fit(X, y, domains=src)
    erm = create_head("groupdro", eta=0.0).fit(X, y, domains=src)
    assert dro.group_loss_.max() < erm.group_loss_.max() - 0.02, (dro.group_loss_, erm.group_loss_)
    # at its saddle point the group losses are equal; the average-loss head leaves them apart
    assert np.ptp(dro.group_loss_) < 0.02 < 0.05 < np.ptp(erm.group_loss_)
    assert np.allclose(erm.group_weights_, 1 / 4) and dro.group_weights_.max() > 1 / 4 + 0.01


# --- metrics ---------------------------------------------------------------------------------------

def test_group_metrics_known_answer():
    """A pure source scorer: within each source the score is constant; positives of the mostly-negative
    source rank below every negative of the other source -> that group's AUC is low."""
    src = np.array(["A"] * 10 + ["B"] * 10)
    y = np.array([1] * 9 + [0] + [1] + [0] * 9)
    s = (src == "A").astype(float)
    g = group_metrics(y, s, src, p=s, min_n=1)
    # B|1 (score 0) vs the 10 negatives (A|0 score 1, nine B|0 score 0): ties count half -> 0.45
    assert g["groups"]["B|1"]["auc"] == pytest.approx(0.45)
    assert g["groups"]["A|1"]["auc"] == pytest.approx(0.95)  # the majority groups look fine
    assert g["worst_group_auc"] == pytest.approx(0.45) and g["worst_group_auc_group"] == "A|0"  # tie: by name
    assert g["worst_group_accuracy"] == 0.0
    assert group_metrics(y, s, src, p=s, min_n=5)["worst_group_auc_group"] not in ("A|0", "B|1")  # too small


def test_ece_known_answers_and_by_simulation():
    assert ece([0, 1, 0, 1], [0.9, 0.9, 0.9, 0.9])["ece"] == pytest.approx(0.4)
    assert ece([1, 1], [1.0, 1.0])["ece"] == 0.0  # p = 1 falls in the last bin
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    calibrated = ece(rng.random(20000) < p, p)["ece"]
    over = ece(rng.random(20000) < p, np.clip(p + 0.2, 0, 1))["ece"]
    assert calibrated < 0.02 and over > 0.15
    assert sum(b["n"] for b in ece(rng.random(100) < 0.5, rng.random(100))["bins"]) == 100


def test_subgroup_metrics_find_a_planted_tpr_gap():
    rng = np.random.default_rng(1)
    n = 4000
    sex = rng.choice(["F", "M"], n)
    y = rng.integers(0, 2, n)
    # men's positives are called positive 90% of the time, women's 60%
    p = np.where(y == 1, np.where(sex == "M", rng.random(n) < 0.9, rng.random(n) < 0.6), rng.random(n) < 0.1) * 0.8 + 0.1
    m = subgroup_metrics(y, p, p, sex)
    assert m["tpr_gap"] == pytest.approx(0.3, abs=0.05) and m["fpr_gap"] < 0.05
    assert m["groups"]["M"]["tpr"] > m["groups"]["F"]["tpr"]
    # a value with one class keeps its FPR, its AUC and TPR are undefined (None), never a crash
    only_neg = subgroup_metrics(np.r_[y, np.zeros(50, int)], np.r_[p, np.full(50, 0.9)], np.r_[p, np.full(50, 0.9)],
                                np.r_[sex, np.full(50, "X")])
    assert only_neg["groups"]["X"]["auc"] is None and only_neg["groups"]["X"]["fpr"] == 1.0
    assert subgroup_metrics(y, p, p, np.full(n, None)) is None


def _metricframe_subgroups(y, score, p, attribute, threshold=0.5, min_n=10):
    """The reference: fairlearn's MetricFrame by group, on the rows subgroup_metrics keeps."""
    from fairlearn.metrics import MetricFrame

    a = np.asarray(attribute, dtype=object)
    keep = np.array([v is not None and v == v and str(v) != "" for v in a], dtype=bool)
    a = np.where(keep, a, "").astype(str)
    vals = [v for v in set(a[keep]) if (keep & (a == v)).sum() >= min_n]
    if len(vals) < 2:
        return {}
    keep &= np.isin(a, vals)
    y, s = np.asarray(y).astype(int)[keep], np.asarray(score, float)[keep]
    yhat = (np.asarray(p, float)[keep] >= threshold).astype(int)

    def auc(yt, yp, score):
        return roc_auc_score(yt, score) if len(np.unique(yt)) == 2 else np.nan

    by = MetricFrame(metrics={"auc": auc, "tpr": lambda yt, yp: yp[yt == 1].mean() if (yt == 1).any() else np.nan,
                              "fpr": lambda yt, yp: yp[yt == 0].mean() if (yt == 0).any() else np.nan},
                     y_true=y, y_pred=yhat, sensitive_features=a[keep], sample_params={"auc": {"score": s}}).by_group
    return {str(k): {c: None if np.isnan(by.loc[k, c]) else float(by.loc[k, c]) for c in ("auc", "tpr", "fpr")}
            | {"n": int((a[keep] == k).sum())} for k in by.index}


def test_subgroup_metrics_are_fairlearns_metricframe_by_group():
    """Computed per value (MetricFrame's pandas machinery was a tenth of a small sweep), checked value for
    value against MetricFrame: ties, missing values, a value below min_n, a value with one class."""
    rng = np.random.default_rng(4)
    for case in range(40):
        n = int(rng.integers(20, 300))
        y, s, p = rng.integers(0, 2, n), rng.random(n), rng.random(n)
        if case % 3 == 0:
            s = np.round(s, 1)  # ties
        cats = [["F", "M"], ["0-17", "18-39", "40-59", "60-79", "80+"], ["F", "M", "rare"]][case % 3]
        a = rng.choice(cats + [None, float("nan"), ""], n, p=[0.9 / len(cats)] * len(cats) + [0.1 / 3] * 3)
        a = a.astype(object)
        if case % 3 == 2:
            a[np.flatnonzero(a == "rare")[5:]] = "F"  # under min_n: left out
        if case % 4 == 1:
            y[a == cats[0]] = 0  # one class: no AUC, no TPR
        got = subgroup_metrics(y, s, p, a)
        want = _metricframe_subgroups(y, s, p, a)
        if len(want) < 2:
            assert got is None
            continue
        assert got["groups"] == want and list(got["groups"]) == sorted(want)
        for c in ("auc", "tpr", "fpr"):
            v = [g[c] for g in want.values() if g[c] is not None]
            assert got[f"{c}_gap"] == (max(v) - min(v) if len(v) >= 2 else None)


def test_age_bands():
    assert list(age_band([5, 18, 39.9, 40, 65, 80, None, float("nan"), "x"])) == \
        ["0-17", "18-39", "18-39", "40-59", "60-79", "80+", None, None, None]


def test_robust_metrics_row_fields():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    s = y + rng.normal(size=300)
    m = robust_metrics(y, 1 / (1 + np.exp(-s)), s, rng.choice(["a", "b"], 300),
                       {"sex": rng.choice(["F", "M"], 300), "age_band": np.full(300, None)})
    assert {"worst_group_auc", "worst_group_accuracy", "ece", "reliability", "sex_tpr_gap"} <= set(m)
    assert "age_band_tpr_gap" not in m  # no ages: no subgroup entry


# --- selection rules --------------------------------------------------------------------------------

def test_worst_group_and_worst_class_scores():
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0] * 2)
    src = np.repeat(["a", "b"], 10)
    proba = np.zeros((20, 2))
    pred = y.copy()
    pred[10:15] = 0  # b's positives all missed
    proba[np.arange(20), pred] = 1
    v, extra = worst_group_accuracy(y, None, proba, src)
    assert v == 0.0 and extra["worst_group"] == "b|1"
    assert worst_class_accuracy(y, None, proba)[0] == 0.5


def test_source_probe_and_the_least_source_choice():
    rng = np.random.default_rng(3)
    src = np.repeat(["a", "b", "c"], 60)
    Z_source = rng.normal(size=(180, 4)) + 3 * (src == "a")[:, None]
    assert source_probe_auc(Z_source, src) > 0.8
    assert source_probe_auc(rng.normal(size=(180, 4)), src) < 0.65

    class T:
        def __init__(self, number, value, probe):
            self.number, self.value, self.user_attrs = number, value, {"probe_auc": probe}
    choose = SELECTIONS["min-source-probe"].choose
    # the least-source trial within 0.02 of the best AUC wins; one outside the band never does
    trials = [T(0, 0.90, 0.9), T(1, 0.885, 0.6), T(2, 0.80, 0.5)]
    assert choose(trials).number == 1
    assert choose([T(0, 0.9, None), T(1, 0.89, None)]).number == 0  # no probe: the higher AUC


@pytest.mark.slow
def test_selection_rules_end_to_end_select_without_the_held_out_source():
    """Each scoring rule runs through the sweep's run_task on vectors, and what it selects does not move when
    the held-out source's labels are scrambled (tests/test_benchmark.py checks the same on a store)."""
    from featstore.split import Fold, make_meta
    from featstore.sweep.fit import run_task
    from featstore.sweep.plan import Task

    X, y, src = _confounded(150, 9)
    X3, y3, _ = _confounded(75, 19, prev=(0.5, 0.5))
    X = np.r_[X, X3]
    y = np.r_[y, y3]
    src = np.r_[src, np.full(150, "C")]
    meta = make_meta(src, y)
    train, test = np.flatnonzero(src != "C"), np.flatnonzero(src == "C")
    fold = Fold("loso", "heldout=C", train, {"unseen": test}, ("A", "B"), ("C",))
    for rule in ("worst-group", "worst-class", "min-source-probe"):
        for head in ("dfr", "logreg"):
            out = []
            for scramble in (False, True):
                yy = y.copy()
                if scramble:
                    yy[test] = np.random.default_rng(0).permutation(1 - yy[test])
                m = make_meta(src, yy)
                t = Task(f"t|{rule}|{head}", "loso", fold, head, 4, {}, rule, 0, None, 2)
                r = run_task(t, X, m, optuna.storages.InMemoryStorage())
                assert r.error is None, r.error
                out.append((r.params, r.val_score))
            assert out[0] == out[1], (rule, head)


# --- demographic probe --------------------------------------------------------------------------------

def test_demographic_probe_finds_a_planted_attribute_and_not_an_absent_one():
    """Sex planted along one direction of the embedding: the probe recovers it; age bands drawn independently
    of the vectors: chance. Images without the attribute are left out, not counted as a value."""
    from featstore.probe import demographic_probe_rows

    rng = np.random.default_rng(4)
    n = 600
    sex = rng.choice(["F", "M"], n).astype(object)
    X = rng.normal(size=(n, 6))
    X[:, 0] += 1.5 * (sex == "M")
    band = rng.choice(["18-39", "40-59", "60-79"], n).astype(object)
    sex[:100] = None  # no value: left out
    rows = demographic_probe_rows(X, dict(sex=sex, age_band=band, nothing=np.full(n, None)),
                                  np.full(n, "nih"), "bb", "original", "w", n_boot=50)
    by = {r["target"]: r for r in rows}
    assert set(by) == {"sex", "age_band"}  # an attribute nobody has gives no row
    assert by["sex"]["auc"] > 0.8 and by["sex"]["n"] == 500 and by["sex"]["auc_lo"] < by["sex"]["auc"]
    assert abs(by["age_band"]["auc"] - 0.5) < 0.07
    assert set(by["sex"]["metrics"]["values"]) == {"F", "M"} and "nih" in by["sex"]["notes"]


# --- end to end: a sweep with several rules, its rows and the report's table ----------------------------

@pytest.mark.slow
def test_a_sweep_with_several_rules_gives_the_head_by_selection_table(synth_stores, tmp_path, monkeypatch):
    """`selection:` as a list makes one model per head and rule; every binary row carries worst group and
    ECE; the report's table puts each head beside logistic regression under the same rule, with the
    paired test."""
    import polars as pl

    from featstore.report import compare_models, robust_table
    from featstore.sweep.config import parse_study
    from featstore.sweep.run import run_study

    st = parse_study(dict(study="robust", backbones=["pixelstats"], heads={"logreg": {"trials": 2}, "dfr": {"trials": 2}},
                          protocols={"loso": {}}, selection=["train-val", "worst-group"], bootstrap=50))
    rep = run_study(st, synth_stores["confounded"], tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows = pl.DataFrame(rep.rows, infer_schema_length=None)
    assert set(rows["selection"]) == {"train-val", "worst-group"}
    pooled = rows.filter((pl.col("kind") == "pooled") & (pl.col("test_set") == "unseen"))
    assert pooled.height == 4
    for m in pooled["metrics"]:
        m = m if isinstance(m, dict) else __import__("json").loads(m)
        assert 0 <= m["worst_group_auc"] <= m["auc"] + 1e-9 and 0 <= m["ece"] <= 1 and m["reliability"]
    import duckdb

    with duckdb.connect(str(synth_stores["confounded"]), read_only=True) as con:
        preds = pl.from_arrow(con.sql("SELECT * FROM predictions WHERE sweep_id = ?", params=[rep.sweep_id]).to_arrow_table())
    assert preds.height, "no predictions stored"
    import featstore.report

    # the synthetic stores hold pixelstats only, a raw-pixel baseline that is never a reference: let it be one here
    monkeypatch.setattr(featstore.report, "BASELINE_BACKBONES", ())
    cmp_ = compare_models(rows, preds)
    assert cmp_.height, rows.filter(pl.col("kind") == "source-mean").select("head", "selection", "auc", "status")
    assert sorted(cmp_["selection"]) == ["train-val", "worst-group"]
    t = robust_table(rows, cmp_)
    assert t.height == 4 and t["head"].to_list() == ["logreg", "dfr", "logreg", "dfr"]
    assert t["vs logreg [CI]"].to_list()[0] == "reference" and t["p (Holm)"][1] not in ("—", None)
