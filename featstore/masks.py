"""Lung masks for the store: made once per image, shared by every lung-ROI variant and backbone,
each recorded in `lung_masks` with how it was made.

Where a mask comes from (method "auto"), in order:
1. `manifest`: a mask file named in the manifest's `mask_path` column (`featstore ingest --mask-col`),
   resolved like the image path; any pixel above zero is lung. Any format featstore decodes.
2. `xrv-pspnet`: torchxrayvision's ChestX-Det PSPNet (Left Lung | Right Lung), when its weights file
   `pspnet_chestxray_best_model_4.pth` is present in --weights-dir / FEATSTORE_WEIGHTS_DIR or in
   torchxrayvision's cache (~/.torchxrayvision). Auto never downloads it; `--masks xrv-pspnet` does
   (unless FEATSTORE_OFFLINE), or fails saying where to put the file.
3. `classical-v1`: the weight-free fallback in featstore/lungs.py.
Every mask then passes [BenAhmed2021]'s checks (featstore/lungs.py:check). A refused mask is kept with
`ok = false` and its reason; embedding a lung variant records that image in `embed_errors` and
leaves it out. Re-making masks (`redo`) replaces the old rows only once every new mask is made, in one
transaction; this module writes no other table: dropping the embeddings built on the old masks is the
embed stage's (embed.forget_lung_variants, which `featstore masks` runs in that same transaction).
"""
from __future__ import annotations

import io
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
from PIL import Image

from featstore.decode import DecodeError, decode_file
from featstore.lungs import MASK_METHODS, WORK, LungMask, MaskError, check, classical_mask
from featstore.procs import process_pool  # workers die with this process
from featstore.store import (image_ids_in, images_to_mask, insert_frame, insert_or_replace_from, lung_mask_rows,
                             manifest_mask_paths, scratch_table, transaction)

METHODS = MASK_METHODS
PSPNET_FILE = "pspnet_chestxray_best_model_4.pth"
PSPNET_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + PSPNET_FILE
PSPNET_SIZE = 512
MAX_SIDE = 1024  # manifest masks are stored at most this large (nearest resize keeps them binary)


@dataclass
class MaskReport:
    n_todo: int = 0
    by_method: Counter = field(default_factory=Counter)   # masks made, per method
    refused: list[tuple[str, str, str]] = field(default_factory=list)   # (image_id, method, reason)
    remade: list[str] = field(default_factory=list)   # redo: images whose mask row was replaced
    note: str = ""


def encode(m: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(m, bool)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("1"), bool)


# --- the three methods --------------------------------------------------------------------------

def _classical_one(item):
    image_id, path = item
    try:
        return image_id, classical_mask(decode_file(path, draft=WORK).pixels), None
    except (DecodeError, MaskError, OSError) as e:
        return image_id, None, str(e)


def _manifest_one(item):
    image_id, mask_path = item
    try:
        m = decode_file(mask_path).pixels > 0
    except (DecodeError, OSError) as e:
        return image_id, None, f"mask file {mask_path} unreadable: {e}"
    if max(m.shape) > MAX_SIDE:
        s = MAX_SIDE / max(m.shape)
        size = (max(1, round(m.shape[1] * s)), max(1, round(m.shape[0] * s)))
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    try:
        return image_id, check(m, "manifest"), None
    except MaskError as e:
        return image_id, None, f"{e} (mask file {mask_path})"


# torchxrayvision's cache folder (its utils.get_cache_dir), named here: looking for the file loads no torch
XRV_CACHE = Path("~") / ".torchxrayvision" / "models_data"


def pspnet_weights(weights_dir: str | Path | None = None, download: bool = False) -> Path | None:
    """The PSPNet weights file, or None when absent and download is False."""
    from featstore import weights as W

    try:
        return W.resolve(PSPNET_FILE, PSPNET_URL, W.weights_dir(weights_dir), XRV_CACHE.expanduser(),
                         W.http_download if download else None, what="torchxrayvision lung segmentation (PSPNet)")
    except W.WeightsMissingError:
        if download:
            raise
        return None


class PSPNetMasker:
    """torchxrayvision's ChestX-Det PSPNet; lungs = Left Lung | Right Lung at probability > 0.5."""

    def __init__(self, weights: Path, device: str = "cpu"):
        import torch
        import torchxrayvision as xrv

        from featstore.weights import weights_identity

        self.model = xrv.baseline_models.chestx_det.PSPNet(cache_dir=str(weights.parent)).to(device).eval()
        self.lungs = [self.model.targets.index("Left Lung"), self.model.targets.index("Right Lung")]
        self.device, self.torch = device, torch
        self.weights_id = weights_identity(weights)

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        x = np.stack([np.asarray(Image.fromarray(np.asarray(a, np.float32)).resize((PSPNET_SIZE, PSPNET_SIZE),
                                                                                   Image.BILINEAR)) for a in images])
        x = torch.from_numpy(x[:, None] * 2048.0 - 1024.0).to(self.device)  # torchxrayvision's range
        with torch.inference_mode():
            p = torch.sigmoid(self.model(x)[:, self.lungs])
        return list((p > 0.5).any(1).cpu().numpy())


def _pspnet_all(items, masker: PSPNetMasker, batch: int = 4, progress=None):
    out, done = [], 0
    for i in range(0, len(items), batch):
        chunk, imgs = [], []
        for image_id, path in items[i:i + batch]:
            try:
                imgs.append(decode_file(path, draft=PSPNET_SIZE).pixels)
                chunk.append(image_id)
            except (DecodeError, OSError) as e:
                out.append((image_id, None, str(e)))
        for image_id, m in zip(chunk, masker(imgs) if imgs else []):
            try:
                out.append((image_id, check(m, "xrv-pspnet"), None))
            except MaskError as e:
                out.append((image_id, None, str(e)))
        done += len(items[i:i + batch])
        if progress:
            progress(done)
    return out


