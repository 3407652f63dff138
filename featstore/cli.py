"""The `featstore` command line: a thin layer that wires the stage modules together."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="featstore: a chest X-ray feature store. Ingest once, embed once, query with SQL.")
err = Console(stderr=True)

DbOpt = typer.Option(None, "--db", envvar="FEATSTORE_DB", help="DuckDB file (default ./featstore.duckdb)")


def _open(db, read_only=False):
    from featstore.store import StoreBusyError, connect

    try:
        return connect(db, read_only=read_only)
    except (StoreBusyError, FileNotFoundError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err, transient=False)


# --- ingest -----------------------------------------------------------------

@app.command()
def ingest(
    manifest: Optional[Path] = typer.Option(None, help="CSV or Parquet manifest"),
    folder: Optional[Path] = typer.Option(None, help="ROOT/<source>/<label>/ layout"),
    dataset: Optional[str] = typer.Option(None, help="public dataset adapter: covid19, nih, padchest, chexpert, rsna"),
    imgpath: Optional[Path] = typer.Option(None, help="with --dataset: the dataset's image folder"),
    csvpath: Optional[Path] = typer.Option(None, help="with --dataset: its metadata file, when not the bundled one"),
    root: Optional[Path] = typer.Option(None, help="manifest paths are relative to this (default: the manifest's folder)"),
    source: Optional[str] = typer.Option(None, help="fixed source name when the manifest has no source column"),
    path_col: str = "path", source_col: str = "source", label_col: str = "label", class_col: str = "class3",
    patient_col: str = "patient_id", view_col: str = "view", sex_col: str = "sex", age_col: str = "age",
    mask_col: str = typer.Option("mask_path", help="optional column naming a lung mask file per image"),
    allow_root: list[Path] = typer.Option([], help="manifest paths may resolve inside this folder too "
                                          "(default: only inside --root / the manifest's folder); repeatable"),
    labels: str = typer.Option("covid,non_covid", help="allowed labels, comma-separated; '*' allows any"),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="processes that hash and decode files"),
    db: Optional[Path] = DbOpt,
):
    """Ingest images: every file hashed, decoded once to check it, recorded with its metadata."""
    from featstore import ingest as I

    chosen = [x for x in (manifest, folder, dataset) if x]
    if len(chosen) != 1:
        err.print("[red]error:[/] give exactly one of --manifest, --folder, --dataset")
        raise typer.Exit(2)
    con = _open(db)
    allowed = I.ANY_LABEL if labels.strip() == "*" else [x for x in labels.split(",") if x.strip()]
    pre, note = [], ""
    try:
        if manifest:
            origin = str(manifest.resolve())
            cols = I.ColumnMap(path_col, source_col, label_col, class_col, patient_col, view_col, sex_col, age_col,
                               mask_col)
            roots = [root or manifest.parent, *allow_root] if allow_root else None
            rows, pre = I.manifest_rows(manifest, cols, root, source, roots)
        elif folder:
            origin = str(folder.resolve())
            rows, pre = I.folder_rows(folder)
        else:
            from featstore.adapters import adapter_rows

            if imgpath is None:
                err.print("[red]error:[/] --dataset needs --imgpath")
                raise typer.Exit(2)
            origin = f"{dataset}:{imgpath.resolve()}"
            rows, missing = adapter_rows(dataset, imgpath, csvpath, source)
            if missing:
                note = f"{missing} metadata rows have no image under {imgpath} (partial download?); skipped"
    except ValueError as e:
        what = str(manifest or folder or imgpath)
        I.record_failure(con, what, source or "", str(e), what)
        err.print(f"[red]error:[/] {what}: {e} (recorded in ingest_errors)")
        raise typer.Exit(1)
    with _progress() as prog:
        task = prog.add_task("ingest", total=len(rows), rate="")
        rep = I.ingest_rows(con, rows, origin, allowed, pre, workers, lambda n: prog.advance(task, n))
    _print_ingest(rep, note)
    raise typer.Exit(0 if rep.ok else 1)


def _print_ingest(rep, note=""):
    from collections import Counter

    t = Table(title="ingest", show_header=False)
    for k, v in [("rows read", rep.n_rows), ("new images", rep.n_new_images),
                 ("new occurrences", rep.n_new_occurrences), ("already in the store", rep.n_already),
                 ("rejected", len(rep.errors)), ("seconds", f"{rep.seconds:.1f}"),
                 ("store: images / occurrences", f"{rep.n_images} / {rep.n_occurrences}"),
                 ("store: groups of identical files", rep.n_duplicate_groups),
                 ("  of which span sources", rep.n_cross_source_groups),
                 ("  of which disagree on label", rep.n_label_conflicts)]:
        t.add_row(k, str(v))
    err.print(t)
    if note:
        err.print(f"note: {note}")
    if rep.errors:
        err.print(f"[yellow]{len(rep.errors)} rejected[/] (featstore sql \"SELECT * FROM open_ingest_errors\"):")
        for reason, n in Counter(_reason_kind(e.reason) for e in rep.errors).most_common():
            err.print(f"  {n:6d}  {reason}")
        for e in rep.errors[:10]:
            err.print(f"    {e.file}: {e.reason}")


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


# --- embed --------------------------------------------------------------------

@app.command()
def embed(
    backbone: str = typer.Option(..., help="registry name (featstore backbones)"),
    preprocess: str = typer.Option("original", help="original, histeq, clahe, or a lung variant: lungs-isolated, "
                                   "lungs-removed, lungs-framed, lungs-boxed-out, lung-crop"),
    masks: str = typer.Option("auto", help="lung variants: how missing lung masks are made "
                              "(auto, manifest, xrv-pspnet, classical-v1; see `featstore masks`)"),
    weights: Optional[str] = typer.Option(None, help="weight file, or 'random-init' (recorded as such)"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR", help="look for weight files here first"),
    onnx_output: Optional[str] = typer.Option(None, help="generic onnx backbone: tensor to read"),
    batch_size: int = 32,
    workers: Optional[int] = typer.Option(None, help="DataLoader decode processes (default: cores, at most 4)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    limit: Optional[int] = typer.Option(None, help="embed at most N images this run"),
    engine: str = typer.Option("local", help="local (DataLoader on this machine) or ray (Ray Data: every "
                               "CPU/GPU of a cluster)"),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="ray: a cluster to join "
                                               "(auto, ray://head:10001); default: start Ray on this machine"),
    shards: Path = typer.Option(Path("featstore-shards"), help="ray: Parquet shards land here before the import"),
    actors: Optional[int] = typer.Option(None, help="ray: backbone replicas (default: one per GPU, else 1)"),
    db: Optional[Path] = DbOpt,
):
    """Embed every image that has no embedding yet for (backbone, weights, preprocessing)."""
    from featstore.backbones import create_backbone
    from featstore.embed import embed as run_embed
    from featstore.weights import WeightsMissingError

    con = _open(db)
    try:
        bb = create_backbone(backbone, weights=weights, weights_dir=weights_dir, device=device, output=onnx_output)
    except (WeightsMissingError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    err.print(f"{bb.name}: weights {bb.weights_id}, {bb.feature_dim}-d, {bb.spec.input_size}px, device {bb.device}")
    rep = None
    with _progress() as prog:
        task = prog.add_task("embed", total=None, rate="")

        def tick(done, total):
            el = prog.tasks[0].elapsed or 1e-9
            prog.update(task, completed=done, total=total, rate=f"{done / el:.1f} img/s")
        try:
            if engine == "ray":
                from featstore.embed_ray import embed_ray

                prog.stop()  # Ray Data draws its own progress bars
                rep = embed_ray(con, bb, dict(name=backbone, weights=weights, weights_dir=weights_dir,
                                              output=onnx_output), preprocess, batch_size, shards, ray_address,
                                actors, limit, masks, weights_dir)
            elif engine == "local":
                rep = run_embed(con, bb, preprocess, batch_size, workers, limit, tick, masks=masks,
                                weights_dir=weights_dir)
            else:
                raise ValueError(f"--engine {engine}: choose local or ray")
        except KeyboardInterrupt:
            err.print("[yellow]interrupted:[/] finished batches are stored; run the same command to resume")
            raise typer.Exit(130)
        except (ValueError, WeightsMissingError) as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(2)
    err.print(f"embedded {rep.n_embedded} of {rep.n_todo} missing images in {rep.seconds:.1f}s "
              f"({rep.images_per_s:.1f} img/s); {len(rep.failed)} failed (listed in embed_errors)")
    if rep.torn_shards:
        err.print(f"{rep.torn_shards} shard file(s) torn by an earlier killed run were dropped; their images were "
                  f"embedded again")
    for image_id, path, reason in rep.failed[:10]:
        err.print(f"  {path}: {reason}")
    raise typer.Exit(1 if rep.failed else 0)


@app.command()
def masks(
    method: str = typer.Option("auto", help="auto (manifest mask, else torchxrayvision PSPNet when its weights are "
                               "present, else classical-v1), manifest, xrv-pspnet or classical-v1"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR",
                                               help=f"where {'pspnet_chestxray_best_model_4.pth'} is looked for"),
    redo: bool = typer.Option(False, help="re-make existing masks (their lung-variant embeddings are deleted)"),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="processes for manifest and classical masks"),
    device: str = typer.Option("cpu", help="cpu or cuda (PSPNet)"),
    db: Optional[Path] = DbOpt,
):
    """Make the lung masks the lung-ROI variants use, once per image, recording how each was made."""
    from featstore.masks import ensure_masks
    from featstore.weights import WeightsMissingError

    con = _open(db)
    with _progress() as prog:
        task = prog.add_task("masks", total=None, rate="")
        try:
            rep = ensure_masks(con, None, method, weights_dir, workers, redo, device,
                               lambda d, t: prog.update(task, completed=d, total=t))
        except (ValueError, WeightsMissingError) as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(2)
    if rep.note:
        err.print(f"note: {rep.note}")
    made = ", ".join(f"{n} {m}" for m, n in rep.by_method.items()) or "none needed"
    err.print(f"masks made: {made}; refused {len(rep.refused)} (they are left out of the lung variants)"
              + (f"; {rep.n_invalidated} lung-variant embeddings deleted for re-made masks" if rep.n_invalidated else ""))
    from featstore.query import render

    err.print(render(con.sql("SELECT * FROM lung_mask_summary").to_arrow_table(), "table"), end="")


@app.command()
def backbones():
    """List the backbone registry."""
    from featstore.backbones import list_backbones

    t = Table("name", "input", "ch", "dim", "weights", "what")
    for s in list_backbones():
        t.add_row(s.name, str(s.input_size), str(s.channels), str(s.feature_dim or "?"), s.weights or "none",
                  s.description)
    Console(width=200).print(t)


# --- query ----------------------------------------------------------------------

@app.command()
def sql(
    query: Optional[str] = typer.Argument(None, help="SQL text"),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="run the SQL in this file"),
    fmt: str = typer.Option("table", "--format", help="table, csv or json"),
    out: Optional[Path] = typer.Option(None, help="write the answer to .csv, .parquet or .json"),
    var: list[str] = typer.Option([], help="NAME=VALUE, read in SQL as getvariable('NAME')"),
    write: bool = typer.Option(False, help="open the store read-write (default read-only)"),
    db: Optional[Path] = DbOpt,
):
    """Run SQL against the store and print the answer."""
    import duckdb

    from featstore.query import render, run_sql, write as write_out

    if (query is None) == (file is None):
        err.print("[red]error:[/] give a QUERY or -f FILE")
        raise typer.Exit(2)
    text = file.read_text() if file else query
    variables = {}
    for v in var:
        if "=" not in v:
            err.print(f"[red]error:[/] --var {v}: expected NAME=VALUE")
            raise typer.Exit(2)
        k, val = v.split("=", 1)
        variables[k] = val
    con = _open(db, read_only=not write)
    try:
        table = run_sql(con, text, variables)
    except (duckdb.Error, ValueError) as e:
        err.print(f"[red]SQL error:[/] {e}")
        raise typer.Exit(1)
    if out:
        write_out(table, out)
        err.print(f"wrote {table.num_rows} rows to {out}")
    else:
        try:
            sys.stdout.write(render(table, fmt))
        except ValueError as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(2)


@app.command()
def export(parquet: Optional[Path] = typer.Option(None, help="output folder: Hive-partitioned Parquet by source"),
           snapshot: Optional[Path] = typer.Option(None, help="new folder: the whole store (DuckDB EXPORT DATABASE, "
                                                   "Parquet); sweep workers read it with --db DIR"),
           db: Optional[Path] = DbOpt):
    """Write metadata and embeddings as Parquet partitioned by source (readable without featstore),
    or a snapshot of the whole store for sweep workers."""
    from featstore.export import export_parquet
    from featstore.store import export_snapshot

    if not parquet and not snapshot:
        err.print("[red]error:[/] give --parquet DIR and/or --snapshot DIR")
        raise typer.Exit(2)
    con = _open(db, read_only=True)
    if parquet:
        counts = export_parquet(con, parquet)
        err.print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {parquet}")
    if snapshot:
        try:
            export_snapshot(con, snapshot)
        except FileExistsError as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(2)
        err.print(f"snapshot -> {snapshot} (read it with --db {snapshot})")


# --- the benchmark ---------------------------------------------------------------------

@app.command()
def sweep(
    config: Path = typer.Argument(..., help="study config (YAML or TOML), e.g. benchmarks/cxr_shortcut.yaml"),
    trials: Optional[int] = typer.Option(None, help="trials per Optuna study (overrides the config's per head)"),
    timeout: Optional[float] = typer.Option(None, help="seconds per Optuna study"),
    workers: Optional[int] = typer.Option(None, help="worker processes (default: the config's, else 1)"),
    workdir: Path = typer.Option(Path("."), help="Optuna journal goes to WORKDIR/optuna/<study>.journal"),
    storage: Optional[str] = typer.Option(None, envvar="FEATSTORE_OPTUNA_STORAGE",
                                          help="Optuna storage shared with `featstore sweep-worker` processes, "
                                          "e.g. postgresql://user@host:5432/optuna (default: the journal file)"),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow: a tracking server (http://host:5000) or database URL "
                                               "(default: sqlite:///./mlflow.db)"),
    db: Optional[Path] = DbOpt,
):
    """Run a study: every protocol x head x embedding set, Optuna per fold, MLflow + results rows."""
    from featstore.benchmark import run_study

    rep = _with_study(config, db, "sweep", "finished trials are in the Optuna storage; run the same command to resume",
                      lambda st, db, tick: run_study(st, db, workdir, tracking_uri, workers, trials, timeout, tick,
                                                     storage))
    import polars as pl

    from featstore.report import headline

    err.print(f"sweep {rep.sweep_id}: {rep.n_tasks} Optuna studies, {rep.n_trials} trials, {rep.n_failed} failed, "
              f"{len(rep.rows)} result rows, {rep.seconds:.1f}s; MLflow {rep.mlflow_uri} (run {rep.parent_run_id})")
    err.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in rep.phases.items())
              + " (search/refit summed over workers)")
    _print_headline(headline(pl.DataFrame(rep.rows, infer_schema_length=None).filter(~pl.col("oracle"))))
    for note in sorted({r["notes"] for r in rep.rows if r.get("notes") and "WARNING" in r["notes"]}):
        err.print(f"[bold red]{note}[/]")
    raise typer.Exit(1 if rep.n_failed else 0)


@app.command("sweep-worker")
def sweep_worker(
    config: Path = typer.Argument(..., help="the same study config the coordinator runs"),
    storage: str = typer.Option(..., envvar="FEATSTORE_OPTUNA_STORAGE", help="the shared Optuna storage URL"),
    trials: Optional[int] = typer.Option(None, help="as given to the coordinator"),
    timeout: Optional[float] = typer.Option(None, help="as given to the coordinator"),
    workers: int = typer.Option(1, help="processes on this machine"),
    db: Optional[Path] = typer.Option(None, envvar="FEATSTORE_DB",
                                      help="a snapshot folder (`featstore export --snapshot`) or the store"),
):
    """Join a sweep from any machine: run trials of studies nobody is running. `featstore sweep` with
    the same --storage refits the winners and writes MLflow and the results (it also runs trials)."""
    from featstore.benchmark import run_worker

    n_studies, n_trials = _with_study(config, db, "worker", "finished trials are in the shared storage",
                                      lambda st, db, tick: run_worker(st, db, storage, workers, trials, timeout, tick))
    err.print(f"worker done: ran {n_trials} trials in {n_studies} Optuna studies")


def _with_study(config, db, label, on_interrupt, call):
    """Load the study config and run call(study, db, tick) under a progress bar; a config, data or
    busy-store error exits 2 with its message."""
    from featstore.store import StoreBusyError
    from featstore.study import StudyError, load_study

    try:
        st = load_study(config)
        db = db or (Path(st.db) if st.db else None)
        with _progress() as prog:
            task = prog.add_task(label, total=None, rate="")

            def tick(done, total, what):
                prog.update(task, completed=done, total=total, description=f"{label} {what}", rate="studies")
            return call(st, db, tick)
    except (StudyError, FileNotFoundError, StoreBusyError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted:[/] {on_interrupt}")
        raise typer.Exit(130)


def _print_headline(df):
    t = Table(title="AUC [95% CI]: seen vs unseen sources")
    for c in df.columns:
        t.add_column(c, overflow="fold")
    for r in df.iter_rows():
        t.add_row(*[str(v) for v in r])
    Console(width=220).print(t)


@app.command()
def report(out: Path = typer.Option(Path("report"), help="output folder"),
           study: Optional[str] = typer.Option(None, help="study name (default: the latest swept)"),
           sweep_id: Optional[str] = typer.Option(None, help="a particular sweep (default: the study's latest)"),
           db: Optional[Path] = DbOpt):
    """Write Markdown + HTML (seen-vs-unseen tables, per-source metrics, ROC curves) from results rows."""
    from featstore.report import write_report

    con = _open(db, read_only=True)
    try:
        r = write_report(con, out, study, sweep_id)
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    _print_headline(r["headline"])
    err.print(f"report for {r['study']} (sweep {r['sweep_id']}): {out / 'report.md'}, {out / 'report.html'}")


@app.command()
def ui(host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1 keeps it on this machine)"),
       port: int = 5000,
       tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                                  help="default: sqlite:///./mlflow.db")):
    """Start the MLflow UI on the sweeps' tracking store."""
    import subprocess

    from featstore.track import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    err.print(f"MLflow UI for {uri} at http://{host}:{port}")
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", host, "--port", str(port)]))


