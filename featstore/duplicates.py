"""Near duplicates: the same picture under different bytes (cropped, resized, re-encoded).

Exact copies are already one image (content hash; `duplicate_groups`). Two rules find the rest:
- perceptual: 256-bit difference hash (dHash, 16x16) of the decoded grey image; pairs within
  `phash_max` bits (default 10 of 256). Robust to re-encoding and resizing. (A 64-bit hash is useless
  on chest X-rays: every frontal chest looks alike at 9x8 pixels.) The stored `phash_*` columns and
  `--phash-max` name the perceptual rule ("p" for perceptual); the hash is this dHash.
- embedding: cosine similarity >= `cosine_min` (default 0.98) in a backbone's embedding space,
  among each image's k nearest neighbours (exact, or from the index of featstore/ann.py for large
  sets). Catches crops and contrast changes the hash misses.
Calibrated on ../shared/cxr with mobilenetv3-nih-onnx: at these defaults each rule finds 100-124
cohen_ieee8023 x covid_cxnet pairs and zero pairs between collections that share no images
(NIH or the Guangzhou children vs the COVID sets); at 30 bits the hash finds 1,155 such impossible
pairs, at 0.97 cosine the embedding rule starts to. Both thresholds are tunable and recorded per pair.
Pairs go to `near_duplicates` with both measures; a contact sheet shows them side by side.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from featstore.decode import DecodeError, decode_file
from featstore.procs import process_pool  # workers die with this process
from featstore.store import (delete_all_rows, hashed_images, image_paths, images_without_hashes, insert_frame,
                             transaction)

PHASH_MAX = 10
COSINE_MIN = 0.98
HASH_SIDE = 16  # 16 x 16 = 256 bits
# Real near copies come in small groups (2-5 images; on ../shared/cxr 124 pairs among 4,074 images).
# More pairs than half the images, or one group joining more than this share of them, means the
# thresholds are too loose for the data: linking them would fuse whole sources into one group.
MAX_PAIRS_PER_IMAGE = 0.5
MAX_GROUP_SHARE = 0.02
MIN_GROUP_LIMIT = 10


class ImplausibleDuplicates(ValueError):
    """Too many pairs, or one giant group: nothing is linked."""


def components(pairs) -> list[int]:
    """Sizes of the groups near-duplicate pairs join (union-find), largest first."""
    parent: dict = {}

    def root(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for a, b in pairs:
        parent[root(a)] = root(b)
    sizes: dict = {}
    for a in list(parent):
        r = root(a)
        sizes[r] = sizes.get(r, 0) + 1
    return sorted(sizes.values(), reverse=True)


def check_plausible(pairs, n_images: int, phash_max: int, cosine_min: float) -> None:
    sizes = components(pairs)
    limit = max(MIN_GROUP_LIMIT, int(MAX_GROUP_SHARE * n_images))
    n = len(pairs)
    if n > MAX_PAIRS_PER_IMAGE * max(n_images, 1) or (sizes and sizes[0] > limit):
        raise ImplausibleDuplicates(
            f"{n:,} near-duplicate pairs among {n_images:,} images, and the largest group joins {sizes[0]:,} images "
            f"(plausible: at most {int(MAX_PAIRS_PER_IMAGE * n_images):,} pairs and groups of {limit}). "
            f"The thresholds (dHash <= {phash_max} bits, cosine >= {cosine_min}) are too loose for these images "
            "(synthetic or very uniform images all look alike); linking them would fuse sources into one group "
            "and break every grouped split. Nothing was linked and the previous pairs are kept. Tighten "
            "--phash-max / --cosine-min, or pass --accept-implausible to link them anyway.")


def dhash(x: np.ndarray) -> bytes:
    """Difference hash: (side+1) x side thumbnail, one bit per horizontal neighbour comparison."""
    im = Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8)).resize((HASH_SIDE + 1, HASH_SIDE),
                                                                            Image.BILINEAR)
    a = np.asarray(im, dtype=np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).ravel()).tobytes()


def trim_borders(x: np.ndarray, flat: float = 0.02) -> np.ndarray:
    """x without the uniform rows and columns at its edges (a border or padding added to a copy)."""
    rows = np.flatnonzero(np.ptp(x, axis=1) > flat)
    cols = np.flatnonzero(np.ptp(x, axis=0) > flat)
    if len(rows) < 8 or len(cols) < 8:
        return x
    return x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _trimmed_hash_one(path: str) -> bytes | None:
    try:
        return dhash(trim_borders(decode_file(path, draft=64).pixels))
    except (DecodeError, OSError, ValueError):
        return None


def trimmed_hashes(paths, workers: int = 2) -> list[bytes | None]:
    """dHash of each image with its uniform border trimmed (kept in memory: candidates for the matcher)."""
    with process_pool(workers) if workers > 1 else nullcontext() as ex:  # workers die with this process
        return list(ex.map(_trimmed_hash_one, paths, chunksize=64) if ex else map(_trimmed_hash_one, paths))


def _hash_one(path: str) -> bytes | None:
    try:
        return dhash(decode_file(path, draft=64).pixels)
    except (DecodeError, OSError, ValueError):
        return None


def ensure_hashes(con, workers: int = 2, progress=None) -> int:
    """dHash every image that has none yet; returns how many were added. progress(done, total, "hashing")."""
    todo = images_without_hashes(con)
    if not todo:
        return 0
    paths = [p for _, p in todo]
    hashes = []
    with process_pool(workers) if workers > 1 else nullcontext() as ex:  # workers die with this process
        for h in (ex.map(_hash_one, paths, chunksize=64) if ex else map(_hash_one, paths)):
            hashes.append(h)
            if progress and (len(hashes) % 64 == 0 or len(hashes) == len(paths)):
                progress(len(hashes), len(paths), "hashing")
    df = pl.DataFrame({"image_id": [i for (i, _), h in zip(todo, hashes) if h is not None],
                       "dhash": [h for h in hashes if h is not None]}, schema={"image_id": pl.Utf8,
                                                                               "dhash": pl.Binary})
    insert_frame(con, "image_hashes", df)
    return df.height


def bits(hashes) -> np.ndarray:
    """[n, 256] 0/1 uint8 matrix of the hashes' bits."""
    return np.unpackbits(np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), -1), axis=1)


