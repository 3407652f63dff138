"""Protocols: metadata in, deterministic splits out (pure functions, no store, no models).

Every split is grouped: by patient where a patient id exists (namespaced by source, since
"patient 2" of one collection is not "patient 2" of another), otherwise by image. An image is
one row (its content hash), so one image can never sit on both sides; an image that *also*
occurs in a test source (the same file in two collections) is dropped from training, with every
image of its patient, and counted in `Fold.n_dropped_shared`.

Test sets are named by what the model saw: `seen` = held-out images of training sources,
`unseen` = images of sources that never entered fitting or model selection.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Callable

import numpy as np
from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from sklearn.model_selection import LeaveOneGroupOut
from sklearn.model_selection import StratifiedGroupKFold as _SklearnStratifiedGroupKFold

from featstore.options import Names, Section
from featstore.registry import Registry


class StratifiedGroupKFold(_SklearnStratifiedGroupKFold):
    """scikit-learn's StratifiedGroupKFold, folds identical to its own (tests/test_split.py compares them),
    with the greedy step's inner loop over folds done in one numpy call: sklearn tries each fold in Python
    (five np.std and np.isclose calls per group per fold), which took 2.5 s per split at 10k images and
    grows with the patients (half a 10k-image study's time was spent here)."""

    def _find_best_fold(self, y_counts_per_fold, y_cnt, group_y_counts):
        k = self.n_splits
        # every candidate's fold table at once: candidate i adds the group to fold i
        cand = np.repeat(y_counts_per_fold[None], k, axis=0)
        cand[np.arange(k), np.arange(k)] += group_y_counts
        # same reduction as sklearn's np.std(table / y_cnt, axis=0), per candidate, then its mean
        evals = np.mean(np.std(cand / y_cnt.reshape(1, 1, -1), axis=1), axis=1).tolist()
        samples = y_counts_per_fold.sum(axis=1).tolist()
        best, min_eval, min_samples = None, np.inf, np.inf
        for i in range(k):  # sklearn's rule and tie-break, on Python floats (np.isclose's formula)
            e = evals[i]
            if e < min_eval or (abs(e - min_eval) <= 1e-8 + 1e-5 * abs(min_eval) and samples[i] < min_samples):
                best, min_eval, min_samples = i, e, samples[i]
        return best

@dataclass(frozen=True)
class Meta:
    """What the protocols need, one entry per image, in the order of the embedding matrix."""
    source: np.ndarray                 # primary source (see README: the image's own metadata row)
    y: np.ndarray                      # integer target
    groups: np.ndarray                 # patient (source-namespaced) or image id
    also_in: tuple[frozenset, ...]     # sources whose testing takes the image out of training:
                                       # every source it occurs in, and its near duplicates' sources
    occurs_in: tuple[frozenset, ...] = ()  # every source the image itself occurs in (the same file)

    def members(self, sources) -> np.ndarray:
        """Indices of the images that occur in any of `sources`: an image shared by two collections
        belongs to both, so it is scored in every held-out source it occurs in."""
        want = set(sources)
        if not self.occurs_in:
            return np.flatnonzero(np.isin(self.source, list(want)))
        return np.array([i for i, o in enumerate(self.occurs_in) if o & want], dtype=int)


@dataclass
class Fold:
    protocol: str
    name: str
    train: np.ndarray
    tests: dict[str, np.ndarray]       # "seen" / "unseen" -> indices
    train_sources: tuple[str, ...]
    test_sources: tuple[str, ...]
    repeat: int = 0
    n_dropped_shared: int = 0
    notes: list[str] = field(default_factory=list)


def make_meta(source, y, patient_id=None, image_id=None, also_in=None, links=()) -> Meta:
    """`also_in`: every source each image occurs in. `links`: (i, j) index pairs of near-duplicate
    images: they join one group (never split apart) and each counts as occurring in the other's
    source (so it leaves training when that source is tested)."""
    source = np.asarray(source, dtype=object)
    n = len(source)
    pid = np.asarray(patient_id if patient_id is not None else [None] * n, dtype=object)
    iid = np.asarray(image_id if image_id is not None else np.arange(n).astype(str), dtype=object)
    groups = np.array([f"{s}:patient:{p}" if p not in (None, "") else f"image:{i}"
                       for s, p, i in zip(source, pid, iid)], dtype=object)
    also = [set(a) | {s} for a, s in zip(also_in, source)] if also_in is not None else [{s} for s in source]
    occurs = tuple(frozenset(a) for a in also)
    if len(links):
        parent = {g: g for g in groups}

        def root(g):
            while parent[g] != g:
                parent[g] = parent[parent[g]]
                g = parent[g]
            return g
        for i, j in links:
            parent[root(groups[i])] = root(groups[j])
            also[i].add(source[j])
            also[j].add(source[i])
        groups = np.array([root(g) for g in groups], dtype=object)
    return Meta(source, np.asarray(y), groups, tuple(frozenset(a) for a in also), occurs)


def _without_shared(meta: Meta, train: np.ndarray, test_sources, test: np.ndarray = ()) -> tuple[np.ndarray, int]:
    """Training minus every image that occurs in (or is linked to) a test source, and minus every
    image of a patient group with an image in `test`: a shared file tested in another collection
    takes its patient-mates out of training with it, so no patient straddles train and test."""
    ts = set(test_sources)
    tainted = set(meta.groups[np.asarray(test, dtype=int)])
    keep = np.array([not (meta.also_in[i] & ts) and meta.groups[i] not in tainted for i in train], dtype=bool)
    return train[keep], int((~keep).sum())


def _need_groups(groups, n_splits: int, what: str) -> None:
    """sklearn says "n_splits=5 greater than the number of groups: 4"; say why that happens: too few
    images for the folds asked for, or images joined into few groups (by patient, by near-duplicate
    links)."""
    n_images, n = len(groups), len(set(groups))
    if n >= n_splits:
        return
    if n == n_images:  # nothing was joined: the folds outnumber the images
        raise ValueError(f"{what} needs {n_splits} groups of images but there are only {n_images} images: ask for "
                         f"at most {max(n_images, 2)} folds (`folds` in the study's protocol), or add images")
    raise ValueError(
        f"{what} needs {n_splits} groups of images but its {n_images} images form only {n}: images are grouped "
        "by patient and joined by near-duplicate links. Ask for fewer folds, or check the links "
        "(`featstore sql \"SELECT count(*) FROM near_duplicates\"`; re-run `featstore duplicates` with "
        "tighter thresholds) or set `near_duplicates: ignore` in the study")


def _sources(meta: Meta) -> list[str]:
    return sorted(set(meta.source))


def mixed(meta: Meta, folds: int = 5, repeats: int = 1, seed: int = 0) -> list[Fold]:
    """Stratified, patient-grouped k-fold that ignores source: the naive contrast. repeats>1 is
    repeated k-fold ([Trivedi2022] used 5 x 10)."""
    out = []
    idx = np.arange(len(meta.y))
    srcs = tuple(_sources(meta))
    _need_groups(meta.groups, folds, f"mixed {folds}-fold cross-validation")
    for r in range(repeats):
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (tr, te) in enumerate(cv.split(idx, meta.y, meta.groups)):
            out.append(Fold("mixed", f"r{r}-f{k}", tr, {"seen": te}, srcs, (), repeat=r))
    return out


def loso(meta: Meta) -> list[Fold]:
    """Leave one source out. The test set is every image that occurs in the held-out source (a file
    shared with another collection is tested there too, and trains no model tested on it). A
    single-class held-out source is kept (AUC undefined there)."""
    out = []
    idx = np.arange(len(meta.y))
    for held in _sources(meta):
        te = meta.members([held])
        tr, dropped = _without_shared(meta, np.setdiff1d(idx, te), [held], te)
        f = Fold("loso", f"heldout={held}", tr, {"unseen": te},
                 tuple(sorted(set(meta.source[tr]))), (held,), n_dropped_shared=dropped)
        if len(np.unique(meta.y[te])) < 2:
            f.notes.append(f"{held} has one class only: AUC undefined, sensitivity or specificity reported")
        out.append(f)
    return out


def majority(meta: Meta, positive: int = 1) -> dict[str, bool]:
    """source -> True when most of its images are positive."""
    return {s: float(np.mean(meta.y[meta.source == s] == positive)) > 0.5 for s in _sources(meta)}


def leave_pair_out(meta: Meta, positive: int = 1) -> list[Fold]:
    """Hold out one positive-majority and one negative-majority source together (all pairs), so
    every test set has both classes."""
    maj = majority(meta, positive)
    pos = [s for s, m in maj.items() if m]
    neg = [s for s, m in maj.items() if not m]
    if not pos or not neg:
        raise ValueError("leave-pair-out needs at least one mostly-positive and one mostly-negative source; "
                         f"have positive-majority {pos}, negative-majority {neg}")
    out = []
    for p, q in product(pos, neg):
        te = meta.members([p, q])
        tr = np.setdiff1d(np.arange(len(meta.y)), te)
        tr, dropped = _without_shared(meta, tr, [p, q], te)
        out.append(Fold("leave-pair-out", f"heldout={p}+{q}", tr, {"unseen": te},
                        tuple(sorted(set(meta.source[tr]))), (p, q), n_dropped_shared=dropped))
    return out


def seen_unseen(meta: Meta, train_sources, test_fraction: float = 0.2, seed: int = 0,
                unseen_sources=None) -> list[Fold]:
    """Paper 000: fit on named sources; test on held-out images of those (seen) and on all other
    sources (unseen)."""
    train_sources = tuple(train_sources)
    unknown = set(train_sources) - set(meta.source)
    if unknown:
        raise ValueError(f"seen-unseen: unknown train source(s) {sorted(unknown)}; have {_sources(meta)}")
    unseen_sources = tuple(unseen_sources or [s for s in _sources(meta) if s not in train_sources])
    if not unseen_sources:
        raise ValueError("seen-unseen: every source is a training source, nothing is unseen")
    unseen = meta.members(unseen_sources)
    # an image that also occurs in an unseen source is tested there, not among the seen
    seen = np.setdiff1d(meta.members(train_sources), unseen)
    n_splits = max(2, int(round(1 / test_fraction)))
    _need_groups(meta.groups[seen], n_splits, "the seen-unseen test split")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    tr_local, te_local = next(cv.split(seen, meta.y[seen], meta.groups[seen]))
    tr, dropped = _without_shared(meta, seen[tr_local], unseen_sources,
                                  np.concatenate([unseen, seen[te_local]]))
    return [Fold("seen-unseen", "train=" + "+".join(train_sources), tr,
                 {"seen": seen[te_local], "unseen": unseen}, train_sources, unseen_sources,
                 n_dropped_shared=dropped)]


# --- the protocol registry: each entry with the options a study may give it ------------------------

class Mixed(Section):
    folds: int = Field(5, ge=2, description="k of the stratified, patient-grouped k-fold")
    repeats: int = Field(1, ge=1, description="repeated k-fold ([Trivedi2022]: 5 folds x 10 repeats)")


class Loso(Section):
    """Leave one source out (no options)."""


class LeavePairOut(Section):
    """Every mostly-positive x mostly-negative source pair held out (no options)."""


class SeenUnseen(Section):
    train_sources: Names = Field(min_length=1, description="the sources to train on, as in [BenAhmed2021]")
    unseen_sources: Names | None = Field(None, description="default: every other source")
    test_fraction: float = Field(0.2, gt=0, le=0.5, description="share of the training sources held out as 'seen'")

    @model_validator(mode="after")
    def _apart(self):
        both = sorted(set(self.train_sources) & set(self.unseen_sources or ()))
        if both:
            raise PydanticCustomError("overlap", "unseen_sources also lists training source(s) {both}",
                                      {"both": ", ".join(both)})
        return self


@dataclass(frozen=True)
class Protocol:
    """A protocol: its options schema (the study config's `protocols.<name>` section, validated by
    featstore/sweep/config.py) and fn(meta, options, positive, seed) -> folds."""
    name: str
    description: str
    options: type[Section]
    fn: Callable[..., list[Fold]]

    def folds(self, meta: Meta, positive: int = 1, seed: int = 0, **opts) -> list[Fold]:
        try:
            o = self.options.model_validate(opts)
        except ValidationError as e:
            raise ValueError(f"protocol '{self.name}': " + "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}" for err in e.errors())) from None
        return self.fn(meta, o, positive, seed)


