"""Near duplicates: the same picture under different bytes (cropped, resized, re-encoded).

Exact copies are already one image (content hash; `duplicate_groups`). Two rules find the rest:
- perceptual: 256-bit difference hash (dHash, 16x16) of the decoded grey image; pairs within
  `phash_max` bits (default 10 of 256). Robust to re-encoding and resizing. (A 64-bit hash is useless
  on chest X-rays: every frontal chest looks alike at 9x8 pixels.)
- embedding: cosine similarity >= `cosine_min` (default 0.98) in a backbone's embedding space.
  Catches crops and contrast changes the hash misses.
Calibrated on ../shared/cxr with mobilenetv3-nih-onnx: at these defaults each rule finds 100-124
cohen_ieee8023 x covid_cxnet pairs and zero pairs between collections that share no images
(NIH or the Guangzhou children vs the COVID sets); at 30 bits the hash finds 1,155 such impossible
pairs, at 0.97 cosine the embedding rule starts to. Both thresholds are tunable and recorded per pair.
Pairs go to `near_duplicates` with both measures; a contact sheet shows them side by side.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from datetime import datetime

import numpy as np
import polars as pl
from PIL import Image

from featstore.decode import DecodeError, decode_file
from featstore.neighbors import knn_indices
from featstore.store import insert_frame

PHASH_MAX = 10
COSINE_MIN = 0.98
HASH_SIDE = 16  # 16 x 16 = 256 bits


def dhash(x: np.ndarray) -> bytes:
    """Difference hash: (side+1) x side thumbnail, one bit per horizontal neighbour comparison."""
    im = Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8)).resize((HASH_SIDE + 1, HASH_SIDE),
                                                                            Image.BILINEAR)
    a = np.asarray(im, dtype=np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).ravel()).tobytes()


def _hash_one(path: str) -> bytes | None:
    try:
        return dhash(decode_file(path, draft=64).pixels)
    except (DecodeError, OSError, ValueError):
        return None


def ensure_hashes(con, workers: int = 2) -> int:
    """dHash every image that has none yet; returns how many were added."""
    todo = con.execute("SELECT image_id, path FROM images WHERE image_id NOT IN "
                       "(SELECT image_id FROM image_hashes) ORDER BY image_id").fetchall()
    if not todo:
        return 0
    paths = [p for _, p in todo]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            hashes = list(ex.map(_hash_one, paths, chunksize=64))
    else:
        hashes = [_hash_one(p) for p in paths]
    df = pl.DataFrame({"image_id": [i for (i, _), h in zip(todo, hashes) if h is not None],
                       "dhash": [h for h in hashes if h is not None]}, schema={"image_id": pl.Utf8,
                                                                               "dhash": pl.Binary})
    insert_frame(con, "image_hashes", df)
    return df.height


def bits(hashes) -> np.ndarray:
    """[n, 256] 0/1 float32 matrix of the hashes' bits."""
    return np.unpackbits(np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), -1), axis=1) \
        .astype(np.float32)


def hamming_pairs(ids, hashes, max_dist: int, block: int = 1024) -> dict[tuple, int]:
    B = bits(hashes)
    out = {}
    for start in range(0, len(B), block):
        b = B[start:start + block]
        d = np.rint(b @ (1 - B).T + (1 - b) @ B.T).astype(int)  # Hamming distance as two matmuls
        ii, jj = np.nonzero(d <= max_dist)
        for i, j in zip(ii + start, jj):
            if i < j:
                out[(ids[i], ids[j])] = int(d[i - start, j])
    return out


