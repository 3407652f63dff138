"""Shortcut forensics: the domain probe and the evidence the report shows beside it.

Domain probe ([Trivedi2022], Table 2; docs/BIBLIOGRAPHY.md): how well a representation predicts its
image's source. Logistic regression on standardised features, stratified k-fold, out-of-fold
probabilities -> macro one-vs-rest AUC (source-stratified bootstrap 95% CI) and one AUC per source.
0.5 is chance; the paper found 0.94-0.97 on pretrained embeddings.

Evidence, computed and stored here with the probe's rows (`probe_map_points`: t-SNE coordinates of
each representation; `probe_neighbors`: the k-nearest-neighbour summary); the report only lays it out
(it reads the store, never MLflow).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import LabelEncoder, StandardScaler

from featstore.metrics import roc_auc
from featstore.score import ovr_auc_resampled
from featstore.spill import SpilledRows, take_rows


BOOT_BLOCK = 2_000_000  # resampled images per block of the probe's bootstrap
SCALER_COLUMNS = 16     # columns per block of the fold's standardisation (its temporaries: 3 x 16 columns)


def standardize_in_place(X: np.ndarray, columns: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's fit and transform of float64 X, in place; returns (mean_, scale_). Each column's
    mean and scale are StandardScaler's own, fitted on blocks of columns: its arithmetic is per column (the
    same bits as one fit on all of X, tested), and its fit makes float64 temporaries the size of its input
    (the centred copy, a cast of the NaN mask), 12 GiB beside a 1M x 1024 fold."""
    d = X.shape[1]
    # no one-column block: numpy sums a lone column pairwise, wider blocks row after row (other bits)
    edges = list(range(0, d, max(2, columns or SCALER_COLUMNS)))
    if len(edges) > 1 and d - edges[-1] < 2:
        edges.pop()
    edges.append(d)
    mean, scale = np.empty(d), np.empty(d)
    for j0, j1 in zip(edges, edges[1:]):
        sc = StandardScaler(copy=False).fit(X if (j0, j1) == (0, d) else np.ascontiguousarray(X[:, j0:j1]))
        mean[j0:j1], scale[j0:j1] = sc.mean_, sc.scale_
    X -= mean  # StandardScaler.transform's two steps, in place
    X /= scale
    return mean, scale


def out_of_fold_proba(Z, d: np.ndarray, k: int, seed: int = 0, C: float = 1.0) -> np.ndarray:
    """[n, classes] out-of-fold probabilities of logistic regression on standardised float64 features, folds
    from StratifiedKFold(k, shuffle, seed): cross_val_predict of StandardScaler + LogisticRegression on a
    float64 copy of Z, bit for bit (tested), holding one fold in memory at a time instead of the set, its
    float32 fold copy, the float64 fold and the scaler's temporaries."""
    P = None
    for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(d)), d):
        A = take_rows(Z, train)
        mean, scale = standardize_in_place(A)
        lr = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(A, d[train])
        del A  # before the test fold is made
        B = take_rows(Z, test)
        B -= mean
        B /= scale
        p = lr.predict_proba(B)
        del B  # else it lives on beside the next training fold (1.5 GiB at 1M)
        if P is None:
            P = np.zeros((len(d), p.shape[1]))
        P[test] = p
    return P


