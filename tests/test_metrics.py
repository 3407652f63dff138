"""featstore.metrics gives scikit-learn's numbers bit for bit (==, not approx): the sweep's AUCs choose
trials and fill result rows, so a last-bit difference could change a choice or a frozen row."""
import warnings

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, brier_score_loss, confusion_matrix, f1_score, roc_auc_score,
                             roc_curve)

from featstore import metrics as M


def _cases(n_cases=300, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        n = int(rng.integers(2, 400))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
        y[rng.integers(n)] = 1 - y[0] if n > 1 else y[0]  # both classes in most cases
        kind = i % 6
        if kind == 0:
            s = rng.standard_normal(n) + y * rng.uniform(0, 2)
        elif kind == 1:  # heavy ties
            s = np.round(rng.standard_normal(n) + y, 1)
        elif kind == 2:  # float32 scores with ties
            s = np.round(rng.random(n) + 0.3 * y, 2).astype(np.float32)
        elif kind == 3:  # probabilities that saturate
            s = 1 / (1 + np.exp(-40 * (rng.standard_normal(n) + y)))
        elif kind == 4:  # integer scores
            s = rng.integers(0, 5, n) + y
        else:  # all scores equal
            s = np.full(n, 0.25)
        yield y, s


def test_roc_auc_and_curve_are_sklearns_bit_for_bit():
    checked = 0
    for y, s in _cases():
        if len(np.unique(y)) < 2:
            continue
        for yy in (y, y.astype(bool), y.astype(float), y + 1, 2 * y - 1):  # the label encodings the callers use
            assert M.roc_auc(yy, s) == roc_auc_score(yy, s)
        f, t, th = M.roc_curve(y, s)
        F, T, TH = roc_curve(y, s)
        assert np.array_equal(f, F) and np.array_equal(t, T) and np.array_equal(th, TH)
        assert f.dtype == F.dtype and th.dtype == TH.dtype
        checked += 1
    assert checked > 250


def test_roc_auc_outside_the_plain_case_is_sklearns_answer():
    y, s = np.array([0, 1, 2, 1, 0]), np.array([0.1, 0.4, 0.3, 0.8, 0.2])
    with pytest.raises(ValueError):  # three classes, one score column: sklearn refuses, so does this
        M.roc_auc(y, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(M.roc_auc([1, 1, 1], [0.2, 0.3, 0.1]))  # one class: sklearn's NaN
    with pytest.raises(ValueError):  # a NaN score: sklearn's error
        M.roc_auc([0, 1, 0], [0.1, np.nan, 0.3])
    assert M.roc_auc(["a", "b", "a", "b"], [0.1, 0.9, 0.2, 0.8]) == roc_auc_score(["a", "b", "a", "b"],
                                                                                   [0.1, 0.9, 0.2, 0.8])


def test_threshold_metrics_are_sklearns_bit_for_bit():
    for y, s in _cases(200, seed=1):
        p = 1 / (1 + np.exp(-np.asarray(s, float)))
        for thr in (0.5, 0.7):
            yhat = (p >= thr).astype(int)
            tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, yhat, labels=[0, 1]).ravel())
            assert M.confusion_counts(y, yhat) == (tn, fp, fn, tp)
            assert M.accuracy(y, yhat) == accuracy_score(y, yhat)
            assert M.f1(tp, fp, fn) == f1_score(y, yhat, zero_division=0)
        assert M.brier(y, p) == brier_score_loss(y, p, pos_label=1)
    assert M.f1(0, 0, 0) == f1_score([0, 0], [0, 0], zero_division=0) == 0.0
    with pytest.raises(ValueError):  # a probability above 1: sklearn's error
        M.brier([0, 1], [0.2, 1.5])