PROTOCOLS: Registry[Protocol] = Registry("protocol")


def register_protocol(p: Protocol) -> Protocol:
    return PROTOCOLS.register(p.name, p)


register_protocol(Protocol("mixed", "stratified, patient-grouped k-fold that ignores source", Mixed,
                           lambda m, o, positive, seed: mixed(m, o.folds, o.repeats, seed)))
register_protocol(Protocol("loso", "leave one source out", Loso, lambda m, o, positive, seed: loso(m)))
register_protocol(Protocol("leave-pair-out", "one mostly-positive and one mostly-negative source held out together",
                           LeavePairOut, lambda m, o, positive, seed: leave_pair_out(m, positive)))
register_protocol(Protocol("seen-unseen", "fit on named sources; test on their held-out images and on the others",
                           SeenUnseen, lambda m, o, positive, seed: seen_unseen(
                               m, o.train_sources, o.test_fraction, seed, o.unseen_sources)))


def make_folds(meta: Meta, protocol: str, positive: int = 1, seed: int = 0, **opts) -> list[Fold]:
    """The folds of a registered protocol; opts are checked against its options schema."""
    return PROTOCOLS.get(protocol).folds(meta, positive, seed, **opts)


# --- model selection ---------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """A model-selection rule: the (fit, validate) index pairs a fold's hyperparameters are chosen on.
    An honest rule's function is handed the fold's training indices only, so it cannot look at the
    test set; an oracle's is handed the whole fold: it selects on the test set, an upper bound that is
    reported apart (`oracle` in the result rows) and never a result."""
    name: str
    description: str
    split: Callable  # honest: (meta, train, seed, val_folds) -> pairs; oracle: (meta, fold) -> pairs
    is_oracle: bool = False
    # what a trial is scored by on the validation rows, and which trial wins (None: validation AUC, the
    # highest); measure(y, score, proba, source, Z) -> (value, extras), Z the head's representation
    # (transform, else the embedding) when needs_representation; choose(trials) -> the winning trial
    measure: Callable | None = None
    choose: Callable | None = None
    needs_representation: bool = False

    @property
    def sees_test_data(self) -> bool:
        """Whether the rule reads the fold's test images: only an oracle does (an upper bound, never a result)."""
        return self.is_oracle

    def splits(self, meta: Meta, fold: Fold, seed: int = 0, val_folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.is_oracle:
            return self.split(meta, fold)
        return self.split(meta, fold.train, seed, val_folds)


SELECTIONS: Registry[Selection] = Registry("selection")


def register_selection(sel: Selection) -> Selection:
    return SELECTIONS.register(sel.name, sel)


def honest_selections() -> tuple[str, ...]:
    """The rules a study may choose (`selection:`); the oracle is added with `oracle: true`."""
    return SELECTIONS.where(lambda s: not s.is_oracle)


def oracle_selections() -> tuple[str, ...]:
    return SELECTIONS.where(lambda s: s.is_oracle)


def get_selection(name: str) -> Selection:
    return SELECTIONS.get(name)


def _train_val(meta: Meta, train: np.ndarray, seed: int, val_folds: int):
    _need_groups(meta.groups[train], val_folds, "the train-val selection split")
    cv = StratifiedGroupKFold(n_splits=val_folds, shuffle=True, random_state=seed)
    a, b = next(cv.split(train, meta.y[train], meta.groups[train]))
    return [(train[a], train[b])]


def _inner_loso(meta: Meta, train: np.ndarray, seed: int, val_folds: int):
    srcs = meta.source[train]
    if len(set(srcs)) < 2:
        raise ValueError("inner-loso selection needs at least two training sources")
    out = []
    for a, b in LeaveOneGroupOut().split(train, groups=srcs):
        fit, _ = _without_shared(meta, train[a], [srcs[b[0]]], train[b])
        out.append((fit, train[b]))
    return out


def _on_the_test_set(meta: Meta, fold: Fold):
    test = fold.tests.get("unseen", next(iter(fold.tests.values())))
    return [(fold.train, test)]


register_selection(Selection(
    "train-val", "one patient-grouped, stratified validation split of the training images", _train_val))
register_selection(Selection(
    "inner-loso", "leave one training source out in turn, pooled over the training sources", _inner_loso))
register_selection(Selection(
    "oracle", "fit on the training images, select on the test set (unseen, else seen): an upper bound",
    _on_the_test_set, is_oracle=True))


# --- demographic attributes as the subgroup metrics group them (score.subgroup_metrics) ---------

AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 131, "80+"))


