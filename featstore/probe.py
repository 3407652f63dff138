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


def grl_representation(X, y, sources, seed: int = 0, **grl_params) -> np.ndarray:
    """The GRL head's representation of every image, cross-fitted: two source-stratified halves, each
    transformed by a GRL head fitted on the other half, so no image is probed through a head that
    trained on it."""
    from featstore.heads import GRLHead

    sources = np.asarray(sources)
    folds = StratifiedKFold(2, shuffle=True, random_state=seed).split(X, sources)
    Z = None
    for fit, out in folds:
        head = GRLHead(random_state=seed, **grl_params).fit(X[fit], y[fit], domains=sources[fit])
        z = head.transform(X[out])
        if Z is None:
            Z = np.zeros((len(X), z.shape[1]))
        Z[out] = z
    return Z


def probe_rows(X, meta, backbone: str, preprocess: str, weights_id: str, positive: str = "covid",
               grl: bool = True, folds: int = 5, seed: int = 0, n_boot: int = 500) -> list[dict]:
    """Rows for the `results` table: the probe on raw embeddings (all images, and each label alone)
    and on the GRL representation (all images)."""
    src = meta["source"].to_numpy().astype(str)
    lab = meta["label"].to_numpy().astype(str)
    y = (lab == positive).astype(int)
    reps = [("raw", X)]
    if grl:
        reps.append(("grl_mlp", grl_representation(X, y, src, seed)))
    rows = []
    for rep_name, Z in reps:
        subsets = [("all images", np.ones(len(src), bool))]
        if rep_name == "raw":
            subsets += [(f"label={v} only", lab == v) for v in sorted(set(lab))]
        for subset, mask in subsets:
            counts = {s: int((src[mask] == s).sum()) for s in set(src[mask])}
            keep = mask & np.isin(src, [s for s, n in counts.items() if n >= 2])
            if len(set(src[keep])) < 2:
                continue
            r = domain_probe(Z[keep], src[keep], folds, seed, n_boot=n_boot)
            base = dict(protocol="domain-probe", fold=f"{r['folds']}-fold stratified", repeat=0, test_set=subset,
                        train_sources=sorted(set(src[keep])), test_sources=sorted(set(src[keep])),
                        backbone=backbone, weights_id=weights_id, preprocess=preprocess, head=rep_name,
                        target="source", selection="none", oracle=False, params={"C": 1.0}, seed=seed,
                        status="ok", n=r["n"], bootstrap=n_boot)
            rows.append(dict(base, scope="all", auc=r["auc"], auc_lo=r["auc_lo"], auc_hi=r["auc_hi"],
                             metrics=r, notes=f"macro one-vs-rest AUC over {r['n_sources']} sources"))
            for s, a in sorted(r["per_source"].items()):
                rows.append(dict(base, scope=s, auc=a, n=int((src[keep] == s).sum()),
                                 notes="this source vs the rest"))
    return rows
