import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from featstore.heads import HEADS, GRLHead, create_head
from featstore.probe import domain_probe


# settings that keep the contract checks fast; every head of the registry is checked, except one built with
# inputs beyond hyperparameters (the zero-shot head's text side), which sklearn's random data cannot supply
_QUICK = {"lightgbm": dict(n_estimators=20), "grl_mlp": dict(max_epochs=15), "groupdro": dict(steps=50),
          "dfr": dict(n_subsets=3)}


@pytest.mark.slow
@parametrize_with_checks([HEADS[n].cls(**_QUICK.get(n, {})) for n in HEADS.where(lambda h: not h.needs_inputs)])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_fits_binary_and_3class(name):
    import optuna

    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 12))
    for k in (2, 3):
        y = rng.integers(0, k, 150)
        X2 = X + y[:, None] * 0.8
        params = HEADS[name].space(optuna.trial.FixedTrial(_fixed(name)))
        if name == "zeroshot":  # its "text" embeddings: one direction per class, the images near theirs
            X2 = 0.3 * X + np.eye(12)[y]
            params = dict(text_embeddings=np.eye(12)[:k], key_class=np.arange(k), n_classes=k, logit_scale=10.0)
        h = create_head(name, **params).fit(X2, y, domains=rng.integers(0, 3, 150))
        P = h.predict_proba(X2)
        assert P.shape == (150, k) and np.allclose(P.sum(1), 1)
        assert (h.predict(X2) == y).mean() > 0.6
        d = h.decision_function(X2)
        assert d.shape == ((150,) if k == 2 else (150, k))


def _fixed(name):
    return {"logreg": dict(C=1.0, l1_ratio=0.0, class_weight=None),
            "grl_mlp": dict(lambda_max=1.0, lr=1e-3, weight_decay=1e-2, dropout=0.1),
            "lightgbm": dict(n_estimators=50, learning_rate=0.1, num_leaves=7, min_child_samples=5,
                             colsample_bytree=0.8), "zeroshot": {},
            "dfr": dict(C=0.1, l1_ratio=1.0), "groupdro": dict(l2=0.01, eta=0.01, lr=0.01), "reweight": dict(C=0.1)}[name]


def test_lightgbm_early_stopping_stops_on_an_inner_split():
    """early_stopping_rounds: fewer trees than the cap when the inner validation loss stops improving, the
    kept count on record, the same model twice (seeded split); without it, the full count and no record."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8))
    y = (X[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)
    dom = rng.integers(0, 3, 400)
    full = create_head("lightgbm", n_estimators=300, learning_rate=0.3).fit(X, y, domains=dom)
    es = [create_head("lightgbm", n_estimators=300, learning_rate=0.3, early_stopping_rounds=10).fit(X, y, domains=dom)
          for _ in range(2)]
    assert full.fit_info_ == {} and full.model_.booster_.num_trees() == 300
    info = es[0].fit_info_
    assert info["early_stopping_rounds"] == 10 and 1 <= info["best_iteration"] < 290
    assert es[0].model_.booster_.num_trees() == info["best_iteration"]  # the trees after the best are dropped
    assert np.array_equal(es[0].decision_function(X), es[1].decision_function(X))
    assert not np.array_equal(es[0].decision_function(X), full.decision_function(X))


def test_lightgbm_max_bin_is_lightgbms_and_its_default_changes_nothing():
    """max_bin reaches LightGBM (fewer bins: other splits); the default is LightGBM's own 255, so a head
    without it gives the model it always gave."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    y = (X[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int)
    import lightgbm as lgb

    plain = lgb.LGBMClassifier(n_estimators=50, learning_rate=0.05, num_leaves=15, min_child_samples=20,
                               colsample_bytree=0.5, subsample=0.8, subsample_freq=1, reg_lambda=1.0, n_jobs=1,
                               random_state=0, deterministic=True, force_row_wise=True, verbose=-1).fit(X, y)
    head = create_head("lightgbm", n_estimators=50).fit(X, y)
    assert np.array_equal(head.predict_proba(X), plain.predict_proba(X))
    few = create_head("lightgbm", n_estimators=50, max_bin=7).fit(X, y)
    assert few.model_.get_params()["max_bin"] == 7
    assert not np.array_equal(few.predict_proba(X), head.predict_proba(X))


