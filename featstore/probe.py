"""Shortcut forensics: the domain probe and the evidence the report shows beside it.

Domain probe ([Trivedi2022], Table 2; docs/BIBLIOGRAPHY.md): how well a representation predicts its
image's source. Logistic regression on standardised features, stratified k-fold, out-of-fold
probabilities -> macro one-vs-rest AUC (source-stratified bootstrap 95% CI) and one AUC per source.
0.5 is chance; the paper found 0.94-0.97 on pretrained embeddings.

Evidence (`shortcut_evidence`), computed here for the report, which only lays it out: per embedding
set the latest probe's rows and the figures of its MLflow run, a t-SNE map (static and interactive),
the k-nearest-neighbour summary; near duplicates per source pair and their contact sheet.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
        # stratified by source (every resample keeps every source at its size), as the AUC CIs are;
        # scipy's bootstrap resamples the pooled indices and loses a 5-image source in some resamples
        rng = np.random.default_rng(seed)
        groups = [np.flatnonzero(d == i) for i in labels]
        boot = [macro(np.concatenate([rng.choice(g, len(g)) for g in groups])) for _ in range(n_boot)]
        lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
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
    """`featstore probe`: probe rows -> MLflow (with the bar chart and t-SNE maps) and `results`.
    Returns (rows, sweep_id, MLflow run id). progress(done, total, step) after each step.
    tracking_uri: default featstore.track.tracking_uri()."""
    import tempfile
    from datetime import datetime, timezone

    from featstore.api import Store
    from featstore.figures import domain_auc_bars, embedding_map
    from featstore.results import mlflow_safe
    from featstore.store import connect
    from featstore.track import Tracker, code_version, write_results

    steps = (["loading embeddings"] + ["GRL head"] * grl + ["probing"] + ["t-SNE maps"] * maps
             + ["MLflow", "saving results"])
    done = [0]

    def step(name):  # announce the step about to run
        if progress:
            progress(done[0], len(steps), name)
        done[0] += 1

    step("loading embeddings")
    with Store(db, read_only=True) as fs:
        wid, _ = fs.embedding_set(backbone, preprocess)
        X, meta = fs.arrays(backbone, preprocess)
        demo = fs.embeddings(backbone, preprocess).select("image_id", "sex", "age")
    src = meta["source"].to_numpy()
    if grl:
        step("GRL head")
    Z = grl_representation(X, (meta["label"].to_numpy() == positive).astype(int), src, seed) if grl else None
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
    with tempfile.TemporaryDirectory() as tmp:
        arts = [domain_auc_bars(rows, f"domain AUC per source: {backbone}/{preprocess}", Path(tmp) / "domain_auc.png")]
        if maps:
            step("t-SNE maps")
            colours = dict(source=src, label=meta["label"].to_numpy())
            arts.append(embedding_map(X, colours, f"t-SNE of {backbone}/{preprocess} embeddings",
                                      Path(tmp) / "map_raw.png", seed))
            if Z is not None:
                arts.append(embedding_map(Z, colours, f"t-SNE of the GRL representation ({backbone}/{preprocess})",
                                          Path(tmp) / "map_grl.png", seed))
        step("MLflow")
        run_id = Tracker("domain-probe", tracking_uri).run(
            f"probe {backbone}/{preprocess}", metrics={**summary, **per},
            params=dict(backbone=backbone, preprocess=preprocess, folds=folds, seed=seed, grl=grl),
            tags=dict(level="probe", backbone=backbone, weights_id=wid, preprocess=preprocess,
                      code_version=code_version()), artifacts=arts)
    step("saving results")
    for r in rows:
        r.update(study="domain-probe", sweep_id=sweep_id, code_version=code_version(), mlflow_run_id=run_id)
    con = connect(db)
    try:
        write_results(con, rows)
    finally:
        con.close()
    if progress:
        progress(len(steps), len(steps), "done")
    return rows, sweep_id, run_id


# --- evidence for the report ------------------------------------------------------------------

MAP_POINTS = 1500   # the interactive map's cap: a seeded subsample beyond it
NEIGHBORS_K = 10    # the neighbor summary's k


def embedding_points(con, backbone: str, preprocess: str, out: Path, seed: int = 0, cap: int = MAP_POINTS) -> dict:
    """t-SNE (PCA to 50 dims first) of a seeded subsample of at most `cap` embeddings: a large static
    map (PNG in `out`, two palettes) and the interactive map's points (coordinates scaled to [0, 1],
    id, source, label, thumbnail). {} for a set of fewer than 10 images."""
    import polars as pl

    from featstore.api import Store
    from featstore.figures import file_stem, map_png, palettes, thumbnail_uri, tsne

    X, meta = Store.over(con).arrays(backbone, preprocess)
    n = len(X)
    if n < 10:
        return {}
    idx = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False)) if n > cap else np.arange(n)
    X, meta = X[idx], meta[idx.tolist()]
    xy = tsne(X, seed)
    src, lab = meta["source"].cast(pl.Utf8).to_list(), meta["label"].cast(pl.Utf8).to_list()
    name = f"map_{file_stem(backbone)}_{file_stem(preprocess)}.png"
    map_png(xy, dict(source=src, label=lab), f"t-SNE of {backbone}/{preprocess} embeddings ({len(idx)} of {n} images)",
            out / name)
    paths = dict(con.execute("SELECT image_id, path FROM images").fetchall())
    lo, hi = xy.min(0), xy.max(0)
    norm = (xy - lo) / np.where(hi - lo > 0, hi - lo, 1)
    ps, pal_l = palettes(src, lab)
    pts = [dict(x=round(float(a), 4), y=round(float(b), 4), id=i, source=s, label=l, thumb=thumbnail_uri(paths.get(i)))
           for (a, b), i, s, l in zip(norm, meta["image_id"].to_list(), src, lab)]
    return dict(png=name, n=len(idx), total=n, points=pts, palettes=dict(source=ps, label=pal_l))


def neighbor_table(con, backbone: str, preprocess: str, k: int = NEIGHBORS_K):
    """Per source, the share of each image's k nearest neighbours (cosine) from its own source and with
    its own label, beside chance (featstore.neighbors.neighbor_summary; the ANN index for large sets)."""
    import polars as pl

    from featstore import ann as A
    from featstore.neighbors import neighbor_summary

    es = A.resolve_set(con, backbone, preprocess)
    Xn, meta = A.unit_vectors(con, es)
    idx = A.knn(con, es, Xn, meta["image_id"].to_numpy(), k)
    return neighbor_summary(None, meta["source"], meta["label"], k=k, idx=idx).with_columns(
        pl.col("same_source", "same_source_chance", "same_label", "same_label_chance").round(3))


def fetch_run_figures(run_id: str, out: Path, prefix: str, tracking_uri: str | None = None) -> list[str]:
    """The PNG artifacts of an MLflow run, copied into `out` as PREFIX_<name>; their file names.
    Raises what the tracking store raises (an unknown run, an unreachable server)."""
    import shutil
    import tempfile

    from featstore.track import Tracker, sqlite_path, tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():  # never create a tracking store by asking it for a run
        raise FileNotFoundError(f"no MLflow tracking store at {db}")
    names = []
    with tempfile.TemporaryDirectory() as tmp:  # a run's artifacts as files, whatever store holds them
        for local in Tracker.for_run(run_id, uri).artifact_files(run_id, Path(tmp)):
            if local.suffix == ".png":
                target = out / f"{prefix}_{local.name}"
                shutil.move(local, target)
                names.append(target.name)
    return names


def probe_figures(run_id: str, out: Path, prefix: str, tracking_uri: str) -> tuple[list[str], str | None]:
    """fetch_run_figures, and why none came (None when some did): the report shows the probe's table
    either way, and says in one line what it could not show."""
    try:
        names = fetch_run_figures(run_id, out, prefix, tracking_uri)
    except Exception as e:  # noqa: BLE001 - an unknown run, an unreachable server: named, not raised
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [], f"could not be fetched from MLflow at {tracking_uri}: {msg[:300]}"
    if not names:  # every probe run logs its bar chart: its artifacts were moved or deleted
        return [], f"not in MLflow at {tracking_uri} (the run has no figures there: artifacts moved or deleted?)"
    return names, None


def shortcut_evidence(con, sets: list[tuple[str, str]], out: Path, seed: int = 0,
                      tracking_uri: str | None = None) -> dict:
    """What the report shows as shortcut evidence, its figures written into `out`:
    sets: per (backbone, preprocess) in order, dict(backbone, preprocess, probe (the latest domain
    probe's rows, empty if none), figs (file names of the probe run's figures), map (embedding_points,
    or None), neighbors (neighbor_table)); neardup: None without a near-duplicate search, else
    dict(table (pairs per source pair), sheet (dict(file, n, total), or None)); warnings: one line per
    thing that could not be had (a probe run's figures missing from `tracking_uri`)."""
    import polars as pl

    from featstore.figures import file_stem
    from featstore.track import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    warnings: list[str] = []
    out_sets = []
    for bb, pre in sets:
        ev = dict(backbone=bb, preprocess=pre, figs=[], map=None)
        ev["probe"] = probe = pl.from_arrow(con.sql(
            "SELECT * FROM results WHERE study = 'domain-probe' AND backbone = ? AND preprocess = ? AND sweep_id = "
            "(SELECT max(sweep_id) FROM results WHERE study = 'domain-probe' AND backbone = ? AND preprocess = ?)",
            params=[bb, pre, bb, pre]).to_arrow_table())
        run_id = probe["mlflow_run_id"][0] if probe.height else None
        if run_id:
            ev["figs"], missing = probe_figures(run_id, out, f"{file_stem(bb)}_{file_stem(pre)}", uri)
            if missing:
                warnings.append(f"the figures of domain probe run {run_id} ({bb}/{pre}): {missing}")
        ev["map"] = embedding_points(con, bb, pre, out, seed) or None
        if ev["map"]:  # the map computed here (large, two palettes) supersedes the probe's raw-embedding one
            ev["figs"] = [f for f in ev["figs"] if not f.endswith("_map_raw.png")]
            (out / f"{file_stem(bb)}_{file_stem(pre)}_map_raw.png").unlink(missing_ok=True)
        ev["neighbors"] = neighbor_table(con, bb, pre)
        out_sets.append(ev)
    nd = None
    has_nd = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'near_duplicates'").fetchall()[0][0]
    if has_nd:
        nd = dict(table=pl.from_arrow(con.sql("SELECT * FROM near_duplicate_pairs_by_source").to_arrow_table()),
                  sheet=None)
        pairs = pl.from_arrow(con.sql("SELECT * FROM near_duplicates").to_arrow_table())
        # an empty table is what a store holds before `featstore duplicates` ever ran: say so, not "(none)"
        nd["ran"] = pairs.height > 0
        nd["exact_across"] = con.execute("SELECT count(*) FILTER (WHERE cross_source) FROM duplicate_groups"
                                         ).fetchall()[0][0]
        if pairs.height:
            from featstore.duplicates import contact_sheet

            contact_sheet(con, out / "near_duplicates.png", pairs, n=24)
            nd["sheet"] = dict(file="near_duplicates.png", n=min(24, pairs.height), total=pairs.height)
    return dict(sets=out_sets, neardup=nd, warnings=warnings)


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
