"""Domain probe (paper 003, Table 2): how well a representation predicts its image's source.

Logistic regression on standardised features, stratified k-fold, out-of-fold probabilities ->
macro one-vs-rest AUC (bootstrap CI) and one AUC per source. 0.5 is chance; the paper found
0.94-0.97 on pretrained embeddings.
"""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import LabelEncoder, StandardScaler


def domain_probe(Z, sources, folds: int = 5, seed: int = 0, C: float = 1.0, n_boot: int = 500) -> dict:
    sources = np.asarray(sources)
    enc = LabelEncoder().fit(sources)
    d = enc.transform(sources)
    if len(enc.classes_) < 2:
        raise ValueError("the domain probe needs at least two sources")
    k = min(folds, int(np.bincount(d).min()))
    if k < 2:
        raise ValueError("every source needs at least two images for the domain probe")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    P = cross_val_predict(model, np.asarray(Z, dtype=np.float64), d,
                          cv=StratifiedKFold(k, shuffle=True, random_state=seed), method="predict_proba")
    labels = list(range(len(enc.classes_)))

    def macro(idx):
        idx = idx.astype(int)
        if len(np.unique(d[idx])) < len(labels):
            return np.nan
        if len(labels) == 2:
            return roc_auc_score(d[idx], P[idx, 1])
        return roc_auc_score(d[idx], P[idx], multi_class="ovr", average="macro", labels=labels)
    auc = float(macro(np.arange(len(d))))
    lo = hi = None
    if n_boot > 0:
        res = stats.bootstrap((np.arange(len(d), dtype=float),), macro, n_resamples=n_boot, vectorized=False,
                              method="percentile", rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    per = {str(s): float(roc_auc_score(d == i, P[:, i])) for i, s in enumerate(enc.classes_)}
    return dict(auc=auc, auc_lo=lo, auc_hi=hi, per_source=per, n=int(len(d)), n_sources=len(labels), folds=k)
