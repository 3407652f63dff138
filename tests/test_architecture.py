"""Data flows one way: no module imports one of a later stage, and no two modules import each other,
directly or around a loop. Imports are read with `ast` from every featstore/*.py and featstore/sweep/*.py
(named `sweep.<step>`), those inside functions included (a lazy import is still a dependency)."""
import ast
from pathlib import Path

from _source import parse

PKG = Path(__file__).resolve().parents[1] / "featstore"

# In data-flow order. A module may import its own stage and earlier ones.
STAGES = [
    # used by every stage: the store file, SQL running, image decoding, weights files, the result-row
    # contract, figures, binary metrics, process pools, progress, messages, the registry type, config value
    # types, command errors, test helpers, matrices kept in a file
    ("library", {"store", "query", "decode", "weights", "results", "figures", "neighbors", "procs", "progress",
                 "suggest", "registry", "options", "errors", "testing", "ownfiles", "journal_lock",
                 "metrics", "spill"}),
    ("ingest", {"synth", "ingest", "adapters"}),
    ("preprocess", {"lungs", "preprocess", "masks"}),
    ("embed", {"families", "backbone_specs", "backbones", "torch_backbone", "foundation", "embed", "embed_ray",
               "export"}),
    # the store's read API (embeddings + labels as arrays) sits here: it builds patient groups with split
    ("split", {"duplicates", "copymatch", "ann", "split", "api"}),
    # the sweep package (featstore/sweep/, its docstring the map) up to the fit: the config (schema only), its
    # data, the plan (folds, tasks), Optuna
    ("fit", {"heads", "robust", "zeroshot", "sweep.__init__", "sweep.config", "sweep.data", "sweep.plan", "sweep.fit",
             "sweep.adapt"}),
    ("score", {"score", "verdict"}),
    ("track", {"track", "sweep.rows", "sweep.tracking", "sweep.ensemble"}),
    # jobs that run fit -> score -> track: a study's sweep; the domain probe and the shortcut evidence
    # the report lays out (forensics)
    ("run", {"sweep.run", "probe", "attribution"}),
    ("report", {"report"}),
]
# Front ends may import anything; no stage imports them. `featstore` itself (__init__) only re-exports
# the API lazily; importing the package for its __version__ is not a dependency on a front end. `jobs`
# holds the command jobs that span modules which must not import each other (ingest + adapters, the
# two embed engines) or reach the report.
FRONT_ENDS = {"__init__", "cli", "demo", "jobs"}

RANK = {m: i for i, (_, mods) in enumerate(STAGES) for m in mods}
STAGE = {m: name for name, mods in STAGES for m in mods}


SUBPACKAGES = ("sweep",)


def _modules() -> set[str]:
    return {p.stem for p in PKG.glob("*.py")} | {f"{d}.{p.stem}" for d in SUBPACKAGES for p in (PKG / d).glob("*.py")}


def _path(m: str) -> Path:
    return PKG / (m.replace(".", "/") + ".py")


def _imports(path: Path, modules: set[str]) -> dict[str, int]:
    """featstore modules this file imports -> the line of the first such import."""
    out: dict[str, int] = {}
    for node in ast.walk(parse(path)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: featstore uses none; count it against its target anyway
                base = "featstore" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] != "featstore" or len(parts) < 2:
                continue
            sub = ".".join(parts[1:3])  # a step of a subpackage, e.g. sweep.fit
            if sub in modules:
                out.setdefault(sub, node.lineno)
            elif parts[1] in modules:
                out.setdefault(parts[1], node.lineno)
    return out


def _graph() -> dict[str, dict[str, int]]:
    mods = _modules()
    return {m: {k: v for k, v in _imports(_path(m), mods).items() if k != m} for m in mods}


def test_every_module_has_a_declared_stage():
    mods = _modules()
    declared = [m for _, ms in STAGES for m in ms] + sorted(FRONT_ENDS)
    assert len(declared) == len(set(declared)), "a module is declared twice"
    assert mods - set(declared) == set(), "new module: give it a stage in STAGES (or make it a front end)"
    assert set(declared) - mods == set(), "declared but gone: remove it from STAGES"


def test_no_module_imports_a_later_stage_or_a_front_end():
    bad = []
    for m, deps in sorted(_graph().items()):
        if m in FRONT_ENDS:
            continue
        for d, line in sorted(deps.items()):
            if d in FRONT_ENDS:
                bad.append(f"{_path(m).relative_to(PKG.parent)}:{line} imports the front end {d}")
            elif RANK[d] > RANK[m]:
                bad.append(f"{_path(m).relative_to(PKG.parent)}:{line} ({STAGE[m]}) imports {d} ({STAGE[d]}, "
                           "a later stage)")
    assert not bad, "\n".join(bad)


