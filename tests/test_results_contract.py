"""The result-row contract (featstore/results.py) against the table the migrations build."""
from __future__ import annotations

import duckdb
import pytest

from featstore import results as R
from featstore.store import connect, sql_dir


def _described(con):
    return [(n, t, null == "YES") for n, t, null, *_ in con.execute("DESCRIBE results").fetchall()]


def test_spec_matches_a_new_store(tmp_path):
    con = connect(tmp_path / "s.duckdb")
    assert _described(con) == [(c.name, c.type, c.nullable) for c in R.COLUMNS]


def test_spec_ddl_builds_the_same_table(tmp_path):
    con = duckdb.connect()
    con.execute(R.ddl())
    fresh = connect(tmp_path / "fresh.duckdb")  # a store file: `:memory:` is refused as a --db
    assert _described(con) == _described(fresh)


def test_old_store_rows_get_kind_and_uncertainty(tmp_path):
    """A version-4 store with rows: the migration fills what used to be parsed out of fold names."""
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute((sql_dir() / "schema.sql").read_text())
    for f in sorted((sql_dir() / "migrations").glob("00[234]_*.sql")):
        con.execute(f.read_text())
        con.execute("INSERT INTO schema_version (version) VALUES (?)", [int(f.name[:3])])
    base = ("'s', 'x', 'loso', '{fold}', 0, 'unseen', 'all', ['a'], ['b'], 'bb', 'w', 'original', 'logreg', "
            "'binary', 'train-val', false, NULL, 0, 'v', 'ok', NULL, 10, 5, 5, 0.7, {lo}")
    cols = ("study, sweep_id, protocol, fold, repeat, test_set, scope, train_sources, test_sources, backbone, "
            "weights_id, preprocess, head, target, selection, oracle, params, seed, code_version, status, error, "
            "n, n_pos, n_neg, auc, auc_lo, created_at")
    con.execute(f"INSERT INTO results ({cols}) VALUES ({base.format(fold='pooled', lo='0.6')}, now()), "
                f"({base.format(fold='heldout=b', lo='NULL')}, now())")
    con.close()
    con = connect(db)
    got = dict(con.execute("SELECT fold, (kind, uncertainty) FROM results").fetchall())
    assert got == {"pooled": ("pooled", "image"), "heldout=b": ("fold", None)}
    assert _described(con) == [(c.name, c.type, c.nullable) for c in R.COLUMNS]


def test_rows_carry_exactly_the_contract():
    with pytest.raises(KeyError, match="does not know"):
        R.normalise({"study": "s", "unknown_metric": 1.0})
    with pytest.raises(ValueError, match="kind"):
        R.normalise({"kind": "headline"})


def test_metric_names_are_one_vocabulary():
    assert R.mlflow_name("auc", "unseen") == "auc_unseen"
    # characters MLflow refuses become _, and a short hash of the real name keeps two sources apart
    assert R.mlflow_name("auc", "unseen", "Clinique <b>Zé</b>") == "auc_unseen.Clinique _b_Z__/b__3482ee"
    assert set(R.METRICS) <= set(R.NAMES)
    assert "gap" not in R.METRICS and "auc" in R.METRICS


def _row(**kw):
    base = dict(status="ok", kind="fold", protocol="loso", test_set="unseen", scope="all")
    return {**base, **kw}


def test_unit_summary_same_names_for_every_protocol():
    loso = [_row(test_sources=["a"], auc=0.6), _row(test_sources=["b"], auc=0.8),
            _row(test_sources=["c"], auc=None), _row(kind="pooled", test_sources=["a", "b", "c"], auc=0.95)]
    s = R.unit_summary(loso)
    assert s == pytest.approx(dict(auc_unseen_mean=0.7, auc_unseen_worst=0.6, n_unseen_sources=2,
                                   auc_unseen_pooled=0.95))
    su = [_row(protocol="seen-unseen", test_set="seen", test_sources=["c", "d"], auc=0.99),
          _row(protocol="seen-unseen", test_sources=["c", "d"], auc=0.9),
          _row(protocol="seen-unseen", test_sources=["c", "d"], scope="c", auc=0.7),
          _row(protocol="seen-unseen", test_sources=["c", "d"], scope="d", auc=0.5)]
    s = R.unit_summary(su)
    assert s == pytest.approx(dict(auc_seen=0.99, auc_unseen_mean=0.6, auc_unseen_worst=0.5, n_unseen_sources=2,
                                   gap=0.39))
    lpo = [_row(protocol="leave-pair-out", test_sources=["p", "q"], auc=0.7),
           _row(protocol="leave-pair-out", test_sources=["p", "q"], scope="p", auc=None)]
    assert R.unit_summary(lpo)["auc_unseen_worst"] == 0.7
    assert set(R.unit_summary(loso)) | set(R.unit_summary(su)) <= set(R.UNIT_METRICS)