# --- shortcut forensics ---------------------------------------------------------------

@app.command()
def probe(backbone: str = typer.Option(..., help="embedding set to probe"),
          preprocess: str = typer.Option("original"),
          positive: str = typer.Option("covid", help="the positive label (the GRL head's class target)"),
          grl: bool = typer.Option(True, help="also probe a cross-fitted GRL head's representation"),
          folds: int = 5, seed: int = 0, bootstrap: int = 500,
          maps: bool = typer.Option(True, help="t-SNE maps by source and label (raw and GRL) as MLflow artifacts"),
          db: Optional[Path] = DbOpt):
    """Domain probe (paper 003): how well the SOURCE is predicted from the embeddings."""
    import polars as pl

    from featstore.probe import run_probe

    try:
        rows, sweep_id, run_id = run_probe(db, backbone, preprocess, positive, grl, maps, folds, seed, bootstrap)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    df = pl.DataFrame(rows, infer_schema_length=None)
    t = Table("representation", "images", "sources", "macro AUC [95% CI]", "per source", title=(
        f"domain probe: {backbone}/{preprocess} (0.5 = source not recoverable)"))
    from featstore.report import fmt_auc

    for r in df.filter(pl.col("scope") == "all").iter_rows(named=True):
        ps = df.filter((pl.col("scope") != "all") & (pl.col("head") == r["head"])
                       & (pl.col("test_set") == r["test_set"]))
        t.add_row(r["head"], r["test_set"], str(len(r["test_sources"])), fmt_auc(r["auc"], r["auc_lo"], r["auc_hi"]),
                  ", ".join(f"{s}: {a:.2f}" for s, a in zip(ps["scope"], ps["auc"])))
    Console(width=200).print(t)
    err.print(f"{len(rows)} rows in `results` (study 'domain-probe', sweep {sweep_id}); MLflow run {run_id}")


