from dataclasses import replace

import numpy as np
import pytest

from featstore.split import (PROTOCOLS, SELECTIONS, Selection, get_selection, honest_selections, leave_pair_out,
                             loso, make_folds, make_meta, mixed, oracle_selections, register_selection, seen_unseen,
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


# --- selection rules: a registry, each rule checked for the fold invariants ----------------------

HONEST = [n for n, s in SELECTIONS.items() if not s.is_oracle]
ORACLES = [n for n, s in SELECTIONS.items() if s.is_oracle]
# every protocol, with the options it needs on `_meta()` (a / b mostly positive, c / d mostly negative)
PROTOCOL_OPTS = {"mixed": dict(folds=4), "loso": {}, "leave-pair-out": {},
                 "seen-unseen": dict(train_sources=["a", "c"]),
                 "adapt": dict(ks=[0])}


def test_protocol_options_cover_every_protocol():
    assert set(PROTOCOL_OPTS) == set(PROTOCOLS)  # a new protocol is checked below once it is listed here


def test_every_selection_rule_is_an_entry_that_says_what_it_is():
    assert set(SELECTIONS) == {"train-val", "inner-loso", "oracle", "worst-group", "worst-class", "min-source-probe"}
    for name, sel in SELECTIONS.items():
        assert isinstance(sel, Selection) and sel.name == name and sel.description.strip()
        assert get_selection(name) is sel
        assert sel.sees_test_data == sel.is_oracle  # each entry states whether it reads test data
    assert honest_selections() == ("train-val", "inner-loso", "worst-group", "worst-class", "min-source-probe")
    assert oracle_selections() == ("oracle",)
    assert not any(SELECTIONS[n].sees_test_data for n in honest_selections())
    with pytest.raises(ValueError, match="registered already"):
        register_selection(Selection("train-val", "again", SELECTIONS["train-val"].split))
    with pytest.raises(ValueError, match="unknown selection 'best'; known: train-val, inner-loso, oracle, worst-group"):
        get_selection("best")
    with pytest.raises(ValueError, match="selects on the test set"):
        selection_splits(_meta(), loso(_meta())[0].train, "oracle")


def _check_selection(meta, fold, rule: str, seed: int = 0, groups=None) -> int:
    """The fold invariants of one rule's (fit, validate) pairs: inside the fold's training images, no
    image of a test set or of a held-out source (nor one that also occurs there), fit and validate
    disjoint in images and in groups, and no fitting image that occurs in a source the split holds
    out for validation. Returns how many pairs were checked."""
    groups = meta.groups if groups is None else groups
    splits = SELECTIONS[rule].splits(meta, fold, seed)
    test = set(np.concatenate(list(fold.tests.values())).tolist())
    held = set(fold.test_sources)
    train = set(fold.train.tolist())
    for fit, val in splits:
        fit_s, val_s = set(fit.tolist()), set(val.tolist())
        assert fit_s and val_s
        assert fit_s <= train and val_s <= train, (fold.name, rule)
        assert not fit_s & val_s
        assert not (fit_s | val_s) & test, (fold.name, rule)
        assert not [i for i in fit_s | val_s if (meta.occurs_in[i] | meta.also_in[i]) & held], (fold.name, rule)
        assert not set(groups[fit]) & set(groups[val]), (fold.name, rule)  # no group straddles fit / validate
        inner_held = set(meta.source[val]) - set(meta.source[fit])  # a source the split holds out (inner-loso)
        assert not [i for i in fit_s if meta.also_in[i] & inner_held], (fold.name, rule)
    return len(splits)


@pytest.mark.parametrize("rule", HONEST)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_honest_selection_splits_keep_the_fold_invariants(protocol, rule):
    m = _meta()
    folds = make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol])
    assert sum(_check_selection(m, f, rule) for f in folds) >= len(folds)


@pytest.mark.parametrize("rule", HONEST)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_honest_selection_never_reads_the_test_set(protocol, rule):
    """An honest rule is handed the fold's training images only: the same splits whatever the tests."""
    m = _meta()
    for f in make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol]):
        blind = replace(f, tests={"unseen": np.array([], int)}, test_sources=())
        for (a, b), (c, d) in zip(SELECTIONS[rule].splits(m, f, 0), SELECTIONS[rule].splits(m, blind, 0), strict=True):
            assert np.array_equal(a, c) and np.array_equal(b, d)


