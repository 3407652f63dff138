"""Shortcut-robust heads on frozen embeddings: DFR, GroupDRO and inverse-group-frequency reweighting.

Each is a scikit-learn estimator like the heads in heads.py (which registers them in HEADS). A *group*
is (source, label) of a training image: `fit(X, y, domains=...)` gets the training sources as the GRL
head does; without them the groups are the labels alone (class balancing). The held-out source is
never among the groups: the sweep hands a head the fold's training rows only.

- `DFRHead`: Deep Feature Reweighting (Kirichenko et al., ICLR 2023): the last layer re-fitted on a
  group-balanced subset. The embeddings are frozen, so the "last layer" is a logistic regression on
  them; `holdout` of the training images (stratified by group) is the held-out part the balanced
  subsets are drawn from (DFR's validation half), the rest only fits the standardiser. Each of
  `n_subsets` subsets takes the same number of images from every group (the smallest group's size,
  at least `min_group`, drawn with replacement from smaller groups); the coefficients are averaged.
- `GroupDROHead`: online GroupDRO (Sagawa et al., ICLR 2020) on a linear head: exponentiated-gradient
  group weights q, loss sum_g q_g * loss_g (+ the generalisation adjustment C / sqrt(n_g)), strong L2
  as the paper advises; full-batch Adam on standardised features (the sets here fit in memory).
- `ReweightHead`: logistic regression with each image weighted by 1 / (its group's size).
"""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


def group_ids(y, domains) -> np.ndarray:
    """0..G-1 per row: (source, label) when sources are given, else the label."""
    y = np.asarray(y)
    if domains is None:
        return LabelEncoder().fit_transform(y)
    d = np.asarray(domains).astype(str)
    if len(d) != len(y):
        raise ValueError(f"domains has {len(d)} rows, y {len(y)}")
    return LabelEncoder().fit_transform(np.char.add(np.char.add(d, "\x1f"), y.astype(str)))


class _LinearScores:
    """predict / predict_proba / decision_function of a linear model on standardised inputs."""

    def _logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.scaler_.transform(X) @ self.coef_.T + self.intercept_

    def decision_function(self, X):
        z = self._logits(X)
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X):
        z = self._logits(X)
        if z.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-np.clip(z[:, 0], -500, 500)))
            return np.column_stack([1 - p, p])
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X):
        P = self.predict_proba(X)  # raises NotFittedError before classes_ is touched
        return self.classes_[np.argmax(P, axis=1)]


def _coefs(model, n_classes):
    """(coef [1 or K, d], intercept) of a fitted LogisticRegression, shaped for _LinearScores."""
    return np.asarray(model.coef_, float).reshape(1 if n_classes == 2 else n_classes, -1), \
        np.asarray(model.intercept_, float)


class DFRHead(_LinearScores, ClassifierMixin, BaseEstimator):
    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "l1_ratio": [Interval(Real, 0, 1, closed="both")],
        "holdout": [Interval(Real, 0, 1, closed="right")],
        "n_subsets": [Interval(Integral, 1, None, closed="left")],
        "min_group": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, C=0.1, l1_ratio=1.0, holdout=0.5, n_subsets=10, min_group=10, max_iter=2000,
                 random_state=0):
        self.C = C
        self.l1_ratio = l1_ratio
        self.holdout = holdout
        self.n_subsets = n_subsets
        self.min_group = min_group
        self.max_iter = max_iter
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, domains=None):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        enc = LabelEncoder().fit(y)
        self.classes_ = enc.classes_
        yi = enc.transform(y)
        if len(self.classes_) < 2:
            raise ValueError("DFR needs two classes in the training data, got one class")
        g = group_ids(yi, domains)
        rng = np.random.default_rng(self.random_state)
        held = self._held_out(g, rng)
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        members = [held[g[held] == k] for k in np.unique(g[held])]
        m = max(min(len(a) for a in members), self.min_group)
        binary_l1 = self.l1_ratio == 1 and len(self.classes_) == 2
        solver = "lbfgs" if self.l1_ratio == 0 else ("liblinear" if binary_l1 else "saga")
        coefs, ints, iters = [], [], []
        for _ in range(self.n_subsets):
            idx = np.concatenate([rng.choice(a, m, replace=len(a) < m) for a in members])
            if len(np.unique(yi[idx])) < 2:
                continue
            lr = LogisticRegression(C=self.C, l1_ratio=self.l1_ratio, solver=solver, max_iter=self.max_iter,
                                    random_state=self.random_state).fit(Xs[idx], yi[idx])
            c, b = _coefs(lr, len(self.classes_))
            coefs.append(c)
            ints.append(b)
            iters.append(int(np.max(lr.n_iter_)))
        if not coefs:
            raise ValueError("DFR: no balanced subset held both classes")
        self.coef_, self.intercept_ = np.mean(coefs, axis=0), np.mean(ints, axis=0)
        self.n_groups_, self.group_size_, self.n_held_out_ = len(members), int(m), int(len(held))
        self.n_iter_ = max(iters)
        return self

    def _held_out(self, g, rng) -> np.ndarray:
        """`holdout` of every group's rows (at least one each): the part the balanced subsets come from."""
        if self.holdout >= 1:
            return np.arange(len(g))
        out = []
        for k in np.unique(g):
            rows = np.flatnonzero(g == k)
            out.append(rng.choice(rows, max(1, int(round(self.holdout * len(rows)))), replace=False))
        return np.sort(np.concatenate(out))

    @property
    def fit_info_(self) -> dict:
        check_is_fitted(self)
        return dict(groups=self.n_groups_, group_size=self.group_size_, held_out=self.n_held_out_,
                    subsets=int(self.n_subsets))


