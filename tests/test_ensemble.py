"""The `ensemble` head on SYNTHETIC embedding sets with a known answer: members whose errors are independent
noise make an ensemble at least as good as each; identical members make an ensemble equal to them; its
rows stand beside its members' under every protocol, from their predictions (nothing refitted)."""
import hashlib
from datetime import datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from featstore.store import connect, ensure_embedding_table
from featstore.sweep.config import StudyError, parse_study
from featstore.sweep.run import run_study

from conftest import RecordingTracker

# every test here reads one module-scoped sweep (~30 s): the full suite runs them, the fast tier does not
pytestmark = pytest.mark.slow

DIM = 10


def _store(path, sets: dict, source, label, patient):
    """One store, several embedding sets (backbone name -> [n, DIM] vectors) of the same images."""
    n = len(source)
    con = connect(path)
    table = ensure_embedding_table(con, DIM)
    now = datetime.now()
    ids = [hashlib.sha256(f"ens:{i}".encode()).hexdigest() for i in range(n)]
    con.register("_i", pa.table({
        "image_id": ids, "source": list(source), "label": ["covid" if v else "non_covid" for v in label],
        "patient_id": list(patient), "width": [1] * n, "height": [1] * n, "bit_depth": [8] * n,
        "format": ["PNG"] * n, "n_bytes": [1] * n, "path": ids,
        "ingested_at": pa.array([now] * n, pa.timestamp("us"))}))
    con.execute("INSERT INTO images (image_id, source, label, patient_id, width, height, bit_depth, format, n_bytes, "
                "path, ingested_at) SELECT * FROM _i")
    con.execute("INSERT INTO occurrences (image_id, source, path, label, patient_id, origin, ingest_run, ingested_at) "
                "SELECT image_id, source, path, label, patient_id, 'test', 0, ingested_at FROM _i")
    for bb, X in sets.items():
        con.register("_e", pa.table({
            "image_id": ids, "backbone": [bb] * n, "weights_id": [f"none:{bb}"] * n, "preprocess": ["original"] * n,
            "dim": pa.array([DIM] * n, pa.int32()), "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(X, np.float32).ravel()), DIM),
            "embed_run": pa.array([0] * n, pa.int32()), "created_at": pa.array([now] * n, pa.timestamp("us"))}))
        con.execute(f"INSERT INTO {table} SELECT * FROM _e")
        con.unregister("_e")
    con.close()
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    rng = np.random.default_rng(7)
    n = 480
    source = np.array([f"s{i % 4}" for i in range(n)])
    y = rng.random(n) < 0.5
    patient = [f"p{i}" for i in range(n)]
    # the label is weak along axis 0 in every set; each noisy set adds its own independent noise there
    base = rng.standard_normal((n, DIM))
    noisy = {}
    for b in ("noisy1", "noisy2", "noisy3"):
        X = rng.standard_normal((n, DIM))
        X[:, 0] = 0.8 * y + rng.standard_normal(n) * 1.0
        noisy[b] = X
    same = base.copy()
    same[:, 0] += 0.8 * y
    sets = dict(noisy, same1=same, same2=same.copy())
    db = _store(tmp / "fs.duckdb", sets, source, y, patient)
    st = parse_study(dict(
        study="ens", backbones=list(sets), heads={"logreg": {"trials": 2, "fixed": dict(
            C=0.1, l1_ratio=0.0, class_weight="balanced")},  # fixed: identical sets give identical fits
            "lightgbm": {"trials": 1}},
        protocols={"mixed": {"folds": 4}, "loso": {}}, bootstrap=0,
        ensembles=[{"heads": ["logreg"], "backbones": ["noisy1", "noisy2", "noisy3"]},
                   {"heads": ["logreg"], "backbones": ["same1", "same2"]},
                   {"heads": ["logreg", "lightgbm"]}]))
    import featstore.sweep.run as R

    with pytest.MonkeyPatch.context() as mp:  # the rows are the subject here, not MLflow (tests/test_track.py)
        mp.setattr(R, "Tracker", RecordingTracker)
        rep = run_study(st, db, tmp, f"sqlite:///{tmp / 'mlflow.db'}")
    return pl.DataFrame(rep.rows, infer_schema_length=None), rep, db