def age_band(age) -> np.ndarray:
    """Years -> band label (AGE_BANDS); missing or NaN -> None."""
    out = []
    for a in np.asarray(age, dtype=object):
        try:
            v = float(a)
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(next((name for lo, hi, name in AGE_BANDS if lo <= v < hi), None) if np.isfinite(v) else None)
    return np.asarray(out, dtype=object)


# --- rules that do not reward shortcuts (issue 26): the train-val split, another score -------------
# All see the fold's training images only (the train-val split); they differ in what a trial is judged by.

def worst_group_accuracy(y, score, proba, source, Z=None):
    """The lowest accuracy over (source, label) groups of the validation images (p >= 0.5 positive;
    groups of under 5 images are not ranked, as in score.group_metrics)."""
    y = np.asarray(y).astype(int)
    pred = np.argmax(proba, axis=1)
    src = np.asarray(source).astype(str)
    accs = {}
    for g in sorted(set(zip(src.tolist(), y.tolist()))):
        m = (src == g[0]) & (y == g[1])
        if m.sum() >= 5:
            accs[f"{g[0]}|{g[1]}"] = float((pred[m] == g[1]).mean())
    if not accs:
        return float("nan"), {}
    k = min(accs, key=lambda g: (accs[g], g))
    return accs[k], dict(worst_group=k)


