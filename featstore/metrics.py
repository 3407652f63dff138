"""Binary classification metrics as scikit-learn computes them, without its per-call input checks.

`sklearn.metrics.roc_auc_score` checks its inputs on every call (type_of_target, check_array, label
binarising and, in scikit-learn 1.9, a narwhals dataframe probe per array): about 5 ms a call, where the
area itself takes tens of microseconds on a few hundred scores. A sweep computes an AUC for every trial,
fold, test set, source, (source, label) group and demographic value, so in a small study those checks
were about a sixth of the time (a profile of the sweep tests: roc_auc_score 49 of 380 s, the confusion
metrics another 17). The functions here do scikit-learn's array operations in its order, so they give
the same floats bit for bit (tests/test_metrics.py compares them with scikit-learn on random inputs,
ties and float32 scores included); what is outside the plain case (not exactly two classes, scores that
are not a finite 1-D vector, labels that are not numbers) goes to scikit-learn itself, which decides.
"""
from __future__ import annotations

import numpy as np


def _plain(y, s):
    """(y as 0/1 int32 with the greater label positive, s) for the plain binary case, else None."""
    y, s = np.asarray(y), np.asarray(s)
    if (y.ndim != 1 or s.ndim != 1 or y.shape != s.shape or y.dtype.kind not in "biuf"
            or s.dtype.kind not in "biuf"):
        return None
    if (y.dtype.kind == "f" and not np.isfinite(y).all()) or (s.dtype.kind == "f" and not np.isfinite(s).all()):
        return None
    labels = np.unique(y)
    if labels.shape[0] != 2:
        return None
    return (y == labels[1]).astype(np.int32), s


def _curve(t, s):
    """scikit-learn's roc_curve (drop_intermediate=True) on 0/1 targets t: fpr, tpr, thresholds."""
    order = np.argsort(s, kind="stable")[::-1]  # descending; the order within a tie changes no count
    s, t = s[order], t[order]
    thr = np.concatenate([np.nonzero(np.diff(s))[0], np.asarray([t.shape[0] - 1])])
    tps = np.cumsum(t.astype(np.float64) * 1.0, dtype=np.float64)[thr]
    fps = 1 + thr.astype(np.float64) - tps
    thresholds = s[thr]
    if fps.shape[0] > 2:
        keep = np.where(np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]]))[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps = np.concatenate([np.asarray([0.0]), tps])
    fps = np.concatenate([np.asarray([0.0]), fps])
    thresholds = np.concatenate([np.asarray([np.inf]), thresholds.astype(np.float64)])
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_auc(y, score) -> float:
    """sklearn.metrics.roc_auc_score(y, score) for a binary y and a 1-D score."""
    plain = _plain(y, score)
    if plain is None:
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, score))
    from scipy.integrate import trapezoid  # what sklearn.metrics.auc integrates with

    fpr, tpr, _ = _curve(*plain)
    return float(trapezoid(tpr, fpr))  # fpr never decreases: sklearn.metrics.auc's direction is 1


def roc_curve(y, score):
    """sklearn.metrics.roc_curve(y, score): (fpr, tpr, thresholds), for y in {0, 1} with both present."""
    y_arr = np.asarray(y)
    plain = _plain(y_arr, score)
    if plain is None or not np.array_equal(np.unique(y_arr), [0, 1]):
        from sklearn.metrics import roc_curve as sk_roc_curve

        return sk_roc_curve(y, score)
    return _curve(*plain)


def confusion_counts(y, yhat) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) of 0/1 labels, as confusion_matrix(y, yhat, labels=[0, 1]).ravel() gives them."""
    y, yhat = np.asarray(y), np.asarray(yhat)
    n, p = y == 0, y == 1
    return (int((n & (yhat == 0)).sum()), int((n & (yhat == 1)).sum()),
            int((p & (yhat == 0)).sum()), int((p & (yhat == 1)).sum()))


def accuracy(y, yhat) -> float:
    """sklearn.metrics.accuracy_score(y, yhat) of two label vectors."""
    return float(np.average(np.asarray(y) == np.asarray(yhat)))


def f1(tp: int, fp: int, fn: int) -> float:
    """sklearn.metrics.f1_score(y, yhat, zero_division=0) from the counts: 2 tp / (2 tp + fp + fn)."""
    denom = 1.0 * float(tp + fn) + float(tp + fp)
    return (2.0 * float(tp)) / denom if denom else 0.0


def brier(y, p) -> float:
    """sklearn.metrics.brier_score_loss(y, p, pos_label=1), y in {0, 1}, p = P(positive) in [0, 1]."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if (p.ndim != 1 or y.shape != p.shape or not p.size or p.max() > 1 or p.min() < 0 or not np.isfinite(p).all()
            or not ((y == 0) | (y == 1)).all()):
        from sklearn.metrics import brier_score_loss

        return float(brier_score_loss(y, p, pos_label=1))
    t = np.asarray(y == 1, dtype=np.int64)
    labels = np.stack((1 - t, t), axis=1).astype(p.dtype, copy=False)
    return float(np.average(np.sum((labels - np.stack((1 - p, p), axis=1)) ** 2, axis=1)) * 0.5)