def words(hashes) -> np.ndarray:
    """[n, 4] uint64: each 256-bit hash as four words, so popcount(a ^ b) summed is the Hamming distance."""
    return np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), -1).copy().view(np.uint64)


def distance(W: np.ndarray, i, j) -> np.ndarray:
    """Hamming distances between rows i and j of words(...)."""
    return np.bitwise_count(W[i] ^ W[j]).sum(-1, dtype=np.int32)


SMALL_BUCKET = 32      # buckets up to this size: pairs by offset within the sorted bucket; larger: tiles
MIN_CHUNK_BITS = 16    # below this the buckets are too coarse to prune: compare all pairs
TILE_WORDS = 1 << 22   # words per tile of the all-pairs comparison (32 MiB of uint64)


def hamming_pairs(ids, hashes, max_dist: int, workers: int = 1, progress=None) -> dict[tuple, int]:
    """Every pair of hashes within `max_dist` bits, exactly: {(ids[i], ids[j]) with i < j: distance}.

    Multi-index hashing (Norouzi et al., "Fast search in Hamming space with multi-index hashing", CVPR 2012):
    cut the 256 bits into max_dist + 1 disjoint chunks; two hashes within max_dist bits agree on at least
    one whole chunk (pigeonhole), so only pairs sharing a chunk value are compared. The chunks take every
    (max_dist + 1)-th bit rather than neighbouring bits: on chest X-rays neighbouring dHash bits (the dark
    rows at the edges) agree across most images, interleaved chunks far less often (on ../shared/cxr 0.7%
    of all pairs are compared instead of 6%). Exact: the same pairs as comparing all of them."""
    if max_dist < 0:  # no distance is that small
        return {}
    n_chunks = max_dist + 1
    if len(hashes) < 2 or 256 // n_chunks < MIN_CHUNK_BITS:
        return all_pairs(ids, hashes, max_dist)
    W, B = words(hashes), bits(hashes)
    # a chunk longer than 64 bits keys on its first 64: a coarser bucket, still exact after the check
    keys = (_key(B, np.arange(c, 256, n_chunks)[:64]) for c in range(n_chunks))
    found = []
    with ThreadPoolExecutor(max(1, workers)) as ex:  # numpy releases the GIL in these loops
        for c, f in enumerate(ex.map(lambda key: _bucket_pairs(W, key, max_dist), keys)):
            found.append(f)
            if progress:
                progress(c + 1, n_chunks, "comparing hashes")
    return _as_dict(ids, found)