def domain_probe(Z, sources, folds: int = 5, seed: int = 0, C: float = 1.0, n_boot: int = 500) -> dict:
    sources = np.asarray(sources)
    enc = LabelEncoder().fit(sources)
    d = enc.transform(sources)
    if len(enc.classes_) < 2:
        raise ValueError("the domain probe needs at least two sources")
    k = min(folds, int(np.bincount(d).min()))
    if k < 2:
        raise ValueError("every source needs at least two images for the domain probe")
    P = out_of_fold_proba(Z, d, k, seed, C)
    labels = list(range(len(enc.classes_)))

    def macro(idx):
        idx = idx.astype(int)
        if len(np.unique(d[idx])) < len(labels):
            return np.nan
        if len(labels) == 2:
            return roc_auc(d[idx], P[idx, 1])
        return roc_auc_score(d[idx], P[idx], multi_class="ovr", average="macro", labels=labels)
    auc = float(macro(np.arange(len(d))))
    lo = hi = None
    if n_boot > 0:
        # stratified by source (every resample keeps every source at its size), as the AUC CIs are;
        # scipy's bootstrap resamples the pooled indices and loses a 5-image source in some resamples
        rng = np.random.default_rng(seed)
        groups = [np.flatnonzero(d == i) for i in labels]
        boot = []
        step = max(1, BOOT_BLOCK // len(d))  # resamples drawn and scored a block at a time: memory O(block)
        for a in range(0, n_boot, step):
            idx = np.stack([np.concatenate([rng.choice(g, len(g)) for g in groups])
                            for _ in range(min(step, n_boot - a))])
            boot.append(ovr_auc_resampled(d, P, idx, labels))  # every resample keeps every source: no NaN
        boot = np.concatenate(boot)
        lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    per = {str(s): roc_auc(d == i, P[:, i]) for i, s in enumerate(enc.classes_)}
    return dict(auc=auc, auc_lo=lo, auc_hi=hi, per_source=per, n=int(len(d)), n_sources=len(labels), folds=k)


def grl_representation(X, y, sources, seed: int = 0, **grl_params) -> np.ndarray:
    """The GRL head's representation of every image, cross-fitted: two source-stratified halves, each
    transformed by a GRL head fitted on the other half, so no image is probed through a head that
    trained on it."""
    from featstore.heads import GRLHead
    from featstore.sweep.fit import single_threaded

    sources = np.asarray(sources)
    folds = StratifiedKFold(2, shuffle=True, random_state=seed).split(X, sources)
    Z = None
    for fit, out in folds:
        # one torch thread, as in a sweep: the fitted representation moved by up to 0.08 between 1 and 2
        # threads, so the probe's rows depended on the machine's core count
        with single_threaded("grl_mlp"):
            head = GRLHead(random_state=seed, **grl_params).fit(X[fit], y[fit], domains=sources[fit])
        z = head.transform(X[out])
        if Z is None:
            Z = np.zeros((len(X), z.shape[1]))
        Z[out] = z
    return Z


def probe_rows(X, meta, backbone: str, preprocess: str, weights_id: str, Z_grl: np.ndarray | None = None,
               folds: int = 5, seed: int = 0, n_boot: int = 500) -> list[dict]:
    """Rows for the `results` table: the probe on raw embeddings (all images, and each label alone)
    and, when given, on the GRL representation `Z_grl` (all images; see grl_representation)."""
    src = meta["source"].to_numpy().astype(str)
    lab = meta["label"].to_numpy().astype(str)
    reps = [("raw", X)] + ([("grl_mlp", Z_grl)] if Z_grl is not None else [])
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


def demographic_probe_rows(X, attributes: dict, source, backbone: str, preprocess: str, weights_id: str,
                           folds: int = 5, seed: int = 0, n_boot: int = 500, min_n: int = 10) -> list[dict]:
    """Can the embedding tell sex or age band, as it tells the source? The domain probe's estimator with the
    attribute as its target, on the images that have one (values under `min_n` images left out). A row per
    attribute (scope 'all', test_set 'images with <attribute>'), its per-value AUCs in `metrics`;
    `notes` names the sources the images come from: with one source the attribute cannot stand in for it."""
    source = np.asarray(source).astype(str)
    rows = []
    for name, vals in attributes.items():
        v = np.asarray(vals, dtype=object)
        have = np.array([x is not None and x == x and str(x) != "" for x in v])
        counts = {k: int((v[have].astype(str) == k).sum()) for k in set(v[have].astype(str))}
        keep = have & np.isin(np.where(have, v, "").astype(str), [k for k, n in counts.items() if n >= min_n])
        if len({str(x) for x in v[keep]}) < 2:
            continue
        r = domain_probe(X[keep], v[keep].astype(str), folds, seed, n_boot=n_boot)
        srcs = sorted(set(source[keep]))
        rows.append(dict(protocol="domain-probe", fold=f"{r['folds']}-fold stratified", repeat=0,
                         test_set=f"images with {name}", train_sources=srcs, test_sources=srcs,
                         backbone=backbone, weights_id=weights_id, preprocess=preprocess, head="raw", target=name,
                         selection="none", oracle=False, params={"C": 1.0}, seed=seed, status="ok", n=r["n"],
                         bootstrap=n_boot, scope="all", auc=r["auc"], auc_lo=r["auc_lo"], auc_hi=r["auc_hi"],
                         metrics=dict(r, values=r.pop("per_source")),
                         notes=f"predict {name} from the embedding: macro one-vs-rest AUC over {r['n_sources']} values; "
                               f"images from {', '.join(srcs)}"))
    return rows


def run_probe(db, backbone: str, preprocess: str = "original", positive: str = "covid", grl: bool = True,
              maps: bool = True, folds: int = 5, seed: int = 0, n_boot: int = 500,
              progress=None, tracking_uri: str | None = None) -> tuple[list[dict], str, str]:
    """`featstore probe`: probe rows -> MLflow (with the bar chart and t-SNE maps) and `results`, and the
    forensic evidence the report lays out -> the store (`probe_neighbors`; with maps, `probe_map_points`),
    one transaction. Returns (rows, sweep_id, MLflow run id). progress(done, total, step) after each step.
    tracking_uri: default featstore.track.tracking_uri()."""
    import tempfile
    from datetime import datetime, timezone

    from featstore.api import Store
    from featstore.figures import domain_auc_bars, map_png
    from featstore.results import mlflow_safe
    from featstore.store import connect, insert_frame, transaction
    from featstore.track import Tracker, code_version, write_results

    steps = (["loading embeddings", "neighbours"] + ["GRL head"] * grl + ["probing"] + ["t-SNE maps"] * maps
             + ["MLflow", "saving results"])
    done = [0]

    def step(name):  # announce the step about to run
        if progress:
            progress(done[0], len(steps), name)
        done[0] += 1

    with tempfile.TemporaryDirectory(prefix="featstore-probe-") as tmp:
        step("loading embeddings")
        with Store(db, read_only=True) as fs:
            wid, _ = fs.embedding_set(backbone, preprocess)
            X, meta = fs.arrays(backbone, preprocess)
            demo = fs.embeddings(backbone, preprocess, vectors=False).select("image_id", "sex", "age")
            # the set goes to a file (removed with tmp) and leaves memory: the neighbour search (its unit vectors
            # in a file too) and the probes' fits then run without it beside them (issue 27: 8 GiB at 1M x 1024)
            X = SpilledRows.write(X, Path(tmp) / "embeddings.f32")
            step("neighbours")
            nb = neighbor_table(fs.con, backbone, preprocess, spill_dir=tmp)
        src = meta["source"].to_numpy()
        if grl:
            step("GRL head")  # the fit of one head: it has the set in memory, read back from the file
            Z = grl_representation(X.take(np.arange(len(X)), np.float32),
                                   (meta["label"].to_numpy() == positive).astype(int), src, seed)
        else:
            Z = None
        step("probing")
        rows = probe_rows(X, meta, backbone, preprocess, wid, Z, folds, seed, n_boot)
        from featstore.split import age_band

        at = dict(zip(demo["image_id"].to_list(), zip(demo["sex"].to_list(), demo["age"].to_list())))
        ids = meta["image_id"].to_list()
        rows += demographic_probe_rows(X, dict(sex=[at.get(i, (None, None))[0] for i in ids],
                                               age_band=age_band([at.get(i, (None, None))[1] for i in ids])),
                                       src, backbone, preprocess, wid, folds, seed, n_boot)
        sweep_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        summary = {f"{r['head']}.{r['test_set'].replace('=', '_').replace(' ', '_')}_auc": r["auc"]
                   for r in rows if r["scope"] == "all"}
        per = {f"{r['head']}.source.{mlflow_safe(r['scope'])}_auc": r["auc"] for r in rows
               if r["scope"] != "all" and r["test_set"] == "all images"}
        points = []
        arts = [domain_auc_bars(rows, f"domain AUC per source: {backbone}/{preprocess}", Path(tmp) / "domain_auc.png")]
        if maps:
            step("t-SNE maps")
            for rep, R in [("raw", X)] + ([("grl_mlp", Z)] if Z is not None else []):
                pts = map_points(R, meta, seed)
                what = "embeddings" if rep == "raw" else "GRL representation"
                arts.append(map_png(pts.select("x", "y").to_numpy(), dict(source=pts["source"], label=pts["label"]),
                                    f"t-SNE of the {what} ({backbone}/{preprocess})", Path(tmp) / f"map_{rep}.png"))
                points.append(pts.with_columns(representation=pl.lit(rep)))
        step("MLflow")
        run_id = Tracker("domain-probe", tracking_uri).run(
            f"probe {backbone}/{preprocess}", metrics={**summary, **per},
            params=dict(backbone=backbone, preprocess=preprocess, folds=folds, seed=seed, grl=grl),
            tags=dict(level="probe", backbone=backbone, weights_id=wid, preprocess=preprocess,
                      code_version=code_version()), artifacts=arts)
    step("saving results")
    for r in rows:
        r.update(study="domain-probe", sweep_id=sweep_id, code_version=code_version(), mlflow_run_id=run_id)
    ident = dict(sweep_id=pl.lit(sweep_id), backbone=pl.lit(backbone), preprocess=pl.lit(preprocess))
    con = connect(db)
    try:
        with transaction(con):  # the probe's rows and its evidence together, or neither
            write_results(con, rows)
            insert_frame(con, "probe_neighbors", nb.with_columns(**ident))
            if points:
                insert_frame(con, "probe_map_points", pl.concat(points).with_columns(**ident, seed=pl.lit(seed)))
    finally:
        con.close()
    if progress:
        progress(len(steps), len(steps), "done")
    return rows, sweep_id, run_id


# --- the evidence the report lays out ---------------------------------------------------------------

MAP_POINTS = 1500   # the map's cap: a seeded subsample beyond it
NEIGHBORS_K = 10    # the neighbor summary's k


def map_points(Z, meta, seed: int = 0, cap: int = MAP_POINTS) -> pl.DataFrame:
    """t-SNE (PCA to 50 dims first) of a seeded subsample of at most `cap` rows of a representation:
    image_id, source, label, x, y, n_total. The subsample depends on the set's size and the seed only, so
    every representation of one set maps the same images. Empty for fewer than 10 images."""
    from featstore.figures import tsne

    n = len(Z)
    if n < 10:
        return pl.DataFrame(schema=dict(image_id=pl.Utf8, source=pl.Utf8, label=pl.Utf8, x=pl.Float64, y=pl.Float64,
                                        n_total=pl.Int32))
    idx = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False)) if n > cap else np.arange(n)
    xy = tsne(Z.take(idx, np.float32) if isinstance(Z, SpilledRows) else np.asarray(Z)[idx], seed)
    m = meta[idx.tolist()]
    return pl.DataFrame(dict(image_id=m["image_id"].cast(pl.Utf8), source=m["source"].cast(pl.Utf8),
                             label=m["label"].cast(pl.Utf8), x=xy[:, 0].astype(float), y=xy[:, 1].astype(float),
                             n_total=pl.Series([n] * len(idx), dtype=pl.Int32)))


