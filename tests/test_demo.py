from pathlib import Path

import pytest
from typer.testing import CliRunner

from featstore.cli import app

from _wheel import DEMO_ARGS, demo_weights_args


@pytest.mark.slow  # the whole demo (ingest, embed, sweep, probe, report): in `make test`, not `make test-fast`
def test_demo_runs_end_to_end(wheel_demo, tmp_path, monkeypatch):
    # the demo runs once per test session: from the wheel, in a fresh venv (tests/_wheel.py, which
    # tests/test_wheel.py checks too); where that run did not happen (no build tools here, or the wheel
    # did not build or install: test_wheel fails then), the demo runs here, in-process. The same
    # arguments either way: one trial per Optuna study (the demo's wiring is under test here, not its
    # tuning), and --weights-dir with the ONNX weights when present
    wd = demo_weights_args()
    if "demo" in wheel_demo:
        r = wheel_demo["demo"]
        output, d = r["stdout"] + r["stderr"], Path(wheel_demo["demo_dir"])
        assert r["rc"] == 0, output[-6000:]
    else:
        monkeypatch.chdir(tmp_path)
        d = tmp_path / "d"
        r = CliRunner().invoke(app, ["demo", "--out", str(d), *DEMO_ARGS, *wd])
        output = r.output
        assert r.exit_code == 0, r.output
    assert "SYNTHETIC" in output
    assert "second run embedded 0" in output
    assert "synthetic-bad" in output  # the planted failures are listed
    assert "seen: mean per-source AUC" in output and "leave-pair-out" in output  # the benchmark table
    assert (d / "report" / "report.html").exists() and (d / "mlflow.db").exists()
    assert (d / "featstore.duckdb").exists()
    # --weights-dir reached the demo: it embedded with the ONNX weights too, else skipped that backbone
    assert ("embed mobilenetv3-nih-onnx:" in output) == bool(wd), output[-6000:]


def test_synthetic_data_is_deterministic(tmp_path):
    import hashlib

    from featstore.synth import generate

    def digest(m):
        return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in m.parent.rglob("*.*"))

    assert digest(generate(tmp_path / "a", n_per_source=5, size=64, seed=7)) == \
        digest(generate(tmp_path / "b", n_per_source=5, size=64, seed=7))