def find(con, backbone: str | None = None, preprocess: str = "original", cosine_min: float = COSINE_MIN,
         phash_max: int = PHASH_MAX, k: int = 10, workers: int = 2) -> pl.DataFrame:
    """Find near-duplicate pairs, replace the table's rows, return them."""
    ensure_hashes(con, workers)
    meta = pl.from_arrow(con.sql("SELECT i.image_id, i.source, i.label, h.dhash FROM images i "
                                 "JOIN image_hashes h USING (image_id) ORDER BY i.image_id").to_arrow_table())
    ids = meta["image_id"].to_numpy()
    pos = {v: i for i, v in enumerate(ids)}
    pairs = {key: dict(phash_distance=d, cosine=None, method="phash")
             for key, d in hamming_pairs(ids, meta["dhash"].to_list(), phash_max).items()}
    Xn = None
    if backbone:
        from featstore.api import Store

        X, m = Store.over(con).arrays(backbone, preprocess)
        Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        eids = m["image_id"].to_numpy()
        nn = knn_indices(X, k)
        for i, row in enumerate(nn):
            for j in row:
                c = float(Xn[i] @ Xn[j])
                if c >= cosine_min:
                    key = tuple(sorted((eids[i], eids[j])))
                    p = pairs.setdefault(key, dict(phash_distance=None, cosine=None, method="embedding"))
                    p["cosine"] = c
                    if p["method"] == "phash":
                        p["method"] = "both"
        epos = {v: i for i, v in enumerate(eids)}
        for (a, b), p in pairs.items():  # both measures for every pair
            if p["cosine"] is None and a in epos and b in epos:
                p["cosine"] = float(Xn[epos[a]] @ Xn[epos[b]])
    B = bits(meta["dhash"].to_list())
    for (a, b), p in pairs.items():
        if p["phash_distance"] is None:
            p["phash_distance"] = int((B[pos[a]] != B[pos[b]]).sum())
    src, lab = dict(zip(ids, meta["source"])), dict(zip(ids, meta["label"]))
    now = datetime.now()
    df = pl.DataFrame([dict(image_a=a, image_b=b, source_a=src[a], source_b=src[b], label_a=lab[a], label_b=lab[b],
                            cosine=p["cosine"], phash_distance=p["phash_distance"], method=p["method"],
                            backbone=backbone, preprocess=preprocess if backbone else None,
                            cosine_min=cosine_min, phash_max=phash_max, found_at=now)
                       for (a, b), p in sorted(pairs.items())],
                      schema=dict(image_a=pl.Utf8, image_b=pl.Utf8, source_a=pl.Utf8, source_b=pl.Utf8,
                                  label_a=pl.Utf8, label_b=pl.Utf8, cosine=pl.Float64, phash_distance=pl.Int32,
                                  method=pl.Utf8, backbone=pl.Utf8, preprocess=pl.Utf8, cosine_min=pl.Float64,
                                  phash_max=pl.Int32, found_at=pl.Datetime))
    con.execute("BEGIN")
    con.execute("DELETE FROM near_duplicates")
    if df.height:
        insert_frame(con, "near_duplicates", df)
    con.execute("COMMIT")
    return df


def contact_sheet(con, out, pairs: pl.DataFrame, n: int = 60, thumb: int = 128) -> None:
    """Pairs side by side, captioned with source, label and both measures, for a person to check."""
    from PIL import ImageDraw

    # the pairs a person should check come first: one rule only, weakest similarity first
    order = pl.col("method").replace_strict({"embedding": 0, "phash": 1, "both": 2}, default=3)
    pairs = pairs.sort([order, "cosine"], nulls_last=True).head(n)
    path = dict(con.execute("SELECT image_id, path FROM images").fetchall())
    rows = max(1, pairs.height)
    sheet = Image.new("L", (2 * thumb + 260, rows * (thumb + 4)), 255)
    draw = ImageDraw.Draw(sheet)
    for r, p in enumerate(pairs.iter_rows(named=True)):
        y = r * (thumb + 4)
        for c, iid in enumerate((p["image_a"], p["image_b"])):
            try:
                px = decode_file(path[iid], draft=thumb).pixels
                im = Image.fromarray((np.clip(px, 0, 1) * 255).astype(np.uint8)).resize((thumb, thumb))
            except (DecodeError, OSError):
                im = Image.new("L", (thumb, thumb), 128)
            sheet.paste(im, (c * thumb, y))
        cos = "—" if p["cosine"] is None else f"{p['cosine']:.3f}"
        draw.text((2 * thumb + 8, y + 8), f"{p['source_a']} / {p['label_a']}\n{p['source_b']} / {p['label_b']}\n"
                                         f"cosine {cos}\ndHash distance {p['phash_distance']}\n{p['method']}", fill=0)
    sheet.save(out)
