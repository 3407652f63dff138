"""`featstore sweep`: one study config -> splits -> Optuna sweeps -> scores -> MLflow + results rows.

Wires split, sweep (fit), score and track. The store is read (read-only) before any fitting and
written once at the end, so the sweep never holds DuckDB's single write lock while it works.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from featstore.api import Store
from featstore.score import binary_metrics, gap_test, multiclass_metrics
from featstore.study import Study, StudyData, StudyError, check_feasible, load_data
from featstore.sweep import Task, TaskResult, run_tasks
from featstore.track import Tracker, code_version, write_predictions, write_results


@dataclass
class SweepReport:
    sweep_id: str
    rows: list[dict] = field(default_factory=list)
    n_tasks: int = 0
    n_failed: int = 0
    n_trials: int = 0
    seconds: float = 0.0
    mlflow_uri: str = ""
    parent_run_id: str = ""
    notes: list[str] = field(default_factory=list)
    # where the wall time went: load (store -> arrays, splits), tasks (worker pool wall), of which,
    # summed over workers, search (Optuna trials) and refit (final fit + predict); score_track
    # (bootstrap CIs, tests, MLflow runs and artifacts); write (results table)
    phases: dict = field(default_factory=lambda: dict(load=0.0, tasks=0.0, search_sum=0.0, refit_sum=0.0,
                                                      score_track=0.0, write=0.0))


def metrics_for(y, P, n_classes, n_boot, seed, score=None) -> dict:
    if n_classes == 2:
        return binary_metrics(y, P[:, 1], n_boot=n_boot, seed=seed, score=score)
    m = multiclass_metrics(y, P, n_classes, n_boot=n_boot, seed=seed)
    m.update(n_pos=None, n_neg=None)
    return m


def plan(st: Study, db) -> list[tuple[str, str, StudyData, dict]]:
    """Load every embedding set and build every protocol's folds; raise StudyError on anything
    impossible before a single model is fitted."""
    out = []
    with Store(db, read_only=True) as fs:
        for bb in st.backbones:
            for pre in st.preprocess:
                data = load_data(fs, st, bb, pre)
                folds = {p: check_feasible(st, data, p) for p in st.protocols}
                out.append((bb, pre, data, folds))
    return out


def run_worker(st: Study, source, storage: str, workers: int = 1, trials: int | None = None,
               timeout: float | None = None, progress=None) -> tuple[int, int]:
    """`featstore sweep-worker`: run the trials of every study nobody else is running, on shared
    storage; no refit, no MLflow, no store writes (the coordinator, `featstore sweep --storage`, does
    those). `source` is the store or, better, a snapshot (`featstore export --snapshot`), so that
    workers never wait on DuckDB's single writer. Returns (studies, trials) this worker ran."""
    if "://" not in str(storage):
        raise StudyError(f"--storage {storage}: sweep workers need a database URL (postgresql://…) to share")
    n_studies = n_trials = 0
    for bb, pre, data, folds in plan(st, source):
        tasks = make_tasks(st, bb, pre, data, folds, trials, timeout)
        done = [0]

        def tick(_r, what=f"{bb}/{pre}", total=len(tasks)):
            done[0] += 1
            if progress:
                progress(done[0], total, what)
        for r in run_tasks(tasks, data.X, data.meta, storage, workers, tick, search_only=True):
            n_studies += r.n_ran > 0
            n_trials += r.n_ran
    return n_studies, n_trials


