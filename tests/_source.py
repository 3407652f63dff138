"""Parse Python source for the tests that read featstore's code (architecture, CLI exits).

CPython 3.11 before 3.11.8 keeps the AST constructor's recursion counter in state shared by all
threads (gh-106905): an `ast.parse` that overlaps one in another thread - 3.11's traceback formatter
parses source to place its carets, so any background thread that formats a traceback will do - fails
with a spurious "SystemError: AST constructor recursion depth mismatch". It failed
test_no_import_cycles once in CI (3.11.7). The parse is deterministic, so one that fails only that way
is run again, and after a few such failures in a fresh single-threaded interpreter, whose tree comes
back pickled (unpickling builds nodes without the shared counter)."""
from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

TRIES = 3
_ALONE = "import ast, pickle, sys; src = sys.stdin.read(); " \
         "sys.stdout.buffer.write(pickle.dumps(ast.parse(src, sys.argv[1])))"


def _spurious(e: SystemError) -> bool:
    return "recursion depth mismatch" in str(e) and sys.version_info[:3] < (3, 11, 8)


def parse(source: str | Path, filename: str = "<unknown>") -> ast.Module:
    if isinstance(source, Path):
        source, filename = source.read_text(), str(source)
    for _ in range(TRIES):
        try:
            return ast.parse(source, filename)
        except SystemError as e:
            if not _spurious(e):
                raise
    out = subprocess.run([sys.executable, "-c", _ALONE, filename], input=source.encode(), capture_output=True,
                         check=True, timeout=120)
    return pickle.loads(out.stdout)
