"""The sweep package's seams: the plan draws each selection split once, the data step reads the store
only through its public API, and that API answers what the store holds (known by construction)."""
import numpy as np

from featstore import split
from featstore.api import Store
from featstore.sweep import fit
from featstore.sweep.config import parse_study
from featstore.sweep.plan import make_tasks, plan


def _study(**kw):
    return parse_study(dict(dict(study="pkg", backbones=["pixelstats"], bootstrap=0,
                                 heads={"logreg": {"trials": 1}, "lightgbm": {"trials": 1}},
                                 protocols={"mixed": {"folds": 3}, "loso": {}, "leave-pair-out": {}}), **kw))


def test_each_selection_split_is_drawn_once(synth_stores, monkeypatch):
    # check_feasible needs the splits to refuse a one-class validation set; the tasks reuse those, and the
    # fit step (run_tasks -> attach_splits) draws nothing more. Oracle and extra seeds: drawn once each too.
    calls = []
    real = split.Selection.splits

    def counting(self, meta, fold, seed=0, val_folds=5):
        calls.append((self.name, seed, fold.protocol, fold.name))
        return real(self, meta, fold, seed, val_folds)
    monkeypatch.setattr(split.Selection, "splits", counting)
    st = _study(oracle=True, selection_repeats=2)
    (bb, pre, data, folds), = plan(st, synth_stores["neutral"])
    tasks = make_tasks(st, bb, pre, data, folds)
    fit.attach_splits(tasks, data.meta)
    assert all(t.splits is not None for t in tasks)
    wanted = {(t.selection, t.seed, t.protocol, t.fold.name) for t in tasks}
    assert sorted(calls) == sorted(wanted)  # one draw per rule x seed x fold, shared by both heads
    assert len(tasks) == 2 * len(wanted)
    # leave-pair-out runs its selection under two seeds; the others under the study's seed only
    assert {t.seed for t in tasks if t.protocol == "leave-pair-out"} == {0, 1}
    assert {t.seed for t in tasks if t.protocol != "leave-pair-out"} == {0}
    for t in tasks:  # the very pairs the rule draws, never a held-out row in them
        want = real(split.SELECTIONS[t.selection], data.meta, t.fold, t.seed)
        for (a, b), (wa, wb) in zip(t.splits, want, strict=True):
            np.testing.assert_array_equal(a, wa)
            np.testing.assert_array_equal(b, wb)
        if not split.SELECTIONS[t.selection].is_oracle:
            assert not set(np.concatenate([b for _, b in t.splits])) & set(
                np.concatenate(list(t.fold.tests.values())))


def test_store_api_answers_what_the_store_holds(synth_stores):
    # the synthetic store (tests/conftest.py): the four SYNTHETIC sources, 60 images each, every file in one
    # source, no `featstore duplicates` run and no lung masks
    from featstore.synth import SOURCES

    with Store(synth_stores["neutral"], read_only=True) as fs:
        images = fs.images()
        assert fs.sources() == sorted(s.name for s in SOURCES)
        assert sorted(fs.column_values("label")) == sorted(set(images["label"].to_list()))
        assert fs.occurrences_by_image() == {i: [s] for i, s in zip(images["image_id"], images["source"])}
        assert fs.near_duplicate_pairs() == []
        assert fs.lung_mask_methods(images["image_id"].to_list()) == []
        wid, dim = fs.embedding_set("pixelstats")
        X, _ = fs.arrays("pixelstats")
        assert dim == X.shape[1] and wid
        try:
            fs.column_values("no_such_column")
            raise AssertionError("an unknown column must be refused")
        except ValueError as e:
            assert "no_such_column" in str(e)