@app.command()
def neighbors(image: Optional[str] = typer.Argument(None, help="image_id (or a unique prefix) or a file path"),
              backbone: Optional[str] = typer.Option(None, help="default: the largest embedding set"),
              preprocess: str = "original", k: int = 10,
              summary: bool = typer.Option(False, help="per source: share of k-NN sharing the source vs the label"),
              db: Optional[Path] = DbOpt):
    """The k most similar images (DuckDB, cosine), or the store-wide source-vs-label neighbour summary."""
    from featstore.query import render, run_sql
    from featstore.store import sql_dir

    con = _open(db, read_only=True)
    if backbone is None:
        row = con.execute("SELECT backbone FROM embedding_sets WHERE preprocess = ? "
                          "ORDER BY n_images DESC, backbone LIMIT 1", [preprocess]).fetchall()
        if not row:
            err.print("[red]error:[/] no embeddings in the store (run `featstore embed`)")
            raise typer.Exit(2)
        backbone = row[0][0]
    if summary:
        from featstore.api import Store
        from featstore.neighbors import neighbour_summary

        con.close()
        with Store(db) as fs:
            X, meta = fs.arrays(backbone, preprocess)
        df = neighbour_summary(X, meta["source"], meta["label"], k)
        sys.stdout.write(render(df.to_arrow(), "table"))
        return
    if image is None:
        err.print("[red]error:[/] give an IMAGE, or --summary")
        raise typer.Exit(2)
    hits = con.execute("SELECT DISTINCT image_id FROM occurrences WHERE image_id LIKE ? || '%' OR path = ? "
                       "OR path LIKE '%/' || ?", [image, str(Path(image).resolve()), image]).fetchall()
    if len(hits) != 1:
        err.print(f"[red]error:[/] '{image}' matches {len(hits)} images; give a longer image_id prefix or a path")
        raise typer.Exit(2)
    tbl = run_sql(con, (sql_dir() / "nearest_neighbours.sql").read_text(),
                  dict(image_id=hits[0][0], backbone=backbone, preprocess=preprocess, k=str(k)))
    sys.stdout.write(render(tbl, "table"))