def worst_class_accuracy(y, score, proba, source=None, Z=None):
    """The lowest per-class recall (no group labels needed; SubpopBench's rule)."""
    y = np.asarray(y).astype(int)
    pred = np.argmax(proba, axis=1)
    rec = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return (min(rec) if len(rec) > 1 else float("nan")), {}


def source_probe_auc(Z, source, seed: int = 0, folds: int = 3) -> float:
    """Macro one-vs-rest AUC of a logistic probe predicting the source from Z (out-of-fold): how much of
    the source the representation carries (probe.domain_probe's estimator, without its intervals)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import LabelEncoder, StandardScaler

    from featstore.metrics import roc_auc

    src = np.asarray(source).astype(str)
    d = LabelEncoder().fit_transform(src)
    k = min(folds, int(np.bincount(d).min()))
    if len(np.unique(d)) < 2 or k < 2:
        return float("nan")
    P = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)), np.asarray(Z, float), d,
                          cv=StratifiedKFold(k, shuffle=True, random_state=seed), method="predict_proba")
    if P.shape[1] == 2:
        return roc_auc(d, P[:, 1])
    return float(roc_auc_score(d, P, multi_class="ovr", average="macro"))


def _auc_and_probe(y, score, proba, source, Z):
    from sklearn.metrics import roc_auc_score

    from featstore.metrics import roc_auc

    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return float("nan"), {}
    auc = float(roc_auc(y, score) if np.ndim(score) == 1 else
                roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(proba.shape[1]))))
    return auc, dict(probe_auc=source_probe_auc(Z, source))


PROBE_AUC_TOLERANCE = 0.02  # "acceptable": validation AUC within this of the study's best trial


def _least_source(trials):
    """Among trials whose validation AUC is within PROBE_AUC_TOLERANCE of the best, the one whose
    representation predicts the source least (ties, or no probe: the higher AUC, then the earlier)."""
    best = max(t.value for t in trials)
    ok = [t for t in trials if t.value >= best - PROBE_AUC_TOLERANCE]

    def key(t):
        pa = t.user_attrs.get("probe_auc")
        pa = 1.0 if pa is None or pa != pa else pa
        return (round(pa, 6), -t.value, t.number)
    return min(ok, key=key)


register_selection(Selection(
    "worst-group", "train-val split; the lowest (source x label) group accuracy of the validation images",
    _train_val, measure=worst_group_accuracy))
register_selection(Selection(
    "worst-class", "train-val split; the lowest per-class accuracy (no group labels)", _train_val,
    measure=worst_class_accuracy))
register_selection(Selection(
    "min-source-probe", f"train-val split; of the trials within {PROBE_AUC_TOLERANCE} of the best validation AUC, "
    "the one whose representation predicts the source least (out-of-fold probe on the validation images)",
    _train_val, measure=_auc_and_probe, choose=_least_source, needs_representation=True))


def selection_splits(meta: Meta, train: np.ndarray, method: str, seed: int = 0,
                     val_folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, validate) index pairs drawn from `train` only, by an honest rule. The oracle is not
    here: it selects on the test set (`Selection.splits` with the fold)."""
    sel = get_selection(method)
    if sel.is_oracle:
        raise ValueError(f"selection '{method}' selects on the test set; it is not drawn from training "
                         f"images (choose from {', '.join(honest_selections())})")
    return sel.split(meta, train, seed, val_folds)


