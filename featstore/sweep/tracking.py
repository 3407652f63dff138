"""Tracking: a unit's rows -> its MLflow runs (unit -> fold -> trial), with artifacts and its input dataset."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import polars as pl

from featstore import results as R
from featstore.track import OBJECTIVE, code_version, unit_artifacts, unit_metrics


def track_unit(tracker, st, parent, proto, head, sel, bb, pre, data, unit_rows, preds, trials, seed=None) -> str:
    """Unit run -> fold runs -> trial runs, with artifacts on the unit run; returns the unit's run id.
    Runs carry the times the work happened (trials: Optuna's; folds: their trials' span; units:
    first trial to scoring, which is when the unit's last fold finished)."""
    metrics = unit_metrics(unit_rows)
    sweep_id = unit_rows[0]["sweep_id"] if unit_rows else None
    tags = dict(level="unit", study=st.study, sweep_id=sweep_id, protocol=proto, head=head, backbone=bb,
                weights_id=data.weights_id, preprocess=pre, selection=sel, oracle=sel == "oracle", seed=st.seed,
                code_version=code_version())
    fold_times = {}
    for x in unit_rows:
        if x["kind"] == "fold" and x["fold"] not in fold_times:
            ts = [t for t in trials.get(x["fold"], []) if t.get("start")]
            if ts:  # the span of its trials (a resumed study's include an earlier run's)
                fold_times[x["fold"]] = (min(t["start"] for t in ts), max(t["end"] or t["start"] for t in ts))
    with tempfile.TemporaryDirectory() as tmp:
        unit_preds = [p for p in preds if p.height and p["protocol"][0] == proto and p["head"][0] == head
                      and p["selection"][0] == sel and (seed is None or p["seed"][0] == seed)]
        arts = unit_artifacts(Path(tmp), unit_rows, pl.concat(unit_preds) if unit_preds else None,
                              data.class_names, f"{proto} / {head} / {bb} / {pre}")
        identity = dict(head=head, backbone=bb, weights_id=data.weights_id, preprocess=pre, protocol=proto,
                        selection=sel, target=st.target,
                        held_out=",".join(sorted({s for x in unit_rows for s in x["test_sources"]})) or "-")
        if seed is not None and seed != st.seed:
            identity["selection_seed"] = seed
        uid = tracker.run(f"{proto} · {head} · {bb}/{pre}" + (" (ORACLE)" if sel == "oracle" else "")
                          + (f" · seed {seed}" if seed is not None and seed != st.seed else ""),
                          parent=parent, params=identity, metrics=metrics, tags=tags, artifacts=arts,
                          start=min((a for a, _ in fold_times.values()), default=None),
                          inputs=[_dataset_input(tracker, st, bb, pre, data)])
    for x in unit_rows:
        x["mlflow_run_id"] = uid
    by_fold: dict[str, list] = {}
    for x in unit_rows:
        if x["kind"] == "fold":
            by_fold.setdefault(x["fold"], []).append(x)
    for fold, xs in by_fold.items():
        m = {}
        for x in xs:
            for k in R.METRICS + ("gap", "gap_p"):
                if x.get(k) is not None and k not in ("n", "n_pos", "n_neg"):
                    m[R.mlflow_name(k, x["test_set"], x["scope"])] = x[k]
        x0 = xs[0]
        if x0.get("val_score") is not None:  # named as the Optuna studies name their objective
            m[OBJECTIVE] = x0["val_score"]
        f_start, f_end = fold_times.get(fold, (None, None))
        fid = tracker.run(f"fold {fold}", parent=uid, metrics=m,
                          params=dict(identity, held_out=",".join(x0["test_sources"]) or "-", fold=fold,
                                      **(x0.get("params") or {})),
                          tags=dict(tags, level="fold", fold=fold, train_sources=",".join(x0["train_sources"]),
                                    held_out=",".join(x0["test_sources"]), status=x0["status"],
                                    error=x0.get("error")),
                          start=f_start, end=f_end,
                          status="FINISHED" if x0["status"] == "ok" else "FAILED")
        for x in xs:
            x["mlflow_run_id"] = fid
        for t in trials.get(fold, []):
            tracker.run(f"trial {t['number']}", parent=fid, params=t["params"],
                        metrics={OBJECTIVE: t["value"]} if t["value"] is not None else {},
                        tags=dict(tags, level="trial", fold=fold, state=t["state"], error=t.get("error")),
                        start=t["start"], end=t["end"] or t["start"],
                        status={"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(t["state"], "FAILED"))
    return uid


def _dataset_input(tracker, st, bb, pre, data):
    """The embedding set as the run's input dataset: name backbone/preprocess, digest the weights."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = dict(images=int(len(data.image_id)), dim=int(data.X.shape[1]) if data.X.ndim == 2 else None,
                   per_source_class={f"{s}/{c}": int(n) for (s, c), n in sorted(data.counts.items())})
    wid = data.weights_id.split(":", 1)[-1] if data.weights_id.startswith("sha256:") else data.weights_id
    source = dict(store=tracker.store, backbone=bb, preprocess=pre, weights_id=data.weights_id)
    return DatasetInput(Dataset(name=f"{bb}/{pre}", digest=wid[:36], source_type="featstore",
                                source=json.dumps(source), profile=json.dumps(profile)),
                        tags=[InputTag("mlflow.data.context", "embeddings")])
