"""Track: MLflow runs (SQLite tracking store by default) and self-describing rows in the store.

MLflow layout, one experiment per study (tagged as ML model development):
    <study> <YYYY-MM-DD HH:MM>               the sweep: config params + file, progress, the report, and
                                              the study's headline figures (its best model's, MODEL_METRICS)
      <head> · <backbone>/<pre>               a model: identity params, the verdict (param + tag), every
                                              headline figure under one name (MODEL_METRICS)
        <protocol> · <head> · <backbone>/<pre>  a unit: identity params, results.UNIT_METRICS, ROC +
                                                confusion + per-source CSV, the embedding set as input
          fold <name>                         selected hyperparameters, test metrics
            trial <n>                         one Optuna trial: params, validation score (val_auc), state
Artifacts of a SQLite store live in mlartifacts/ beside it (mlflow-artifacts: locations).
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

import featstore
from featstore import results
from featstore.store import insert_frame


@functools.cache  # once per process: the commit does not change under a running sweep
def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"featstore {featstore.__version__}" + (f" ({sha})" if sha else "")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _now_ms(dt=None) -> int:
    if isinstance(dt, (int, float)):
        return int(dt * 1000)
    return int((dt or datetime.now(timezone.utc)).timestamp() * 1000)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The MLflow UI (3.x) shows an experiment as "Machine learning" (runs first) rather than as a GenAI
# app (traces first) by this tag; in 3.17 the sidebar's workflow switch decides, which the URL's
# `workflowType=machine_learning` sets (see `ui_url`).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ARTIFACTS_DIR = "mlartifacts"
# The selection objective, one name in MLflow (fold and trial runs) and in the Optuna studies
OBJECTIVE = "val_auc"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifacts_destination(uri: str) -> Path | None:
    """Where a SQLite tracking store keeps its artifacts: `mlartifacts/` beside the database. Runs
    record `mlflow-artifacts:/<study>/<run>/artifacts`, resolved against this folder by the server
    (`featstore ui` passes it as --artifacts-destination), so moving the folder moves them along."""
    db = sqlite_path(uri)
    return db.resolve().parent / ARTIFACTS_DIR if db else None


def ui_url(base: str, experiment_id: str | None = None, view: str | None = None) -> str:
    """A UI link that opens on runs (the ML workflow), not on GenAI traces; `view`: a shared view
    state of the experiment (`MODEL_VIEW`, written by `share_model_view`)."""
    path = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    share = f"viewStateShareKey={view}&" if view else ""
    return f"{base.rstrip('/')}/#/{path}?{share}workflowType=machine_learning"


def portable_path(path) -> str:
    """A path as a run records it: a shipped config by its package name (`featstore/studies/x.yaml`), a
    file under the working folder relative to it, a URL as given; never the checkout's absolute path."""
    text = str(path or "")
    if not text or "://" in text:
        return text
    p = Path(text).resolve()
    pkg = Path(featstore.__file__).resolve().parent
    for root, prefix in ((pkg, "featstore/"), (Path.cwd().resolve(), "")):
        try:
            return prefix + p.relative_to(root).as_posix()
        except ValueError:
            continue
    return text


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