# --- protocol `adapt`: the held-out site with k labelled images per class added ([BenAhmed2021] Table 4) -----
# Its folds are leave-one-site-out folds (hyperparameters are selected on the training sources only, as for
# loso); `adapt_draws` then draws, per site and draw, the k images per class that join training. The curve
# itself is fitted and scored by featstore/sweep/adapt.py.

class Adapt(Section):
    ks: list[int] = Field([0, 5, 10, 20, 40, 80], min_length=1,
                          description="labelled images per class added from the held-out site (0: none)")
    draws: int = Field(5, ge=2, le=200, description="random draws of the k images per k (the curve's uncertainty)")
    sites: Names | None = Field(None, description="sites to adapt to (default: every source with both classes)")

    @model_validator(mode="after")
    def _ks(self):
        if any(k < 0 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise PydanticCustomError("ks", "ks must be distinct whole numbers >= 0, got {ks}",
                                      {"ks": ", ".join(map(str, self.ks))})
        return self


@dataclass(frozen=True)
class AdaptDraw:
    """One random draw for one site: the images added at each feasible k (nested: the k=5 images are among
    the k=10 ones) and the images scored at every k (the site less the largest k's images, whole patients)."""
    site: str
    draw: int
    added: dict          # k -> indices (into meta) of the site's images added to training
    test: np.ndarray     # indices scored at every k of this draw (never added at any k)


def adapt_sites(meta: Meta, sites=None, ks=(5,)) -> list[str]:
    """The sites an adapt curve is drawn for: the named ones, else every source with both classes that can
    give the smallest k > 0 per class and keep at least max(k, 10) of each class to score."""
    kmin = min([k for k in ks if k > 0], default=0)

    def room(s):
        y = meta.y[meta.members([s])]
        need = kmin + max(kmin, 10) if kmin else 1
        return len(np.unique(y)) == 2 and all(int((y == c).sum()) >= need for c in np.unique(y))
    if sites:
        unknown = sorted(set(sites) - set(meta.source))
        if unknown:
            raise ValueError(f"adapt: unknown site(s) {unknown}; have {_sources(meta)}")
        one = [s for s in sites if len(np.unique(meta.y[meta.members([s])])) < 2]
        if one:
            raise ValueError(f"adapt: site(s) {one} have one class only: no k per class to add, no AUC to score")
        small = [s for s in sites if not room(s)]
        if small:
            raise ValueError(f"adapt: site(s) {small} cannot give k={kmin} images per class and keep max(k, 10) of "
                             "each class to score")
        return list(sites)
    return [s for s in _sources(meta) if room(s)]


def adapt(meta: Meta, sites=None, ks=(5,)) -> list[Fold]:
    """The adapt protocol's folds: leave-one-site-out for each site (k = 0 is this fold scored on the whole
    site; the curve's k > 0 points add images of the site to `train`, see adapt_draws)."""
    if len(np.unique(meta.y)) > 2:
        raise ValueError("adapt: binary targets only (its curve is the unseen AUC against k)")
    keep = set(adapt_sites(meta, sites, ks))
    if not keep:
        raise ValueError("adapt: no source has both classes with room for the smallest k per class")
    out = []
    for f in loso(meta):
        if f.test_sources[0] in keep:
            f.protocol = "adapt"
            out.append(f)
    return out


def adapt_draws(meta: Meta, site: str, ks, draws: int, seed: int = 0) -> tuple[list[AdaptDraw], list[int], list[str]]:
    """(draws, feasible ks, notes). Patients are drawn whole: a class's k images
    are the first patients of a seeded shuffle of the site's patients of that class until k images are
    reached, so a patient's images are all added or none is, and no patient is both added and scored.
    A k is feasible when every class keeps at least max(k, 10) images to score after the largest k's draw
    (so the scored set is never smaller than what was added); infeasible ks are dropped with a note."""
    from sklearn.utils import shuffle

    te_all = meta.members([site])
    groups = meta.groups[te_all]
    y = meta.y[te_all]
    classes = np.unique(y)
    # a patient's class: its images' most common label (pure in practice), ties to the smaller label
    ug = np.array(sorted(set(groups)), dtype=object)
    gclass = {}
    for g in ug:
        vals, cnt = np.unique(y[groups == g], return_counts=True)
        gclass[g] = vals[np.argmax(cnt)]
    n_class = {c: int((y == c).sum()) for c in classes}
    ks = sorted(int(k) for k in ks)
    notes, out, feasible = [], [], []
    for d in range(draws):
        # one seeded shuffle of the site's patients (sorted first: the same draw whatever the row order)
        order = shuffle(ug, random_state=seed * 7919 + d)
        added: dict[int, np.ndarray] = {}
        ok_ks = []
        for k in ks:
            take = []
            for c in classes:
                n = 0
                for g in order:
                    if n >= k:
                        break
                    if gclass[g] == c:
                        take.append(g)
                        n += int((groups == g).sum())
            take_set = set(take)
            idx = te_all[np.array([g in take_set for g in groups], dtype=bool)] if take else np.array([], int)
            left = np.setdiff1d(te_all, idx)
            if any(int((meta.y[left] == c).sum()) < max(k, 10) for c in classes):
                break  # ks are sorted: every larger k is infeasible too
            added[k] = np.sort(idx)
            ok_ks.append(k)
        if not ok_ks:
            raise ValueError(f"adapt: site {site} is too small for k={ks[0]} per class "
                             f"({', '.join(f'{n} of class {c}' for c, n in n_class.items())})")
        feasible = ok_ks if d == 0 else [k for k in feasible if k in ok_ks]
        test = np.setdiff1d(te_all, added[ok_ks[-1]])
        out.append(AdaptDraw(site, d, added, test))
    if not feasible:
        raise ValueError(f"adapt: site {site}: no k of {ks} is feasible in every draw")
    dropped = [k for k in ks if k not in feasible]
    if dropped:
        notes.append(f"{site}: k={', '.join(map(str, dropped))} left out: a class would keep fewer images to "
                     f"score than were added ({', '.join(f'{n} of class {c}' for c, n in n_class.items())})")
    # the test set of every draw: the site less its largest feasible k's images
    out = [AdaptDraw(site, a.draw, {k: a.added[k] for k in feasible},
                     np.setdiff1d(te_all, a.added[feasible[-1]])) for a in out]
    return out, feasible, notes


register_protocol(Protocol("adapt", "each site left out, then k labelled images per class of it added to training "
                           "(several patient-grouped draws per k): unseen AUC vs k", Adapt,
                           lambda m, o, positive, seed: adapt(m, o.sites, o.ks)))