def all_pairs(ids, hashes, max_dist: int) -> dict[tuple, int]:
    """What hamming_pairs returns, by comparing every pair (O(n^2): the reference it is checked against)."""
    return _as_dict(ids, [_all_pairs(words(hashes), np.arange(len(hashes)), max_dist)] if len(hashes) > 1 else [])


def _as_dict(ids, found) -> dict[tuple, int]:
    if not found:
        return {}
    i, j, d = (np.concatenate([f[k] for f in found]) for k in range(3))
    _, first = np.unique(i.astype(np.int64) * len(ids) + j, return_index=True)  # a pair found by several chunks
    return {(ids[a], ids[b]): int(x) for a, b, x in zip(i[first], j[first], d[first])}


def _key(B: np.ndarray, cols: np.ndarray) -> np.ndarray:
    packed = np.packbits(B[:, cols], axis=1)
    packed = np.pad(packed, ((0, 0), (0, 8 - packed.shape[1])))
    return np.ascontiguousarray(packed).view(">u8").ravel()


def _bucket_pairs(W, key, max_dist):
    """Pairs (i < j) with equal key and distance <= max_dist."""
    n = len(key)
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, n])
    end = np.repeat(starts + sizes, sizes)
    size = np.repeat(sizes, sizes)
    out = []
    p = np.flatnonzero((size >= 2) & (size <= SMALL_BUCKET))
    for off in range(1, SMALL_BUCKET):  # p and p + off in the same small bucket
        p = p[p + off < end[p]]
        if not len(p):
            break
        a, b = order[p], order[p + off]
        d = distance(W, a, b)
        hit = d <= max_dist
        out.append((np.minimum(a, b)[hit], np.maximum(a, b)[hit], d[hit]))
    for s, m in zip(starts[sizes > SMALL_BUCKET], sizes[sizes > SMALL_BUCKET]):
        out.append(_all_pairs(W, order[s:s + m], max_dist))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return tuple(np.concatenate(x) for x in zip(*out))


