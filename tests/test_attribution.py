"""Attribution inside the lungs, with known answers: the CAM is exact for a linear head and captum's Grad-CAM
and IntegratedGradients agree with it; on SYNTHETIC chests whose confounder is planted OUTSIDE the lungs the
in-lung share falls for the confounded source, and does not when the confounder is switched off; the lung mask
follows the input's crop; the trunk's pooled maps are the backbone's embedding; the command stores rows and
figures."""
import numpy as np
import polars as pl
import pytest
import torch

from featstore.attribution import (PooledHead, attribute, attribution_maps, in_lung_share, mask_to_input,
                                   summarise, trunk_of, Trunk, feature_maps, linear_weights)
from featstore.heads import LogisticHead
from featstore.synth import chest


def _tiny_trunk(seed=0):
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 5, stride=2, padding=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 32, 3, stride=2, padding=1))
    return Trunk(body, relu=True).eval()


def test_cam_is_exact_for_a_linear_head_and_captum_gradcam_agrees():
    from captum.attr import LayerGradCam

    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 32, 32)).astype(np.float32)
    maps = feature_maps(_tiny_trunk(), x)
    F = maps.mean(axis=(2, 3))
    y = (F[:, 0] > np.median(F[:, 0])).astype(int)
    h = LogisticHead(C=0.5).fit(F, y)
    M, s, method = attribution_maps(h, maps)
    assert method == "cam"
    np.testing.assert_allclose(s, h.decision_function(F), rtol=1e-5, atol=1e-5)  # float32 maps
    _, b = linear_weights(h)
    np.testing.assert_allclose(M.mean(axis=(1, 2)) + b, s, rtol=1e-9, atol=1e-9)  # the CAM adds up to the score
    ph = PooledHead(h)
    gc = LayerGradCam(ph, ph.maps).attribute(torch.from_numpy(maps.astype(np.float64)).requires_grad_(True),
                                             relu_attributions=False).detach().numpy()[:, 0]
    np.testing.assert_allclose(gc * maps.shape[2] * maps.shape[3], M, rtol=1e-6, atol=1e-9)
    # against a reference map (the training mean): the CAM of the difference adds up to s - s(reference), and
    # captum's IntegratedGradients (the non-linear heads' method) gives the same map on a linear head
    from captum.attr import IntegratedGradients

    B = maps.mean(0)
    Mb, _, _ = attribution_maps(h, maps, B)
    sB = h.decision_function(B.mean(axis=(1, 2))[None])[0]
    np.testing.assert_allclose(Mb.mean(axis=(1, 2)), s - sB, rtol=1e-5, atol=1e-5)
    A = torch.from_numpy(maps.astype(np.float64))
    ig = IntegratedGradients(ph).attribute(A, baselines=torch.from_numpy(B.astype(np.float64))[None].expand_as(A),
                                           n_steps=8).detach().numpy().sum(1)
    np.testing.assert_allclose(ig * maps.shape[2] * maps.shape[3], Mb, rtol=1e-6, atol=1e-8)


def test_in_lung_share_of_known_maps():
    lungs = np.zeros((3, 8, 8), bool)
    lungs[:, 2:6, 2:6] = True
    E = np.zeros((3, 8, 8))
    E[0, 3, 3] = 1.0                      # all inside
    E[1, 0, 0] = 1.0                      # all outside
    E[2] = 1.0                            # even: the share is the lung fraction
    share, frac = in_lung_share(E, lungs)
    assert share[0] == 1 and share[1] == 0 and share[2] == pytest.approx(16 / 64) and frac[2] == pytest.approx(0.25)
    share, _ = in_lung_share(np.zeros((1, 8, 8)), lungs[:1])
    assert np.isnan(share[0])  # no evidence: no share, never a made-up number