def test_report_is_a_leaf():
    users = sorted(m for m, deps in _graph().items() if "report" in deps)
    assert set(users) <= FRONT_ENDS, f"report is imported by {users}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_readme_module_map_agrees_with_the_declared_stages():
    # the README's architecture section is what a newcomer reads: every module, in its declared stage
    import re

    readme = (PKG.parent / "README.md").read_text()
    section = readme[readme.index("## Architecture"):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"^\| `([\w/]+)\.py` \| ([\w ]+?) \| (\d+) \|", section, re.M)
    listed = {m.replace("/", "."): stage for m, stage, _ in rows}
    assert len(listed) == len(rows), "a module is listed twice in the README's module map"
    assert set(listed) == _modules(), f"README module map: missing {sorted(_modules() - set(listed))}, " \
                                      f"gone {sorted(set(listed) - _modules())}"
    wrong = {m: (s, "front end" if m in FRONT_ENDS else STAGE[m]) for m, s in listed.items()
             if s != ("front end" if m in FRONT_ENDS else STAGE[m])}
    assert not wrong, f"README stage vs tests/test_architecture.py STAGES: {wrong}"


def test_the_checker_sees_lazy_and_aliased_imports(tmp_path):
    # the parser must not miss the forms featstore uses, or the tests above would pass vacuously
    f = tmp_path / "m.py"
    f.write_text("import featstore.store as s\nfrom featstore import results as R, weights\n"
                 "def f():\n    from featstore.report import headline\n    import json\n")
    assert set(_imports(f, {"store", "results", "weights", "report"})) == {"store", "results", "weights", "report"}
    assert "report" in _graph()["cli"] and "track" in _graph()["sweep.run"]
    assert set(_imports(f, {"sweep.fit", "sweep"})) == set()
    f.write_text("from featstore.sweep import fit\nimport featstore.sweep.plan as P\n")
    assert set(_imports(f, {"sweep.fit", "sweep.plan"})) == {"sweep.fit", "sweep.plan"}


def _names_from(path: Path, module: str) -> dict[str, int]:
    """Names `path` imports from featstore.<module> -> the line of the first such import."""
    out: dict[str, int] = {}
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom) and node.module == f"featstore.{module}":
            for a in node.names:
                out.setdefault(a.name, node.lineno)
    return out


def test_the_embed_engines_share_one_public_run_seam_and_make_no_masks():
    # both engines run through embed.EmbedRun; a private name crossing over would be a second seam
    for m in ("embed_ray", "jobs"):
        private = {n: line for n, line in _names_from(PKG / f"{m}.py", "embed").items() if n.startswith("_")}
        assert not private, f"featstore/{m}.py imports private names of embed: {private}"
    assert "EmbedRun" in _names_from(PKG / "embed_ray.py", "embed")
    # the embed stage reads stored masks; making them (PSPNet, classical) is the caller's job, before
    for m in ("embed", "embed_ray"):
        used = set(_names_from(PKG / f"{m}.py", "masks"))
        assert used <= {"load_masks", "decode"}, f"featstore/{m}.py uses {sorted(used)} of masks"


# Each store table is written by the stage that makes it, and read by later ones; a stage that wrote
# another's table (masks deleting embeddings) would tie the two together behind the import graph's back.
# Interpolated names (`{table}`) are the per-dimension embedding tables; `_name`s are a connection's own
# scratch (temporary) tables. The library (the store layer, test fixtures) writes for whoever calls it.
OWNS = {
    "ingest": {"images", "occurrences", "ingest_errors", "ingest_runs", "ingest_changes"},
    "preprocess": {"lung_masks"},
    "embed": {"{embeddings}", "embed_errors", "embed_runs"},
    "split": {"image_hashes", "near_duplicates"},
    "track": {"results", "predictions"},
    "run": {"probe_map_points", "probe_neighbors", "attribution"},  # the probe's evidence; attribution's rows
}
# The store layer's writers, as a stage calls them: the table is the call's second argument (a literal the
# stage names; a variable is an embedding table, as `{table}` in SQL text is), or fixed by the writer.
TABLE_ARG_WRITERS = ("insert_frame", "insert_or_replace_from", "delete_all_rows", "insert_new_embeddings",
                     "delete_embeddings_of")
FIXED_WRITERS = {"write_attribution": "attribution", "upsert_embed_errors": "embed_errors",
                 "upsert_embed_error_rows": "embed_errors", "delete_embed_errors_of": "embed_errors",
                 "interrupt_running_embed_runs": "embed_runs", "insert_embed_run": "embed_runs",
                 "finish_embed_run": "embed_runs",
                 "canonical_images": "images", "delete_occurrences_of": "occurrences",
                 "update_occurrence_file_stats": "occurrences", "resolve_ingest_errors": "ingest_errors",
                 "upsert_ingest_errors": "ingest_errors", "upsert_ingest_failure": "ingest_errors",
                 "insert_ingest_run": "ingest_runs"}
