"""Read an X-ray file of any supported format into a grayscale float32 array in [0, 1].

PNG (8/16-bit), JPEG and other Pillow formats, DICOM (pydicom) and 2-D NIfTI (nibabel).
Every failure raises DecodeError with a reason a person can act on.
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DecodeError(ValueError):
    pass


@dataclass
class Decoded:
    pixels: np.ndarray  # float32, (height, width), 0 = black, 1 = white
    width: int
    height: int
    bit_depth: int
    format: str


def sniff_format(data: bytes, name: str = "") -> str:
    low = name.lower()
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    if low.endswith((".dcm", ".dicom")):
        return "DICOM"
    if low.endswith((".nii", ".nii.gz")) or (len(data) >= 348 and data[344:348] in (b"n+1\0", b"ni1\0")):
        return "NIFTI"
    return "PIL"


def read_file(path: str | Path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise DecodeError("file not found")
    if p.is_dir():
        raise DecodeError("is a directory, not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DecodeError(f"cannot read file: {e.strerror or e}") from e
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return data


def decode_bytes(data: bytes, name: str = "", draft: int | None = None) -> Decoded:
    """Decode file bytes. `draft` lets JPEG decode at a reduced scale no smaller than
    draft x draft pixels (fast path for embedding; width/height stay the file's)."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    kind = sniff_format(data, name)
    if kind == "DICOM":
        return _decode_dicom(data)
    if kind == "NIFTI":
        return _decode_nifti(data, name)
    return _decode_pil(data, draft)


def decode_file(path: str | Path, draft: int | None = None) -> Decoded:
    return decode_bytes(read_file(path), str(path), draft)


def _decode_pil(data: bytes, draft: int | None) -> Decoded:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise DecodeError("not an image (no known image format)") from e
    fmt = im.format or "UNKNOWN"
    width, height = im.size
    mode = im.mode
    if draft and fmt == "JPEG":
        im.draft("L", (draft, draft))
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"truncated or corrupt {fmt} image: {e}") from e
    if width == 0 or height == 0:
        raise DecodeError(f"{fmt} image has zero size")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
        bits = 16
    elif mode == "I":  # 32-bit int; PNG 16-bit sometimes opens this way
        raw = np.asarray(im, dtype=np.int64)
        bits = 16 if raw.max(initial=0) <= 65535 and raw.min(initial=0) >= 0 else 32
        arr = (raw.astype(np.float64) / (2**bits - 1)).astype(np.float32)
    elif mode == "F":
        raw = np.asarray(im, dtype=np.float32)
        arr, bits = _minmax(raw), 32
    elif mode == "1":
        arr, bits = np.asarray(im.convert("L"), dtype=np.float32) / 255.0, 1
    else:
        # L, LA, P, RGB, RGBA, CMYK, ...: ITU-R 601 luma; alpha is dropped.
        bits = 8
        if mode != "L":
            # palettes and CMYK/YCbCr go through RGB so the luma weights apply to real colours
            im = im.convert("RGB").convert("L") if mode in ("P", "PA", "CMYK", "YCbCr") else im.convert("L")
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return Decoded(np.ascontiguousarray(arr, dtype=np.float32), width, height, bits, fmt)


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DecodeError("image has no finite pixel values")
    if hi <= lo:
        return np.zeros_like(a, dtype=np.float32)
    return (a - lo) / (hi - lo)


def _decode_dicom(data: bytes) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
        raise DecodeError(f"unreadable DICOM: {e}") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("DICOM has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken/unsupported pixel data
        raise DecodeError(f"DICOM pixel data cannot be decoded: {e}") from e
    if arr.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        if arr.shape[0] != 1:
            raise DecodeError(f"DICOM has {arr.shape[0]} frames; only single-frame X-rays are supported")
        arr = arr[0]
    if arr.ndim == 3:  # colour DICOM (secondary capture): to luma
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        arr = apply_modality_lut(arr, ds)  # rescale slope / intercept
        arr = apply_voi_lut(arr, ds)  # VOI LUT, else window centre / width
    out = _minmax(np.asarray(arr, dtype=np.float32))
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: low values are white
    h, w = out.shape
    return Decoded(np.ascontiguousarray(out), int(w), int(h), int(ds.get("BitsStored", 16)), "DICOM")


def _decode_nifti(data: bytes, name: str) -> Decoded:
    import nibabel as nib

    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        img = nib.Nifti1Image.from_bytes(data)
    except Exception as e:  # nibabel raises several types for bad headers/short data
        try:
            img = nib.Nifti2Image.from_bytes(data)
        except Exception:
            raise DecodeError(f"unreadable NIfTI: {e}") from e
    try:
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise DecodeError(f"NIfTI data cannot be read: {e}") from e
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DecodeError(f"NIfTI is not 2-D (shape {tuple(img.shape)})")
    # NIfTI indexes (x, y) with y pointing up; an image is (row, col) with rows going down.
    arr = np.flipud(arr.T)
    bits = int(img.header.get_data_dtype().itemsize * 8)
    out = _minmax(arr)
    h, w = out.shape
    return Decoded(np.ascontiguousarray(out), int(w), int(h), bits, "NIFTI")
