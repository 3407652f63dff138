"""Study configs are validated before any work: each bad value is named by its key, its value and
what is allowed; every problem at once; unknown keys refused with a "did you mean"."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featstore.cli import app
from featstore.sweep.config import StudyError, load_study, parse_study, study_schema

STUDIES = Path(__file__).parents[1] / "featstore" / "studies"


def _raw(**change):
    raw = dict(study="t", backbones=["pixelstats"], heads={"logreg": {"trials": 3}}, protocols={"loso": {}})
    raw.update(change)
    return raw


def _problems(**change) -> dict[str, str]:
    with pytest.raises(StudyError) as e:
        parse_study(_raw(**change))
    return dict(e.value.problems)


@pytest.mark.parametrize("trials", [0, -3])
def test_trials_must_be_positive(trials):
    assert _problems(heads={"logreg": {"trials": trials}}) == {
        "heads.logreg.trials": f"{trials} is not allowed; must be greater than or equal to 1"}


def test_negative_timeout_is_refused():
    assert _problems(timeout=-1) == {"timeout": "-1 is not allowed; must be greater than 0"}


def test_fixed_hyperparameters_are_checked_against_the_head():
    # used to fail late, in every trial of every study
    assert _problems(heads={"logreg": {"fixed": {"C": -1}}}) == {
        "heads.logreg.fixed.C": "-1 is not allowed; must be a float in the range (0.0, inf)"}
    p = _problems(heads={"lightgbm": {"fixed": {"subsample": 1.5, "n_estimators": 0}},
                         "grl_mlp": {"fixed": {"dropout": 1.0, "hidden": [256, 0]}}})
    assert set(p) == {"heads.lightgbm.fixed.subsample", "heads.lightgbm.fixed.n_estimators",
                      "heads.grl_mlp.fixed.dropout", "heads.grl_mlp.fixed.hidden"}
    assert "(0.0, 1.0]" in p["heads.lightgbm.fixed.subsample"]
    # YAML 1.1 reads 1e-3 (no dot) as text: say so instead of passing "1e-3" to the estimator
    msg = _problems(heads={"logreg": {"fixed": {"C": "1e-3"}}})["heads.logreg.fixed.C"]
    assert msg.startswith('"1e-3" is not allowed') and "1.0e-3" in msg
    with pytest.raises(StudyError, match="heads.logreg.fixed.class_weight"):
        parse_study(_raw(heads={"logreg": {"fixed": {"class_weight": "balancd"}}}))


def test_lightgbm_early_stopping_is_checked():
    assert set(_problems(heads={"lightgbm": {"fixed": {"early_stopping_rounds": 0, "val_fraction": 1.0}}})) == {
        "heads.lightgbm.fixed.early_stopping_rounds", "heads.lightgbm.fixed.val_fraction"}
    st = parse_study(_raw(heads={"lightgbm": {"fixed": {"early_stopping_rounds": 20}}}))
    assert st.heads[0].fixed == {"early_stopping_rounds": 20}


def test_good_fixed_values_pass_through_unchanged():
    # the fixed values are hashed into the Optuna study names: validation must not coerce them
    st = parse_study(_raw(heads={"lightgbm": {"fixed": {"n_estimators": 100, "reg_lambda": 0}},
                                 "logreg": {"trials": 2, "fixed": {"class_weight": None, "C": 1}},
                                 "grl_mlp": {"fixed": {"hidden": [128, 32]}}}))
    assert [(h.name, h.trials, h.fixed) for h in st.heads] == [
        ("lightgbm", 10, {"n_estimators": 100, "reg_lambda": 0}),
        ("logreg", 2, {"class_weight": None, "C": 1}),
        ("grl_mlp", 10, {"hidden": [128, 32]})]
    assert type(st.heads[1].fixed["C"]) is int
    # as before: an empty YAML value (null) means the defaults
    st = parse_study(_raw(description=None, heads={"logreg": None, "grl_mlp": {"fixed": None}},
                          protocols={"loso": None}))
    assert [(h.name, h.fixed) for h in st.heads] == [("logreg", {}), ("grl_mlp", {})]
    assert st.protocols == {"loso": {}} and st.description == ""


def test_negative_bootstrap_is_refused():
    # used to give NULL confidence intervals without a word
    assert _problems(bootstrap=-10) == {"bootstrap": "-10 is not allowed; must be greater than or equal to 0"}


def test_seed_must_be_a_number():
    assert _problems(seed="banana") == {"seed": '"banana" is not allowed; must be a valid integer'}
    assert _problems(seed=True) == {"seed": "true is not allowed; must be a valid integer"}


def test_heads_as_a_string_is_refused():
    p = _problems(heads="logreg")
    assert list(p) == ["heads"] and p["heads"].startswith('"logreg": a single name') and "[logreg]" in p["heads"]


def test_negative_repeats_are_refused():
    assert _problems(protocols={"mixed": {"repeats": -2}}) == {
        "protocols.mixed.repeats": "-2 is not allowed; must be greater than or equal to 1"}


@pytest.mark.parametrize("change, key, hint", [
    (dict(trails=3), "trails", "did you mean trials? it belongs under heads.<head>"),
    (dict(heads={"logreg": {"trails": 3}}), "heads.logreg.trails", "did you mean trials?"),
    (dict(heads={"grl_mlp": {"fixed": {"max_epoch": 3}}}), "heads.grl_mlp.fixed.max_epoch",
     "did you mean max_epochs"),
    (dict(heads=["logreg", "lgbm"]), "heads.lgbm", "did you mean lightgbm?"),
    (dict(protocols={"mixed": {"fold": 3}}), "protocols.mixed.fold", "did you mean folds?"),
    (dict(protocols={"seen_unseen": {}}), "protocols.seen_unseen", "did you mean seen-unseen?"),
    (dict(folds=3), "folds", "folds belongs under protocols.mixed"),
])
def test_unknown_keys_are_refused_with_a_suggestion(change, key, hint):
    p = _problems(**change)
    assert list(p) == [key] and p[key].startswith("unknown ") and hint in p[key] and "allowed: " in p[key]


@pytest.mark.parametrize("change, key, text", [
    (dict(oracle="false"), "oracle", "must be a valid boolean"),  # was bool("false") == True
    (dict(selection="oracle"), "selection", "oracle: true"),
    (dict(workers=0), "workers", "greater than or equal to 1"),
    (dict(protocols={"mixed": {"folds": 1}}), "protocols.mixed.folds", "greater than or equal to 2"),
    (dict(protocols={"seen-unseen": {"train_sources": ["a"], "test_fraction": 0.9}}),
     "protocols.seen-unseen.test_fraction", "less than or equal to 0.5"),
    (dict(protocols={"seen-unseen": {"train_sources": ["a"], "unseen_sources": ["a", "b"]}}),
     "protocols.seen-unseen", "also lists training source(s) a"),
    (dict(protocols=["seen-unseen"]), "protocols.seen-unseen.train_sources", "required"),
    (dict(positive=True), "positive", "quote it"),
    (dict(backbones=["a", "a"]), "backbones", "lists a more than once"),
    (dict(timeout=float("nan")), "timeout", "finite"),
])
def test_other_nonsense_is_refused(change, key, text):
    p = _problems(**change)
    assert list(p) == [key] and text in p[key]


def test_a_single_source_is_a_list_of_one():
    assert parse_study(_raw(sources="synthetic-a")).sources == ["synthetic-a"]  # was ['s', 'y', 'n', ...]
    assert parse_study(_raw(sources="all")).sources is None


BAD_YAML = """\
study: bad
backbones: [pixelstats]
heads:
  logreg: {trials: 0, fixed: {C: -1}}
