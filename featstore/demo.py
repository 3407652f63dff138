"""`featstore demo`: synthetic sources -> ingest -> embed -> SQL answers.

Runs anywhere in a few minutes on 2 cores: the images are SYNTHETIC (featstore.synth),
with planted source confounders, planted duplicates and planted bad files.
"""
from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from featstore import ingest as I
from featstore.backbones import create_backbone
from featstore.embed import embed
from featstore.query import render, run_sql
from featstore.store import connect, sql_dir
from featstore.synth import generate
from featstore.weights import WeightsMissingError

out = Console()

# what plant_bad puts in the manifest: each must come back as a recorded rejection
EXPECTED_REJECTIONS = {"truncated", "empty file", "not an image", "file not found", "empty label",
                       "unknown label", "duplicate manifest row"}


MARKER = ".featstore-demo.json"  # the files a demo made in its folder: the only ones a later demo removes


def claim_folder(folder: Path) -> None:
    """Make `folder` the demo's: new, empty, or holding only what an earlier demo made (listed in its
    MARKER), which is removed. Anything else in it refuses the demo before a file is touched."""
    from featstore.errors import UserError
    from featstore.ownfiles import is_own, listing, read_manifest, remove_own, shown, write_json_atomic

    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; give a new folder for the demo")
    if folder.is_dir() and os.listdir(folder):
        try:
            own = read_manifest(folder / MARKER)
        except ValueError as e:
            raise UserError(f"--out {folder}: {e}; nothing was removed") from e
        present = listing(folder, skip=(MARKER,))
        foreign = [rel for rel in present if own is None or not is_own(folder, rel, own)]
        if own is None or foreign:
            raise UserError(f"--out {folder} holds files featstore demo did not make ({shown(foreign or present)}); "
                            f"nothing was removed. Give a new or empty folder")
        remove_own(folder, own)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / MARKER, {"featstore_demo": 1, "files": {}, "complete": False})


def _record(folder: Path) -> None:
    """List every file now in the folder as the demo's own: it was empty of others when the demo began."""
    from featstore.ownfiles import listing, read_manifest, write_json_atomic

    if read_manifest(folder / MARKER) == {}:  # this run's marker (not one a user replaced meanwhile)
        write_json_atomic(folder / MARKER, {"featstore_demo": 1, "files": listing(folder, skip=(MARKER,
                                                                                              MARKER + ".tmp")),
                                            "complete": True})


def run_demo(folder: Path, n_per_source: int = 150, weights_dir: Path | None = None, trials: int | None = None) -> int:
    folder = Path(folder)
    claim_folder(folder)
    try:
        return _run_demo(folder, n_per_source, weights_dir, trials)
    finally:  # also when it fails or is interrupted: what it made so far is its own, for the next demo
        _record(folder)


