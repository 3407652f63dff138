"""The `ensemble` head: the mean of chosen members' log-odds, fold by fold, under every protocol.

No retraining: a member is a (head, backbone, preprocessing) of the same study, and the ensemble's
score for a test image of a fold is the mean of the members' stored scores (the log-odds their
`predictions` rows carry, the very numbers written to the store) for that image in that fold; its
probability is the logistic of that mean. The members must have been fitted on the same folds: for
members on several embedding sets, the sets must hold the same images (so every protocol makes the
same folds from them); otherwise the ensemble is left out with a note, its members' rows untouched.

The ensemble's rows are scored like any head's (featstore/sweep/rows.py), so its row stands beside its
members in `results`, MLflow (a model run of its own) and the report. Binary targets only.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import product

import numpy as np

from featstore.sweep.fit import TaskResult

ENSEMBLE = "ensemble"


def ensemble_name(heads, backbones, preprocess) -> tuple[str, str, str]:
    """(head, backbone, preprocess) the ensemble's rows carry: `ensemble[logreg+lightgbm]`; a part shared
    by every member keeps its own name, several are joined with '+'."""
    return (f"{ENSEMBLE}[{'+'.join(heads)}]", "+".join(backbones), "+".join(preprocess))


def member_sets(spec, st) -> list[tuple[list[str], list[str], list[str]]]:
    """(heads, backbones, preprocessings) of each ensemble a spec asks for: `backbones` given, one ensemble
    over those embedding sets; else one per backbone of the study. Likewise `preprocess` with several
    entries combines them; else one per preprocessing."""
    pres = spec.preprocess
    pre_groups = [list(pres)] if pres and len(pres) > 1 else [[p] for p in (pres or st.preprocess)]
    bb_groups = [list(spec.backbones)] if spec.backbones else [[b] for b in st.backbones]
    return [(list(spec.heads), bbs, ps) for bbs in bb_groups for ps in pre_groups]


def combine(members: dict[tuple, list[TaskResult]], datas: dict[tuple, object], head: str, bb: str, pre: str
            ) -> tuple[list[TaskResult], str | None]:
    """(the ensemble's task results, None) or ([], why not). `members`: (head, backbone, preprocess) -> that
    member's task results; `datas`: (backbone, preprocess) -> its StudyData."""
    keys = list(members)
    first = datas[keys[0][1:]]
    for k in keys[1:]:
        d = datas[k[1:]]
        if not np.array_equal(d.image_id, first.image_id):
            return [], (f"{head} on {bb}/{pre}: the embedding sets {keys[0][1]}/{keys[0][2]} and {k[1]}/{k[2]} hold "
                        "different images, so their folds differ; embed the same images with each to ensemble them")
    by_task = {k: {(r.task.protocol, r.task.selection, r.task.seed, r.task.fold.name): r for r in rs}
               for k, rs in members.items()}
    common = [t for t in by_task[keys[0]] if all(t in by_task[k] for k in keys[1:])]
    out = []
    for t in common:
        rs = [by_task[k][t] for k in keys]
        r0 = rs[0]
        task = replace(r0.task, head=head, study_name=f"{r0.task.study_name}|{head}", trials=0, fixed={},
                       attrs=dict(r0.task.attrs, backbone=bb, preprocess=pre), inputs={})
        for r in rs[1:]:  # the same fold on the same images: a mismatch would mix other test sets
            if set(r.task.fold.tests) != set(task.fold.tests) or any(
                    not np.array_equal(r.task.fold.tests[s], task.fold.tests[s]) for s in task.fold.tests):
                return [], f"{head} on {bb}/{pre}: fold {task.fold.name} differs between members"
        res = TaskResult(task, params=dict(members=[list(k) for k in keys]), seconds=0.0,
                         fit_info=dict(members=["/".join(k) for k in keys]))
        failed = [f"{'/'.join(k)}: {r.error}" for k, r in zip(keys, rs) if r.error]
        if failed:
            res.error = "member failed: " + "; ".join(failed)[:500]
            out.append(res)
            continue
        for test_set in task.fold.tests:
            s = np.mean([np.asarray(r.scores[test_set], float) for r in rs], axis=0)
            p = 1.0 / (1.0 + np.exp(-s))
            res.scores[test_set] = s
            res.predictions[test_set] = np.column_stack([1 - p, p])
        out.append(res)
    if not out:
        return [], f"{head} on {bb}/{pre}: its members share no fold"
    return out, None


def plan_ensembles(st) -> list[tuple[list[str], list[str], list[str]]]:
    return [m for spec in (getattr(st, "ensembles", None) or []) for m in member_sets(spec, st)]


def members_of(heads, bbs, pres) -> list[tuple[str, str, str]]:
    return [(h, b, p) for b, p, h in product(bbs, pres, heads)]
