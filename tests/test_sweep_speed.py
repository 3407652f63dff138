"""The sweep's speed levers change no selection where the search is deterministic.

Each lever is checked against the path it replaced, run side by side on the synthetic stores: the
same trials (parameters and validation scores) and the same chosen hyperparameters. No timing here.
"""
import dataclasses

import numpy as np
import optuna
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from featstore import heads as H
from featstore.heads import GRLHead
from featstore.sweep import fit as S
from featstore.sweep import plan as P
from featstore.sweep.plan import make_tasks, plan
from featstore.split import get_selection
from featstore.sweep.config import parse_study


def _tasks(db, heads, protocols=None):
    st = parse_study(dict(study="t", backbones=["pixelstats"], heads=heads, bootstrap=0,
                          protocols=protocols or {"mixed": {"folds": 3}, "loso": {}}))
    (bb, pre, data, folds), = plan(st, db)
    return make_tasks(st, bb, pre, data, folds), data


def _trials(r):
    return [(t["params"], t["value"], t["state"]) for t in r.trials]


def test_logreg_prepared_scaler_and_cached_splits_select_as_before(synth_stores, monkeypatch):
    """The scaler fitted once per split and the splits computed once per fold give the very trials the
    per-trial path gave (scaler refitted in every trial, split drawn in every study)."""
    tasks, data = _tasks(synth_stores["confounded"], {"logreg": {"trials": 6}})
    new = [S.run_task(t, data.X, data.meta, optuna.storages.InMemoryStorage())
           for t in (P.attach_splits(tasks, data.meta) or tasks)]
    assert all(t.splits is not None for t in tasks)
    old_tasks = [dataclasses.replace(t, splits=None) for t in tasks]
    monkeypatch.setitem(H.HEADS, "logreg", dataclasses.replace(H.HEADS["logreg"], prepare=None))
    old = [S.run_task(t, data.X, data.meta, optuna.storages.InMemoryStorage()) for t in old_tasks]
    assert len(new) == len(old) > 3
    for a, b in zip(new, old):
        assert a.error is None and b.error is None
        assert _trials(a) == _trials(b)
        assert a.params == b.params and a.val_score == b.val_score
        for k in a.predictions:
            np.testing.assert_array_equal(a.predictions[k], b.predictions[k])


def test_attached_splits_are_the_selection_rules_own(synth_stores):
    """One split per fold, shared by every head's study on it, equal to what the rule draws itself;
    folds that differ get their own."""
    tasks, data = _tasks(synth_stores["neutral"], {"logreg": {"trials": 2}, "lightgbm": {"trials": 2}})
    P.attach_splits(tasks, data.meta)
    by_fold = {}
    for t in tasks:
        want = get_selection(t.selection).splits(data.meta, t.fold, t.seed)
        assert len(t.splits) == len(want)
        for (a, b), (wa, wb) in zip(t.splits, want):
            np.testing.assert_array_equal(a, wa)
            np.testing.assert_array_equal(b, wb)
            assert not set(b) & set(np.concatenate(list(t.fold.tests.values())))  # never the held-out rows
        by_fold.setdefault((t.protocol, t.fold.name), set()).add(id(t.splits))
    assert all(len(ids) == 1 for ids in by_fold.values())  # computed once, shared by the heads
    assert len({next(iter(ids)) for ids in by_fold.values()}) == len(by_fold)


