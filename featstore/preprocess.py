"""Preprocessing: pure functions on grayscale [0, 1] arrays, then the backbone's input tensor.

A preprocessing name is part of an embedding's identity: the same image under
`original` and `clahe` gives two embeddings. The input tensor is made by the backbone's own
pipeline (InputPipeline, carried by its spec); its identity is recorded in weights_id.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from featstore.lungs import VARIANTS
from featstore.registry import Registry


@dataclass(frozen=True)
class Preprocessing:
    """A named preprocessing: fn(x, **options), or fn(x, mask, **options) when it needs the image's stored
    lung mask (featstore/masks.py). The options are fixed: they are part of what the name means, so
    changing one is a new name (a new embedding set), never an edit here."""
    name: str
    fn: Callable[..., np.ndarray]
    description: str
    needs_mask: bool = False
    options: dict = field(default_factory=dict)
    takes_uint8: bool = False  # fn accepts decode's uint8 (8-bit images) and is exact on it: embed skips a float copy

    def __call__(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if self.needs_mask:
            if mask is None:
                raise ValueError(f"preprocessing '{self.name}' needs the image's lung mask")
            return self.fn(x, mask, **self.options)
        if mask is not None:
            raise ValueError(f"preprocessing '{self.name}' takes no lung mask")
        return self.fn(x, **self.options)


def _original(x: np.ndarray) -> np.ndarray:
    return x


def _histeq(x: np.ndarray, nbins: int) -> np.ndarray:
    from skimage.exposure import equalize_hist

    return equalize_hist(x, nbins=nbins).astype(np.float32)


def _clahe(x: np.ndarray, clip_limit: float) -> np.ndarray:
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(x, clip_limit=clip_limit).astype(np.float32)


PREPROCESSINGS: Registry[Preprocessing] = Registry("preprocessing")


def register_preprocessing(p: Preprocessing) -> Preprocessing:
    return PREPROCESSINGS.register(p.name, p)


register_preprocessing(Preprocessing("original", _original, "as decoded", takes_uint8=True))
register_preprocessing(Preprocessing("histeq", _histeq, "global histogram equalisation ([Tartaglione2020], [Trivedi2022])",
                                     options=dict(nbins=256)))
register_preprocessing(Preprocessing("clahe", _clahe, "contrast-limited adaptive equalisation ([Trivedi2022], [Goldstein2021])",
                                     options=dict(clip_limit=0.01)))
# lung-ROI variants ([BenAhmed2021], [Sadre2021]), f(x, mask); see featstore/lungs.py
_ROI = {"lungs-isolated": "lungs kept, the rest black", "lungs-removed": "lungs black, the rest kept",
        "lungs-framed": "the lungs' bounding box kept, the rest black",
        "lungs-boxed-out": "the lungs' bounding box black, the rest kept", "lung-crop": "cropped to the lungs' box"}
for _name, _fn in VARIANTS.items():
    register_preprocessing(Preprocessing(_name, _fn, _ROI[_name], needs_mask=True))


def get_preprocess(name: str) -> Preprocessing:
    """The entry (callable as p(x), or p(x, mask) when p.needs_mask); unknown names: one line, did you mean."""
    return PREPROCESSINGS.get(name)


def center_square(x: np.ndarray) -> np.ndarray:
    """Centre crop to a square with floor((h - s) / 2) offsets (the original `float` pipeline's crop)."""
    h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top:top + s, left:left + s]


def xrv_center_crop(x: np.ndarray) -> np.ndarray:
    """torchxrayvision's XRayCenterCrop: offsets h // 2 - s // 2 (differ from floor((h - s) / 2) by one
    pixel when the long side is odd and the short side even)."""
    h, w = x.shape
    s = min(h, w)
    top, left = h // 2 - s // 2, w // 2 - s // 2
    return x[top:top + s, left:left + s]


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Float bilinear (PIL mode 'F'): the original `float` pipeline's resize."""
    if x.shape == (size, size):
        return x
    return np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR, reducing_gap=None),
                      dtype=np.float32)


