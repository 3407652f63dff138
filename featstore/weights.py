"""Finding weight files: --weights-dir / FEATSTORE_WEIGHTS_DIR first, then the library's
own cache, then the normal download. Offline, a missing file fails with a message that
names the file and where to put it. FEATSTORE_OFFLINE=1 forbids any download."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

RANDOM_INIT = "random-init"


class WeightsMissingError(FileNotFoundError):
    pass


def weights_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    d = explicit or os.environ.get("FEATSTORE_WEIGHTS_DIR")
    return Path(d).expanduser() if d else None


def offline() -> bool:
    return os.environ.get("FEATSTORE_OFFLINE", "") not in ("", "0", "false", "no")


def resolve(filename: str, url: str | None, wdir: Path | None, cache_dir: Path,
            download: Callable[[str, Path], None] | None = None, what: str = "") -> Path:
    """Path of `filename`, downloading it into cache_dir when allowed and possible."""
    looked = []
    if wdir is not None:
        p = wdir / filename
        if p.is_file():
            return p
        looked.append(str(p))
    p = cache_dir / filename
    if p.is_file():
        return p
    looked.append(str(p))
    where = f"put {filename} at {wdir / filename if wdir else p}" + (
        "" if wdir else f" (or in a folder given by --weights-dir / FEATSTORE_WEIGHTS_DIR)")
    source = f" from {url}" if url else ""
    if url is None or download is None:
        raise WeightsMissingError(f"weights for {what or filename} not found (looked in: {', '.join(looked)}); "
                                  f"no public download is registered: {where}")
    if offline():
        raise WeightsMissingError(f"weights for {what or filename} not found (looked in: {', '.join(looked)}) and "
                                  f"FEATSTORE_OFFLINE is set: download{source} and {where}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        download(url, p)
    except Exception as e:  # no network, HTTP error, disk full: all mean the same to the user
        if p.exists() and p.stat().st_size == 0:
            p.unlink()
        raise WeightsMissingError(f"weights for {what or filename} could not be downloaded ({type(e).__name__}: {e}); "
                                  f"download{source} by hand and {where}") from e
    return p


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(path: str | os.PathLike) -> str:
    return "sha256:" + sha256_file(path)


def http_download(url: str, dest: Path) -> None:
    import torch.hub

    tmp = dest.with_suffix(dest.suffix + ".part")
    torch.hub.download_url_to_file(url, str(tmp), progress=True)
    tmp.replace(dest)
