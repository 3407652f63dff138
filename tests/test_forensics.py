"""Shortcut forensics: domain probe, nearest neighbours, near duplicates (SYNTHETIC data)."""
import csv
import io

import duckdb
import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from featstore.cli import app
from featstore.neighbors import knn_indices, neighbor_summary
from featstore.probe import domain_probe

from _realset import embedded_copy, match_once
from conftest import needs_cxr, needs_onnx


def test_probe_finds_the_planted_source(synth_embeddings):
    X, meta = synth_embeddings["confounded"]
    r = domain_probe(X, meta["source"].to_numpy(), n_boot=100)
    assert r["auc"] > 0.95 and r["auc_lo"] <= r["auc"] <= r["auc_hi"]
    assert set(r["per_source"]) == {"synthetic-a", "synthetic-b", "synthetic-c", "synthetic-d"}
    rng = np.random.default_rng(0)  # no source signal at all: chance
    noise = domain_probe(rng.normal(size=(240, 16)), meta["source"].to_numpy(), n_boot=0)
    assert 0.35 < noise["auc"] < 0.65


@pytest.mark.parametrize("shape", [(150, 1), (211, 2), (300, 33), (257, 70)])
def test_the_probes_folds_are_cross_val_predict_bit_for_bit_from_memory_or_a_file(tmp_path, shape):
    """The probe fits one float64 fold at a time, standardised a block of columns at a time, from the array or
    from the set spilled to a file: the out-of-fold probabilities are those of cross_val_predict with
    StandardScaler + LogisticRegression on a float64 copy, to the last bit, and the caller's array is left as
    it was."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import LabelEncoder, StandardScaler

    from featstore import probe, spill

    n, dim = shape
    rng = np.random.default_rng(dim)
    src = rng.integers(0, 4, n)
    Z = ((rng.normal(size=shape) + src[:, None] * 0.4) * 10.0 ** rng.integers(-2, 4, dim)).astype(np.float32)
    before = Z.copy()
    d = LabelEncoder().fit_transform(src.astype(str))
    want = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=0)),
                             Z.astype(np.float64), d, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                             method="predict_proba")
    spilled = probe.SpilledRows.write(Z, tmp_path / "z.f32")
    for cols in (probe.SCALER_COLUMNS, 3):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(probe, "SCALER_COLUMNS", cols)
            mp.setattr(spill, "ROW_BLOCK", 17)  # many blocks, most rows of a block wanted, some blocks skipped
            for rows in (Z, spilled):
                assert np.array_equal(probe.out_of_fold_proba(rows, d, 5, seed=0), want)
    assert np.array_equal(Z, before)
    # a view of the file by mask, then rows in any order and repeated, as the array gives them
    keep = rng.random(n) < 0.6
    idx = rng.permutation(int(keep.sum()))[: max(1, int(keep.sum()) // 2)]
    idx = np.concatenate([idx, idx[:3]])
    assert np.array_equal(spilled[keep].take(idx, np.float32), Z[keep][idx])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spill, "ROW_BLOCK", 5)  # the search's scattered reads: many maps, each closed
        assert np.array_equal(spilled[keep].take_scattered(idx), Z[keep][idx])
        for reserve in (True, False):  # its space reserved by posix_fallocate, or (macOS) by writing zeros
            if not reserve:
                mp.delattr(spill.os, "posix_fallocate")
            filled = spill.SpilledRows.create(tmp_path / f"w{reserve}.f32", n, dim)
            order = rng.permutation(n)  # rows written in any order, as a store's batches come
            for a in range(0, n, 7):
                filled.put(order[a:a + 7], Z[order[a:a + 7]])
            assert np.array_equal(filled.take(np.arange(n), np.float32), Z)
    assert np.array_equal(probe.take_rows(Z[keep], idx), Z[keep][idx].astype(np.float64))
    assert spilled[keep].shape == (int(keep.sum()), dim) and len(spilled[keep]) == int(keep.sum())
    assert np.array_equal(probe.take_rows(Z.tolist(), idx), Z[idx].astype(np.float64))  # any array-like, as before
    A = Z.astype(np.float64)
    probe.standardize_in_place(A, columns=1)  # asked for one-column blocks: still StandardScaler's bits
    assert np.array_equal(A, StandardScaler().fit_transform(Z.astype(np.float64)))


@pytest.mark.slow
@pytest.mark.parametrize("n_sources", [2, 4])
def test_probe_interval_is_the_per_resample_roc_auc_score_one(monkeypatch, n_sources):
    # the bootstrap is drawn and scored in blocks (probe.BOOT_BLOCK); with several blocks its percentiles must
    # be those of roc_auc_score on each source-stratified resample, drawn in the same order from the seed
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import LabelEncoder, StandardScaler

    from featstore import probe

    rng = np.random.default_rng(n_sources)
    n, boots = 160, 60
    src = rng.integers(0, n_sources, n).astype(str)
    Z = rng.normal(size=(n, 5)) + src.astype(int)[:, None] * 0.3
    monkeypatch.setattr(probe, "BOOT_BLOCK", 7 * n)  # 7 resamples a block: 9 blocks, the last one short
    got = probe.domain_probe(Z, src, n_boot=boots)
    d = LabelEncoder().fit_transform(src)
    P = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=0)),
                          Z, d, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    draw, groups = np.random.default_rng(0), [np.flatnonzero(d == i) for i in range(n_sources)]
    resamples = [np.concatenate([draw.choice(g, len(g)) for g in groups]) for _ in range(boots)]
    boot = [roc_auc_score(d[i], P[i, 1]) if n_sources == 2 else
            roc_auc_score(d[i], P[i], multi_class="ovr", average="macro", labels=list(range(n_sources)))
            for i in resamples]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert got["auc_lo"] == pytest.approx(lo, abs=1e-12) and got["auc_hi"] == pytest.approx(hi, abs=1e-12)


def test_probe_cli_writes_rows(synth_stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = str(synth_stores["confounded"])
    r = CliRunner().invoke(app, ["probe", "--backbone", "pixelstats", "--db", db, "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    with duckdb.connect(db, read_only=True) as con:
        rows = dict(con.execute("SELECT head || ' / ' || test_set, auc FROM results WHERE study = 'domain-probe' "
                                "AND scope = 'all'").fetchall())
        # its evidence, stored beside the rows for the report: both maps of every image, the neighbour summary
        latest = "(SELECT max(sweep_id) FROM results WHERE study = 'domain-probe' AND backbone = 'pixelstats')"
        maps = con.execute(f"SELECT representation, count(*), count(DISTINCT image_id) FROM probe_map_points "
                           f"WHERE sweep_id = {latest} GROUP BY 1 ORDER BY 1").fetchall()
        n = con.execute("SELECT count(*) FROM embeddings WHERE backbone = 'pixelstats'").fetchall()[0][0]
        nb = con.execute(f"SELECT count(*), bool_and(same_source > same_source_chance + 0.4), min(k) "
                         f"FROM probe_neighbors WHERE sweep_id = {latest}").fetchall()[0]
    assert rows["raw / all images"] > 0.95
    assert rows["grl_mlp / all images"] < rows["raw / all images"]
    assert {"raw / label=covid only", "raw / label=non_covid only"} <= set(rows)
    assert maps == [("grl_mlp", n, n), ("raw", n, n)] and nb == (4, True, 10)  # a planted source signal
    assert (tmp_path / "mlflow.db").exists()


def test_knn_matches_brute_force():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 8))
    idx = knn_indices(X, 5, block=64)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Xn @ Xn.T
    np.fill_diagonal(S, -np.inf)
    assert np.array_equal(idx, np.argsort(-S, axis=1)[:, :5])


def test_exact_neighbours_among_many_equal_vectors_go_to_the_lower_rows(tmp_path, monkeypatch):
    """More identical images than the search's k + 5 places (a collection's duplicates): every exact path
    (the whole set, some rows, some rows read from a file a block at a time) takes the lowest rows among the
    equals, as `rank` documents, not those argpartition happened to keep."""
    from featstore import ann as A
    from featstore.neighbors import exact_rows
    from featstore.spill import SpilledRows

    rng = np.random.default_rng(3)
    Xn = rng.normal(size=(2000, 24)).astype(np.float32)
    dup = rng.choice(2000, 300, replace=False)
    Xn[dup] = Xn[dup[0]]
    Xn /= np.linalg.norm(Xn, axis=1, keepdims=True)
    rows = np.sort(dup)[[0, 5, 150, 299]]
    want = np.array([[j for j in np.sort(dup) if j != r][:10] for r in rows])
    assert np.array_equal(knn_indices(Xn, 10, block=256, normalized=True)[rows], want)
    assert np.array_equal(exact_rows(Xn, rows, 10), want)
    monkeypatch.setattr(A, "ROW_BLOCK", 333)
    assert np.array_equal(A._exact_rows(SpilledRows.write(Xn, tmp_path / "x.f32"), rows, 10), want)
    others = np.setdiff1d(np.arange(2000), dup)[:50]  # and rows without ties answer as before
    S = Xn[others] @ Xn.T
    S[np.arange(50), others] = -np.inf
    assert np.array_equal(exact_rows(Xn, others, 10), np.argsort(-S, axis=1, kind="stable")[:, :10])


def test_neighbors_share_the_source_more_than_chance(synth_embeddings, synth_stores):
    X, meta = synth_embeddings["confounded"]
    df = neighbor_summary(X, meta["source"], meta["label"], k=10)
    assert (df["same_source"] > df["same_source_chance"] + 0.4).all()
    db = str(synth_stores["confounded"])
    with duckdb.connect(db, read_only=True) as con:
        img = con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 1").fetchall()[0][0]
    r = CliRunner().invoke(app, ["neighbors", img[:12], "--k", "4", "--db", db])
    assert r.exit_code == 0, r.output
    assert r.stdout.count("synthetic-") >= 4 and "(4 rows)" in r.stdout
    r = CliRunner().invoke(app, ["neighbors", "--summary", "--db", db])
    assert r.exit_code == 0 and "same_source" in r.stdout


@pytest.fixture
def near_dup_store(tmp_path):
    """Synthetic sources plus one image of synthetic-a copied into synthetic-c, resized and re-encoded
    as JPEG (different bytes, same picture) and relabelled like its new source."""
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect
    from featstore.synth import generate

    m = generate(tmp_path / "data", n_per_source=16, size=128, seed=5)
    rows = list(csv.DictReader(io.StringIO(m.read_text())))
    src = next(r for r in rows if r["source"] == "synthetic-a")
    im = Image.open(m.parent / src["path"]).resize((112, 112))
    rel = "images/synthetic-c/reencoded.jpg"
    im.convert("L").save(m.parent / rel, quality=85)
    rows.append({**src, "path": rel, "source": "synthetic-c", "patient_id": "c-copy"})
    with open(m, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    db = tmp_path / "fs.duckdb"
    con = connect(db)
    I.ingest_rows(con, *I.manifest_rows(m)[:1], str(m), workers=1)
    embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
    ids = dict(con.execute("SELECT path, image_id FROM images").fetchall())
    con.close()
    a = next(v for k, v in ids.items() if k.endswith(src["path"]))
    b = next(v for k, v in ids.items() if k.endswith("reencoded.jpg"))
    return db, tuple(sorted((a, b)))


@pytest.mark.slow
def test_duplicates_finds_the_reencoded_copy(near_dup_store, tmp_path):
    """Synthetic chests are near-identical at thumbnail scale, so this uses tight thresholds: the
    re-encoded copy must be the one pair found (the calibrated defaults are tested on real data)."""
    db, pair = near_dup_store
    sheet = tmp_path / "sheet.png"
    r = CliRunner().invoke(app, ["duplicates", "--backbone", "pixelstats", "--db", str(db), "--sheet", str(sheet),
                                 "--workers", "1", "--cosine-min", "0.9999", "--phash-max", "3"])
    assert r.exit_code == 0, r.output
    with duckdb.connect(str(db), read_only=True) as con:
        found = con.execute("SELECT image_a, image_b, method, phash_distance, cosine, cosine_min, phash_max "
                            "FROM near_duplicates").fetchall()
        by = con.execute("SELECT source_1, source_2, n_pairs FROM near_duplicate_pairs_by_source").fetchall()
    assert [(f[0], f[1]) for f in found] == [pair]
    assert found[0][4] > 0.9999 and found[0][5:] == (0.9999, 3)  # thresholds recorded with the pair
    assert by == [("synthetic-a", "synthetic-c", 1)]
    assert Image.open(sheet).size[0] > 256


@pytest.mark.slow
@needs_cxr
@needs_onnx
def test_duplicate_defaults_on_the_real_set(tmp_path, tmp_path_factory, monkeypatch):
    """Calibrated defaults: the COVID collections share copies; collections that share no images
    (NIH adults, Guangzhou children vs the COVID sets) give no pairs at all."""
    from featstore.duplicates import find
    from featstore.store import connect

    # the embedded set and the copy matcher's verdicts are shared with test_ann (tests/_realset.py)
    match_once(tmp_path_factory, monkeypatch)
    con = connect(embedded_copy(tmp_path_factory, tmp_path / "real.duckdb"))
    df = find(con, "mobilenetv3-nih-onnx", workers=2)
    con.close()
    pairs = {tuple(sorted(p)) for p in df.select("source_a", "source_b").iter_rows()}
    cxnet = df.filter(pl.struct("source_a", "source_b").map_elements(
        lambda s: {s["source_a"], s["source_b"]} == {"cohen_ieee8023", "covid_cxnet"}, return_dtype=pl.Boolean))
    assert cxnet.height >= 100
    impossible = {"nih_cxr14", "pediatric_guangzhou"}
    assert not [p for p in pairs if set(p) & impossible], pairs


@pytest.mark.slow
def test_studies_drop_warn_or_refuse_near_duplicates(near_dup_store, tmp_path):
    from featstore.sweep.plan import plan
    from featstore.duplicates import find
    from featstore.store import connect
    from featstore.sweep.config import StudyError, parse_study

    db, (a, b) = near_dup_store
    con = connect(db)
    find(con, "pixelstats", cosine_min=0.9999, phash_max=3, workers=1)  # the planted pair only
    con.close()
    raw = dict(study="nd", backbones=["pixelstats"], heads=["logreg"], protocols=["loso"], bootstrap=0)
    (_, _, data, folds), = plan(parse_study(raw), db)
    ids = list(data.image_id)
    ia, ib = ids.index(a), ids.index(b)
    held_c = next(f for f in folds["loso"] if f.test_sources == ("synthetic-c",))
    assert ia not in held_c.train  # its near duplicate is tested: it may not train
    assert data.meta.groups[ia] == data.meta.groups[ib]
    (_, _, data, folds), = plan(parse_study(dict(raw, near_duplicates="warn")), db)
    held_c = next(f for f in folds["loso"] if f.test_sources == ("synthetic-c",))
    assert any("near duplicate in training" in n for n in held_c.notes)
    with pytest.raises(StudyError, match="near duplicate"):
        plan(parse_study(dict(raw, near_duplicates="refuse")), db)