def test_unknown_head():
    with pytest.raises(ValueError, match="unknown head 'svm'; known: logreg, grl_mlp, lightgbm, zeroshot, dfr, groupdro, reweight"):
        create_head("svm")
    with pytest.raises(ValueError, match=r"unknown head 'logre' \(did you mean 'logreg'\?\)"):
        create_head("logre")


@pytest.mark.slow
def test_grl_representation_hides_the_source(synth_embeddings):
    """Paper 003: the GRL head's representation carries less source information than the raw
    embedding, and less than the same MLP trained without gradient reversal (lambda_max=0); the
    reversal ramps up from 0 (DANN), it does not start at its maximum. More in test_grl.py."""
    from sklearn.model_selection import train_test_split

    X, meta = synth_embeddings["confounded"]
    s = meta["source"].to_numpy()
    y = (meta["label"].to_numpy() == "covid").astype(int)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.5, stratify=s, random_state=0)
    raw = domain_probe(X[te], s[te], n_boot=0)["auc"]
    grl = GRLHead(lambda_max=1.0, max_epochs=100).fit(X[tr], y[tr], domains=s[tr])
    plain = GRLHead(lambda_max=0.0, max_epochs=100).fit(X[tr], y[tr], domains=s[tr])
    a_grl = domain_probe(grl.transform(X[te]), s[te], n_boot=0)["auc"]
    a_plain = domain_probe(plain.transform(X[te]), s[te], n_boot=0)["auc"]
    assert raw > 0.99
    assert a_grl < raw - 0.02 and a_grl < a_plain - 0.02, (raw, a_grl, a_plain)
    assert grl.lambdas_[0] < 0.5 < grl.lambdas_[grl.best_epoch_] and grl.best_epoch_ >= grl.min_epochs


def test_zeroshot_head_scores_against_text_without_learning():
    """Cosine x logit_scale, softmax over prompt groups, a class = the sum of its groups; nothing is learned
    from X, y or the sources: fitting on other data (or one class only) changes no prediction."""
    from scipy.special import softmax

    from featstore.heads import ZeroShotHead

    rng = np.random.default_rng(1)
    T = rng.normal(size=(3, 8))
    X = rng.normal(size=(40, 8))
    y = rng.integers(0, 2, 40)
    # binary: the positive (group 0) against two groups that together make up the negative class
    h = ZeroShotHead(text_embeddings=T, key_class=[1, 0, 0], logit_scale=20.0, n_classes=2).fit(X, y)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    z = 20.0 * (X / np.linalg.norm(X, axis=1, keepdims=True)) @ Tn.T
    p = softmax(z, axis=1)
    P = h.predict_proba(X)
    assert P.shape == (40, 2) and list(h.classes_) == [0, 1]
    np.testing.assert_allclose(P[:, 1], p[:, 0], rtol=1e-12)
    np.testing.assert_allclose(h.decision_function(X), np.log(p[:, 0]) - np.log(p[:, 1] + p[:, 2]), rtol=1e-9)
    other = ZeroShotHead(text_embeddings=T, key_class=[1, 0, 0], logit_scale=20.0, n_classes=2).fit(
        rng.normal(size=(10, 8)), np.zeros(10, int), domains=np.arange(10))
    np.testing.assert_array_equal(other.predict_proba(X), P)  # same classes_, same numbers
    # three classes, in the order of key_class whatever order the groups come in
    h3 = ZeroShotHead(text_embeddings=T, key_class=[2, 0, 1], logit_scale=20.0, n_classes=3).fit(X, y)
    np.testing.assert_allclose(h3.predict_proba(X), p[:, [1, 2, 0]], rtol=1e-12)
    assert h3.decision_function(X).shape == (40, 3) and h.fit_info_["prompt_groups"] == 3


@pytest.mark.parametrize("kw, message", [
    (dict(text_embeddings=np.ones((2, 5))), "not one joint image-text space"),
    (dict(text_embeddings=None), "needs the class text embeddings"),
    (dict(key_class=[1, 1]), "every class at least one group"),
])
def test_zeroshot_head_refuses_what_it_cannot_score(kw, message):
    from featstore.heads import ZeroShotHead

    params = dict(dict(text_embeddings=np.eye(8)[:2], key_class=[0, 1], n_classes=2), **kw)
    with pytest.raises(ValueError, match=message):
        ZeroShotHead(**params).fit(np.ones((4, 8)), np.array([0, 1, 0, 1]))