def _chests(n, confounded: bool, seed: int, size=64):
    """SYNTHETIC chests, half COVID (opacities in the lungs). Confounded: every COVID image also carries a
    bright marker in the top-left corner, outside the lungs."""
    rng = np.random.default_rng(seed)
    xs, ls, ys = [], [], []
    for i in range(n):
        covid = i % 2 == 0
        img, lungs = chest(rng, size, 1.0, "covid" if covid else "normal", 0.25, return_lungs=True)
        img = img + rng.normal(0, 0.02, img.shape)
        if confounded and covid:
            img[2:12, 2:12] = 1.0
        xs.append(np.clip(img, 0, 1)[None].astype(np.float32))
        ls.append(lungs)
        ys.append(int(covid))
    return np.stack(xs), np.stack(ls), np.array(ys)


@pytest.mark.parametrize("plant", [True, False])
def test_known_answer_a_confounder_outside_the_lungs_lowers_the_in_lung_share(plant):
    xa, la, ya = _chests(80, confounded=plant, seed=1)
    xb, lb, yb = _chests(80, confounded=False, seed=2)
    x, lungs, y = np.concatenate([xa, xb]), np.concatenate([la, lb]), np.concatenate([ya, yb])
    src = np.array(["conf"] * 80 + ["clean"] * 80)
    maps = feature_maps(_tiny_trunk(), x)
    share, frac, score, method, E = attribute(maps, lungs, y, [f"p{i}" for i in range(len(y))], "logreg",
                                              dict(C=0.05), folds=4, seed=0)
    assert method == "cam" and not np.isnan(share).any()
    a, b = share[src == "conf"].mean(), share[src == "clean"].mean()
    pa, pb = share[(src == "conf") & (y == 1)].mean(), share[(src == "clean") & (y == 1)].mean()
    if plant:  # the marker carries the confounded source's positives: their evidence leaves the lungs
        assert a < b - 0.05 and pa < pb - 0.12, (a, b, pa, pb)
    else:
        assert abs(a - b) < 0.04 and abs(pa - pb) < 0.04, (a, b, pa, pb)