def _auc(df, head, bb, protocol, kind):
    d = df.filter((pl.col("head") == head) & (pl.col("backbone") == bb) & (pl.col("protocol") == protocol)
                  & (pl.col("kind") == kind) & (pl.col("scope") == "all"))
    assert d.height == 1, (head, bb, protocol, kind, d.height)
    return d["auc"][0]


def test_independent_noise_an_ensemble_beats_each_member(sweep):
    df, rep, _ = sweep
    assert not rep.notes or not any("ensemble left out" in x for x in rep.notes), rep.notes
    for protocol, kind in (("mixed", "pooled"), ("loso", "pooled"), ("loso", "source-mean")):
        members = [_auc(df, "logreg", b, protocol, kind) for b in ("noisy1", "noisy2", "noisy3")]
        ens = _auc(df, "ensemble[logreg]", "noisy1+noisy2+noisy3", protocol, kind)
        assert ens >= max(members) + 0.02, (protocol, kind, ens, members)


def test_identical_members_give_the_members_auc(sweep):
    df, _, _ = sweep
    for protocol, kind in (("mixed", "pooled"), ("loso", "pooled"), ("loso", "source-mean")):
        a = _auc(df, "logreg", "same1", protocol, kind)
        assert _auc(df, "logreg", "same2", protocol, kind) == pytest.approx(a, abs=1e-12)
        assert _auc(df, "ensemble[logreg]", "same1+same2", protocol, kind) == pytest.approx(a, abs=1e-12)


def test_ensemble_rows_beside_members_every_fold_and_its_predictions_are_the_mean(sweep):
    df, _, db = sweep
    ens = df.filter(pl.col("head") == "ensemble[logreg+lightgbm]")
    assert set(ens["backbone"]) == {"noisy1", "noisy2", "noisy3", "same1", "same2"}  # one per embedding set
    member_folds = df.filter((pl.col("head") == "logreg") & (pl.col("backbone") == "noisy1"))
    e_folds = ens.filter(pl.col("backbone") == "noisy1")
    assert sorted(set(zip(e_folds["protocol"], e_folds["fold"]))) == sorted(set(zip(member_folds["protocol"],
                                                                                    member_folds["fold"])))
    assert (e_folds["params"].map_elements(lambda p: "members" in str(p), return_dtype=pl.Boolean)).all()
    # stored predictions: the ensemble's score is the mean of its members' scores, image by image
    con = connect(db, read_only=True)
    try:
        p = pl.from_arrow(con.sql("SELECT protocol, fold, test_set, head, backbone, image_id, score FROM "
                                  "predictions WHERE backbone = 'same1' OR backbone = 'noisy1'").to_arrow_table())
    finally:
        con.close()
    w = p.filter(pl.col("backbone") == "noisy1").pivot(on="head", index=["protocol", "fold", "test_set", "image_id"],
                                                      values="score")
    assert w.height > 400
    np.testing.assert_allclose(w["ensemble[logreg+lightgbm]"], (w["logreg"] + w["lightgbm"]) / 2, rtol=1e-9)


def test_ensemble_config_is_checked():
    base = dict(study="t", backbones=["pixelstats"], heads=["logreg", "lightgbm"], protocols=["loso"])
    with pytest.raises(StudyError, match="head svm not in the study's heads"):
        parse_study(dict(base, ensembles=[{"heads": ["logreg", "svm"]}]))
    with pytest.raises(StudyError, match="needs two members"):
        parse_study(dict(base, ensembles=[{"heads": ["logreg"]}]))
    with pytest.raises(StudyError, match="binary targets only"):
        parse_study(dict(base, target="3class", ensembles=[{"heads": ["logreg", "lightgbm"]}]))
