import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from featstore.score import auc_ci, binary_metrics, gap_test, mcnemar_p, multiclass_metrics, ovr_auc_resampled


def test_binary_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([.9, .8, .3, .2, .6, .1, .4, .7])
    m = binary_metrics(y, p, n_boot=0)
    # calls at 0.5: tp=3 (0.9 .8 .7) fn=1 (.3) fp=1 (.6) tn=3
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["sensitivity"] == m["specificity"] == m["ppv"] == m["npv"] == 0.75
    assert m["dor"] == pytest.approx((3.5 * 3.5) / (1.5 * 1.5))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_auc_ci_covers_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = y * 0.4 + rng.random(400) * 0.8
    a = auc_ci(y, p, n_boot=300, seed=1)
    assert a[1] < a[0] < a[2] and a[3] > 0
    assert a == auc_ci(y, p, n_boot=300, seed=1)


def test_one_class_gives_undefined_auc_not_a_number():
    m = binary_metrics(np.zeros(30, int), np.linspace(0, 1, 30), n_boot=100)
    assert m["auc"] is None and m["sensitivity"] is None and m["balanced_accuracy"] is None
    assert m["specificity"] == pytest.approx(15 / 30)
    # AUC ranks on the score when given: saturated probabilities would tie
    y = np.array([0, 0, 1, 1])
    assert binary_metrics(y, np.ones(4), n_boot=0)["auc"] == 0.5
    assert binary_metrics(y, np.ones(4), n_boot=0, score=np.array([40., 41, 42, 43]))["auc"] == 1.0


def test_multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    P = rng.dirichlet([1, 1, 1], 300)
    P[np.arange(300), y] += 1
    P /= P.sum(1, keepdims=True)
    m = multiclass_metrics(y, P, 3, n_boot=50)
    assert m["auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr"))
    assert m["auc_lo"] <= m["auc"] <= m["auc_hi"]
    assert 0 < m["mean_class_accuracy"] <= 1 and m["n_0"] + m["n_1"] + m["n_2"] == 300


@pytest.mark.parametrize("K", [2, 3, 6])
def test_resampled_ovr_auc_is_roc_auc_score_on_each_resample(K):
    # the bootstraps of multiclass_metrics and the domain probe score resamples by pair counts: each must be
    # what roc_auc_score gives on that resample (ties, repeated images, a resample that lacks a class -> NaN)
    rng = np.random.default_rng(K)
    n = 60
    y = rng.integers(0, K, n)
    P = np.round(rng.dirichlet(np.ones(K), n), 1)  # coarse scores: many ties
    P /= P.sum(1, keepdims=True)
    idx = rng.integers(0, n, (80, n))
    idx[0] = np.flatnonzero(y != 0)[rng.integers(0, (y != 0).sum(), n)]  # no image of class 0
    got = ovr_auc_resampled(y, P, idx, list(range(K)))
    assert np.isnan(got[0])
    for b in range(1, len(idx)):
        yi, Pi = y[idx[b]], P[idx[b]]
        if len(np.unique(yi)) < K:
            assert np.isnan(got[b])
            continue
        want = roc_auc_score(yi, Pi[:, 1]) if K == 2 else \
            roc_auc_score(yi, Pi, multi_class="ovr", average="macro", labels=list(range(K)))
        assert got[b] == pytest.approx(want, abs=1e-12)
    # done a few resamples at a time (bounded memory), the same numbers
    np.testing.assert_array_equal(ovr_auc_resampled(y, P, idx, list(range(K)), chunk=3 * n), got)


def test_gap_and_mcnemar():
    g = gap_test(dict(auc=0.95, auc_se=0.01), dict(auc=0.6, auc_se=0.03))
    assert g["gap"] == pytest.approx(0.35) and g["gap_p"] < 1e-6
    assert gap_test(dict(auc=0.9, auc_se=0.1), dict(auc=None))["gap"] is None
    y = np.array([1] * 50 + [0] * 50)
    assert mcnemar_p(y, y, y) == 1.0
    assert mcnemar_p(y, y, 1 - y) < 1e-6


# --- uncertainty at the level of sources, paired tests, selection repeats -------------------------
import math

from scipy import stats

from featstore.score import (bootstrap_p, cluster_bootstrap, cluster_bootstrap_gap, delong, delong_cov,
                             format_p, paired_bootstrap_auc_diff, summarise_over_seeds)


