"""Scaling out, and proof that nothing is lost: sweeps sharing a real PostgreSQL, MLflow on a tracking
server backed by it, Ray Data embedding, and kill -9 at random points (seeded) during embed and sweep.

Marked `scale`; CI runs them with the rest. Every subprocess has a timeout. Kill points follow events
(k finished trials, k committed batches, k finished shards; k drawn from a seeded RNG), never a
guess at how far a process gets in so many seconds: a busy machine changes the timing, not the test."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import optuna
import polars as pl
import psutil
import pytest
import yaml

from featstore.sweep.run import run_study
from featstore.sweep.config import load_study

pytestmark = pytest.mark.scale

FEATSTORE = str(Path(sys.executable).with_name("featstore"))
FAST = {"FEATSTORE_SWEEP_HEARTBEAT_S": "1", "FEATSTORE_SWEEP_GRACE_S": "3"}
LIVE_GRACE_S = 24 * 3600  # where every process lives: no heartbeat is ever late enough to be "dead"
VOLATILE = {"sweep_id", "mlflow_run_id", "seconds", "created_at"}


def _config(tmp_path, name, heads=None, protocols=None) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        study=name, backbones=["pixelstats"], seed=7, bootstrap=50,
        heads=heads or {"logreg": {"trials": 3}, "lightgbm": {"trials": 2}},
        protocols=protocols or {"loso": {}, "leave-pair-out": {}})))
    return cfg


def _start(args, env=None, **kw):
    return subprocess.Popen([FEATSTORE, *args], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _start_watched(args, env=None):
    """Start featstore and read its stdout and stderr as they come, into p.out and p.err (a pipe
    nobody reads fills up and stalls the process: Ray draws progress bars)."""
    import threading

    p = subprocess.Popen([FEATSTORE, *args], env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    p.out, p.err = [], []
    p.readers = [threading.Thread(target=lambda f, into: into.extend(f), args=(f, into), daemon=True)
                 for f, into in ((p.stdout, p.out), (p.stderr, p.err))]
    for t in p.readers:
        t.start()
    return p


def _held(marker: Path) -> bool:
    """The embed hold hook (FEATSTORE_TEST_HOLD_EMBED) has written its marker: the run holds there."""
    return marker.exists() and marker.read_text().endswith("\n")


def _stderr(proc) -> str:
    if hasattr(proc, "err"):
        for t in proc.readers:
            t.join(timeout=10)
        return "".join(proc.err)
    return proc.stderr.read()


def _kill_tree(proc):
    """SIGKILL the process and everything it started (Ray's raylet and workers included)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [psutil.Process(proc.pid)] + kids if proc.poll() is None else kids:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(kids, timeout=30)


def _rows(db, sweep_id):
    with duckdb.connect(str(db), read_only=True) as con:
        cols = [c for (c,) in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'results' "
                                          "ORDER BY column_index").fetchall() if c not in VOLATILE]
        return con.execute(f"SELECT {', '.join(cols)} FROM results WHERE sweep_id = ? ORDER BY ALL",
                           [sweep_id]).fetchall()


def _trials(storage) -> dict:
    """study -> {trial number: (state, params, value)}"""
    out = {}
    for name in optuna.get_all_study_names(storage):
        st = optuna.load_study(study_name=name, storage=storage)
        out[name] = {t.number: (t.state.name, json.dumps(t.params, sort_keys=True), t.value,
                                "error" in t.user_attrs) for t in st.get_trials(deepcopy=False)}
    return out


def _finished(trials: dict) -> dict:
    return {s: {n: v for n, v in ts.items() if v[0] in ("COMPLETE", "PRUNED")} for s, ts in trials.items()}


def _counted(ts: dict) -> int:
    return sum(v[0] in ("COMPLETE", "PRUNED") or (v[0] == "FAIL" and v[3]) for v in ts.values())


