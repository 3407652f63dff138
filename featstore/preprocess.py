"""Preprocessing: pure functions on grayscale [0, 1] arrays, then the backbone's input tensor.

A preprocessing name is part of an embedding's identity: the same image under
`original` and `clahe` gives two embeddings.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from featstore.lungs import VARIANTS


def _original(x: np.ndarray) -> np.ndarray:
    return x


def _histeq(x: np.ndarray) -> np.ndarray:
    from skimage.exposure import equalize_hist

    return equalize_hist(x, nbins=256).astype(np.float32)


def _clahe(x: np.ndarray) -> np.ndarray:
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(x, clip_limit=0.01).astype(np.float32)


PREPROCESSINGS: dict[str, Callable[..., np.ndarray]] = {
    "original": _original,   # as decoded
    "histeq": _histeq,       # global histogram equalisation (papers 002, 003)
    "clahe": _clahe,         # contrast-limited adaptive equalisation (papers 003, 004)
    **VARIANTS,              # lung-ROI variants (papers 000, 001): f(x, mask); see featstore/lungs.py
}
# these take the image's stored lung mask as a second argument (featstore/masks.py)
NEEDS_MASK = frozenset(VARIANTS)


def get_preprocess(name: str) -> Callable[[np.ndarray], np.ndarray]:
    if name not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing '{name}' (known: {', '.join(PREPROCESSINGS)})")
    return PREPROCESSINGS[name]


def center_square(x: np.ndarray) -> np.ndarray:
    """Centre crop to a square, as torchxrayvision's XRayCenterCrop does."""
    h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top:top + s, left:left + s]


def resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape == (size, size):
        return x
    return np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR, reducing_gap=None),
                      dtype=np.float32)


def to_input(x: np.ndarray, size: int, channels: int, norm: tuple) -> np.ndarray:
    """[0, 1] grayscale -> float32 (channels, size, size) as the backbone expects.

    norm is ("xrv",) for torchxrayvision's [-1024, 1024] range or ("meanstd", mean, std).
    """
    x = resize(center_square(np.asarray(x, dtype=np.float32)), size)
    if norm[0] == "xrv":
        x = x * 2048.0 - 1024.0
        out = np.broadcast_to(x, (channels, size, size))
    elif norm[0] == "meanstd":
        mean = np.asarray(norm[1], np.float32).reshape(-1, 1, 1)
        std = np.asarray(norm[2], np.float32).reshape(-1, 1, 1)
        out = (np.broadcast_to(x, (channels, size, size)) - mean) / std
    elif norm[0] == "unit":
        out = np.broadcast_to(x, (channels, size, size))
    else:
        raise ValueError(f"unknown normalisation {norm!r}")
    return np.require(out, np.float32, ["C", "W"])  # writable: torch.from_numpy needs it
