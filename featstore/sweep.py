"""Fit: Optuna sweeps of the heads under each protocol, selection walled off from the test sources.

There is one Optuna study per (protocol, head, backbone, preprocessing, outer fold). A study shared
by all folds would let the held-out source steer the sampler: its labels train the models scored on
the *other* folds' validation sets, and the sampler proposes from those scores. Per-fold studies
keep the wall: what fold F selects depends on F's training sources only (tests/test_sweep.py
scrambles the held-out labels and checks that nothing selected changes).

Units run in worker processes (spawn; each gets the arrays once) when workers > 1; the Optuna
journal file is safe for several processes, and a re-run resumes each study where it stopped.
The parent alone writes MLflow and the store.
"""
from __future__ import annotations

import time
import traceback
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import optuna
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score

from featstore.heads import HEADS, create_head
from featstore.split import Fold, Meta, selection_splits


@dataclass
class Task:
    """One Optuna study: a fold of a protocol, for one head, on one embedding set."""
    study_name: str
    protocol: str
    fold: Fold
    head: str
    trials: int
    fixed: dict
    selection: str          # train-val | inner-loso | oracle
    seed: int
    timeout: float | None
    n_classes: int


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


def study_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def validation_score(y, P, n_classes) -> float:
    """AUC (binary: P is the [n] log-odds) or macro one-vs-rest AUC (P is [n, K])."""
    if len(np.unique(y)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, P))
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


def fit_head(name, params, X, y, domains, seed):
    return create_head(name, **{**params, "random_state": seed}).fit(X, y, domains=domains)


def run_task(task: Task, X: np.ndarray, meta: Meta, storage) -> TaskResult:
    t0 = time.time()
    res = TaskResult(task)
    f = task.fold
    if task.selection == "oracle":  # upper bound: selects on the test set itself, reported apart
        test = f.tests.get("unseen", next(iter(f.tests.values())))
        splits = [(f.train, test)]
    else:
        splits = selection_splits(meta, f.train, task.selection, task.seed)
    space = HEADS[task.head].space

    def objective(trial):
        params = {**space(trial), **task.fixed}
        P_all, y_all = [], []
        try:
            for step, (a, b) in enumerate(splits):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    m = fit_head(task.head, params, X[a], meta.y[a], meta.source[a], task.seed)
                if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                    trial.set_user_attr("warning", "solver did not converge")
                P_all.append(_ranking(m, X[b], task.n_classes))
                y_all.append(meta.y[b])
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
        score = validation_score(np.concatenate(y_all), np.concatenate(P_all), task.n_classes)
        if np.isnan(score):
            trial.set_user_attr("error", "validation data has one class only")
            raise ValueError("validation data has one class only")
        return score

    sampler = optuna.samplers.TPESampler(seed=study_seed(task.seed, task.study_name), n_startup_trials=5)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    study = optuna.create_study(study_name=task.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    done = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                           optuna.trial.TrialState.FAIL) for t in study.trials)
    if task.trials - done > 0:
        study.optimize(objective, n_trials=task.trials - done, timeout=task.timeout, catch=(Exception,),
                       gc_after_trial=False)
    for t in study.trials:
        res.trials.append(dict(number=t.number, state=t.state.name, params=t.params, value=t.value,
                               error=t.user_attrs.get("error"),
                               start=t.datetime_start, end=t.datetime_complete))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errs = {t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")}
        res.error = f"no trial completed ({len(study.trials)} tried): {'; '.join(sorted(errs))[:500]}"
        res.seconds = time.time() - t0
        return res
    best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earliest trial
    res.params = {**best.params, **task.fixed}
    res.val_score = float(best.value)
    t1 = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the selected trial's warning is on record
            model = fit_head(task.head, res.params, X[f.train], meta.y[f.train], meta.source[f.train], task.seed)
        for name, te in f.tests.items():
            res.predictions[name] = _proba(model, X[te], task.n_classes)
            if task.n_classes == 2:
                res.scores[name] = _ranking(model, X[te], 2)
        res.fit_seconds = time.time() - t1  # final fit + test predictions
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        res.error = f"final fit failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    res.seconds = time.time() - t0
    return res


# --- worker processes ------------------------------------------------------------------------

_W: dict = {}


def _init_worker(X, meta, storage_path, threads):
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _W.update(X=X, meta=meta, storage=journal(storage_path))


def _run_in_worker(task: Task) -> TaskResult:
    return run_task(task, _W["X"], _W["meta"], _W["storage"])


def journal(path: str | Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def run_tasks(tasks: list[Task], X, meta, storage_path, workers: int = 1, on_done=None) -> list[TaskResult]:
    """Run every task; results come back in task order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: list[TaskResult | None] = [None] * len(tasks)
    if workers <= 1:
        storage = journal(storage_path)
        for i, t in enumerate(tasks):
            out[i] = run_task(t, X, meta, storage)
            if on_done:
                on_done(out[i])
        return out
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(X, meta, str(storage_path), 1)) as ex:
        futs = {ex.submit(_run_in_worker, t): i for i, t in enumerate(tasks)}
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