# kind -> fn(x, size, channels, pipeline) -> (channels, size, size) array; registered below, one per kind
PIPELINE_KINDS: Registry[Callable[..., np.ndarray]] = Registry("input pipeline kind")
CROPS = ("none", "center-square", "short-side", "short-side-floor")
_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class InputPipeline(NamedTuple):
    """How one backbone's own training / library pipeline turns a grey image into its input tensor.

    kind (PIPELINE_KINDS):
      xrv          torchxrayvision: normalize(img, maxval) to [-1024, 1024], XRayCenterCrop, XRayResizer
                   (skimage.transform.resize: Gaussian anti-aliasing when shrinking, bilinear, float32).
      torchvision  the weights' ImageClassification preset on a float tensor: shorter side to `resize`
                   (`resample`: bilinear or bicubic, antialias), centre crop to the input size, mean/std; grey copied to 3 channels.
      pil-uint8    a plain PIL script: 8-bit 'L' image, [centre square], Image.resize(size, resample)
                   in uint8, then /255 and mean/std; crop "short-side": shorter side to `resize`, then a
                   centre crop (torchvision Resize + CenterCrop on PIL images: timm, open_clip, HF).
      float        featstore's original path: centre square, PIL 'F' bilinear in float32, mean/std (none: [0, 1]).
    A NamedTuple so that tuple() and pickling to DataLoader / Ray workers keep its meaning.
    """
    kind: str
    mean: tuple = ()            # per channel, or one value for all; () = none
    std: tuple = ()
    resample: str = "bilinear"  # pil-uint8 / float: PIL filter
    crop: str = "none"          # pil-uint8: "none" (whole image to size x size), "center-square", "short-side[-floor]"
    resize: int = 0             # torchvision: shorter side before the centre crop
    version: int = 1            # bump when to_input's code for this kind changes its output; 0: the original path

    @property
    def identity(self) -> str:
        """What embeddings made through this pipeline record (appended to weights_id). '' for version 0,
        the path every embedding had before pipelines were named, so those keep their identity."""
        if self.version == 0:
            return ""
        h = hashlib.sha256(repr(tuple(self)).encode()).hexdigest()[:8]
        return f"{self.kind}.v{self.version}.{h}"

    def check(self, channels: int) -> "InputPipeline":
        """Refuse a pipeline to_input cannot run as written (checked when a backbone entry is made, not
        at the first image): unknown kind, crop or filter, mean/std not one value or one per channel."""
        PIPELINE_KINDS.get(self.kind)
        problems = []
        if self.crop not in CROPS:
            problems.append(f"unknown crop '{self.crop}' ({', '.join(CROPS)})")
        if self.resample not in _PIL_FILTERS:
            problems.append(f"unknown resample '{self.resample}' ({', '.join(_PIL_FILTERS)})")
        if len(self.mean) != len(self.std) or len(self.mean) not in (0, 1, channels):
            problems.append(f"mean {self.mean} / std {self.std}: give one value or {channels}, both alike")
        if any(v <= 0 for v in self.std):
            problems.append(f"std {self.std} must be positive")
        if (self.kind == "torchvision" or self.crop.startswith("short-side")) and self.resize <= 0:
            problems.append(f"{self.kind} with crop '{self.crop}' needs resize > 0 (the shorter side)")
        if problems:
            raise ValueError(f"input pipeline {tuple(self)!r}: " + "; ".join(problems))
        return self


def as_pipeline(p) -> InputPipeline:
    """An InputPipeline from itself or from tuple(pipeline) (what embed_ray hands its workers)."""
    if isinstance(p, InputPipeline):
        return p
    if isinstance(p, tuple) and p and p[0] in PIPELINE_KINDS:
        return InputPipeline(*p)
    raise ValueError(f"unknown input pipeline {p!r} (kinds: {', '.join(PIPELINE_KINDS)})")


def _unit_float(x: np.ndarray) -> np.ndarray:
    """decode's contract, [0, 1] float32; uint8 / uint16 as v / 255 and v / 65535 in float32, exactly what
    decode and torchxrayvision's normalize(img, maxval) compute, so the hand-over dtype never changes a vector."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.uint16:
        return x.astype(np.float32) / 65535.0
    return np.asarray(x, dtype=np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 by round(x * 255): an 8-bit decode comes back byte-exact; 16-bit and DICOM keep their
    full range (v / 257). PIL's own I;16 -> 'L' convert clips at 255 instead, whitening the image."""
    if x.dtype == np.uint8:
        return x
    y = _unit_float(x) * np.float32(255.0)  # a new array: the in-place steps below never touch x
    np.clip(y, 0.0, 255.0, out=y)
    np.rint(y, out=y)
    return y.astype(np.uint8)


