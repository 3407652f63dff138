"""Fit: Optuna sweeps of the heads under each protocol, selection walled off from the test sources.

There is one Optuna study per (protocol, head, backbone, preprocessing, outer fold). A study shared
by all folds would let the held-out source steer the sampler: its labels train the models scored on
the *other* folds' validation sets, and the sampler proposes from those scores. Per-fold studies
keep the wall: what fold F selects depends on F's training sources only (tests/test_benchmark.py,
test_selection_never_sees_the_held_out_source, scrambles the held-out labels: nothing selected changes).

Units run in worker processes (spawn; each gets the arrays once) when workers > 1; the Optuna
journal file is safe for several processes, and a re-run resumes each study where it stopped.
The parent alone writes MLflow and the store.

Shared storage (a database URL, e.g. postgresql://…) lets `featstore sweep-worker` processes on any
machine join in. A process *claims* a study by creating it (the storage's unique study name makes
that atomic) and runs all its trials in order, so N workers give the same trials as one. Others skip
a claimed study, or, when they need its result, wait for it, and take it over if its owner went
quiet (heartbeats fail a dead owner's running trial; see `GRACE_S`).
"""
from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import optuna
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score

from featstore.heads import HEADS, create_head
from featstore.metrics import roc_auc
from featstore.procs import process_pool
from featstore.split import Meta, get_selection
from featstore.sweep.plan import Task, attach_splits, selection_splits_for


    #                                             the class text embeddings); never in params, never searched


@dataclass
class TaskResult:
    task: Task
    trials: list[dict] = field(default_factory=list)
    params: dict | None = None
    val_score: float | None = None
    predictions: dict = field(default_factory=dict)   # test set -> [n, K] probabilities
    scores: dict = field(default_factory=dict)        # test set -> [n] log-odds (binary) for ranking
    error: str | None = None
    seconds: float = 0.0
    fit_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time on the task (search + refit): the work, whatever the load
    n_ran: int = 0          # trials this process ran (the rest: earlier runs, other workers)
    fit_info: dict = field(default_factory=dict)  # what the refitted head reports (fit_info_), for the rows


def study_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def validation_score(y, P, n_classes) -> float:
    """AUC (binary: P is the [n] log-odds) or macro one-vs-rest AUC (P is [n, K])."""
    if len(np.unique(y)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return roc_auc(y, P)
    return float(roc_auc_score(y, P, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def _proba(model, X, n_classes):
    """Probabilities with a column for every class, even one the model never saw."""
    P = np.asarray(model.predict_proba(X), dtype=np.float64)
    if P.shape[1] == n_classes:
        return P
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(model.classes_, int)] = P
    return full


def _ranking(model, X, n_classes):
    """What AUC ranks on: log-odds for binary heads (never saturate), probabilities otherwise."""
    if n_classes == 2 and len(model.classes_) == 2:
        return np.asarray(model.decision_function(X), dtype=np.float64)
    return _proba(model, X, n_classes)


def fit_head(name, params, X, y, domains, seed, inputs=None, prepared=None):
    """prepared: what HeadSpec.prepare computed once from this very X (e.g. the fitted scaler), reused by
    every trial on the same rows instead of being recomputed; the fit is the same as without it."""
    return create_head(name, **{**params, **(inputs or {}), "random_state": seed}).fit(X, y, domains=domains,
                                                                                      **(prepared or {}))


@contextmanager
def single_threaded(head: str | None = None):
    """One thread for BLAS/OpenMP (numpy, scikit-learn, LightGBM) and torch while a study runs. The
    models are small: OpenBLAS threads on a busy machine (2 workers on 2 cores) spin against each
    other, and an lbfgs logistic fit on the real set took 3-11 s instead of 0.2 s. It also makes the
    rows independent of the machine's core count: float32 lbfgs coefficients moved by ~1e-4 between
    1 and 2 BLAS threads (another summation order). Torch is loaded for it unless `head` says it never
    fits with torch (HeadSpec.torch) and nothing loaded it yet."""
    import sys

    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    if torch is None and (head not in HEADS or HEADS[head].torch):
        import torch
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


# a running trial on database storage proves its owner alive this often; after GRACE_S without, the
# trial is failed as dead and its study is open to takeover (environment overrides are for tests)
# (read when used, so a bad value is one line naming it; None: from the environment, else the default)
HEARTBEAT_S: int | None = None
GRACE_S: int | None = None


def heartbeat_interval_s() -> int:
    from featstore.options import timing

    return HEARTBEAT_S or int(timing("FEATSTORE_SWEEP_HEARTBEAT_S"))


def grace_period_s() -> int:
    from featstore.options import timing

    return GRACE_S or int(timing("FEATSTORE_SWEEP_GRACE_S"))


def is_shared(storage) -> bool:
    from optuna.storages import RDBStorage

    return isinstance(storage, RDBStorage)


def _counted(t) -> bool:
    """Trials that count towards a study's budget: finished ones, and objective failures. A trial
    whose process died (interrupted, or failed stale by the heartbeat) does not count; it is kept."""
    S = optuna.trial.TrialState
    return t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and "error" in t.user_attrs)


def _interrupted(t) -> bool:
    """A trial whose process died under it (killed, or failed stale by the heartbeat)."""
    return t.state == optuna.trial.TrialState.FAIL and "error" not in t.user_attrs


def _retry(study, t) -> None:
    """Queue an interrupted trial again with the parameters it had, so the study's sequence of
    finished trials is the one an uninterrupted run makes. (Heartbeat callback on shared storage.)"""
    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _mark_interrupted(study, storage) -> None:
    """Single-owner storage (the folder's sweep lock makes it so): a RUNNING trial found at start
    belongs to a process that died. It is kept, marked, and queued again with its parameters.
    (Through the storage's own interface: a Study exposes no way to mark another process's trial.)"""
    sid = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
        storage.set_trial_user_attr(tid, "interrupted", True)
        storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)
        _retry(study, t)


