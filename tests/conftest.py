import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEATSTORE_SHARED", REPO.parent / "shared"))
CXR = SHARED / "cxr"
ONNX = SHARED / "weights" / "mobilenetv3_small_nih14_int8.onnx"

needs_cxr = pytest.mark.skipif(not (CXR / "manifest.csv").exists(), reason=f"real CXR set not found at {CXR}")
needs_onnx = pytest.mark.skipif(not ONNX.exists(), reason=f"ONNX weights not found at {ONNX}")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # tests never touch the network: a missing weight must fail, not download
    monkeypatch.setenv("FEATSTORE_OFFLINE", "1")
    monkeypatch.delenv("FEATSTORE_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("FEATSTORE_DB", raising=False)


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory):
    from featstore.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "data", n_per_source=24, size=128, seed=1,
                    plant_bad=True, plant_duplicates=3)


@pytest.fixture
def con(tmp_path):
    from featstore.store import connect

    c = connect(tmp_path / "fs.duckdb")
    yield c
    c.close()


@pytest.fixture
def ingested(con, synth_manifest):
    from featstore import ingest as I

    rows, pre = I.manifest_rows(synth_manifest)
    rep = I.ingest_rows(con, rows, str(synth_manifest), workers=1)
    return con, rep
