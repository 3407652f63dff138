"""Heads: scikit-learn estimators fitted on frozen embeddings, plus their Optuna search spaces.

`__init__` stores hyperparameters, `fit` returns self, learned state lives in `name_` attributes.
Heads get arrays, never the store. `fit(X, y, domains=...)` passes the training sources to heads
that use them (the GRL head); the others ignore it. Every head has `decision_function` (log-odds
or logits): AUC ranks on it, because probabilities saturate to exactly 1.0 on far-away sources
and the ties would hide the ranking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class LogisticHead(ClassifierMixin, BaseEstimator):
    """Standardised inputs -> L1/L2 logistic regression."""

    def __init__(self, C=1.0, l1_ratio=0.0, class_weight=None, max_iter=2000, random_state=0):
        self.C = C
        self.l1_ratio = l1_ratio
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y, domains=None):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.scaler_ = StandardScaler().fit(X)
        # lbfgs for pure L2; liblinear for L1 on two classes (saga needs 100x longer on CXR
        # embeddings); saga only where nothing else takes an L1 part (several classes, elastic net)
        binary_l1 = self.l1_ratio == 1 and len(np.unique(y)) == 2
        solver = "lbfgs" if self.l1_ratio == 0 else ("liblinear" if binary_l1 else "saga")
        self.model_ = LogisticRegression(C=self.C, l1_ratio=self.l1_ratio, class_weight=self.class_weight,
                                         solver=solver, max_iter=self.max_iter, random_state=self.random_state)
        self.model_.fit(self.scaler_.transform(X), y)
        self.classes_ = self.model_.classes_
        self.n_iter_ = self.model_.n_iter_
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.model_.predict_proba(self.scaler_.transform(X))

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.model_.decision_function(self.scaler_.transform(X))

    def predict(self, X):
        P = self.predict_proba(X)  # raises NotFittedError before classes_ is touched
        return self.classes_[np.argmax(P, axis=1)]


class LightGBMHead(ClassifierMixin, BaseEstimator):
    """Gradient-boosted trees (LightGBM), deterministic."""

    def __init__(self, n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=20,
                 colsample_bytree=0.5, subsample=0.8, reg_lambda=1.0, n_jobs=1, random_state=0):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.colsample_bytree = colsample_bytree
        self.subsample = subsample
        self.reg_lambda = reg_lambda
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y, domains=None):
        import lightgbm as lgb

        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.model_ = lgb.LGBMClassifier(
            n_estimators=self.n_estimators, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples, colsample_bytree=self.colsample_bytree,
            subsample=self.subsample, subsample_freq=1 if self.subsample < 1 else 0, reg_lambda=self.reg_lambda,
            n_jobs=self.n_jobs, random_state=self.random_state, deterministic=True, force_row_wise=True,
            verbose=-1)
        self.model_.fit(X, y)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.model_.predict_proba(X)

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.model_.predict(X, raw_score=True)

    def predict(self, X):
        P = self.predict_proba(X)  # raises NotFittedError before classes_ is touched
        return self.classes_[np.argmax(P, axis=1)]


class GRLHead(ClassifierMixin, TransformerMixin, BaseEstimator):
    """Gradient-reversal feature disentanglement (paper 003; DESIGN.md).

    fe = Linear(d,h1)-BN-ReLU-Linear(h1,h2)-BN-ReLU; a linear class head and a linear domain
    (source) head; the domain loss reaches fe through a gradient-reversal layer scaled by
    lambda_t = lambda0 ** (1 - t/T), so fe learns to *hide* the source. After each epoch the
    domain head is re-fitted to convergence (L2-penalised, `domain_l2`) on the frozen representation,
    so fe always faces the best source classifier. AdamW(amsgrad); LR / 10 when the validation class loss stalls for
    `patience` epochs; stop at the `max_drops`-th drop or `max_epochs`; the best-validation weights
    are kept. Without `domains` it is a plain MLP. `transform` returns the learned representation.
    """

    def __init__(self, hidden=(256, 64), lambda0=10.0, lr=1e-3, weight_decay=1e-2, dropout=0.0,
                 batch_size=256, max_epochs=200, patience=10, max_drops=3, val_fraction=0.1,
                 domain_refit_iters=50, domain_l2=1e-2, random_state=0):
        self.hidden = hidden
        self.lambda0 = lambda0
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.max_drops = max_drops
        self.val_fraction = val_fraction
        self.domain_refit_iters = domain_refit_iters
        self.domain_l2 = domain_l2
        self.random_state = random_state

    def _nets(self, d, n_classes, n_domains):
        h1, h2 = self.hidden
        fe = nn.Sequential(nn.Linear(d, h1), nn.BatchNorm1d(h1), nn.ReLU(), nn.Dropout(self.dropout),
                           nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.ReLU())
        return fe, nn.Linear(h2, n_classes), nn.Linear(h2, max(n_domains, 1))

    def fit(self, X, y, domains=None):
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.label_encoder_ = LabelEncoder().fit(y)
        self.classes_ = self.label_encoder_.classes_
        yi = self.label_encoder_.transform(y)
        dom = LabelEncoder().fit_transform(np.asarray(domains)) if domains is not None else np.zeros(len(yi), int)
        self.n_domains_ = int(dom.max()) + 1
        adversarial = domains is not None and self.n_domains_ > 1
        torch.manual_seed(self.random_state)
        gen = torch.Generator().manual_seed(self.random_state)
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X).astype(np.float32)
        idx = np.arange(len(yi))
        n_val = int(np.ceil(self.val_fraction * len(yi)))
        if len(yi) >= 20 and n_val >= len(self.classes_) and np.min(np.bincount(yi)) >= 2:
            tr, va = train_test_split(idx, test_size=n_val, stratify=yi, random_state=self.random_state)
        else:  # too small to hold anything out: watch the training loss
            tr, va = idx, idx
        Xt, yt, dt = (torch.from_numpy(Xs[tr]), torch.from_numpy(yi[tr]).long(), torch.from_numpy(dom[tr]).long())
        Xv, yv = torch.from_numpy(Xs[va]), torch.from_numpy(yi[va]).long()
        fe, ch, dh = self._nets(X.shape[1], len(self.classes_), self.n_domains_)
        # the domain head is not in the optimiser: fe plays against the head re-fitted each epoch
        opt = torch.optim.AdamW(list(fe.parameters()) + list(ch.parameters()),
                                lr=self.lr, weight_decay=self.weight_decay, amsgrad=True)
        if adversarial:
            fe.eval()
            self._refit_domain_head(fe, dh, Xt, dt)
        best, best_state, stall, drops, lr = np.inf, None, 0, 0, self.lr
        self.lambdas_, self.val_loss_ = [], []
        bs = max(2, min(self.batch_size, len(tr)))
        for epoch in range(self.max_epochs):
            lam = self.lambda0 ** (1 - epoch / self.max_epochs) if adversarial else 0.0
            fe.train(), ch.train(), dh.train()
            perm = torch.randperm(len(tr), generator=gen)
            for start in range(0, len(tr), bs):
                b = perm[start:start + bs]
                if len(b) < 2:  # BatchNorm needs two rows
                    continue
                z = fe(Xt[b])
                loss = F.cross_entropy(ch(z), yt[b])
                if adversarial:
                    loss = loss + F.cross_entropy(dh(_GradReverse.apply(z, lam)), dt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            fe.eval(), ch.eval()
            if adversarial:
                self._refit_domain_head(fe, dh, Xt, dt)
            with torch.no_grad():
                vloss = float(F.cross_entropy(ch(fe(Xv)), yv))
            self.lambdas_.append(lam)
            self.val_loss_.append(vloss)
            if vloss < best - 1e-4:
                best, stall = vloss, 0
                best_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in (fe, ch, dh)]
            else:
                stall += 1
                if stall >= self.patience:
                    drops += 1
                    if drops >= self.max_drops:
                        break
                    lr /= 10
                    for g in opt.param_groups:
                        g["lr"] = lr
                    stall = 0
        for m, s in zip((fe, ch, dh), best_state):
            m.load_state_dict(s)
        # inference in float64: float32 rounding would make outputs depend on the batch they come in
        fe, ch, dh = fe.double().eval(), ch.double().eval(), dh.double().eval()
        self.fe_, self.class_head_, self.domain_head_ = fe, ch, dh
        self.n_epochs_ = len(self.val_loss_)
        self.n_features_out_ = self.hidden[-1]
        return self

    def _refit_domain_head(self, fe, dh, Xt, dt):
        with torch.no_grad():
            z = fe(Xt)
        opt = torch.optim.LBFGS(dh.parameters(), max_iter=self.domain_refit_iters, line_search_fn="strong_wolfe")

        def closure():
            # L2 keeps the logits finite: an unpenalised head separates the sources perfectly, its
            # loss goes to 0 and no reversed gradient would reach fe
            opt.zero_grad()
            loss = F.cross_entropy(dh(z), dt) + self.domain_l2 * dh.weight.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)

    def _z(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        with torch.no_grad():
            return self.fe_(torch.from_numpy(self.scaler_.transform(X)))

    def transform(self, X):
        return self._z(X).numpy().astype(np.float64)

    def predict_proba(self, X):
        z = self._z(X)
        with torch.no_grad():
            return torch.softmax(self.class_head_(z), dim=1).numpy().astype(np.float64)

    def decision_function(self, X):
        z = self._z(X)
        with torch.no_grad():
            logits = self.class_head_(z).numpy().astype(np.float64)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict(self, X):
        P = self.predict_proba(X)  # raises NotFittedError before classes_ is touched
        return self.classes_[np.argmax(P, axis=1)]


class _GradReverse(torch.autograd.Function):
    """Identity forward; gradient times -lambda backward."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


