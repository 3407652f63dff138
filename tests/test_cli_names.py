"""Commands that only need names answer without importing a model library (issue 27: <= 1 s; the time
itself is measured by benchmarks/cli_startup.py, never here): the registries' names and typed configs are
declared in featstore/backbone_specs.py, featstore/lungs.py and featstore/preprocess.py, not beside the models."""
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "torchxrayvision", "transformers", "timm", "open_clip", "onnxruntime", "duckdb",
         "polars", "sklearn")

PROBE = """
import json, sys
sys.argv = ["featstore"] + json.loads(sys.argv[1])
from featstore.cli import app
try:
    app()
except SystemExit as e:
    code = e.code
print("@@" + json.dumps(dict(code=code, loaded=sorted(m for m in {heavy} if m in sys.modules))))
"""


def _run(args, tmp_path):
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=repr(HEAVY)), json.dumps(args)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    line = [x for x in r.stdout.splitlines() if x.startswith("@@")]
    assert line, r.stdout + r.stderr
    return json.loads(line[-1][2:]), r.stdout + r.stderr


@pytest.mark.parametrize("args,code,says", [
    (["--help"], 0, "embed"),
    (["embed", "--help"], 0, "mobilenetv3-nih-onnx"),
    (["masks", "--help"], 0, "classical-v1"),
    (["backbones"], 0, "rad-dino"),
    (["embed", "--backbone", "mobilenet-nih", "--db", "none.duckdb"], 2, "did you mean"),
    (["duplicates", "--preprocess", "clahee", "--db", "none.duckdb"], 2, "did you mean"),
])
def test_names_only_commands_import_no_model_library(tmp_path, args, code, says):
    got, out = _run(args, tmp_path)
    assert got["code"] == code, out
    assert says in out, out
    assert got["loaded"] == [], f"{args} imported {got['loaded']}"


def test_the_probe_can_see_a_heavy_import(tmp_path):
    # the check is live: a command that opens a store imports DuckDB, and the probe sees it
    got, out = _run(["duplicates", "--db", "none.duckdb"], tmp_path)
    assert got["code"] == 2 and "duckdb" in got["loaded"], out
