import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from featstore.score import auc_ci, binary_metrics, gap_test, mcnemar_p, multiclass_metrics


def test_binary_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([.9, .8, .3, .2, .6, .1, .4, .7])
    m = binary_metrics(y, p, n_boot=0)
    # calls at 0.5: tp=3 (0.9 .8 .7) fn=1 (.3) fp=1 (.6) tn=3
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["sensitivity"] == m["specificity"] == m["ppv"] == m["npv"] == 0.75
    assert m["dor"] == pytest.approx((3.5 * 3.5) / (1.5 * 1.5))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_auc_ci_covers_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = y * 0.4 + rng.random(400) * 0.8
    a = auc_ci(y, p, n_boot=300, seed=1)
    assert a[1] < a[0] < a[2] and a[3] > 0
    assert a == auc_ci(y, p, n_boot=300, seed=1)


def test_one_class_gives_undefined_auc_not_a_number():
    m = binary_metrics(np.zeros(30, int), np.linspace(0, 1, 30), n_boot=100)
    assert m["auc"] is None and m["sensitivity"] is None and m["balanced_accuracy"] is None
    assert m["specificity"] == pytest.approx(15 / 30)
    # AUC ranks on the score when given: saturated probabilities would tie
    y = np.array([0, 0, 1, 1])
    assert binary_metrics(y, np.ones(4), n_boot=0)["auc"] == 0.5
    assert binary_metrics(y, np.ones(4), n_boot=0, score=np.array([40., 41, 42, 43]))["auc"] == 1.0


def test_multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    P = rng.dirichlet([1, 1, 1], 300)
    P[np.arange(300), y] += 1
    P /= P.sum(1, keepdims=True)
    m = multiclass_metrics(y, P, 3, n_boot=50)
    assert m["auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr"))
    assert m["auc_lo"] <= m["auc"] <= m["auc_hi"]
    assert 0 < m["mean_class_accuracy"] <= 1 and m["n_0"] + m["n_1"] + m["n_2"] == 300


def test_gap_and_mcnemar():
    g = gap_test(dict(auc=0.95, auc_se=0.01), dict(auc=0.6, auc_se=0.03))
    assert g["gap"] == pytest.approx(0.35) and g["gap_p"] < 1e-6
    assert gap_test(dict(auc=0.9, auc_se=0.1), dict(auc=None))["gap"] is None
    y = np.array([1] * 50 + [0] * 50)
    assert mcnemar_p(y, y, y) == 1.0
    assert mcnemar_p(y, y, 1 - y) < 1e-6
