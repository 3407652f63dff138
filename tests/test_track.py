"""MLflow as a researcher compares in it: experiment kind, names, identity params, one metric
vocabulary, real times, FAILED/KILLED, artifacts that survive a move, the input dataset."""
import json
import os
import shutil
import signal
import threading

import pytest
from typer.testing import CliRunner

from featstore import track
from featstore.sweep.run import run_study
from featstore.sweep.config import parse_study


def _study(**kw):
    raw = dict(study="cmp", backbones=["pixelstats"], heads={"logreg": {"trials": 2}},
               protocols={"mixed": {"folds": 2}, "loso": {}}, bootstrap=0)
    raw.update(kw)
    return parse_study(raw)


def _runs(uri, study):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(study)
    return c, exp, c.search_runs([exp.experiment_id], max_results=5000)


@pytest.fixture(scope="module")
def swept(synth_stores, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("track")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = tmp / "study.yaml"
    cfg.write_text("study: cmp\nbackbones: [pixelstats]\nheads: {logreg: {trials: 2}}\n"
                   "protocols: {mixed: {folds: 2}, loso: {}}\nbootstrap: 0\n")
    from featstore.sweep.config import load_study

    rep = run_study(load_study(cfg), synth_stores["confounded"], tmp, uri)
    return tmp, uri, rep


@pytest.mark.slow
def test_experiment_is_model_development_and_runs_are_named(swept):
    _, uri, rep = swept
    c, exp, runs = _runs(uri, "cmp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    by = {}
    for r in runs:
        by.setdefault(r.data.tags["level"], []).append(r)
    sweep = by["sweep"][0]
    assert sweep.info.run_name.startswith("cmp 20") and sweep.info.run_id == rep.parent_run_id
    assert sorted(r.info.run_name for r in by["unit"]) == ["loso · logreg · pixelstats/original",
                                                          "mixed · logreg · pixelstats/original"]
    assert [r.info.run_name for r in by["model"]] == ["logreg · pixelstats/original"]
    assert {r.info.run_name for r in by["fold"]} >= {"fold heldout=synthetic-a", "fold r0-f0"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # the compare view lines unit runs up by identity params and one metric vocabulary
    for u in by["unit"]:
        assert {"head", "backbone", "weights_id", "preprocess", "protocol", "selection", "target",
                "held_out"} <= set(u.data.params)
        assert u.data.tags["sweep_id"] == rep.sweep_id
    loso = next(u for u in by["unit"] if u.data.params["protocol"] == "loso")
    assert {"auc_unseen_mean", "auc_unseen_worst", "auc_unseen_pooled"} <= set(loso.data.metrics)
    # the live sweep's progress
    assert c.get_metric_history(sweep.info.run_id, "tasks_done")[-1].value == rep.n_tasks


def test_runs_carry_the_times_the_work_happened(swept):
    _, uri, _ = swept
    _, _, runs = _runs(uri, "cmp")
    by_id = {r.info.run_id: r for r in runs}
    for r in runs:
        if r.data.tags["level"] == "trial":
            fold = by_id[r.data.tags["mlflow.parentRunId"]]
            unit = by_id[fold.data.tags["mlflow.parentRunId"]]
            # a trial ran inside its fold, the fold inside its unit (not all logged in one instant)
            assert fold.info.start_time <= r.info.start_time <= r.info.end_time <= fold.info.end_time
            assert unit.info.start_time <= fold.info.start_time and fold.info.end_time <= unit.info.end_time
    units = [r for r in runs if r.data.tags["level"] == "unit"]
    sweep = next(r for r in runs if r.data.tags["level"] == "sweep")
    assert all(sweep.info.start_time <= u.info.start_time for u in units)


def test_inputs_config_and_report_attached(swept, synth_stores):
    tmp, uri, rep = swept
    c, exp, runs = _runs(uri, "cmp")
    unit = next(r for r in runs if r.data.tags["level"] == "unit")
    ds = unit.inputs.dataset_inputs
    assert len(ds) == 1 and ds[0].dataset.name == "pixelstats/original"
    assert ds[0].dataset.digest == unit.data.params["weights_id"].split(":", 1)[-1][:36]
    assert json.loads(ds[0].dataset.source)["store"] == str(synth_stores["confounded"])
    t = track.Tracker("cmp", uri)
    got = {p.name for p in t.artifact_files(rep.parent_run_id, tmp / "a")}
    assert got == {"study.yaml"}
    assert {"per_source.csv", "confusion.png"} <= {p.name for p in t.artifact_files(unit.info.run_id, tmp / "b")}
    rid = track.attach_report("cmp", rep.sweep_id, [tmp / "study.yaml"], uri)
    assert rid == rep.parent_run_id
    assert (t.local_dir(c.get_run(rid).info.artifact_uri) / "report" / "study.yaml").is_file()
    # no tracking store where there was none
    assert track.attach_report("cmp", rep.sweep_id, [], f"sqlite:///{tmp / 'none.db'}") is None
    assert not (tmp / "none.db").exists()


def test_artifacts_survive_moving_the_folder(swept, tmp_path):
    """Runs record mlflow-artifacts: locations, resolved beside the database, not absolute paths."""
    src, _, rep = swept
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)  # a copy stands for the move (the module's other tests read the original)
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    c, exp, runs = _runs(uri, "cmp")
    assert exp.artifact_location == "mlflow-artifacts:/cmp"
    unit = next(r for r in runs if r.data.tags["level"] == "unit")
    assert str(src) not in unit.info.artifact_uri
    files = track.Tracker("cmp", uri).artifact_files(unit.info.run_id, tmp_path / "out")
    assert "per_source.csv" in {p.name for p in files}
    from featstore.jobs import _mlflow_ui_argv

    argv = _mlflow_ui_argv(uri, "127.0.0.1", 5999)
    assert argv[argv.index("--artifacts-destination") + 1] == str((moved / "mlartifacts").resolve())


def test_failed_sweep_closes_its_runs_failed(synth_stores, tmp_path, monkeypatch):
    import featstore.sweep.run as B

    def boom(tracker, st, parent, *a, **k):
        tracker.run("half-logged unit", parent=parent, tags=dict(level="unit"), status=None)
        raise RuntimeError("scoring broke")
    monkeypatch.setattr(B, "track_unit", boom)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError):
        run_study(_study(study="fail"), synth_stores["confounded"], tmp_path, uri)
    _, _, runs = _runs(uri, "fail")
    # the sweep, the model run and the unit it had opened
    assert [r.info.status for r in runs] == ["FAILED"] * 3


@pytest.mark.slow
def test_interrupted_sweep_closes_its_runs_killed(synth_stores, tmp_path, monkeypatch):
    """Ctrl-C, and SIGTERM (which unwinds the same way), mid-unit: every run opened is KILLED."""
    import featstore.sweep.run as B

    real = B.track_unit
    calls = [0]

    def interrupted(tracker, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second unit: its own run is open when the signal lands
            tracker.run("half-logged unit", parent=tracker.sweep_run, tags=dict(level="unit"), status=None)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(tracker, *a, **k)
    monkeypatch.setattr(B, "track_unit", interrupted)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: ray.init, run earlier, installs one
    with pytest.raises(KeyboardInterrupt):
        run_study(_study(study="kill"), synth_stores["confounded"], tmp_path, uri)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    _, _, runs = _runs(uri, "kill")
    status = {r.info.run_name: r.info.status for r in runs if r.data.tags["level"] in ("sweep", "unit")}
    assert status.pop("half-logged unit") == "KILLED"
    assert sorted(status.values()) == ["FINISHED", "KILLED"]  # the first unit finished; the sweep KILLED
    # the model run, open while its second unit was tracked
    assert [r.info.status for r in runs if r.data.tags["level"] == "model"] == ["KILLED"]


def _unit_runs(uri, study) -> dict:
    """unit run name -> (status, fold runs under it, trial runs under those), as MLflow has them now."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(study)
    runs = c.search_runs([exp.experiment_id], max_results=5000) if exp else []
    parent = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    out = {}
    for u in (r for r in runs if r.data.tags["level"] == "unit"):
        folds = {r.info.run_id for r in runs if r.data.tags["level"] == "fold" and parent[r.info.run_id] == u.info.run_id}
        trials = [r for r in runs if r.data.tags["level"] == "trial" and parent[r.info.run_id] in folds]
        out[u.info.run_name] = (u.info.status, len(folds), len(trials), set(u.data.metrics))
    return out


@pytest.mark.slow
def test_unit_runs_appear_as_each_unit_finishes(synth_stores, tmp_path, monkeypatch):
    """A live sweep is watchable: a unit's runs (with its folds' and trials') are in MLflow, finished,
    once its last fold is done, while later tasks have still to start. loso is written first in
    the config, yet mixed runs first: loso's source-mean gap needs the mixed unit."""
    import featstore.sweep.fit as S

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen = []  # (task's protocol, fold, the unit runs in MLflow as that task starts)
    real = S.run_task

    def watching(task, *a, **k):
        seen.append((task.protocol, task.fold.name, _unit_runs(uri, "live")))
        return real(task, *a, **k)
    monkeypatch.setattr(S, "run_task", watching)
    units = []

    def on_unit(key, rows, run_id):  # called as each unit is tracked: its run is there, finished
        units.append((key, _unit_runs(uri, "live"), {x["mlflow_run_id"] for x in rows if x["kind"] != "fold"}))
    st = _study(study="live", protocols={"loso": {}, "mixed": {"folds": 2}}, bootstrap=20)
    rep = run_study(st, synth_stores["confounded"], tmp_path, uri, workers=1, on_unit=on_unit)
    assert [p for p, _, _ in seen] == ["mixed"] * 2 + ["loso"] * 4
    mixed, loso = "mixed · logreg · pixelstats/original", "loso · logreg · pixelstats/original"
    assert seen[0][2] == {} and seen[1][2] == {}
    for _, fold, now in seen[2:]:  # every loso task starts with the mixed unit logged in full
        assert now == {mixed: ("FINISHED", 2, 4, now[mixed][3])}, fold
        assert "auc_seen" in now[mixed][3]
    assert [k for k, _, _ in units] == [("mixed", "logreg", "train-val", 0), ("loso", "logreg", "train-val", 0)]
    assert set(units[0][1]) == {mixed}
    last = units[1][1][loso]
    assert last[:3] == ("FINISHED", 4, 8) and {"auc_unseen_mean", "gap"} <= last[3]  # gap: seen side from mixed
    assert len(units[1][2]) == 1 and units[1][2] <= {x["mlflow_run_id"] for x in rep.rows}


@pytest.mark.slow
def test_a_unit_waits_for_the_mixed_unit_it_needs_whatever_order_tasks_finish(synth_stores, tmp_path):
    """Workers finish tasks in any order: a loso unit done before the mixed unit (its gap's seen side)
    is tracked right after it; every row is the same as when tasks finish in order."""
    import optuna

    from featstore.sweep.plan import make_tasks, plan

    from featstore.sweep.run import Units
    from featstore.sweep.fit import run_task

    st = _study(study="order", protocols={"mixed": {"folds": 2}, "loso": {}}, bootstrap=20)
    (bb, pre, data, folds), = plan(st, synth_stores["confounded"])
    tasks = make_tasks(st, bb, pre, data, folds)
    results = [run_task(t, data.X, data.meta, optuna.storages.InMemoryStorage()) for t in tasks]
    assert [t.protocol for t in tasks] == ["mixed"] * 2 + ["loso"] * 4

    def feed(order, name):
        tracker = track.Tracker(name, f"sqlite:///{tmp_path / 'mlflow.db'}")
        parent = tracker.run("sweep", tags=dict(level="sweep"))
        log = []
        u = Units(st, "s1", bb, pre, data, tasks, tracker, parent, on_unit=lambda k, rows, rid: log.append((k[0], n)))
        for n, i in enumerate(order, 1):
            u.add(results[i])
        rows, preds = u.finish()
        return log, [{k: v for k, v in x.items() if k != "mlflow_run_id"} for x in rows], preds

    in_order, rows_a, preds_a = feed(range(6), "a")
    assert in_order == [("mixed", 2), ("loso", 6)]
    # loso's four folds, then one mixed fold, then the other: nothing is tracked before the last
    late, rows_b, preds_b = feed([2, 3, 4, 5, 0, 1], "b")
    assert late == [("mixed", 6), ("loso", 6)]
    assert rows_a == rows_b and preds_a.equals(preds_b)
    assert any(x["kind"] == "source-mean" and x["gap"] is not None for x in rows_b)


@pytest.mark.slow
def test_runs_a_killed_process_left_running_are_closed_at_the_next_sweep(synth_stores, tmp_path):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = track.Tracker("stale", uri)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket

    old = t.run("old sweep", tags=dict(level="sweep", sweep_id="old", host=socket.gethostname(), pid=dead),
                status=None)
    child = t.run("old unit", parent=old, tags=dict(level="unit", sweep_id="old"), status=None)
    remote = t.run("sweep elsewhere", tags=dict(level="sweep", sweep_id="far", host="another-host", pid=1),
                   status=None)
    live = t.run("this process", tags=dict(level="sweep", sweep_id="live", host=socket.gethostname(),
                                           pid=os.getpid()), status=None)
    rep = run_study(_study(study="stale"), synth_stores["confounded"], tmp_path, uri)
    c = t.client
    assert c.get_run(old).info.status == "KILLED" and c.get_run(child).info.status == "KILLED"
    assert c.get_run(remote).info.status == "RUNNING"  # may be alive on its host: left alone
    assert c.get_run(live).info.status == "RUNNING"
    assert c.get_run(rep.parent_run_id).info.status == "FINISHED"
    assert any("KILLED" in n for n in rep.notes)


@pytest.mark.slow
def test_report_command_attaches_the_report(synth_stores, tmp_path, monkeypatch):
    from featstore.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = synth_stores["confounded"]
    rep = run_study(_study(study="rep"), db, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    r = CliRunner().invoke(app, ["report", "--db", str(db), "--out", str(tmp_path / "r"), "--study", "rep",
                                 "--sweep-id", rep.sweep_id])
    assert r.exit_code == 0, r.output
    t = track.Tracker("rep", f"sqlite:///{tmp_path / 'mlflow.db'}")
    d = t.local_dir(t.client.get_run(rep.parent_run_id).info.artifact_uri) / "report"
    assert {p.name for p in d.iterdir()} == {"report.md", "report.html"}


def test_ui_url_opens_on_runs():
    assert track.ui_url("http://127.0.0.1:5000", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_ui_lists_direct_links_to_each_study(swept, tmp_path):
    from featstore.jobs import _studies

    _, uri, _ = swept
    _, exp, _ = _runs(uri, "cmp")
    assert _studies(uri) == [("cmp", exp.experiment_id)]
    assert _studies(f"sqlite:///{tmp_path / 'none.db'}") == [] and not (tmp_path / "none.db").exists()


def test_optuna_studies_carry_attributes_and_a_named_objective(swept):
    """optuna-dashboard filters on study attributes; the names stay (resume finds studies by name)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    tmp, _, _ = swept
    storage = JournalStorage(JournalFileBackend(str(tmp / "optuna" / "cmp.journal")))
    studies = optuna.get_all_study_summaries(storage)
    assert studies
    for s in studies:
        a = s.user_attrs
        assert {a["study"], a["backbone"], a["preprocess"], a["head"], a["selection"]} == \
            {"cmp", "pixelstats", "original", "logreg", "train-val"}
        assert a["protocol"] in ("mixed", "loso") and a["fold"] in s.study_name
        assert s.study_name.startswith(f"cmp|{a['protocol']}|logreg|pixelstats|original|")
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        assert study.metric_names == ["val_auc"] == [track.OBJECTIVE]
        # and every trial, so the dashboard can filter trials across studies
        assert study.trials and all(t.user_attrs.items() >= a.items() for t in study.trials)
        assert {"protocol", "head", "fold", "backbone", "preprocess", "selection"} <= set(a)


def test_one_run_per_model_lines_up_the_headline(swept):
    """The model run (backbone, preprocessing, head, selection) is the parent of its protocol units and
    carries the headline's figures under one vocabulary, and the verdict as a parameter and a tag."""
    from featstore.jobs import sweep_headline

    _, uri, rep = swept
    c, exp, runs = _runs(uri, "cmp")
    by_id = {r.info.run_id: r for r in runs}
    model, = [r for r in runs if r.data.tags["level"] == "model"]
    units = [r for r in runs if r.data.tags["level"] == "unit"]
    assert {by_id[u.data.tags["mlflow.parentRunId"]].info.run_id for u in units} == {model.info.run_id}
    assert model.data.tags["mlflow.parentRunId"] == rep.parent_run_id
    assert model.data.params["verdict"] == model.data.tags["verdict"]
    head = sweep_headline(rep.rows).row(0, named=True)
    assert model.data.params["verdict"] == head["verdict"] and model.data.tags["verdict_reason"] == head["why"]
    assert {k: model.data.params[k] for k in ("head", "backbone", "preprocess", "selection")} == \
        {k: head[k] for k in ("head", "backbone", "preprocess", "selection")}
    m = model.data.metrics
    assert set(m) <= set(track.MODEL_METRICS)
    # mixed + loso: seen, unseen mean, worst source, the drop, the shortcut estimand; no pairs (no leave-pair-out)
    assert {"auc_seen", "auc_unseen_mean", "auc_unseen_worst", "n_unseen_sources", "shortcut"} <= set(m)
    assert not {k for k in m if "pairs" in k}
    sm = next(x for x in rep.rows if x["kind"] == "source-mean" and x["protocol"] == "loso")
    seen = next(x for x in rep.rows if x["kind"] == "pooled" and x["protocol"] == "mixed" and x["test_set"] == "seen")
    assert m["auc_unseen_mean"] == pytest.approx(sm["auc"]) and m["auc_unseen_worst"] == pytest.approx(sm["auc_worst"])
    seen_m = seen["metrics"] if isinstance(seen["metrics"], dict) else json.loads(seen["metrics"])
    assert m["auc_seen"] == pytest.approx(seen_m["seen_mean"])  # the one seen: mixed mean per-source AUC
    assert m["shortcut"] == pytest.approx(seen_m["shortcut"]["estimate"])
    assert m.get("drop_new_sources") == (None if sm["gap"] is None else pytest.approx(sm["gap"]))
    assert head["LOSO mean per-source AUC (unseen)"].startswith(f"{m['auc_unseen_mean']:.3f}")
    # bootstrap 0: no interval anywhere, so none is logged (no 0/1 stand-ins)
    assert not [k for r in runs for k in r.data.metrics if k.endswith(("_lo", "_hi"))]
    # the sweep (parent) run carries the study's headline: its best model's figures, the verdict counts
    sweep = by_id[rep.parent_run_id]
    assert {k: sweep.data.metrics[k] for k in m} == m
    assert sweep.data.metrics["n_models"] == 1 and sweep.data.tags["best_model"] == model.info.run_name
    assert sum(sweep.data.metrics[f"n_{v.replace(' ', '_')}"] for v in ("shortcut likely", "generalises",
                                                                        "inconclusive")) == 1
    # fold and trial runs name the objective as Optuna does
    assert any(track.OBJECTIVE in r.data.metrics for r in runs if r.data.tags["level"] == "trial")
    assert not any("val_score" in r.data.metrics for r in runs)


def test_model_runs_view_is_shared_on_the_experiment(swept):
    """`featstore ui`'s first link opens the model runs with the headline's columns: a shared view
    state on the experiment, as MLflow 3.17's "share" stores it."""
    _, uri, _ = swept
    _, exp, _ = _runs(uri, "cmp")
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{track.MODEL_VIEW}"])
    assert view["searchFilter"] == "tags.level = 'model'"
    names = {c.split("`")[1] for c in view["selectedColumns"]}
    assert "verdict" in names and {"auc_seen", "auc_unseen_mean", "auc_unseen_worst", "auc_pairs_mean",
                                   "shortcut", "drop_new_sources"} <= names <= set(track.MODEL_METRICS) | {
        "verdict", "head", "backbone", "preprocess", "selection"}
    url = track.ui_url("http://h:1", exp.experiment_id, track.MODEL_VIEW)
    assert url == f"http://h:1/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={track.MODEL_VIEW}" \
                  "&workflowType=machine_learning"


def test_intervals_that_say_nothing_are_not_shown_or_logged():
    """Known answers: a CI spanning the whole scale (two sources: [0, 1]) or absent is 'n/a (k sources)'."""
    assert track.interval(0.0, 1.0) is None and track.interval(None, 0.7) is None
    assert track.interval(-1.0, 1.0, -1.0) is None and track.interval(-1.0, 0.4, -1.0) == (-1.0, 0.4)
    assert track.interval(0.61, 0.93) == (0.61, 0.93)
    assert track.ci_text(0.8123, 0.0, 1.0, 2) == "0.812, CI n/a (2 sources)"
    assert track.ci_text(0.8123, 0.7, 0.9, 5) == "0.812 [0.700, 0.900]"
    rows = [dict(kind="source-mean", status="ok", protocol="seen-unseen", test_set="unseen", scope="all",
                 auc=0.7, auc_lo=0.0, auc_hi=1.0, gap=0.1, gap_lo=-1.0, gap_hi=1.0, test_sources=["a", "b"])]
    m = track.unit_metrics(rows)
    assert m["auc_unseen_mean"] == 0.7 and m["gap"] == 0.1
    assert not {"auc_unseen_mean_lo", "auc_unseen_mean_hi", "gap_lo", "gap_hi"} & set(m)


def test_a_run_logs_every_param_and_metric_past_mlflows_batch_limits(tmp_path, mlflow_db):
    """Tracker.run logs params and metrics in batches of MLflow's limits (100 params, 1000 metrics,
    1000 entities a call), the first batch holding both: nothing is dropped at any boundary."""
    uri = mlflow_db(tmp_path / "m.db")
    t = track.Tracker("limits", uri)
    for n_params, n_metrics in ((0, 0), (3, 5), (100, 900), (100, 901), (250, 2_345)):
        params = {f"p{i}": i for i in range(n_params)}
        metrics = {f"m{i}": float(i) for i in range(n_metrics)}
        rid = t.run(f"{n_params}x{n_metrics}", params=params, metrics=metrics)
        data = t.client.get_run(rid).data
        assert data.params == {k: str(v) for k, v in params.items()}
        assert data.metrics == metrics
