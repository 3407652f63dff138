"""Files a command wrote into a user's folder, listed in a manifest beside them, so that a later run
replaces or removes exactly those and never a file the user put there (export, report, demo)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path


class NotOurs(FileExistsError):
    """A file is where the command would write, and no earlier run of it wrote that file."""


def listing(root: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Every file (and link) under root, not following links: relative POSIX path -> size."""
    files = {}
    for d, dirs, names in os.walk(root):
        for n in names + [x for x in dirs if (Path(d) / x).is_symlink()]:
            p = Path(d) / n
            rel = p.relative_to(root).as_posix()
            if rel not in skip:
                files[rel] = p.lstat().st_size
    return files


def write_json_atomic(path: Path, obj) -> None:
    """Write, flush to disk, then rename over `path`: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path, key: str = "files", optional: bool = False) -> dict | None:
    """The manifest's `key` (a dict; {} when missing and optional); None when there is no manifest.
    ValueError when it is not one."""
    if not os.path.lexists(path):
        return None
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            raise ValueError("not a regular file")
        obj = json.loads(path.read_text(encoding="utf-8"))
        obj = obj.get(key, {}) if optional and isinstance(obj, dict) else obj[key]
        if not isinstance(obj, dict):
            raise ValueError(f"no {key} list")
        return obj
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"{path} cannot be read ({e})") from e


def is_own(root: Path, rel: str, files: dict[str, int]) -> bool:
    """rel is a regular file the manifest lists, unchanged in size, reached from root without links."""
    if rel not in files or rel.startswith("/") or ".." in rel.split("/"):
        return False
    p = root
    for part in rel.split("/")[:-1]:
        p = p / part
        if p.is_symlink():
            return False
    try:
        st = (p / rel.split("/")[-1]).lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == files[rel]


def remove_own(root: Path, files: dict[str, int]) -> None:
    """Remove the listed files (each checked again), then the folders they leave empty."""
    dirs = set()
    for rel in files:
        p = root / rel
        if os.path.lexists(p) and is_own(root, rel, files):
            p.unlink()
            dirs.update(p.parents)
    for d in sorted((d for d in dirs if root in d.parents), key=lambda d: len(d.parts), reverse=True):
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


def shown(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