class Tracker:
    def __init__(self, study: str, uri: str | None = None):
        import logging

        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri or tracking_uri()
        self.client = MlflowClient(self.uri)
        self.open: set[str] = set()  # runs this tracker left RUNNING (closed by `close_open`)
        self.models: ModelRuns | None = None  # a sweep's model runs (benchmark sets them)
        self.store: str | None = None  # the feature store the sweep read (the runs' input dataset)
        self.dest = artifacts_destination(self.uri)
        exp = self.client.get_experiment_by_name(study)
        if exp is None:
            # SQLite: a location relative to the folder (mlflow-artifacts:), not an absolute path
            art = f"mlflow-artifacts:/{_safe(study)}" if self.dest else None
            self.experiment_id = self.client.create_experiment(study, artifact_location=art, tags=EXPERIMENT_KIND)
        else:
            self.experiment_id = exp.experiment_id
            if "mlflow.experimentKind" not in exp.tags:  # made by an older featstore
                for k, v in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(self.experiment_id, k, v)
        share_model_view(self.client, self.experiment_id)

    @classmethod
    def for_run(cls, run_id: str, uri: str | None = None) -> "Tracker":
        """A tracker on the experiment of an existing run."""
        from mlflow import MlflowClient

        t = cls.__new__(cls)
        t.uri = uri or tracking_uri()
        t.client = MlflowClient(t.uri)
        t.open, t.store, t.dest, t.models = set(), None, artifacts_destination(t.uri), None
        t.experiment_id = t.client.get_run(run_id).info.experiment_id
        return t

    def run(self, name: str, parent: str | None = None, params: dict | None = None, metrics: dict | None = None,
            tags: dict | None = None, start=None, end=None, status: str | None = "FINISHED", artifacts=(),
            inputs=()) -> str:
        """Create a run with everything logged; status None leaves it RUNNING (see `end`). `start` and
        `end` (datetimes or epoch seconds) are when the work happened, not when it is logged."""
        from mlflow.entities import Metric, Param

        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent:
            tags["mlflow.parentRunId"] = parent
        r = self.client.create_run(self.experiment_id, start_time=_now_ms(start), tags=tags, run_name=name)
        rid = r.info.run_id
        self.open.add(rid)
        ts = max(_now_ms(end), _now_ms(start)) if end is not None else _now_ms()
        ms = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items() if _finite(v)]
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        # log_batch limits: 100 params, 1000 metrics, 1000 entities a call; a run's usual few params and
        # metrics go in one call (each call is a database transaction)
        first_ps = ps[:100]
        first_ms = ms[:1000 - len(first_ps)]
        if first_ps or first_ms:
            self.client.log_batch(rid, metrics=first_ms, params=first_ps)
        for i in range(len(first_ps), len(ps), 100):
            self.client.log_batch(rid, params=ps[i:i + 100])
        for i in range(len(first_ms), len(ms), 1000):
            self.client.log_batch(rid, metrics=ms[i:i + 1000])
        if inputs:
            self.client.log_inputs(rid, datasets=list(inputs))
        self.log_artifacts(rid, artifacts, run=r)
        if status:
            self.client.set_terminated(rid, status=status, end_time=ts)
            self.open.discard(rid)
        return rid

    def log_artifacts(self, run_id: str, files, subdir: str | None = None, run=None) -> None:
        """Attach files to a run. A SQLite store's `mlflow-artifacts:` runs are written straight into
        the artifacts folder (the client can only reach those through a server)."""
        import shutil

        files = [Path(f) for f in files if f and Path(f).is_file()]
        if not files:
            return
        root = (run or self.client.get_run(run_id)).info.artifact_uri
        local = self.local_dir(root)
        for f in files:
            if local is not None:
                d = local / subdir if subdir else local
                d.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, d / f.name)
            else:
                self.client.log_artifact(run_id, str(f), subdir)

    def local_dir(self, artifact_uri: str) -> Path | None:
        """The folder of a run's artifacts on this machine, where it is one (else None: ask the client)."""
        if artifact_uri.startswith("mlflow-artifacts:") and self.dest is not None:
            rel = artifact_uri[len("mlflow-artifacts:"):].lstrip("/")
            return self.dest / rel
        if artifact_uri.startswith("file://"):
            from urllib.parse import unquote, urlparse

            return Path(unquote(urlparse(artifact_uri).path))
        return None

    def artifact_files(self, run_id: str, out: Path) -> list[Path]:
        """A run's top-level artifact files, copied or downloaded into `out`."""
        import shutil

        out.mkdir(parents=True, exist_ok=True)
        local = self.local_dir(self.client.get_run(run_id).info.artifact_uri)
        if local is not None:
            files = sorted(p for p in local.iterdir() if p.is_file()) if local.is_dir() else []
            return [Path(shutil.copyfile(p, out / p.name)) for p in files]
        return [Path(self.client.download_artifacts(run_id, a.path, str(out)))
                for a in self.client.list_artifacts(run_id) if not a.is_dir]

    def end(self, run_id: str, status: str = "FINISHED", tags: dict | None = None) -> None:
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, str(v))
        self.client.set_terminated(run_id, status=status, end_time=_now_ms())
        self.open.discard(run_id)

    def close_open(self, status: str) -> None:
        """Close every run this tracker left RUNNING (children first), e.g. FAILED or KILLED."""
        for rid in sorted(self.open, key=lambda r: r == getattr(self, "sweep_run", None)):
            try:
                self.client.set_terminated(rid, status=status, end_time=_now_ms())
            except Exception:  # noqa: BLE001 - closing the others matters more
                pass
        self.open.clear()

    def close_stale(self, sweep_id: str) -> list[str]:
        """Runs an earlier, killed sweep of this study left RUNNING: marked KILLED. A sweep is known
        dead when its run names this host and a process id that no longer runs; another host's
        sweep may still be alive, so it is left alone."""
        import socket

        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=50000)
        runs = [r for r in runs if r.data.tags.get("level") and r.data.tags.get("sweep_id") != sweep_id]
        owners = {}
        for r in runs:
            if r.data.tags.get("level") == "sweep":
                owners[r.data.tags.get("sweep_id")] = (r.data.tags.get("host"), r.data.tags.get("pid"))
        host = socket.gethostname()
        killed = []
        for r in runs:
            sid = r.data.tags.get("sweep_id")
            h, pid = owners.get(sid, (r.data.tags.get("host"), r.data.tags.get("pid")))
            if h is not None and h != host:
                continue
            if h == host and pid and _alive(int(pid)):
                continue
            self.client.set_terminated(r.info.run_id, status="KILLED", end_time=_now_ms())
            self.client.set_tag(r.info.run_id, "killed_note", f"left RUNNING by an interrupted sweep; closed by "
                                                              f"sweep {sweep_id}")
            killed.append(r.info.run_id)
        return killed