def neighbor_table(con, backbone: str, preprocess: str, k: int = NEIGHBORS_K, spill_dir=None) -> pl.DataFrame:
    """Per source, the share of each image's k nearest neighbours (cosine) from its own source and with
    its own label, beside chance (featstore.neighbors.neighbor_summary; the ANN index for large sets).
    spill_dir: a folder for the unit vectors (a file read back as the search needs them, not 3.8 GiB in memory
    beside the graph at 1M x 1024); the same answer."""
    from featstore import ann as A
    from featstore.neighbors import neighbor_summary

    es = A.resolve_set(con, backbone, preprocess)
    spill = None if spill_dir is None else Path(spill_dir) / "unit-vectors.f32"
    try:
        Xn, meta = A.unit_vectors(con, es, spill=spill)
        idx = A.knn(con, es, Xn, meta["image_id"].to_numpy(), k)
    finally:
        A.forget(con, es)  # the probe's fits come next: not beside the graph
        if spill is not None:
            spill.unlink(missing_ok=True)  # nor beside this file (3.8 GiB at 1M: a tmpfs TMPDIR is memory)
    return neighbor_summary(None, meta["source"], meta["label"], k=k, idx=idx)


@dataclass
class ProbeJob:
    """`featstore probe`: the domain probe of one embedding set, rows to `results` and MLflow.
    run() returns (rows, sweep_id, MLflow run id)."""
    backbone: str
    preprocess: str = "original"
    positive: str = "covid"  # the GRL head's class target
    grl: bool = True
    folds: int = 5
    seed: int = 0
    bootstrap: int = 500
    maps: bool = True
    db: object = None

    def run(self, progress=None):
        from featstore.errors import UserError
        from featstore.progress import silent

        try:
            with (progress or silent)("probe") as prog:
                return run_probe(self.db, self.backbone, self.preprocess, self.positive, self.grl, self.maps,
                                 self.folds, self.seed, self.bootstrap, prog.update)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from e


def summary(rows: list[dict]) -> list[dict]:
    """Per representation and image set (scope 'all'): its AUC and CI, the number of sources, and
    the per-source AUCs as {source: auc}."""
    out = []
    for r in rows:
        if r["scope"] != "all":
            continue
        per = {p["scope"]: p["auc"] for p in rows
               if p["scope"] != "all" and p["head"] == r["head"] and p["test_set"] == r["test_set"]}
        out.append(dict(head=r["head"], test_set=r["test_set"], n_sources=len(r["test_sources"]), auc=r["auc"],
                        auc_lo=r["auc_lo"], auc_hi=r["auc_hi"], per_source=per))
    return out