def wait_for(what: str, cond, proc=None, timeout: float = 400, every: float = 0.1):
    """Poll cond() until it returns something true. Fail naming `what` at the deadline, or at once,
    with its stderr, if proc ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}:\n{_stderr(proc)[-3000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _n_finished_in(journal: Path) -> int:
    if not journal.exists():
        return 0
    return sum(len(ts) for ts in _finished(_trials(S_journal(journal))).values())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- sweeps on PostgreSQL ------------------------------------------------------------------------

def test_four_postgres_workers_equal_one_and_track_to_an_mlflow_server(synth_stores, postgres, tmp_path,
                                                                      monkeypatch):
    """4 `featstore sweep-worker` processes reading a Parquet snapshot share one PostgreSQL study
    storage; the coordinator refits and logs to an MLflow tracking server backed by PostgreSQL. Every
    trial appears once, and the trials and result rows equal a single-worker run's."""
    from featstore.sweep import fit as S
    from featstore.store import connect, export_snapshot

    # no process dies here: with a grace no busy machine reaches, a takeover can only come from the claim
    # logic, never from a heartbeat that a loaded machine delayed past the default 30 s
    monkeypatch.setattr(S, "GRACE_S", LIVE_GRACE_S)
    db = synth_stores["confounded"]
    cfg = _config(tmp_path, "pg")
    st = load_study(cfg)
    one_url, four_url = postgres("optuna_one"), postgres("optuna_four")
    one = run_study(st, db, tmp_path / "one", f"sqlite:///{tmp_path / 'one.db'}", workers=1, storage=one_url)

    con = connect(db, read_only=True)
    export_snapshot(con, tmp_path / "snap")
    con.close()
    workers = [_start(["sweep-worker", str(cfg), "--storage", four_url, "--db", str(tmp_path / "snap")],
                      env={"FEATSTORE_SWEEP_GRACE_S": str(LIVE_GRACE_S)}) for _ in range(4)]
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                               postgres("mlflow"), "--artifacts-destination", str(tmp_path / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                              # no job runner: its Huey consumer processes cost ~25 CPU s and this test runs no job
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        outs = [w.communicate(timeout=400) for w in workers]
        for w, (_, e) in zip(workers, outs):
            assert w.returncode == 0, e[-2000:]
        assert sum("worker done" in e for _, e in outs) == 4
        tracking = f"http://127.0.0.1:{port}"
        _wait_http(tracking + "/health", server)
        four = run_study(st, db, tmp_path / "four", tracking, workers=1, storage=four_url)
        from mlflow import MlflowClient

        client = MlflowClient(tracking)
        exp = client.get_experiment_by_name("pg")
        runs = client.search_runs([exp.experiment_id], max_results=5000)
        assert {r.data.tags.get("level") for r in runs} == {"sweep", "model", "unit", "fold", "trial"}
        assert any(r.info.run_id == four.parent_run_id for r in runs)
    finally:
        for w in workers:
            if w.poll() is None:
                _kill_tree(w)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    a, b = _trials(optuna.storages.RDBStorage(one_url)), _trials(optuna.storages.RDBStorage(four_url))
    assert a == b and len(a) == one.n_tasks
    for name, ts in b.items():
        assert sorted(ts) == list(range(len(ts)))                    # each trial once, none lost
        assert len(ts) == (3 if "logreg" in name else 2)
    owners = {optuna.load_study(study_name=n, storage=four_url).user_attrs["claimed_by"] for n in b}
    assert len(owners) >= 2, owners                                  # the work was shared
    assert all("(took over)" not in o for o in owners)
    ra, rb = _rows(db, one.sweep_id), _rows(db, four.sweep_id)
    assert len(ra) > 20 and ra == rb


def _wait_http(url, proc, timeout=120):
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"server exited: {proc.stderr.read()[-2000:]}"
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout}s")


def test_a_killed_worker_loses_no_finished_trial_and_its_study_is_taken_over(synth_stores, postgres, tmp_path,
                                                                             monkeypatch):
    from featstore.sweep import fit as S

    monkeypatch.setattr(S, "HEARTBEAT_S", 1)
    monkeypatch.setattr(S, "GRACE_S", 3)
    db = synth_stores["confounded"]
    cfg = _config(tmp_path, "takeover", heads={"grl_mlp": {"trials": 4, "fixed": {"max_epochs": 6}}},
                  protocols={"loso": {}})
    url = postgres("optuna_takeover")
    storage = optuna.storages.RDBStorage(url)
    # the worker parks the first trial that starts once one has finished (the sweep's test hook), and
    # is killed there: mid-trial on an event, not on the clock
    marker = tmp_path / "held"
    w = _start(["sweep-worker", str(cfg), "--storage", url, "--db", str(db)],
               env={**FAST, "FEATSTORE_TEST_HOLD_TRIAL": f"{marker}:1"})
    try:
        wait_for("the worker to be mid-trial after one finished trial",
                 lambda: marker.exists() and marker.read_text().endswith("\n"), w, timeout=1200)
    finally:
        _kill_tree(w)
    postgres.check()  # a killed worker must not take the server down (its log if it did)
    before = _finished(_trials(storage))
    rep = run_study(load_study(cfg), db, tmp_path, f"sqlite:///{tmp_path / 'm.db'}", storage=url)
    assert rep.n_failed == 0
    after = _trials(storage)
    for name, ts in before.items():
        assert all(after[name][n] == v for n, v in ts.items())          # every finished trial kept
    stale = [(n, v) for ts in after.values() for n, v in ts.items() if v[0] == "FAIL" and not v[3]]
    assert len(stale) == 1                                               # the one it was running
    assert all(_counted(ts) == 4 for ts in after.values())
    owners = [optuna.load_study(study_name=n, storage=url).user_attrs["claimed_by"] for n in after]
    assert any("(took over)" in o for o in owners)