def _sources(rng, deltas, n=(150, 400), prev=(0.1, 0.85), name="s"):
    """Binormal sources: negatives N(0,1), positives N(delta,1), so a source's true AUC is Phi(delta/sqrt 2)."""
    ys, ss, gs = [], [], []
    for k, d in enumerate(deltas):
        nk = int(rng.integers(*n))
        m = int(np.clip(rng.binomial(nk, rng.uniform(*prev)), 3, nk - 3))
        ys.append(np.r_[np.ones(m, int), np.zeros(nk - m, int)])
        ss.append(np.r_[rng.normal(d, 1, m), rng.normal(0, 1, nk - m)])
        gs += [f"{name}{k}"] * nk
    return np.concatenate(ys), np.concatenate(ss), np.array(gs)


def test_format_p():
    assert format_p(9.1e-215) == "< 1e-6" and format_p(0.0) == "< 1e-6"
    assert format_p(1e-6) == "1.0e-6" and format_p(3.44e-5) == "3.4e-5"
    assert format_p(0.01234) == "0.012" and format_p(0.5) == "0.50" and format_p(1.0) == "1.0"
    assert format_p(0.04, floor=0.05) == "< 5e-2"
    assert format_p(None) == format_p(float("nan")) == "n/a"
    # a bootstrap p at its resolution floor 2/(B+1) reads "< 2/B", never a smaller number
    assert format_p(2 / 2001, n_boot=2000) == "< 0.001"
    assert format_p(2 / 101, n_boot=100) == "< 0.02"
    assert format_p(0.3, n_boot=2000) == "0.30"


def test_bootstrap_p_is_never_zero():
    assert bootstrap_p(np.linspace(1, 2, 999)) == pytest.approx(2 / 1000)
    assert bootstrap_p(-np.linspace(1, 2, 999)) == pytest.approx(2 / 1000)
    assert bootstrap_p(np.r_[-np.ones(500), np.ones(500)]) == 1.0
    r = np.random.default_rng(0).normal(1.0, 1.0, 4000)  # P(N(1,1) <= 0) = 0.159
    assert bootstrap_p(r) == pytest.approx(2 * stats.norm.cdf(-1), abs=0.03)


def test_cluster_bootstrap_estimate_is_the_mean_of_per_source_aucs():
    rng = np.random.default_rng(1)
    y, s, g = _sources(rng, [0.2, 1.0, 2.0, 0.6])
    s = np.round(s, 1)  # ties, counted one half as in roc_auc_score
    y = np.r_[y, np.zeros(50, int)]  # a one-class source: excluded and named, not averaged in
    s, g = np.r_[s, rng.normal(0, 1, 50)], np.r_[g, ["neg_only"] * 50]
    r = cluster_bootstrap(y, s, g, n_boot=200, seed=0)
    per = {k: roc_auc_score(y[g == k], s[g == k]) for k in ["s0", "s1", "s2", "s3"]}
    assert r["per_source"] == pytest.approx(per)
    assert r["estimate"] == pytest.approx(np.mean(list(per.values())))
    assert r["excluded"] == ["neg_only"] and r["n_sources"] == 4 and r["sources"] == ["s0", "s1", "s2", "s3"]
    assert r["uncertainty"] == "source-level" and r["ci"] == "t" and r["df"] == 3
    assert r["lo"] < r["estimate"] < r["hi"]
    w = min(per, key=per.get)
    assert r["worst"]["source"] == w and r["worst"]["auc"] == pytest.approx(per[w])
    assert r["worst"]["lo"] < r["worst"]["auc"] < r["worst"]["hi"] and r["worst"]["uncertainty"] == "image-level"
    assert r["note"].startswith("only 4 held-out sources")
    # a source scored under two folds' models (unit) averages its folds, then weighs like any other source
    u = np.where(np.arange(len(y)) % 2 == 0, "f1", "f2")
    ru = cluster_bootstrap(y, s, g, unit=u, n_boot=50, seed=0)
    m0 = (g == "s0")
    want = np.mean([roc_auc_score(y[m0 & (u == f)], s[m0 & (u == f)]) for f in ("f1", "f2")])
    assert ru["per_source"]["s0"] == pytest.approx(want) and ru["n_sources"] == 4