class ResumableTPE(optuna.samplers.TPESampler):
    """TPE whose draws depend only on the seed, the trial's place among the study's counted trials
    and the finished trials, never on what this process happened to sample before. A plain seeded
    TPESampler keeps its random state in memory, so a study resumed in a new process (after a
    kill, or taken over by another worker) drew other parameters than an uninterrupted run."""

    def __init__(self, seed: int, **kw):
        super().__init__(seed=seed, **kw)
        self.seed, self.options = seed, kw

    def reseeded(self, study, trial, what: str) -> optuna.samplers.TPESampler:
        """A TPE sampler seeded for this draw alone: its random state (TPE's and its startup random
        sampler's) is a function of the seed, the trial's place and what is drawn."""
        place = sum(_counted(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
        return optuna.samplers.TPESampler(seed=zlib.crc32(f"{self.seed}|{place}|{what}".encode()), **self.options)

    def sample_relative(self, study, trial, search_space):
        if search_space:
            return self.reseeded(study, trial, "relative").sample_relative(study, trial, search_space)
        return super().sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        # per parameter: a partly suggested retry draws the rest alike
        return self.reseeded(study, trial, param_name).sample_independent(study, trial, param_name,
                                                                          param_distribution)


_FIRST_SEEN: dict[str, float] = {}


def _quiet_s(study) -> float:
    """Seconds since the study's owner last showed life (its claim, a trial starting or ending, or,
    failing those, when this process first saw the study); 0 while a trial runs with a live heartbeat."""
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
        return 0.0
    last = [study.user_attrs.get("claimed_at", 0.0), _FIRST_SEEN.setdefault(study.study_name, time.time())]
    last += [(t.datetime_complete or t.datetime_start).timestamp() for t in trials if t.datetime_start]
    return time.time() - max(last)


def identity(task: Task) -> dict:
    """What a study and each of its trials carry as user attributes, for optuna-dashboard's filters.
    Fixed by the task (no times, no pids): a resumed study's trials equal an uninterrupted one's."""
    return dict(protocol=task.protocol, head=task.head, fold=task.fold.name, selection=task.selection,
                seed=task.seed, **task.attrs)


def _describe(study, task: Task) -> None:
    """Attributes optuna-dashboard can filter on and a named objective. The study's name stays as it
    is: a re-run finds the study to resume by that name."""
    want = identity(task)
    have = study.user_attrs
    for k, v in want.items():
        if have.get(k) != v:
            study.set_user_attr(k, v)
    if study.metric_names != ["val_auc"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_auc"])


def open_study(task: Task, storage, sampler, pruner, claim: bool):
    """(study, owned). Without claim (single-owner storage) the study is ours, created or resumed."""
    kw = dict(study_name=task.study_name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize")
    if not claim:
        study = optuna.create_study(**kw, load_if_exists=True)
        _mark_interrupted(study, storage)
        return study, True
    try:
        study = optuna.create_study(**kw, load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=task.study_name, storage=storage, sampler=sampler, pruner=pruner), False
    study.set_user_attr("claimed_by", f"{socket.gethostname()}:{os.getpid()}")
    study.set_user_attr("claimed_at", time.time())
    return study, True


def run_task(task: Task, X: np.ndarray, meta: Meta, storage, search_only: bool = False,
             grace_s: float | None = None) -> TaskResult:
    """Search (Optuna trials), then refit the best on the fold's training set and predict its tests.
    search_only (sweep workers): trials of unclaimed or abandoned studies only; a study another
    live process owns is skipped, and nothing is refitted."""
    with single_threaded(task.head):
        return _run_task(task, X, meta, storage, search_only, grace_s)


def _run_task(task: Task, X: np.ndarray, meta: Meta, storage, search_only: bool, grace_s: float | None) -> TaskResult:
    t0, c0 = time.time(), time.process_time()
    grace_s = grace_period_s() if grace_s is None else grace_s
    res = TaskResult(task)
    f = task.fold
    # an oracle rule selects on the test set itself (an upper bound, reported apart); the others see f.train only
    splits = selection_splits_for(task, meta)
    spec = HEADS[task.head]
    space = spec.space
    attrs = identity(task)
    # the split's arrays, and what the head prepares from them (the scaler), once per study, not per trial
    parts = []
    for a, b in splits:
        Xa = X[a]
        parts.append((Xa, meta.y[a], meta.source[a], X[b], meta.y[b], spec.prepare(Xa) if spec.prepare else None))
    # the rule's own score of a trial (worst group, worst class, source probe), on the validation rows only
    sel = get_selection(task.selection)
    val_sources = [meta.source[b] for _, b in splits]

    def objective(trial):
        res.n_ran += 1
        for k, v in attrs.items():  # the dashboard filters trials across studies by these
            trial.set_user_attr(k, v)
        params = {**space(trial), **spec.search_defaults, **task.fixed}
        _hold_for_tests(trial, storage)
        P_all, y_all, Q_all, Z_all = [], [], [], []
        try:
            for step, (Xa, ya, sa, Xb, yb, prepared) in enumerate(parts):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    m = fit_head(task.head, params, Xa, ya, sa, task.seed, task.inputs, prepared)
                if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                    trial.set_user_attr("warning", "solver did not converge")
                P_all.append(_ranking(m, Xb, task.n_classes))
                y_all.append(yb)
                if sel.measure is not None:
                    Q_all.append(_proba(m, Xb, task.n_classes))
                    if sel.needs_representation:
                        Z_all.append(m.transform(Xb) if hasattr(m, "transform") else Xb)
                if len(splits) > 1:  # inner-loso: prune on the pooled score once it is defined
                    s = validation_score(np.concatenate(y_all), np.concatenate(P_all), task.n_classes)
                    if not np.isnan(s):
                        trial.report(s, step)
                        if trial.should_prune():
                            raise optuna.TrialPruned()
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            raise
        if sel.measure is not None:
            score, extras = sel.measure(np.concatenate(y_all), np.concatenate(P_all), np.concatenate(Q_all),
                                        np.concatenate(val_sources), np.concatenate(Z_all) if Z_all else None)
            for k, v in extras.items():
                trial.set_user_attr(k, v)
        else:
            score = validation_score(np.concatenate(y_all), np.concatenate(P_all), task.n_classes)
        if np.isnan(score):
            why = ("validation data has one class only" if sel.measure is None else
                   f"the {task.selection} score is undefined on the validation data (one class, or no group of 5)")
            trial.set_user_attr("error", why)
            raise ValueError(why)
        return score

    sampler = ResumableTPE(seed=study_seed(task.seed, task.study_name), n_startup_trials=5)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    study, owned = open_study(task, storage, sampler, pruner, claim=is_shared(storage))
    if owned:
        _describe(study, task)
    while (left := task.trials - sum(map(_counted, study.get_trials(deepcopy=False)))) > 0:
        if not owned:
            quiet = _quiet_s(study)
            if quiet < grace_s:  # its owner is alive: leave it (worker) or wait for it (refit)
                if search_only:
                    break
                time.sleep(min(1.0, grace_s - quiet))
                continue
            study.set_user_attr("claimed_by", f"{socket.gethostname()}:{os.getpid()} (took over)")
            study.set_user_attr("claimed_at", time.time())
            owned = True
        study.optimize(objective, n_trials=left, timeout=task.timeout, catch=(Exception,), gc_after_trial=False)
        if task.timeout or task.trials - sum(map(_counted, study.get_trials(deepcopy=False))) >= left:
            break  # out of time, or trials failing outside the objective: stop, do not spin
    if search_only:
        res.seconds, res.cpu_seconds = time.time() - t0, time.process_time() - c0
        return res
    for t in study.trials:
        if _interrupted(t):  # kept in the storage (user attrs say so), re-run, not a failure of the study
            continue
        res.trials.append(dict(number=t.number, state=t.state.name, params=t.params, value=t.value,
                               error=t.user_attrs.get("error"),
                               start=t.datetime_start, end=t.datetime_complete))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errs = {t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")}
        res.error = f"no trial completed ({len(res.trials)} tried): {'; '.join(sorted(errs))[:500]}"
        res.seconds, res.cpu_seconds = time.time() - t0, time.process_time() - c0
        return res
    if sel.choose is not None:
        best = sel.choose(complete)
    else:
        best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earliest trial
    res.params = {**best.params, **task.fixed}
    res.val_score = float(best.value)
    t1 = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the selected trial's warning is on record
            model = fit_head(task.head, res.params, X[f.train], meta.y[f.train], meta.source[f.train], task.seed,
                             task.inputs)
        for name, te in f.tests.items():
            res.predictions[name] = _proba(model, X[te], task.n_classes)
            if task.n_classes == 2:
                res.scores[name] = _ranking(model, X[te], 2)
        res.fit_seconds = time.time() - t1  # final fit + test predictions
        res.fit_info = dict(getattr(model, "fit_info_", None) or {})
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        res.error = f"final fit failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    res.seconds, res.cpu_seconds = time.time() - t0, time.process_time() - c0
    return res


# --- worker processes ------------------------------------------------------------------------

_W: dict = {}


def _init_worker(X, meta, storage_spec, search_only):
    # torch's threads are set per task, by single_threaded, where a head needs torch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _W.update(X=X, meta=meta, storage=open_storage(storage_spec), search_only=search_only)


def _run_in_worker(task: Task) -> TaskResult:
    return run_task(task, _W["X"], _W["meta"], _W["storage"], _W["search_only"])


def journal(path: str | Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from featstore.journal_lock import HolderSymlinkLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=HolderSymlinkLock(str(path))))


def open_storage(spec: str | Path):
    """A journal file (one machine, the default) or a database URL such as
    postgresql://user@host:5432/optuna, which many worker processes on many machines share."""
    spec = str(spec)
    if "://" not in spec:
        return journal(spec)
    from optuna.storages import RDBStorage

    import random

    import sqlalchemy.exc

    for attempt in range(8):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(spec, heartbeat_interval=heartbeat_interval_s(), grace_period=grace_period_s(),
                                  heartbeat_stale_trial_callback=_retry, engine_kwargs={"pool_pre_ping": True})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # workers starting together on an empty database race to create Optuna's tables
            if attempt == 7:
                raise
            time.sleep(random.uniform(0.2, 1.0))


def _hold_for_tests(trial, storage) -> None:
    """Fault-injection point for the kill -9 tests: with FEATSTORE_TEST_HOLD_TRIAL=PATH:K, the first
    trial to start once K trials are finished in its storage writes PATH and then never returns, so a
    test kills a sweep mid-trial on an event rather than racing the clock. Unset: nothing happens."""
    spec = os.environ.get("FEATSTORE_TEST_HOLD_TRIAL")
    if not spec:
        return
    path, _, k = spec.rpartition(":")
    S = optuna.trial.TrialState
    done = sum(t.state in (S.COMPLETE, S.PRUNED) for s in storage.get_all_studies()
               for t in storage.get_all_trials(storage.get_study_id_from_name(s.study_name), deepcopy=False))
    if done < int(k):
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another worker holds already
        return
    os.write(fd, f"{trial.study.study_name} {trial.number} {done}\n".encode())
    os.close(fd)
    while True:
        time.sleep(3600)


def run_tasks(tasks: list[Task], X, meta, storage_spec, workers: int = 1, on_done=None,
              search_only: bool = False) -> list[TaskResult]:
    """Run every task; results come back in task order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: list[TaskResult | None] = [None] * len(tasks)
    if workers <= 1:
        attach_splits(tasks, meta)
        storage = open_storage(storage_spec)
        for i, t in enumerate(tasks):
            out[i] = run_task(t, X, meta, storage, search_only)
            if on_done:
                on_done(out[i])
        return out
    # workers die with this process (kill -9 included); so does the resource tracker, whose pipe they hold
    with process_pool(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                      initargs=(X, meta, str(storage_spec), search_only)) as ex:
        futs, cache = {}, {}
        for i, t in enumerate(tasks):  # each split computed just before its first task goes: workers start meanwhile
            attach_splits([t], meta, cache)
            futs[ex.submit(_run_in_worker, t)] = i
        from concurrent.futures import as_completed

        for fut in as_completed(futs):
            i = futs[fut]
            try:
                out[i] = fut.result()
            except Exception as e:  # noqa: BLE001 - a dead worker fails its task, not the sweep
                out[i] = TaskResult(tasks[i], error=f"worker failed: {type(e).__name__}: {e}")
            if on_done:
                on_done(out[i])
    return out