def unit_artifacts(folder: Path, unit_rows: list[dict], preds: pl.DataFrame | None, class_names, title: str):
    """A unit run's files, written into `folder`: its rows as per_source.csv, the ROC of the pooled
    predictions (binary targets) and the confusion matrix. Returns their paths."""
    from featstore.figures import confusion_figure, dedupe_pooled, roc_figure
    from featstore.query import csv_safe

    out = []
    cols = ["fold", "test_set", "scope", "n", "n_pos", "n_neg", "auc", "auc_lo", "auc_hi", "accuracy",
            "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "dor", "brier", "status", "error"]
    csv_safe(pl.DataFrame([{c: r.get(c) for c in cols} for r in unit_rows], infer_schema_length=None)).write_csv(
        folder / "per_source.csv")
    out.append(folder / "per_source.csv")
    if preds is not None and preds.height:
        pooled = dedupe_pooled(preds)
        for fig in (roc_figure(pooled, title, folder / "roc_seen_vs_unseen.png") if len(class_names) == 2 else None,
                    confusion_figure(pooled, class_names, title, folder / "confusion.png")):
            if fig:
                out.append(fig)
    return out


def attach_report(study: str, sweep_id: str, files, uri: str | None = None) -> str | None:
    """Attach a written report to its sweep's MLflow run (under `report/`); the run id, or None where
    there is no such run. Never creates a tracking store that is not there."""
    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    from mlflow import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(study)
    if exp is None:
        return None
    t = Tracker(study, uri)
    runs = t.client.search_runs([t.experiment_id], f"tags.level = 'sweep' AND tags.sweep_id = '{sweep_id}'",
                                max_results=1)
    if not runs:
        return None
    t.log_artifacts(runs[0].info.run_id, files, subdir="report", run=runs[0])
    return runs[0].info.run_id


# --- one run per model ------------------------------------------------------------------------

# The model run's metric vocabulary: every figure of the headline under one name, whatever protocols
# a study runs, so that the compare view of model runs is the headline table. A figure a model does
# not have is not logged (MLflow would draw a missing value at the top of a parallel-coordinates axis);
# an interval that says nothing (none, or the whole scale: two sources give [0, 1]) is not logged either.
MODEL_METRICS = {
    "auc_seen": "AUC on held-out images of the training sources (mixed k-fold pooled out-of-fold; else "
                "seen-unseen's seen set)",
    "auc_seen_lo": "its image-level 95% CI, low", "auc_seen_hi": "its image-level 95% CI, high",
    "auc_unseen_mean": "mean over held-out sources (both classes) of the per-source AUC (LOSO, else seen-unseen)",
    "auc_unseen_mean_lo": "its source-level 95% CI, low", "auc_unseen_mean_hi": "its source-level 95% CI, high",
    "auc_unseen_worst": "the lowest per-source AUC among held-out sources",
    "n_unseen_sources": "held-out sources behind the mean",
    "auc_pairs_mean": "leave-pair-out: mean AUC over held-out pairs of sources",
    "auc_pairs_worst": "leave-pair-out: the worst pair's AUC",
    "n_pairs": "held-out pairs behind the mean",
    "drop_new_sources": "seen - unseen mean per-source AUC: the drop on new sources (a domain shift does this "
                        "too: never read as a shortcut; the shortcut estimand is `shortcut`)",
    "drop_new_sources_lo": "its source-level 95% CI, low", "drop_new_sources_hi": "its 95% CI, high",
    "shortcut": "does it use the source? cross-source minus same-source AUC of the mixed out-of-fold predictions "
                "(score.source_contrast; the verdict's first question)",
    "shortcut_lo": "its 95% CI, low (patients resampled within sources)", "shortcut_hi": "its 95% CI, high",
    "auc_cross_source": "AUC over positive-negative pairs from different sources (mixed out-of-fold)",
    "auc_same_source": "AUC over positive-negative pairs from the same source (mixed out-of-fold)",
    "n_shortcut_sources": "sources behind the shortcut estimand",
}
# Protocols in the order their extra figures are named (the first one to have a figure logs it bare)
PROTOCOL_ORDER = ("mixed", "loso", "seen-unseen", "leave-pair-out")
# What MODEL_METRICS already covers; any other metric the contract declares (results.UNIT_METRICS, or a
# metric column of a source-mean row) is logged too, under its own name
_UNIT_COVERED = {"auc_seen", "auc_unseen_mean", "auc_unseen_mean_lo", "auc_unseen_mean_hi", "auc_unseen_worst",
                 "auc_unseen_pooled", "gap", "gap_lo", "gap_hi", "balanced_accuracy_unseen_mean",
                 "n_unseen_sources", "shortcut", "shortcut_lo", "shortcut_hi", "auc_cross_source",
                 "auc_same_source", "n_shortcut_sources"}
_ROW_COVERED = set(results.METRICS) | {"gap", "gap_p", "gap_lo", "gap_hi", "n_sources", "auc_worst"}


def interval(lo, hi, low: float = 0.0, high: float = 1.0) -> tuple[float, float] | None:
    """A 95% CI as it may be shown or logged: None where there is none, or where it spans the whole
    scale (with two held-out sources a t interval is [0, 1] once clipped: no information)."""
    if lo is None or hi is None or not (_finite(lo) and _finite(hi)):
        return None
    if lo <= low + 1e-9 and hi >= high - 1e-9:
        return None
    return float(lo), float(hi)


def ci_text(x, lo, hi, k: int | None = None, low: float = 0.0, d: int = 3, what: str = "sources") -> str:
    """`0.812 [0.700, 0.901]`, or `0.812, CI n/a (2 sources)` where the interval says nothing."""
    if x is None:
        return "—"
    ci = interval(lo, hi, low, 1.0)
    if ci:
        return f"{x:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"
    return f"{x:.{d}f}, CI n/a" + (f" ({k} {what})" if k is not None else "")


def _source_mean(g: pl.DataFrame, proto: str) -> dict | None:
    d = g.filter(pl.col("kind") == "source-mean")
    if "seed" in d.columns:
        d = d.sort("seed")
    return results.source_mean(d, proto)


def model_figures(g: pl.DataFrame, probe_auc: float | None = None) -> dict:
    """One model's headline figures from its rows (the results table's columns): `metrics` (the
    MODEL_METRICS vocabulary plus any further metric the contract declares), the verdict and its
    reason, and the texts a card shows (seen, unseen mean, worst source, pairs)."""
    from featstore.verdict import judge, mixed_metrics, model_verdicts

    g = g.filter(pl.col("status") == "ok")
    m: dict = {}
    txt: dict = {}
    allrows = g.filter(pl.col("scope") == "all")
    mixed = allrows.filter((pl.col("protocol") == "mixed") & (pl.col("kind") == "pooled")
                           & (pl.col("test_set") == "seen") & pl.col("auc").is_not_null())
    lo = _source_mean(g, "loso")
    su = _source_mean(g, "seen-unseen")
    main = lo or su
    lpo = _source_mean(g, "leave-pair-out")
    # the one seen of a model (the table's, the figures', the drop's): the mean per-source AUC of its mixed
    # k-fold (verdict.mixed_metrics), else seen-unseen's seen images
    mm = mixed_metrics(g)
    gi = ((main or {}).get("metrics") or {}).get("gap") or {}
    # as the report's headline takes it: the drop's seen side first, else the mixed unit's own
    if gi.get("seen") is not None:
        m["auc_seen"] = float(gi["seen"])
        frm = "mixed k-fold" if gi.get("seen_from") in (None, "mixed") else f"{gi['seen_from']}'s seen images"
        txt["seen"] = f"{m['auc_seen']:.3f} ({frm}, mean of {gi.get('n_seen')} sources)"
    elif mm.get("seen_mean") is not None:
        m["auc_seen"] = float(mm["seen_mean"])
        txt["seen"] = f"{m['auc_seen']:.3f} (mixed k-fold, mean of {mm.get('seen_sources')} sources)"
    elif mixed.height:
        m["auc_seen"] = float(mixed["auc"].mean())
        txt["seen"] = f"{m['auc_seen']:.3f} (mixed k-fold, pooled)"
    if main and main.get("auc") is not None:
        k = main.get("n_sources")
        m["auc_unseen_mean"] = main["auc"]
        ci = interval(main.get("auc_lo"), main.get("auc_hi"))
        if ci:
            m["auc_unseen_mean_lo"], m["auc_unseen_mean_hi"] = ci
        if k is not None:
            m["n_unseen_sources"] = k
        txt["unseen"] = ci_text(main["auc"], main.get("auc_lo"), main.get("auc_hi"), k) + \
            f" (mean of {k} held-out sources, {'LOSO' if lo else 'seen-unseen'})"
        if main.get("auc_worst") is not None:
            m["auc_unseen_worst"] = main["auc_worst"]
            txt["worst"] = f"{main['auc_worst']:.3f} ({main.get('worst_source')})"
    if lpo and lpo.get("auc") is not None:
        m["auc_pairs_mean"] = lpo["auc"]
        if lpo.get("n_sources") is not None:
            m["n_pairs"] = lpo["n_sources"]
        if lpo.get("auc_worst") is not None:
            m["auc_pairs_worst"] = lpo["auc_worst"]
        txt["pairs"] = f"{lpo['auc']:.3f}" + (f" (worst pair {lpo['auc_worst']:.3f}, {lpo.get('worst_source')})"
                                               if lpo.get("auc_worst") is not None else "")
    if main and main.get("gap") is not None:
        m["drop_new_sources"] = main["gap"]
        ci = interval(main.get("gap_lo"), main.get("gap_hi"), -1.0)
        if ci:
            m["drop_new_sources_lo"], m["drop_new_sources_hi"] = ci
    sc = mm.get("shortcut") or {}
    if sc.get("estimate") is not None:
        m.update(shortcut=sc["estimate"], auc_cross_source=sc.get("cross"), auc_same_source=sc.get("same"),
                 n_shortcut_sources=sc.get("n_sources"))
        ci = interval(sc.get("lo"), sc.get("hi"), -1.0)
        if ci:
            m["shortcut_lo"], m["shortcut_hi"] = ci
    m.update(_declared_extras(g))
    # this model alone (p unadjusted); the sweep's end re-judges every model with Holm over all of them
    key = (g["backbone"][0], g["preprocess"][0]) if g.height else None
    mv = model_verdicts(g, {key: probe_auc} if probe_auc is not None else None)
    v = mv[0]["verdict"] if mv else judge(None)
    return dict(metrics={k: float(x) for k, x in m.items() if _finite(x)}, verdict=v.verdict, reason=v.reason,
                text=txt)


def _declared_extras(g: pl.DataFrame) -> dict:
    """Figures the contract declares beyond MODEL_METRICS (e.g. a shortcut estimand): UNIT_METRICS keys
    from each protocol's unit summary, and metric columns of the source-mean rows, named as declared
    (suffixed with the protocol where an earlier protocol already gave that name)."""
    out: dict = {}
    extra_cols = [c.name for c in results.COLUMNS if c.metric and c.name not in _ROW_COVERED]
    extra_unit = [k for k in results.UNIT_METRICS if k not in _UNIT_COVERED]
    if not extra_cols and not extra_unit:
        return out
    protos = sorted(set(g["protocol"].to_list()), key=lambda p: (PROTOCOL_ORDER + (p,)).index(p))
    for proto in protos:
        rows = g.filter(pl.col("protocol") == proto)
        found = {}
        unit_rows = [dict(r, metrics=None) for r in rows.iter_rows(named=True)]
        for k, v in (results.unit_summary(unit_rows) if extra_unit else {}).items():
            if k in extra_unit:
                found[k] = v
        sm = results.source_mean(rows, proto) if extra_cols else None
        for c in extra_cols:
            if sm and sm.get(c) is not None:
                found[c] = sm[c]
        for k, v in found.items():
            out[k if k not in out else f"{k}_{results.mlflow_safe(proto).replace(' ', '_')}"] = v
    return out


def unit_metrics(unit_rows: list[dict]) -> dict:
    """A unit run's metrics: results.UNIT_METRICS from its rows, less any interval that says nothing
    (logged as 0 and 1 it would read as a measured one)."""
    m = results.unit_summary(unit_rows)
    for name, low in (("auc_unseen_mean", 0.0), ("gap", -1.0)):
        if interval(m.get(f"{name}_lo"), m.get(f"{name}_hi"), low) is None:
            m.pop(f"{name}_lo", None)
            m.pop(f"{name}_hi", None)
    return m


class ModelRuns:
    """One MLflow run per model (backbone, preprocessing, head, selection): the parent of its protocol
    units. Made (RUNNING) when its first unit is tracked; finished with the model's figures and verdict
    when its last one is (`unit_done`). Keeps every model's figures for the sweep run's headline."""

    def __init__(self, tracker: "Tracker", sweep_run: str, start=None):
        self.tracker, self.sweep_run, self.start = tracker, sweep_run, start
        self.ids: dict[tuple, str] = {}
        self.rows: dict[tuple, list[dict]] = {}
        self.done: dict[tuple, dict] = {}   # model -> model_figures(...) plus name

    @staticmethod
    def name(key: tuple) -> str:
        bb, pre, head, sel = key
        return f"{head} · {bb}/{pre}" + ("" if sel == "train-val" else f" ({sel.upper() if sel == 'oracle' else sel})")

    def parent(self, key: tuple, identity: dict, tags: dict) -> str:
        """The model's run id, made on first use."""
        if key not in self.ids:
            params = {k: identity[k] for k in ("backbone", "weights_id", "preprocess", "head", "selection", "target")
                      if k in identity}
            self.ids[key] = self.tracker.run(self.name(key), parent=self.sweep_run, params=params,
                                             tags=dict(tags, level="model"), status=None, start=self.start)
            self.rows[key] = []
        return self.ids[key]

    def unit_done(self, key: tuple, unit_rows: list[dict], last: bool) -> None:
        self.rows[key] += unit_rows
        if last:
            self.finish(key)

    def finish(self, key: tuple) -> dict:
        rid = self.ids[key]
        f = model_figures(results_frame(self.rows[key]))
        c = self.tracker.client
        from mlflow.entities import Metric, RunTag

        ts = _now_ms()
        # the verdict is provisional here (this model alone); `judge_all` at the sweep's end sets the one
        # the report gives (Holm over the study's models) as a param and the tags
        c.log_batch(rid, metrics=[Metric(k, v, ts, 0) for k, v in f["metrics"].items()],
                    tags=[RunTag("verdict", f["verdict"]), RunTag("verdict_reason", f["reason"][:5000]),
                          RunTag("mlflow.note.content", f"**{f['verdict']}**: {f['reason']}")])
        self.tracker.end(rid, "FINISHED")
        self.done[key] = dict(f, name=self.name(key), run_id=rid)
        return self.done[key]

    def judge_all(self) -> None:
        """Every finished model's verdict as the report gives it: the two questions' p-values Holm-adjusted
        over the study's models (oracle models apart, as the report's ORACLE table), logged as the
        `verdict` param and tags of each model run."""
        from mlflow.entities import Param, RunTag

        from featstore.verdict import model_verdicts

        for oracle in (False, True):
            keys = [k for k in self.done if (k[3] == "oracle") == oracle]
            rows = [r for k in keys for r in self.rows[k]]
            if not rows:
                continue
            for mv in model_verdicts(results_frame(rows)):
                key = tuple(mv["key"])
                if key not in self.done:
                    continue
                v, d = mv["verdict"], self.done[key]
                d.update(verdict=v.verdict, reason=v.reason)
                self.tracker.client.log_batch(d["run_id"], params=[Param("verdict", v.verdict)], tags=[
                    RunTag("verdict", v.verdict), RunTag("verdict_reason", v.reason[:5000]),
                    RunTag("mlflow.note.content", f"**{v.verdict}**: {v.reason}")])

    def sweep_headline(self) -> tuple[dict, dict]:
        """(metrics, tags) for the sweep run: the best honest model's figures (by unseen mean, else the
        pairs' mean, else seen) under the same names, and how many models got each verdict."""
        from featstore.verdict import GENERALISES, INCONCLUSIVE, SHORTCUT

        honest = {k: v for k, v in self.done.items() if k[3] != "oracle"}
        if not honest:
            return {}, {}

        def rank(kv):
            mm = kv[1]["metrics"]
            return next((mm[n] for n in ("auc_unseen_mean", "auc_pairs_mean", "auc_seen") if n in mm), -1.0)
        key, best = max(honest.items(), key=rank)
        metrics = dict(best["metrics"], n_models=len(honest))
        for v, n in ((SHORTCUT, "n_shortcut_likely"), (GENERALISES, "n_generalises"), (INCONCLUSIVE, "n_inconclusive")):
            metrics[n] = sum(f["verdict"] == v for f in honest.values())
        tags = dict(best_model=best["name"], best_model_verdict=best["verdict"], best_model_run=best["run_id"])
        return metrics, tags


def log_sweep_headline(tracker: "Tracker", sweep_run: str, models: ModelRuns) -> None:
    """The sweep (parent) run carries the study's headline figures (MLflow's parent/child pattern)."""
    from mlflow.entities import Metric, RunTag

    models.judge_all()
    metrics, tags = models.sweep_headline()
    ts = _now_ms()
    if metrics or tags:
        tracker.client.log_batch(sweep_run, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
                                 tags=[RunTag(k, str(v)) for k, v in tags.items()])


# The runs table of a study's model runs, as `featstore ui`'s first link opens it: an experiment tag
# `mlflow.sharedViewState.<key>` holds the view (MLflow 3.17 reads it for `?viewStateShareKey=<key>`:
# the search facets and the table's ui state, as JSON)
MODEL_VIEW = "featstore-models"
# the headline's columns; MLflow puts metrics (alphabetically) before params and draws only the columns
# that fit the window, so the list is short and the verdict column narrow enough to be on screen
MODEL_COLUMNS = ["metrics.`auc_seen`", "metrics.`auc_unseen_mean`", "metrics.`auc_unseen_worst`",
                 "metrics.`auc_pairs_mean`", "metrics.`shortcut`", "metrics.`drop_new_sources`",
                 "params.`verdict`"]


def share_model_view(client, experiment_id: str) -> None:
    """Store the model-runs view on the experiment (idempotent)."""
    view = dict(searchFilter="tags.level = 'model'", orderByKey="metrics.`auc_unseen_mean`", orderByAsc=False,
                startTime="ALL", lifecycleFilter="Active", datasetsFilter=[], modelVersionFilter="All Runs",
                selectedColumns=MODEL_COLUMNS, runsHiddenMode="SHOW_ALL", columnOrder=[],
                columnWidths={c: 130 for c in MODEL_COLUMNS})
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{MODEL_VIEW}",
                              json.dumps(view, separators=(",", ":")))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- rows in the store -------------------------------------------------------------------

def write_results(con, rows: list[dict]) -> int:
    if not rows:
        return 0
    insert_frame(con, "results", results_frame(rows))
    return len(rows)


def results_frame(rows: list[dict]) -> pl.DataFrame:
    """Rows as the results table's columns (the contract in featstore/results.py)."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    norm = [results.normalise(r, now) for r in rows]
    data = {c: [r[c] for r in norm] for c in results.NAMES}
    lists = {c: pl.List(pl.Utf8) for c in results.LIST_COLUMNS}
    return pl.DataFrame(data, schema_overrides=lists, strict=False)


def write_predictions(con, df: pl.DataFrame) -> int:
    if df.height:
        insert_frame(con, "predictions", df)
    return df.height