# store.py's own: the schema, and a snapshot's rows copied into its own in-memory connection
STORE_OWN = {"migrate", "open_snapshot"}
# SQL text that writes rows: the table as written (quoted or not, escaped in the source or not, schema-qualified
# or not; `{x}`: an embedding table)
_Q = r'(?:\\?")?'
_WRITE = r"\b(?:DELETE\s+FROM|INSERT\s+(?:OR\s+(?:REPLACE|IGNORE)\s+)?INTO|(?<!DO )UPDATE|TRUNCATE(?:\s+TABLE)?|" \
         rf"MERGE\s+INTO)\s+(?:(?:main|memory)\.)?{_Q}(\{{[^}}]*\}}|\w+)|\bCOPY\s+{_Q}(\w+){_Q}\s+FROM\b"


def _sql_writes(text: str) -> set[str]:
    import re

    return {a or b for a, b in re.findall(_WRITE, text)}


def _called(node) -> str | None:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _table_arg(arg) -> set[str]:
    """What a writer's table argument may be: a literal; both sides of a conditional; else (a variable)
    an embedding table, as `{table}` in SQL text is."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return {arg.value}
    if isinstance(arg, ast.IfExp):
        return _table_arg(arg.body) | _table_arg(arg.orelse)
    return {"{embeddings}"}


def _writer_calls(tree) -> set[str]:
    """The tables the store layer's writers are called on (by name or as an attribute; the table
    positional or `table=`)."""
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and _called(n) in TABLE_ARG_WRITERS:
            arg = n.args[1] if len(n.args) > 1 else next((k.value for k in n.keywords if k.arg == "table"), None)
            names |= _table_arg(arg) if arg is not None else {"{embeddings}"}
        elif isinstance(n, ast.Call) and _called(n) in FIXED_WRITERS:
            names.add(FIXED_WRITERS[_called(n)])
    return names


def _writes(text: str) -> set[str]:
    """The tables a module's code writes: SQL text, and calls of the store layer's writers."""
    names = _sql_writes(text) | _writer_calls(parse(text))
    return {"{embeddings}" if n.startswith("{") else n for n in names if not n.startswith("_")}


def test_every_writer_of_the_store_layer_is_known_to_the_checker():
    """A store-layer function that writes rows is one the ownership rule below sees a stage call, or that
    rule could be dodged by a new writer. Rows go in through SQL text only: no Arrow append or relation
    insert, which no text would show."""
    import re

    writers = set()
    for m in ("store", "api", "results", "query"):
        src = _path(m).read_text()
        assert not re.search(r"\bcon\w*\.append\(|\.insert_into\(", src), f"featstore/{m}.py writes rows without SQL"
        for f in parse(src).body:
            if not isinstance(f, ast.FunctionDef):
                continue
            # its string literals (SQL), not its comments; and the writers it calls
            strings = "\n".join(ast.get_source_segment(src, n) or "" for n in ast.walk(f)
                                if isinstance(n, ast.JoinedStr) or isinstance(n, ast.Constant) and isinstance(n.value, str))
            if _sql_writes(strings) or _writer_calls(f):
                writers.add(f.name)
    assert writers == set(TABLE_ARG_WRITERS) | set(FIXED_WRITERS) | STORE_OWN, writers


def test_each_stage_writes_only_its_own_tables():
    bad = []
    for m in sorted(_modules()):
        if STAGE.get(m) == "library":
            continue
        wrong = _writes(_path(m).read_text()) - OWNS.get(STAGE.get(m), set())
        if wrong:
            bad.append(f"{_path(m).relative_to(PKG.parent)} ({STAGE.get(m, 'front end')}) writes {sorted(wrong)}")
    assert not bad, "\n".join(bad)
    # the checker sees the writes featstore makes, in every form, or the rule above would pass vacuously
    assert _writes('con.execute(f"DELETE FROM {table} WHERE x")\ninsert_frame(con, "lung_masks", df)\n'
                   '"INSERT OR REPLACE INTO a ON CONFLICT DO UPDATE SET y = 1; UPDATE b SET"\n'
                   'delete_all_rows(con, "c")\ninsert_new_embeddings(con, table, s, d, r)\nupsert_embed_errors(con, s, r)\n'
                   'insert_or_replace_from(con, "d", "_new")\nwrite_attribution(con, rows)\n'
                   "insert_frame(self.con, 'e', df)\nstore.insert_frame(con, table='f', df=df)\n"
                   'insert_frame(con, "_scratch" if redo else "g", df)\n'
                   '"INSERT INTO main.h SELECT 1; TRUNCATE i; MERGE INTO \\"j\\" USING k; COPY l FROM \'x.csv\'"\n'
                   '"COPY (SELECT 1) TO \'x\'; COPY m TO \'y.parquet\'"\n') == \
        {"{embeddings}", "lung_masks", "a", "b", "c", "d", "embed_errors", "attribution", "e", "f", "g", "h", "i",
         "j", "l"}
    assert _writes((PKG / "embed.py").read_text()) == OWNS["embed"]
    assert _writes((PKG / "masks.py").read_text()) == {"lung_masks"}


# SQL lives in the store layer (the store file and its schema, the stages' reads and writes, SQL running,
# the read API, the result contract) and in sql/; every other module asks the store layer.
STORE_LAYER = {"store", "query", "api", "results"}
_SQL = r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|WITH|COPY|ATTACH|DETACH|PRAGMA|SET|INSTALL|LOAD|" \
       r"CHECKPOINT|BEGIN|COMMIT|ROLLBACK|DESCRIBE|SUMMARIZE|EXPORT|IMPORT)\b"


def _sql_lines(text: str) -> list[int]:
    """Lines with SQL: a text constant that starts as a statement does, or any text handed to a
    connection's execute / executemany / sql (messages that quote SQL for the user start otherwise)."""
    import re

    out = set()
    for n in ast.walk(parse(text)):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.match(_SQL, n.value):
            out.add(n.lineno)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.args
              and n.func.attr in ("execute", "executemany", "sql")
              and (isinstance(n.args[0], ast.JoinedStr) or isinstance(n.args[0], ast.Constant)
                   and isinstance(n.args[0].value, str))):
            out.add(n.lineno)
    return sorted(out)


