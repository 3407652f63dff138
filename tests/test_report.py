"""The study report as a researcher reads it: one self-contained HTML file, the verdict and
figures first, coloured cells, an interactive embedding map, the contact sheet as a grid, and a
report that fails writes nothing. Rendered once on a small synthetic sweep."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import polars as pl
import pytest

HOSTILE = "<script>alert(1)</script>"


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs, self.data, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        self._in = tag

    def handle_data(self, data):
        if self._in not in ("script", "style"):
            self.data.append(data)

    def handle_endtag(self, tag):
        self._in = None


@pytest.fixture(scope="module")
def rendered(synth_stores, tmp_path_factory):
    """A copy of the confounded store whose 4th source is named with HTML, a small sweep on it, two
    near-duplicate pairs (one across sources), and the report written from it."""
    from featstore.probe import run_probe
    from featstore.report import write_report
    from featstore.store import connect
    from featstore.sweep.config import parse_study
    from featstore.sweep.run import run_study

    tmp = tmp_path_factory.mktemp("report")
    db = tmp / "fs.duckdb"
    shutil.copy(synth_stores["confounded"], db)  # never write to the shared session store
    con = connect(db)
    for t in ("images", "occurrences"):
        con.execute(f"UPDATE {t} SET source = ? WHERE source = 'synthetic-d'", [HOSTILE])
    ids = con.execute("SELECT image_id, source, label FROM images ORDER BY source, image_id").fetchall()
    a, b, c = ids[0], ids[1], ids[-1]  # a, b: one source; c: the hostile one
    for (x, sx, lx), (y, sy, ly), cos, d, m in ((a, b, 0.95, 9, "phash"), (a, c, 0.99, 2, "both")):
        con.execute("INSERT INTO near_duplicates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, 0.98, 10, now())",
                    [x, y, sx, sy, lx, ly, cos, d, m])
    con.close()
    st = parse_study(dict(study="rep", backbones=["pixelstats"], heads={"logreg": {"trials": 1}},
                          protocols={"mixed": {"folds": 3}, "loso": {}}, bootstrap=50))
    run_study(st, db, tmp, f"sqlite:///{tmp / 'mlflow.db'}")
    # the evidence the report lays out: the probe computes and stores it (no GRL head here: test_honest.py)
    run_probe(db, "pixelstats", grl=False, n_boot=0, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    con = connect(db, read_only=True)
    try:
        r = write_report(con, tmp / "rep")
    finally:
        con.close()
    html = (tmp / "rep" / "report.html").read_text()
    p = _Tags()
    p.feed(html)
    return dict(db=db, out=tmp / "rep", r=r, html=html, tags=p, n_images=len(ids))


@pytest.mark.slow
def test_html_is_one_self_contained_file(rendered):
    tags = rendered["tags"]
    srcs = [v for t, k, v in tags.attrs if k == "src"]
    assert len(srcs) >= 4 and all(v.startswith("data:image/") for v in srcs), srcs[:3]
    assert not [v for t, k, v in tags.attrs if k == "href"]  # no stylesheet, no link out
    html = rendered["html"]
    assert 'src="http' not in html and "url(" not in html and "@import" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    # the folder holds the same figures for the Markdown, which links them as files beside it
    md = (rendered["out"] / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all((rendered["out"] / f).exists() for f in links)
    assert {"forest_unseen_auc.png", "dumbbell_seen_unseen.png", "near_duplicates.png"} <= set(links)


def test_verdict_and_figures_come_before_the_tables(rendered):
    html = rendered["html"]
    first_table = html.index("<table")
    verdict = html.index('class="card ')
    forest = html.index('alt="Per-source unseen AUC"')
    dumbbell = html.index('alt="Seen vs unseen sources"')
    assert verdict < forest < dumbbell < first_table
    assert re.search(r'<span class="badge v-(shortcut|drops|generalises|inconclusive)">', html)
    # coloured cells: AUC cells on the diverging scale, the verdict cell by verdict
    assert re.search(r'<td class="verdict v-(shortcut|drops|generalises|inconclusive)">', html)
    assert re.search(r'<td style="background:#[0-9a-f]{6}">0\.\d{3} \[', html)


def test_auc_colours_diverge_at_chance():
    from featstore.report import auc_colour

    def rgb(v):
        h = auc_colour(v)
        return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))
    low, mid, high = rgb(0.1), rgb(0.5), rgb(0.95)
    assert low[0] > low[2] and high[2] > high[0]  # red below chance, blue above
    assert min(mid) > 230  # near white at chance
    assert auc_colour(None) is None


def test_no_literal_markdown_in_html(rendered):
    text = "".join(rendered["tags"].data)
    assert not re.search(r"(?<![\w*])\*[^*\s][^*]*?\*(?![\w*])", text), re.findall(r"\*[^*\n]{0,30}\*", text)[:3]
    assert "**" not in text and "`" not in text
    assert "<em>uses the source?</em>" in rendered["html"] and "<strong>source-level</strong>" in rendered["html"]


def test_a_source_named_with_html_stays_text(rendered):
    html = rendered["html"]
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # the only script elements are the report's own: the map's data and its code
    assert html.count("<script") == 2
    md = (rendered["out"] / "report.md").read_text()
    assert HOSTILE not in md and "&lt;script&gt;" in md


def test_interactive_map_has_every_point_with_hover_data(rendered):
    html = rendered["html"]
    m = re.search(r'<div class="imap" data-n="(\d+)">', html)
    assert m and int(m.group(1)) == rendered["n_images"]
    blob = re.search(r'<script type="application/json" class="imap-data">(.*?)</script>', html, re.S).group(1)
    data = json.loads(blob)
    pts = data["points"]
    assert len(pts) == rendered["n_images"] == len({p["id"] for p in pts})
    for p in pts:
        assert 0 <= p["x"] <= 1 and 0 <= p["y"] <= 1
        assert p["thumb"].startswith("data:image/jpeg;base64,")
        assert p["source"] in data["palettes"]["source"] and p["label"] in data["palettes"]["label"]
    assert HOSTILE in {p["source"] for p in pts}  # the name survives as data, escaped only for the script element
    # two palettes that share no colour: a map by source is never mistaken for one by label
    assert not set(data["palettes"]["source"].values()) & set(data["palettes"]["label"].values())
    for word in ("wheel", "mousemove", "dblclick", "textContent"):
        assert word in html
    assert "innerHTML" not in html  # hover text is set as text, never parsed


@pytest.mark.slow
def test_the_map_subsample_is_capped_and_seeded(rendered):
    from featstore.api import open_store
    from featstore.probe import map_points

    with open_store(rendered["db"]) as fs:
        X, meta = fs.arrays("pixelstats")
    a, b = map_points(X, meta, seed=3, cap=40), map_points(X, meta, seed=3, cap=40)
    assert a.height == 40 and a["n_total"].unique().to_list() == [rendered["n_images"]]
    assert a.equals(b)  # the same images at the same coordinates
    assert not map_points(X, meta, seed=4, cap=40)["image_id"].equals(a["image_id"])
    # every representation of one set maps the same images (the subsample depends on size and seed only)
    assert map_points(X[:, ::-1] * 2, meta, seed=3, cap=40)["image_id"].equals(a["image_id"])


@pytest.mark.slow
def test_the_report_reads_the_stored_evidence_never_mlflow(rendered, tmp_path, monkeypatch):
    """The probe stored its evidence as rows; the report lays it out with the MLflow tracking store gone
    (and another one named by default, which it must not create), and says in one line what a probe
    that stored no map lacks."""
    from featstore.probe import run_probe
    from featstore.report import write_report
    from featstore.store import connect

    db = tmp_path / "fs.duckdb"
    shutil.copy(rendered["db"], db)
    with connect(db, read_only=True) as con:
        # per probe and representation (the session's stores may hold other probes, GRL ones among them):
        # one map of every image, one row per source
        pts, nb = (sorted({n for (n,) in con.execute(f"SELECT count(*) FROM {t} GROUP BY {g}").fetchall()})
                   for t, g in (("probe_map_points", "sweep_id, representation"), ("probe_neighbors", "sweep_id")))
    assert pts == [rendered["n_images"]] and nb == [4]
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    import mlflow.tracking._tracking_service.utils as MU  # any read of MLflow at all fails the test

    monkeypatch.setattr(MU, "_get_store", lambda *a, **k: pytest.fail("the report asked MLflow"))
    with connect(db, read_only=True) as con:
        r = write_report(con, tmp_path / "rep", "rep")
    assert r["warnings"] == [] and not elsewhere.exists()
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"pixelstats_original_domain_auc.png", "map_pixelstats_original.png"} <= files
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'class="imap"' in html and "same_source_chance" in html and "Not shown:" not in html

    monkeypatch.undo()  # a later probe without maps: its neighbours are shown, the missing map is named
    here = tmp_path / "probe-mlflow"
    here.mkdir()
    run_probe(db, "pixelstats", grl=False, maps=False, n_boot=0, tracking_uri=f"sqlite:///{here / 'm.db'}")
    shutil.rmtree(here)  # the tracking folder is gone: nothing the report needs was there
    with connect(db, read_only=True) as con:
        r = write_report(con, tmp_path / "rep2", "rep")
    assert len(r["warnings"]) == 1 and "t-SNE maps of pixelstats/original" in r["warnings"][0]
    html = (tmp_path / "rep2" / "report.html").read_text()
    assert 'class="imap"' not in html and "same_source_chance" in html
    assert (tmp_path / "rep2" / "report.md").read_text().count("Not shown:") == 1


def test_contact_sheet_puts_label_conflicts_cross_source_and_strong_pairs_first(rendered):
    from featstore.duplicates import sheet_order

    pairs = pl.DataFrame(dict(image_a=["a", "b", "c", "d"], image_b=["e", "f", "g", "h"],
                              source_a=["s", "s", "s", "s"], source_b=["s", "t", "s", "s"],
                              method=["phash", "phash", "both", "embedding"],
                              label_a=["x"] * 4, label_b=["x"] * 4,
                              cosine=[0.90, 0.91, 0.99, None], phash_distance=[8, 9, 1, 30]))
    assert sheet_order(pairs)["image_a"].to_list() == ["b", "c", "a", "d"]
    # a pair whose two images carry different labels comes before everything else
    conflict = pairs.with_columns(label_b=pl.Series(["x", "x", "x", "y"]))
    assert sheet_order(conflict)["image_a"].to_list() == ["d", "b", "c", "a"]
    html = rendered["html"]
    assert 'alt="contact sheet"' in html and "2 of 2 pairs" in html
    from PIL import Image

    w, h = Image.open(rendered["out"] / "near_duplicates.png").size
    assert w > h  # two pairs side by side in a grid, not one column


@pytest.mark.slow
def test_a_failing_report_writes_nothing(rendered, tmp_path, monkeypatch):
    from featstore import report
    from featstore.store import connect

    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.html").write_text("the previous report")

    def boom(*a, **k):
        raise RuntimeError("the map failed")
    # figures are already in the temporary folder when this fails
    monkeypatch.setattr("featstore.figures.map_png", boom)
    con = connect(rendered["db"], read_only=True)
    try:
        with pytest.raises(RuntimeError, match="the map failed"):
            report.write_report(con, out)
    finally:
        con.close()
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]
    assert (out / "report.html").read_text() == "the previous report"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep-")]


def test_templates_ship_with_the_package():
    import tomllib
    from importlib.resources import files
    from pathlib import Path

    for name in ("report.html.j2", "report.md.j2"):
        assert (files("featstore") / "templates" / name).is_file()
    py = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "templates/*.j2" in py["tool"]["setuptools"]["package-data"]["featstore"]
    assert "jinja2==3.1.6" in py["project"]["dependencies"]


def test_verdict_cards_are_comparable(rendered):
    """Every card has the same rows in the same order (verdict, seen → unseen, worst source, pairs, the two
    questions), whatever its verdict, and they carry the headline's numbers."""
    html = rendered["html"]
    cards = re.findall(r'<div class="card (?:v-\w+)?">(.*?)</dl>', html, re.S)
    head = rendered["r"]["headline"]
    assert len(cards) == head.height >= 1
    for c in cards:
        assert re.findall(r"<dt>([^<]+)</dt>", c) == ["seen → unseen", "worst source", "new pairs",
                                                      "uses the source?", "drop on new sources"]
        assert "(no leave-pair-out)" in c  # no leave-pair-out in this study
    row = head.row(0, named=True)
    unseen = row["LOSO mean per-source AUC (unseen)"].split(" ")[0]
    seen = row["seen: mean per-source AUC (mixed)"].split(" ")[0]  # the one seen, as in the table
    assert re.search(re.escape(seen) + r" \(mixed k-fold, mean of \d+ sources\) → <strong>" + re.escape(unseen), cards[0])
    uses = re.search(r'<dd class="uses-source">([^<]+)</dd>', cards[0]).group(1)
    assert uses.startswith(row["uses the source?"] + ":")
    drop = re.search(r'<dd class="drop">([^<]+)</dd>', cards[0]).group(1)
    assert drop.startswith(row["transfers?"] + ":")
    md = (rendered["out"] / "report.md").read_text()
    assert f"seen → unseen {seen}" in md