def test_non_differentiable_heads_are_refused():
    maps = np.random.default_rng(0).random((20, 4, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="differentiable head.*gradient-boosted trees"):
        attribute(maps, np.ones((20, 8, 8), bool), np.arange(20) % 2, [str(i) for i in range(20)], "lightgbm")


def test_a_nonlinear_head_goes_through_captum_and_its_map_adds_up_to_its_score():
    from featstore.heads import GRLHead

    x = np.random.default_rng(3).random((60, 1, 32, 32)).astype(np.float32)
    maps = feature_maps(_tiny_trunk(), x)
    F = maps.mean(axis=(2, 3))
    y = (F[:, 1] > np.median(F[:, 1])).astype(int)
    h = GRLHead(hidden=(8, 4), max_epochs=5, min_epochs=1, random_state=0).fit(F, y, domains=np.zeros(60, int))
    B = maps.mean(0)
    M, s, method = attribution_maps(h, maps, B)
    assert method == "integrated-gradients" and M.shape == (60,) + maps.shape[2:]
    np.testing.assert_allclose(s, h.decision_function(F), rtol=1e-5, atol=1e-6)
    sB = h.decision_function(B.mean(axis=(1, 2))[None])[0]  # completeness: the map adds up to s - s(reference)
    np.testing.assert_allclose(M.mean(axis=(1, 2)), s - sB, atol=0.02 * max(1.0, np.abs(s - sB).max()))


@pytest.mark.parametrize("backbone", ["xrv-densenet121-res224-all", "tv-densenet121-imagenet",
                                      "mobilenetv3-nih-onnx"])
def test_the_lung_mask_follows_the_inputs_crop(backbone):
    from featstore.backbones import get_spec
    from featstore.preprocess import to_input

    spec = get_spec(backbone)
    h, w = 300, 420  # not square: the crops differ
    m = np.zeros((h, w), bool)
    m[60:240, 100:200] = True
    got = mask_to_input(m, spec.pipeline, spec.input_size)
    # the mask itself as an image through the backbone's own pipeline: bright where the mask is
    t = to_input(m.astype(np.float32), spec.input_size, spec.channels, spec.pipeline)[0]
    want = t > (t.max() + t.min()) / 2
    assert (got == want).mean() > 0.98, (got == want).mean()


def test_the_trunks_pooled_maps_are_the_backbones_embedding():
    from featstore.backbones import create_backbone

    bb = create_backbone("xrv-densenet121-res224-all", weights="random-init", device="cpu")
    x = np.random.default_rng(0).uniform(-1024, 1024, (2, 1, 224, 224)).astype(np.float32)
    pooled = feature_maps(trunk_of(bb), x).mean(axis=(2, 3))
    np.testing.assert_allclose(pooled, bb(torch.from_numpy(x)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="convolutional trunk"):
        trunk_of(create_backbone("pixelstats"))


def test_summary_is_per_source_and_label_with_an_interval():
    rows = pl.DataFrame(dict(backbone=["b"] * 6, weights_id=["w"] * 6, head=["logreg"] * 6, preprocess=["o"] * 6,
                             source=["s"] * 3 + ["t"] * 3, label=["covid"] * 6,
                             in_lung_share=[0.2, 0.4, 0.6, 0.5, float("nan"), 0.7], lung_fraction=[0.25] * 6))
    s = summarise(rows)
    assert s["n"].to_list() == [3, 2] and s["in_lung_share"][0] == pytest.approx(0.4)
    assert s["lo"][0] < 0.4 < s["hi"][0] and s["enrichment"][0] == pytest.approx(1.6)


@pytest.mark.slow
def test_the_command_stores_rows_and_figures_and_refuses_what_it_cannot_do(tmp_path):
    """`featstore attribution` on a small SYNTHETIC store: masks first (or a one-line refusal), then one row per
    image in `attribution`, a figure per source, and the report's section; a random-init backbone says so."""
    from typer.testing import CliRunner

    from featstore import ingest as I
    from featstore.cli import app
    from featstore.masks import ensure_masks
    from featstore.store import attribution_rows, connect
    from featstore.synth import generate

    man = generate(tmp_path / "data", n_per_source=10, size=128, seed=4)
    db = tmp_path / "fs.duckdb"
    con = connect(db)
    rows, _ = I.manifest_rows(man)
    I.ingest_rows(con, rows, str(man), workers=1)
    con.close()
    args = ["attribution", "--backbone", "xrv-densenet121-res224-all", "--weights", "random-init", "--per-source", "6",
            "--folds", "2", "--out", str(tmp_path / "att"), "--db", str(db)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0 and "featstore masks" in r.output, r.output
    r = CliRunner().invoke(app, args[:-2] + ["--head", "lightgbm", "--db", str(db)])
    assert r.exit_code != 0 and "lightgbm" in r.output  # refused before any work
    con = connect(db)
    ensure_masks(con, method="classical-v1", workers=1)
    con.close()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "random-init" in r.output and "in-lung share" in r.output
    con = connect(db, read_only=True)
    try:
        got = attribution_rows(con)
    finally:
        con.close()
    # up to 6 per source among the images whose classical mask passed the checks
    per = got.group_by("source").len()
    assert set(per["source"]) == {"synthetic-a", "synthetic-b", "synthetic-c", "synthetic-d"} and per["len"].max() <= 6
    assert got.height >= 16
    assert got["weights_id"][0].startswith("random-init:seed0") and set(got["method"]) == {"cam"}
    ok = got.filter(pl.col("in_lung_share").is_not_nan())
    assert ok.height >= got.height - 2 and ((ok["in_lung_share"] >= 0) & (ok["in_lung_share"] <= 1)).all()
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == [f"attribution_synthetic-{s}.png" for s in "abcd"]