@pytest.mark.parametrize("rule", ORACLES)
def test_an_oracle_selects_on_the_test_set_and_is_flagged(rule):
    """What makes it an upper bound only: its validation data is the fold's test set."""
    m = _meta()
    for protocol in PROTOCOLS:
        for f in make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol]):
            ((fit, val),) = SELECTIONS[rule].splits(m, f, 0)
            assert np.array_equal(fit, f.train)
            assert np.array_equal(val, f.tests.get("unseen", f.tests.get("seen")))
    assert SELECTIONS[rule].is_oracle and rule not in honest_selections()


def _linked_meta():
    """`_meta()` plus near-duplicate links across sources: one joins a patient with two images in a
    to an image of c, one joins b to c."""
    m = _meta()
    src = list(m.source)
    pid = [g.split(":patient:")[1] for g in m.groups]
    also = [sorted(set(o) - {s}) for o, s in zip(m.occurs_in, src)]
    a2 = next(i for i in range(len(src)) if src[i] == "a" and (m.groups == m.groups[i]).sum() > 1 and i != 0)
    c = [i for i in range(len(src)) if src[i] == "c"]
    b = [i for i in range(len(src)) if src[i] == "b"]
    patients = make_meta(src, m.y, pid, [str(i) for i in range(len(src))], also)
    return make_meta(src, m.y, pid, [str(i) for i in range(len(src))], also, links=[(a2, c[5]), (b[3], c[9])]), patients


@pytest.mark.parametrize("rule", HONEST)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_near_duplicate_links_keep_patients_and_held_out_copies_apart(protocol, rule):
    """With links: no image of (or near copy of an image in) a held-out source, and no patient on both
    sides of a selection split."""
    m, patients = _linked_meta()
    folds = make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol])
    assert sum(_check_selection(m, f, rule, groups=patients.groups) for f in folds) >= len(folds)


def test_inner_loso_keeps_link_joined_groups_apart():
    m, _ = _linked_meta()
    for f in make_folds(m, "loso"):
        _check_selection(m, f, "inner-loso")


# --- the same on a synthetic store, through the loading path a study uses -----------------------

@pytest.fixture(scope="module")
def synth_study_data(tmp_path_factory):
    """A synthetic store (patients with follow-ups, three files copied from one collection into
    another) loaded as a study loads it. Returns study -> StudyData, one per honest selection."""
    from featstore import ingest as I
    from featstore.api import open_store
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect
    from featstore.sweep.config import parse_study
    from featstore.sweep.data import load_data
    from featstore.synth import generate

    folder = tmp_path_factory.mktemp("selection")
    man = generate(folder / "data", n_per_source=40, size=64, seed=5, plant_duplicates=3)
    con = connect(folder / "fs.duckdb")
    try:
        rows, _ = I.manifest_rows(man)
        I.ingest_rows(con, rows, str(man), workers=1)
        embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
    finally:
        con.close()
    protocols = {"mixed": {"folds": 4}, "loso": {}, "leave-pair-out": {},
                 "seen-unseen": {"train_sources": ["synthetic-a", "synthetic-c"]}, "adapt": {"ks": [0]}}
    assert set(protocols) == set(PROTOCOLS)
    st = parse_study(dict(study="sel", backbones=["pixelstats"], heads=["logreg"], protocols=protocols, bootstrap=0))
    with open_store(folder / "fs.duckdb") as fs:
        return st, load_data(fs, st, "pixelstats", "original")


@pytest.mark.parametrize("rule", HONEST)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_selection_on_a_synthetic_store_keeps_the_fold_invariants(synth_study_data, protocol, rule):
    st, data = synth_study_data
    m = data.meta
    assert any(len(o) > 1 for o in m.occurs_in)  # the copied files: images in two sources
    folds = make_folds(m, protocol, positive=1, seed=st.seed, **st.protocols[protocol])
    assert sum(_check_selection(m, f, rule, seed=st.seed) for f in folds) >= len(folds)


@pytest.mark.parametrize("linked", [False, True])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_patient_straddles_train_and_test_in_any_protocol(protocol, linked):
    """The outer folds: a shared file tested in another collection (a0, also in c) takes its
    patient-mates out of training too; with links, the joined groups likewise."""
    m = _linked_meta()[0] if linked else _meta()
    assert (m.groups == m.groups[0]).sum() > 1 or linked  # a0 has patient-mates, or the test proves nothing
    for f in make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol]):
        test = np.concatenate(list(f.tests.values()))
        assert not set(m.groups[f.train]) & set(m.groups[test]), (protocol, f.name)


