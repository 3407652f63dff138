"""`featstore attribution`: where in the image a head's score comes from, as the share of attribution mass
inside the stored lung mask ([BenAhmed2021] and [Sadre2021] looked at Grad-CAM maps and called them hard
to interpret; this makes them a number).

For a torch backbone with a convolutional trunk (torchxrayvision / torchvision DenseNet-121, torchvision
ResNet-50) the last feature maps A (C x h x w) are taken once per image, frozen; the embedding is their
spatial mean. The head (fitted out-of-fold on those embeddings, patients grouped) gives a log-odds s.
The map says where s moves away from the score of a reference, B = the training images' mean feature map:
  - logreg (linear on the pooled features): the exact class-activation map (CAM) of the difference,
    M(h, w) = sum_c w_c / sd_c (A_c - B_c)(h, w), whose spatial mean is s - s(B) exactly (with B = 0 it is
    the plain CAM, whose mean plus the intercept is s; captum's LayerGradCam gives it too, tested);
  - grl_mlp (any differentiable head): captum's IntegratedGradients on the feature maps (Grad-CAM's layer)
    from B, summed over channels (on a linear head the same map as the CAM, tested).
Why a reference: a plain CAM / Grad-CAM also carries what every image shares (the body, the background,
the average image's pattern times the weights), which swamps the differences; on SYNTHETIC chests its
in-lung share did not move when a confounder was planted outside the lungs, the referenced map's did
(tests/test_attribution.py).
The evidence for the class the head predicts, relu(sign(s) * M), is upsampled (bilinear) to the input,
and its share inside the lung mask (mapped through the backbone's own crop and resize) is the number:
  in_lung_share = sum(E * lungs) / sum(E);  lung_fraction = the mask's share of the input.
A map spread evenly gives in_lung_share = lung_fraction; `enrichment` = in_lung_share / lung_fraction.
Rows go to the store's `attribution` table (one per image, head, backbone, preprocessing, run); heads
without gradients (lightgbm) are refused in one line.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import torch

ATTRIBUTION_HEADS = ("logreg", "grl_mlp")
TRUNK_FAMILIES = ("xrv-densenet", "tv-densenet", "tv-resnet")


class Trunk(torch.nn.Module):
    """x -> the last feature maps (N, C, h, w), frozen; their spatial mean is the backbone's embedding.
    `maps` (an Identity) is the layer Grad-CAM reads."""

    def __init__(self, body: torch.nn.Module, relu: bool):
        super().__init__()
        self.body, self.relu, self.maps = body, relu, torch.nn.Identity()

    def forward(self, x):
        a = self.body(x)
        return self.maps(torch.relu(a) if self.relu else a)


def trunk_of(backbone) -> Trunk:
    """The convolutional trunk of a featstore Backbone (create_backbone) whose embedding is the spatial
    mean of its last feature maps; other backbones are refused in one line."""
    fam = backbone.spec.family
    m = backbone.module
    if fam in ("xrv-densenet", "tv-densenet"):
        t = Trunk(m.features, relu=True)  # DenseNet: relu(features(x)), then global average pooling
    elif fam == "tv-resnet":
        t = Trunk(torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4),
                  relu=False)
    else:
        raise ValueError(f"attribution needs a torch backbone with a convolutional trunk ({', '.join(TRUNK_FAMILIES)} "
                         f"families, e.g. xrv-densenet121-res224-all); {backbone.name} is {fam}")
    return t.eval()


def feature_maps(trunk: torch.nn.Module, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """(N, C, h, w) float32 maps of inputs x (N, channels, size, size), no gradients kept."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(trunk(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).float().numpy())
    return np.concatenate(out)


# --- the head on the pooled maps, as torch ----------------------------------------------------------

def linear_weights(head) -> tuple[np.ndarray, float] | None:
    """(w', b') with log-odds = pooled @ w' + b' for a head linear on the pooled features, else None."""
    from featstore.heads import LogisticHead

    if isinstance(head, LogisticHead):
        sc, lr = head.scaler_, head.model_
        w = lr.coef_[0] / sc.scale_
        return w, float(lr.intercept_[0] - (sc.mean_ / sc.scale_) @ lr.coef_[0])
    return None


class PooledHead(torch.nn.Module):
    """maps (N, C, h, w) -> the head's log-odds (N,), through the spatial mean: what Grad-CAM differentiates."""

    def __init__(self, head):
        super().__init__()
        from featstore.heads import GRLHead

        self.maps = torch.nn.Identity()
        lin = linear_weights(head)
        if lin is not None:
            self.kind, self.w, self.b = "linear", torch.tensor(lin[0], dtype=torch.float64), lin[1]
        elif isinstance(head, GRLHead):
            self.kind, self.head = "grl", head
            self.mean = torch.tensor(head.scaler_.mean_, dtype=torch.float64)
            self.scale = torch.tensor(head.scaler_.scale_, dtype=torch.float64)
        else:
            raise ValueError(f"attribution needs a differentiable head ({', '.join(ATTRIBUTION_HEADS)}); "
                             f"{type(head).__name__} has no gradients")

    def forward(self, maps):
        f = self.maps(maps.double()).mean(dim=(2, 3))
        if self.kind == "linear":
            return f @ self.w + self.b
        logits = self.head.class_head_(self.head.fe_((f - self.mean) / self.scale))
        return logits[:, 1] - logits[:, 0]


