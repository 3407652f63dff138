"""`featstore sweep`: one study config -> splits -> Optuna sweeps -> scores -> MLflow + results rows.

Wires split, sweep (fit), score and track. The store is read (read-only) before any fitting and
written once at the end, so the sweep never holds DuckDB's single write lock while it works.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from featstore import results as R
from featstore.api import Store
from featstore.heads import HEADS
from featstore.score import binary_metrics, gap_test, multiclass_metrics
from featstore.split import SELECTIONS, oracle_selections
from featstore.store import transaction
from featstore.study import Study, StudyData, StudyError, check_feasible, load_data
from featstore.sweep import Task, TaskResult, run_tasks
from featstore.track import (OBJECTIVE, ModelRuns, Tracker, code_version, log_sweep_headline, portable_path,
                             unit_artifacts, unit_metrics, write_predictions, write_results)


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
    towers: dict = {}
    with Store(db, read_only=True) as fs:
        for bb in st.backbones:
            for pre in st.preprocess:
                data = load_data(fs, st, bb, pre)
                folds = {p: check_feasible(st, data, p) for p in st.protocols}
                for hc in st.heads:
                    if hc.name == "zeroshot":
                        data.head_inputs[hc.name] = zeroshot_inputs(st, hc, bb, pre, data, fs, towers)
                out.append((bb, pre, data, folds))
    return out


def zeroshot_inputs(st: Study, hc, bb: str, pre: str, data: StudyData, fs, towers: dict) -> dict:
    """The zero-shot head's class text embeddings for one embedding set, from the text tower of the weights
    it was made with (one tower per backbone and weights, whatever the preprocessing). Anything that
    cannot work (no text tower, a pooling outside the joint space, other weights, prompts that do not
    name the classes) is a StudyError, one line, before any fitting."""
    from featstore import zeroshot as Z

    where = f"{st.path or st.study}: heads.zeroshot: {bb}/{pre}"
    prompts = hc.fixed["prompts"]
    labels = []
    if st.target == "binary":
        labels = [v for (v,) in fs.con.execute(f'SELECT DISTINCT "{st.label_column}" FROM images').fetchall()
                  if v is not None]
    key = (bb, data.weights_id.partition(";input=")[0])
    try:
        kc = Z.key_classes(prompts, data.class_names, st.target, st.positive, labels)
        if key not in towers:
            towers[key] = Z.text_tower(bb, data.weights_id, hc.options.get("weights_dir"),
                                       (hc.options.get("config_overrides") or {}).get(bb))
        ct = Z.class_texts(towers[key], prompts, kc)
    except Z.ZeroShotError as e:
        raise StudyError(f"{where}: {str(e).removeprefix('zero-shot head: ')}") from None
    except Exception as e:  # noqa: BLE001 - a model library failing to build or load: one line, not a traceback
        raise StudyError(f"{where}: the text tower could not be built ({type(e).__name__}: {str(e)[:300]})") from e
    if ct.embeddings.shape[1] != data.X.shape[1]:
        raise StudyError(f"{where}: the text embeddings are {ct.embeddings.shape[1]}-d, the stored image "
                         f"embeddings {data.X.shape[1]}-d: not one joint image-text space")
    return dict(ct.as_head_inputs(), n_classes=len(data.class_names))


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


def make_tasks(st: Study, bb: str, pre: str, data: StudyData, folds: dict, trials=None, timeout=None) -> list[Task]:
    """One Optuna study per protocol x head x selection x fold, grouped by unit (protocol, head,
    selection, seed: its folds are adjacent). The name carries a fingerprint of the
    fold's training images and the fixed params, so a resumed study never mixes in trials made on
    other data."""
    tasks = []
    # mixed first: the other protocols' source-mean gap needs the same head's mixed unit, and a
    # unit is tracked only once what it needs is done (`Units`)
    for proto, fl in sorted(folds.items(), key=lambda kv: kv[0] != "mixed"):
        # leave-pair-out AUCs move with the selection (validation split, sampler, initialisation):
        # `selection_repeats` re-runs its selection under that many seeds (mean ± sd in the report)
        seeds = [st.seed + k for k in range(selection_repeats(st) if proto == "leave-pair-out" else 1)]
        for hc in st.heads:
            # a head without hyperparameters (zero-shot) runs one trial whatever --trials says
            n_trials = (trials or hc.trials) if HEADS[hc.name].searched else 1
            inputs = data.head_inputs.get(hc.name, {})
            if HEADS[hc.name].needs_inputs and not inputs:
                raise StudyError(f"{st.path or st.study}: head {hc.name} has no inputs for {bb}/{pre} "
                                 f"(benchmark.plan makes them)")
            for sel in [st.selection] + (list(oracle_selections()) if st.oracle else []):
                for seed in seeds:
                    for f in fl:
                        key = [sorted(data.image_id[f.train].tolist()), hc.fixed]
                        if inputs:  # other text embeddings (other weights or prompts): another study
                            key.append(inputs.get("text_identity"))
                        h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
                        name = f"{st.study}|{proto}|{hc.name}|{bb}|{pre}|{sel}|{f.name}|seed{seed}|{h}"
                        tasks.append(Task(name, proto, f, hc.name, n_trials, hc.fixed, sel, seed,
                                          timeout if timeout is not None else st.timeout, len(data.class_names),
                                          attrs=dict(study=st.study, backbone=bb, preprocess=pre), inputs=inputs))
    return tasks


def selection_repeats(st) -> int:
    return int(getattr(st, "selection_repeats", 1) or 1)


def _connect_when_free(db, workdir: Path, sweep_id: str, rows, preds, wait_s: float | None = None):
    """The sweep's one write: wait while another process holds the store; if it never frees, keep
    the rows in Parquet files beside the journal (nothing computed is lost) and say how to load them."""
    import os
    import shlex

    from featstore.store import StoreBusyError, connect

    from featstore.options import env_number

    wait_s = env_number("FEATSTORE_WRITE_WAIT_S", 600) if wait_s is None else wait_s
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
                selection=st.selection, oracle=st.oracle, seed=st.seed, bootstrap=st.bootstrap)


def _base_row(st, sweep_id, bb, pre, data, task: Task, res: TaskResult) -> dict:
    f = task.fold
    return dict(study=st.study, sweep_id=sweep_id, protocol=task.protocol, fold=f.name, repeat=f.repeat, kind="fold",
                train_sources=list(f.train_sources), test_sources=list(f.test_sources), backbone=bb,
                weights_id=data.weights_id, preprocess=pre, head=task.head, target=st.target,
                selection=task.selection, oracle=SELECTIONS[task.selection].is_oracle, params=res.params,
                seed=task.seed, code_version=code_version(), status="failed" if res.error else "ok", error=res.error,
                val_score=res.val_score, n_trials=len(res.trials),
                n_trials_failed=sum(t["state"] == "FAIL" for t in res.trials),
                n_dropped_shared=f.n_dropped_shared, notes="; ".join(f.notes) or None, bootstrap=st.bootstrap,
                seconds=res.seconds, fit_info=res.fit_info or None, **data.state)


def _metric_rows(base, test_set, scope, y, P, S, n_classes, st) -> dict:
    m = metrics_for(y, P, n_classes, st.bootstrap, st.seed, S)
    row = dict(base, test_set=test_set, scope=scope, metrics=m)
    for k in R.METRICS:
        row[k] = m.get(k)
    if n_classes > 2:
        row["balanced_accuracy"] = m.get("mean_class_accuracy")
    row["uncertainty"] = "image" if row.get("auc_lo") is not None else None
    row["n_sources"] = len(set(base["test_sources"])) if scope == "all" else 1
    return row


def _unit_key(task: Task) -> tuple:
    return (task.protocol, task.head, task.selection, task.seed)


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
            self.units.setdefault(_unit_key(t), []).append(i)
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
        key = _unit_key(res.task)
        if all(i in self.results for i in self.units[key]):
            self.scored[key] = _score_unit(*self.ctx, [self.results[i] for i in self.units[key]])
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
        uid = _track_unit(self.tracker, st, model_run, proto, head, sel, bb, pre, data, unit_rows, preds,
                          trials, seed)
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


def _score_unit(st, sweep_id, bb, pre, data: StudyData, rs: list[TaskResult]) -> tuple:
    """A unit's fold and pooled rows and its predictions (the source-mean row comes at tracking)."""
    meta, K = data.meta, len(data.class_names)
    proto, head, sel, _ = _unit_key(rs[0].task)
    preds = []
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
            # per source: every image that occurs in it (a shared file counts in each of its sources)
            allowed = set(r.task.fold.test_sources if test_set == "unseen" else r.task.fold.train_sources)
            occ = [meta.occurs_in[i] & allowed for i in te] if meta.occurs_in else [{x} for x in srcs]
            in_scope = sorted(set().union(*occ)) if occ else []
            if len(in_scope) > 1:
                for s in in_scope:
                    mask = np.array([s in o for o in occ])
                    fold_rows.append(_metric_rows(base, test_set, s, y[mask], P[mask],
                                                  None if S is None else S[mask], K, st))
            key = (test_set, r.task.fold.repeat)
            pooled.setdefault(key, []).append((te, P, S))
            preds.append(pl.DataFrame(dict(
                study=st.study, sweep_id=sweep_id, protocol=proto, fold=r.task.fold.name, test_set=test_set,
                backbone=bb, preprocess=pre, head=head, selection=sel, seed=r.task.seed,
                image_id=data.image_id[te],
                source=srcs.astype(str), y=y.astype(np.int32),
                prob=P[:, 1] if K == 2 else P.max(1), score=S if S is not None else P.max(1),
                probs=[list(map(float, p)) for p in P]), schema_overrides={"probs": pl.List(pl.Float64)}))
        if "seen" in r.task.fold.tests and "unseen" in r.task.fold.tests:
            g = gap_test(fold_rows[0]["metrics"], next(x for x in fold_rows if x["test_set"] == "unseen"
                                                      and x["scope"] == "all")["metrics"])
            for x in fold_rows:  # the difference only: its p at image level would overstate (see source-mean)
                if x["test_set"] == "unseen" and x["scope"] == "all":
                    x.update(gap=g["gap"])
                    x["metrics"] = {**x["metrics"], **{f"image_level_{k}": v for k, v in g.items()}}
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
            base.update(fold="pooled" if proto != "mixed" or _repeats(st) == 1 else f"pooled-r{rep_}", kind="pooled",
                        repeat=rep_, params=None, val_score=None,
                        n_trials=sum(len(r.trials) for r in ok), n_dropped_shared=None,
                        test_sources=sorted({s for r in ok for s in r.task.fold.test_sources}),
                        notes="pooled out-of-fold predictions of every fold's own selected model", fit_info=None,
                        seconds=sum(r.seconds for r in ok), status="ok", error=None,
                        train_sources=sorted({s for r in ok for s in r.task.fold.train_sources}))
            unit_rows.append(_metric_rows(base, test_set, "all", meta.y[te], P, S, K, st))
            if proto == "mixed" and K == 2:  # does the model use the source? (featstore/verdict.py)
                unit_rows[-1]["metrics"].update(mixed_source_metrics(
                    st, *_parts(meta, [r for r in ok if r.task.fold.repeat == rep_], test_set, groups=True)))
    return rs, unit_rows, preds, trials