def _run_demo(folder: Path, n_per_source: int, weights_dir: Path | None, trials: int | None) -> int:
    db = folder / "featstore.duckdb"
    out.rule("[bold]featstore demo — SYNTHETIC data[/]")
    out.print("4 synthetic sources with planted acquisition confounders (contrast curve, corner marker, border, "
              "noise, field of view) and COVID prevalence tied to source; see featstore/synth.py.")
    manifest = generate(folder / "data", n_per_source=n_per_source, seed=0, plant_bad=True, plant_duplicates=3)
    out.print(f"generated {escape(str(manifest))}")

    con = connect(db)
    rows, pre = I.manifest_rows(manifest)
    rep = I.ingest_rows(con, rows, str(manifest), I.DEFAULT_LABELS, pre, workers=2)
    out.print(f"ingest: {rep.n_rows} rows -> {rep.n_images} images, {rep.n_occurrences} occurrences; "
              f"{rep.n_duplicate_groups} duplicate groups ({rep.n_cross_source_groups} across sources, "
              f"{rep.n_label_conflicts} with conflicting labels); {len(rep.errors)} rejected")
    seen = {k for k in EXPECTED_REJECTIONS for e in rep.errors if e.reason.startswith(k) or k in e.reason}
    missing = EXPECTED_REJECTIONS - seen
    status = 0
    if missing or len(rep.errors) != len(EXPECTED_REJECTIONS):
        out.print(f"[red]planted bad inputs not all recorded as expected: missing {sorted(missing)}, "
                  f"{len(rep.errors)} rejections[/]")
        status = 1

    embedded = []
    for name in ("pixelstats", "mobilenetv3-nih-onnx"):
        try:
            bb = create_backbone(name, weights_dir=weights_dir)
        except WeightsMissingError as e:
            out.print(f"[yellow]skipped {name}:[/] {escape(str(e))}")
            continue
        r = embed(con, bb, "original", batch_size=32, workers=2)
        again = embed(con, bb, "original", batch_size=32, workers=2)
        out.print(f"embed {name}: {r.n_embedded} images in {r.seconds:.1f}s ({r.images_per_s:.0f} img/s); "
                  f"second run embedded {again.n_embedded}")
        embedded.append(name)

    for title, f, variables in [
        ("Images per source x label", "counts_by_source_label.sql", {}),
        ("Byte-identical files listed by two sources", "cross_source_duplicates.sql", {}),
        ("What failed to ingest (planted on purpose)", "ingest_failures.sql", {}),
        (f"Distance between source centroids ({embedded[-1] if embedded else '-'})", "source_centroids.sql",
         {"backbone": embedded[-1]} if embedded else {}),
        ("Nearest neighbours of one image", "nearest_neighbours.sql",
         {"backbone": embedded[-1], "k": "5"} if embedded else {}),
    ]:
        out.rule(title)
        out.print(f"[dim]featstore sql -f {escape(str(sql_dir() / f))} --db {escape(str(db))}[/]")
        text = (sql_dir() / f).read_text()
        tbl = run_sql(con, text, variables)
        if "paths" in tbl.column_names:
            tbl = tbl.drop_columns(["paths"])
        if "path" in tbl.column_names:
            tbl = tbl.drop_columns(["path"])
        print(render(tbl, "table"), end="", flush=True)
    con.close()
    status = max(status, _benchmark(folder, db, embedded, trials))
    out.rule()
    out.print(f"store: {escape(str(db))}  — try: featstore sql \"SELECT * FROM embedding_sets\" --db {escape(str(db))}")
    out.print(f"MLflow: featstore ui  (run in {escape(str(folder))}); report: "
              f"{escape(str(folder / 'report' / 'report.html'))}")
    return status


def _benchmark(folder: Path, db: Path, embedded: list[str], trials: int | None = None) -> int:
    """A small sweep over the synthetic sources: the shortcut shows as mixed >> unseen AUC."""
    import os

    from featstore.sweep.run import run_study
    from featstore.report import headline, markdown_table, write_report
    from featstore.sweep.config import load_study

    st = load_study(benchmark_config())
    st.backbones = [b for b in embedded if b in ("pixelstats", "mobilenetv3-nih-onnx")]
    out.rule("Benchmark: does the classifier generalise to sources it never saw? (SYNTHETIC)")
    out.print(f"[dim]featstore sweep synthetic_demo --db {db}{f' --trials {trials}' if trials else ''}[/]  "
              f"({', '.join(st.backbones)}; "
              f"heads {', '.join(h.name for h in st.heads)}; Optuna per fold, selection on training sources only)")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    rep = run_study(st, db, folder, uri, trials=trials)
    import polars as pl

    table = headline(pl.DataFrame(rep.rows, infer_schema_length=None).filter(~pl.col("oracle")))
    print(markdown_table(table), flush=True)
    import duckdb

    from featstore.probe import run_probe

    for bb in st.backbones:  # the evidence the report lays out (source probe, t-SNE map, neighbours)
        run_probe(db, bb, grl=False, tracking_uri=uri)
    with duckdb.connect(str(db), read_only=True) as con:
        write_report(con, folder / "report", st.study, rep.sweep_id)
    from featstore.track import attach_report

    attach_report(st.study, rep.sweep_id, [folder / "report" / "report.md", folder / "report" / "report.html"], uri)
    out.print(f"{rep.n_tasks} Optuna studies, {rep.n_trials} trials in {rep.seconds:.0f}s; "
              f"{len(rep.rows)} rows in the store's `results` table; MLflow: {uri}")
    out.print("Read it: 'mixed' mixes every source into train and test, so the source fingerprint predicts the "
              "label; the unseen-source columns are what a new hospital would see.")
    return 1 if rep.n_failed else 0


def benchmark_config() -> Path:
    """The demo's study config, shipped in the package (featstore/studies/synthetic_demo.yaml)."""
    from featstore.sweep.config import packaged_studies

    return packaged_studies()["synthetic_demo.yaml"]
