"""Track: MLflow runs (SQLite tracking store by default) and self-describing rows in the store.

MLflow layout, one experiment per study:
    sweep <id>                              parent: the config, the data counts
      <protocol> / <head> / <backbone>/<pre>    a unit: pooled metrics, ROC + confusion + per-source CSV
        fold <name>                              selected hyperparameters, test metrics
          trial <n>                              one Optuna trial: params, validation score, state
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

import featstore
from featstore.store import insert_frame


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
    return int((dt or datetime.now(timezone.utc)).timestamp() * 1000)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Tracker:
    def __init__(self, study: str, uri: str | None = None):
        import logging

        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri or tracking_uri()
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(study)
        if exp is None:
            art = None
            if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
                art = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts" / study).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(study, artifact_location=art)
        else:
            self.experiment_id = exp.experiment_id

    def run(self, name: str, parent: str | None = None, params: dict | None = None, metrics: dict | None = None,
            tags: dict | None = None, start=None, end=None, status: str | None = "FINISHED", artifacts=()) -> str:
        """Create a run with everything logged; status None leaves it RUNNING (see `end`)."""
        from mlflow.entities import Metric, Param

        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent:
            tags["mlflow.parentRunId"] = parent
        r = self.client.create_run(self.experiment_id, start_time=_now_ms(start), tags=tags, run_name=name)
        rid = r.info.run_id
        ts = _now_ms(end)
        ms = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items() if _finite(v)]
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        for i in range(0, len(ps), 100):  # log_batch limits: 100 params, 1000 metrics a call
            self.client.log_batch(rid, params=ps[i:i + 100])
        for i in range(0, len(ms), 1000):
            self.client.log_batch(rid, metrics=ms[i:i + 1000])
        for a in artifacts:
            self.client.log_artifact(rid, str(a))
        if status:
            self.client.set_terminated(rid, status=status, end_time=ts)
        return rid

    def end(self, run_id: str, status: str = "FINISHED", tags: dict | None = None) -> None:
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, str(v))
        self.client.set_terminated(run_id, status=status, end_time=_now_ms())


# --- rows in the store -------------------------------------------------------------------

RESULT_COLUMNS = (
    "study", "sweep_id", "protocol", "fold", "repeat", "test_set", "scope", "train_sources", "test_sources",
    "backbone", "weights_id", "preprocess", "head", "target", "selection", "oracle", "params", "seed",
    "code_version", "status", "error", "n", "n_pos", "n_neg", "auc", "auc_lo", "auc_hi", "auc_se", "accuracy",
    "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "dor", "brier", "gap", "gap_p",
    "metrics", "val_score", "n_trials", "n_trials_failed", "n_dropped_shared", "notes", "bootstrap",
    "mlflow_run_id", "seconds", "created_at")


def _json(v):
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(w) for k, w in x.items()}
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x
    return json.dumps(clean(v), sort_keys=True, default=float) if v is not None else None


def write_results(con, rows: list[dict]) -> int:
    if not rows:
        return 0
    insert_frame(con, "results", results_frame(rows))
    return len(rows)


def results_frame(rows: list[dict]) -> pl.DataFrame:
    """Rows as the results table's columns."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    data = {c: [] for c in RESULT_COLUMNS}
    for r in rows:
        for c in RESULT_COLUMNS:
            v = r.get(c)
            if c in ("params", "metrics"):
                v = _json(v)
            elif c == "created_at":
                v = v or now
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            data[c].append(v)
    return pl.DataFrame(data, schema_overrides={"train_sources": pl.List(pl.Utf8),
                                                "test_sources": pl.List(pl.Utf8)}, strict=False)


def write_predictions(con, df: pl.DataFrame) -> int:
    if df.height:
        insert_frame(con, "predictions", df)
    return df.height
