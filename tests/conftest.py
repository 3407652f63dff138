import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEATSTORE_SHARED", REPO.parent / "shared"))
CXR = SHARED / "cxr"
ONNX = SHARED / "weights" / "mobilenetv3_small_nih14_int8.onnx"

needs_cxr = pytest.mark.skipif(not (CXR / "manifest.csv").exists(), reason=f"real CXR set not found at {CXR}")
needs_onnx = pytest.mark.skipif(not ONNX.exists(), reason=f"ONNX weights not found at {ONNX}")


# --- under pytest-xdist (`make test` runs -n): what is built once for all workers -----------------

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Under xdist, one BLAS/OpenMP/torch thread per worker (unless the caller chose): the workers already
    fill the cores, and the tests' matrices are small, so a second thread per worker only spins waiting
    for a core (measured: a probe test used 50.6 CPU s with two threads, 32.8 s with one). Set here, in the
    controller, before xdist starts the workers, which inherit it with every process they start."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        for v in THREAD_VARS:
            os.environ.setdefault(v, "1")


def _run_root(tmp_path_factory) -> Path:
    """The folder every worker of this run shares (xdist gives each worker its own basetemp inside
    one run folder); without xdist, this session's own basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, name: str, build):
    """build(folder) -> a path inside folder, run once per run however many workers ask (a file lock:
    the first builds, the others wait, then all read the same files). Only for what no test writes."""
    from filelock import FileLock

    root = _run_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            import shutil

            shutil.rmtree(folder, ignore_errors=True)  # what a worker that died building it left
            folder.mkdir(parents=True)
            done.write_text(str(build(folder).relative_to(folder)))
    return folder / done.read_text()


@pytest.fixture(scope="session")
def wheel_demo(tmp_path_factory) -> dict:
    """`featstore demo` run once per run from the wheel built from this tree, installed in a fresh venv
    (tests/_wheel.py): what each step gave, for tests/test_wheel.py and tests/test_demo.py. Read only."""
    import json

    from _wheel import build_and_run_demo

    return json.loads(_once(tmp_path_factory, "wheel-demo", build_and_run_demo).read_text())


@pytest.fixture(scope="session")
def _mlflow_schema_template(tmp_path_factory):
    return _run_root(tmp_path_factory) / "mlflow-schema-template.db"


_LONG = ("slow", "scale", "kill", "browser")


@pytest.hookimpl(wrapper=True)  # around xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """pytest-xdist (--dist loadgroup) sends each xdist_group to one worker and other tests one by one.
    Grouped: the tests on the session's Ray head (some of its ports are Ray's fixed defaults: one head on
    the machine), and those sharing a module-scoped fixture (built once, not once per worker). Under
    xdist, the long tests and the groups holding one go first, so that none starts last on an otherwise idle run."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        module_scoped = defs and any(d.scope == "module" for ds in defs.name2fixturedefs.values() for d in ds)
        if "ray_head" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif module_scoped:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and must order alike
        def group(i):
            m = i.get_closest_marker("xdist_group")
            return (m.args[0] if m.args else m.kwargs.get("name")) if m else None

        long_groups = {group(i) for i in items if group(i) and any(i.get_closest_marker(m) for m in _LONG)}
        first = [i for i in items if group(i) in long_groups
                 or (group(i) is None and any(i.get_closest_marker(m) for m in _LONG))]
        moved = set(first)
        items[:] = first + [i for i in items if i not in moved]
    result = yield
    if os.environ.get("PYTEST_XDIST_WORKER") and config.getoption("loadgroup", False):
        _group_ids(items)
    return result


def _group_ids(items) -> None:
    """xdist 3.8 tells its scheduler a test's group by appending `@group` to `item._nodeid`, which pytest
    9.2 no longer reads (its ids are structured: pytest-xdist issue #1386), so every group would be spread
    over the workers. Append it where pytest keeps the id now; a no-op once xdist does it itself."""
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and hasattr(item, "_id") and not item.nodeid.endswith(suffix):
            from _pytest.nodeid import NodeId  # pytest >= 9.2 only

            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture(autouse=True)
