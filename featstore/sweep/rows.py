"""Rows: a unit's task results -> result rows of the contract (featstore.results): per fold and test
set, per source, pooled out-of-fold, and the source-mean headline with its source-level CI."""
from __future__ import annotations

import numpy as np
import polars as pl

from featstore import results as R
from featstore.score import binary_metrics, gap_test, multiclass_metrics, robust_metrics
from featstore.split import SELECTIONS
from featstore.sweep.data import StudyData
from featstore.sweep.fit import TaskResult
from featstore.sweep.plan import Task
from featstore.track import code_version


def metrics_for(y, P, n_classes, n_boot, seed, score=None) -> dict:
    if n_classes == 2:
        return binary_metrics(y, P[:, 1], n_boot=n_boot, seed=seed, score=score)
    m = multiclass_metrics(y, P, n_classes, n_boot=n_boot, seed=seed)
    m.update(n_pos=None, n_neg=None)
    return m


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


def unit_key(task: Task) -> tuple:
    return (task.protocol, task.head, task.selection, task.seed)


def score_unit(st, sweep_id, bb, pre, data: StudyData, rs: list[TaskResult]) -> tuple:
    """A unit's fold and pooled rows and its predictions (the source-mean row comes at tracking)."""
    meta, K = data.meta, len(data.class_names)
    proto, head, sel, _ = unit_key(rs[0].task)
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
            if K == 2:  # worst group (source x label), calibration, demographic subgroups
                fold_rows[-1]["metrics"].update(robust_metrics(
                    y, P[:, 1], S, srcs, {k: v[te] for k, v in data.attributes.items()}))
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
            if K == 2:
                unit_rows[-1]["metrics"].update(robust_metrics(
                    meta.y[te], P[:, 1], S, meta.source[te], {k: v[te] for k, v in data.attributes.items()}))
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
