import pytest
from typer.testing import CliRunner

from featstore.cli import app

from conftest import ONNX


@pytest.mark.slow  # the whole demo (ingest, embed, sweep, probe, report): in `make test`, not `make test-fast`
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wd = ["--weights-dir", str(ONNX.parent)] if ONNX.exists() else []
    # one trial per Optuna study: the demo's wiring is under test here, not its tuning
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--n-per-source", "20", "--trials", "1", *wd])
    assert r.exit_code == 0, r.output
    assert "SYNTHETIC" in r.output
    assert "second run embedded 0" in r.output
    assert "synthetic-bad" in r.output  # the planted failures are listed
    assert "seen: mean per-source AUC" in r.output and "leave-pair-out" in r.output  # the benchmark table
    assert (tmp_path / "d" / "report" / "report.html").exists() and (tmp_path / "d" / "mlflow.db").exists()
    assert (tmp_path / "d" / "featstore.duckdb").exists()


def test_synthetic_data_is_deterministic(tmp_path):
    import hashlib

    from featstore.synth import generate

    def digest(m):
        return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in m.parent.rglob("*.*"))

    assert digest(generate(tmp_path / "a", n_per_source=5, size=64, seed=7)) == \
        digest(generate(tmp_path / "b", n_per_source=5, size=64, seed=7))