def test_intervals_spanning_the_scale_read_na():
    """Known answers: two held-out sources give a t interval clipped to [0, 1]: no information."""
    from featstore.report import _ci

    assert _ci(0.7, 0.0, 1.0) == "0.700, CI n/a"
    assert _ci(0.1, -1.0, 1.0, low=-1.0) == "0.100, CI n/a"
    assert _ci(0.1, 0.0, 0.3, low=-1.0) == "0.100 [0.000, 0.300]"
    assert _ci(0.7, 0.61, 0.8) == "0.700 [0.610, 0.800]" and _ci(0.7, None, None) == "0.700"


def test_near_duplicates_not_run_says_so(tmp_path):
    """An empty `near_duplicates` table is a search never run: 'not run', not '(none)', with the exact
    cross-source copies counted beside it."""
    from featstore.report import evidence_sections

    ev = dict(sets=[], warnings=[], neardup=dict(table=pl.DataFrame(), sheet=None, ran=False, exact_across=3))
    nd = evidence_sections(ev, tmp_path)["neardup"]
    assert "not run" in nd["note"] and "3 groups" in nd["note"] and "(none)" not in nd["html"]
    assert "not run" in nd["html"]


def test_near_duplicates_found_are_tabled(rendered):
    assert "Near duplicates (same picture, different bytes)" in rendered["html"]
    assert "Near-duplicate search: not run" not in rendered["html"]