# folds and selection splits of `_meta()` / `_linked_meta()`, as the code of cce6fbe made them (the registry refactor
# rebuilt the protocol registry: the same folds before and after)
FOLD_DIGEST = {"mixed": ("111c5ce532ac6578", "cae2f706c7db3edc"), "loso": ("916b3176a5fd1d70", "4c53a04a577c7cf4"),
               "leave-pair-out": ("727e6b0c977f0cb6", "414ac984a73814e1"),
               "seen-unseen": ("0cc56bd9876b6c8c", "1a95cbcdb0212afb"),
               # adapt: its folds are loso's (the sites with both classes), made by the code of branch h25a
               "adapt": ("428b9b84cb319077", "209ec533895cab7d")}


def _digest(m, protocol):
    import hashlib

    h = hashlib.sha256()
    for f in make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol]):
        h.update(repr((f.protocol, f.name, f.train.tolist(), {k: v.tolist() for k, v in f.tests.items()},
                       f.train_sources, f.test_sources, f.repeat, f.n_dropped_shared, f.notes)).encode())
        for r in ("train-val", "inner-loso", "oracle"):
            try:
                for a, b in SELECTIONS[r].splits(m, f, 0):
                    h.update(repr((r, a.tolist(), b.tolist())).encode())
            except ValueError as e:
                h.update(str(e).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_folds_are_the_ones_made_before(protocol):
    assert (_digest(_meta(), protocol), _digest(_linked_meta()[0], protocol)) == FOLD_DIGEST[protocol]


@pytest.mark.parametrize("linked", [False, True])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_image_is_in_train_and_test_in_any_protocol(protocol, linked):
    """Fold invariants of every registered protocol: no image index on both sides; no training image that
    occurs in (or is a near copy of one in) a held-out source; test sets hold only the test sources'
    images; every image is somewhere (train, test, or dropped and counted); seeded folds are the same."""
    m = _linked_meta()[0] if linked else _meta()
    folds = make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol])
    assert folds and all(f.protocol == protocol for f in folds)
    for f in folds:
        test = np.concatenate(list(f.tests.values()))
        assert not set(f.train.tolist()) & set(test.tolist()), f.name
        held = set(f.test_sources)
        assert not [i for i in f.train if (m.occurs_in[i] | m.also_in[i]) & held], f.name
        if held:
            assert all(m.occurs_in[i] & held for i in f.tests.get("unseen", ())), f.name
        assert len(f.train) + len(set(test.tolist())) + f.n_dropped_shared == len(m.y), f.name
    again = make_folds(m, protocol, seed=0, **PROTOCOL_OPTS[protocol])
    assert [(f.name, f.train.tolist()) for f in folds] == [(f.name, f.train.tolist()) for f in again]


@pytest.mark.slow
@pytest.mark.parametrize("n_splits,n_classes", [(2, 2), (5, 2), (5, 3), (10, 2), (10, 4)])
def test_fast_stratified_group_kfold_gives_sklearns_folds(n_splits, n_classes):
    """featstore's StratifiedGroupKFold only vectorises sklearn's greedy step: the same folds, to the index,
    over groups of mixed sizes and labels, many tied groups (single images) and unbalanced classes."""
    from sklearn.model_selection import StratifiedGroupKFold as Reference

    from featstore.split import StratifiedGroupKFold

    for seed in range(8):
        g = np.random.default_rng(seed)
        n = int(g.integers(60, 400))
        groups = g.integers(0, max(n_splits, n // int(g.integers(1, 4))), n)
        y = np.minimum(g.geometric(0.45, n) - 1, n_classes - 1)
        y[:n_classes] = np.arange(n_classes)
        for shuffle, rs in ((True, seed), (False, None)):
            ours = list(StratifiedGroupKFold(n_splits, shuffle=shuffle, random_state=rs).split(y, y, groups))
            ref = list(Reference(n_splits, shuffle=shuffle, random_state=rs).split(y, y, groups))
            assert len(ours) == len(ref) == n_splits
            for (a, b), (c, d) in zip(ours, ref):
                assert np.array_equal(a, c) and np.array_equal(b, d), (seed, shuffle)
