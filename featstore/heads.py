"""Heads: scikit-learn estimators fitted on frozen embeddings, plus their Optuna search spaces.

`__init__` stores hyperparameters, `fit` returns self, learned state lives in `name_` attributes.
Heads get arrays, never the store. `fit(X, y, domains=...)` passes the training sources to heads
that use them (the GRL head); the others ignore it. Every head has `decision_function` (log-odds
or logits): AUC ranks on it, because probabilities saturate to exactly 1.0 on far-away sources
and the ties would hide the ranking.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from numbers import Integral, Real
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, _fit_context
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featstore.registry import Registry


class LogisticHead(ClassifierMixin, BaseEstimator):
    """Standardised inputs -> L1/L2 logistic regression."""

    def __init__(self, C=1.0, l1_ratio=0.0, class_weight=None, max_iter=2000, random_state=0):
        self.C = C
        self.l1_ratio = l1_ratio
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y, domains=None, scaler=None):
        """scaler: a StandardScaler already fitted on this X (the sweep fits it once per split and
        reuses it across trials; the same numbers as fitting it here)."""
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.scaler_ = scaler if scaler is not None else StandardScaler().fit(X)
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
                 colsample_bytree=0.5, subsample=0.8, reg_lambda=1.0, n_jobs=1, early_stopping_rounds=None,
                 val_fraction=0.1, max_bin=255, random_state=0):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.colsample_bytree = colsample_bytree
        self.subsample = subsample
        self.reg_lambda = reg_lambda
        self.n_jobs = n_jobs
        self.early_stopping_rounds = early_stopping_rounds
        self.val_fraction = val_fraction
        self.max_bin = max_bin  # histogram bins per feature (LightGBM's default 255); fewer: faster splits
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
            max_bin=self.max_bin, verbose=-1)
        if self.early_stopping_rounds is None:
            self.model_.fit(X, y)
        else:
            # stop when the validation loss of an inner split of the training rows (stratified by class and
            # source, like the GRL head's) has not improved for early_stopping_rounds trees; n_estimators is
            # the cap, and prediction uses the best iteration. The held-out sources are never seen.
            yi = LabelEncoder().fit_transform(y)
            dom = LabelEncoder().fit_transform(np.asarray(domains)) if domains is not None else np.zeros(len(yi), int)
            tr, va = inner_split(yi, dom, len(np.unique(yi)), int(dom.max()) + 1, self.val_fraction,
                                 self.random_state)
            self.model_.fit(X[tr], y[tr], eval_X=(X[va],), eval_y=(y[va],),
                            callbacks=[lgb.early_stopping(self.early_stopping_rounds, first_metric_only=True,
                                                          verbose=False)])
        self.classes_ = self.model_.classes_
        return self

    @property
    def fit_info_(self) -> dict:
        """What result rows record: the trees kept when early stopping (None without it)."""
        check_is_fitted(self)
        if self.early_stopping_rounds is None:
            return {}
        return dict(early_stopping_rounds=int(self.early_stopping_rounds), best_iteration=int(self.model_.best_iteration_))

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
    """Gradient-reversal feature disentanglement (DANN, Ganin et al. JMLR 2016; [Trivedi2022]'s network).

    fe = Linear(d,h1)-BN-ReLU-Linear(h1,h2)-BN-ReLU; a linear class head and a linear domain
    (source) head; the domain loss reaches fe through a gradient-reversal layer scaled by DANN's
    schedule lambda_p = lambda_max * (2 / (1 + exp(-10 p)) - 1), p = min(1, steps / (ramp_epochs *
    steps per epoch)): reversal starts at 0, so the network first learns the task, and reaches
    0.99 * lambda_max at half the ramp. `lambda_max=0` is the same network with reversal off.

    How the domain head keeps up with fe (`domain_refit`):
    - "step" (default): on every minibatch the domain head is re-fitted (warm-started L-BFGS,
      `domain_step_iters` iterations, L2 `domain_l2`) on that batch's representation, then fe and
      the class head take their step against it. A domain head trained by plain simultaneous
      gradient steps lags behind fe, which then learns to make it confidently wrong instead of
      removing the source (on tests/test_grl.py's data the probe AUC *rose* above the
      no-reversal network's); a near-optimal, L2-bounded head does not leave that way out.
    - "epoch": [Trivedi2022]'s variant, the same re-fit (`domain_refit_iters`) on the whole training
      set after every epoch.
    - "joint": textbook DANN, the domain head in the optimiser (its LR times `domain_lr_mult`).

    AdamW(amsgrad). The first `min_epochs` epochs are warm-up: no checkpoint, no LR drop, no stop,
    so the kept network is never epoch 0's nor one whose reversal has not ramped up (with the
    defaults lambda is 0.99 * lambda_max when warm-up ends). After it, LR / 10 when the validation
    class loss stalls for `patience` epochs, stop at the `max_drops`-th drop or `max_epochs`; the
    weights of the epoch with the lowest validation class loss (at or after warm-up) are kept.
    The validation split is stratified by class and source. Without `domains` it is a plain MLP.
    `transform` returns the learned representation.

    Fitted: `best_epoch_` (0-based epoch of the kept weights, >= min_epochs), `n_epochs_` (epochs
    run), `stop_reason_` ("lr drops" or "max_epochs"), and per epoch `lambdas_` (lambda at its last
    step), `val_loss_` (validation class loss), `domain_loss_` (mean training domain loss, NaN
    without domains). The reversal strength chosen is the parameter `lambda_max`.
    """

    _parameter_constraints: dict = {
        "hidden": [tuple, list],
        "lambda_max": [Interval(Real, 0, None, closed="left")],
        "domain_refit": [StrOptions({"step", "epoch", "joint"})],
        "ramp_epochs": [Interval(Integral, 1, None, closed="left")],
        "min_epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "max_epochs": [Interval(Integral, 2, None, closed="left")],  # and > min_epochs, checked in fit
        "patience": [Interval(Integral, 1, None, closed="left")],
        "max_drops": [Interval(Integral, 1, None, closed="left")],
        "val_fraction": [Interval(Real, 0, 1, closed="neither")],
        "domain_step_iters": [Interval(Integral, 1, None, closed="left")],
        "domain_refit_iters": [Interval(Integral, 1, None, closed="left")],
        "domain_l2": [Interval(Real, 0, None, closed="left")],
        "domain_lr_mult": [Interval(Real, 0, None, closed="neither")],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, hidden=(256, 64), lambda_max=1.0, domain_refit="step", ramp_epochs=10, min_epochs=5,
                 lr=1e-3, weight_decay=1e-2, dropout=0.0, batch_size=256, max_epochs=200, patience=10, max_drops=3,
                 val_fraction=0.1, domain_step_iters=10, domain_refit_iters=50, domain_l2=1e-2, domain_lr_mult=1.0,
                 random_state=0):
        self.hidden = hidden
        self.lambda_max = lambda_max
        self.domain_refit = domain_refit
        self.ramp_epochs = ramp_epochs
        self.min_epochs = min_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.max_drops = max_drops
        self.val_fraction = val_fraction
        self.domain_step_iters = domain_step_iters
        self.domain_refit_iters = domain_refit_iters
        self.domain_l2 = domain_l2
        self.domain_lr_mult = domain_lr_mult
        self.random_state = random_state

    def _nets(self, d, n_classes, n_domains):
        import torch.nn as nn

        h1, h2 = self.hidden
        fe = nn.Sequential(nn.Linear(d, h1), nn.BatchNorm1d(h1), nn.ReLU(), nn.Dropout(self.dropout),
                           nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.ReLU())
        return fe, nn.Linear(h2, n_classes), nn.Linear(h2, max(n_domains, 1))

    def _lambda(self, step, steps_per_epoch):
        p = min(1.0, step / (self.ramp_epochs * steps_per_epoch))
        return self.lambda_max * (2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, domains=None):
        if self.max_epochs <= self.min_epochs:
            raise ValueError(f"max_epochs ({self.max_epochs}) must exceed min_epochs ({self.min_epochs}), "
                             "the warm-up before any checkpoint is kept")
        if len(self.hidden) != 2:
            raise ValueError(f"hidden must give two layer widths, got {self.hidden!r}")
        import torch
        import torch.nn.functional as F

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
        tr, va = self._split(yi, dom)
        Xt, yt, dt = (torch.from_numpy(Xs[tr]), torch.from_numpy(yi[tr]).long(), torch.from_numpy(dom[tr]).long())
        Xv, yv = torch.from_numpy(Xs[va]), torch.from_numpy(yi[va]).long()
        fe, ch, dh = self._nets(X.shape[1], len(self.classes_), self.n_domains_)
        joint = self.domain_refit == "joint"
        groups = [dict(params=list(fe.parameters()) + list(ch.parameters()), lr_mult=1.0)]
        if joint:
            groups.append(dict(params=list(dh.parameters()), lr_mult=self.domain_lr_mult))
        for g in groups:
            g["lr"] = self.lr * g["lr_mult"]
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, amsgrad=True)
        lbfgs: dict = {}  # the domain head's optimisers (_refit_domain_head)
        if adversarial and self.domain_refit == "epoch":
            fe.eval()
            self._refit_domain_head(dh, _features(fe, Xt), dt, self.domain_refit_iters, lbfgs)
        bs = max(2, min(self.batch_size, len(tr)))
        steps_per_epoch = max(1, sum(len(tr) - s >= 2 for s in range(0, len(tr), bs)))  # BatchNorm needs two rows
        best, best_state, best_epoch, stall, drops, lr, step = np.inf, None, -1, 0, 0, self.lr, 0
        self.lambdas_, self.val_loss_, self.domain_loss_ = [], [], []
        self.stop_reason_ = "max_epochs"
        lam = 0.0
        for epoch in range(self.max_epochs):
            fe.train(), ch.train(), dh.train()
            perm = torch.randperm(len(tr), generator=gen)
            dsum, dn = 0.0, 0
            for start in range(0, len(tr), bs):
                b = perm[start:start + bs]
                if len(b) < 2:
                    continue
                lam = self._lambda(step, steps_per_epoch) if adversarial else 0.0
                z = fe(Xt[b])
                loss = F.cross_entropy(ch(z), yt[b])
                if adversarial and self.domain_refit == "step":  # fe meets the best head for this batch
                    self._refit_domain_head(dh, z.detach(), dt[b], self.domain_step_iters, lbfgs)
                if adversarial:
                    dloss = F.cross_entropy(dh(_grad_reverse().apply(z, lam)), dt[b])
                    loss = loss + dloss
                    dsum, dn = dsum + dloss.item() * len(b), dn + len(b)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
            fe.eval(), ch.eval(), dh.eval()
            if adversarial and self.domain_refit == "epoch":
                self._refit_domain_head(dh, _features(fe, Xt), dt, self.domain_refit_iters, lbfgs)
            with torch.no_grad():
                vloss = float(F.cross_entropy(ch(fe(Xv)), yv))
            self.lambdas_.append(float(lam))
            self.val_loss_.append(vloss)
            self.domain_loss_.append(dsum / dn if dn else float("nan"))
            if epoch < self.min_epochs:  # warm-up
                continue
            if vloss < best - 1e-4:
                best, best_epoch, stall = vloss, epoch, 0
                best_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in (fe, ch, dh)]
            else:
                stall += 1
                if stall >= self.patience:
                    drops += 1
                    if drops >= self.max_drops:
                        self.stop_reason_ = "lr drops"
                        break
                    lr /= 10
                    for g in opt.param_groups:
                        g["lr"] = lr * g["lr_mult"]
                    stall = 0
        for m, s in zip((fe, ch, dh), best_state):
            m.load_state_dict(s)
        # inference in float64: float32 rounding would make outputs depend on the batch they come in
        fe, ch, dh = fe.double().eval(), ch.double().eval(), dh.double().eval()
        self.fe_, self.class_head_, self.domain_head_ = fe, ch, dh
        self.best_epoch_ = best_epoch
        self.n_epochs_ = len(self.val_loss_)
        self.n_features_out_ = self.hidden[-1]
        return self

    def _split(self, yi, dom):
        """Validation rows, stratified by class and source where every stratum can spare one."""
        return inner_split(yi, dom, len(self.classes_), self.n_domains_, self.val_fraction, self.random_state)

    def _refit_domain_head(self, dh, z, dt, iters, cache: dict):
        """L-BFGS on the (frozen) representation z, warm-started from the current head. One optimiser
        per fit and iteration count, its state emptied before each refit: that is what a new one holds,
        without building one on every minibatch (about 4 % of a fit; identical predictions)."""
        import torch
        import torch.nn.functional as F

        opt = cache.get(iters)
        if opt is None:
            opt = cache[iters] = torch.optim.LBFGS(dh.parameters(), max_iter=iters, line_search_fn="strong_wolfe")
        opt.state.clear()

        def closure():
            # L2 keeps the logits finite: an unpenalised head separates the sources perfectly, its
            # loss goes to 0 and no reversed gradient would reach fe
            opt.zero_grad()
            loss = F.cross_entropy(dh(z), dt) + self.domain_l2 * dh.weight.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)

    def _z(self, X):
        import torch

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        with torch.no_grad():
            return self.fe_(torch.from_numpy(self.scaler_.transform(X)))

    @property
    def fit_info_(self) -> dict:
        """What result rows record about the fit (results.fit_info): kept and run epochs, why it stopped,
        the reversal strength reached at the kept epoch."""
        check_is_fitted(self)
        lam = self.lambdas_[self.best_epoch_] if len(getattr(self, "lambdas_", [])) > self.best_epoch_ else None
        return dict(best_epoch=int(self.best_epoch_), n_epochs=int(self.n_epochs_), stop_reason=self.stop_reason_,
                    lambda_max=float(self.lambda_max), lambda_at_best=None if lam is None else float(lam),
                    domain_refit=self.domain_refit)

    def transform(self, X):
        return self._z(X).numpy().astype(np.float64)

    def predict_proba(self, X):
        import torch

        z = self._z(X)
        with torch.no_grad():
            return torch.softmax(self.class_head_(z), dim=1).numpy().astype(np.float64)

    def decision_function(self, X):
        import torch

        z = self._z(X)
        with torch.no_grad():
            logits = self.class_head_(z).numpy().astype(np.float64)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict(self, X):
        P = self.predict_proba(X)  # raises NotFittedError before classes_ is touched
        return self.classes_[np.argmax(P, axis=1)]


class ZeroShotHead(ClassifierMixin, BaseEstimator):
    """Zero-shot: no training. Each image embedding is compared (cosine) with the text embeddings of the
    class prompts, made by the same model's text tower (featstore.zeroshot); logits = logit_scale x cosine,
    softmax over the prompt groups, and a class's probability is the sum over its groups (binary: several
    label values may make up the negative class). `fit` learns nothing from X, y or the sources: it only
    checks that the embeddings live in the text embeddings' space and fixes `classes_` to the study's
    class order (0..K-1), whatever classes the training data happen to hold.

    text_embeddings [M, D], key_class [M] (class index of each group), logit_scale, text_identity (a
    digest, for the records) come from zeroshot.class_texts; prompts (group -> texts) is recorded.
    """

    def __init__(self, text_embeddings=None, key_class=None, logit_scale=100.0, n_classes=None, prompts=None,
                 text_identity=None, random_state=0):
        self.text_embeddings = text_embeddings
        self.key_class = key_class
        self.logit_scale = logit_scale
        self.n_classes = n_classes
        self.prompts = prompts
        self.text_identity = text_identity
        self.random_state = random_state  # unused: nothing random happens

    def fit(self, X, y, domains=None):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        if self.text_embeddings is None or self.key_class is None:
            raise ValueError("the zero-shot head needs the class text embeddings (featstore.zeroshot.class_texts)")
        T = np.asarray(self.text_embeddings, dtype=np.float64)
        if T.ndim != 2 or T.shape[1] != X.shape[1]:
            raise ValueError(f"the image embeddings are {X.shape[1]}-d, the text embeddings {T.shape[1:]}-d: "
                             f"not one joint image-text space")
        kc = np.asarray(self.key_class, dtype=np.int64)
        k = int(self.n_classes or kc.max() + 1)
        if len(kc) != len(T) or kc.min() < 0 or kc.max() >= k or len(np.unique(kc)) != k:
            raise ValueError(f"key_class must give each of the {len(T)} prompt groups one of {k} classes, every "
                             f"class at least one group")
        if np.min(y) < 0 or np.max(y) >= k or not np.issubdtype(np.asarray(y).dtype, np.integer):
            raise ValueError(f"labels must be class indices 0..{k - 1} (the study's class order)")
        self.T_ = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
        self.key_class_ = kc
        self.classes_ = np.arange(k)
        return self

    def _class_logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        z = float(self.logit_scale) * Xn @ self.T_.T  # [n, M]
        from scipy.special import logsumexp

        return np.stack([logsumexp(z[:, self.key_class_ == c], axis=1) for c in self.classes_], axis=1)

    @property
    def fit_info_(self) -> dict:
        """What result rows record: which text embeddings scored, how many prompt groups, the scale."""
        check_is_fitted(self)
        return dict(zero_shot=True, text_identity=self.text_identity, prompt_groups=int(len(self.T_)),
                    logit_scale=float(self.logit_scale))

    def predict_proba(self, X):
        L = self._class_logits(X)
        from scipy.special import softmax

        return softmax(L, axis=1)

    def decision_function(self, X):
        L = self._class_logits(X)
        if L.shape[1] == 2:
            return L[:, 1] - L[:, 0]  # log-odds of the positive class
        from scipy.special import log_softmax

        return log_softmax(L, axis=1)

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def inner_split(yi, dom, n_classes, n_domains, val_fraction, seed):
    """(fit rows, validation rows) of a training set: yi and dom are label-encoded classes and sources;
    stratified by class and source where every stratum can spare one, else by class."""
    idx = np.arange(len(yi))
    n_val = int(np.ceil(val_fraction * len(yi)))
    if len(yi) < 20 or n_val < n_classes or np.min(np.bincount(yi)) < 2:
        return idx, idx  # too small to hold anything out: watch the training loss
    both = yi * n_domains + dom
    counts = np.bincount(both)
    strata = both if counts[counts > 0].min() >= 2 and n_val >= np.count_nonzero(counts) else yi
    return train_test_split(idx, test_size=n_val, stratify=strata, random_state=seed)


def _features(fe, X):
    import torch

    with torch.no_grad():
        return fe(X)


@cache
def _grad_reverse():
    """The gradient-reversal layer, made on first use: torch loads only where a head needs it."""
    import torch

    class _GradReverse(torch.autograd.Function):
        """Identity forward; gradient times -lambda backward."""

        @staticmethod
        def forward(ctx, x, lam):
            ctx.lam = lam
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return -ctx.lam * g, None

    return _GradReverse


# --- registry: one entry per head, with its Optuna search space -----------------------------

def _space_logreg(trial) -> dict:
    return dict(C=trial.suggest_float("C", 1e-4, 1.0, log=True),
                l1_ratio=trial.suggest_categorical("l1_ratio", [0.0, 1.0]),
                class_weight=trial.suggest_categorical("class_weight", [None, "balanced"]))


def _space_grl(trial) -> dict:
    # log-uniform over weak to strong reversal (DANN's own runs use lambda_max = 1)
    return dict(lambda_max=trial.suggest_float("lambda_max", 0.01, 10.0, log=True),
                lr=trial.suggest_float("lr", 3e-4, 3e-3, log=True),
                weight_decay=trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True),
                dropout=trial.suggest_float("dropout", 0.0, 0.5))


def _space_lgbm(trial) -> dict:
    return dict(n_estimators=trial.suggest_int("n_estimators", 50, 400, log=True),
                learning_rate=trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
                num_leaves=trial.suggest_int("num_leaves", 4, 63, log=True),
                min_child_samples=trial.suggest_int("min_child_samples", 5, 50, log=True),
                colsample_bytree=trial.suggest_float("colsample_bytree", 0.1, 1.0))


def _space_none(trial) -> dict:
    return {}


@dataclass(frozen=True)
class HeadSpec:
    name: str
    cls: type
    space: Callable
    description: str
    searched: bool = True    # False: no hyperparameters, one trial per fold (nothing to search)
    prepare: Callable | None = None  # X_fit -> fit kwargs that depend on the rows only, computed once per split
    # hyperparameters the search's trials use in place of the head's defaults (a study's fixed ones still win);
    # the refit of the selected trial, whose predictions are scored, does not use them
    search_defaults: dict = field(default_factory=dict)
    needs_inputs: bool = False  # built with inputs beyond hyperparameters (the zero-shot head's text side)
    # may fit with torch: sweep.fit.single_threaded then loads it to hold its threads at one; heads known not to
    # say False, so a study of them never imports torch (about 2 CPU s per sweep process and worker)
    torch: bool = True


HEADS: Registry[HeadSpec] = Registry("head")


def register_head(spec: HeadSpec) -> HeadSpec:
    return HEADS.register(spec.name, spec)


register_head(HeadSpec("logreg", LogisticHead, _space_logreg, "standardised logistic regression (L1/L2)",
                       prepare=lambda X: dict(scaler=StandardScaler().fit(X)), torch=False))
# trials stop at the first validation plateau instead of dropping the LR up to 3 times: ~40% fewer epochs
# on the real set, and the same kept weights whenever the best epoch precedes the first drop (7 of 8
# fits sampled there); the refit keeps the full schedule
register_head(HeadSpec("grl_mlp", GRLHead, _space_grl, "gradient-reversal MLP (DANN schedule), Trivedi et al. "
                       "2022 network", search_defaults=dict(max_drops=1)))
register_head(HeadSpec("lightgbm", LightGBMHead, _space_lgbm, "LightGBM gradient-boosted trees", torch=False))
register_head(HeadSpec("zeroshot", ZeroShotHead, _space_none, "zero-shot: class prompts through the embedding set's own "
                       "text tower (CLIP family, SigLIP); no training, one trial", searched=False, needs_inputs=True,
                       torch=False))


# shortcut-robust heads (featstore/robust.py): groups are (training source, label)
from featstore.robust import (DFRHead, GroupDROHead, ReweightHead, space_dfr, space_groupdro,  # noqa: E402
                              space_reweight)

register_head(HeadSpec("dfr", DFRHead, space_dfr, "Deep Feature Reweighting: logistic last layer re-fitted on "
                       "group-balanced (source x label) subsets of held-out training images", torch=False))
register_head(HeadSpec("groupdro", GroupDROHead, space_groupdro, "GroupDRO: worst-group (source x label) loss, "
                       "strong L2, linear head"))
register_head(HeadSpec("reweight", ReweightHead, space_reweight, "logistic regression weighted by inverse "
                       "group (source x label) frequency", torch=False))


def create_head(name: str, **params) -> BaseEstimator:
    return HEADS.get(name).cls(**params)