def _all_pairs(W, members, max_dist):
    """Pairs among `members` (row numbers of W) within max_dist, compared in tiles."""
    Wm = W[members]
    m = len(members)
    rows = max(1, TILE_WORDS // (4 * m))
    I, J, D = [], [], []
    for r0 in range(0, m - 1, rows):
        blk = Wm[r0:r0 + rows]
        d = np.bitwise_count(blk[:, None, :] ^ Wm[None, r0 + 1:, :]).sum(-1, dtype=np.int32)
        ii, jj = np.nonzero(d <= max_dist)
        jj = jj + r0 + 1
        keep = jj > ii + r0  # the upper triangle only
        a, b = members[ii[keep] + r0], members[jj[keep]]
        I.append(np.minimum(a, b))
        J.append(np.maximum(a, b))
        D.append(d[ii[keep], jj[keep] - r0 - 1])
    if not I:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(I), np.concatenate(J), np.concatenate(D)


def embedding_pairs(con, s, Xn: np.ndarray, eids, k: int, cosine_min: float, search: str = "auto", say=None,
                    progress=None) -> dict[tuple, float]:
    """Pairs (image_a < image_b) among each image's k nearest neighbours with cosine >= cosine_min.
    Xn: the set's unit vectors, one per image_id in eids. search: auto/ann/exact (featstore.ann.knn)."""
    from featstore.ann import to_stderr, knn

    if progress:
        progress(0, 1, "embedding neighbours")
    nn = knn(con, s, Xn, eids, k, method=search, say=say or to_stderr, progress=progress)
    if progress:
        progress(1, 1, "embedding neighbours")
    return pairs_among(Xn, eids, nn, cosine_min)


def pairs_among(Xn: np.ndarray, eids, nn: np.ndarray, cosine_min: float) -> dict[tuple, float]:
    """The pairs (row, one of its neighbours nn[row]) with cosine >= cosine_min, keyed (image_a < image_b)."""
    from featstore.ann import pair_sims

    out: dict[tuple, float] = {}
    for start in range(0, len(nn), 4096):
        rows = np.arange(start, min(start + 4096, len(nn)))
        sims = pair_sims(Xn, rows, nn[rows])
        for i, j in zip(*np.nonzero(sims >= cosine_min)):
            a, b = eids[rows[i]], eids[nn[rows[i], j]]
            out[(a, b) if a < b else (b, a)] = float(sims[i, j])
    return out


# Wider candidates, each checked by local-feature matching (featstore/copymatch.py): finds the copies the
# two global rules miss (dHash 11-140 bits, cosine 0.82-0.98). Measured on ../shared/cxr, mobilenetv3-nih-onnx:
# of the copies confirmed by matching, 200 are each other's first cosine neighbour, 223 of 226 are among the
# CAND_K nearest with cosine at least the set's CAND_QUANTILE-th first-neighbour cosine (0.930 there; a
# quantile, so each backbone's cone of embeddings sets its own number), or within CAND_PHASH bits (also of the
# images with their uniform borders trimmed: padded copies).
CAND_K = 5
CAND_QUANTILE = 10
CAND_PHASH = 20


def candidate_cosine(Xn: np.ndarray, nn: np.ndarray) -> float:
    """The set's CAND_QUANTILE-th percentile of each image's first-neighbour cosine (per backbone)."""
    from featstore.ann import pair_sims

    if not len(nn) or not nn.shape[1]:
        return 1.0
    first = pair_sims(Xn, np.arange(len(nn)), nn[:, :1])[:, 0]
    return float(np.percentile(first, CAND_QUANTILE))


def verify_pairs(paths: dict, candidates, workers: int = 2, progress=None) -> dict[tuple, object]:
    """{pair: copymatch.Match} for candidate pairs (image ids); paths: image_id -> file."""
    from featstore import copymatch

    need = sorted({i for p in candidates for i in p})
    feats = {}
    with process_pool(workers) if workers > 1 else nullcontext() as ex:  # workers die with this process
        it = ex.map(copymatch.features_of_file, [paths[i] for i in need], chunksize=32) if ex else \
            map(copymatch.features_of_file, [paths[i] for i in need])
        for n, (i, f) in enumerate(zip(need, it), 1):
            feats[i] = f
            if progress and (n % 64 == 0 or n == len(need)):
                progress(n, len(need), "local features")
    cand = sorted(candidates)
    out = {}
    with ThreadPoolExecutor(max(1, workers)) as ex:  # OpenCV releases the GIL while matching
        for n, (p, m) in enumerate(zip(cand, ex.map(lambda p: copymatch.compare(feats[p[0]], feats[p[1]]), cand)), 1):
            out[p] = m
            if progress and (n % 256 == 0 or n == len(cand)):
                progress(n, len(cand), "matching candidate pairs")
    return out


def find(con, backbone: str | None = None, preprocess: str = "original", cosine_min: float = COSINE_MIN,
         phash_max: int = PHASH_MAX, k: int = 10, workers: int = 2, accept_implausible: bool = False,
         progress=None, search: str = "auto", say=None, match: bool = True) -> pl.DataFrame:
    """Find near-duplicate pairs, replace the table's rows, return them. progress(done, total, phase).
    search: how the embedding neighbours are found (auto: exact below featstore.ann.ALL_ANN_MIN images).
    match: also check wider candidates by local-feature matching (method 'matched' when only it found them)."""
    from featstore import copymatch

    ensure_hashes(con, workers, progress)
    meta = hashed_images(con)
    ids = meta["image_id"].to_numpy()
    pos = {v: i for i, v in enumerate(ids)}
    wide = max(phash_max, CAND_PHASH) if match else phash_max
    hashed = hamming_pairs(ids, meta["dhash"].to_list(), wide, workers, progress)
    pairs = {key: dict(phash_distance=d, cosine=None, method="phash") for key, d in hashed.items() if d <= phash_max}
    candidates = set(hashed) if match else set()
    if match:  # bordered and padded copies: the same picture once the uniform edges are trimmed
        th = trimmed_hashes(meta["path"].to_list(), workers)
        keep = [i for i, h in enumerate(th) if h is not None]
        candidates |= set(hamming_pairs(ids[keep], [th[i] for i in keep], CAND_PHASH, workers))
    Xn = None
    if backbone:
        from featstore.ann import knn, resolve_set, to_stderr, unit_vectors

        es = resolve_set(con, backbone, preprocess)
        Xn, m = unit_vectors(con, es)
        eids = m["image_id"].to_numpy()
        if progress:
            progress(0, 1, "embedding neighbours")
        nn = knn(con, es, Xn, eids, max(k, CAND_K if match else 0), method=search, say=say or to_stderr,
                 progress=progress)
        if progress:
            progress(1, 1, "embedding neighbours")
        for key, c in pairs_among(Xn, eids, nn[:, :k], cosine_min).items():
            p = pairs.setdefault(key, dict(phash_distance=None, cosine=None, method="embedding"))
            p["cosine"] = c
            if p["method"] == "phash":
                p["method"] = "both"
        if match:
            candidates |= set(pairs_among(Xn, eids, nn[:, :CAND_K], candidate_cosine(Xn, nn)))
        epos = {v: i for i, v in enumerate(eids)}
    if match:
        paths = dict(zip(ids, meta["path"]))
        for key, mt in verify_pairs(paths, candidates - set(pairs), workers, progress).items():
            if copymatch.is_copy(mt):
                pairs[key] = dict(phash_distance=None, cosine=None, method="matched")
    if backbone:
        for (a, b), p in pairs.items():  # both measures for every pair
            if p["cosine"] is None and a in epos and b in epos:
                p["cosine"] = float(Xn[epos[a]] @ Xn[epos[b]])
    W = words(meta["dhash"].to_list())
    for (a, b), p in pairs.items():
        if p["phash_distance"] is None:
            p["phash_distance"] = int(distance(W, pos[a], pos[b]))
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
    if not accept_implausible:
        check_plausible(list(pairs), len(ids), phash_max, cosine_min)
    with transaction(con):  # the old pairs stay unless the new ones are all in
        delete_all_rows(con, "near_duplicates")
        if df.height:
            insert_frame(con, "near_duplicates", df)
    return sheet_order(df)


def sheet_order(pairs: pl.DataFrame) -> pl.DataFrame:
    """Pairs whose images carry different labels first, then across sources (they can leak between
    train and test), then the strongest: found by both rules, highest cosine, smallest dHash distance."""
    return pairs.with_columns(
        _conflict=(pl.col("label_a") != pl.col("label_b")),
        _cross=(pl.col("source_a") != pl.col("source_b")),
        _both=(pl.col("method") == "both")).sort(
        ["_conflict", "_cross", "_both", "cosine", "phash_distance"], descending=[True, True, True, True, False],
        nulls_last=True, maintain_order=True).drop("_conflict", "_cross", "_both")


def contact_sheet(con, out, pairs: pl.DataFrame, n: int = 60, thumb: int = 128, columns: int = 4) -> None:
    """Pairs side by side in a grid, each captioned with short ids, source, label and both measures,
    for a person to check; cross-source and strongest pairs first (sheet_order)."""
    from PIL import ImageDraw, ImageFont

    pairs = sheet_order(pairs).head(n)
    path = image_paths(con)
    cols = max(1, min(columns, pairs.height))
    rows = max(1, -(-pairs.height // cols))
    cap_h, pad = 74, 10
    cell_w, cell_h = 2 * thumb + 4, thumb + cap_h
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow without scalable default font
        font = ImageFont.load_default()
    for k, p in enumerate(pairs.iter_rows(named=True)):
        x0 = pad + (k % cols) * (cell_w + pad)
        y0 = pad + (k // cols) * (cell_h + pad)
        cross = p["source_a"] != p["source_b"]
        draw.rectangle([x0 - 3, y0 - 3, x0 + cell_w + 2, y0 + cell_h + 2], outline=(192, 57, 43) if cross
                       else (170, 170, 170), width=2 if cross else 1)
        for c, iid in enumerate((p["image_a"], p["image_b"])):
            try:
                px = decode_file(path[iid], draft=thumb).pixels
                im = Image.fromarray((np.clip(px, 0, 1) * 255).astype(np.uint8)).resize((thumb, thumb))
            except (DecodeError, OSError, KeyError):
                im = Image.new("L", (thumb, thumb), 128)
            sheet.paste(im.convert("RGB"), (x0 + c * (thumb + 4), y0))
        cos = "n/a" if p["cosine"] is None else f"{p['cosine']:.3f}"
        text = (f"{str(p['image_a'])[:10]}  {p['source_a']} / {p['label_a']}\n"
                f"{str(p['image_b'])[:10]}  {p['source_b']} / {p['label_b']}\n"
                f"cos {cos} · dHash {p['phash_distance']} · {p['method']}" + ("  · ACROSS" if cross else ""))
        draw.multiline_text((x0, y0 + thumb + 4), text, fill=(0, 0, 0), font=font, spacing=3)
    sheet.save(out)


@dataclass
class DuplicatesJob:
    """`featstore duplicates`: find the pairs, replace `near_duplicates`, draw the contact sheet.
    run() returns (pairs, (groups of exact copies, of which across sources), pairs by source pair)."""
    backbone: str | None = None  # also compare this set's embeddings (cosine)
    preprocess: str = "original"
    cosine_min: float = COSINE_MIN
    phash_max: int = PHASH_MAX
    sheet: Path = Path("near_duplicates.png")
    workers: int = 2
    accept_implausible: bool = False
    search: str = "auto"
    db: Path | None = None
    match: bool = True  # also check wider candidates by local-feature matching (featstore/copymatch.py)

    def run(self, progress=None, say=None):
        from featstore.ann import AnnError
        from featstore.api import Store
        from featstore.errors import UserError
        from featstore.progress import silent
        from featstore.store import open_for_command

        con = open_for_command(self.db, must_exist=True)
        try:
            try:
                with (progress or silent)("duplicates") as prog:
                    pairs = find(con, self.backbone, self.preprocess, self.cosine_min, self.phash_max,
                                 workers=self.workers, accept_implausible=self.accept_implausible,
                                 progress=prog.update, search=self.search, say=say, match=self.match)
            except (ImplausibleDuplicates, ValueError, AnnError) as e:
                raise UserError(str(e)) from e
            summary = Store.over(con).near_duplicate_summary(pairs=False)  # the table is there: find() wrote it
            groups, across = summary["exact_groups"], summary["exact_across"]
            by = summary["by_source"].to_arrow()
            if pairs.height:
                contact_sheet(con, self.sheet, pairs)
        finally:
            con.close()
        return pairs, (groups, across), by