def _mlflow_schema_once(_mlflow_schema_template):
    """A new SQLite MLflow store runs MLflow's ~130 schema migrations (seconds, each time; most sweeps
    here make one). Once MLflow is loaded, they run once per session into a template that each new
    store then copies (SQLite's backup API): the schema MLflow itself made, without the wait. Stores
    other than a SQLite file are left to MLflow."""
    import sys

    U = sys.modules.get("mlflow.store.db.utils")  # not imported here: tests without MLflow never load it
    if U is None or hasattr(U._initialize_tables, "migrate"):
        return
    migrate, template = U._initialize_tables, _mlflow_schema_template

    def initialize_tables(engine):
        db = engine.url.database
        if engine.url.get_backend_name() != "sqlite" or not db or db == ":memory:":
            return migrate(engine)
        _migrate_once(migrate, template)
        import sqlite3
        from contextlib import closing

        with closing(sqlite3.connect(template)) as src, closing(sqlite3.connect(db)) as dst:
            src.backup(dst)

    initialize_tables.migrate = migrate
    U._initialize_tables = initialize_tables  # for the rest of the session


def _migrate_once(migrate, template: Path) -> None:
    if template.exists():
        return
    from filelock import FileLock

    with FileLock(f"{template}.lock"):  # xdist workers share the template: one migrates, the rest copy
        if not template.exists():
            import sqlalchemy

            part = template.with_name(f"{template.name}.{os.getpid()}.part")
            e = sqlalchemy.create_engine(f"sqlite:///{part}")
            migrate(e)
            e.dispose()
            part.replace(template)  # whole or absent: a reader never copies a half-migrated file


@pytest.fixture
def mlflow_db(_mlflow_schema_template):
    """path -> the URI of a SQLite MLflow store made there from the session's schema template: for sweeps
    in subprocesses, which would otherwise run MLflow's migrations themselves."""
    import shutil

    import mlflow.store.db.utils as U

    def make(path: Path) -> str:
        _migrate_once(getattr(U._initialize_tables, "migrate", U._initialize_tables), _mlflow_schema_template)
        shutil.copy(_mlflow_schema_template, path)
        return f"sqlite:///{path}"
    return make


class RecordingTracker:
    """The sweep's tracker (featstore.track.Tracker's interface) keeping its runs in memory instead of
    in MLflow: for tests where MLflow is not the subject (tests/test_track.py, the report and server
    tests use MLflow itself). `runs`: run id -> what was logged; the ids stand where MLflow's would."""

    def __init__(self, study: str, uri: str | None = None):
        self.study, self.uri = study, "recording:"
        self.runs: dict[str, dict] = {}
        self.open: set[str] = set()
        self.store, self.dest, self.experiment_id = None, None, study
        self.client = self  # the sweep logs its progress metric through `tracker.client`

    def run(self, name, parent=None, params=None, metrics=None, tags=None, start=None, end=None,
            status="FINISHED", artifacts=(), inputs=()) -> str:
        rid = f"recorded-{len(self.runs):05d}"
        self.runs[rid] = dict(name=name, parent=parent, params=dict(params or {}), metrics=dict(metrics or {}),
                              tags={k: str(v) for k, v in (tags or {}).items() if v is not None},
                              status=status or "RUNNING", artifacts=sorted(Path(a).name for a in artifacts if a),
                              inputs=len(inputs))
        if status is None:
            self.open.add(rid)
        return rid

    def log_metric(self, run_id, key, value, step=0, **kw) -> None:
        self.runs[run_id]["metrics"][key] = value

    def log_batch(self, run_id, metrics=(), params=(), tags=()) -> None:  # MlflowClient's, for the model runs
        r = self.runs[run_id]
        r["metrics"].update({m.key: m.value for m in metrics})
        r["params"].update({p.key: p.value for p in params})
        r["tags"].update({t.key: str(t.value) for t in tags})

    def end(self, run_id, status="FINISHED", tags=None) -> None:
        self.runs[run_id]["tags"].update({k: str(v) for k, v in (tags or {}).items()})
        self.runs[run_id]["status"] = status
        self.open.discard(run_id)

    def close_open(self, status: str) -> None:
        for rid in self.open:
            self.runs[rid]["status"] = status
        self.open.clear()

    def close_stale(self, sweep_id: str) -> list[str]:
        return []  # nothing was left RUNNING in memory by another process


