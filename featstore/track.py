"""Track: MLflow runs (SQLite tracking store by default) and self-describing rows in the store.

MLflow layout, one experiment per study (tagged as ML model development):
    <study> <YYYY-MM-DD HH:MM>               the sweep: config params + file, progress, the report
      <protocol> · <head> · <backbone>/<pre>  a unit: identity params, results.UNIT_METRICS, ROC +
                                              confusion + per-source CSV, the embedding set as input
        fold <name>                           selected hyperparameters, test metrics
          trial <n>                           one Optuna trial: params, validation score, state
Artifacts of a SQLite store live in mlartifacts/ beside it (mlflow-artifacts: locations).
"""
from __future__ import annotations

import functools
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


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifacts_destination(uri: str) -> Path | None:
    """Where a SQLite tracking store keeps its artifacts: `mlartifacts/` beside the database. Runs
    record `mlflow-artifacts:/<study>/<run>/artifacts`, resolved against this folder by the server
    (`featstore ui` passes it as --artifacts-destination), so moving the folder moves them along."""
    db = sqlite_path(uri)
    return db.resolve().parent / ARTIFACTS_DIR if db else None


def ui_url(base: str, experiment_id: str | None = None) -> str:
    """A UI link that opens on runs (the ML workflow), not on GenAI traces."""
    path = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{base.rstrip('/')}/#/{path}?workflowType=machine_learning"


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

    @classmethod
    def for_run(cls, run_id: str, uri: str | None = None) -> "Tracker":
        """A tracker on the experiment of an existing run."""
        from mlflow import MlflowClient

        t = cls.__new__(cls)
        t.uri = uri or tracking_uri()
        t.client = MlflowClient(t.uri)
        t.open, t.store, t.dest = set(), None, artifacts_destination(t.uri)
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
        for i in range(0, len(ps), 100):  # log_batch limits: 100 params, 1000 metrics a call
            self.client.log_batch(rid, params=ps[i:i + 100])
        for i in range(0, len(ms), 1000):
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
