"""Read an X-ray file of any supported format into a grayscale float32 array in [0, 1].

PNG (8/16-bit), JPEG and other Pillow formats, DICOM (pydicom) and 2-D NIfTI (nibabel).
Every failure raises DecodeError with a reason a person can act on.
"""
from __future__ import annotations

import errno
import gzip
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Files above this are refused before they are read (a 2 GB non-image must not land in memory).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


class DecodeError(ValueError):
    pass


def max_bytes_default() -> int:
    """FEATSTORE_MAX_BYTES when set (bytes), else DEFAULT_MAX_BYTES."""
    v = os.environ.get("FEATSTORE_MAX_BYTES", "").strip()
    if not v:
        return DEFAULT_MAX_BYTES
    try:
        n = int(v)
    except ValueError:
        raise DecodeError(f"FEATSTORE_MAX_BYTES={v!r} is not a whole number of bytes") from None
    if n < 1:
        raise DecodeError(f"FEATSTORE_MAX_BYTES={v!r} must be at least 1")
    return n


@dataclass
class Decoded:
    pixels: np.ndarray  # float32, (height, width), 0 = black, 1 = white (uint8 0..255 when asked, 8-bit only)
    width: int
    height: int
    bit_depth: int
    format: str


# Signatures of formats Pillow reads: they win over a misleading extension (a JPEG saved as x.dcm).
_MAGIC_NAMES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
                b"GIF8": "GIF", b"BM": "BMP"}
_PIL_MAGIC = tuple(_MAGIC_NAMES)


def sniff_format(data: bytes, name: str = "") -> str:
    low = name.lower()
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    if data.startswith(_PIL_MAGIC):
        return "PIL"
    if low.endswith((".dcm", ".dicom")):
        return "DICOM"
    if low.endswith((".nii", ".nii.gz")) or (len(data) >= 348 and data[344:348] in (b"n+1\0", b"ni1\0")):
        return "NIFTI"
    return "PIL"


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file: not opened"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node, not a regular file: not read"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file: not opened"
    return "not a regular file: not opened"


def stat_error(path: str | Path, e: OSError) -> str:
    """The reason a path cannot be looked at, in words."""
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return "broken symlink (its target does not exist)" if os.path.islink(path) else "file not found"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"cannot read file: {e.strerror or e}"


def read_regular(path: str | Path, max_bytes: int | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and its stat, or DecodeError saying why not.

    Only regular files are opened (checked with stat before any open, so a FIFO never blocks us
    and /dev/zero is never read), and never more than `max_bytes` bytes (default: FEATSTORE_MAX_BYTES
    or 512 MiB). O_NONBLOCK and the fstat after open close the gap where the path is swapped for a
    FIFO or device between the two calls."""
    cap = max_bytes_default() if max_bytes is None else max_bytes
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        raise DecodeError(stat_error(path, e) if isinstance(e, OSError) else f"unusable path: {e}") from e
    why = _not_regular(st.st_mode)
    if why:
        raise DecodeError(why)
    if st.st_size > cap:
        raise DecodeError(f"file too large ({st.st_size} bytes, over the {cap}-byte cap; "
                          "--max-bytes or FEATSTORE_MAX_BYTES raises it)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DecodeError(stat_error(path, e)) from e
    try:
        st = os.fstat(fd)
        why = _not_regular(st.st_mode)
        if why:
            raise DecodeError(why)
        chunks, n = [], 0
        while n <= cap:  # the file may grow after the stat: read at most cap + 1 bytes
            # ask for what stat promised plus a little, so a whole file is usually one read and no copy
            b = os.read(fd, min(max(st.st_size - n, 0) + (1 << 16), cap + 1 - n, 1 << 30))
            if not b:
                break
            chunks.append(b)
            n += len(b)
    except OSError as e:
        raise DecodeError(f"cannot read file: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if n > cap:
        raise DecodeError(f"file too large (over the {cap}-byte cap; --max-bytes or FEATSTORE_MAX_BYTES "
                          "raises it)")
    data = b"".join(chunks)
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return data, st


def read_file(path: str | Path, max_bytes: int | None = None) -> bytes:
    return read_regular(path, max_bytes)[0]


def decode_bytes(data: bytes, name: str = "", draft: int | None = None, uint8: bool = False) -> Decoded:
    """Decode file bytes. `draft` lets JPEG decode at a reduced scale no smaller than
    draft x draft pixels (fast path for embedding; width/height stay the file's). `uint8`: an 8-bit
    image keeps its bytes (v, not v / 255 in float32: a quarter of the memory and no conversion for
    pipelines that resize in uint8); other bit depths are float32 as always."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    kind = sniff_format(data, name)
    if kind == "DICOM":
        d = _decode_dicom(data)
    elif kind == "NIFTI":
        d = _decode_nifti(data, name)
    else:
        d = _decode_pil(data, draft, uint8)
    check_finite(d.pixels)  # every format: no NaN/Inf ever leaves the decoder
    return d


def decode_file(path: str | Path, draft: int | None = None, max_bytes: int | None = None) -> Decoded:
    return decode_bytes(read_file(path, max_bytes), str(path), draft)


def _decode_pil(data: bytes, draft: int | None, uint8: bool = False) -> Decoded:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        fmt = next((n for m, n in _MAGIC_NAMES.items() if data.startswith(m)), None)
        if fmt:  # the signature says what it was meant to be
            raise DecodeError(f"truncated or corrupt {fmt} image: Pillow cannot read its header") from e
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
        arr = np.asarray(im, dtype=np.uint8) if uint8 else np.asarray(im, dtype=np.float32) / 255.0
    return Decoded(np.ascontiguousarray(arr, dtype=arr.dtype if uint8 else np.float32), width, height, bits, fmt)


def check_finite(a: np.ndarray) -> None:
    """NaN or Inf pixels are refused: they survive min-max scaling as NaN and poison every
    embedding and neighbour list downstream."""
    if a.dtype.kind not in "fc":
        return
    finite = np.isfinite(a)
    if not finite.all():
        n_nan = int(np.isnan(a).sum())
        raise DecodeError(f"non-finite pixel values ({n_nan} NaN, {int(a.size - finite.sum()) - n_nan} Inf)")


def _minmax(a: np.ndarray) -> np.ndarray:
    check_finite(a)
    if a.size == 0:
        raise DecodeError("image has zero size")
    a = a.astype(np.float64)  # float32 arithmetic could overflow to Inf on huge finite values
    lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(hi - lo):
        raise DecodeError(f"pixel value range too wide ({lo:g} to {hi:g})")
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


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
    out = _minmax(np.asarray(arr))
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
        arr = np.asarray(img.dataobj)
    except Exception as e:
        raise DecodeError(f"NIfTI data cannot be read: {e}") from e
    if arr.dtype.kind not in "biuf":  # complex, RGB records: not a grey X-ray
        raise DecodeError(f"NIfTI data type {arr.dtype} is not a grey image")
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DecodeError(f"NIfTI is not 2-D (shape {tuple(img.shape)})")
    # NIfTI indexes (x, y) with y pointing up; an image is (row, col) with rows going down.
    arr = np.flipud(arr.T)
    bits = int(img.header.get_data_dtype().itemsize * 8)
    out = _minmax(arr)
    h, w = out.shape
    return Decoded(np.ascontiguousarray(out), int(w), int(h), bits, "NIFTI")