def _parts(meta, rs, test_set: str, groups: bool = False):
    """(y, score, source, fold[, patient]) of a unit's predictions on one test set. A file shared by
    collections counts once in each held-out source it occurs in (split.Meta.members)."""
    ys, ss, srcs, folds, gs = [], [], [], [], []
    for r in rs or ():
        if r.error or test_set not in r.task.fold.tests or r.scores.get(test_set) is None:
            continue
        f = r.task.fold
        allowed = set(f.test_sources if test_set == "unseen" else f.train_sources)
        for i, sc in zip(f.tests[test_set], r.scores[test_set]):
            for s in sorted((meta.occurs_in[i] if meta.occurs_in else {meta.source[i]}) & allowed):
                ys.append(meta.y[i]), ss.append(sc), srcs.append(s), folds.append(f.name), gs.append(meta.groups[i])
    out = np.asarray(ys, int), np.asarray(ss, float), np.asarray(srcs, object), np.asarray(folds, object)
    return out + (np.asarray(gs, object),) if groups else out


def mixed_source_metrics(st, y, score, source, fold, group) -> dict:
    """What a mixed unit's pooled row carries for the verdict: the shortcut estimand (cross-source minus
    same-source AUC, patients resampled within sources; the source-level interval beside it) and the seen
    AUC as the mean per-source AUC (the one seen of a model: table, figures, gap and MLflow)."""
    from featstore.score import cluster_bootstrap, source_contrast

    if not len(y):
        return {}
    sc = source_contrast(y, score, source, group, n_boot=st.bootstrap, seed=st.seed)
    sc_src = source_contrast(y, score, source, group, n_boot=st.bootstrap, seed=st.seed, resample_sources=True)
    seen = cluster_bootstrap(y, score, source, unit=fold, n_boot=0)
    return dict(shortcut=sc, shortcut_source_level={k: sc_src[k] for k in ("estimate", "lo", "hi", "se", "p", "df",
                                                                             "ci", "uncertainty", "n_sources", "note")
                                                     if k in sc_src},
                seen_mean=seen.get("estimate"), seen_per_source=seen.get("per_source"),
                seen_sources=seen.get("n_sources"))


