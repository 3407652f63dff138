"""Shared bits of the benchmark scripts: where the data is, what machine this is, peak memory."""
from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEATSTORE_SHARED", REPO.parent / "shared"))
MANIFEST = SHARED / "cxr" / "manifest.csv"
WEIGHTS = SHARED / "weights"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = ""
    try:
        kb = int(next(x for x in open("/proc/meminfo") if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def commit() -> str:
    if os.environ.get("FEATSTORE_COMMIT"):  # a copy of the tree without .git (a lent GPU machine)
        return os.environ["FEATSTORE_COMMIT"]
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


MARK = ".featstore-bench"  # written into each --workdir a benchmark made: the only folders benchmarks clear or remake


def bench_workdir(path: Path, clear: bool = False) -> Path:
    """--workdir as a benchmark's own folder: new (made here and marked), empty, or one a benchmark made
    (marked). The benchmarks remove and remake their stores and subfolders in it, so a folder holding
    anything else is refused, in one line, before anything is touched. clear=True empties a marked folder."""
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{path} is a file, not a folder: give a new folder for --workdir")
    if path.exists() and any(path.iterdir()) and not (path / MARK).is_file():
        raise SystemExit(f"{path} holds files no featstore benchmark made: give a new or empty folder for --workdir "
                         "(nothing was removed)")
    path.mkdir(parents=True, exist_ok=True)
    if clear:
        for p in path.iterdir():
            if p.name == MARK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    (path / MARK).write_text("made by a featstore benchmark (benchmarks/); its contents may be removed by the next\n")
    return path


def need_real_set() -> None:
    if not MANIFEST.exists():
        raise SystemExit(f"SKIPPED: the real CXR set is not at {MANIFEST} (set FEATSTORE_SHARED)")


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            kids.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += kids.get(p, [])
    return total


class PeakMemory:
    """Peak resident memory of this process plus its workers, sampled every `every` seconds."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _tree_rss(os.getpid()))

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (the scripts print these; run_all.py collects them into RESULTS.md)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def goal(what: str, bar: str, measured: str, met: bool | None) -> None:
    """One line for the summary at the top of RESULTS.md (run_all.py takes these out of the section)."""
    print(f"GOAL|{what}|{bar}|{measured}|{'-' if met is None else 'met' if met else 'NOT met'}")


def best_of(fn, repeat: int = 3) -> float:
    """Smallest wall time of `repeat` runs: the least noisy estimate on a shared machine."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
