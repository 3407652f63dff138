"""Plan: every protocol's folds for each embedding set, refused before any fitting when impossible,
and the Optuna tasks (one per protocol x head x selection x seed x fold)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from featstore.api import Store
from featstore.heads import HEADS
from featstore.split import Fold, Meta, get_selection, make_folds, oracle_selections
from featstore.sweep.config import Study, StudyError
from featstore.sweep.data import StudyData, load_data, zeroshot_inputs


@dataclass
class Task:
    """One Optuna study: a fold of a protocol, for one head, on one embedding set."""
    study_name: str
    protocol: str
    fold: Fold
    head: str
    trials: int
    fixed: dict
    selection: str          # a split.SELECTIONS entry
    seed: int
    timeout: float | None
    n_classes: int
    splits: list | None = None  # the selection's (fit, validate) pairs, drawn once per fold (`attach_splits`)
    attrs: dict = field(default_factory=dict)  # e.g. backbone, preprocess: study attributes for optuna-dashboard
    inputs: dict = field(default_factory=dict)  # what a head is built with besides hyperparameters (zero-shot:


def selection_splits_for(task: Task, meta: Meta) -> list:
    return task.splits if task.splits is not None else get_selection(task.selection).splits(meta, task.fold,
                                                                                            task.seed)


def attach_splits(tasks: list[Task], meta: Meta, cache: dict | None = None) -> None:
    """Every head on a fold draws the same selection split (it depends on the fold's training rows, the
    rule and the seed only): compute it once per fold, not once per study (StratifiedGroupKFold's
    greedy group assignment costs about a second on the real set)."""
    cache = {} if cache is None else cache
    for t in tasks:
        if t.splits is None:
            t.splits = fold_splits(meta, t.fold, t.selection, t.seed, cache)


def fold_splits(meta: Meta, fold: Fold, selection: str, seed: int, cache: dict) -> list:
    """A selection rule's (fit, validate) pairs on one fold, drawn once: `cache` keeps them by rule,
    seed and the fold's rows (check_feasible draws them first, the tasks reuse them)."""
    key = (selection, seed, fold.protocol, fold.name, hashlib.sha1(fold.train.tobytes()).hexdigest(),
           tuple((k, hashlib.sha1(v.tobytes()).hexdigest()) for k, v in sorted(fold.tests.items())))
    if key not in cache:
        cache[key] = get_selection(selection).splits(meta, fold, seed)
    return cache[key]


def check_feasible(st: Study, data: StudyData, protocol: str) -> list:
    """Build the folds of one protocol and refuse the impossible before any work: every training
    set needs every class, and so does every model-selection split."""
    where = f"{st.path or st.study}: protocols.{protocol}"
    try:
        folds = make_folds(data.meta, protocol, positive=1, seed=st.seed, **st.protocols[protocol])
    except ValueError as e:
        raise StudyError(f"{where}: {e}") from e
    k = len(data.class_names)
    for f in folds:
        ytr = data.meta.y[f.train]
        if len(np.unique(ytr)) < k:
            raise StudyError(f"{where}: fold {f.name} trains on one class only ({len(f.train)} images from "
                             f"{', '.join(f.train_sources)}); pick sources with both classes")
        if len(f.train) < 20:
            raise StudyError(f"{where}: fold {f.name} has only {len(f.train)} training images")
        for name, te in f.tests.items():
            if len(te) == 0:
                raise StudyError(f"{where}: fold {f.name} has an empty {name} test set")
        if len(data.links) and st.near_duplicates in ("warn", "refuse"):
            tr = np.zeros(len(data.meta.y), bool)
            tr[f.train] = True
            te = np.zeros(len(data.meta.y), bool)
            te[np.concatenate(list(f.tests.values()))] = True
            leaks = int(sum((te[a] and tr[b]) or (te[b] and tr[a]) for a, b in data.links))
            if leaks:
                msg = (f"fold {f.name}: {leaks} test images have a near duplicate in training "
                       "(`featstore sql \"SELECT * FROM near_duplicates\"`)")
                if st.near_duplicates == "refuse":
                    raise StudyError(f"{where}: {msg}; set near_duplicates: drop-from-train to exclude them")
                f.notes.append("WARNING: " + msg)
        for rule in st.selections:
            try:
                splits = fold_splits(data.meta, f, rule, st.seed, data.selection_splits)
            except ValueError as e:
                raise StudyError(f"{where}: fold {f.name}: {e}") from e
            yval = np.concatenate([data.meta.y[v] for _, v in splits])
            if len(np.unique(yval)) < k:
                raise StudyError(f"{where}: fold {f.name}: the '{rule}' validation data has one class only")
            for a, _ in splits:
                if len(np.unique(data.meta.y[a])) < k:
                    raise StudyError(f"{where}: fold {f.name}: a '{rule}' fitting split has one class only; "
                                     "use selection: train-val")
    return folds


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
                                 f"(featstore.sweep.plan.plan makes them)")
            for sel in st.selections + (list(oracle_selections()) if st.oracle else []):
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
    attach_splits(tasks, data.meta, data.selection_splits)  # those check_feasible drew, and the rest, once
    return tasks


def selection_repeats(st) -> int:
    return int(getattr(st, "selection_repeats", 1) or 1)
