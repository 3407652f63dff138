"""Score: metrics with uncertainty, from scikit-learn, SciPy and statsmodels.

AUC confidence intervals are stratified percentile bootstraps (SciPy `bootstrap` resamples the
positives and the negatives independently, so every resample has both classes). Undefined
metrics (AUC on a one-class set, PPV with no positive calls, ...) are None, never dropped.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import (accuracy_score, brier_score_loss, confusion_matrix, f1_score, recall_score,
                             precision_score, roc_auc_score)

BINARY_KEYS = ("auc", "auc_lo", "auc_hi", "auc_se", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1",
               "balanced_accuracy", "dor", "brier")


def _div(a, b):
    return float(a) / b if b else None


def _auc_stat(pos, neg, axis=-1):
    return stats.mannwhitneyu(pos, neg, axis=axis, method="asymptotic").statistic / (pos.shape[axis] * neg.shape[axis])


def auc_ci(y, p, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """(auc, lo, hi, se); all None when y has one class."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None, None, None, None
    auc = float(roc_auc_score(y, p))
    if n_boot <= 0 or min(len(pos), len(neg)) < 2:  # one example of a class: no resampling to do
        return auc, None, None, None
    res = stats.bootstrap((pos, neg), _auc_stat, n_resamples=n_boot, paired=False, vectorized=True,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return auc, float(ci.low), float(ci.high), float(res.standard_error)


def binary_metrics(y, p, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, score=None) -> dict:
    """y in {0, 1}; p = P(positive). Threshold-based metrics call p >= threshold positive. AUC ranks on
    `score` (e.g. log-odds, which do not saturate) when given, else on p."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    yhat = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, yhat, labels=[0, 1]).ravel()
    auc, lo, hi, se = auc_ci(y, p if score is None else score, n_boot, seed)
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    both = sens is not None and spec is not None
    m = dict(auc=auc, auc_lo=lo, auc_hi=hi, auc_se=se,
             accuracy=float(accuracy_score(y, yhat)),
             sensitivity=sens, specificity=spec, ppv=_div(tp, tp + fp), npv=_div(tn, tn + fn),
             f1=float(f1_score(y, yhat, zero_division=0)) if tp + fn else None,
             balanced_accuracy=(sens + spec) / 2 if both else None,
             # Haldane-Anscombe: +0.5 in every cell so a zero cell gives a finite odds ratio
             dor=((tp + .5) * (tn + .5)) / ((fp + .5) * (fn + .5)),
             brier=float(brier_score_loss(y, p, pos_label=1)) if len(y) else None,
             n=int(len(y)), n_pos=int((y == 1).sum()), n_neg=int((y == 0).sum()),
             tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))
    return m


def multiclass_metrics(y, P, n_classes: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """y in 0..K-1, P [n, K]: macro one-vs-rest AUC (bootstrap CI), accuracy, mean per-class accuracy
    (= mean recall), per-class sensitivity and PPV (paper 001)."""
    y = np.asarray(y).astype(int)
    P = np.asarray(P, dtype=float)
    labels = list(range(n_classes))
    yhat = P.argmax(1)
    present = np.unique(y)
    auc = lo = hi = se = None
    if len(present) == n_classes:
        def stat(idx):
            idx = idx.astype(int)
            if len(np.unique(y[idx])) < n_classes:
                return np.nan
            return roc_auc_score(y[idx], P[idx], multi_class="ovr", average="macro", labels=labels)
        auc = float(stat(np.arange(len(y))))
        if n_boot > 0:
            res = stats.bootstrap((np.arange(len(y), dtype=float),), stat, n_resamples=n_boot, vectorized=False,
                                  method="percentile", rng=np.random.default_rng(seed))
            lo, hi, se = float(res.confidence_interval.low), float(res.confidence_interval.high), \
                float(res.standard_error)
    recalls = recall_score(y, yhat, labels=labels, average=None, zero_division=np.nan)
    precisions = precision_score(y, yhat, labels=labels, average=None, zero_division=np.nan)
    m = dict(auc=auc, auc_lo=lo, auc_hi=hi, auc_se=se, accuracy=float(accuracy_score(y, yhat)),
             mean_class_accuracy=float(np.nanmean(recalls)) if not np.all(np.isnan(recalls)) else None,
             n=int(len(y)))
    for k in labels:
        m[f"sensitivity_{k}"] = None if math.isnan(recalls[k]) else float(recalls[k])
        m[f"ppv_{k}"] = None if math.isnan(precisions[k]) else float(precisions[k])
        m[f"n_{k}"] = int((y == k).sum())
    return m


def gap_test(seen: dict, unseen: dict) -> dict:
    """Seen AUC - unseen AUC on two independent test sets: two-sided z-test with the bootstrap
    standard errors (sqrt(se1^2 + se2^2)). McNemar does not apply: the sets are not paired."""
    a, b = seen.get("auc"), unseen.get("auc")
    if a is None or b is None:
        return dict(gap=None, gap_se=None, gap_z=None, gap_p=None, gap_test="z-test, bootstrap SE (undefined)")
    se = math.sqrt((seen.get("auc_se") or 0) ** 2 + (unseen.get("auc_se") or 0) ** 2)
    z = (a - b) / se if se > 0 else (math.inf if a != b else 0.0)
    p = float(2 * stats.norm.sf(abs(z))) if math.isfinite(z) else 0.0
    return dict(gap=a - b, gap_se=se, gap_z=z, gap_p=p, gap_test="two-sided z-test, bootstrap SE")


def mcnemar_p(y, pred_a, pred_b) -> float:
    """Paired comparison of two classifiers' correctness on one test set (paper 000): exact McNemar."""
    from statsmodels.stats.contingency_tables import mcnemar

    ca, cb = np.asarray(pred_a) == np.asarray(y), np.asarray(pred_b) == np.asarray(y)
    table = [[int((ca & cb).sum()), int((ca & ~cb).sum())], [int((~ca & cb).sum()), int((~ca & ~cb).sum())]]
    return float(mcnemar(table, exact=True).pvalue)
