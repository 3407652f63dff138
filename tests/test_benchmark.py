"""The benchmark end to end on SYNTHETIC sources with a known answer."""
import json

import duckdb
import numpy as np
import optuna
import polars as pl
import pytest
from typer.testing import CliRunner

from featstore.sweep.plan import make_tasks, plan

from featstore.sweep.run import run_study
from featstore.cli import app
from featstore.sweep.config import StudyError, load_study, parse_study
from featstore.sweep.fit import run_task
from featstore.split import SELECTIONS, honest_selections


def _study(**kw):
    raw = dict(study="t", backbones=["pixelstats"], heads={"logreg": {"trials": 3}},
               protocols={"mixed": {"folds": 5}, "leave-pair-out": {}}, bootstrap=0)
    raw.update(kw)
    return parse_study(raw)


def _run(st, db, tmp_path, **kw):
    return run_study(st, db, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", **kw)


def _rows(rep):
    return pl.DataFrame(rep.rows, infer_schema_length=None).filter(pl.col("scope") == "all")


def _mixed_and_pairs(rep):
    df = _rows(rep)
    mixed = df.filter((pl.col("protocol") == "mixed") & (pl.col("fold") == "pooled"))["auc"][0]
    pairs = df.filter(pl.col("protocol") == "leave-pair-out")["auc"]
    return mixed, pairs.mean()


@pytest.mark.slow
def test_known_answer_confounded_vs_neutral(synth_stores, tmp_path, recording_tracker):
    """A planted source confounder: mixed k-fold looks excellent, held-out pairs of sources do not.
    Switch the confounder off and the gap closes."""
    mixed, pairs = _mixed_and_pairs(_run(_study(), synth_stores["confounded"], tmp_path / "c"))
    assert mixed >= 0.93 and pairs <= 0.65, (mixed, pairs)
    t = recording_tracker[0]  # tracked (in memory here; MLflow in tests/test_track.py), every run closed
    assert {r["tags"].get("level") for r in t.runs.values()} == {"sweep", "model", "unit", "fold", "trial"} and not t.open
    mixed_n, pairs_n = _mixed_and_pairs(_run(_study(), synth_stores["neutral"], tmp_path / "n"))
    assert abs(mixed_n - pairs_n) < 0.05, (mixed_n, pairs_n)
    assert (mixed - pairs) - abs(mixed_n - pairs_n) > 0.3


def _selected(db, st, scramble: bool):
    (bb, pre, data, folds), = plan(st, db)
    out = {}
    for t in make_tasks(st, bb, pre, data, folds):
        y = data.meta.y.copy()
        if scramble:  # flip and shuffle the labels of this fold's held-out sources
            te = np.concatenate(list(t.fold.tests.values()))
            y[te] = np.random.default_rng(0).permutation(1 - y[te])
        meta = type(data.meta)(data.meta.source, y, data.meta.groups, data.meta.also_in)
        r = run_task(t, data.X, meta, optuna.storages.InMemoryStorage())
        out[(t.protocol, t.selection, t.fold.name)] = (r.params, r.val_score)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("selection", honest_selections())
def test_selection_never_sees_the_held_out_source(synth_stores, selection):
    """Scrambling the held-out source's labels changes nothing that was selected; the oracle, which
    selects on the test set, does change (so this test can see leakage when there is some). Every
    honest rule of the registry is checked, the rules that score trials otherwise (worst group,
    worst class, least source in the representation) with a head that uses the sources too."""
    heads = {"logreg": {"trials": 4}}
    if SELECTIONS[selection].measure is not None:
        heads["dfr"] = {"trials": 3}
    st = _study(selection=selection, oracle=True, heads=heads,
                protocols={"loso": {}, "leave-pair-out": {}})
    a = _selected(synth_stores["confounded"], st, scramble=False)
    b = _selected(synth_stores["confounded"], st, scramble=True)
    honest = [k for k in a if k[1] != "oracle"]
    oracle = [k for k in a if k[1] == "oracle"]
    assert honest and oracle
    for k in honest:
        assert a[k] == b[k], k
    assert any(a[k][1] != b[k][1] for k in oracle)


@pytest.mark.slow
def test_same_seed_same_results(synth_stores, tmp_path, recording_tracker):
    st = _study(heads={"logreg": {"trials": 3}, "lightgbm": {"trials": 2}},
                protocols={"mixed": {"folds": 3}, "loso": {}, "seen-unseen": {"train_sources": ["synthetic-a",
                                                                                                "synthetic-c"]}},
                bootstrap=100)
    db = synth_stores["confounded"]
    ids = [_run(st, db, tmp_path / d).sweep_id for d in ("a", "b")]
    volatile = {"sweep_id", "mlflow_run_id", "seconds", "created_at"}
    with duckdb.connect(str(db), read_only=True) as con:
        cols = [c for (c,) in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'results'")
                .fetchall() if c not in volatile]
        a, b = (con.execute(f"SELECT {', '.join(cols)} FROM results WHERE sweep_id = ? ORDER BY ALL", [i]).fetchall()
                for i in ids)
    assert len(a) > 20
    assert a == b


def _stored(db, sweep_id):
    volatile = {"sweep_id", "mlflow_run_id", "seconds", "created_at"}
    with duckdb.connect(str(db), read_only=True) as con:
        cols = [c for (c,) in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'results'")
                .fetchall() if c not in volatile]
        return con.execute(f"SELECT {', '.join(cols)} FROM results WHERE sweep_id = ? ORDER BY ALL",
                           [sweep_id]).fetchall()


@pytest.mark.slow
def test_workers_give_the_same_answer_and_a_sweep_resumes(synth_stores, tmp_path, recording_tracker):
    """Units are scored and tracked as they finish, in whatever order workers finish them: the
    stored rows (every column) are the same with 1 worker or 2."""
    db = synth_stores["confounded"]
    st = _study(heads={"logreg": {"trials": 2}}, protocols={"loso": {}, "mixed": {"folds": 3}}, bootstrap=20)
    one, two = _run(st, db, tmp_path / "w1", workers=1), _run(st, db, tmp_path / "w2", workers=2)
    a, b = _stored(db, one.sweep_id), _stored(db, two.sweep_id)
    assert len(a) > 20 and any(r for r in a if "source-mean" in r) and a == b
    # the same workdir again with more trials: the journal keeps the first 2, adds 1 per study
    rep = _run(st, synth_stores["confounded"], tmp_path / "w1", trials=3)
    assert rep.n_trials == 3 * rep.n_tasks
    # the time by head adds up to the sweep's (end_to_end.py's floor): every study and trial counted once
    (h,) = rep.by_head.values()
    assert (h["studies"], h["trials"]) == (rep.n_tasks, rep.n_trials) and h["cpu"] > 0
    assert h["search"] == pytest.approx(rep.phases["search_sum"]) and h["refit"] == pytest.approx(rep.phases["refit_sum"])
    from featstore.sweep.fit import journal

    storage = journal(tmp_path / "w1" / "optuna" / "t.journal")
    names = optuna.get_all_study_names(storage)
    assert len(names) == rep.n_tasks
    assert all(len(optuna.load_study(study_name=n, storage=storage).trials) == 3 for n in names)  # not 2 + 3


def test_failing_trials_are_recorded_and_the_sweep_goes_on(synth_stores, tmp_path, recording_tracker):
    st = _study(heads={"logreg": {"trials": 2}, "lightgbm": {"trials": 1}}, protocols={"loso": {}})
    st.heads[0].fixed = {"C": -1.0}  # the config refuses this (tests/test_config.py): make every fit fail here
    rep = _run(st, synth_stores["confounded"], tmp_path)
    df = pl.DataFrame(rep.rows, infer_schema_length=None)
    bad = df.filter(pl.col("head") == "logreg")
    assert (bad["status"] == "failed").all() and bad["error"].str.contains("C").all()
    assert (bad["n_trials_failed"] == 2).all()
    assert (df.filter(pl.col("head") == "lightgbm")["status"] == "ok").all()
    with duckdb.connect(str(synth_stores["confounded"]), read_only=True) as con:
        n = con.execute("SELECT count(*) FROM results WHERE status = 'failed' AND sweep_id = ?",
                        [rep.sweep_id]).fetchone()[0]
    assert n == bad.height


@pytest.mark.slow
def test_three_class_target(synth_stores, tmp_path, recording_tracker):
    st = _study(target="3class", class_column="class", classes=["normal", "pneumonia", "covid"],
                heads={"logreg": {"trials": 2}}, protocols={"mixed": {"folds": 3}}, bootstrap=50)
    df = _rows(_run(st, synth_stores["confounded"], tmp_path))
    pooled = df.filter(pl.col("fold") == "pooled").row(0, named=True)
    m = json.loads(pooled["metrics"]) if isinstance(pooled["metrics"], str) else pooled["metrics"]
    assert 0.5 < pooled["auc"] <= 1 and pooled["auc_lo"] <= pooled["auc"] <= pooled["auc_hi"]
    assert {"sensitivity_0", "ppv_2", "mean_class_accuracy"} <= set(m)


@pytest.mark.parametrize("change, message", [
    (dict(sources=["synthetic-a", "nope"]), "unknown source"),
    # sources a config names: the unknown one, the close one, the valid ones, on one line
    (dict(sources=["synthetic-a", "synthetc-c"]), r"^t: sources: unknown source 'synthetc-c' \(did you mean "
     r"'synthetic-c'\?\); known: synthetic-a, synthetic-b, synthetic-c, synthetic-d$"),
    (dict(protocols={"seen-unseen": {"train_sources": ["synthetic-a", "synthetic_c"]}}),
     r"^t: protocols.seen-unseen.train_sources: unknown source 'synthetic_c' \(did you mean 'synthetic-c'\?\); "
     r"known: synthetic-a, synthetic-b, synthetic-c, synthetic-d$"),
    (dict(protocols={"seen-unseen": {"train_sources": ["synthetic-a"], "unseen_sources": ["synthetic-bb"]}}),
     r"protocols.seen-unseen.unseen_sources: unknown source 'synthetic-bb' \(did you mean 'synthetic-b'\?\)"),
    (dict(sources=["synthetic-a", "synthetic-b", "synthetic-c"],
          protocols={"seen-unseen": {"train_sources": ["synthetic-a", "synthetic-d"]}}),
     r"train_sources: source 'synthetic-d' is not among the study's sources \(synthetic-a, synthetic-b, "
     r"synthetic-c\); add it to sources$"),
    (dict(label_column="nope"), "column 'nope'"),
    (dict(backbones=["tv-resnet50-imagenet"]), "no embeddings for backbone"),
    (dict(sources=["synthetic-a", "synthetic-b"]), "mostly-negative"),
    (dict(heads={"svm": {}}), "unknown head"),
    (dict(heads={"grl_mlp": {"fixed": {"epochs": 3}}}), r"unknown hyperparameter.*epochs.*allowed:.*max_epochs"),
    (dict(protocols={"k-fold": {}}), "unknown protocol"),
    (dict(selection="peek"), "selection"),
])
def test_impossible_studies_fail_before_any_work(synth_stores, tmp_path, change, message):
    with pytest.raises(StudyError, match=message):
        st = _study(**change)
        plan(st, synth_stores["confounded"])
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_cli_sweep_report_and_mlflow(synth_stores, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tmp_path / "study.yaml"
    cfg.write_text("study: cli\nbackbones: [pixelstats]\nheads: {logreg: {trials: 2}, grl_mlp: {trials: 1, fixed: "
                   "{max_epochs: 6}}}\nprotocols: {mixed: {folds: 3}, loso: {}, leave-pair-out: {},\n  seen-unseen: "
                   "{train_sources: [synthetic-a, synthetic-c]}}\nbootstrap: 100\n")
    db = str(synth_stores["confounded"])
    r = CliRunner().invoke(app, ["sweep", str(cfg), "--db", db])
    assert r.exit_code == 0, r.output
    assert "seen vs unseen" in r.output
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("cli").experiment_id], max_results=5000)
    levels = {}
    for run in runs:
        levels.setdefault(run.data.tags["level"], []).append(run)
    assert len(levels["sweep"]) == 1 and len(levels["unit"]) == 8 and len(levels["model"]) == 2  # two heads
    by_id = {run.info.run_id: run for run in runs}
    trial = levels["trial"][0]
    fold = by_id[trial.data.tags["mlflow.parentRunId"]]
    unit = by_id[fold.data.tags["mlflow.parentRunId"]]
    assert fold.data.tags["level"] == "fold" and unit.data.tags["level"] == "unit"
    model = by_id[unit.data.tags["mlflow.parentRunId"]]
    assert model.data.tags["level"] == "model" and model.data.params["head"] == unit.data.params["head"]
    assert model.data.tags["mlflow.parentRunId"] == levels["sweep"][0].info.run_id
    for k in ("protocol", "head", "backbone", "weights_id", "preprocess", "seed", "code_version", "selection"):
        assert k in fold.data.tags
    from featstore.track import Tracker  # artifacts live beside mlflow.db (mlflow-artifacts:, served by `featstore ui`)

    arts = {p.name for p in Tracker("cli", f"sqlite:///{tmp_path / 'mlflow.db'}").artifact_files(unit.info.run_id,
                                                                                               tmp_path / "arts")}
    assert {"per_source.csv", "confusion.png"} <= arts
    r = CliRunner().invoke(app, ["report", "--db", db, "--out", str(tmp_path / "rep"), "--study", "cli"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text().replace("\\", "")  # Markdown punctuation is escaped
    assert "seen vs unseen" in md and "heldout=synthetic-a" in md and "[" in md and "verdict" in md
    # the evidence is the probe's rows: without one (other tests may probe this shared store) the report says how
    assert "Shortcut evidence" in md and ("same_source" in md if "No domain probe yet" not in md else
                                          "featstore probe --backbone pixelstats --preprocess original" in md)
    assert (tmp_path / "rep" / "report.html").read_text().startswith("<!doctype html>")
    assert list((tmp_path / "rep").glob("roc_*.png"))
    r = CliRunner().invoke(app, ["sql", "--db", db, "--format", "json",
                                 "SELECT head, protocol, auc FROM latest_results WHERE study = 'cli' AND scope = 'all' "
                                 "AND fold = 'pooled' ORDER BY auc DESC"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 4


def test_checked_in_study_configs_parse(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "featstore" / "studies").glob("*.yaml"))
    assert configs
    for c in configs:
        load_study(c)
    with pytest.raises(StudyError, match="no such study config"):
        load_study("nope.yaml")
    toml = tmp_path / "s.toml"
    toml.write_text('study = "t"\nbackbones = ["pixelstats"]\nheads = ["logreg"]\n[protocols.mixed]\nfolds = 3\n')
    st = load_study(toml)
    assert st.protocols == {"mixed": {"folds": 3}} and st.heads[0].name == "logreg"
    toml.write_text('study = "t"\nbackbones = ["pixelstats"]\nheads = ["logreg"]\nprotocols = ["mixed"]\ntrails = 3\n')
    with pytest.raises(StudyError, match="unknown key.*trails"):
        load_study(toml)


@pytest.mark.slow
def test_ui_serves_the_sweeps_on_localhost(synth_stores, tmp_path):
    """`featstore ui` starts the real MLflow server on 127.0.0.1 and its API lists the nested runs."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _run(_study(heads={"logreg": {"trials": 1}}, protocols={"loso": {}}), synth_stores["confounded"], tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("featstore")
    proc = subprocess.Popen([str(exe), "ui", "--port", str(port), "--tracking-uri", uri],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = None
        deadline = time.time() + 600  # a deadline only (polled): a loaded 2-core machine needs minutes for MLflow
        while time.time() < deadline and body is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=t")
                body = json.loads(urllib.request.urlopen(req, timeout=2).read())
            except OSError:
                assert proc.poll() is None, "featstore ui exited"
                time.sleep(1)
        assert body is not None, "MLflow UI did not answer within 600 s"
        exp_id = body["experiment"]["experiment_id"]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                                     data=json.dumps({"experiment_ids": [exp_id], "max_results": 1000}).encode(),
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        levels = {t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "level"}
        assert levels == {"sweep", "model", "unit", "fold", "trial"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# --- the zero-shot head -------------------------------------------------------------------

@pytest.fixture(scope="module")
def zeroshot_store(synth_stores, tmp_path_factory):
    """The confounded store plus two tiny image-text embedding sets: CheXzero random-init (open_clip) and
    a SigLIP snapshot (Hugging Face) in a weights folder."""
    import shutil

    from conftest import CHEXZERO_TINY, tiny_siglip_snapshot
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect

    tmp = tmp_path_factory.mktemp("zs")
    db = tmp / "fs.duckdb"
    shutil.copy(synth_stores["confounded"], db)
    wdir = tmp / "weights"
    tiny_siglip_snapshot(wdir)
    con = connect(db)
    for bb in (create_backbone("chexzero", weights="random-init", config_overrides=CHEXZERO_TINY, seed=2),
               create_backbone("siglip-base", weights_dir=wdir)):
        assert not embed(con, bb, batch_size=64, workers=0).failed
    con.close()
    return db, wdir


def _zs_study(wdir, **kw):
    from conftest import CHEXZERO_TINY

    zs = {"prompts": {"covid": ["covid-19 pneumonia", "viral pneumonia"], "non_covid": ["normal chest x-ray"]},
          "weights_dir": str(wdir), "config_overrides": {"chexzero": CHEXZERO_TINY}}
    return _study(**dict(dict(backbones=["chexzero", "siglip-base"], heads={"zeroshot": zs, "logreg": {"trials": 1}},
                              protocols={"mixed": {"folds": 3}, "loso": {}}), **kw))


@pytest.mark.slow
def test_zeroshot_head_sweeps_under_mixed_and_loso(zeroshot_store, tmp_path, recording_tracker):
    """One trial per fold (nothing to search, whatever --trials says), rows under every protocol, and
    predictions that do not depend on the fold: the head never saw a source, nor any label."""
    from featstore.api import open_store

    db, wdir = zeroshot_store
    st = _zs_study(wdir)
    for bb, pre, data, folds in plan(st, db):
        tasks = make_tasks(st, bb, pre, data, folds, trials=4)
        assert {t.trials for t in tasks if t.head == "zeroshot"} == {1} and {t.trials for t in tasks
                                                                           if t.head == "logreg"} == {4}
    rep = _run(st, db, tmp_path)
    assert rep.n_failed == 0
    df = _rows(rep).filter(pl.col("head") == "zeroshot")
    for bb in ("chexzero", "siglip-base"):
        mine = df.filter(pl.col("backbone") == bb)
        assert set(mine["protocol"]) == {"mixed", "loso"} and set(mine["status"]) == {"ok"}
        folds = mine.filter(pl.col("kind") == "fold")
        assert len(folds) == 3 + 4 and set(folds["n_trials"]) == {1}
        assert mine.filter(pl.col("fold") == "pooled")["auc"].is_between(0, 1).all()
        info = [json.loads(x) if isinstance(x, str) else x for x in folds["fit_info"]]
        assert len({i["text_identity"] for i in info}) == 1 and all(i["zero_shot"] for i in info)
    # the prompts are what the rows record as its parameters (a frame would merge logreg's keys in)
    assert {json.dumps(r["params"], sort_keys=True) for r in rep.rows if r["head"] == "zeroshot" and r["kind"] == "fold"
            } == {json.dumps({"prompts": st.heads[0].fixed["prompts"]}, sort_keys=True)}
    with open_store(db) as fs:
        p = fs.predictions(study="t", head="zeroshot")
    by = p.group_by(["backbone", "image_id"]).agg((pl.col("prob").max() - pl.col("prob").min()).alias("spread"),
                                                  pl.col("protocol").n_unique())
    assert by.height > 0 and (by["protocol"] == 2).all() and (by["spread"] < 1e-12).all()
    again = _run(st, db, tmp_path / "again")  # fixed seeds -> identical rows
    keep = ["protocol", "backbone", "fold", "test_set", "scope", "auc"]
    assert _rows(again).filter(pl.col("head") == "zeroshot").select(keep).sort(keep).equals(df.select(keep).sort(keep))


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(backbones=["pixelstats"]), r"heads.zeroshot: pixelstats/original: pixelstats \(pixelstats\) has no text tower"),
    (dict(backbones=["chexzero"], heads={"zeroshot": {"prompts": {"covid": ["x"], "non_covid": ["y"]}}}),
     "changed model configuration"),
    (dict(backbones=["siglip-base"], heads={"zeroshot": {"prompts": {"covid": ["x"], "non_covid": ["y"]},
                                                          "weights_dir": "/nonexistent"}}),
     "weights for siglip-base not found.*put them in /nonexistent/google--siglip-base-patch16-224/"),
    (dict(heads={"zeroshot": {"prompts": {"covid": ["x"], "healthy": ["y"]}}}, backbones=["chexzero"]),
     "healthy is neither the positive 'covid' nor a negative"),
])
def test_zeroshot_studies_that_cannot_work_fail_before_any_work(zeroshot_store, tmp_path, change, message):
    db, wdir = zeroshot_store
    with pytest.raises(StudyError, match=message) as e:
        plan(_zs_study(wdir, **change), db)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    (dict(heads={"zeroshot": {"prompts": {"normal": ["a"], "covid": ["b"]}}}, target="3class",
          classes=["normal", "pneumonia", "covid"]), "zeroshot.prompts: must name each class once.*missing pneumonia"),
    (dict(heads={"zeroshot": {"prompts": {"normal": ["a"], "pneumonia": ["b"]}}}), "need the positive class 'covid'"),
    (dict(heads={"zeroshot": {"prompts": {"covid": ["a"], "normal": []}}}), "have no prompt"),
    (dict(heads={"zeroshot": {"prompts": {"covid": ["a"], "normal": ["b"]}, "trials": 5}}),
     "less than or equal to 1"),
    (dict(backbones=["biomedclip@cls"]), r"valid for biomedclip: pooler"),
    (dict(backbones={"rad-dino": {"pooling": "max"}}), "unknown pooling 'max'"),
])
def test_zeroshot_and_pooling_config_errors(change, message):
    with pytest.raises(StudyError, match=message):
        _study(**change)


def test_study_backbones_name_poolings_as_embed_stores_them():
    st = _study(backbones={"rad-dino": {"pooling": ["cls", "mean"]}, "siglip-base@pooler": None, "chexzero": {}})
    assert st.backbones == ["rad-dino", "rad-dino@mean", "siglip-base", "chexzero"]
    with pytest.raises(StudyError, match="more than once"):
        _study(backbones=["rad-dino", "rad-dino@cls"])