def test_same_seed_same_numbers():
    rng = np.random.default_rng(2)
    y, s, g = _sources(rng, [0.5, 1.0, 1.5])
    a = cluster_bootstrap(y, s, g, n_boot=300, seed=7, return_replicates=True)
    b = cluster_bootstrap(y, s, g, n_boot=300, seed=7, return_replicates=True)
    assert np.array_equal(a.pop("replicates"), b.pop("replicates")) and a == b
    c = cluster_bootstrap(y, s, g, n_boot=300, seed=8, ci="percentile")
    assert c["lo"] != cluster_bootstrap(y, s, g, n_boot=300, seed=7, ci="percentile")["lo"]
    y2, s2, g2 = _sources(rng, [0.0, 0.3], name="u")
    assert cluster_bootstrap_gap(y, s, g, y2, s2, g2, n_boot=200, seed=3) == \
        cluster_bootstrap_gap(y, s, g, y2, s2, g2, n_boot=200, seed=3)
    s3 = s + rng.normal(0, 1, len(s))
    assert paired_bootstrap_auc_diff(y, s, s3, g, n_boot=200, seed=3) == \
        paired_bootstrap_auc_diff(y, s, s3, g, n_boot=200, seed=3)


def test_stratified_resample_known_distribution():
    # 2 positives (0.9 above, 0.2 below the one negative): a resample draws {0.9,0.9}, {0.9,0.2} or {0.2,0.2},
    # AUC 1, 0.5, 0 with probabilities 1/4, 1/2, 1/4; the negative is always kept (stratified)
    y, s = np.array([1, 1, 0]), np.array([0.9, 0.2, 0.5])
    r = cluster_bootstrap(y, s, np.zeros(3), n_boot=4000, seed=0, resample_sources=False, return_replicates=True)
    vals, counts = np.unique(r["replicates"], return_counts=True)
    assert list(vals) == [0.0, 0.5, 1.0]
    assert counts / 4000 == pytest.approx([0.25, 0.5, 0.25], abs=0.025)


