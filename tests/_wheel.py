"""The wheel built from this tree, installed in a fresh virtual environment, running `featstore demo`:
done once per test session (tests/conftest.py's `wheel_demo`, under a file lock all pytest-xdist
workers share), for the two tests that need a demo run: tests/test_wheel.py (what the wheel carries
and that it runs) and tests/test_demo.py (what the demo says and writes). The steps are recorded, not
asserted here: each test asserts on what it checks, so a failed build fails the wheel test, and the
demo test then runs the demo in-process instead."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from conftest import ONNX

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "featstore"
DEMO_ARGS = ["--n-per-source", "20", "--trials", "1"]  # the quickest demo: few images, one Optuna trial per study


def demo_weights_args() -> list[str]:
    """The demo's --weights-dir, in both runs (from the wheel, in-process): the offline ONNX weights when
    present, so it embeds mobilenetv3-nih-onnx as well as pixelstats; else none (pixelstats only)."""
    return ["--weights-dir", str(ONNX.parent)] if ONNX.exists() else []


def missing_build_tool() -> str | None:
    """Why the wheel cannot be built offline here (pip + setuptools without isolation), or None."""
    from importlib.metadata import PackageNotFoundError, version

    # metadata only: importing setuptools here, after another test imported the stdlib's distutils,
    # trips setuptools' distutils shim
    try:
        version("pip")
    except PackageNotFoundError:
        return "pip is not installed: cannot build the wheel offline"
    try:
        v = version("setuptools")
    except PackageNotFoundError:
        return "setuptools is not installed: the wheel's build backend is missing"
    if int(v.split(".")[0]) < 77:  # PEP 639 `license = "MIT"` needs 77
        return f"setuptools {v} is older than the build needs (>=77)"
    return None


def copy_tree(dest: Path) -> Path:
    """The tree as git sees it (tracked and not ignored), links kept: no .venv, no build leftovers,
    and the build writes its build/ and egg-info there, not into the checkout."""
    try:
        names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        names = None
    if names is None:  # not a git checkout: everything but what .gitignore names
        shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache", ".hypothesis",
            "featstore-demo", "mlruns", "mlflow.db", "bench-work", "*.duckdb", "*.duckdb.wal"))
        return dest
    for name in filter(None, names):
        src, dst = REPO / name, dest / name
        if not src.is_symlink() and not src.exists():  # deleted in the work tree, not yet committed
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


def layers() -> list[str]:
    """The site-packages this interpreter imports dependencies from (how the worktree .venv layers
    the main one): listed in a .pth, their own .pth files are not run, so no editable featstore."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "FEATSTORE_", "MLFLOW_", "VIRTUAL_ENV"))}
    env["FEATSTORE_OFFLINE"] = "1"  # no weights download: only the weights in --weights-dir are used
    return env


# imports featstore and names where its package, SQL folder and shipped study come from
PROBE = ("import featstore, featstore.store as s, featstore.sweep.config as st; print(featstore.__file__); "
         "print(s.sql_dir()); print(st.packaged_studies()['synthetic_demo.yaml'])")


def build_and_run_demo(folder: Path) -> Path:
    """Build the wheel, make the venv, probe it before the install, install, run the demo from a folder
    outside the repository. Writes what each step gave to folder/record.json (and returns that path);
    stops at the first step that failed. `skip`: why no wheel can be built here (nothing else then)."""
    rec: dict = {"skip": missing_build_tool()}
    out = folder / "record.json"

    def save() -> Path:
        out.write_text(json.dumps(rec))
        return out

    def step(name, args, **kw) -> bool:
        try:
            p = subprocess.run(args, capture_output=True, text=True, env=env, **kw)
            rec[name] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
        except subprocess.TimeoutExpired as e:
            rec[name] = {"rc": None, "stdout": str(e.stdout or ""), "stderr": f"timed out: {e}"}
        return rec[name]["rc"] == 0

    if rec["skip"]:
        return save()
    env = clean_env()
    src = copy_tree(folder / "src")
    dist = folder / "dist"
    if not step("build", [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "-w", str(dist), str(src)], cwd=folder, timeout=600):
        return save()
    rec["wheels"] = [str(w) for w in dist.glob("featstore-*.whl")]
    if len(rec["wheels"]) != 1:
        return save()

    # a fresh venv that sees the dependencies but not this source tree
    ve = folder / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(ve)
    rec["python"] = str(ve / "bin" / "python")
    if not step("purelib", [rec["python"], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]):
        return save()
    purelib = Path(rec["purelib"]["stdout"].strip())
    rec["purelib_dir"] = str(purelib)
    (purelib / "_layers.pth").write_text("\n".join(layers()) + "\n")
    run_dir = folder / "elsewhere"  # outside the repository
    run_dir.mkdir()
    rec["run_dir"] = str(run_dir)
    step("before", [rec["python"], "-c", PROBE], cwd=run_dir)  # must fail: featstore not installed yet
    if not step("install", [rec["python"], "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                            "--quiet", rec["wheels"][0]], cwd=run_dir, timeout=600):
        return save()
    rec["demo_dir"] = str(run_dir / "demo")
    step("demo", [str(ve / "bin" / "featstore"), "demo", "--out", rec["demo_dir"], *DEMO_ARGS, *demo_weights_args()],
         cwd=run_dir, timeout=1200)
    return save()
