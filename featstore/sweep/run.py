"""`featstore sweep`: one study config -> plan -> Optuna fits -> rows -> MLflow + results rows.

Wires the steps of featstore.sweep. The store is read (read-only) before any fitting and
written once at the end, so the sweep never holds DuckDB's single write lock while it works.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from featstore.store import transaction
from featstore.sweep.config import Study, StudyError
from featstore.heads import HEADS
from featstore.sweep.adapt import curve_points, curve_rows, mlflow_curve
from featstore.sweep.data import StudyData
from featstore.sweep.ensemble import combine, ensemble_name, members_of, plan_ensembles
from featstore.sweep.fit import TaskResult, run_tasks
from featstore.sweep.plan import Task, make_tasks, plan
from featstore.sweep.rows import score_unit, source_mean_rows, unit_key
from featstore.sweep.tracking import track_unit
from featstore.track import (ModelRuns, Tracker, code_version, log_sweep_headline, portable_path, write_predictions,
                             write_results)


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
    # where the wall time went: load (store -> arrays, splits), tasks (worker pool wall, less the
    # parent's scoring meanwhile), of which, summed over workers, search (Optuna trials) and refit
    # (final fit + predict); score_track (the parent scoring each unit as it finishes: bootstrap CIs,
    # tests, MLflow runs and artifacts); write (results table)
    phases: dict = field(default_factory=lambda: dict(load=0.0, tasks=0.0, search_sum=0.0, refit_sum=0.0,
                                                      score_track=0.0, write=0.0))
    # the same sums per head: head -> studies, trials, search (worker seconds in Optuna trials), refit, cpu
    # (the workers' CPU seconds on them: the work itself, which no scheduling or load changes)
    by_head: dict = field(default_factory=dict)


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


class SweepLocked(StudyError):
    """Another live sweep runs this study in this working folder."""


@contextmanager
def sweep_lock(workdir: str | Path, study: str):
    """Hold WORKDIR/optuna/<study>.lock for a sweep's life. Two sweeps of one study in one folder
    would share the journal (each would fail the other's running trials as interrupted) and race
    on MLflow's database. flock is released by the kernel when the process dies, so a kill -9
    never leaves a stale lock. The file stays (removing a lock file races); it names the holder."""
    path = Path(workdir) / "optuna" / f"{_safe(study)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = {}
            for _ in range(20):  # the holder writes its name right after locking
                try:
                    holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except ValueError:
                    holder = {}
                if holder:
                    break
                time.sleep(0.1)
            who = f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            if holder.get("host") and holder["host"] != socket.gethostname():
                who += f" on {holder['host']}"
            raise SweepLocked(f"another sweep ({who}) is running study {study} in this folder "
                              f"({Path(workdir).resolve()}); wait for it, or give this one another --workdir") \
                from None
        me = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                             started=datetime.now(timezone.utc).isoformat(timespec="seconds"))).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: no stale name for the next reader
    finally:
        os.close(fd)


def run_study(st: Study, db, workdir: str | Path = ".", tracking: str | None = None, workers: int | None = None,
              trials: int | None = None, timeout: float | None = None, progress=None,
              storage: str | None = None, on_unit=None) -> SweepReport:
    """Run the study; one sweep per study and working folder at a time (`sweep_lock`). Each unit's
    MLflow runs are logged as its last fold finishes; on_unit(key, rows, run_id), if given, is called
    then (key: protocol, head, selection, seed)."""
    with sweep_lock(workdir, st.study):
        return _run_study(st, db, workdir, tracking, workers, trials, timeout, progress, storage, on_unit)


def _run_study(st: Study, db, workdir, tracking, workers, trials, timeout, progress, storage,
               on_unit=None) -> SweepReport:
    t0 = time.time()
    workdir = Path(workdir)
    sweep_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    rep = SweepReport(sweep_id)
    plans = plan(st, db)
    rep.phases["load"] = time.time() - t0
    tracker = Tracker(st.study, tracking)
    rep.mlflow_uri = tracker.uri
    tracker.store = str(db)
    storage = storage or (workdir / "optuna" / f"{_safe(st.study)}.journal").resolve()
    stale = tracker.close_stale(sweep_id)
    if stale:
        rep.notes.append(f"{len(stale)} MLflow run(s) an interrupted sweep left RUNNING are now KILLED")
    import os
    import signal
    import socket
    import threading

    started = datetime.now(timezone.utc)
    parent = tracker.run(f"{st.study} {started:%Y-%m-%d %H:%M}", params=_config_params(st), tags=dict(
        level="sweep", study=st.study, sweep_id=sweep_id, code_version=code_version(), config=portable_path(st.path),
        optuna_storage=_redact(portable_path(storage)), host=socket.gethostname(), pid=os.getpid()),
        status=None, start=started, artifacts=[st.path] if st.path else ())
    tracker.sweep_run = rep.parent_run_id = parent
    tracker.models = ModelRuns(tracker, parent, started)  # one run per model, the parent of its units
    # SIGTERM (a scheduler's kill, `kill`) unwinds like Ctrl-C, so the runs are closed as KILLED
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        old_term = signal.signal(signal.SIGTERM, _term)
    n_done = [0]
    try:
        all_rows, all_preds = [], []
        collected = {}  # (backbone, preprocess) -> (data, task results): the ensembles' members
        for bb, pre, data, folds in plans:
            tasks = make_tasks(st, bb, pre, data, folds, trials, timeout)
            if progress:
                progress(0, len(tasks), f"{bb}/{pre}")
            done = [0]
            units = Units(st, sweep_id, bb, pre, data, tasks, tracker, parent, on_unit)

            def tick(res):
                done[0] += 1
                n_done[0] += 1  # on the sweep run: a live sweep shows its progress in the UI
                tracker.client.log_metric(parent, "tasks_done", n_done[0], step=n_done[0])
                units.add(res)  # a unit whose last fold this was is scored and tracked now
                if progress:
                    progress(done[0], len(tasks), f"{bb}/{pre}")
            t1 = time.time()
            results = run_tasks(tasks, data.X, data.meta, storage, workers or st.workers, tick)
            rows, preds = units.finish()
            rep.n_tasks += len(results)
            rep.n_failed += sum(r.error is not None for r in results)
            rep.n_trials += sum(len(r.trials) for r in results)
            rep.phases["tasks"] += time.time() - t1 - units.seconds
            rep.phases["search_sum"] += sum(r.seconds - r.fit_seconds for r in results)
            rep.phases["refit_sum"] += sum(r.fit_seconds for r in results)
            rep.phases["score_track"] += units.seconds
            for r in results:
                h = rep.by_head.setdefault(r.task.head, dict(studies=0, trials=0, search=0.0, refit=0.0,
                                                                  cpu=0.0))
                h["studies"] += 1
                h["trials"] += len(r.trials)
                h["search"] += r.seconds - r.fit_seconds
                h["refit"] += r.fit_seconds
                h["cpu"] += r.cpu_seconds
            all_rows += rows
            all_preds.append(preds)
            collected[(bb, pre)] = (data, results)
        for rows, preds in ensemble_units(st, sweep_id, collected, tracker, parent, on_unit, rep.notes):
            all_rows += rows
            all_preds.append(preds)
        t3 = time.time()
        con = _connect_when_free(db, workdir, sweep_id, all_rows, all_preds)
        try:
            with transaction(con):  # results and predictions together, or neither
                write_results(con, all_rows)
                write_predictions(con, pl.concat(all_preds) if all_preds else pl.DataFrame())
        finally:
            con.close()
    except BaseException as e:
        tracker.close_open("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    rep.rows = all_rows
    rep.seconds = time.time() - t0
    rep.phases["write"] = time.time() - t3
    log_sweep_headline(tracker, parent, tracker.models)
    tracker.end(parent, "FINISHED", dict(seconds=f"{rep.seconds:.1f}", n_trials=rep.n_trials,
                                         n_failed_studies=rep.n_failed))
    return rep


def _connect_when_free(db, workdir: Path, sweep_id: str, rows, preds, wait_s: float | None = None):
    """The sweep's one write: wait while another process holds the store; if it never frees, keep
    the rows in Parquet files beside the journal (nothing computed is lost) and say how to load them."""
    import shlex

    from featstore.options import timing
    from featstore.store import StoreBusyError, connect

    wait_s = timing("FEATSTORE_WRITE_WAIT_S") if wait_s is None else wait_s
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
                                 f"with: featstore sql --write --allow-read {shlex.quote(str(out))} \"INSERT INTO "
                                 f"results BY NAME SELECT * FROM '{out}/results.parquet'\"") from e


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
                selection=",".join(st.selections), oracle=st.oracle, seed=st.seed, bootstrap=st.bootstrap)


class Units:
    """Scores and tracks each unit (protocol, head, selection, seed over its outer folds) as soon as
    its last fold task finishes, so the units of a live sweep appear in MLflow one by one. `add`
    takes TaskResults in any order (workers finish out of order); the rows do not depend on it."""

    def __init__(self, st, sweep_id, bb, pre, data: StudyData, tasks: list[Task], tracker, parent, on_unit=None):
        self.ctx = (st, sweep_id, bb, pre, data)
        self.tracker, self.parent, self.on_unit = tracker, parent, on_unit
        if getattr(tracker, "models", None) is None:  # the models' runs, shared by every embedding set's Units
            tracker.models = ModelRuns(tracker, parent)
        self.units: dict[tuple, list[int]] = {}   # unit -> its tasks' places, in task order
        self.at: dict[str, int] = {}
        for i, t in enumerate(tasks):
            self.units.setdefault(unit_key(t), []).append(i)
            self.at[t.study_name] = i
        self.results: dict[int, TaskResult] = {}
        self.scored: dict[tuple, tuple] = {}      # unit -> (results, rows, predictions, trials)
        self.tracked: dict[tuple, tuple] = {}     # unit -> (rows, predictions)
        self.seconds = 0.0                        # spent scoring and tracking

    def needs(self, key) -> tuple | None:
        """The unit whose seen side this one's source-mean gap uses (binary only): the same head's
        mixed unit, where the study has one (seen-unseen uses its own seen set)."""
        st, data = self.ctx[0], self.ctx[4]
        proto, head, sel, _ = key
        if len(data.class_names) != 2 or proto in ("mixed", "seen-unseen"):
            return None
        k = ("mixed", head, sel, st.seed)
        return k if k in self.units else None

    def add(self, res: TaskResult) -> None:
        t0 = time.time()
        self.results[self.at[res.task.study_name]] = res
        key = unit_key(res.task)
        if all(i in self.results for i in self.units[key]):
            self.scored[key] = score_unit(*self.ctx, [self.results[i] for i in self.units[key]])
            # this unit, and those that waited for it
            for k in [key] + [k for k in self.scored if k not in self.tracked and self.needs(k) == key]:
                self._track(k)
        self.seconds += time.time() - t0

    def _track(self, key) -> None:
        need = self.needs(key)
        if key in self.tracked or (need is not None and need not in self.scored):
            return
        st, sweep_id, bb, pre, data = self.ctx
        rs, unit_rows, preds, trials = self.scored[key]
        proto, head, sel, seed = key
        if len(data.class_names) == 2:
            seen_rs = rs if proto == "seen-unseen" else (self.scored[need][0] if need else None)
            unit_rows = unit_rows + source_mean_rows(st, sweep_id, bb, pre, data, rs, seen_rs)
        # the unit's parent is its model's run (backbone, preprocessing, head, selection), made on first use
        model = (bb, pre, head, sel)
        model_run = self.tracker.models.parent(model, dict(
            backbone=bb, weights_id=data.weights_id, preprocess=pre, head=head, selection=sel, target=st.target),
            dict(study=st.study, sweep_id=sweep_id, backbone=bb, preprocess=pre, head=head, selection=sel,
                 code_version=code_version()))
        # the learning curves (featstore/sweep/adapt.py); an ensemble has nothing to refit
        if proto == "adapt" and len(data.class_names) == 2 and head in HEADS:
            unit_rows = unit_rows + adapt_rows(st, data, rs, unit_rows)
        uid = track_unit(self.tracker, st, model_run, proto, head, sel, bb, pre, data, unit_rows, preds,
                          trials, seed)
        if proto == "adapt":
            mlflow_curve(self.tracker, uid, unit_rows)
        self.tracked[key] = (unit_rows, preds)
        self.tracker.models.unit_done(model, unit_rows, last=all(
            k in self.tracked for k in self.units if (k[1], k[2]) == (head, sel)))
        if self.on_unit:
            self.on_unit(key, unit_rows, uid)

    def finish(self) -> tuple[list[dict], pl.DataFrame]:
        """Every unit's rows and predictions, in task order."""
        left = [k for k in self.units if k not in self.tracked]
        if left:
            raise RuntimeError(f"units never finished: {left}")
        rows = [x for k in self.units for x in self.tracked[k][0]]
        preds = [p for k in self.units for p in self.tracked[k][1]]
        return rows, (pl.concat(preds) if preds else pl.DataFrame())


def adapt_rows(st, data: StudyData, rs: list[TaskResult], unit_rows: list[dict]) -> list[dict]:
    """The adapt unit's curve rows: for each site's fold, its points refitted with the fold's selected
    hyperparameters (featstore/sweep/adapt.py), on the fold row's identity."""
    out = []
    for r in rs:
        if r.error:
            continue
        base = next(x for x in unit_rows if x["kind"] == "fold" and x["fold"] == r.task.fold.name
                    and x["test_set"] == "unseen" and x["scope"] == "all")
        points, notes = curve_points(st, data, r)
        out += curve_rows(base, points, notes)
    return out


def ensemble_units(st, sweep_id, collected: dict, tracker, parent, on_unit, notes: list) -> list[tuple]:
    """Each `ensemble` head's (rows, predictions), scored and tracked as a head's units are
    (featstore/sweep/ensemble.py): its members' scores averaged fold by fold, nothing refitted."""
    from dataclasses import replace

    out = []
    for heads, bbs, pres in plan_ensembles(st):
        head, bb, pre = ensemble_name(heads, bbs, pres)
        datas = {(b, p): collected[(b, p)][0] for b in bbs for p in pres}
        members = {m: [r for r in collected[m[1:]][1] if r.task.head == m[0]] for m in members_of(heads, bbs, pres)}
        ens, why = combine(members, datas, head, bb, pre)
        if why:
            notes.append(f"ensemble left out: {why}")
            continue
        d0 = datas[(bbs[0], pres[0])]
        data = replace(d0, weights_id="+".join(dict.fromkeys(d.weights_id for d in datas.values())))
        units = Units(st, sweep_id, bb, pre, data, [r.task for r in ens], tracker, parent, on_unit)
        for r in ens:
            units.add(r)
        out.append(units.finish())
    return out