def test_image_level_bootstrap_agrees_with_scipy_and_delong():
    rng = np.random.default_rng(3)
    y, s, _ = _sources(rng, [1.0], n=(900, 901))
    r = cluster_bootstrap(y, s, np.zeros(len(y)), n_boot=2000, seed=0, resample_sources=False)
    auc, lo, hi, se = auc_ci(y, s, n_boot=2000, seed=0)  # SciPy's stratified bootstrap
    _, cov = delong_cov(y, s)
    assert r["estimate"] == pytest.approx(auc) and r["uncertainty"] == "image-level"
    assert r["se"] == pytest.approx(se, rel=0.1) and r["se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=0.1)
    assert r["lo"] == pytest.approx(lo, abs=0.01) and r["hi"] == pytest.approx(hi, abs=0.01)


def test_identical_sources_collapse_to_the_image_level_interval():
    rng = np.random.default_rng(4)
    y1, s1, _ = _sources(rng, [1.0], n=(120, 121))
    for K in (4, 40):
        y, s, g = np.tile(y1, K), np.tile(s1, K), np.repeat(np.arange(K), len(y1))
        src = cluster_bootstrap(y, s, g, n_boot=1000, seed=1)
        img = cluster_bootstrap(y, s, g, n_boot=1000, seed=1, resample_sources=False)
        # copies: resampling sources changes nothing, so both spreads are the image-level one ...
        assert src["se_boot"] == pytest.approx(img["se"], rel=0.1)
        assert src["se"] == pytest.approx(img["se"], rel=0.1)  # the t interval's SE is floored there
        # ... and the quantile stays t with the sources' df (no silent switch to a normal one)
        ratio = (src["hi"] - src["lo"]) / (img["hi"] - img["lo"])
        t_over_z = stats.t.ppf(0.975, K - 1) / stats.norm.ppf(0.975)
        assert ratio == pytest.approx(t_over_z, rel=0.15) and src["df"] == pytest.approx(K - 1), (K, ratio)
    # sources that differ by a little more than their image noise: source-level spread, t with K-1 df
    y, s, g = _sources(rng, [0.6, 1.0, 1.4, 1.8], n=(300, 301))
    src, img = cluster_bootstrap(y, s, g, n_boot=500, seed=1), cluster_bootstrap(y, s, g, n_boot=500, seed=1, ci="t",
                                                                                  resample_sources=False)
    assert src["df"] == 3 and src["se"] > 2 * img["se"]


def test_between_source_variance_widens_the_interval():
    rng = np.random.default_rng(5)
    # planted: true per-source AUCs from 0.55 to 0.96, far more spread than each source's image noise
    y, s, g = _sources(rng, [0.18, 0.8, 1.4, 2.0, 2.5], n=(400, 600))
    src = cluster_bootstrap(y, s, g, n_boot=500, seed=0)
    img = cluster_bootstrap(y, s, g, n_boot=500, seed=0, resample_sources=False)
    assert src["estimate"] == img["estimate"]
    assert (src["hi"] - src["lo"]) > 4 * (img["hi"] - img["lo"])
    pct = cluster_bootstrap(y, s, g, n_boot=500, seed=0, ci="percentile")
    assert (pct["hi"] - pct["lo"]) > 3 * (img["hi"] - img["lo"])


def _truth(mu, tau):
    # mean over sources of Phi(delta/sqrt2), delta ~ N(mu, tau^2)
    return stats.norm.cdf(mu / math.sqrt(2 + tau ** 2))


@pytest.mark.slow
def test_source_level_interval_covers_the_mean_over_sources():
    """200 studies of 6 sources whose true AUCs vary (delta ~ N(1, 0.5^2)): the 95% source-level interval
    covers the mean over the population of sources ~95% of the time; the image-level one does not."""
    rng = np.random.default_rng(6)
    truth, n = _truth(1.0, 0.5), 200
    cover_src = cover_img = 0
    for i in range(n):
        y, s, g = _sources(rng, rng.normal(1.0, 0.5, 6), n=(60, 200))
        r = cluster_bootstrap(y, s, g, n_boot=40, seed=i)
        cover_src += r["lo"] <= truth <= r["hi"]
        ri = cluster_bootstrap(y, s, g, n_boot=40, seed=i, resample_sources=False, ci="t")
        cover_img += ri["lo"] <= truth <= ri["hi"]
    assert 0.88 <= cover_src / n <= 0.99, cover_src / n
    assert cover_img / n < 0.75, cover_img / n


def test_gap_interval_covers_and_pairs_shared_sources():
    rng = np.random.default_rng(7)
    # seen sources: +0.5 on the binormal scale; unseen sources independent
    tau, n = 0.5, 120
    true_gap = _truth(1.5, tau) - _truth(1.0, tau)
    cover = 0
    for i in range(n):
        ys, ss, gs = _sources(rng, rng.normal(1.5, tau, 5), n=(60, 200), name="seen")
        yu, su, gu = _sources(rng, rng.normal(1.0, tau, 5), n=(60, 200), name="unseen")
        r = cluster_bootstrap_gap(ys, ss, gs, yu, su, gu, n_boot=40, seed=i)
        cover += r["lo"] <= true_gap <= r["hi"]
    assert 0.88 <= cover / n <= 0.99 and r["n_shared"] == 0 and r["uncertainty"] == "source-level"
    # the same sources seen and unseen (LOSO over folds): paired, so the source effect cancels
    d = np.array([0.2, 0.8, 1.4, 2.0, 2.6])
    y, s, g = _sources(rng, d)  # unseen
    y2, s2, g2 = _sources(rng, d + 0.6)  # seen: the same five sources, each easier by 0.6
    paired = cluster_bootstrap_gap(y2, s2, g2, y, s, g, n_boot=300, seed=0)
    g_apart = np.char.add("other_", g2.astype(str))
    apart = cluster_bootstrap_gap(y2, s2, g_apart, y, s, g, n_boot=300, seed=0)
    assert paired["n_shared"] == 5 and apart["n_shared"] == 0
    assert paired["estimate"] == pytest.approx(apart["estimate"]) and paired["estimate"] > 0
    assert paired["se"] < apart["se"] / 2 and paired["lo"] > 0 and apart["lo"] < 0


def test_image_level_gap_p_is_overconfident_where_sources_vary():
    """Seen and unseen sources drawn alike, differing only by which sources they are.
    The image-level z-test calls the gap certain; the source-level one does not."""
    rng = np.random.default_rng(12)
    ys, ss, gs = _sources(rng, [0.9, 2.2, 1.6], n=(500, 800), name="seen")
    yu, su, gu = _sources(rng, [0.4, 1.9, 1.2], n=(500, 800), name="unseen")
    a, b = auc_ci(ys, ss, n_boot=300, seed=0), auc_ci(yu, su, n_boot=300, seed=0)
    assert gap_test(dict(auc=a[0], auc_se=a[3]), dict(auc=b[0], auc_se=b[3]))["gap_p"] < 1e-6
    r = cluster_bootstrap_gap(ys, ss, gs, yu, su, gu, n_boot=300, seed=0)
    assert r["p"] > 0.2 and r["lo"] < 0 < r["hi"] and r["uncertainty"] == "source-level"


def test_gap_with_one_unseen_source_says_so_and_percentile_p_has_its_floor():
    rng = np.random.default_rng(8)
    ys, ss, gs = _sources(rng, [2.5, 2.6, 2.7, 2.8], name="seen")
    yu, su, gu = _sources(rng, [0.0], name="unseen")
    r = cluster_bootstrap_gap(ys, ss, gs, yu, su, gu, n_boot=500, seed=0)
    assert r["n_unseen"] == 1 and "one unseen source" in r["note"] and r["estimate"] > 0.3
    rp = cluster_bootstrap_gap(ys, ss, gs, yu, su, gu, n_boot=500, seed=0, ci="percentile")
    assert rp["p"] == pytest.approx(2 / 501) and rp["p_text"] == "< 0.004"
    # no seen source with both classes: undefined, not a number
    none = cluster_bootstrap_gap(np.ones(10, int), np.zeros(10), np.zeros(10), yu, su, gu, n_boot=50)
    assert none["estimate"] is None and none["p_text"] == "n/a" and "no seen source" in none["note"]


def _delong_reference(y, scores):
    """DeLong, DeLong & Clarke-Pearson (1988) straight from the definition, O(m n) per model."""
    X, Y = scores[:, y == 1], scores[:, y == 0]
    m, n = X.shape[1], Y.shape[1]
    psi = (X[:, :, None] > Y[:, None, :]) + 0.5 * (X[:, :, None] == Y[:, None, :])  # (k, m, n)
    v10, v01 = psi.mean(2), psi.mean(1)
    k = len(scores)
    S10 = np.array([[np.sum((v10[a] - v10[a].mean()) * (v10[b] - v10[b].mean())) / (m - 1) for b in range(k)]
                    for a in range(k)])
    S01 = np.array([[np.sum((v01[a] - v01[a].mean()) * (v01[b] - v01[b].mean())) / (n - 1) for b in range(k)]
                    for a in range(k)])
    return psi.mean((1, 2)), S10 / m + S01 / n


def test_delong_matches_the_quadratic_definition():
    rng = np.random.default_rng(9)
    for n, k in ((30, 2), (57, 3), (200, 2)):
        y = rng.integers(0, 2, n)
        y[:2], y[2:4] = 1, 0
        S = np.round(np.stack([y + rng.normal(0, 1, n) * (j + 1) for j in range(k)]), 1)  # ties included
        aucs, cov = delong_cov(y, S)
        ref_auc, ref_cov = _delong_reference(y, S)
        assert aucs == pytest.approx(ref_auc) and aucs == pytest.approx([roc_auc_score(y, x) for x in S])
        assert np.allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)