# --- registry: one entry per head, with its Optuna search space -----------------------------

def _space_logreg(trial) -> dict:
    return dict(C=trial.suggest_float("C", 1e-4, 1.0, log=True),
                l1_ratio=trial.suggest_categorical("l1_ratio", [0.0, 1.0]),
                class_weight=trial.suggest_categorical("class_weight", [None, "balanced"]))


def _space_grl(trial) -> dict:
    return dict(lambda0=trial.suggest_float("lambda0", 1.0, 30.0, log=True),
                lr=trial.suggest_float("lr", 3e-4, 3e-3, log=True),
                weight_decay=trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True),
                dropout=trial.suggest_float("dropout", 0.0, 0.5))


def _space_lgbm(trial) -> dict:
    return dict(n_estimators=trial.suggest_int("n_estimators", 50, 400, log=True),
                learning_rate=trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
                num_leaves=trial.suggest_int("num_leaves", 4, 63, log=True),
                min_child_samples=trial.suggest_int("min_child_samples", 5, 50, log=True),
                colsample_bytree=trial.suggest_float("colsample_bytree", 0.1, 1.0))


@dataclass(frozen=True)
class HeadSpec:
    name: str
    cls: type
    space: Callable
    description: str


HEADS = {
    "logreg": HeadSpec("logreg", LogisticHead, _space_logreg, "standardised logistic regression (L1/L2)"),
    "grl_mlp": HeadSpec("grl_mlp", GRLHead, _space_grl, "gradient-reversal MLP, paper 003"),
    "lightgbm": HeadSpec("lightgbm", LightGBMHead, _space_lgbm, "LightGBM gradient-boosted trees"),
}


def create_head(name: str, **params) -> BaseEstimator:
    if name not in HEADS:
        raise ValueError(f"unknown head '{name}'; choose from {', '.join(HEADS)}")
    return HEADS[name].cls(**params)