class ReweightHead(_LinearScores, ClassifierMixin, BaseEstimator):
    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, C=0.1, max_iter=2000, random_state=0):
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, domains=None):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        g = group_ids(y, domains)
        counts = np.bincount(g)
        w = 1.0 / counts[g]
        w *= len(w) / w.sum()  # mean weight 1: C means what it means for the plain logistic head
        self.scaler_ = StandardScaler().fit(X)
        lr = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        lr.fit(self.scaler_.transform(X), y, sample_weight=w)
        self.classes_ = lr.classes_
        self.coef_, self.intercept_ = _coefs(lr, len(self.classes_))
        self.n_groups_ = int(len(counts))
        self.n_iter_ = lr.n_iter_
        return self


class GroupDROHead(_LinearScores, ClassifierMixin, BaseEstimator):
    _parameter_constraints: dict = {
        "l2": [Interval(Real, 0, None, closed="left")],
        "eta": [Interval(Real, 0, None, closed="left")],
        "adjustment": [Interval(Real, 0, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "steps": [Interval(Integral, 1, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, l2=0.1, eta=0.01, adjustment=0.0, lr=0.01, steps=500, random_state=0):
        self.l2 = l2
        self.eta = eta
        self.adjustment = adjustment
        self.lr = lr
        self.steps = steps
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, domains=None):
        import torch
        import torch.nn.functional as F

        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        enc = LabelEncoder().fit(y)
        self.classes_ = enc.classes_
        K = len(self.classes_)
        if K < 2:
            raise ValueError("GroupDRO needs two classes in the training data, got one class")
        yi = enc.transform(y)
        g = group_ids(yi, domains)
        G = int(g.max()) + 1
        self.scaler_ = StandardScaler().fit(X)
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # a small full-batch problem: more threads only spin (25x slower on 2 busy cores)
        try:
            self._descend(X, yi, g, G, K)
        finally:
            torch.set_num_threads(before)
        return self

    def _descend(self, X, yi, g, G, K):
        import torch
        import torch.nn.functional as F

        torch.manual_seed(self.random_state)
        Xt = torch.from_numpy(self.scaler_.transform(X))  # float64: the same numbers on every machine
        yt, gt = torch.from_numpy(yi).long(), torch.from_numpy(g).long()
        n_g = torch.bincount(gt, minlength=G).double()
        adj = self.adjustment / torch.sqrt(n_g)
        out = 1 if K == 2 else K
        W = torch.zeros(X.shape[1], out, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(out, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=self.lr)
        q = torch.full((G,), 1.0 / G, dtype=torch.float64)
        onehot = F.one_hot(gt, G).double()
        for _ in range(self.steps):
            z = Xt @ W + b
            per = (F.binary_cross_entropy_with_logits(z[:, 0], yt.double(), reduction="none") if K == 2
                   else F.cross_entropy(z, yt, reduction="none"))
            loss_g = (onehot.T @ per) / n_g
            with torch.no_grad():  # exponentiated-gradient ascent on the group weights
                q = q * torch.exp(self.eta * (loss_g + adj))
                q = q / q.sum()
            loss = (q * loss_g).sum() + self.l2 * W.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.coef_ = W.detach().numpy().T.copy()
        self.intercept_ = b.detach().numpy().copy()
        self.group_weights_ = q.numpy().copy()
        self.group_loss_ = loss_g.detach().numpy().copy()

    @property
    def fit_info_(self) -> dict:
        check_is_fitted(self)
        return dict(groups=int(len(self.group_weights_)), max_group_weight=float(self.group_weights_.max()),
                    worst_group_loss=float(self.group_loss_.max()), steps=int(self.steps))


# --- Optuna search spaces ------------------------------------------------------------------

def space_dfr(trial) -> dict:
    return dict(C=trial.suggest_float("C", 1e-3, 1.0, log=True),
                l1_ratio=trial.suggest_categorical("l1_ratio", [0.0, 1.0]))


def space_groupdro(trial) -> dict:
    # strong L2 (the paper's point): up to 1 on standardised features
    return dict(l2=trial.suggest_float("l2", 1e-4, 1.0, log=True),
                eta=trial.suggest_float("eta", 1e-3, 0.1, log=True),
                lr=trial.suggest_float("lr", 3e-3, 3e-2, log=True))


def space_reweight(trial) -> dict:
    return dict(C=trial.suggest_float("C", 1e-4, 1.0, log=True))