def test_delong_exact_on_a_hand_example():
    # positives (0.9, 0.6), negatives (0.3, 0.7): psi = [[1, 1], [1, 0]], AUC 3/4,
    # V10 = (1, 1/2), V01 = (1, 1/2), var = var(V10)/2 + var(V01)/2 = 1/8/2 + 1/8/2 = 1/8
    y = np.array([1, 1, 0, 0])
    a = np.array([0.9, 0.6, 0.3, 0.7])
    # model b: positives (0.4, 0.8), negatives (0.5, 0.1): V10 = (1/2, 1), V01 = (1/2, 1): cov(a, b) = -1/8
    b = np.array([0.4, 0.8, 0.5, 0.1])
    r = delong(y, a, b)
    assert (r["auc_a"], r["auc_b"]) == (0.75, 0.75)
    assert r["var_a"] == pytest.approx(1 / 8) and r["var_b"] == pytest.approx(1 / 8)
    assert r["cov"] == pytest.approx(-1 / 8) and r["se"] == pytest.approx(math.sqrt(1 / 2))
    assert r["z"] == 0 and r["p"] == 1.0 and r["uncertainty"] == "image-level"
    # a tie between a positive and a negative counts 1/2: positives (0.5, 0.9), negatives (0.5, 0.1):
    # psi = [[1/2, 1], [1, 1]], AUC 7/8, V10 = V01 = (3/4, 1), var = 1/32
    aucs, cov = delong_cov(y, np.array([0.5, 0.9, 0.5, 0.1]))
    assert aucs[0] == 7 / 8 and cov[0, 0] == pytest.approx(1 / 32)
    assert delong(np.array([1, 0, 0]), np.ones(3), np.ones(3))["p"] is None  # one positive: undefined


