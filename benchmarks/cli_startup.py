"""Commands that only need names, timed as a user runs them (a new process each), beside the interpreter's
own start and beside what listing names cost while the registry imported the model libraries (issue 27:
<= 1 s each). `tests/test_cli_names.py` checks that no model library is imported; this measures the time.

    python benchmarks/cli_startup.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _common import REPO, goal, table

COMMANDS = [("featstore --help", ["--help"]),
            ("featstore embed --help", ["embed", "--help"]),
            ("featstore backbones", ["backbones"]),
            ("featstore embed --backbone mobilenet-nih (misspelt)", ["embed", "--backbone", "mobilenet-nih",
                                                                   "--db", "/nonexistent/featstore.duckdb"])]


def wall(argv: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=REPO, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    py = [sys.executable]
    floor = wall(py + ["-c", "pass"], a.repeat)
    models = wall(py + ["-c", "import torch, featstore.backbones, featstore.foundation"], a.repeat)
    rows = [["python -c pass (the interpreter)", f"{floor:.2f}", "-"],
            ["import torch + the model registry (what listing names cost before)", f"{models:.2f}", "-"]]
    for name, args in COMMANDS:
        t = wall(py + ["-m", "featstore.cli", *args], a.repeat)
        rows.append([name, f"{t:.2f}", f"{t / models:.2f}"])
        goal(f"27. `{name.split(' (')[0]}` answers (cli_startup.py)", "≤ 1 s", f"{t:.2f} s", t <= 1.0)
    print("### Commands that only need names (issue 27)\n")
    print(f"Best of {a.repeat} new processes each, wall seconds, measured in one run.\n")
    print(table(["command", "wall s", "÷ importing the models"], rows))


if __name__ == "__main__":
    main()