def test_sql_only_in_the_store_layer_and_sql():
    held = {m: _sql_lines(_path(m).read_text()) for m in _modules()}
    bad = [f"{_path(m).relative_to(PKG.parent)}: SQL at lines {lines[:6]}" for m, lines in sorted(held.items())
           if lines and m not in STORE_LAYER]
    assert not bad, "SQL outside the store layer (featstore.api / featstore.store, sql/):\n" + "\n".join(bad)
    # the checker sees the forms featstore writes, or the rule would pass vacuously
    assert _sql_lines('q = "SELECT 1"\ncon.execute(f"DELETE FROM {t}")\ncon.sql(q)\nx = (\n "WITH a AS (SELECT 1)"\n)\n'
                      'say("featstore sql \\"SELECT * FROM images\\"")\ncon.execute(q)\n') == [1, 2, 5]


# A name with a leading underscore is its module's own: no other module imports it or reaches into an
# object for one (`fs._set`, Optuna's `study._storage`). A class's own methods use their own (self/cls).
# Documented public names that start with one: namedtuple's API, os._exit. Third-party private modules:
# scikit-learn's parameter constraints (the estimator contract declares them there; no public path).
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_exit"}
PRIVATE_MODULES_ALLOWED = {"sklearn.utils._param_validation"}


def _private_uses(text: str) -> list[str]:
    out = []
    for n in ast.walk(parse(text)):
        if isinstance(n, ast.ImportFrom) and n.module and n.module != "__future__":
            if any(p.startswith("_") for p in n.module.split(".")) and n.module not in PRIVATE_MODULES_ALLOWED:
                out.append(f"{n.lineno}: from {n.module}")
            if n.module.startswith("featstore"):
                out += [f"{n.lineno}: {n.module}.{a.name}" for a in n.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__") \
                and n.attr not in PUBLIC_UNDERSCORE \
                and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")):
            out.append(f"{n.lineno}: {ast.unparse(n)}")
    return out


def test_no_private_name_crosses_a_module():
    bad = [f"{_path(m).relative_to(PKG.parent)}:{u}" for m in sorted(_modules()) for u in _private_uses(
        _path(m).read_text())]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)
    assert sorted(_private_uses("from featstore.api import _set_name\nfs._set(1)\nself._x\nst.study._storage._y\n"
                         "p._replace()\nfrom sklearn.utils._param_validation import Interval\n"
                                "from optuna.samplers._tpe import x\n")) == [
        "1: featstore.api._set_name", "2: fs._set", "4: st.study._storage", "4: st.study._storage._y",
        "7: from optuna.samplers._tpe"]


def test_code_version_is_computed_once_per_process(monkeypatch):
    # it spawned git once per result row (87 times a real sweep); the commit cannot change under a run
    import subprocess

    from featstore import track

    calls = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    track.code_version.cache_clear()
    try:
        assert len({track.code_version() for _ in range(5)}) == 1
        assert len(calls) == 1
    finally:
        track.code_version.cache_clear()