def test_delong_detects_a_better_model_and_agrees_with_the_paired_bootstrap():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 2, 1200)
    a = y * 1.2 + rng.normal(0, 1, 1200)
    b = a + rng.normal(0, 0.8, 1200)  # a plus noise: worse, strongly correlated
    d = delong(y, a, b)
    assert d["estimate"] > 0 and d["p"] < 1e-3 and d["lo"] > 0 and d["cov"] > 0
    pb = paired_bootstrap_auc_diff(y, a, b, n_boot=2000, seed=0)
    assert pb["uncertainty"] == "image-level" and pb["ci"] == "percentile"
    assert pb["estimate"] == pytest.approx(d["estimate"]) and pb["auc_a"] == pytest.approx(d["auc_a"])
    assert pb["se"] == pytest.approx(d["se"], rel=0.1)
    assert pb["p_text"] == "< 0.001"
    same = delong(y, a, a)
    assert same["estimate"] == 0 and same["p"] == 1.0


def test_paired_bootstrap_at_the_source_level():
    rng = np.random.default_rng(11)
    y, s, g = _sources(rng, [0.3, 1.0, 1.7, 2.4])
    noisy = s + rng.normal(0, 1.0, len(s))
    r = paired_bootstrap_auc_diff(y, s, noisy, g, n_boot=500, seed=0)
    per = [roc_auc_score(y[g == k], s[g == k]) - roc_auc_score(y[g == k], noisy[g == k]) for k in sorted(set(g))]
    assert r["estimate"] == pytest.approx(np.mean(per)) and r["estimate"] > 0
    assert r["uncertainty"] == "source-level" and r["n_sources"] == 4
    assert r["lo"] < r["estimate"] < r["hi"]
    same = paired_bootstrap_auc_diff(y, s, s, g, n_boot=200, seed=0)
    assert same["estimate"] == 0 and same["se"] == 0 and same["p"] == 1.0
    with pytest.raises(ValueError, match="alike"):
        paired_bootstrap_auc_diff(y, s, s[:-1], g)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="0/1"):
        cluster_bootstrap(np.array([0, 1, 2]), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        cluster_bootstrap(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]), np.zeros(3))
    with pytest.raises(ValueError, match="same length"):
        cluster_bootstrap(np.array([0, 1, 1]), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="ci must be"):
        cluster_bootstrap(np.array([0, 1, 1]), np.zeros(3), np.zeros(3), ci="bca")
    r = cluster_bootstrap(np.zeros(5, int), np.zeros(5), np.zeros(5))
    assert r["estimate"] is None and r["excluded"] == ["0.0"] and "no held-out source" in r["note"]


def test_summarise_over_seeds():
    r = summarise_over_seeds([0.55, 0.57, None, float("nan"), 0.56])
    assert r["mean"] == pytest.approx(0.56) and r["sd"] == pytest.approx(0.01) and r["n"] == 3
    assert r["n_missing"] == 2 and r["text"] == "0.560 ± 0.010 (n=3)" and r["uncertainty"] == "selection-level"
    assert summarise_over_seeds(np.array([0.5]))["sd"] is None
    assert summarise_over_seeds([])["mean"] is None


def test_holm_is_statsmodels_holm():
    # featstore.score.holm does Holm's step-down itself (statsmodels' branch runs gc.collect() per call):
    # the same numbers as multipletests, ties and p-values that adjust past 1 included; None skipped
    from statsmodels.stats.multitest import multipletests

    from featstore.score import holm

    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 40):
        p = np.round(rng.random(m) ** 3, 2)  # ties, zeros
        assert holm(p.tolist()) == multipletests(p, method="holm")[1].tolist()
        assert holm(p.tolist(), "fdr_bh") == multipletests(p, method="fdr_bh")[1].tolist()
    assert holm([0.01, None, float("nan"), 0.04]) == [0.02, None, None, 0.04]