def attribution_maps(head, maps: np.ndarray, baseline: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(M (N, h, w) signed maps, log-odds (N,), method). M says where the score moves away from the score of
    `baseline` (a reference feature map, the training images' mean; None: zero maps, the plain CAM):
    linear heads: the exact CAM of the difference, sum_c w'_c (A_c - B_c), whose spatial mean is s - s(B);
    others: captum's IntegratedGradients on the feature maps (Grad-CAM's layer) from B, summed over
    channels and scaled by h*w (the same as the CAM for a linear head, tested)."""
    from captum.attr import IntegratedGradients

    ph = PooledHead(head)
    A = torch.from_numpy(np.asarray(maps, np.float64))
    B = torch.zeros_like(A[:1]) if baseline is None else torch.from_numpy(np.asarray(baseline, np.float64))[None]
    with torch.no_grad():
        s = ph(A).numpy()
    h, w = maps.shape[2:]
    if ph.kind == "linear":
        M = np.einsum("c,nchw->nhw", ph.w.numpy(), (A - B).numpy())
        return M, s, "cam"
    ig = IntegratedGradients(ph).attribute(A, baselines=B.expand_as(A), n_steps=32)
    return ig.detach().numpy().sum(1) * (h * w), s, "integrated-gradients"


def evidence(M: np.ndarray, s: np.ndarray, size: int) -> np.ndarray:
    """relu(sign(s) * M), upsampled (bilinear) to size x size: the evidence for the predicted class."""
    E = np.maximum(np.sign(s)[:, None, None] * M, 0)
    t = torch.nn.functional.interpolate(torch.from_numpy(E)[:, None], size=(size, size), mode="bilinear",
                                        align_corners=False)
    return t[:, 0].numpy()


def in_lung_share(E: np.ndarray, lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of each map's mass inside its lung mask (NaN where the map is all zero), lung fraction)."""
    tot = E.reshape(len(E), -1).sum(1)
    inside = (E * lungs).reshape(len(E), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(tot > 0, inside / np.where(tot > 0, tot, 1), np.nan)
    return share, lungs.reshape(len(lungs), -1).mean(1)


# --- the lung mask in the input's geometry ----------------------------------------------------------

def mask_to_input(mask: np.ndarray, pipeline, size: int) -> np.ndarray:
    """A lung mask (bool, the image's shape) cropped and resized as the backbone's input pipeline crops and
    resizes the image (preprocess.InputPipeline), so that pixel (i, j) of both is the same place."""
    from PIL import Image

    from featstore.preprocess import as_pipeline, center_square, xrv_center_crop

    p = as_pipeline(pipeline)
    m = np.asarray(mask, np.float32)
    if p.kind == "xrv":
        m = xrv_center_crop(m)
    elif p.kind == "float" or (p.kind == "pil-uint8" and p.crop == "center-square"):
        m = center_square(m)
    elif p.kind == "torchvision" or p.crop.startswith("short-side"):
        h, w = m.shape
        short = min(h, w)
        nh, nw = (int(p.resize * h / short), p.resize) if w <= h else (p.resize, int(p.resize * w / short))
        m = np.asarray(Image.fromarray(m).resize((nw, nh), Image.BILINEAR), np.float32)
        top, left = (nh - size) // 2, (nw - size) // 2
        m = m[top:top + size, left:left + size]
    im = Image.fromarray(m).resize((size, size), Image.BILINEAR)
    return np.asarray(im, np.float32) > 0.5


# --- out-of-fold heads and the rows -----------------------------------------------------------------

def attribute(maps: np.ndarray, lungs: np.ndarray, y: np.ndarray, groups, head: str = "logreg",
              params: dict | None = None, folds: int = 5, seed: int = 0) -> tuple:
    """Out-of-fold attribution: the head is fitted on the pooled maps of the other folds (patients grouped,
    StratifiedGroupKFold), so no image is attributed by a head that saw it. Returns (in-lung share, lung
    fraction, log-odds, method, evidence maps at input size) per image."""
    from featstore.split import StratifiedGroupKFold

    from featstore.heads import create_head
    from featstore.sweep.fit import single_threaded

    if head not in ATTRIBUTION_HEADS:
        raise ValueError(f"attribution needs a differentiable head ({', '.join(ATTRIBUTION_HEADS)}); '{head}' has no "
                         "gradients" + (" (gradient-boosted trees)" if head == "lightgbm" else ""))
    n = len(y)
    F = maps.mean(axis=(2, 3)).astype(np.float64)
    share, frac, score = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    E_all = np.zeros((n,) + lungs.shape[1:], np.float32)
    method = ""
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in cv.split(F, y, groups):
        with single_threaded(head):  # as in a sweep: the fit must not depend on the machine's core count
            h = create_head(head, **{**(params or {}), "random_state": seed}).fit(F[tr], y[tr])
        # the reference: the training images' mean feature map (what every image shares is no evidence)
        M, s, method = attribution_maps(h, maps[te], maps[tr].mean(0))
        E = evidence(M, s, lungs.shape[-1])
        share[te], frac[te] = in_lung_share(E, lungs[te])
        score[te] = s
        E_all[te] = E
    return share, frac, score, method, E_all


def summarise(rows: pl.DataFrame) -> pl.DataFrame:
    """Per backbone, head, preprocessing, source and label: images, mean in-lung share with a 95% t interval
    over images (the images are the unit; several of one patient are counted apart), mean lung fraction and
    enrichment (share / lung fraction; 1 = no more than an evenly spread map)."""
    from scipy import stats

    keys = ["backbone", "weights_id", "head", "preprocess", "source", "label"]
    ok = rows.filter(pl.col("in_lung_share").is_not_nan() & pl.col("in_lung_share").is_not_null())
    g = ok.group_by(keys, maintain_order=True).agg(
        pl.len().alias("n"), pl.col("in_lung_share").mean().alias("in_lung_share"),
        pl.col("in_lung_share").std().alias("sd"), pl.col("lung_fraction").mean().alias("lung_fraction"),
        (pl.col("in_lung_share") / pl.col("lung_fraction")).mean().alias("enrichment")).sort(keys)
    half = [float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 and sd is not None else None
            for n, sd in zip(g["n"], g["sd"])]
    # a share lies in [0, 1]: the t interval is clipped there
    return g.with_columns(
        pl.Series("lo", [None if h is None else max(0.0, m - h) for m, h in zip(g["in_lung_share"], half)],
                  dtype=pl.Float64),
        pl.Series("hi", [None if h is None else min(1.0, m + h) for m, h in zip(g["in_lung_share"], half)],
                  dtype=pl.Float64))


# --- the command --------------------------------------------------------------------------------

def pick_images(images: pl.DataFrame, masks: dict, per_source: int, seed: int) -> pl.DataFrame:
    """Up to `per_source` images per source with a usable stored lung mask, half of each label where the
    source has both; a seeded draw from the image ids in sorted order (the same whatever the ingest order)."""
    ok = images.filter(pl.col("image_id").is_in([i for i, (m, _, _) in masks.items() if m is not None]))
    out = []
    for (src,), g in ok.sort("image_id").group_by(["source"], maintain_order=True):
        labels = sorted(set(g["label"].to_list()))
        want = {lab: per_source // len(labels) + (i < per_source % len(labels)) for i, lab in enumerate(labels)}
        for lab in labels:
            gl = g.filter(pl.col("label") == lab)
            rng = np.random.default_rng([seed, sum(map(ord, src + lab))])
            take = np.sort(rng.permutation(gl.height)[:want[lab]])
            out.append(gl[take])
    return pl.concat(out).sort(["source", "label", "image_id"]) if out else ok.head(0)


def run_attribution(con, backbone: str, weights: str | None = None, weights_dir=None, head: str = "logreg",
                    preprocess: str = "original", per_source: int = 60, folds: int = 5, seed: int = 0,
                    out: str | Path | None = None, n_figures: int = 3, device: str = "cpu", progress=None) -> dict:
    """Attribute `per_source` images per source (with stored lung masks) and store one row per image in
    `attribution`; figures of `n_figures` images per source in `out`. Returns the rows, summary and files."""
    from featstore.api import Store
    from featstore.backbones import create_backbone
    from featstore.lungs import fit as fit_mask
    from featstore.masks import decode as decode_mask, load_masks
    from featstore.preprocess import get_preprocess, to_input
    from featstore.store import write_attribution

    if head not in ATTRIBUTION_HEADS:
        raise ValueError(f"attribution needs a differentiable head ({', '.join(ATTRIBUTION_HEADS)}); '{head}' has no "
                         "gradients" + (" (gradient-boosted trees)" if head == "lightgbm" else ""))
    if preprocess == "lung-crop":
        raise ValueError("attribution: lung-crop moves the lungs to fill the input; the in-lung share would mean "
                         "nothing there (pick original or another preprocessing)")
    t0 = time.time()
    pre = get_preprocess(preprocess)
    bb = create_backbone(backbone, weights=weights, weights_dir=weights_dir, device=device, seed=seed)
    trunk = trunk_of(bb)
    fs = Store.over(con)
    images = fs.images()
    masks = load_masks(con, images["image_id"].to_list())
    if not any(m is not None for m, _, _ in masks.values()):
        raise ValueError("no stored lung masks: run `featstore masks` first (attribution needs them)")
    pick = pick_images(images, masks, per_source, seed)
    size, ch = bb.spec.input_size, bb.spec.channels
    xs, ls = [], []
    for k, iid in enumerate(pick["image_id"]):
        x = fs.image(iid)
        m = fit_mask(decode_mask(masks[iid][0]), x.shape)
        x = pre(x, m) if pre.needs_mask else pre(x)
        xs.append(to_input(x, size, ch, bb.spec.pipeline))
        ls.append(mask_to_input(m, bb.spec.pipeline, size))
        if progress:
            progress(k + 1, pick.height)
    X, L = np.stack(xs), np.stack(ls)
    torch.manual_seed(seed)
    maps = feature_maps(trunk, X)
    y = (pick["label"] == _positive(pick)).to_numpy().astype(int)
    groups = [f"{s}:{p}" if p else f"image:{i}" for s, p, i in zip(pick["source"], pick["patient_id"],
                                                                     pick["image_id"])]
    share, frac, score, method, E = attribute(maps, L, y, groups, head, None, folds, seed)
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    rows = pl.DataFrame(dict(
        run_id=[run] * pick.height, image_id=pick["image_id"], source=pick["source"], label=pick["label"],
        backbone=[backbone] * pick.height, weights_id=[bb.weights_id] * pick.height,
        preprocess=[preprocess] * pick.height, head=[head] * pick.height, method=[method] * pick.height,
        mask_method=[masks[i][1] for i in pick["image_id"]], score=score, in_lung_share=share,
        lung_fraction=frac, folds=[folds] * pick.height, seed=[seed] * pick.height,
        created_at=[datetime.now(timezone.utc).replace(tzinfo=None)] * pick.height))
    write_attribution(con, rows)
    files = []
    if out is not None:
        files = attribution_figures(rows, E, L, X, Path(out), n_figures)
    return dict(rows=rows, summary=summarise(rows), files=files, seconds=time.time() - t0, run_id=run)


def _positive(pick: pl.DataFrame) -> str:
    labels = sorted(set(pick["label"].to_list()))
    return "covid" if "covid" in labels else labels[-1]


def attribution_figures(rows: pl.DataFrame, E: np.ndarray, L: np.ndarray, X: np.ndarray, out: Path,
                        n: int = 3) -> list[Path]:
    """One figure per source: `n` images, each with its evidence map over it and the lung mask's outline,
    titled with its label, log-odds and in-lung share."""
    from featstore.figures import file_stem, pyplot, save

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for src in sorted(set(rows["source"].to_list())):
        idx = [i for i, s in enumerate(rows["source"]) if s == src][:n]
        if not idx:
            continue
        fig, axes = plt.subplots(1, len(idx), figsize=(3.2 * len(idx), 3.5), squeeze=False)
        for ax, i in zip(axes[0], idx):
            img = X[i].mean(0)
            ax.imshow(img, cmap="gray")
            e = E[i] / (E[i].max() or 1)
            ax.imshow(e, cmap="jet", alpha=0.4 * (e > 0.05))
            ax.contour(L[i], levels=[0.5], colors="white", linewidths=0.8)
            r = rows.row(i, named=True)
            ax.set_title(f"{r['label']}, s={r['score']:.2f}\nin lungs {r['in_lung_share']:.0%} "
                         f"(area {r['lung_fraction']:.0%})", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{src}: {rows['head'][0]} on {rows['backbone'][0]} ({rows['method'][0]})", fontsize=9)
        p = out / f"attribution_{file_stem(src)}.png"
        save(fig, p, 90)
        plt.close(fig)
        files.append(p)
    return files


@dataclass
class AttributionJob:
    """`featstore attribution`: run() returns run_attribution's dict."""
    backbone: str
    weights: str | None = None
    weights_dir: object = None
    head: str = "logreg"
    preprocess: str = "original"
    per_source: int = 60
    folds: int = 5
    seed: int = 0
    out: object = None
    figures: int = 3
    device: str = "cpu"
    db: object = None

    def run(self, progress=None):
        from featstore.errors import UserError
        from featstore.progress import silent
        from featstore.store import open_for_command

        con = open_for_command(self.db, must_exist=True)
        try:
            with (progress or silent)("attribution") as prog:
                return run_attribution(con, self.backbone, self.weights, self.weights_dir, self.head, self.preprocess,
                                       self.per_source, self.folds, self.seed, self.out, self.figures, self.device,
                                       prog.update)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from e
        finally:
            con.close()