# --- kill -9 during a sweep (journal storage) ------------------------------------------------------

def test_kill_9_during_a_sweep_repeatedly_keeps_every_finished_trial(synth_stores, tmp_path, mlflow_db,
                                                                     recording_tracker):
    db = synth_stores["confounded"]
    cfg = _config(tmp_path, "killsweep", heads={"logreg": {"trials": 4}, "grl_mlp": {"trials": 2,
                                                                                    "fixed": {"max_epochs": 6}}},
                  protocols={"loso": {}})
    journal = tmp_path / "w" / "optuna" / "killsweep.journal"
    rng = random.Random(6)
    kept: dict = {}
    mlflow_db(tmp_path / "m.db")  # the sweeps below find MLflow's schema there
    for k in sorted(rng.sample(range(1, 22), 3)):  # kill once k trials have finished, whatever the clock says
        p = _start(["sweep", str(cfg), "--workdir", str(tmp_path / "w"), "--db", str(db),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
        try:
            wait_for(f"{k} finished trials", lambda: _n_finished_in(journal) >= k, p, every=0.05)
        finally:
            _kill_tree(p)
        now = _finished(_trials(S_journal(journal)))
        for name, ts in kept.items():
            assert all(now[name][n] == v for n, v in ts.items())
        kept = now
    assert sum(map(len, kept.values())) >= k
    p = _start(["sweep", str(cfg), "--workdir", str(tmp_path / "w"), "--db", str(db),
                "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    out, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err[-3000:]
    final = _trials(S_journal(journal))
    for name, ts in kept.items():
        assert all(final[name][n] == v for n, v in ts.items())
    assert all(_counted(ts) == (4 if "logreg" in name else 2) for name, ts in final.items())
    # the store holds whole sweeps only, and the finished one is complete (the reference run, in this
    # process, tracks in memory: recording_tracker)
    clean = run_study(load_study(cfg), db, tmp_path / "clean", f"sqlite:///{tmp_path / 'c.db'}")
    with duckdb.connect(str(db), read_only=True) as con:
        per_sweep = con.execute("SELECT sweep_id, count(*) FROM results WHERE study = 'killsweep' "
                                "GROUP BY ALL").fetchall()
    assert len(per_sweep) == 2 and {n for _, n in per_sweep} == {len(clean.rows)}


def S_journal(path):
    from featstore.sweep.fit import journal

    return journal(path)


# --- kill -9 during embed, and a second process meanwhile ----------------------------------------------

def _ingested_db(tmp_path, manifest) -> Path:
    db = tmp_path / "fs.duckdb"
    r = subprocess.run([FEATSTORE, "ingest", "--manifest", str(manifest), "--db", str(db)], capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode in (0, 1), r.stderr  # 1: the synthetic set's planted bad files, recorded
    return db


def _embedded(db, backbone="pixelstats"):
    with duckdb.connect(str(db), read_only=True) as con:
        n_img = con.execute("SELECT count(*) FROM images").fetchone()[0]
        n, distinct = con.execute("SELECT count(*), count(DISTINCT image_id) FROM embeddings WHERE backbone = ?",
                                  [backbone]).fetchone()
    return n_img, n, distinct


# a fast backbone: the kills land mid-run because the run holds there (FEATSTORE_TEST_HOLD_EMBED), not
# because the model is slow
EMBED = ["embed", "--backbone", "pixelstats", "--batch-size", "8"]
# Ray: a block is a batch, each costs Ray's per-block overhead (a task, a shard write); 32 images a block
# leave 13 blocks of the 400 images, still many more than the kills below wait for (k <= 4)
RAY_EMBED = ["embed", "--backbone", "pixelstats", "--batch-size", "32", "--engine", "ray"]


def _hold(marker: Path, k: int) -> dict:
    return {"FEATSTORE_TEST_HOLD_EMBED": f"{marker}:{k}"}


@pytest.fixture(scope="session")
def big_store(tmp_path_factory):
    """400 synthetic images: 50 batches of 8 (13 Ray blocks of 32), so that a kill after k of them leaves
    work to resume; generated and ingested (`featstore ingest`) once per run, for every worker."""
    from featstore.synth import generate

    from conftest import _once

    return _once(tmp_path_factory, "big", lambda d: _ingested_db(d, generate(d / "data", n_per_source=100,
                                                                            size=96, seed=5)))


@pytest.fixture
def big_db(big_store, tmp_path) -> Path:
    """This test's copy of the ingested store (the tests embed into it), its image paths the shared ones."""
    import shutil

    assert not big_store.with_name(big_store.name + ".wal").exists()  # the ingest closed it: all in the file
    return Path(shutil.copy(big_store, tmp_path / big_store.name))


def test_kill_9_during_embed_repeatedly_then_nothing_missing_or_doubled(big_db, tmp_path):
    db = big_db
    rng = random.Random(3)
    seen = 0
    for run in range(3):  # 50 batches of 8; each run is killed once k of its batches are in the store
        k = rng.randint(1, 12)
        marker = tmp_path / f"held-{run}"
        p = _start_watched(EMBED + ["--workers", "1", "--db", str(db)], env=_hold(marker, k))
        try:
            wait_for(f"{k} committed batches", lambda: _held(marker), p)
        finally:
            _kill_tree(p)
        n_img, n, distinct = _embedded(db)
        assert n == distinct and seen + 8 * k <= n < n_img  # whole batches, never twice, never lost
        seen = n
    r = subprocess.run([FEATSTORE, *EMBED, "--workers", "1", "--db", str(db)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    n_img, n, distinct = _embedded(db)
    assert n == distinct == n_img


def test_a_second_process_gets_a_clear_message_while_embed_writes(synth_manifest, tmp_path):
    db = _ingested_db(tmp_path, synth_manifest)
    marker = tmp_path / "held"
    p = _start_watched(EMBED + ["--workers", "0", "--db", str(db)], env=_hold(marker, 1))
    try:  # once its first batch is in, the embed run holds the store; frozen, it keeps holding it
        wait_for("embed's first committed batch", lambda: _held(marker), p)
        p.send_signal(signal.SIGSTOP)
        r = subprocess.run([FEATSTORE, "sql", "SELECT count(*) FROM images", "--db", str(db)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "open for writing in another process" in " ".join(r.stderr.split()), r.stderr
        assert "Traceback" not in r.stderr
        r = subprocess.run([FEATSTORE, "ingest", "--manifest", str(synth_manifest), "--db", str(db)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "open for writing in another process" in " ".join(r.stderr.split()), r.stderr
    finally:
        _kill_tree(p)


# --- Ray -----------------------------------------------------------------------------------------

def test_ray_embeds_what_local_embeds_once_and_records_failures(synth_manifest, tmp_path, ray_head, monkeypatch):
    import ray

    for k, v in ray_head.env.items():  # ray.init joins the session's head
        monkeypatch.setenv(k, v)

    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.embed_ray import embed_ray
    from featstore.store import connect

    local, remote = tmp_path / "l", tmp_path / "r"
    local.mkdir(), remote.mkdir()
    dbs = [_ingested_db(local, synth_manifest), _ingested_db(remote, synth_manifest)]
    broken = tmp_path / "broken.png"
    con = connect(dbs[1])
    victim, path = con.execute("SELECT image_id, path FROM images ORDER BY image_id LIMIT 1").fetchone()
    broken.write_bytes(Path(path).read_bytes()[:200])  # a file that went bad after ingest
    con.execute("UPDATE images SET path = ? WHERE image_id = ?", [str(broken), victim])
    bb = create_backbone("pixelstats")
    rep = embed_ray(con, bb, dict(name="pixelstats"), batch_size=16, shards=tmp_path / "shards")
    assert rep.status == "completed" and rep.n_embedded == rep.n_todo - 1 and len(rep.failed) == 1
    assert con.execute("SELECT reason FROM embed_errors WHERE image_id = ?", [victim]).fetchone()[0]
    assert not list((tmp_path / "shards").rglob("*.parquet"))  # imported, then removed
    again = embed_ray(con, bb, dict(name="pixelstats"), shards=tmp_path / "shards")
    assert again.n_embedded == 0 and not ray.is_initialized()  # nothing missing: no workers started
    got = dict(con.execute("SELECT image_id, vector FROM embeddings").fetchall())
    con.close()
    lcon = connect(dbs[0])
    embed(lcon, bb, batch_size=16, workers=0)
    want = dict(lcon.execute("SELECT image_id, vector FROM embeddings").fetchall())
    lcon.close()
    assert set(want) - set(got) == {victim}
    assert all(got[k] == want[k] for k in got)


def test_ray_embed_killed_at_random_points_then_resumed(big_db, tmp_path, ray_head):
    db = big_db
    shards = tmp_path / "shards"
    args = RAY_EMBED + ["--shards", str(shards), "--db", str(db)]
    head = ray_head.env  # the driver is killed, the session's head lives on
    rng = random.Random(11)
    for run in range(2):  # each run is killed once k more whole shard files are written
        k = rng.randint(1, 4)
        before = set(_whole_shards(shards))
        marker = tmp_path / f"held-{run}"  # the actor holds on its next block once k are done
        p = _start_watched(args, env={**head, **_hold(marker, k)})
        try:
            wait_for(f"{k} finished shard files", lambda: _held(marker) and len(set(_whole_shards(shards)) - before)
                     >= k, p, timeout=1800, every=0.2)
        finally:
            _kill_tree(p)
        n_img, n, distinct = _embedded(db)
        assert n == distinct < n_img
        if run:  # the second run began by importing the first one's shards
            assert n >= k, "the killed run's finished shards were not kept"
    assert len(_whole_shards(shards)) >= k
    # a shard torn by the kill mid-write is dropped at import, its images embedded again
    part = shards / "backbone=pixelstats" / "preprocess=original" / "source=synthetic-a"
    part.mkdir(parents=True, exist_ok=True)
    (part / "torn.parquet").write_bytes(b"PAR1 not a whole file")
    # the planted one, and any other the kills tore (Ray's writers are killed mid-file as well)
    torn = set(shards.rglob("*.parquet")) - set(_whole_shards(shards))
    assert part / "torn.parquet" in torn
    r = subprocess.run([FEATSTORE, *args], capture_output=True, text=True, timeout=1800, env={**os.environ, **head})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(torn)} shard file(s) torn" in " ".join(r.stderr.split())
    n_img, n, distinct = _embedded(db)
    assert n == distinct == n_img
    assert not list(shards.rglob("*.parquet"))


def _whole_shards(shards: Path) -> list[Path]:
    """Shard files with a readable footer (a file being written has none yet)."""
    import pyarrow.parquet as pq

    out = []
    for f in shards.rglob("*.parquet"):
        try:
            pq.ParquetFile(f).metadata
            out.append(f)
        except Exception:  # noqa: BLE001 - being written, or vanished (imported) meanwhile
            pass
    return out


def test_a_ray_worker_killed_mid_run_loses_only_its_block(big_db, tmp_path, ray_head):
    """kill -9 the backbone actor while the driver lives: Ray restarts it and redoes the in-flight
    block; the run completes with nothing missing or doubled."""
    db = big_db
    shards = tmp_path / "shards"
    marker = tmp_path / "held"  # the actor holds mid-block once 2 are done; restarted, it goes on
    p = _start(RAY_EMBED + ["--shards", str(shards), "--db", str(db)],
               env={**ray_head.env, **_hold(marker, 2)})
    victim = None
    try:
        # the held actor wrote its pid: the map worker that is mid-block (a process of the session's head)
        wait_for("the actor to hold its 3rd block after writing shards",
                 lambda: _held(marker) and list(shards.rglob("*.parquet")), p, timeout=600, every=0.2)
        pid = int(marker.read_text().split()[0])
        for c in psutil.Process(ray_head.pid).children(recursive=True):
            if c.pid == pid and ("MapWorker" in " ".join(c.cmdline()) or "MapWorker" in c.name()):
                victim = c
        assert victim is not None, "no Ray map worker found"
        victim.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=1800)
    finally:
        if p.poll() is None:
            _kill_tree(p)
    assert p.returncode == 0, err[-3000:]
    n_img, n, distinct = _embedded(db)
    assert n == distinct == n_img


def test_a_sweep_whose_store_stays_busy_keeps_its_rows(synth_stores, tmp_path, monkeypatch):
    """The sweep's one write waits for the store; if it never frees, the rows go to Parquet and the
    error says how to load them; loading them later gives exactly the sweep's rows."""
    import re

    from featstore.store import StoreBusyError

    db = synth_stores["neutral"]
    holder = []

    def hold(*_):  # once the sweep has read the store: another process takes the write lock and keeps it
        if not holder:
            holder.append(subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect("
                                            f"{str(db)!r}); print('held', flush=True); time.sleep(600)"],
                                           stdout=subprocess.PIPE, text=True))
            assert holder[0].stdout.readline().strip() == "held"
    monkeypatch.setenv("FEATSTORE_WRITE_WAIT_S", "3")
    st = load_study(_config(tmp_path, "busy", heads={"logreg": {"trials": 1}}, protocols={"loso": {}}))
    try:
        with pytest.raises(StoreBusyError, match="result rows are kept in") as e:
            run_study(st, db, tmp_path, f"sqlite:///{tmp_path / 'm.db'}", progress=hold)
    finally:
        for h in holder:
            h.kill()
            h.wait(timeout=30)
    allow, sql = re.search(r'featstore sql --write --allow-read (\S+) "(.*)"', " ".join(str(e.value).split())).groups()
    kept = pl.read_parquet(next(tmp_path.glob("unsaved-*/results.parquet")))
    r = subprocess.run([FEATSTORE, "sql", "--write", "--allow-read", allow, sql, "--db", str(db)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        n = con.execute("SELECT count(*) FROM results WHERE study = 'busy'").fetchone()[0]
    assert n == kept.height > 0


@pytest.mark.kill
def test_the_throwaway_postgres_dies_with_a_killed_test_process(tmp_path):
    """pg_ctl daemonises the server: a test run killed with -9 must not leave it running (its reaper
    stops it when the process that started it dies)."""
    from featstore.testing import _bin_dir

    if _bin_dir() is None:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; `make test` tries)")
    code = ("import sys, time\nfrom pathlib import Path\nfrom featstore.testing import local_postgres\n"
            "with local_postgres(Path(sys.argv[1])) as url:\n    url('up')\n    print('up', flush=True)\n"
            "    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "pg")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up"  # the server answered a CREATE DATABASE
        pid = int((tmp_path / "pg" / "data" / "postmaster.pid").read_text().split()[0])
        assert psutil.pid_exists(pid)
    finally:
        p.kill()
        p.wait()
    try:
        psutil.Process(pid).wait(timeout=120)  # returns when the server has exited; raises if it never does
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        logs = {f: (tmp_path / "pg" / f).read_text(errors="replace")[-2000:] for f in ("reaper.log", "log")
                if (tmp_path / "pg" / f).exists()}
        pytest.fail(f"the server outlived its starter by 120 s; logs: {logs}")
    finally:
        if psutil.pid_exists(pid):  # the failure: stop what the test started
            psutil.Process(pid).kill()
    assert not psutil.pid_exists(pid)


def test_the_postgres_reaper_ends_a_server_that_pg_ctl_could_not_stop(tmp_path):
    """When `pg_ctl stop` fails, the reaper ends the postmaster named in postmaster.pid itself. A stand-in
    server (a sleeping process) and a stop command that fails: no PostgreSQL needed."""
    from featstore.testing import start_reaper

    # a postmaster handles SIGQUIT itself; the stand-in restores its default, which a test run started in the
    # background of a non-interactive shell inherits as ignored (POSIX: `&` without job control ignores it)
    server = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGQUIT, "
                               "signal.SIG_DFL); print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline().strip() == b"ready"
        (tmp_path / "postmaster.pid").write_text(f"{server.pid}\n{tmp_path}\n")
        reaper = start_reaper(tmp_path, ["false"], subprocess.PIPE)  # returns once it is ready
        reaper.stdin.close()  # what the starter's death does
        assert reaper.wait(timeout=120) == 0
        assert server.wait(timeout=120) == -signal.SIGQUIT  # the immediate shutdown's signal was enough
        assert "still running after pg_ctl stop: SIGQUIT" in reaper.stderr.read().decode()
    finally:
        server.kill()
        server.wait()