@pytest.fixture
def recording_tracker(monkeypatch):
    """Sweeps run in this test track into RecordingTrackers (returned, one per sweep), not MLflow."""
    import featstore.sweep.run as R

    made = []

    def tracker(study, uri=None):
        made.append(RecordingTracker(study, uri))
        return made[-1]

    monkeypatch.setattr(R, "Tracker", tracker)
    return made


@pytest.fixture(scope="session", autouse=True)
def _temp_files_in_the_run(tmp_path_factory):
    """TMPDIR is this run's pytest folder for the tests and every process they start: what those processes
    leave in the temporary folder (multiprocessing's pymp- folders and Chromium's singleton folder, from
    processes the kill tests kill -9 on purpose, which cannot clean up after themselves; MLflow's
    db_init_lock files) stays there, and pytest keeps only the last three runs' folders. /tmp is shared
    with CI, and each run left about ten such entries there."""
    import tempfile

    d = _run_root(tmp_path_factory) / "tmp"
    d.mkdir(exist_ok=True)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(d)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield d
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # tests never touch the network: a missing weight must fail, not download
    monkeypatch.setenv("FEATSTORE_OFFLINE", "1")
    monkeypatch.delenv("FEATSTORE_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("FEATSTORE_DB", raising=False)


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory):
    from featstore.synth import generate

    # read only (tests ingest it into stores of their own): one copy for all workers
    return _once(tmp_path_factory, "synth", lambda d: generate(d / "data", n_per_source=24, size=128, seed=1,
                                                              plant_bad=True, plant_duplicates=3))


def _write_tiny_onnx(folder: Path) -> Path:
    """A 1x32x32 -> 8-d ONNX graph (a fixed random 3x3 convolution, ReLU, global average pool), made with
    onnx.helper: the generic `onnx` entry without the shared weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 1, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnxruntime reads, whatever the onnx package writes by default
    onnx.checker.check_model(model)
    path = folder / "tiny.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A tiny ONNX graph for the generic `onnx` entry (read only)."""
    return _once(tmp_path_factory, "tiny-onnx", _write_tiny_onnx)


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


def _embedded_store(folder, confounders: bool):
    """Four SYNTHETIC sources, two 90% COVID and two 10% COVID, embedded with pixelstats."""
    from dataclasses import replace

    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect
    from featstore.synth import SOURCES, generate

    sources = tuple(replace(s, covid_share=c) for s, c in zip(SOURCES, (0.9, 0.9, 0.1, 0.1)))
    m = generate(folder / "data", n_per_source=60, size=128, seed=3, confounders=confounders, signal=0.1,
                 sources=sources)
    db = folder / "fs.duckdb"
    con = connect(db)
    rows, pre = I.manifest_rows(m)
    I.ingest_rows(con, rows, str(m), workers=1)
    embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
    con.close()
    return db


@pytest.fixture(scope="session")
def synth_stores(tmp_path_factory):
    """Built once per run; each worker gets its own copy of the store files (some tests write sweeps and
    probe rows into them, as a serial run always let them), their image paths all pointing at the one
    set of images, which nothing writes."""
    import shutil

    out = {}
    for name, conf in (("confounded", True), ("neutral", False)):
        built = _once(tmp_path_factory, f"store-{name}", lambda d, conf=conf: _embedded_store(d, conf))
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            out[name] = built
            continue
        out[name] = tmp_path_factory.mktemp(name) / built.name
        shutil.copy(built, out[name])
        if built.with_name(built.name + ".wal").exists():  # closed after embedding: normally none
            shutil.copy(built.with_name(built.name + ".wal"), out[name].with_name(built.name + ".wal"))
    return out