def test_prepared_scaler_is_the_fit_own_scaler(synth_embeddings):
    X, meta = synth_embeddings["confounded"]
    y = (meta["label"].to_numpy() == "covid").astype(int)
    a = H.LogisticHead(C=0.1).fit(X, y)
    b = H.LogisticHead(C=0.1).fit(X, y, **H.HEADS["logreg"].prepare(X))
    np.testing.assert_array_equal(a.scaler_.mean_, b.scaler_.mean_)
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(X))
    # a scaler fitted on other rows is really used (the kwarg is not ignored)
    c = H.LogisticHead(C=0.1).fit(X, y, scaler=StandardScaler().fit(X[: len(X) // 3]))
    assert not np.array_equal(a.decision_function(X), c.decision_function(X))


def test_studies_run_single_threaded_and_restore_the_threads():
    from threadpoolctl import threadpool_info

    torch.set_num_threads(2)
    with S.single_threaded():
        assert torch.get_num_threads() == 1
        assert all(i["num_threads"] == 1 for i in threadpool_info())
    assert torch.get_num_threads() == 2
    for head in ("grl_mlp", "logreg"):  # torch loaded already: held at one thread whatever the head
        with S.single_threaded(head):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2


@pytest.mark.slow
def test_a_study_of_heads_without_torch_never_imports_it(synth_stores, tmp_path, mlflow_db):
    """logreg and LightGBM sweeps (their workers too) never load torch (about 2 CPU s per process); a GRL
    study loads it and its fits run on one torch thread."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os
        import sys
        from pathlib import Path

        from featstore.sweep import fit as S
        from featstore.sweep.config import parse_study
        from featstore.sweep.run import run_study

        real = S._run_task

        def spy(*a, **kw):  # top level: spawn runs it in each worker too, where the fits run
            out = real(*a, **kw)
            with open(sys.argv[4], "a") as f:  # after the fits: a head that imported torch is seen
                f.write(f"{{os.getpid()}} {{'torch' in sys.modules}}\\n")
            return out

        S._run_task = spy

        if __name__ == "__main__":
            raw = dict(study="nt", backbones=["pixelstats"], seed=7, bootstrap=0, protocols={{"loso": {{}}}},
                       heads={{"logreg": {{"trials": 2}}, "lightgbm": {{"trials": 1}}}})
            rep = run_study(parse_study(raw), Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], workers=2)
            assert rep.n_failed == 0 and rep.rows, rep.notes
            assert "torch" not in sys.modules, "the sweep imported torch"
            with S.single_threaded("grl_mlp"):
                import torch
                assert torch.get_num_threads() == 1
            print(os.getpid())
    """)
    (tmp_path / "nt.py").write_text(code)
    seen = tmp_path / "fits.txt"
    r = subprocess.run([sys.executable, str(tmp_path / "nt.py"), str(synth_stores["confounded"]), str(tmp_path / "w"),
                        mlflow_db(tmp_path / "m.db"), str(seen)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fits = [line.split() for line in seen.read_text().splitlines()]
    assert len(fits) == 8 and {pid for pid, _ in fits} - {r.stdout.split()[-1]}  # 8 studies, in the workers
    assert all(loaded == "False" for _, loaded in fits), fits


@pytest.mark.slow
def test_grl_trials_stop_at_the_first_plateau_and_the_refit_keeps_the_schedule(synth_stores, monkeypatch):
    tasks, data = _tasks(synth_stores["confounded"], {"grl_mlp": {"trials": 2}}, {"loso": {}})
    seen = []
    real = S.fit_head

    def spy(name, params, *a, **kw):
        seen.append(dict(params))
        return real(name, params, *a, **kw)
    monkeypatch.setattr(S, "fit_head", spy)
    r = S.run_task(dataclasses.replace(tasks[0], fixed={"max_epochs": 30}), data.X, data.meta,
                   optuna.storages.InMemoryStorage())
    assert r.error is None and len(seen) == 3
    assert all(p["max_drops"] == 1 for p in seen[:2])  # the trials
    assert "max_drops" not in seen[2] and "max_drops" not in r.params  # the refit: the head's own schedule
    # a study that fixes it gets what it asked for, in the search too
    seen.clear()
    S.run_task(dataclasses.replace(tasks[1], fixed={"max_epochs": 30, "max_drops": 2}), data.X, data.meta,
               optuna.storages.InMemoryStorage())
    assert [p["max_drops"] for p in seen] == [2, 2, 2]


@pytest.mark.slow
def test_grl_first_plateau_stop_keeps_the_same_weights_when_the_best_epoch_comes_first(synth_embeddings):
    """Stopping at the first plateau (max_drops=1) trains exactly as the full schedule up to the first
    LR drop: where the full fit's best epoch is not later than that, both keep the same network."""
    X, meta = synth_embeddings["confounded"]
    y = (meta["label"].to_numpy() == "covid").astype(int)
    s = meta["source"].to_numpy()
    same = 0
    for seed in range(3):
        kw = dict(hidden=(32, 16), max_epochs=60, patience=4, min_epochs=3, random_state=seed)
        short = GRLHead(max_drops=1, **kw).fit(X, y, domains=s)
        full = GRLHead(max_drops=3, **kw).fit(X, y, domains=s)
        assert short.n_epochs_ <= full.n_epochs_
        np.testing.assert_array_equal(short.val_loss_, full.val_loss_[:short.n_epochs_])
        if short.stop_reason_ == "lr drops" and full.best_epoch_ < short.n_epochs_:
            same += 1
            assert short.best_epoch_ == full.best_epoch_
            np.testing.assert_array_equal(short.decision_function(X), full.decision_function(X))
            break
    assert same >= 1
