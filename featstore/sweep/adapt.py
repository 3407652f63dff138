"""The adapt protocol's learning curves: unseen AUC vs k labelled images per class from the held-out site.

For each site (an `adapt` fold: leave-that-site-out, hyperparameters selected on the training sources
only) and each random draw (featstore.split.adapt_draws: whole patients, nested over k), two heads are
refitted with the fold's selected hyperparameters:
    with-sources  the training sources plus the site's k images per class (k = 0: the loso model)
    site-only     the site's k images per class alone (no k = 0 point: nothing to fit)
and scored on the same images of the site: those never added at any k of that draw, so the points of
one draw are paired. A row per (site, arm, k) carries the mean AUC over draws with a t interval over
draws (`uncertainty = 'draws'`: the spread that which images were labelled causes; the scored images
are fixed within a draw) and every draw's AUC in `metrics.per_draw`. Binary targets only.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from featstore.metrics import roc_auc
from featstore.split import adapt_draws
from featstore.sweep.fit import TaskResult, fit_head, single_threaded

ARMS = ("with-sources", "site-only")


def curve_points(st, data, res: TaskResult) -> tuple[list[dict], list[str]]:
    """Every (site, draw, arm, k) point of one adapt fold's task result: AUC on the draw's scored images."""
    task, meta, X = res.task, data.meta, data.X
    opts = st.protocols.get("adapt", {}) or {}
    from featstore.split import Adapt

    o = Adapt.model_validate(opts)
    site = task.fold.test_sources[0]
    draws, ks, notes = adapt_draws(meta, site, o.ks, o.draws, st.seed)
    points = []
    with single_threaded(task.head):
        for d in draws:
            yte = meta.y[d.test]
            for k in ks:
                for arm in ARMS:
                    if arm == "site-only" and k == 0:
                        continue
                    tr = np.concatenate([task.fold.train, d.added[k]]) if arm == "with-sources" else d.added[k]
                    p = dict(site=site, draw=d.draw, arm=arm, k=k, n_train=int(len(tr)),
                             n_added=int(len(d.added[k])), n_added_pos=int(meta.y[d.added[k]].sum()),
                             n_test=int(len(d.test)), n_test_pos=int(yte.sum()), auc=None, error=None)
                    try:
                        if len(np.unique(meta.y[tr])) < 2:
                            raise ValueError("training images of one class only")
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", ConvergenceWarning)
                            m = fit_head(task.head, res.params or {}, X[tr], meta.y[tr], meta.source[tr], task.seed,
                                         task.inputs)
                        p["auc"] = roc_auc(yte, np.asarray(m.decision_function(X[d.test]), float))
                    except Exception as e:  # noqa: BLE001 - recorded on the row, the curve goes on
                        p["error"] = f"{type(e).__name__}: {e}"
                    points.append(p)
    return points, notes


def summarise(points: list[dict]) -> list[dict]:
    """(site, arm, k) -> mean AUC over draws, sd, and a 95% t interval over draws (df = draws - 1)."""
    from scipy import stats

    out = []
    keys = sorted({(p["site"], p["arm"], p["k"]) for p in points}, key=lambda t: (t[0], ARMS.index(t[1]), t[2]))
    for site, arm, k in keys:
        ps = [p for p in points if (p["site"], p["arm"], p["k"]) == (site, arm, k)]
        a = np.array([p["auc"] for p in ps if p["auc"] is not None], float)
        n = len(a)
        mean = float(a.mean()) if n else None
        sd = float(a.std(ddof=1)) if n > 1 else None
        half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else None
        out.append(dict(site=site, arm=arm, k=k, n_draws=n, n_failed=len(ps) - n, auc=mean, sd=sd,
                        lo=None if half is None else max(0.0, mean - half),
                        hi=None if half is None else min(1.0, mean + half),
                        per_draw=[p["auc"] for p in ps], n_test=int(np.mean([p["n_test"] for p in ps])),
                        n_added=int(np.mean([p["n_added"] for p in ps])),
                        errors=sorted({p["error"] for p in ps if p["error"]})))
    return out


def curve_rows(base: dict, points: list[dict], notes: list[str]) -> list[dict]:
    """Result rows (kind 'adapt') of one site's curve; `base` is the fold's row (identity, params)."""
    from featstore import results as R

    base = {k: v for k, v in base.items() if k not in R.METRICS and k not in ("gap", "gap_lo", "gap_hi", "gap_p")}
    rows = []
    for s in summarise(points):
        rows.append(dict(
            base, kind="adapt", fold=f"heldout={s['site']} {s['arm']} k={s['k']}", test_set="unseen", scope=s["site"],
            test_sources=[s["site"]],
            train_sources=list(base["train_sources"]) + [s["site"]] if s["arm"] == "with-sources" and s["k"]
            else ([s["site"]] if s["arm"] == "site-only" else list(base["train_sources"])),
            auc=s["auc"], auc_lo=s["lo"], auc_hi=s["hi"], auc_se=None if s["sd"] is None else s["sd"] / math.sqrt(
                s["n_draws"]), n=s["n_test"], n_sources=1, uncertainty="draws" if s["lo"] is not None else None,
            status="ok" if s["auc"] is not None else "failed", error="; ".join(s["errors"]) or None,
            notes="; ".join([f"mean over {s['n_draws']} draws of k={s['k']} images per class from {s['site']} "
                             f"({s['arm']}); 95% t interval over draws"] + notes),
            metrics=dict(k=s["k"], arm=s["arm"], per_draw=s["per_draw"], sd=s["sd"], n_draws=s["n_draws"],
                         n_added=s["n_added"], n_failed=s["n_failed"]),
            val_score=None, fit_info=None, n_trials=0, n_trials_failed=0))
    return rows


def mlflow_curve(tracker, run_id: str, rows: list[dict]) -> None:
    """The curve on the adapt unit's run: `adapt_auc.<site>.<arm>` at step k (MLflow draws it as a line),
    with `_lo` / `_hi` (t interval over draws) beside it."""
    from mlflow.entities import Metric

    ms = []
    for r in rows:
        if r.get("kind") != "adapt" or r.get("auc") is None:
            continue
        key = f"adapt_auc.{r['scope']}.{r['metrics']['arm']}"
        for suffix, v in (("", r["auc"]), ("_lo", r.get("auc_lo")), ("_hi", r.get("auc_hi"))):
            if v is not None:
                ms.append(Metric(_mlflow_key(key + suffix), float(v), 0, int(r["metrics"]["k"])))
    for i in range(0, len(ms), 500):
        tracker.client.log_batch(run_id, metrics=ms[i:i + 500])


def _mlflow_key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)
