"""The approximate-nearest-neighbour index behind `neighbors` and `duplicates` (SYNTHETIC vectors,
and the real CXR set where present): recall against exact search, incremental updates, rebuilds,
determinism, and the CLI answering the same with --ann and --exact."""
import json
import os
import shutil

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from featstore import ann as A
from featstore.cli import app
from featstore.testing import synthetic_store

from _realset import embedded_copy, match_once
from conftest import needs_cxr, needs_onnx

N, DIM = 10_000, 64  # above ALL_ANN_MIN (8,000), where the commands use the index


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """10k x 64 SYNTHETIC vectors in a store, their exact k-NN, and the index built once (with what it
    said); tests take a copy of the store and its index folder before changing either."""
    db = tmp_path_factory.mktemp("ann") / "base.duckdb"
    synthetic_store(db, N, DIM, seed=7)
    exact, _ = _knn(db, "exact")
    approx, lines = _knn(db, "ann")
    return dict(db=db, exact=exact, approx=approx, lines=lines)


@pytest.fixture
def store(base, tmp_path):
    db = tmp_path / "fs.duckdb"
    shutil.copy(base["db"], db)
    shutil.copytree(base["db"].with_name(base["db"].name + ".ann"), db.with_name(db.name + ".ann"))  # copy2: mtimes kept
    return db


def _arrays(con):
    from featstore.api import Store

    X, meta = Store.over(con).arrays("synthetic")
    return A.normalize(X), meta["image_id"].to_numpy()


def _knn(db, method, k=10, say=None):
    lines = []
    with duckdb.connect(str(db)) as con:
        s = A.resolve_set(con, "synthetic")
        Xn, ids = _arrays(con)
        return A.knn(con, s, Xn, ids, k, method=method, say=say or lines.append), lines


def _recall(found, exact):
    return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact)])


def _files(db):
    folder = db.with_name(db.name + ".ann")
    return {p.name: p for p in folder.iterdir()} if folder.exists() else {}


def _index_file(db):
    return next(p for n, p in _files(db).items() if n.endswith(".usearch"))


def _sidecar(db):
    return json.loads(next(p for n, p in _files(db).items() if n.endswith(".json")).read_text())


@pytest.mark.slow
def test_recall_at_10_against_exact_search(base, store):
    assert _recall(base["approx"], base["exact"]) >= 0.99
    lines = base["lines"]
    assert len(lines) == 1 and "building the ANN index" in lines[0] and f"{N:,} vectors" in lines[0]
    side = _sidecar(store)
    assert (side["count"], side["dim"], side["metric"], side["set"]["backbone"]) == (N, DIM, "cos", "synthetic")
    # a later use reads the files: no build, no line, the same answers
    again, lines = _knn(store, "ann")
    assert lines == [] and np.array_equal(again, base["approx"])


@pytest.mark.slow
def test_the_same_rows_give_the_same_index_byte_for_byte(base, tmp_path):
    other = tmp_path / "other.duckdb"
    shutil.copy(base["db"], other)
    assert _knn(other, "ann")[1]  # built anew
    assert _index_file(other).read_bytes() == _index_file(base["db"]).read_bytes()


def _add_rows(db, n, start=N, embed_run=1):
    return synthetic_store(db, n, DIM, seed=7, start=start, embed_run=embed_run)


@pytest.mark.slow
def test_incremental_update_adds_only_the_new_keys_and_answers_as_a_fresh_build(store, tmp_path, monkeypatch):
    grown = store  # with the index of its N rows
    with duckdb.connect(str(grown), read_only=True) as con:
        before = A.open_index(con, A.resolve_set(con, "synthetic"), say=lambda line: None)
        keys_before = dict(zip(before.rows["id"].tolist(), before.rows["key"].tolist()))
    new_ids = _add_rows(grown, 5_000)
    fresh = tmp_path / "fresh.duckdb"
    shutil.copy(grown, fresh)

    def no_rebuild(*a, **kw):
        raise AssertionError("rebuilt instead of adding the new rows")
    monkeypatch.setattr(A, "_build", no_rebuild)
    got, lines = _knn(grown, "ann")
    assert lines == [f"ANN index of synthetic/original: adding 5,000 new vectors to its {N:,}"]
    monkeypatch.undo()
    with duckdb.connect(str(grown), read_only=True) as con:
        after = A.open_index(con, A.resolve_set(con, "synthetic"), say=lambda line: None)
    keys_after = dict(zip(after.rows["id"].tolist(), after.rows["key"].tolist()))
    assert len(after) == N + 5_000 == _sidecar(grown)["count"]
    assert all(keys_after[i] == k for i, k in keys_before.items())  # old rows keep their keys
    assert sorted(keys_after[i.encode()] for i in new_ids) == list(range(N, N + 5_000))
    want, lines = _knn(fresh, "ann")
    assert "building" in lines[0]
    exact, _ = _knn(fresh, "exact")
    # two graphs of the same rows, inserted in other orders: each misses a few true neighbours, not
    # the same ones (measured at 10k + 5k: 99.8% of rows identical, recall 0.9998 both)
    assert np.mean((got == want).all(1)) >= 0.99
    for found in (got, want):
        assert _recall(found, exact) >= 0.99
    # searched deeply enough to miss nothing, both give the exact answer, row for row
    monkeypatch.setattr(A, "EXPANSION_SEARCH", 512)
    assert np.array_equal(_knn(grown, "ann")[0], exact) and np.array_equal(_knn(fresh, "ann")[0], exact)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["delete", "re-embed"])
def test_removed_or_changed_rows_rebuild_the_index(store, change):
    with duckdb.connect(str(store)) as con:
        victim = con.execute("SELECT min(image_id) FROM embeddings_d64").fetchall()[0][0]
        if change == "delete":
            con.execute("DELETE FROM embeddings_d64 WHERE image_id = ?", [victim])
        else:
            con.execute("UPDATE embeddings_d64 SET embed_run = 9, vector = ?::FLOAT[64] WHERE image_id = ?",
                        [[0.5] * 64, victim])
    got, lines = _knn(store, "ann")
    what = "1 rows removed and 0 re-embedded" if change == "delete" else "0 rows removed and 1 re-embedded"
    assert lines == [f"ANN index of synthetic/original: {what} since it was built; rebuilding it"]
    assert _sidecar(store)["count"] == (N - 1 if change == "delete" else N)
    exact, _ = _knn(store, "exact")
    assert _recall(got, exact) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated", "sidecar"])
def test_a_corrupted_index_is_rebuilt_with_one_line(base, store, damage):
    want = base["approx"]
    path = _index_file(store)
    if damage == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        side = next(p for n, p in _files(store).items() if n.endswith(".json"))
        side.write_text("{ not json")
    got, lines = _knn(store, "ann")
    assert len(lines) == 1 and lines[0].startswith("ANN index of synthetic/original") and lines[0].endswith(
        "; rebuilding it"), lines
    assert np.array_equal(got, want)
    assert _knn(store, "ann")[1] == []  # and it stays fixed


@pytest.mark.slow
def test_a_folder_not_made_by_featstore_is_left_alone(base, tmp_path):
    store = tmp_path / "fs.duckdb"
    shutil.copy(base["db"], store)
    folder = store.with_name(store.name + ".ann")
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    got, lines = _knn(store, "ann")
    assert len(lines) == 1 and "in memory for this run" in lines[0] and "was not made by featstore" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]
    assert np.array_equal(got, base["approx"])


# --- the commands -----------------------------------------------------------------------------------

def _run(*args):
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    return r


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    db = tmp_path_factory.mktemp("ann-cli") / "small.duckdb"
    synthetic_store(db, 3_000, 48, seed=3)
    return db


