"""Is this candidate pair the same picture? Local-feature matching, then the pixels compared in register.

The global rules of featstore/duplicates.py (a 256-bit dHash, cosine of embeddings) only *propose* pairs:
a copy that was cropped, bordered, padded or re-windowed moves its dHash by 20-140 bits and its cosine
to 0.82-0.95, where different X-rays of look-alike patients (children of one hospital, one patient's
follow-ups) sit too. Each proposed pair is checked here, independently of any backbone:
1. each image, grey, longest side VERIFY_SIDE, histogram-equalised (a re-windowed copy gets the same
   keypoints), gives ORB keypoints (OpenCV);
2. cross-checked Hamming matches; a pair with fewer than MIN_MATCHES good ones stops here (cheap);
3. RANSAC fits a similarity transform (rotation, one scale, shift: what cropping, padding and resizing
   do) to the matches: `inliers` is how many agree;
4. the second image is warped onto the first and the equalised pixels compared over the part both
   cover: `ncc` (normalised cross-correlation) and `overlap` (that part's share of the smaller image).
A copy has hundreds of inliers and ncc ~0.98-1.00; two acquisitions of one patient have at most a few
dozen inliers (the spine and ribs agree, the rest does not) and ncc below 0.97 (labelled pairs: 37-83
inliers at ncc 0.95-0.97 were all two acquisitions; copies re-windowed or annotated: 200+ at 0.97). The rule
(`is_copy`) and its thresholds were set on pairs labelled by eye on ../shared/cxr (see README).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featstore.decode import DecodeError, decode_file

VERIFY_SIDE = 256        # ORB on this size: copies keep hundreds of keypoints, a pair costs ~1 ms
NCC_SIDE = 128           # pixels compared at this size (16 KiB per image kept in memory)
ORB_FEATURES = 500
GOOD_MATCH_BITS = 64     # a match this close (of 256 bits) counts towards MIN_MATCHES
MIN_MATCHES = 12
RANSAC_PX = 3.0          # at VERIFY_SIDE
# The rule: a strong geometric agreement and pixels that agree in register, or an almost exact
# pixel agreement with fewer keypoints (a small crop of a smooth image). Set on the labelled sample.
MIN_INLIERS = 100
NCC_STRONG = 0.96
NCC_EXACT = 0.975
MIN_INLIERS_EXACT = 20
MIN_OVERLAP = 0.5        # of the smaller image: a crop keeps at least half of the picture


@dataclass
class Features:
    points: np.ndarray       # [n, 2] float32 keypoint positions at VERIFY_SIDE
    descriptors: np.ndarray  # [n, 32] uint8 ORB
    thumb: np.ndarray        # [h, w] uint8 equalised image at NCC_SIDE
    scale: float             # NCC_SIDE / VERIFY_SIDE as actually resized (per axis mean)


def _cv2():
    import cv2

    cv2.setNumThreads(1)  # the caller's processes are the parallelism
    return cv2


def features_of_pixels(x: np.ndarray) -> Features | None:
    """x: float grey [h, w] in 0..1 (featstore.decode). None when it has too few keypoints."""
    cv2 = _cv2()
    u8 = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    h, w = u8.shape
    s = VERIFY_SIDE / max(h, w)
    size = (max(8, round(w * s)), max(8, round(h * s)))
    big = cv2.equalizeHist(cv2.resize(u8, size, interpolation=cv2.INTER_AREA))
    t = NCC_SIDE / VERIFY_SIDE
    small = cv2.resize(big, (max(4, round(size[0] * t)), max(4, round(size[1] * t))), interpolation=cv2.INTER_AREA)
    orb = cv2.ORB_create(nfeatures=ORB_FEATURES, edgeThreshold=15, patchSize=15, fastThreshold=10)
    kp, des = orb.detectAndCompute(big, None)
    if des is None or len(kp) < MIN_MATCHES:
        return None
    return Features(np.float32([k.pt for k in kp]), des, small, small.shape[1] / size[0])


def features_of_file(path: str) -> Features | None:
    try:
        return features_of_pixels(decode_file(path, draft=VERIFY_SIDE).pixels)
    except (DecodeError, OSError, ValueError):
        return None


@dataclass
class Match:
    inliers: int = 0
    ncc: float | None = None
    overlap: float = 0.0
    scale: float | None = None


def compare(fa: Features | None, fb: Features | None) -> Match:
    """How well b maps onto a (see the module's steps)."""
    if fa is None or fb is None:
        return Match()
    cv2 = _cv2()
    m = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(fa.descriptors, fb.descriptors)
    m = [x for x in m if x.distance <= GOOD_MATCH_BITS]
    if len(m) < MIN_MATCHES:
        return Match()
    A = fa.points[[x.queryIdx for x in m]]
    B = fb.points[[x.trainIdx for x in m]]
    cv2.setRNGSeed(0)  # RANSAC draws: the same pair gives the same numbers
    M, inl = cv2.estimateAffinePartial2D(B, A, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX,
                                         maxIters=1000, confidence=0.995, refineIters=10)
    if M is None:
        return Match()
    n_in = int(inl.sum())
    scale = float(np.hypot(M[0, 0], M[1, 0]))
    if n_in < MIN_INLIERS_EXACT:
        return Match(inliers=n_in, scale=scale)
    # the same map between the small images: shift scaled by each image's own resize factor
    Ms = M.astype(np.float64).copy()
    Ms[:, :2] *= fa.scale / fb.scale
    Ms[:, 2] *= fa.scale
    ha, wa = fa.thumb.shape
    warped = cv2.warpAffine(fb.thumb, Ms, (wa, ha), flags=cv2.INTER_LINEAR, borderValue=0)
    cover = cv2.warpAffine(np.full(fb.thumb.shape, 255, np.uint8), Ms, (wa, ha), flags=cv2.INTER_NEAREST,
                           borderValue=0) == 255
    cover = cv2.erode(cover.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # no resampled edge
    overlap = float(cover.sum()) / min(fa.thumb.size, fb.thumb.size)
    if cover.sum() < 64:
        return Match(inliers=n_in, overlap=overlap, scale=scale)
    x1 = fa.thumb[cover].astype(np.float64)
    x2 = warped[cover].astype(np.float64)
    x1 -= x1.mean()
    x2 -= x2.mean()
    den = np.sqrt((x1 * x1).sum() * (x2 * x2).sum())
    ncc = float((x1 * x2).sum() / den) if den > 0 else 0.0
    return Match(inliers=n_in, ncc=ncc, overlap=min(overlap, 1.0), scale=scale)


def is_copy(m: Match) -> bool:
    if m.ncc is None or m.overlap < MIN_OVERLAP:
        return False
    return (m.inliers >= MIN_INLIERS and m.ncc >= NCC_STRONG) or \
        (m.inliers >= MIN_INLIERS_EXACT and m.ncc >= NCC_EXACT)
