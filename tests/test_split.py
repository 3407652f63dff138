import numpy as np
import pytest

from featstore.split import (leave_pair_out, loso, make_folds, make_meta, mixed, seen_unseen,
                             selection_splits)


def _meta(seed=0, n_per=40):
    """4 sources: two mostly positive, two mostly negative; patients with 1-3 images; one image of
    'a' also occurs in 'c' (the same file in two collections)."""
    rng = np.random.default_rng(seed)
    src, y, pid, iid, also = [], [], [], [], []
    for s, share in [("a", 0.9), ("b", 0.8), ("c", 0.1), ("d", 0.05)]:
        i = 0
        p = 0
        while i < n_per:
            k = min(int(rng.integers(1, 4)), n_per - i)
            lab = int(rng.random() < share)
            for _ in range(k):
                src.append(s), y.append(lab), pid.append(str(p)), iid.append(f"{s}{i}"), also.append([])
                i += 1
            p += 1
    also[0] = ["c"]  # a0 also occurs in c
    return make_meta(src, y, pid, iid, also)


def _groups_disjoint(meta, a, b):
    return not (set(meta.groups[a]) & set(meta.groups[b]))


def test_patient_ids_are_namespaced_by_source():
    m = make_meta(["a", "b"], [0, 1], ["7", "7"], ["x", "y"])
    assert m.groups[0] != m.groups[1]
    m = make_meta(["a", "a"], [0, 1], [None, ""], ["x", "y"])  # no patient: grouped by image
    assert m.groups[0] != m.groups[1]


def test_mixed_is_grouped_stratified_and_covers_everything_once():
    m = _meta()
    folds = mixed(m, folds=5, seed=0)
    seen = np.concatenate([f.tests["seen"] for f in folds])
    assert sorted(seen) == list(range(len(m.y)))
    for f in folds:
        assert _groups_disjoint(m, f.train, f.tests["seen"])
        assert set(m.y[f.tests["seen"]]) == {0, 1}


def test_repeated_kfold_and_seeds():
    m = _meta()
    a, b = mixed(m, 5, repeats=3, seed=1), mixed(m, 5, repeats=3, seed=1)
    assert len(a) == 15 and {f.repeat for f in a} == {0, 1, 2}
    assert all(np.array_equal(x.tests["seen"], y.tests["seen"]) for x, y in zip(a, b))
    c = mixed(m, 5, repeats=1, seed=2)
    assert not all(np.array_equal(x.tests["seen"], y.tests["seen"]) for x, y in zip(a[:5], c))


def test_loso_holds_each_source_out_and_drops_shared_images():
    m = _meta()
    folds = {f.test_sources[0]: f for f in loso(m)}
    assert set(folds) == {"a", "b", "c", "d"}
    for s, f in folds.items():
        assert set(m.source[f.tests["unseen"]]) == ({s, "a"} if s == "c" else {s})
        assert s not in set(m.source[f.train])
    # a0 also occurs in c: it belongs to c too, so it is tested there and trains no model tested on c
    assert 0 not in folds["c"].train and 0 in folds["c"].tests["unseen"]
    assert 0 in folds["a"].tests["unseen"] and 0 in folds["b"].train and folds["b"].n_dropped_shared == 0
    # d is (almost) single-class here: it is kept, with a note, not dropped
    one_class = [f for f in folds.values() if len(set(m.y[f.tests["unseen"]])) < 2]
    assert all(f.notes for f in one_class)


def test_leave_pair_out_pairs_a_positive_with_a_negative_source():
    m = _meta()
    folds = leave_pair_out(m)
    assert sorted(f.test_sources for f in folds) == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    for f in folds:
        assert set(m.y[f.tests["unseen"]]) == {0, 1}
        assert not set(f.test_sources) & set(m.source[f.train])
    with pytest.raises(ValueError, match="mostly-negative"):
        leave_pair_out(make_meta(["a", "a", "b", "b", "b"], [1, 1, 1, 0, 1], None, None))


def test_seen_unseen():
    m = _meta()
    (f,) = seen_unseen(m, ["a", "d"], test_fraction=0.25, seed=0)
    assert set(m.source[f.train]) <= {"a", "d"} and set(m.source[f.tests["seen"]]) <= {"a", "d"}
    assert set(m.source[f.tests["unseen"]]) == {"a", "b", "c"}  # a0 occurs in c as well
    assert _groups_disjoint(m, f.train, f.tests["seen"])
    assert 0 not in f.train and 0 not in f.tests["seen"]  # a0 also occurs in the unseen source c:
    assert 0 in f.tests["unseen"]                           # it is tested there
    with pytest.raises(ValueError, match="unknown train source"):
        seen_unseen(m, ["a", "zzz"])
    with pytest.raises(ValueError, match="unknown protocol"):
        make_folds(m, "leave-all-out")


def test_selection_splits_stay_inside_training():
    m = _meta()
    f = loso(m)[0]
    for method in ("train-val", "inner-loso"):
        splits = selection_splits(m, f.train, method, seed=0)
        for a, b in splits:
            assert set(a) <= set(f.train) and set(b) <= set(f.train)
            assert not set(a) & set(b)
            assert _groups_disjoint(m, a, b)
    inner = selection_splits(m, f.train, "inner-loso")
    assert len(inner) == len(set(m.source[f.train]))


def test_near_duplicate_links_leave_training_but_are_not_tested_elsewhere():
    """A near copy is another file: it leaves training when its partner's source is tested, but
    only the file that occurs in a source is scored there."""
    src = ["a"] * 20 + ["c"] * 20
    y = [i % 2 for i in range(40)]
    m = make_meta(src, y, None, [f"i{i}" for i in range(40)], [[]] * 40, links=[(1, 25)])
    folds = {f.test_sources[0]: f for f in loso(m)}
    assert 1 not in folds["c"].train and 1 not in folds["c"].tests["unseen"]
    assert folds["c"].n_dropped_shared == 1
    assert 25 in folds["c"].tests["unseen"] and 25 not in folds["a"].tests["unseen"]