def run_study(st: Study, db, workdir: str | Path = ".", tracking: str | None = None, workers: int | None = None,
              trials: int | None = None, timeout: float | None = None, progress=None,
              storage: str | None = None) -> SweepReport:
    t0 = time.time()
    workdir = Path(workdir)
    sweep_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    rep = SweepReport(sweep_id)
    plans = plan(st, db)
    rep.phases["load"] = time.time() - t0
    tracker = Tracker(st.study, tracking)
    rep.mlflow_uri = tracker.uri
    storage = storage or (workdir / "optuna" / f"{_safe(st.study)}.journal").resolve()
    parent = tracker.run(f"sweep {sweep_id}", params=_config_params(st), tags=dict(
        level="sweep", study=st.study, sweep_id=sweep_id, code_version=code_version(), config=str(st.path or ""),
        optuna_storage=_redact(str(storage))), status=None)
    rep.parent_run_id = parent
    try:
        all_rows, all_preds = [], []
        for bb, pre, data, folds in plans:
            tasks = make_tasks(st, bb, pre, data, folds, trials, timeout)
            if progress:
                progress(0, len(tasks), f"{bb}/{pre}")
            done = [0]

            def tick(_res):
                done[0] += 1
                if progress:
                    progress(done[0], len(tasks), f"{bb}/{pre}")
            t1 = time.time()
            results = run_tasks(tasks, data.X, data.meta, storage, workers or st.workers, tick)
            t2 = time.time()
            rep.n_tasks += len(results)
            rep.n_failed += sum(r.error is not None for r in results)
            rep.n_trials += sum(len(r.trials) for r in results)
            rows, preds = _score_and_track(st, sweep_id, bb, pre, data, results, tracker, parent)
            rep.phases["tasks"] += t2 - t1
            rep.phases["search_sum"] += sum(r.seconds - r.fit_seconds for r in results)
            rep.phases["refit_sum"] += sum(r.fit_seconds for r in results)
            rep.phases["score_track"] += time.time() - t2
            all_rows += rows
            all_preds.append(preds)
        t3 = time.time()
        con = _connect_when_free(db, workdir, sweep_id, all_rows, all_preds)
        try:
            con.execute("BEGIN")
            write_results(con, all_rows)
            write_predictions(con, pl.concat(all_preds) if all_preds else pl.DataFrame())
            con.execute("COMMIT")
        finally:
            con.close()
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    rep.rows = all_rows
    rep.seconds = time.time() - t0
    rep.phases["write"] = time.time() - t3
    tracker.end(parent, "FINISHED", dict(seconds=f"{rep.seconds:.1f}", n_trials=rep.n_trials,
                                         n_failed_studies=rep.n_failed))
    return rep


def make_tasks(st: Study, bb: str, pre: str, data: StudyData, folds: dict, trials=None, timeout=None) -> list[Task]:
    """One Optuna study per protocol x head x selection x fold. The name carries a fingerprint of the
    fold's training images and the fixed params, so a resumed study never mixes in trials made on
    other data."""
    tasks = []
    for proto, fl in folds.items():
        for hc in st.heads:
            for sel in [st.selection] + (["oracle"] if st.oracle else []):
                for f in fl:
                    h = hashlib.sha256(json.dumps([sorted(data.image_id[f.train].tolist()), hc.fixed],
                                                  sort_keys=True, default=str).encode()).hexdigest()[:10]
                    name = f"{st.study}|{proto}|{hc.name}|{bb}|{pre}|{sel}|{f.name}|seed{st.seed}|{h}"
                    tasks.append(Task(name, proto, f, hc.name, trials or hc.trials, hc.fixed, sel, st.seed,
                                      timeout if timeout is not None else st.timeout, len(data.class_names)))
    return tasks


def _connect_when_free(db, workdir: Path, sweep_id: str, rows, preds, wait_s: float | None = None):
    """The sweep's one write: wait while another process holds the store; if it never frees, keep
    the rows in Parquet files beside the journal (nothing computed is lost) and say how to load them."""
    import os

    from featstore.store import StoreBusyError, connect

    wait_s = float(os.environ.get("FEATSTORE_WRITE_WAIT_S", 600)) if wait_s is None else wait_s
    t0 = time.time()
    while True:
        try:
            return connect(db)
        except StoreBusyError as e:
            if time.time() - t0 < wait_s:
                time.sleep(2)
                continue
            out = (workdir / f"unsaved-{sweep_id}").resolve()
            out.mkdir(parents=True, exist_ok=True)
            from featstore.track import results_frame

            results_frame(rows).write_parquet(out / "results.parquet")
            if preds:
                pl.concat(preds).write_parquet(out / "predictions.parquet")
            raise StoreBusyError(f"{e}\nThe sweep's {len(rows)} result rows are kept in {out}; load them later "
                                 f"with: featstore sql --write \"INSERT INTO results BY NAME SELECT * FROM "
                                 f"'{out}/results.parquet'\"") from e