def _clip(x, low):
    """A t interval can pass the scale's ends (AUC in [0, 1], a gap in [-1, 1]): clip it there."""
    return None if x is None else float(min(1.0, max(low, x)))


def source_mean_rows(st, sweep_id, bb, pre, data, rs, seen_rs) -> list[dict]:
    """The headline number of a unit: the mean over held-out sources (with both classes) of the
    per-source AUC, its source-level bootstrap CI (sources resampled, then images within them) and
    the worst source; with a seen side (seen-unseen's own seen set, else the same head's mixed
    k-fold), the seen - unseen gap with its source-level CI. Leave-pair-out: mean over pairs and
    the worst pair, no CI (pairs share sources, so they are not independent clusters)."""
    from featstore.score import SOURCE_LEVEL, cluster_bootstrap, cluster_bootstrap_gap

    proto = rs[0].task.protocol
    ok = [r for r in rs if not r.error]
    if proto == "mixed" or not ok:
        return []
    y, sc, src, fold, grp = _parts(data.meta, ok, "unseen", groups=True)
    pairs = proto == "leave-pair-out"
    if pairs:  # a pair is the unit that has both classes
        src = fold.copy()
    if not len(y):
        return []
    cb = cluster_bootstrap(y, sc, src, unit=fold, group=grp, n_boot=0 if pairs else st.bootstrap, seed=st.seed)
    base = _base_row(st, sweep_id, bb, pre, data, ok[0].task, ok[0])
    worst = cb.get("worst") or {}
    per = cb.get("per_source") or {}
    if worst.get("auc") is None and per:
        w = min(per, key=per.get)
        worst = dict(source=w, auc=per[w])
    row = dict(base, kind="source-mean", fold="mean over held-out " + ("pairs" if pairs else "sources"), repeat=0,
               test_set="unseen", scope="all", params=None, val_score=None, fit_info=None,
               n_trials=sum(len(r.trials) for r in ok), n_dropped_shared=None, seconds=sum(r.seconds for r in ok),
               test_sources=sorted({s for r in ok for s in r.task.fold.test_sources}),
               train_sources=sorted({s for r in ok for s in r.task.fold.train_sources}),
               n=int(len(y)), n_pos=int(y.sum()), n_neg=int((1 - y).sum()),
               auc=cb.get("estimate"), auc_lo=_clip(cb.get("lo"), 0), auc_hi=_clip(cb.get("hi"), 0),
               auc_se=cb.get("se"),
               n_sources=cb.get("n_sources"), auc_worst=worst.get("auc"), worst_source=worst.get("source"),
               uncertainty="source" if cb.get("lo") is not None and cb.get("uncertainty") == SOURCE_LEVEL else None,
               notes=cb.get("note"),
               metrics=dict(per_source=per, excluded=cb.get("excluded"), ci=cb.get("ci"), p_chance=cb.get("p"),
                            worst=worst, n_boot=cb.get("n_boot")))
    for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "dor", "brier"):
        row[k] = None
    if not pairs:  # is a held-out source scored below chance? Holm over the K sources (featstore/verdict.py)
        from featstore.score import below_chance

        row["metrics"]["below_chance"] = below_chance(y, sc, src, grp, n_perm=max(st.bootstrap, 1000), seed=st.seed)
    # leave-pair-out has no gap: its pairs share sources (no interval that covers, score.pair_gap) and its
    # seen side would be a second "seen"; the drop on new sources is LOSO's (featstore/verdict.py)
    if seen_rs and not pairs:
        ys, ss, srcs, folds, gs = _parts(data.meta, seen_rs, "seen", groups=True)
        if len(ys):
            g = cluster_bootstrap_gap(ys, ss, srcs, y, sc, src, unit_seen=folds, unit_unseen=fold, group_seen=gs,
                                      group_unseen=grp, n_boot=st.bootstrap, seed=st.seed)
            row.update(gap=g.get("estimate"), gap_lo=_clip(g.get("lo"), -1), gap_hi=_clip(g.get("hi"), -1),
                       gap_p=g.get("p"))
            row["metrics"]["gap"] = {k: v for k, v in g.items() if k != "replicates"}
            row["metrics"]["gap"]["seen_from"] = seen_rs[0].task.protocol
    return [row]


def _repeats(st):
    return int(st.protocols.get("mixed", {}).get("repeats", 1))


def _track_unit(tracker, st, parent, proto, head, sel, bb, pre, data, unit_rows, preds, trials, seed=None) -> str:
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
