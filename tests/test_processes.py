"""Processes: every worker dies with its parent (kill -9 included), and two sweeps never run one study
in one folder at once. Every wait follows an event (children up, a trial started, a lock taken) and
has a generous deadline that fails with a message instead of hanging."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
import yaml

FEATSTORE = str(Path(sys.executable).with_name("featstore"))


def _start(args, env=None):
    return subprocess.Popen([FEATSTORE, *args], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(what: str, cond, proc=None, timeout: float = 300, every: float = 0.05):
    """Poll cond() until it returns something true; fail naming `what` at the deadline, or at once if
    proc exited first (with its stderr)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def kill_9_then_no_survivors(proc, ready, what: str, timeout: float = 60):
    """Once ready(children) holds, SIGKILL proc alone and wait until every process it had started
    is gone (is_running() also checks the create time, so a recycled pid does not count)."""
    me = psutil.Process(proc.pid)

    def up():
        try:
            kids = me.children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return kids if ready(kids) else None
    kids = wait_for(what, up, proc)
    names = [_cmd(k) for k in kids]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        deadline = time.monotonic() + timeout
        while (left := _alive(kids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, (f"{len(left)} of {len(kids)} child processes outlived the kill -9 of their parent by "
                          f"{timeout:.0f}s: " + "; ".join(" ".join(p.cmdline())[:120] for p in left))
    finally:
        for p in _alive(kids):  # never leave them behind, even when the test fails
            p.kill()
    return names


def _cmd(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _workers(kids):
    return [k for k in kids if "resource_tracker" not in (k if isinstance(k, str) else _cmd(k))]


# --- item 9: workers die with their parent ------------------------------------------------------

@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    """A manifest of 2,400 rows (400 small images, each listed under 6 sources): several seconds of
    hashing and decoding for 2 workers, so the kill lands while they work."""
    from featstore.synth import generate

    m = generate(tmp_path_factory.mktemp("many") / "data", n_per_source=100, size=96, seed=5)
    df = pl.read_csv(m)
    big = pl.concat([df.with_columns(pl.col("source") + f"-{k}") for k in range(6)])
    out = m.with_name("many.csv")
    big.write_csv(out)
    return out


@pytest.mark.kill
def test_ingest_workers_die_with_a_killed_parent(many_rows, tmp_path):
    p = _start(["ingest", "--manifest", str(many_rows), "--workers", "2", "--db", str(tmp_path / "fs.duckdb")])
    kids = kill_9_then_no_survivors(p, lambda kids: len(_workers(kids)) >= 2, "ingest's 2 workers to start")
    assert len(_workers(kids)) == 2


def _sweep_config(tmp_path, name, heads, protocols=None) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(dict(study=name, backbones=["pixelstats"], seed=7, bootstrap=20, heads=heads,
                                       protocols=protocols or {"loso": {}})))
    return cfg


def _journal_has(path: Path, *states: str):
    from featstore.sweep.fit import journal
    import optuna

    if not path.exists():
        return False
    st = journal(path)
    for s in st.get_all_studies():
        for t in st.get_all_trials(s._study_id, deepcopy=False):
            if t.state.name in states:
                return True
    return False


@pytest.mark.kill
def test_sweep_workers_and_resource_tracker_die_with_a_killed_parent(synth_stores, tmp_path, mlflow_db):
    """`featstore sweep --workers 2`: killed once both workers run trials; the workers and
    multiprocessing's resource tracker must all go."""
    cfg = _sweep_config(tmp_path, "orphans", {"grl_mlp": {"trials": 6, "fixed": {"max_epochs": 200}}})
    journal = tmp_path / "w" / "optuna" / "orphans.journal"
    p = _start(["sweep", str(cfg), "--workers", "2", "--workdir", str(tmp_path / "w"),
                "--db", str(synth_stores["confounded"]), "--tracking-uri", mlflow_db(tmp_path / "m.db")])
    kids = kill_9_then_no_survivors(
        p, lambda kids: len(_workers(kids)) >= 2 and _journal_has(journal, "RUNNING", "COMPLETE"),
        "2 sweep workers running trials")
    assert len(_workers(kids)) == 2 and any("resource_tracker" in k for k in kids), kids


@pytest.mark.kill
def test_embed_dataloader_workers_die_with_a_killed_parent(synth_manifest, tmp_path):
    """torch's DataLoader workers watch their parent themselves (every 5 s); this proves they do."""
    db = tmp_path / "fs.duckdb"
    r = subprocess.run([FEATSTORE, "ingest", "--manifest", str(synth_manifest), "--db", str(db)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    p = _start(["embed", "--backbone", "xrv-densenet121-res224-all", "--weights", "random-init", "--batch-size", "4",
                "--workers", "2", "--db", str(db)])
    kids = kill_9_then_no_survivors(p, lambda kids: len(kids) >= 2, "embed's 2 DataLoader workers to start")
    assert len(kids) >= 2


@pytest.mark.kill
def test_embed_decode_pool_workers_die_with_a_killed_parent(synth_manifest, tiny_onnx, tmp_path):
    """An ONNX model's decoders (a process pool, no torch) ask the kernel to kill them with their parent."""
    db = tmp_path / "fs.duckdb"
    r = subprocess.run([FEATSTORE, "ingest", "--manifest", str(synth_manifest), "--db", str(db)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    marker = tmp_path / "held"  # the run holds after its first stored batch, its decoders up and waiting
    p = _start(["embed", "--backbone", "onnx", "--weights", str(tiny_onnx), "--batch-size", "4", "--workers", "2",
                "--db", str(db)], env={"FEATSTORE_TEST_HOLD_EMBED": f"{marker}:1"})
    wait_for("the first stored batch", lambda: marker.exists() and marker.read_text().endswith("\n"), p)
    kids = kill_9_then_no_survivors(p, lambda kids: len(kids) >= 2, "embed's 2 decode workers")
    assert len(kids) >= 2


@pytest.mark.kill
def test_a_worker_whose_parent_died_before_it_started_exits():
    """The race prctl cannot cover: the parent died before the child asked to die with it."""
    code = ("import os, sys; from featstore.procs import die_with_parent; "
            "die_with_parent(int(sys.argv[1])); print('survived')")
    r = subprocess.run([sys.executable, "-c", code, str(os.getpid() + 10**6)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "survived" not in r.stdout
    r = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "survived" in r.stdout


# --- items 10 and 11: resumed sweeps equal uninterrupted ones; one sweep per study and folder ----------

VOLATILE = {"sweep_id", "mlflow_run_id", "seconds", "created_at"}


def _rows(db, sweep_id):
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        cols = [c for (c,) in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'results' "
                                          "ORDER BY column_index").fetchall() if c not in VOLATILE]
        return con.execute(f"SELECT {', '.join(cols)} FROM results WHERE sweep_id = ? ORDER BY ALL",
                           [sweep_id]).fetchall()


def _all_trials(path: Path) -> dict:
    """study -> its trials as (number, state, params, value, user_attrs), from a journal."""
    from featstore.sweep.fit import journal

    st = journal(path)
    return {s.study_name: [(t.number, t.state.name, t.params, t.value, t.user_attrs)
                           for t in st.get_all_trials(s._study_id, deepcopy=False)]
            for s in st.get_all_studies()}


def _n_finished(path: Path) -> tuple[int, bool]:
    """(trials finished, whether one is running) in the journal."""
    if not path.exists():
        return 0, False
    ts = [t for v in _all_trials(path).values() for t in v]
    return sum(t[1] in ("COMPLETE", "PRUNED") for t in ts), any(t[1] == "RUNNING" for t in ts)


def _held(marker: Path):
    return marker.exists() and marker.read_text().endswith("\n") and marker.read_text().split()


def kill_mid_trial(args, journal: Path, k: int, marker: Path) -> int:
    """Start a sweep that parks the first trial to start once k trials are finished (the sweep's
    FEATSTORE_TEST_HOLD_TRIAL hook), wait for that event, and SIGKILL the sweep's whole process tree
    while the trial runs. Returns how many trials were finished then."""
    marker.unlink(missing_ok=True)
    proc = _start(args, env={"FEATSTORE_TEST_HOLD_TRIAL": f"{marker}:{k}"})
    try:
        study, number, done = wait_for(f"a trial to start after {k} finished ones", lambda: _held(marker), proc,
                                       timeout=1200)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    t = {s: ts for s, ts in _all_trials(journal).items()}[study][int(number)]
    assert t[1] == "RUNNING", t  # killed mid-trial: the journal still says it runs
    assert int(done) >= k
    return int(done)


def _sweep_args(cfg, workdir, db, tracking):
    return ["sweep", str(cfg), "--workdir", str(workdir), "--db", str(db), "--tracking-uri", f"sqlite:///{tracking}"]


@pytest.mark.kill
def test_a_sweep_killed_mid_trial_and_resumed_equals_an_uninterrupted_one(synth_stores, tmp_path, mlflow_db,
                                                                         recording_tracker):
    """kill -9 twice, each time while a trial runs after k finished ones (k seeded), then resume:
    every result row and every trial (apart from ids and times) equals an uninterrupted run's; the
    killed trials are re-run with their parameters and counted nowhere as failures."""
    import random
    import re

    from featstore.sweep.run import run_study
    from featstore.sweep.config import load_study

    db = synth_stores["confounded"]
    # the kills land in grl_mlp's trials, which run after logreg's 24; 6 trials each, so TPE proper
    # (after 5 random ones) is resumed too
    cfg = _sweep_config(tmp_path, "resume", {"logreg": {"trials": 6}, "grl_mlp": {"trials": 6,
                                                                                    "fixed": {"max_epochs": 6}}})
    work, journal = tmp_path / "w", tmp_path / "w" / "optuna" / "resume.journal"
    rng = random.Random(10)
    killed = []
    mlflow_db(tmp_path / "m.db")  # the sweeps below find MLflow's schema there
    for k in sorted(rng.sample(range(25, 46), 2)):
        killed.append(kill_mid_trial(_sweep_args(cfg, work, db, tmp_path / "m.db"), journal, k, tmp_path / "held"))
    p = _start(_sweep_args(cfg, work, db, tmp_path / "m.db"))
    out, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err[-3000:]
    resumed = re.search(r"sweep (\S+): \d+ Optuna studies", " ".join(err.split())).group(1)

    # the reference run, in this process, tracks in memory (the killed and resumed ones track to MLflow)
    clean = run_study(load_study(cfg), db, tmp_path / "clean", f"sqlite:///{tmp_path / 'c.db'}")
    a, b = _all_trials(journal), _all_trials(tmp_path / "clean" / "optuna" / "resume.journal")
    assert a.keys() == b.keys() and len(a) == 8
    interrupted = [(s, t) for s, ts in a.items() for t in ts if t[1] == "FAIL"]
    assert len(interrupted) == 2 and all(t[4].get("interrupted") for _, t in interrupted), interrupted
    for s, t in interrupted:  # each re-run with the parameters it had
        retry = [r for r in a[s] if r[4].get("retry_of") == t[0]]
        # a trial killed while suggesting has only its first parameters: the retry keeps those
        assert len(retry) == 1 and retry[0][1] == "COMPLETE" and t[2].items() <= retry[0][2].items()
    def attrs(u):  # a retry says so; the rest (optuna-dashboard's filters, warnings) is as uninterrupted
        return {k: v for k, v in u.items() if k != "retry_of"}
    for s in a:  # the same trials, in the same order, with the same parameters, scores and attributes
        kept = [(st, ps, v, attrs(u)) for _, st, ps, v, u in a[s] if st != "FAIL"]
        assert kept == [(st, ps, v, u) for _, st, ps, v, u in b[s]], s
        assert all(u["protocol"] == "loso" and u["head"] in s and u["fold"] in s for *_, u in b[s])
    rows = _rows(db, resumed)
    assert len(rows) >= 10 and rows == _rows(db, clean.sweep_id)  # 8 folds, 2 pooled, 2 source-mean


def _locked(path: Path) -> bool:
    import fcntl

    if not path.exists():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.mark.slow
def test_a_second_sweep_of_a_study_in_the_same_folder_is_refused_while_the_first_runs(synth_stores, tmp_path):
    db = synth_stores["confounded"]
    cfg = _sweep_config(tmp_path, "twice", {"logreg": {"trials": 3}})
    lock, journal = tmp_path / "optuna" / "twice.lock", tmp_path / "optuna" / "twice.journal"
    first = _start(_sweep_args(cfg, tmp_path, db, tmp_path / "m.db"))
    wait_for("the first sweep to take the folder's lock", lambda: _locked(lock), first)
    first.send_signal(signal.SIGSTOP)  # it stays mid-sweep, holding the lock, while the second tries
    try:
        second = subprocess.run([FEATSTORE, *_sweep_args(cfg, tmp_path, db, tmp_path / "m.db")],
                                capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    msg = " ".join(second.stderr.split())
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"another sweep (pid {first.pid}, started " in msg and "is running study twice in this folder" in msg
    assert "Traceback" not in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]  # undisturbed: none of its trials failed as interrupted
    assert all(t[1] == "COMPLETE" for ts in _all_trials(journal).values() for t in ts)
    assert not _locked(lock)


def test_the_sweep_lock_is_per_study_and_folder_and_names_its_holder(tmp_path):
    from featstore.sweep.run import SweepLocked, sweep_lock
    from featstore.sweep.config import StudyError

    with sweep_lock(tmp_path, "a"):
        with sweep_lock(tmp_path, "b"), sweep_lock(tmp_path / "elsewhere", "a"):
            pass
        with pytest.raises(SweepLocked, match=rf"another sweep \(pid {os.getpid()}, started 20\d\d-") as e:
            with sweep_lock(tmp_path, "a"):
                pass
        assert isinstance(e.value, StudyError)  # the CLI's exit 2 with one line
    with sweep_lock(tmp_path, "a"):  # released on exit
        pass


SLOW_POOL = """
import sys, time
from featstore import duplicates, masks

def slow(_):
    print("working", flush=True)
    time.sleep(600)

class Con:  # what ensure_hashes reads: 100 images without a hash
    def execute(self, *a):
        return self
    def fetchall(self):
        return [(f"id{i}", f"/img{i}.png") for i in range(100)]

if sys.argv[1] == "masks":
    masks._map(slow, list(range(100)), 2)
else:
    duplicates._hash_one = slow
    duplicates.ensure_hashes(Con(), 2)
"""


@pytest.mark.kill
@pytest.mark.parametrize("pool", ["masks", "duplicates"])
def test_mask_and_duplicate_hash_workers_die_with_a_killed_parent(pool):
    """The other two process pools (lung masks, dHash), their workers kept busy by a slow task."""
    p = subprocess.Popen([sys.executable, "-c", SLOW_POOL, pool], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    seen = []  # the event: a worker is in its task (other lines on stdout are kept for the message)
    while (line := p.stdout.readline()) and "working" not in line:
        seen.append(line)
    if "working" not in line:  # EOF: it died; stderr can be read now without blocking
        raise AssertionError(f"no worker started: stdout {seen!r}, stderr {p.stderr.read()[-3000:]}")
    kids = kill_9_then_no_survivors(p, lambda kids: len(kids) >= 2, f"the {pool} pool's 2 workers")
    assert len(kids) == 2
