"""The command line around the comparison UI, as a researcher meets it: `--version`, one-line usage
errors, plain help, 'did you mean' for study names, `featstore ui` that refuses a missing store and
starts one server process, and sweep runs that record no absolute path of the checkout."""
import duckdb
import pytest
from typer.testing import CliRunner

from featstore import track
from featstore.cli import app


def _run(*args):
    return CliRunner().invoke(app, list(args))


def test_version():
    import featstore

    r = _run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"featstore {featstore.__version__}"


def test_a_usage_error_is_one_line_and_exit_2():
    r = _run("sweep", "--bogus", "x")
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: No such option: --bogus") and "--help`)" in lines[0], \
        r.output
    assert "╭" not in r.output and "│" not in r.output


def test_help_is_plain_text():
    r = _run("sweep", "--help")
    assert r.exit_code == 0 and "CONFIG" in r.output and "<bool>" not in r.output and "╭" not in r.output
    r = _run("duplicates", "--help")
    assert "<bool>" not in r.output


def test_sweep_suggests_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _run("sweep", "synthetic-demo", "--db", str(tmp_path / "none.duckdb"))
    assert r.exit_code == 2 and "did you mean 'synthetic_demo'" in r.output, r.output


def _results(*studies):
    con = duckdb.connect()
    con.execute("CREATE TABLE results (study VARCHAR, sweep_id VARCHAR, protocol VARCHAR)")
    for i, s in enumerate(studies):
        con.execute("INSERT INTO results VALUES (?, ?, 'loso')", [s, f"s{i}"])
    return con


def test_report_accepts_the_config_name_or_suggests_the_study():
    from featstore.report import latest_sweep

    con = _results("synthetic-demo", "cmp")
    # the shipped config synthetic_demo names the study synthetic-demo
    assert latest_sweep(con, "synthetic_demo") == ("synthetic-demo", "s0")
    assert latest_sweep(con, "synthetic-demo") == ("synthetic-demo", "s0")
    with pytest.raises(ValueError) as e:
        latest_sweep(con, "synthetc-demo")
    msg = str(e.value)
    assert "did you mean 'synthetic-demo'" in msg and "studies: cmp, synthetic-demo" in msg and "[" not in msg
    with pytest.raises(ValueError, match=r"no results in the store \(run `featstore sweep CONFIG` first\)"):
        latest_sweep(_results(), None)


def test_ui_refuses_a_folder_without_a_tracking_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = _run("ui", "--port", "1")
    assert r.exit_code == 2 and "no MLflow store here" in r.output and "mlflow.db" in r.output
    assert not (tmp_path / "mlflow.db").exists()  # nothing created


def test_ui_starts_one_server_process_and_no_job_runners():
    from featstore.jobs import _mlflow_ui_argv

    argv = _mlflow_ui_argv("sqlite:////x/mlflow.db", "127.0.0.1", 5000)
    assert argv[argv.index("--workers") + 1] == "1"
    assert "--log-level warning" in argv[argv.index("--uvicorn-opts") + 1]


def test_runs_record_no_absolute_path_of_the_checkout(tmp_path, monkeypatch):
    from featstore.sweep.config import packaged_studies

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "s.yaml").write_text("study: s\n")
    assert track.portable_path(packaged_studies()["synthetic_demo.yaml"]) == "featstore/studies/synthetic_demo.yaml"
    assert track.portable_path(tmp_path / "cfg" / "s.yaml") == "cfg/s.yaml"
    assert track.portable_path(tmp_path / "optuna" / "s.journal") == "optuna/s.journal"
    assert track.portable_path("postgresql://u@h/db") == "postgresql://u@h/db" and track.portable_path(None) == ""