def _redact(url: str) -> str:
    """A storage URL as it may be logged: no password."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _config_params(st: Study) -> dict:
    return dict(target=st.target, positive=st.positive, sources=",".join(st.sources or ["all"]),
                backbones=",".join(st.backbones), preprocess=",".join(st.preprocess),
                heads=",".join(f"{h.name}:{h.trials}" for h in st.heads), protocols=",".join(st.protocols),
                selection=st.selection, oracle=st.oracle, seed=st.seed, bootstrap=st.bootstrap)


def _base_row(st, sweep_id, bb, pre, data, task: Task, res: TaskResult) -> dict:
    f = task.fold
    return dict(study=st.study, sweep_id=sweep_id, protocol=task.protocol, fold=f.name, repeat=f.repeat,
                train_sources=list(f.train_sources), test_sources=list(f.test_sources), backbone=bb,
                weights_id=data.weights_id, preprocess=pre, head=task.head, target=st.target,
                selection=task.selection, oracle=task.selection == "oracle", params=res.params, seed=st.seed,
                code_version=code_version(), status="failed" if res.error else "ok", error=res.error,
                val_score=res.val_score, n_trials=len(res.trials),
                n_trials_failed=sum(t["state"] == "FAIL" for t in res.trials),
                n_dropped_shared=f.n_dropped_shared, notes="; ".join(f.notes) or None, bootstrap=st.bootstrap,
                seconds=res.seconds)


def _metric_rows(base, test_set, scope, y, P, S, n_classes, st) -> dict:
    m = metrics_for(y, P, n_classes, st.bootstrap, st.seed, S)
    row = dict(base, test_set=test_set, scope=scope, metrics=m)
    for k in ("n", "n_pos", "n_neg", "auc", "auc_lo", "auc_hi", "auc_se", "accuracy", "sensitivity", "specificity",
              "ppv", "npv", "f1", "balanced_accuracy", "dor", "brier"):
        row[k] = m.get(k)
    if n_classes > 2:
        row["balanced_accuracy"] = m.get("mean_class_accuracy")
    return row


def _score_and_track(st, sweep_id, bb, pre, data: StudyData, results: list[TaskResult], tracker, parent):
    meta, K = data.meta, len(data.class_names)
    rows, preds = [], []
    units: dict[tuple, list[TaskResult]] = {}
    for r in results:
        units.setdefault((r.task.protocol, r.task.head, r.task.selection), []).append(r)
    for (proto, head, sel), rs in units.items():
        unit_rows, pooled = [], {}
        trials = {r.task.fold.name: r.trials for r in rs}
        for r in rs:
            base = _base_row(st, sweep_id, bb, pre, data, r.task, r)
            if r.error:
                unit_rows.append(dict(base, test_set="-", scope="all"))
                continue
            fold_rows = []
            for test_set, te in r.task.fold.tests.items():
                P, S = r.predictions[test_set], r.scores.get(test_set)
                y = meta.y[te]
                fold_rows.append(_metric_rows(base, test_set, "all", y, P, S, K, st))
                srcs = meta.source[te]
                if len(set(srcs)) > 1:
                    for s in sorted(set(srcs)):
                        mask = srcs == s
                        fold_rows.append(_metric_rows(base, test_set, s, y[mask], P[mask],
                                                      None if S is None else S[mask], K, st))
                key = (test_set, r.task.fold.repeat)
                pooled.setdefault(key, []).append((te, P, S))
                preds.append(pl.DataFrame(dict(
                    study=st.study, sweep_id=sweep_id, protocol=proto, fold=r.task.fold.name, test_set=test_set,
                    backbone=bb, preprocess=pre, head=head, selection=sel, image_id=data.image_id[te],
                    source=srcs.astype(str), y=y.astype(np.int32),
                    prob=P[:, 1] if K == 2 else P.max(1), score=S if S is not None else P.max(1),
                    probs=[list(map(float, p)) for p in P]), schema_overrides={"probs": pl.List(pl.Float64)}))
            if "seen" in r.task.fold.tests and "unseen" in r.task.fold.tests:
                g = gap_test(fold_rows[0]["metrics"], next(x for x in fold_rows if x["test_set"] == "unseen"
                                                          and x["scope"] == "all")["metrics"])
                for x in fold_rows:
                    if x["test_set"] == "unseen" and x["scope"] == "all":
                        x.update(gap=g["gap"], gap_p=g["gap_p"])
                        x["metrics"] = {**x["metrics"], **g}
            unit_rows += fold_rows
        # pooled out-of-fold predictions: every image scored by a model that never saw it (mixed)
        # or never saw its source (loso). Leave-pair-out test sets overlap, so it is not pooled.
        if proto in ("mixed", "loso"):
            ok = [r for r in rs if not r.error]
            for (test_set, rep_), parts in sorted(pooled.items()):
                te = np.concatenate([p[0] for p in parts])
                P = np.concatenate([p[1] for p in parts])
                S = np.concatenate([p[2] for p in parts]) if K == 2 else None
                base = _base_row(st, sweep_id, bb, pre, data, ok[0].task, ok[0])
                base.update(fold="pooled" if proto != "mixed" or _repeats(st) == 1 else f"pooled-r{rep_}",
                            repeat=rep_, params=None, val_score=None,
                            n_trials=sum(len(r.trials) for r in ok), n_dropped_shared=None,
                            test_sources=sorted({s for r in ok for s in r.task.fold.test_sources}),
                            notes="pooled out-of-fold predictions of every fold's own selected model",
                            seconds=sum(r.seconds for r in ok), status="ok", error=None,
                            train_sources=sorted({s for r in ok for s in r.task.fold.train_sources}))
                unit_rows.append(_metric_rows(base, test_set, "all", meta.y[te], P, S, K, st))
        _track_unit(tracker, st, parent, proto, head, sel, bb, pre, data, unit_rows, preds, trials)
        rows += unit_rows
    return rows, (pl.concat(preds) if preds else pl.DataFrame())


def _repeats(st):
    return int(st.protocols.get("mixed", {}).get("repeats", 1))


def _track_unit(tracker, st, parent, proto, head, sel, bb, pre, data, unit_rows, preds, trials):
    """Unit run -> fold runs -> trial runs, with artifacts on the unit run."""
    from featstore import report

    pooled = [x for x in unit_rows if x["fold"].startswith("pooled")]
    metrics = {}
    for x in pooled + [x for x in unit_rows if proto == "seen-unseen" and x["scope"] == "all"]:
        for k in ("auc", "auc_lo", "auc_hi", "balanced_accuracy", "sensitivity", "specificity", "gap", "gap_p"):
            if x.get(k) is not None:
                metrics[f"{x['test_set']}_{k}"] = x[k]
    tags = dict(level="unit", study=st.study, protocol=proto, head=head, backbone=bb, weights_id=data.weights_id,
                preprocess=pre, selection=sel, oracle=sel == "oracle", seed=st.seed, code_version=code_version())
    with tempfile.TemporaryDirectory() as tmp:
        unit_preds = [p for p in preds if p.height and p["protocol"][0] == proto and p["head"][0] == head
                      and p["selection"][0] == sel]
        arts = report.unit_artifacts(Path(tmp), unit_rows, pl.concat(unit_preds) if unit_preds else None,
                                     data.class_names, f"{proto} / {head} / {bb} / {pre}")
        uid = tracker.run(f"{proto} / {head} / {bb}/{pre}" + (" (ORACLE)" if sel == "oracle" else ""),
                          parent=parent, metrics=metrics, tags=tags, artifacts=arts)
    for x in unit_rows:
        x["mlflow_run_id"] = uid
    by_fold: dict[str, list] = {}
    for x in unit_rows:
        if not x["fold"].startswith("pooled"):
            by_fold.setdefault(x["fold"], []).append(x)
    for fold, xs in by_fold.items():
        m = {}
        for x in xs:
            pre_ = x["test_set"] if x["scope"] == "all" else f"{x['test_set']}.{x['scope']}"
            for k in ("auc", "auc_lo", "auc_hi", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1",
                      "balanced_accuracy", "dor", "brier", "gap", "gap_p"):
                if x.get(k) is not None:
                    m[f"{pre_}_{k}"] = x[k]
        x0 = xs[0]
        if x0.get("val_score") is not None:
            m["val_score"] = x0["val_score"]
        fid = tracker.run(f"fold {fold}", parent=uid, params=x0.get("params") or {}, metrics=m,
                          tags=dict(tags, level="fold", fold=fold, train_sources=",".join(x0["train_sources"]),
                                    held_out=",".join(x0["test_sources"]), status=x0["status"],
                                    error=x0.get("error")),
                          status="FINISHED" if x0["status"] == "ok" else "FAILED")
        for x in xs:
            x["mlflow_run_id"] = fid
        for t in trials.get(fold, []):
            tracker.run(f"trial {t['number']}", parent=fid, params=t["params"],
                        metrics={"val_score": t["value"]} if t["value"] is not None else {},
                        tags=dict(tags, level="trial", fold=fold, state=t["state"], error=t.get("error")),
                        start=t["start"], end=t["end"] or t["start"],
                        status={"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(t["state"], "FAILED"))