@pytest.fixture(scope="session")
def synth_embeddings(synth_stores):
    from featstore.api import open_store

    out = {}
    for name, db in synth_stores.items():
        with open_store(db) as fs:
            out[name] = fs.arrays("pixelstats")
    return out


# --- a real PostgreSQL on 127.0.0.1 for the scale-out tests -----------------------------------

@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL server (Debian's postgresql package) on a free loopback port. Returns
    url(dbname) -> the URL of a new database. Skips, saying why, where none can run."""
    from featstore.testing import PostgresUnavailable, local_postgres

    try:
        with local_postgres(tmp_path_factory.mktemp("pg")) as url:
            yield url
    except PostgresUnavailable as e:
        pytest.skip(str(e))


# --- one Ray head for every Ray test --------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head started once (each start costs seconds; the Ray tests started five): module-scoped,
    as only tests/test_scale.py uses it (its Ray tests run together, as one xdist group), so the head is
    killed right after them instead of idling for the rest of the run (about 1.2 CPU s a minute). `.address`
    for RAY_ADDRESS (embed's --ray-address and ray.init read it), `.env` what a client's environment needs
    to join it, `.pid` of the `ray start --block`
    process whose children are all of Ray's processes (its workers included), so they end with it."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from types import SimpleNamespace

    import socket

    import psutil

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    ray = str(Path(sys.executable).with_name("ray"))
    # a loopback-only throwaway head: no token (Ray turns token auth on by itself where a token file exists,
    # which `ray status` and the drivers here would then lack); every client is given the same mode
    # (a killed driver's Ray Data CPU booking, which stalled the next test's run for 3 min, now expires
    # after 30 s: featstore.embed_ray sets it for every driver, these included)
    env = {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    with open(temp / "head.log", "w") as log:
        head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={address.split(':')[1]}",
                                 "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}",
                                 "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 600  # a deadline only: the wait is for the head to answer
        while subprocess.run([ray, "status", f"--address={address}"], capture_output=True,
                             timeout=120, env={**os.environ, **env}).returncode != 0:
            assert head.poll() is None, f"ray start failed: {(temp / 'head.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the Ray head did not answer in 600 s"
            time.sleep(1)
        yield SimpleNamespace(address=address, pid=head.pid, env=env)
    finally:
        # a throwaway head: every Ray process is killed outright, then the head reaped. Asked to stop
        # (SIGTERM), `ray start --block` took ~30 s at the end of a whole run, on the run's last worker
        kids = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        try:
            os.killpg(head.pid, signal.SIGKILL)  # its session's group: a worker started meanwhile too
        except ProcessLookupError:
            pass
        for k in kids:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
        head.kill()
        head.wait(timeout=30)
        psutil.wait_procs(kids, timeout=30)  # reparented and reaped once the head is gone
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


# --- tiny image-text models for the zero-shot head -----------------------------------

# CheXzero's configuration made tiny (image and text towers), for random-init sets
CHEXZERO_TINY = dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32,
                     text_cfg=dict(layers=2, width=32, heads=2))
_WORDS = ("<pad> <unk> </s> a an the of no chest x-ray normal covid-19 covid pneumonia findings lung opacity "
          "viral bacterial clear lungs").split()


def tiny_siglip_snapshot(weights_dir: Path, seed: int = 0, repo: str = "google/siglip-base-patch16-224"):
    """A whole SigLIP (text + image towers, random, tiny) saved as the Hugging Face snapshot of `repo`,
    with a word-level tokenizer (SigLIP's own needs the sentencepiece package). Its image size is
    siglip-base's 224, so featstore's pipeline feeds it. Returns (folder, model, tokenizer)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=dict(tiny, vocab_size=len(_WORDS), max_position_embeddings=16),
                                     vision_config=dict(tiny, image_size=224, patch_size=16))).eval()
    folder = Path(weights_dir) / repo.replace("/", "--")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok
