"""The notebook API: labelled arrays, unknown names refused, results, predictions, images."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from featstore.api import open_store
from featstore.decode import decode_file


@pytest.fixture
def db(synth_stores, tmp_path):
    """A copy of the neutral store without sweeps: other tests on this worker may have swept the session
    store already, and these tests count the rows they write."""
    from featstore.store import connect

    shutil.copy(synth_stores["neutral"], tmp_path / "fs.duckdb")
    con = connect(tmp_path / "fs.duckdb")
    for table in ("results", "predictions"):
        con.execute(f"DELETE FROM {table}")
    con.close()
    return tmp_path / "fs.duckdb"


def test_embeddings_without_vectors_are_the_same_rows(synth_stores):
    """vectors=False (the sweep's and the probe's demographics): the metadata of embeddings(), row for row."""
    with open_store(synth_stores["neutral"]) as fs:
        full = fs.embeddings("pixelstats", sources=["synthetic-a", "synthetic-b"])
        meta = fs.embeddings("pixelstats", sources=["synthetic-a", "synthetic-b"], vectors=False)
    assert "vector" in full.columns and "vector" not in meta.columns and full.height > 0
    assert meta.equals(full.drop("vector"))


@pytest.mark.parametrize("batch", [7, 16_384])
def test_arrays_stream_the_same_vectors_as_the_table_in_or_out_of_a_transaction(synth_stores, monkeypatch, batch):
    """arrays() streams the vectors batch by batch into one array (api._vectors_into): the same rows and
    order as embeddings(), in many small batches or one, also inside the caller's own transaction (left open)."""
    import featstore.api as A
    from featstore.store import in_transaction, transaction

    monkeypatch.setattr(A, "ARRAY_BATCH", batch)
    with open_store(synth_stores["confounded"]) as fs:
        df = fs.embeddings("pixelstats")
        X, meta = fs.arrays("pixelstats", sources=["synthetic-a", "synthetic-c"])
        sub = df.filter(df["source"].is_in(["synthetic-a", "synthetic-c"]))
        assert meta["image_id"].to_list() == sub["image_id"].to_list() == sorted(sub["image_id"].to_list())
        np.testing.assert_array_equal(X, np.stack(sub["vector"].to_numpy()))
        with transaction(fs.con):
            X2, meta2 = fs.arrays("pixelstats", sources=["synthetic-a", "synthetic-c"])
            assert in_transaction(fs.con)
        np.testing.assert_array_equal(X, X2)
        assert meta2.equals(meta)
        assert not in_transaction(fs.con)


def test_arrays_read_the_set_beside_ids_of_other_lengths_and_images_left_out(db, monkeypatch):
    """arrays() scans the whole set and keeps the rows asked for: an image of another source, with an id longer
    (or shorter) than every id asked for, is left out; asked for, it is in its place. Small batches."""
    import duckdb

    import featstore.api as A

    monkeypatch.setattr(A, "ARRAY_BATCH", 5)
    with duckdb.connect(str(db)) as con:
        first = con.execute("SELECT min(image_id) FROM images").fetchone()[0]
        for new_id, source in (("f" * 80, "elsewhere"), ("0", "elsewhere-too")):
            con.execute("INSERT INTO images SELECT * REPLACE (? AS image_id, ? AS source) FROM images "
                        "WHERE image_id = ?", [new_id, source, first])
            con.execute("INSERT INTO embeddings_d{0} SELECT * REPLACE (? AS image_id) FROM embeddings_d{0} "
                        "WHERE image_id = ?".format(_dim(con)), [new_id, first])
    with open_store(db) as fs:
        df = fs.embeddings("pixelstats")
        for sources in (["synthetic-a", "synthetic-b"], None, ["elsewhere", "elsewhere-too"]):
            X, meta = fs.arrays("pixelstats", sources=sources)
            want = df.filter(df["source"].is_in(sources)) if sources else df
            assert meta["image_id"].to_list() == want["image_id"].to_list() and meta.height > 0
            np.testing.assert_array_equal(X, np.stack(want["vector"].to_numpy()))
    assert {"f" * 80, "0"} <= set(df["image_id"])


def _dim(con) -> int:
    return con.execute("SELECT DISTINCT dim FROM embedding_sets WHERE backbone = 'pixelstats'").fetchone()[0]


def test_arrays_refuse_a_set_that_changed_between_its_two_reads(synth_stores, monkeypatch):
    import featstore.api as A

    real = A.Store._set_scan

    def one_vector_short(self, *a, **kw):  # as if an image left the set between the two reads
        return real(self, *a, **kw).filter("image_id <> (SELECT min(image_id) FROM images)")

    monkeypatch.setattr(A.Store, "_set_scan", one_vector_short)
    with open_store(synth_stores["confounded"]) as fs, pytest.raises(RuntimeError, match="changed while it was read"):
        fs.arrays("pixelstats")


def test_arrays_for_a_binary_target(synth_stores):
    with open_store(synth_stores["neutral"]) as fs:
        X0, meta0 = fs.arrays("pixelstats")
        r = fs.arrays("pixelstats", target="binary", positive="covid")
    from featstore.api import Labelled
    assert isinstance(r, Labelled)
    X, y, groups, meta = r
    assert np.array_equal(X, X0) and meta.equals(meta0)
    assert np.array_equal(y, (meta["label"] == "covid").to_numpy().astype(int)) and 0 < y.sum() < len(y)
    assert len(groups) == len(y) and len(set(groups)) > 1
    from featstore.split import make_meta  # the splits' own grouping, so GroupKFold agrees with featstore
    assert list(groups) == list(make_meta(meta["source"].to_numpy(), y, meta["patient_id"].to_numpy(),
                                          meta["image_id"].to_numpy()).groups)


def test_arrays_for_a_class_target_keeps_the_named_classes(synth_stores):
    with open_store(synth_stores["neutral"]) as fs:
        _, meta = fs.arrays("pixelstats")
        have = sorted(c for c in set(meta["class"].to_list()) if c)
        X, y, groups, m = fs.arrays("pixelstats", target="3class", classes=have[:2])
    assert len(X) == len(y) == len(m) and set(m["class"]) == set(have[:2])
    assert np.array_equal(y, np.array([have[:2].index(c) for c in m["class"]]))


def test_unknown_positive_label_is_named(synth_stores):
    with open_store(synth_stores["neutral"]) as fs, pytest.raises(ValueError, match="did you mean 'covid'"):
        fs.arrays("pixelstats", target="binary", positive="covd")


def test_unknown_source_raises_with_a_suggestion_instead_of_returning_nothing(synth_stores):
    with open_store(synth_stores["neutral"]) as fs:
        real = fs.images()["source"][0]
        with pytest.raises(ValueError, match=f"did you mean '{real}'"):
            fs.arrays("pixelstats", sources=[real + "x"])
        with pytest.raises(ValueError, match="unknown source"):
            fs.images(sources=["nowhere"])


def test_unknown_backbone_suggests_the_stored_set(synth_stores):
    with open_store(synth_stores["neutral"]) as fs, pytest.raises(ValueError, match="did you mean 'pixelstats'"):
        fs.arrays("pixelstat")


def _pred(con, sweep, head, image_id="i1"):
    con.execute("INSERT INTO predictions BY NAME SELECT 'st' AS study, ? AS sweep_id, 'loso' AS protocol, "
                "'f0' AS fold, 'unseen' AS test_set, 'pixelstats' AS backbone, 'original' AS preprocess, ? AS head, "
                "'train-val' AS selection, ? AS image_id, 's' AS source, 1 AS y, 0.7 AS prob, 0.8 AS score, "
                "[0.3, 0.7] AS probs", [sweep, head, image_id])


def test_results_and_predictions_default_to_the_latest_sweep(db):
    from featstore.store import connect
    from featstore.track import write_results

    con = connect(db)
    row = dict(study="st", protocol="loso", fold="f0", test_set="unseen", scope="all", backbone="pixelstats",
               weights_id="w", preprocess="original", selection="train-val", status="ok", kind="fold", auc=0.6,
               repeat=0, train_sources=["a"], test_sources=["b"], target="binary", oracle=False, seed=0,
               code_version="test")
    write_results(con, [dict(row, sweep_id="1", head="logreg"), dict(row, sweep_id="2", head="logreg"),
                        dict(row, sweep_id="2", head="svm", auc=0.7)])
    _pred(con, "1", "logreg"), _pred(con, "2", "logreg"), _pred(con, "2", "svm")
    con.close()
    with open_store(db) as fs:
        res = fs.results()
        assert sorted(res["sweep_id"].to_list()) == ["2", "2"]
        assert fs.results(head="svm")["auc"].to_list() == [0.7]
        assert fs.results(study="st", latest=False).height == 3
        assert fs.results(sweep_id="1")["sweep_id"].to_list() == ["1"]
        assert fs.results(study="other").height == 0
        pred = fs.predictions(head=["logreg"])
        assert pred["sweep_id"].to_list() == ["2"] and pred["prob"].to_list() == [0.7]
        assert fs.predictions(latest=False).height == 3
        with pytest.raises(ValueError, match="did you mean 'head'"):
            fs.results(haed="svm")


def test_image_is_the_decoded_pixels(synth_stores):
    with open_store(synth_stores["neutral"]) as fs:
        img = fs.images().row(0, named=True)
        pixels = fs.image(img["image_id"][:12])  # a unique prefix is enough
        assert pixels.shape == (img["height"], img["width"]) and pixels.dtype == np.float32
        assert np.array_equal(pixels, decode_file(img["path"]).pixels)
        with pytest.raises(KeyError, match="no image"):
            fs.image("zzzz")