def _meanstd(x: np.ndarray, p: InputPipeline, channels: int) -> np.ndarray:
    out = np.broadcast_to(x, (channels, *x.shape))
    if p.mean:
        # float32 arithmetic, as torchvision's Normalize does it
        mean = np.asarray(p.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(p.std, np.float32).reshape(-1, 1, 1)
        out = (out - mean) / std
    return out


@PIPELINE_KINDS.register("xrv")
def _xrv_kind(x: np.ndarray, size: int, channels: int, p: InputPipeline) -> np.ndarray:
    return np.broadcast_to(_xrv(x, size), (channels, size, size))


def _xrv(x: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize as sk_resize

    x = xrv_center_crop(_unit_float(x))  # crop first: normalize is per pixel, so the order does not matter
    x = (2 * x - 1.0) * 1024  # normalize(img, maxval) = (2 * (img / maxval) - 1) * 1024, img / maxval being x
    if x.shape != (size, size):
        # XRayResizer's call on (1, H, W); 2-D gives the same values in half the time. The normalised values
        # matter here: mode='constant' pads with 0, mid-grey in [-1024, 1024]
        x = sk_resize(x, (size, size), mode="constant", preserve_range=True).astype(np.float32)
    return x[None]


@PIPELINE_KINDS.register("torchvision")
def _torchvision(x: np.ndarray, size: int, channels: int, p: InputPipeline) -> np.ndarray:
    import torch

    x = _unit_float(x)
    h, w = x.shape
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = p.resize, int(p.resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
        x = torch.nn.functional.interpolate(t, size=[new_h, new_w], mode=p.resample, align_corners=False,
                                            antialias=True)[0, 0].numpy()
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return _meanstd(x[top:top + size, left:left + size], p, channels)


@PIPELINE_KINDS.register("pil-uint8")
def _pil_uint8(x: np.ndarray, size: int, channels: int, p: InputPipeline) -> np.ndarray:
    im = Image.fromarray(to_uint8(x))
    if p.crop == "center-square":
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    elif p.crop in ("short-side", "short-side-floor"):
        # torchvision Resize(int) on a PIL image + CenterCrop (timm, open_clip): round((n - size) / 2) offsets;
        # Hugging Face processors (BitImageProcessor: DINOv2, RAD-DINO) crop at floor((n - size) / 2)
        w, h = im.size
        short, long = min(w, h), max(w, h)
        ns, nl = p.resize, int(p.resize * long / short)
        nw, nh = (ns, nl) if w <= h else (nl, ns)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), _PIL_FILTERS[p.resample])
        if p.crop == "short-side":
            top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        else:
            top, left = (nh - size) // 2, (nw - size) // 2
        im = im.crop((left, top, left + size, top + size))
    elif p.crop != "none":
        raise ValueError(f"unknown crop '{p.crop}'")
    if im.size != (size, size):
        im = im.resize((size, size), _PIL_FILTERS[p.resample])
    return _meanstd(np.asarray(im, np.float32) / np.float32(255.0), p, channels)  # ToTensor: float32 / 255


@PIPELINE_KINDS.register("float")
def _float(x: np.ndarray, size: int, channels: int, p: InputPipeline) -> np.ndarray:
    return _meanstd(resize(center_square(_unit_float(x)), size), p, channels)


def to_input(x: np.ndarray, size: int, channels: int, pipeline) -> np.ndarray:
    """A grey image -> float32 (channels, size, size), fed as the backbone's own pipeline feeds it.

    x: decode's [0, 1] float32 (any bit depth), or uint8 / uint16 (the same result as x / 255, x / 65535).
    pipeline: the backbone spec's InputPipeline (or tuple() of one).
    """
    p = as_pipeline(pipeline)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {x.shape}")
    out = PIPELINE_KINDS.get(p.kind)(x, size, channels, p)
    return np.require(out, np.float32, ["C", "W"])  # writable: torch.from_numpy needs it
