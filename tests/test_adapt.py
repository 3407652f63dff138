"""Protocol `adapt` on SYNTHETIC embeddings with a known answer: a site whose label lies along another
direction than the training sources' gains AUC as its labelled images are added; a site whose labels
are noise does not; the draws are whole patients, nested over k, and never scored."""
import hashlib
from datetime import datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from featstore.split import adapt_draws, make_folds, make_meta
from featstore.store import connect, ensure_embedding_table
from featstore.sweep.config import StudyError, parse_study
from featstore.sweep.run import run_study

DIM = 12


def _vectors(seed=0, n=200):
    """Sources a, b, c: the label along axis 0. `flip`: along axis 1 only (a new site's label looks
    otherwise). `null`: labels independent of the vectors. Two images per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for src in ("a", "b", "c", "flip", "null"):
        y = np.repeat(rng.random(n // 2) < 0.5, 2)
        X = rng.standard_normal((n, DIM)).astype(np.float32)
        if src in ("a", "b", "c"):
            X[:, 0] += 2.0 * y
        elif src == "flip":
            X[:, 1] += 2.5 * y
        for i in range(n):
            rows.append((src, bool(y[i]), f"{src}-p{i // 2}", X[i]))
    return rows


def _store(path, rows):
    con = connect(path)
    table = ensure_embedding_table(con, DIM)
    now = datetime.now()
    ids = [hashlib.sha256(f"adapt:{i}".encode()).hexdigest() for i in range(len(rows))]
    con.register("_i", pa.table({
        "image_id": ids, "source": [r[0] for r in rows], "label": ["covid" if r[1] else "non_covid" for r in rows],
        "patient_id": [r[2] for r in rows], "width": [1] * len(rows), "height": [1] * len(rows),
        "bit_depth": [8] * len(rows), "format": ["PNG"] * len(rows), "n_bytes": [1] * len(rows), "path": ids,
        "ingested_at": pa.array([now] * len(rows), pa.timestamp("us"))}))
    con.execute("INSERT INTO images (image_id, source, label, patient_id, width, height, bit_depth, format, n_bytes, "
                "path, ingested_at) SELECT * FROM _i")
    con.execute("INSERT INTO occurrences (image_id, source, path, label, patient_id, origin, ingest_run, ingested_at) "
                "SELECT image_id, source, path, label, patient_id, 'test', 0, ingested_at FROM _i")
    X = np.stack([r[3] for r in rows])
    con.register("_e", pa.table({
        "image_id": ids, "backbone": ["synthetic"] * len(rows), "weights_id": ["none"] * len(rows),
        "preprocess": ["original"] * len(rows), "dim": pa.array([DIM] * len(rows), pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), DIM),
        "embed_run": pa.array([0] * len(rows), pa.int32()),
        "created_at": pa.array([now] * len(rows), pa.timestamp("us"))}))
    con.execute(f"INSERT INTO {table} SELECT * FROM _e")
    con.close()
    return path


def _meta(rows):
    return make_meta([r[0] for r in rows], np.array([int(r[1]) for r in rows]), [r[2] for r in rows])


def test_draws_are_whole_patients_nested_and_never_scored():
    rows = _vectors()
    meta = _meta(rows)
    draws, ks, notes = adapt_draws(meta, "flip", [0, 5, 20, 40, 80], draws=4, seed=3)
    assert ks == [0, 5, 20, 40] and "k=80 left out" in notes[0]  # 80 per class would leave < 80 to score
    site = set(meta.members(["flip"]))
    for d in draws:
        assert len(d.added[0]) == 0
        for k0, k1 in zip(ks, ks[1:]):
            assert set(d.added[k0]) <= set(d.added[k1])  # nested
        for k in ks[1:]:
            a = d.added[k]
            for c in (0, 1):  # k images of each class, give or take the last patient's second image
                assert k <= (meta.y[a] == c).sum() <= k + 1
            assert set(a) <= site and not set(a) & set(d.test)
            assert not set(meta.groups[a]) & set(meta.groups[d.test])  # no patient both added and scored
        assert set(d.test) | set(d.added[ks[-1]]) == site
    assert len({tuple(d.added[20]) for d in draws}) == 4  # the draws differ
    again, _, _ = adapt_draws(meta, "flip", [0, 5, 20, 40, 80], draws=4, seed=3)
    assert all(np.array_equal(a.added[40], b.added[40]) for a, b in zip(draws, again))  # seeded
    # the same data in another order: the same patients drawn
    perm = np.random.default_rng(0).permutation(len(rows))
    shuffled = _meta([rows[i] for i in perm])
    other, _, _ = adapt_draws(shuffled, "flip", [0, 5, 20, 40, 80], draws=4, seed=3)
    assert all(set(shuffled.groups[b.added[20]]) == set(meta.groups[a.added[20]]) for a, b in zip(draws, other))


def test_adapt_folds_leave_the_site_out_and_refuse_one_class_sites():
    rows = _vectors()
    meta = _meta(rows)
    folds = make_folds(meta, "adapt", sites=["flip", "null"])
    assert [f.name for f in folds] == ["heldout=flip", "heldout=null"]
    for f in folds:
        assert f.protocol == "adapt" and not set(meta.source[f.train]) & set(f.test_sources)
    loso = {f.name: f for f in make_folds(meta, "loso")}
    for f in folds:  # k = 0 is the loso model: the same training images
        assert np.array_equal(f.train, loso[f.name].train) and np.array_equal(f.tests["unseen"],
                                                                              loso[f.name].tests["unseen"])
    one = make_meta(["a"] * 20 + ["z"] * 20, np.array([0, 1] * 10 + [1] * 20))
    with pytest.raises(ValueError, match="one class only"):
        make_folds(one, "adapt", sites=["z"])
    with pytest.raises(ValueError, match="ks must be distinct"):
        make_folds(meta, "adapt", ks=[5, 5])


@pytest.mark.slow
def test_known_answer_adapting_helps_a_different_site_not_a_null_one(tmp_path):
    db = _store(tmp_path / "fs.duckdb", _vectors())
    st = parse_study(dict(study="adapt", backbones=["synthetic"], heads={"logreg": {"trials": 2}},
                          protocols={"adapt": {"ks": [0, 10, 40], "draws": 4, "sites": ["flip", "null"]}},
                          bootstrap=0))
    rep = run_study(st, db, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    df = pl.DataFrame(rep.rows, infer_schema_length=None).filter(pl.col("kind") == "adapt")
    got = {(r["scope"], r["fold"].split()[1], int(r["fold"].split("k=")[1])): r for r in df.iter_rows(named=True)}
    assert set(got) == {(s, a, k) for s in ("flip", "null") for a, k in
                        [("with-sources", 0), ("with-sources", 10), ("with-sources", 40), ("site-only", 10),
                         ("site-only", 40)]}
    for r in got.values():
        assert r["uncertainty"] == "draws" and r["auc_lo"] <= r["auc"] <= r["auc_hi"]
        assert r["protocol"] == "adapt" and r["status"] == "ok"
    flip = {k: got[("flip", "with-sources", k)]["auc"] for k in (0, 10, 40)}
    assert flip[0] < 0.65 and flip[40] > flip[10] > flip[0] and flip[40] - flip[0] > 0.1, flip
    assert got[("flip", "site-only", 40)]["auc"] > 0.8 and got[("flip", "site-only", 40)]["auc_lo"] > flip[0]
    for arm, k in [("with-sources", 0), ("with-sources", 10), ("with-sources", 40), ("site-only", 40)]:
        r = got[("null", arm, k)]
        assert abs(r["auc"] - 0.5) < 0.12 and r["auc_lo"] < 0.5 + 0.1, (arm, k, r["auc"])
    null = [got[("null", "with-sources", k)]["auc"] for k in (0, 10, 40)]
    assert max(null) - null[0] < 0.05, null  # labelled noise teaches nothing
    # the curve is in MLflow too: the unit run's adapt_auc metrics at step k
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("adapt")
    runs = client.search_runs([exp.experiment_id], "tags.level = 'unit' and tags.protocol = 'adapt'")
    hist = client.get_metric_history(runs[0].info.run_id, "adapt_auc.flip.with-sources")
    assert sorted(m.step for m in hist) == [0, 10, 40]
    # the report: a table and the curve figure
    from featstore.report import write_report

    con = connect(db)
    try:
        write_report(con, tmp_path / "report", study="adapt")
    finally:
        con.close()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Adapting to a held-out site with k labelled images per class" in md and "over draws" in md
    assert (tmp_path / "report" / "adapt_curves.png").stat().st_size > 5000
    # fixed seeds: the same rows again
    rep2 = run_study(st, db, tmp_path / "again", f"sqlite:///{tmp_path / 'mlflow2.db'}")
    a2 = pl.DataFrame(rep2.rows, infer_schema_length=None).filter(pl.col("kind") == "adapt")
    assert a2["auc"].to_list() == df["auc"].to_list()


def test_adapt_refuses_a_three_class_target():
    meta = make_meta(["a"] * 30 + ["b"] * 30, np.array([0, 1, 2] * 20))
    with pytest.raises(ValueError, match="binary targets only"):
        make_folds(meta, "adapt")
