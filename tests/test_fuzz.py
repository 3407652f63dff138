"""Fuzzing the ingest path: malformed image bytes and hostile manifests never crash it, every
rejection is recorded, and nothing outside the allowed root is ever opened."""
import csv
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featstore import ingest as I
from featstore.store import connect

pytestmark = pytest.mark.fuzz

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True, database=None)  # the same examples every run: CI stays reproducible


def _png():
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg():
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((48, 40)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _dcm():
    from test_decode import _dicom

    return _dicom(np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) % 4096)


SEEDS = {"png": _png(), "jpg": _jpeg(), "dcm": _dcm()}


def _store(folder: Path):
    return connect(folder / "fs.duckdb")


@FUZZ
@given(kind=st.sampled_from(sorted(SEEDS)), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=6),
       junk=st.binary(max_size=48))
def test_malformed_image_bytes_are_rejected_and_recorded(tmp_path_factory, kind, cut, flips, junk):
    from featstore.backbones import create_backbone
    from featstore.embed import embed

    data = bytearray(SEEDS[kind][:max(1, int(len(SEEDS[kind]) * cut))])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    data += junk
    folder = tmp_path_factory.mktemp("img")
    (folder / f"x.{kind}").write_bytes(bytes(data))
    (folder / "m.csv").write_text(f"path,source,label\nx.{kind},s,covid\n")
    con = _store(folder)
    try:
        rows, pre = I.manifest_rows(folder / "m.csv")
        rep = I.ingest_rows(con, rows, "fuzz", pre_rejected=pre, workers=1)
        assert rep.n_new_images + len(rep.errors) == 1
        recorded = con.execute("SELECT count(*) FROM ingest_errors").fetchone()[0]
        assert recorded == len(rep.errors)
        if rep.n_new_images:  # accepted means decodable: embedding it works or is recorded, never crashes
            r = embed(con, create_backbone("pixelstats"), batch_size=4, workers=0)
            assert r.n_embedded + len(r.failed) == 1
            assert con.execute("SELECT count(*) FROM embed_errors").fetchone()[0] == len(r.failed)
    finally:
        con.close()


HOSTILE = st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", ".", "a\x00b.png", "x" * 5000, "é/ü.png",
                           "ok.png", "./ok.png", "sub/../ok.png", "../outside.png", "sub/../../outside.png",
                           "link.png", "", " ", "covid", "non_covid", "=cmd|' /C calc'!A0", "\r\n", '"'])
FIELD = st.one_of(HOSTILE, st.text(max_size=40), st.text(min_size=1000, max_size=1500))
# plausible source and label often, so hostile paths get as far as being opened if the fence fails
ROW = st.tuples(st.one_of(HOSTILE, FIELD), st.one_of(st.just("s"), FIELD), st.one_of(st.just("covid"), FIELD))


@FUZZ
@given(rows=st.lists(ROW, max_size=6),
       encoding=st.sampled_from(["utf-8", "latin-1", "utf-16", "cp1252"]))
def test_hostile_manifests_never_crash_or_escape_the_root(tmp_path_factory, rows, encoding):
    base = tmp_path_factory.mktemp("man")
    folder = base / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.png").write_bytes(SEEDS["png"])
    (base / "outside.png").write_bytes(SEEDS["png"])
    (folder / "link.png").symlink_to(base / "outside.png")  # inside by name, outside in fact
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "source", "label"])
    w.writerows(rows)
    m = folder / "m.csv"
    m.write_bytes(buf.getvalue().encode(encoding, errors="replace"))
    con = _store(base)
    try:
        try:
            got, pre = I.manifest_rows(m)
        except ValueError as e:  # unreadable as a table: the CLI records this one line and stops
            I.record_failure(con, str(m), "", str(e), str(m))
            assert con.execute("SELECT count(*) FROM ingest_errors").fetchone()[0] == 1
            return
        rep = I.ingest_rows(con, got, "fuzz", labels=I.ANY_LABEL, pre_rejected=pre, workers=1)
        assert rep.n_new_occurrences + rep.n_already + len(rep.errors) == rep.n_rows == len(got) + len(pre)
        stored = {(f, s, r) for f, s, r in con.execute("SELECT file, source, reason FROM ingest_errors").fetchall()}
        assert {(e.file, e.source, e.reason) for e in rep.errors} <= stored
        root = folder.resolve()
        for (p,) in con.execute("SELECT path FROM occurrences").fetchall():
            assert Path(p).is_relative_to(root), f"read a file outside the root: {p}"
    finally:
        con.close()


def test_traversal_is_refused_by_default_and_allowed_on_purpose(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "outside.png").write_bytes(SEEDS["png"])
    m = tmp_path / "data" / "m.csv"
    m.write_text("path,source,label\n../outside.png,s,covid\n/etc/passwd,s,covid\n")
    rows, pre = I.manifest_rows(m)
    assert rows == [] and all("outside the allowed root" in r.reason for r in pre) and len(pre) == 2
    con = _store(tmp_path)
    rep = I.ingest_rows(con, rows, str(m), pre_rejected=pre, workers=1)
    assert con.execute("SELECT count(*) FROM ingest_errors WHERE reason LIKE '%outside the allowed root%'"
                       ).fetchone()[0] == 2 and rep.n_new_images == 0
    rows, pre = I.manifest_rows(m, allowed_roots=[tmp_path / "data", tmp_path])
    assert [Path(r.path).name for r in rows] == ["outside.png"] and len(pre) == 1  # /etc/passwd stays refused
    con.close()


@FUZZ
@given(sources=st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1,
                                max_size=12).map(str.strip).filter(bool), min_size=1, max_size=5),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1"]),
       declared=st.booleans())
def test_manifest_text_is_never_decoded_lossily(tmp_path_factory, sources, encoding, declared):
    """Either every source reads back exactly as written, or the manifest is refused naming --encoding:
    never a silent merge of sources that differ only by characters lost in decoding."""
    from hypothesis import assume

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "source", "label"])
    w.writerows([f"{i}.png", s, "covid"] for i, s in enumerate(sources))
    try:
        data = buf.getvalue().encode(encoding)
    except UnicodeEncodeError:
        assume(False)
    m = tmp_path_factory.mktemp("enc") / "m.csv"
    m.write_bytes(data)
    try:
        rows, _ = I.manifest_rows(m, encoding=encoding if declared else None)
    except ValueError as e:
        assert not declared and "--encoding" in str(e)
        return
    assert [r.source for r in rows] == [s.strip() for s in sources]


@FUZZ
@given(text=st.one_of(st.text(max_size=12), st.from_regex(r"-?\d{1,4}([.,]\d{1,2})?\s*(Y|y|years|M|months|D)?",
                                                           fullmatch=True)))
def test_ages_are_a_plain_number_of_years_or_null(text):
    age = I._age(text)
    if age is not None:
        assert 0 <= age <= I.MAX_AGE
        assert "-" not in text and "," not in text and not any(u in text.lower() for u in ("m", "d", "w"))
