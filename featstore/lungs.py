"""Lung masks and the ROI variants built on them ([BenAhmed2021] and [Sadre2021]).

Where masks come from, and how each one is recorded, is featstore/masks.py. This module holds
the pieces that work on arrays: [BenAhmed2021]'s checks, the classical fallback method, the variants.

Checks, applied to every mask whatever made it ([BenAhmed2021] flags failed segmentations this way):
- empty mask (no lung-like region), or lungs under 5% of the image;
- the lung bounding box smaller than half the image in both directions ("crop smaller than half");
- a mask that leaks beyond the lungs: over 45% of the image, or a box from the top edge spanning
  more than 90% of the width (neck and shoulders joined in).
A refused mask raises MaskError.

Method `classical-v1` (no weights needed): on a 256 px copy, smooth, threshold at Otsu's level
of the central region, remove the outside air (much darker regions connected to the border), open,
keep the two largest dark regions centred in the central area, close small gaps, fill holes. Chest
X-rays with the lungs as the darkest large structures inside the body mask well; ones that do not
are caught by the checks, not guessed.

Variants ([Sadre2021]'s ROI Hide-and-Seek, plus [BenAhmed2021]'s lung-ROI crop), f(image, mask):
    lungs-isolated   everything but the lungs set to 0
    lungs-removed    the lungs set to 0
    lungs-framed     everything outside the lungs' bounding box set to 0
    lungs-boxed-out  the lungs' bounding box set to 0
    lung-crop        cropped to the lungs' bounding box (then resized by the backbone)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

METHOD = "classical-v1"
# every mask method `featstore masks --method` offers (featstore/masks.py makes them; named here, where the
# command line reads them without importing the store)
MASK_METHODS = ("auto", "manifest", "xrv-pspnet", METHOD)
WORK = 256


class MaskError(ValueError):
    """No trustworthy lung mask for this image."""


@dataclass(frozen=True)
class LungMask:
    mask: np.ndarray          # bool, at the resolution it was made
    bbox: tuple[int, int, int, int]   # top, bottom, left, right (exclusive), in mask pixels
    fraction: float           # lung pixels / all pixels
    method: str = METHOD


def _small(x: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(x, np.float32)).resize((WORK, WORK), Image.BILINEAR), np.float32)


def bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return int(rows[0]), int(rows[-1] + 1), int(cols[0]), int(cols[-1] + 1)


def check(m: np.ndarray, method: str) -> LungMask:
    """Paper 000's failure checks; the mask if it passes, MaskError naming the failure if not."""
    m = np.asarray(m, bool)
    h, w = m.shape
    frac = float(m.mean())
    if frac < 0.05:
        raise MaskError(f"lung mask failed: empty mask ({frac:.1%} of the image)")
    top, bottom, left, right = bbox(m)
    if (bottom - top) < h / 2 and (right - left) < w / 2:
        raise MaskError("lung mask failed: lung box smaller than half the image")
    if frac > 0.45 or (top < 0.03 * h and (right - left) > 0.9 * w):
        raise MaskError(f"lung mask failed: mask leaks beyond the lungs ({frac:.0%} of the image, "
                        f"box rows {top}-{bottom}, cols {left}-{right} of {h}x{w})")
    return LungMask(m, (top, bottom, left, right), frac, method)


def classical_mask(x: np.ndarray) -> LungMask:
    """classical-v1 on a grey [0, 1] image; the mask is WORK x WORK."""
    from scipy import ndimage
    from skimage.filters import gaussian, threshold_otsu

    s = gaussian(_small(x), sigma=3)
    c = s[WORK // 10:-WORK // 10, WORK // 10:-WORK // 10]
    level = threshold_otsu(c)
    dark = s < level
    # outside air: much darker than the lungs and connected to the image border
    air_lab, _ = ndimage.label(s < min(level * 0.6, np.percentile(c, 5)))
    edge = np.unique(np.concatenate([air_lab[0], air_lab[-1], air_lab[:, 0], air_lab[:, -1]]))
    air = np.isin(air_lab, edge[edge > 0])
    dark &= ~ndimage.binary_dilation(air, iterations=2)
    dark = ndimage.binary_opening(dark, iterations=2)
    lab, n = ndimage.label(dark)
    if n == 0:
        raise MaskError("lung mask failed: empty mask")
    sizes = ndimage.sum(dark, lab, index=np.arange(1, n + 1))
    cols = ndimage.center_of_mass(dark, lab, index=np.arange(1, n + 1))
    cand = [(sz, i + 1) for i, (sz, cc) in enumerate(zip(sizes, cols))
            if 0.1 * WORK <= cc[1] <= 0.9 * WORK and 0.1 * WORK <= cc[0] <= 0.85 * WORK]
    keep = [i for _, i in sorted(cand, reverse=True)[:2]]
    if not keep:
        raise MaskError("lung mask failed: empty mask (no dark region in the central area)")
    m = ndimage.binary_fill_holes(ndimage.binary_closing(np.isin(lab, keep), iterations=3))
    return check(m, METHOD)


def fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask made at any resolution, resized (nearest) onto an image of `shape`."""
    if mask.shape == shape:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(im) > 127


def _box(x, mask):
    m = fit(mask, x.shape)
    if not m.any():  # can happen only when a tiny mask is scaled down; never silently keep the lungs
        raise MaskError("lung mask failed: empty mask at this image size")
    return m, bbox(m)


def isolated(x, mask):
    m, _ = _box(x, mask)
    return np.where(m, x, 0).astype(np.float32)


def removed(x, mask):
    m, _ = _box(x, mask)
    return np.where(m, 0, x).astype(np.float32)


def framed(x, mask):
    _, (t, b, l, r) = _box(x, mask)
    out = np.zeros_like(x, dtype=np.float32)
    out[t:b, l:r] = x[t:b, l:r]
    return out


def boxed_out(x, mask):
    _, (t, b, l, r) = _box(x, mask)
    out = np.array(x, dtype=np.float32)
    out[t:b, l:r] = 0
    return out


def crop(x, mask):
    _, (t, b, l, r) = _box(x, mask)
    return np.ascontiguousarray(x[t:b, l:r], dtype=np.float32)


VARIANTS = {"lungs-isolated": isolated, "lungs-removed": removed, "lungs-framed": framed,
            "lungs-boxed-out": boxed_out, "lung-crop": crop}