protocols:
  mixed: {repeats: -2}
timeout: -1
bootstrap: -10
seed: banana
trails: 4
"""
BAD_KEYS = {"heads.logreg.trials", "heads.logreg.fixed.C", "protocols.mixed.repeats", "timeout", "bootstrap",
            "seed", "trails"}


def test_all_errors_at_once(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    with pytest.raises(StudyError) as e:
        load_study(tmp_path / "bad.yaml")
    assert set(dict(e.value.problems)) == BAD_KEYS
    lines = str(e.value).splitlines()
    assert lines[0] == f"{tmp_path / 'bad.yaml'}: 7 problems in the study config:"
    assert len(lines) == 8 and all(line.startswith("  ") for line in lines[1:])


def test_toml_gives_the_same_problems(tmp_path):
    (tmp_path / "bad.toml").write_text(
        'study = "bad"\nbackbones = ["pixelstats"]\ntimeout = -1\nbootstrap = -10\nseed = "banana"\ntrails = 4\n'
        '[heads.logreg]\ntrials = 0\nfixed = {C = -1}\n[protocols.mixed]\nrepeats = -2\n')
    with pytest.raises(StudyError) as e:
        load_study(tmp_path / "bad.toml")
    assert set(dict(e.value.problems)) == BAD_KEYS


def test_a_yaml_key_given_twice_is_refused(tmp_path):
    # PyYAML keeps the last one silently: the first `heads:` would vanish
    (tmp_path / "twice.yaml").write_text("study: t\nbackbones: [pixelstats]\nheads: [logreg]\nprotocols: [loso]\n"
                                         "heads: [lightgbm]\n")
    with pytest.raises(StudyError, match=r"key 'heads' appears twice \(first on line 3\)"):
        load_study(tmp_path / "twice.yaml")


def test_cli_prints_the_problems_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(BAD_YAML + 'workers: "[bold]two"\n')  # shown as written, not as markup
    db = tmp_path / "fs.duckdb"
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "bad.yaml"), "--db", str(db)])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    out = " ".join(r.output.split())  # rich wraps long lines
    assert "Traceback" not in out and "8 problems" in out and 'workers: "[bold]two" is not allowed' in out
    for key in BAD_KEYS:
        assert f" {key}: " in out
    assert not db.exists() and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna").exists()


def test_the_shipped_configs_still_load():
    # a guard, not a regression test: they loaded before too, and must keep their meaning
    cxr = load_study(STUDIES / "cxr_shortcut.yaml")
    assert [(h.name, h.trials, h.fixed) for h in cxr.heads] == [("logreg", 12, {}), ("lightgbm", 6, {}),
                                                                 ("grl_mlp", 4, {})]
    assert cxr.selection == "worst-group"  # a rule that does not reward the shortcut (issue 26)
    assert cxr.protocols == {"mixed": {"folds": 5, "repeats": 1}, "loso": {}, "leave-pair-out": {},
                             "seen-unseen": {"train_sources": ["cohen_ieee8023", "nih_cxr14"], "test_fraction": 0.2}}
    assert (cxr.sources, cxr.workers, cxr.bootstrap, cxr.seed, cxr.oracle) == (None, 2, 1000, 0, False)
    robust = load_study(STUDIES / "cxr_robust.yaml")  # the robust heads against logreg under every honest rule
    assert [h.name for h in robust.heads] == ["logreg", "dfr", "groupdro", "reweight"]
    assert robust.selection == ["train-val", "worst-group", "worst-class", "min-source-probe"]
    demo = load_study(STUDIES / "synthetic_demo.yaml")
    assert [(h.name, h.fixed) for h in demo.heads] == [("logreg", {}), ("lightgbm", {"n_estimators": 100}),
                                                       ("grl_mlp", {"max_epochs": 40})]
    assert list(demo.protocols) == ["mixed", "loso", "leave-pair-out", "seen-unseen"]
    assert demo.path == STUDIES / "synthetic_demo.yaml" and demo.bootstrap == 300


def test_a_shipped_config_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here: the package's copy is meant
    assert load_study("cxr_shortcut").path == load_study("cxr_shortcut.yaml").path == STUDIES / "cxr_shortcut.yaml"
    (tmp_path / "cxr_shortcut.yaml").write_text("study: mine\nbackbones: [pixelstats]\nheads: {logreg: {}}\n"
                                                "protocols: {loso: {}}\n")
    assert load_study("cxr_shortcut.yaml").study == "mine"  # a file of that name wins
    with pytest.raises(StudyError, match=r"cxr_shortcutt: no such study config \(did you mean .cxr_shortcut.\?\) \(shipped: cxr_robust, cxr_shortcut, synthetic_demo"):
        load_study("cxr_shortcutt")


def test_the_schema_can_be_exported():
    s = study_schema()
    assert s["additionalProperties"] is False and {"study", "backbones", "heads", "protocols"} <= set(s["required"])
    fixed = s["$defs"]["Fixed_logreg"]["properties"]
    assert fixed["C"]["description"] == "a float in the range (0.0, inf)"
    assert s["$defs"]["Mixed"]["properties"]["repeats"]["minimum"] == 1


def test_every_protocol_and_head_has_a_config_section():
    from featstore.heads import HEADS
    from featstore.split import PROTOCOLS

    s = study_schema()["$defs"]
    assert set(s["Protocols"]["properties"]) == set(PROTOCOLS)
    assert set(s["Heads"]["properties"]) == set(HEADS)