@app.command()
def duplicates(backbone: Optional[str] = typer.Option(None, help="also compare embeddings of this set (cosine)"),
               preprocess: str = "original",
               cosine_min: float = typer.Option(0.98, help="embedding rule: cosine similarity at least this"),
               phash_max: int = typer.Option(10, help="perceptual rule: dHash Hamming distance at most this (of 256)"),
               sheet: Path = typer.Option(Path("near_duplicates.png"), help="contact sheet of the pairs"),
               workers: int = typer.Option(2, help="processes that hash images"),
               db: Optional[Path] = DbOpt):
    """Exact and near-duplicate images within and across sources -> `near_duplicates` + a contact sheet."""
    from featstore.duplicates import contact_sheet, find
    from featstore.query import render

    con = _open(db)
    try:
        pairs = find(con, backbone, preprocess, cosine_min, phash_max, workers=workers)
        exact = con.sql("SELECT count(*) FILTER (WHERE cross_source) AS across, count(*) AS all_groups "
                        "FROM duplicate_groups").fetchall()[0]
        by = con.sql("SELECT * FROM near_duplicate_pairs_by_source").to_arrow_table()
        if pairs.height:
            contact_sheet(con, sheet, pairs)
    finally:
        con.close()
    err.print(f"exact copies (same bytes): {exact[1]} groups, {exact[0]} across sources")
    err.print(f"near duplicates: {pairs.height} pairs (dHash <= {phash_max}"
              + (f" or cosine >= {cosine_min} on {backbone}/{preprocess}" if backbone else "") + ")")
    sys.stdout.write(render(by, "table"))
    if pairs.height:
        err.print(f"contact sheet: {sheet}; all pairs: featstore sql \"SELECT * FROM near_duplicates\"")


# --- synthetic data and the demo ---------------------------------------------------

@app.command()
def synth(out: Path = typer.Option(Path("featstore-demo/data")), n_per_source: int = 120, seed: int = 0,
          no_confounders: bool = False, plant_bad: bool = False):
    """Write SYNTHETIC multi-source CXR-like images with planted source confounders."""
    from featstore.synth import generate

    m = generate(out, n_per_source=n_per_source, seed=seed, confounders=not no_confounders, plant_bad=plant_bad)
    err.print(f"SYNTHETIC images and manifest written: {m}")


@app.command()
def demo(out: Path = typer.Option(Path("featstore-demo"), help="working folder (replaced)"),
         n_per_source: int = 150,
         weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR")):
    """Generate synthetic sources -> ingest -> embed -> SQL answers, in a few minutes on 2 cores."""
    from featstore.demo import run_demo

    raise typer.Exit(run_demo(out, n_per_source, weights_dir))


def main():
    app()


if __name__ == "__main__":
    main()