# --- the store ----------------------------------------------------------------------------------

def _rows(results, method: str, made_from: dict[str, str] | str | None) -> pl.DataFrame:
    now = datetime.now()
    recs = []
    for image_id, lm, reason in results:
        src = made_from.get(image_id) if isinstance(made_from, dict) else made_from
        rec = {"image_id": image_id, "method": method, "made_from": src, "ok": lm is not None, "reason": reason,
               "made_at": now, "fraction": None, "box_top": None, "box_bottom": None, "box_left": None,
               "box_right": None, "height": None, "width": None, "mask": None}
        if isinstance(lm, LungMask):
            h, w = lm.mask.shape
            t, b, l, r = lm.bbox
            rec.update(fraction=lm.fraction, box_top=t / h, box_bottom=b / h, box_left=l / w, box_right=r / w,
                       height=h, width=w, mask=encode(lm.mask))
        recs.append(rec)
    return pl.DataFrame(recs, schema={
        "image_id": pl.Utf8, "method": pl.Utf8, "made_from": pl.Utf8, "ok": pl.Boolean, "reason": pl.Utf8,
        "made_at": pl.Datetime("us"), "fraction": pl.Float64, "box_top": pl.Float64, "box_bottom": pl.Float64,
        "box_left": pl.Float64, "box_right": pl.Float64, "height": pl.Int32, "width": pl.Int32, "mask": pl.Binary})


def ensure_masks(con, image_ids: list[str] | None = None, method: str = "auto", weights_dir=None,
                 workers: int = 2, redo: bool = False, device: str = "cpu", progress=None,
                 on_replace: Callable[[object, list[str]], object] | None = None) -> MaskReport:
    """Make the masks that are missing (all of `image_ids`' masks with redo) and record them.

    Without redo each method's masks are stored as made (a killed run keeps them; the next one makes
    the rest). With redo the new rows are staged and replace the old ones in one transaction at the
    end, so a redo that fails or is killed leaves every old mask; on_replace(con, ids) runs inside
    that transaction (`featstore masks` drops the embeddings built on the old masks there)."""
    if method not in METHODS:
        raise ValueError(f"unknown mask method '{method}' (known: {', '.join(METHODS)})")
    psp = None
    if method == "xrv-pspnet":  # asked for by name: download when allowed, else say where the file goes
        psp = pspnet_weights(weights_dir, download=True)
    todo = images_to_mask(con, image_ids, redo)
    rep = MaskReport(n_todo=len(todo))
    if not todo:
        return rep
    done = [0]

    def tick(n):
        done[0] += n
        if progress:
            progress(done[0], len(todo))

    def save(results, m, made_from, ticked=False):
        insert_frame(con, "_new_masks" if redo else "lung_masks", _rows(results, m, made_from))
        rep.by_method[m] += len(results)
        rep.refused += [(i, m, r) for i, lm, r in results if lm is None]
        if not ticked:
            tick(len(results))

    # with redo the new rows wait in a scratch table (memory, spilling to disk) until every one is made
    with scratch_table(con, "_new_masks", like="lung_masks") if redo else nullcontext():
        from_manifest = manifest_mask_paths(con, [i for i, _ in todo]) if method in ("auto", "manifest") else {}
        rest = [(i, p) for i, p in todo if i not in from_manifest]
        if from_manifest:
            save(_map(_manifest_one, sorted(from_manifest.items()), workers, tick), "manifest", from_manifest, True)
        if method == "manifest" and rest:
            save([(i, None, "no mask file in the manifest's mask_path column") for i, _ in rest], "manifest", None)
            rest = []
        if rest and method == "auto":
            psp = pspnet_weights(weights_dir)
            if psp is None:
                rep.note = (f"lung masks by classical-v1: torchxrayvision's segmentation weights ({PSPNET_FILE}) are "
                            "not in --weights-dir / FEATSTORE_WEIGHTS_DIR or ~/.torchxrayvision")
        if rest and psp is not None:
            masker = PSPNetMasker(psp, device)
            base = done[0]
            step = (lambda n: progress(base + n, len(todo))) if progress else None
            save(_pspnet_all(rest, masker, progress=step), "xrv-pspnet", masker.weights_id)
        elif rest:
            save(_map(_classical_one, rest, workers, tick), "classical-v1", None, True)
        if redo:
            with transaction(con):
                insert_or_replace_from(con, "lung_masks", "_new_masks")
                rep.remade = image_ids_in(con, "_new_masks")
                if on_replace:
                    on_replace(con, rep.remade)
    return rep


def _map(fn, items, workers, progress=None):
    """[fn(x) for x in items], in worker processes when there are many; progress(n) after each result
    (a log then shows 10% lines as the masks are made, not one line when all are done)."""
    out = []
    if workers > 1 and len(items) > 32:
        with process_pool(workers) as ex:
            for r in ex.map(fn, items, chunksize=max(1, min(16, len(items) // (10 * workers)))):
                out.append(r)
                if progress:
                    progress(1)
        return out
    for x in items:
        out.append(fn(x))
        if progress:
            progress(1)
    return out


def load_masks(con, image_ids: list[str]) -> dict[str, tuple[bytes | None, str, str | None]]:
    """image_id -> (1-bit PNG or None when refused, method, reason)."""
    return {i: (bytes(m) if m is not None else None, meth, r) for i, m, meth, r in lung_mask_rows(con, image_ids)}