@pytest.mark.slow
def test_neighbors_answers_the_same_with_ann_and_exact(small_store):
    db = str(small_store)
    with duckdb.connect(db, read_only=True) as con:
        imgs = [r[0] for r in con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 25").fetchall()]
    for img in imgs:
        exact = _run("neighbors", img, "--k", "7", "--exact", "--db", db)
        ann = _run("neighbors", img, "--k", "7", "--ann", "--db", db)
        assert ann.stdout == exact.stdout and "(7 rows)" in ann.stdout
    exact = _run("neighbors", "--summary", "--exact", "--db", db)
    ann = _run("neighbors", "--summary", "--ann", "--db", db)
    assert ann.stdout == exact.stdout and "same_source" in ann.stdout


def test_neighbors_after_the_index_file_is_damaged(small_store, tmp_path):
    db = tmp_path / "s.duckdb"
    shutil.copy(small_store, db)
    with duckdb.connect(str(db), read_only=True) as con:
        img = con.execute("SELECT min(image_id) FROM images").fetchall()[0][0]
    first = _run("neighbors", img, "--ann", "--db", str(db))
    assert "building the ANN index" in first.stderr
    _index_file(db).write_bytes(b"\0" * 100)
    again = _run("neighbors", img, "--ann", "--db", str(db))
    assert again.stdout == first.stdout
    assert [line for line in again.stderr.splitlines() if "rebuilding" in line] == [again.stderr.strip()]


def test_exact_and_ann_together_are_refused(small_store):
    r = CliRunner().invoke(app, ["neighbors", "--summary", "--exact", "--ann", "--db", str(small_store)])
    assert r.exit_code == 2 and "exclude each other" in r.output


@pytest.mark.slow
def test_duplicates_find_the_same_pairs_with_ann_and_exact(tmp_path):
    """Tiny SYNTHETIC images with planted copies, embedded with pixelstats: the same pairs either way."""
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect
    from featstore.synth import generate

    m = generate(tmp_path / "data", n_per_source=30, size=96, seed=2, plant_duplicates=4)
    db = tmp_path / "fs.duckdb"
    con = connect(db)
    I.ingest_rows(con, *I.manifest_rows(m)[:1], str(m), workers=1)
    embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
    con.close()
    found = {}
    for method in ("exact", "ann"):
        _run("duplicates", "--backbone", "pixelstats", "--db", str(db), "--workers", "1", f"--{method}",
             "--cosine-min", "0.999", "--phash-max", "3", "--sheet", str(tmp_path / f"{method}.png"),
             "--accept-implausible")
        with duckdb.connect(str(db), read_only=True) as con:
            found[method] = con.execute("SELECT image_a, image_b, method, round(cosine, 6), phash_distance "
                                        "FROM near_duplicates ORDER BY ALL").fetchall()
    assert found["ann"] == found["exact"]
    assert any(r[2] in ("embedding", "both") for r in found["exact"])


@pytest.mark.slow
@needs_cxr
@needs_onnx
def test_duplicates_via_the_index_match_exact_on_the_real_set(tmp_path, tmp_path_factory, monkeypatch):
    """The real set's near copies (cohen_ieee8023 x covid_cxnet and others): with the index,
    `duplicates` finds every pair exact search finds, no other, with the same measures."""
    from featstore.duplicates import find
    from featstore.store import connect

    # the embedded set and the copy matcher's verdicts are shared with test_forensics (tests/_realset.py):
    # the index changes which pairs are found, never what the matcher says of a pair
    match_once(tmp_path_factory, monkeypatch)
    con = connect(embedded_copy(tmp_path_factory, tmp_path / "real.duckdb"))
    lines = []
    exact = find(con, "mobilenetv3-nih-onnx", workers=2, search="exact").drop("found_at")
    approx = find(con, "mobilenetv3-nih-onnx", workers=2, search="ann", say=lines.append).drop("found_at")
    con.close()
    assert len(lines) == 1 and "building the ANN index" in lines[0]  # it was used
    by_embedding = exact.filter(exact["method"] != "phash")
    assert by_embedding.height >= 50, by_embedding.height  # 97 of 226 pairs when written
    assert approx.to_dicts() == exact.to_dicts()


def test_unit_vectors_are_the_stores_arrays_normalised(small_store):
    """The commands read a set in batches into one matrix (ann.unit_vectors): the same rows, order,
    metadata and unit vectors as Store.arrays + normalisation."""
    from featstore.api import Store

    with duckdb.connect(str(small_store), read_only=True) as con:
        s = A.resolve_set(con, "synthetic")
        Xn, meta = A.unit_vectors(con, s, batch=700)  # batches that do not divide the rows
        X, want = Store.over(con).arrays("synthetic")
    assert meta.equals(want.select("image_id", "source", "label"))
    assert np.array_equal(Xn, A.normalize(X))


def test_the_probes_neighbour_summary_leaves_no_index_open(store, tmp_path):
    """`featstore probe` fits its folds after the neighbour summary: the graph it searched (2.3 GiB at 1M
    vectors) is dropped from the process's cache, the summary is the one the index gives, and a later use
    opens the file again."""
    from featstore.neighbors import neighbor_summary
    from featstore.probe import neighbor_table

    A._CACHE.clear()
    with duckdb.connect(str(store)) as con:
        got = neighbor_table(con, "synthetic", "original")
        assert A._CACHE == {}
        s = A.resolve_set(con, "synthetic")
        Xn, meta = A.unit_vectors(con, s)
        want = neighbor_summary(None, meta["source"], meta["label"], k=10,
                                idx=A.knn(con, s, Xn, meta["image_id"].to_numpy(), 10))
        assert len(A._CACHE) == 1  # knn alone keeps it open, for the next query
    assert got.equals(want) and got.height > 0
    A._CACHE.clear()
    small = tmp_path / "small.duckdb"  # below ALL_ANN_MIN the search is exact: no index folder appears
    synthetic_store(small, 300, 16, seed=1)
    with duckdb.connect(str(small)) as con:
        assert neighbor_table(con, "synthetic", "original").height > 0
    assert not small.with_name(small.name + ".ann").exists()


@pytest.mark.slow
def test_the_search_reads_its_unit_vectors_from_a_file_with_the_same_answers(base, store, tmp_path, monkeypatch):
    """`featstore probe` keeps the unit vectors in a file during its neighbour search (issue 27: 3.8 GiB at 1M):
    the same floats, the same index built from them byte for byte, the same neighbours, also for rows the
    graph answers short (the exact fallback reads the file a block at a time)."""
    from featstore import spill

    fresh = tmp_path / "fresh.duckdb"
    shutil.copy(base["db"], fresh)  # no index folder: built from the file
    monkeypatch.setattr(spill, "ROW_BLOCK", 333)  # many maps and reads, none of them the whole file
    monkeypatch.setattr(A, "ROW_BLOCK", 1_000)
    for db in (store, fresh):
        A._CACHE.clear()
        with duckdb.connect(str(db)) as con:
            s = A.resolve_set(con, "synthetic")
            Xn, meta = A.unit_vectors(con, s)
            Xf, meta_f = A.unit_vectors(con, s, batch=700, spill=tmp_path / f"{db.stem}.f32")
            assert isinstance(Xf, spill.SpilledRows) and meta_f.equals(meta)
            assert np.array_equal(Xf.take(np.arange(len(Xf)), np.float32), Xn)
            ids = meta["image_id"].to_numpy()
            assert np.array_equal(A.knn(con, s, Xf, ids, 10, say=lambda line: None), base["approx"])
    assert _index_file(fresh).read_bytes() == _index_file(base["db"]).read_bytes()

    real = A.AnnIndex.search

    def short(self, Q, count, threads=0):  # every 97th query finds only itself and 3 others
        found = real(self, Q, count, threads)
        found[::97, 4:] = -1
        return found

    monkeypatch.setattr(A.AnnIndex, "search", short)
    with duckdb.connect(str(store)) as con:
        s = A.resolve_set(con, "synthetic")
        ann = A.open_index(con, s)
        from_memory = ann.knn_rows(Xn, ids, 10)
        from_file = ann.knn_rows(Xf, ids, 10)
    assert np.array_equal(from_file, from_memory)
    shorted = np.concatenate([np.arange(a, min(a + 2048, N), 97) for a in range(0, N, 2048)])  # knn_rows' blocks
    assert np.array_equal(from_file[shorted], base["exact"][shorted])  # answered exactly
