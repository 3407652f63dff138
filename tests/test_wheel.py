"""Users install wheels: the wheel built from this tree carries everything the code reads (study
configs, schema, migrations, example queries, report templates) and runs `featstore demo` in a fresh
virtual environment, from a folder outside the repository, with the source tree not importable."""
import subprocess
import zipfile
from pathlib import Path

import duckdb
import pytest

from _wheel import PKG, PROBE, REPO, clean_env

# the wheel's build, its venv and the demo run are tests/_wheel.py's, done once per session (the
# `wheel_demo` fixture) and shared with tests/test_demo.py, which asserts on the demo's output


def test_the_package_reads_the_one_sql_folder():
    # featstore/sql is the top-level sql/ (a link): a copy could drift from what users read
    assert (PKG / "sql").resolve() == (REPO / "sql").resolve()
    from featstore.store import sql_dir

    assert (sql_dir() / "schema.sql").read_bytes() == (REPO / "sql" / "schema.sql").read_bytes()


@pytest.mark.slow  # a wheel built, a venv made, the demo run: in `make test`, not the edit-test loop
def test_the_wheel_runs_the_demo_in_a_fresh_venv(wheel_demo):
    if wheel_demo["skip"]:
        pytest.skip(wheel_demo["skip"])
    b = wheel_demo["build"]
    assert b["rc"] == 0, b["stdout"] + b["stderr"]
    (whl,) = map(Path, wheel_demo["wheels"])

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

    # a fresh venv that sees the dependencies but not this source tree: before the install, no featstore
    assert wheel_demo["purelib"]["rc"] == 0, wheel_demo["purelib"]["stderr"]
    before = wheel_demo["before"]
    assert before["rc"] != 0 and "No module named 'featstore'" in before["stderr"], before["stdout"] + before["stderr"]
    i = wheel_demo["install"]
    assert i["rc"] == 0, i["stdout"] + i["stderr"]
    purelib, run_dir = Path(wheel_demo["purelib_dir"]), Path(wheel_demo["run_dir"])
    after = subprocess.run([wheel_demo["python"], "-c", PROBE], capture_output=True, text=True, env=clean_env(),
                           cwd=run_dir)
    assert after.returncode == 0, after.stderr
    for line in after.stdout.split():
        assert Path(line).resolve().is_relative_to(purelib.resolve()), f"{line}: not the installed wheel's"

    # the demo, run from the installed wheel (tests/test_demo.py checks the rest of what it says)
    d, r = Path(wheel_demo["demo_dir"]), wheel_demo["demo"]
    out = r["stdout"] + r["stderr"]
    assert r["rc"] == 0, out[-6000:]
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
