"""Users install wheels: the wheel built from this tree carries everything the code reads (study
configs, schema, migrations, example queries, report templates) and runs `featstore demo` in a fresh
virtual environment, from a folder outside the repository, with the source tree not importable."""
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "featstore"


def _missing_build_tool() -> str | None:
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


def _copy_tree(dest: Path) -> Path:
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


def _layers() -> list[str]:
    """The site-packages this interpreter imports dependencies from (how the worktree .venv layers
    the main one): listed in a .pth, their own .pth files are not run, so no editable featstore."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "FEATSTORE_", "MLFLOW_", "VIRTUAL_ENV"))}
    env["FEATSTORE_OFFLINE"] = "1"  # no weights download: the demo embeds pixelstats only
    return env


def test_the_package_reads_the_one_sql_folder():
    # featstore/sql is the top-level sql/ (a link): a copy could drift from what users read
    assert (PKG / "sql").resolve() == (REPO / "sql").resolve()
    from featstore.store import sql_dir

    assert (sql_dir() / "schema.sql").read_bytes() == (REPO / "sql" / "schema.sql").read_bytes()


@pytest.mark.slow  # a wheel built, a venv made, the demo run: in `make test`, not the edit-test loop
def test_the_wheel_runs_the_demo_in_a_fresh_venv(tmp_path):
    why = _missing_build_tool()
    if why:
        pytest.skip(why)
    env = _clean_env()
    src = _copy_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    b = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "-w", str(dist), str(src)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert b.returncode == 0, b.stdout + b.stderr
    (whl,) = dist.glob("featstore-*.whl")

    # the wheel holds every data file the code reads, byte for byte
    with zipfile.ZipFile(whl) as z:
        inside = {n: z.read(n) for n in z.namelist() if n.startswith("featstore/")}
    wanted = {f"featstore/sql/{p.relative_to(REPO / 'sql').as_posix()}": p for p in (REPO / "sql").rglob("*.sql")}
    wanted |= {f"featstore/{p.relative_to(PKG).as_posix()}": p
               for p in [*(PKG / "studies").glob("*.yaml"), *(PKG / "studies").glob("*.toml"),
                         *(PKG / "templates").glob("*.j2")]}
    assert "featstore/sql/schema.sql" in wanted and "featstore/studies/synthetic_demo.yaml" in wanted
    assert len([n for n in wanted if n.startswith("featstore/sql/migrations/")]) >= 5
    for name, path in wanted.items():
        assert inside.get(name) == path.read_bytes(), f"{name} missing from the wheel or differs from {path}"

    # a fresh venv that sees the dependencies but not this source tree
    ve = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(ve)
    py = ve / "bin" / "python"
    purelib = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True, env=env).stdout.strip())
    (purelib / "_layers.pth").write_text("\n".join(_layers()) + "\n")
    run_dir = tmp_path / "elsewhere"  # outside the repository
    run_dir.mkdir()
    probe = [py, "-c", "import featstore, featstore.store as s, featstore.sweep.config as st; "
                       "print(featstore.__file__); print(s.sql_dir()); print(st.packaged_studies()['synthetic_demo.yaml'])"]
    before = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=run_dir)
    assert before.returncode != 0 and "No module named 'featstore'" in before.stderr, before.stdout + before.stderr

    i = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--quiet",
                        str(whl)], capture_output=True, text=True, env=env, cwd=run_dir, timeout=600)
    assert i.returncode == 0, i.stdout + i.stderr
    after = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=run_dir)
    assert after.returncode == 0, after.stderr
    for line in after.stdout.split():
        assert Path(line).resolve().is_relative_to(purelib.resolve()), f"{line}: not the installed wheel's"

    # the quickest demo: few images, one Optuna trial per study
    d = run_dir / "demo"
    r = subprocess.run([ve / "bin" / "featstore", "demo", "--out", str(d), "--n-per-source", "20", "--trials", "1"],
                       capture_output=True, text=True, env=env, cwd=run_dir, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "SYNTHETIC" in out and "synthetic-bad" in out and "leave-pair-out" in out
    assert (d / "report" / "report.html").is_file() and (d / "report" / "report.md").is_file()
    assert (d / "mlflow.db").is_file()
    with duckdb.connect(str(d / "featstore.duckdb"), read_only=True) as con:
        n_images = con.execute("SELECT count(*) FROM images").fetchall()[0][0]
        n_rows = con.execute("SELECT count(*) FROM results WHERE study = 'synthetic-demo' AND status = 'ok'"
                             ).fetchall()[0][0]
        version = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
    from featstore.store import SCHEMA_VERSION

    assert n_images >= 80 and n_rows > 0 and version == SCHEMA_VERSION  # every migration ran from the wheel
