"""The `featstore` command line: a thin layer that wires the stage modules together."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="featstore: a chest X-ray feature store. Ingest once, embed once, query with SQL.")
err = Console(stderr=True)

def _backbone_names() -> list[str]:
    from featstore.backbones import REGISTRY

    return list(REGISTRY)


def _backbone_option() -> dict:
    """--backbone: a registry name, `<entry>@<pooling>` or a generic `hf:`/`timm:`/`open_clip:` name; the
    registry part is checked here ('did you mean'), the rest when the backbone is built (one line)."""
    opt = _one_of("backbone", _backbone_names)
    check = opt["parser"]

    def parse(value):
        if value.startswith(("hf:", "timm:", "open_clip:")):
            return value
        check(value.partition("@")[0])
        return value
    return dict(opt, parser=parse)


def _preprocess_names() -> list[str]:
    from featstore.preprocess import PREPROCESSINGS

    return list(PREPROCESSINGS)


def _mask_methods() -> list[str]:
    from featstore.masks import METHODS

    return list(METHODS)


def _one_of(kind: str, names) -> dict:
    """typer.Option arguments: the value must be one of names() (a registry, read when needed: the
    backbone registry imports torch), refused with a 'did you mean'; --help lists them (see _help)."""
    fixed = None if callable(names) else list(names)

    def parse(value):
        allowed = fixed or names()
        if value in allowed:
            return value
        from featstore.suggest import unknown

        raise typer.BadParameter(unknown(kind, value, allowed))
    return dict(parser=parse, metavar="[" + "|".join(fixed) + "]" if fixed else "NAME")


def _help(**lazy):
    """A command class whose --help lists the choices of options whose names come from a registry."""
    from typer.core import TyperCommand

    class ChoicesHelp(TyperCommand):
        def format_help(self, ctx, formatter):
            for p in self.params:
                if p.name in lazy and p.metavar == "NAME":
                    names = lazy[p.name]()
                    if len("|".join(names)) <= 100:
                        p.metavar = "[" + "|".join(names) + "]"
                    else:  # too long for the type column: listed below the options, full width
                        p.metavar = "NAME "
                        self.epilog = f"--{p.name.replace('_', '-')} is one of: {', '.join(names)}"
            return super().format_help(ctx, formatter)
    return ChoicesHelp


DbOpt = typer.Option(None, "--db", envvar="FEATSTORE_DB", help="DuckDB file (default ./featstore.duckdb)")


def _open(db, read_only=False, advice=True, must_exist=False):
    """must_exist: for commands that need ingested images; a missing store is refused, not created empty."""
    from featstore.store import StoreBusyError, connect, default_db_path

    if must_exist:
        try:
            path = Path(db) if db is not None else default_db_path()
        except FileNotFoundError as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            raise typer.Exit(2)
        if not path.exists():
            err.print(f"[red]error:[/] no featstore at {escape(str(path))}: run `featstore ingest` first "
                      f"(or pass --db / set FEATSTORE_DB to an existing store)", soft_wrap=True)
            raise typer.Exit(2)
    try:
        con = connect(db, read_only=read_only)
    except StoreBusyError as e:
        tip = ("\nMeanwhile a snapshot taken while the store was free can be read: `featstore export --snapshot "
               "DIR` (when idle), then --db DIR." if read_only and advice else "")
        err.print(f"[red]error:[/] {escape(str(e) + tip)}")
        raise typer.Exit(2)
    except FileNotFoundError as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2)
    # closed when the command ends, however it ends: a connection left to the garbage collector keeps
    # the file open in this process, and the next open with another configuration is refused
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(con.close)
    return con


def _progress(label: str):
    """The one progress display of long commands: a bar on a terminal, plain 10% lines in logs."""
    from featstore.progress import Ticker

    return Ticker(label, err)


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
    allow_root: list[Path] = typer.Option([], metavar="DIR",
                                          help="manifest paths (and --folder symlinks) may resolve inside this "
                                          "folder too (default: only inside --root / the manifest's folder / "
                                          "the --folder root); repeatable"),
    encoding: Optional[str] = typer.Option(None, help="the CSV manifest's text encoding, e.g. cp1252 "
                                           "(default: UTF-8, or UTF-16 with a BOM; anything else is refused)"),
    max_bytes: int = typer.Option(512 * 1024 * 1024, envvar="FEATSTORE_MAX_BYTES", min=1,
                                  help="files larger than this many bytes are refused unread"),
    labels: str = typer.Option("covid,non_covid", help="allowed labels, comma-separated; '*' allows any"),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="processes that hash and decode files"),
    db: Optional[Path] = DbOpt,
):
    """Ingest images: every file hashed, decoded once to check it, recorded with its metadata."""
    from rich.markup import escape

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
            rows, pre = I.manifest_rows(manifest, cols, root, source, roots, encoding, max_bytes)
        elif folder:
            origin = str(folder.resolve())
            rows, pre = I.folder_rows(folder, [folder, *allow_root] if allow_root else None)
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
        con.close()
        err.print(f"[red]error:[/] {escape(what)}: {escape(str(e))} (recorded in ingest_errors)", soft_wrap=True)
        raise typer.Exit(1)
    import duckdb

    before = _stored(con)
    try:
        with _progress("ingest") as prog:
            prog.update(0, len(rows))
            try:
                rep = I.ingest_rows(con, rows, origin, allowed, pre, workers, prog.advance, max_bytes)
            except I.StoreFullError as e:
                prog.stop()
                err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(1)
    except (KeyboardInterrupt, duckdb.InterruptException):
        _interrupted_ingest(con, before)
    finally:  # never leave the file open in this process: the next open (read-only) would be refused
        con.close()
    _print_ingest(rep, note)
    raise typer.Exit(0 if rep.ok else 1)


def _stored(con) -> tuple[int, int]:
    return con.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM occurrences)").fetchall()[0]


def _interrupted_ingest(con, before):
    """Ctrl-C: say what this run stored (committed work only) and exit 130."""
    import duckdb

    try:
        try:
            con.rollback()  # an insert cut short is not kept; committed batches are
        except duckdb.Error:
            pass
        images, occ = _stored(con)
        got = (f"this run stored {images - before[0]} new images and {occ - before[1]} manifest rows "
               f"(the store holds {images} images, {occ} rows)")
    except duckdb.Error as e:
        got = f"what this run stored could not be counted ({e})"
    finally:
        con.close()
    err.print(f"[yellow]interrupted:[/] {escape(got)}; run the same command to resume: rows already in the "
              f"store are skipped")
    raise typer.Exit(130)


def _print_ingest(rep, note=""):
    from collections import Counter

    from rich.markup import escape

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
    for n in ([note] if note else []) + rep.notes():
        err.print(f"note: {escape(n)}")
    if rep.errors:
        err.print(f"[yellow]{len(rep.errors)} rejected[/] (featstore sql \"SELECT * FROM open_ingest_errors\"):")
        for reason, n in Counter(_reason_kind(e.reason) for e in rep.errors).most_common():
            err.print(f"  {n:6d}  {escape(reason)}")
        for e in rep.errors[:10]:
            err.print(f"    {escape(e.file)}: {escape(e.reason)}")  # names are data, not markup


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


# --- embed --------------------------------------------------------------------

@app.command(cls=_help(backbone=_backbone_names, preprocess=_preprocess_names, masks=_mask_methods))
def embed(
    backbone: str = typer.Option(..., **_backbone_option(),
                                 help="from the registry (listed below; `featstore backbones` describes them), "
                                      "or hf:<repo>, timm:<name>, open_clip:<arch>"),
    pooling: Optional[str] = typer.Option(None, help="foundation models: cls (CLS token), mean (of the patch tokens) "
                                          "or pooler (the model's own pooled / projected embedding); default: the "
                                          "entry's. Part of the set's identity (recorded in every row's weights_id)"),
    preprocess: str = typer.Option("original", **_one_of("preprocessing", _preprocess_names),
                                   help="as decoded, histogram-equalised, CLAHE, or a lung variant (needs masks)"),
    masks: str = typer.Option("auto", **_one_of("mask method", _mask_methods),
                              help="lung variants: how missing lung masks are made (see `featstore masks`)"),
    weights: Optional[str] = typer.Option(None, help="weight file, or 'random-init' (recorded as such)"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR", help="look for weight files here first"),
    onnx_output: Optional[str] = typer.Option(None, help="generic onnx backbone: tensor to read"),
    batch_size: int = typer.Option(32, min=1),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader decode processes (default: cores, at most 4)"),
    device: str = typer.Option("auto", **_one_of("device", ["auto", "cpu", "cuda"])),
    limit: Optional[int] = typer.Option(None, min=1, help="embed at most N images this run (N >= 1; leave it out "
                                        "for all)"),
    engine: str = typer.Option("local", **_one_of("engine", ["local", "ray"]),
                               help="local (DataLoader on this machine) or ray (Ray Data: every CPU/GPU of a cluster)"),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="ray: a cluster to join "
                                               "(auto, ray://head:10001); default: start Ray on this machine"),
    shards: Path = typer.Option(Path("featstore-shards"), help="ray: Parquet shards land here before the import"),
    actors: Optional[int] = typer.Option(None, min=1, help="ray: backbone replicas (default: one per GPU, else 1)"),
    db: Optional[Path] = DbOpt,
):
    """Embed every image that has no embedding yet for (backbone, weights, preprocessing)."""
    from featstore.backbones import create_backbone
    from featstore.embed import DiskFullError, is_disk_full
    from featstore.embed import embed as run_embed
    from featstore.weights import WeightsMissingError

    try:
        con = _open(db, must_exist=True)
    except Exception as e:  # opening writes too (schema views): a store on a full disk fails here
        if not is_disk_full(e):
            raise
        err.print(f"error: {DiskFullError.opening(e, db)}", soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(3)
    try:
        from featstore.backbones import canonical_name

        # one name for the set however the pooling is given (--pooling mean == rad-dino@mean)
        backbone = canonical_name(backbone, pooling) if pooling or "@" in backbone else backbone
        bb = create_backbone(backbone, weights=weights, weights_dir=weights_dir, device=device, output=onnx_output)
    except (WeightsMissingError, ValueError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2)
    except Exception as e:  # noqa: BLE001 - a file that is not what the backbone loads: one line, not a traceback
        if not weights or weights == "random-init":
            raise
        err.print(f"[red]error:[/] --weights {escape(weights)}: not usable as weights for {escape(backbone)} "
                  f"(expected {_expected_weights(backbone)}): {type(e).__name__}: {escape(str(e)[:300])}")
        raise typer.Exit(2)
    err.print(f"{bb.name}: weights {bb.weights_id}, {bb.feature_dim}-d, {bb.spec.input_size}px, device {bb.device}")
    rep = None
    with _progress("embed") as prog:
        def tick(done, total):
            prog.update(done, total, rate=f"{done / max(prog.elapsed(), 1e-9):.1f} img/s")
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
        except DiskFullError as e:
            err.print(f"error: {e}", soft_wrap=True, markup=False, highlight=False)  # one line, paths verbatim
            raise typer.Exit(3)
    err.print(f"embedded {rep.n_embedded} of {rep.n_todo} missing images in {rep.seconds:.1f}s "
              f"({rep.images_per_s:.1f} img/s); {len(rep.failed)} failed (listed in embed_errors)")
    if rep.torn_shards:
        err.print(f"{rep.torn_shards} shard file(s) torn by an earlier killed run were dropped; their images were "
                  f"embedded again")
    for image_id, path, reason in rep.failed[:10]:
        err.print(f"  {path}: {reason}")
    raise typer.Exit(1 if rep.failed else 0)


def _expected_weights(backbone: str) -> str:
    from featstore.backbones import get_spec

    family = get_spec(backbone).family
    return {"onnx": "an ONNX model file (.onnx)",
            "tv-densenet": "a torchvision DenseNet121 state dict (.pth)",
            "tv-resnet": "a torchvision ResNet50 state dict (.pth)"}.get(family, f"the {family} weight file")


@app.command(cls=_help(method=_mask_methods))
def masks(
    method: str = typer.Option("auto", **_one_of("mask method", _mask_methods),
                               help="auto (manifest mask, else torchxrayvision PSPNet when its weights are "
                               "present, else classical-v1), manifest, xrv-pspnet or classical-v1"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR",
                                               help=f"where {'pspnet_chestxray_best_model_4.pth'} is looked for"),
    redo: bool = typer.Option(False, help="re-make existing masks (their lung-variant embeddings are deleted)"),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="processes for manifest and classical masks"),
    device: str = typer.Option("cpu", **_one_of("device", ["cpu", "cuda"]), help="for PSPNet"),
    db: Optional[Path] = DbOpt,
):
    """Make the lung masks the lung-ROI variants use, once per image, recording how each was made."""
    from featstore.masks import ensure_masks
    from featstore.weights import WeightsMissingError

    con = _open(db, must_exist=True)
    with _progress("masks") as prog:
        try:
            rep = ensure_masks(con, None, method, weights_dir, workers, redo, device, prog.update)
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
    from featstore.backbones import list_backbones, poolings
    from featstore.foundation import FAMILIES
    from featstore.zeroshot import has_text_tower

    t = Table("name", "input", "ch", "dim", "pooling", "zero-shot", "weights", "licence", "what")
    t.columns[6].overflow = "fold"  # hub repositories are long; cut, they could not be copied
    for s in list_backbones():
        pool = "-"
        if s.family in FAMILIES:  # the default, then the others --pooling / <name>@<pooling> offers
            default, valid = poolings(s.name)
            others = [p for p in valid if p != default]
            pool = default + (f" (or {', '.join(others)})" if others else "")
        t.add_row(s.name, str(s.input_size), str(s.channels), str(s.feature_dim or "?"), pool,
                  "text tower" if has_text_tower(s) else "", s.weights or "none", s.licence or "-", s.description)
    Console(width=220).print(t)


# --- query ----------------------------------------------------------------------

@app.command()
def sql(
    query: Optional[str] = typer.Argument(None, help="SQL text"),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="run the SQL in this file"),
    fmt: str = typer.Option("table", "--format", **_one_of("format", ["table", "csv", "json"])),
    out: Optional[Path] = typer.Option(None, help="write the answer to .csv, .parquet or .json"),
    var: list[str] = typer.Option([], metavar="NAME=VALUE", help="NAME=VALUE, read in SQL as getvariable('NAME')"),
    write: bool = typer.Option(False, help="let the SQL change the store (INSERT, UPDATE, CREATE, ...); "
                               "default: the store is opened read-only"),
    allow_read: list[Path] = typer.Option([], metavar="PATH",
                                          help="let the SQL read this file, or the files under this folder "
                                          "(read_csv, read_parquet, ...); repeatable. Nothing else outside the "
                                          "store is readable"),
    db: Optional[Path] = DbOpt,
):
    """Run SQL against the store and print the answer.

    The SQL runs sandboxed: it reads the store and nothing else (unless --allow-read), writes no file
    (COPY, EXPORT are refused; --out writes the answer), attaches no other database, installs or loads
    no extension, and cannot change DuckDB's settings. It changes the store only with --write."""
    import duckdb

    from featstore.query import OUT_SUFFIXES, render, run_user_sql, write as write_out

    if (query is None) == (file is None):
        err.print("[red]error:[/] give a QUERY or -f FILE")
        raise typer.Exit(2)
    if out and out.suffix.lower() not in OUT_SUFFIXES:  # before the SQL runs (it may --write)
        err.print(f"[red]error:[/] --out {escape(str(out))}: use a .csv, .parquet or .json file name")
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
        table = run_user_sql(con, text, variables, allow_read)
    except FileNotFoundError as e:  # an --allow-read path
        err.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2)
    except (duckdb.Error, ValueError) as e:
        err.print(f"[red]SQL error:[/] {escape(str(e))}")
        raise typer.Exit(1)
    finally:  # the sandbox holds for the database, not the connection: let it go with it
        con.close()
    if out:
        try:
            write_out(table, out)
        except (ValueError, OSError) as e:
            err.print(f"[red]error:[/] --out {escape(str(out))}: {escape(str(e))}")
            raise typer.Exit(2)
        err.print(f"wrote {table.num_rows} rows to {out}")
    else:
        try:
            sys.stdout.write(render(table, fmt))
        except ValueError as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(2)


@app.command()
def export(parquet: Optional[Path] = typer.Option(None, help="new or empty output folder: Hive-partitioned "
                                                  "Parquet by source"),
           overwrite: bool = typer.Option(False, help="--parquet DIR may hold a previous featstore export: its "
                                          "files (listed in DIR/featstore-export.json) are replaced; nothing else "
                                          "is removed, and any other file where the export goes stops it"),
           snapshot: Optional[Path] = typer.Option(None, help="new folder: the whole store (DuckDB EXPORT DATABASE, "
                                                   "Parquet); sweep workers read it with --db DIR"),
           db: Optional[Path] = DbOpt):
    """Write metadata and embeddings as Parquet partitioned by source (readable without featstore),
    or a snapshot of the whole store for sweep workers. Never deletes what it did not write."""
    from featstore.export import export_parquet
    from featstore.store import export_snapshot

    if not parquet and not snapshot:
        err.print("[red]error:[/] give --parquet DIR and/or --snapshot DIR")
        raise typer.Exit(2)
    con = _open(db, read_only=True, advice=False)
    if parquet:
        try:
            counts = export_parquet(con, parquet, overwrite=overwrite)
        except FileExistsError as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            raise typer.Exit(2)
        err.print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {escape(str(parquet))}")
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
    config: Path = typer.Argument(..., help="study config (YAML or TOML), or a shipped one by name: "
                                  "cxr_shortcut, synthetic_demo"),
    trials: Optional[int] = typer.Option(None, min=1, help="trials per Optuna study (overrides the config's per head)"),
    timeout: Optional[float] = typer.Option(None, help="seconds per Optuna study"),
    workers: Optional[int] = typer.Option(None, min=1, help="worker processes (default: the config's, else 1)"),
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
    trials: Optional[int] = typer.Option(None, min=1, help="as given to the coordinator"),
    timeout: Optional[float] = typer.Option(None, help="as given to the coordinator"),
    workers: int = typer.Option(1, min=1, help="processes on this machine"),
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
        with _progress(label) as prog:
            def tick(done, total, what):
                prog.update(done, total, what, rate="studies")
            return call(st, db, tick)
    except (StudyError, FileNotFoundError, StoreBusyError) as e:
        from rich.markup import escape  # the message quotes config values: never markup

        err.print(f"[red]error:[/] {escape(str(e))}")
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
           tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                                      help="the MLflow store the sweep and probes wrote to "
                                                      "(default: sqlite:///./mlflow.db)"),
           db: Optional[Path] = DbOpt):
    """Write Markdown + HTML (seen-vs-unseen tables, per-source metrics, ROC curves) from results rows."""
    from featstore.report import write_report

    con = _open(db, read_only=True)
    try:
        r = write_report(con, out, study, sweep_id, tracking_uri)
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    _print_headline(r["headline"])
    for w in r["warnings"]:
        err.print(f"[yellow]warning:[/] {escape(w)}")
    err.print(f"report for {r['study']} (sweep {r['sweep_id']}): {out / 'report.md'}, {out / 'report.html'}")
    _attach_report(r, out, tracking_uri)


def _attach_report(r: dict, out: Path, uri: str | None = None) -> None:
    """The report as artifacts of its sweep's MLflow run; a tracking problem never fails the report."""
    from featstore.track import attach_report

    try:
        rid = attach_report(r["study"], r["sweep_id"], [out / "report.md", out / "report.html"], uri)
    except Exception as e:  # noqa: BLE001
        err.print(f"[yellow]warning:[/] the report was not attached to the MLflow sweep run: {escape(str(e))}")
        return
    if rid:
        err.print(f"attached to MLflow run {rid} (artifacts: report/)")


@app.command()
def ui(host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1 keeps it on this machine); any other "
                                "address needs --expose"),
       port: int = typer.Option(5000, min=1, max=65535),
       expose: bool = typer.Option(False, help="allow a --host other than loopback: the MLflow UI has NO login, so "
                                   "anyone who reaches HOST:PORT can read and change every run (prefer an SSH "
                                   "tunnel: ssh -L 5000:127.0.0.1:5000 server)"),
       tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                                  help="default: sqlite:///./mlflow.db")):
    """Start the MLflow UI on the sweeps' tracking store (on this machine only, unless --expose)."""
    import socket
    import subprocess

    from featstore.track import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    if not _loopback(host):
        if not expose:
            err.print(f"[red]error:[/] --host {escape(host)} would serve the MLflow UI, which has no login, to the "
                      f"network; add --expose to do that anyway, or use an SSH tunnel to 127.0.0.1")
            raise typer.Exit(2)
        err.print(f"[bold red]WARNING:[/] the MLflow UI has no authentication: anyone who can reach "
                  f"{escape(host)}:{port} can read and change every run and artifact")
    try:  # fail now, clearly, rather than print a URL and let MLflow exit 0 on a busy port
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
            s.bind((host, port))
    except OSError as e:
        err.print(f"[red]error:[/] cannot serve on {escape(host)}:{port}: {escape(e.strerror or str(e))}"
                  + (" (another server, perhaps an MLflow UI, uses it; pick another --port)"
                     if e.errno == errno.EADDRINUSE else ""))
        raise typer.Exit(2)
    child = subprocess.Popen(_mlflow_ui_argv(uri, host, port), preexec_fn=_die_with_parent)
    probe = "::1" if host in ("::", "::0") else "127.0.0.1" if host == "0.0.0.0" else host
    try:
        ready = False
        while not ready and child.poll() is None:  # the URL is printed once the server answers, not before
            try:
                socket.create_connection((probe, port), timeout=1).close()
                ready = True
            except OSError:
                try:
                    child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
        if ready:
            from featstore.track import ui_url

            shown = f"[{host}]" if ":" in host else host
            base = f"http://{shown}:{port}"
            err.print(f"MLflow UI for {escape(uri)} at {escape(ui_url(base))} (Ctrl-C stops it)")
            for name, exp_id in _studies(uri):
                err.print(f"  {escape(name)}: {escape(ui_url(base, exp_id))}")
            child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        raise typer.Exit(130)
    err.print(f"[red]error:[/] the MLflow UI stopped (exit code {child.returncode}); its messages are above")
    raise typer.Exit(child.returncode if child.returncode > 0 else 1)


def _loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _studies(uri: str, n: int = 10) -> list[tuple[str, str]]:
    """(name, id) of the newest featstore experiments, for direct links to their runs."""
    from featstore.track import EXPERIMENT_KIND, sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return []
    try:
        from mlflow import MlflowClient

        (k, v), = EXPERIMENT_KIND.items()
        exps = MlflowClient(uri).search_experiments(filter_string=f"tags.`{k}` = '{v}'", max_results=n,
                                                   order_by=["last_update_time DESC"])
        return [(e.name, e.experiment_id) for e in exps]
    except Exception:  # noqa: BLE001 - links are a convenience; the UI is up
        return []


def _mlflow_ui_argv(uri: str, host: str, port: int) -> list[str]:
    from featstore.track import artifacts_destination

    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    dest = artifacts_destination(uri)  # SQLite: runs' mlflow-artifacts: locations resolve beside the database
    return argv + (["--artifacts-destination", str(dest)] if dest else [])


def _die_with_parent():
    """In the child before exec: SIGTERM when featstore dies, even by kill -9 (Linux; MLflow passes
    it on to its server processes)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --- shortcut forensics ---------------------------------------------------------------

@app.command(cls=_help(preprocess=_preprocess_names))
def probe(backbone: str = typer.Option(..., help="embedding set to probe (a backbone with embeddings in the store)"),
          preprocess: str = typer.Option("original", **_one_of("preprocessing", _preprocess_names)),
          positive: str = typer.Option("covid", help="the positive label (the GRL head's class target)"),
          grl: bool = typer.Option(True, help="also probe a cross-fitted GRL head's representation"),
          folds: int = 5, seed: int = 0, bootstrap: int = 500,
          maps: bool = typer.Option(True, help="t-SNE maps by source and label (raw and GRL) as MLflow artifacts"),
          db: Optional[Path] = DbOpt):
    """Domain probe (Trivedi et al. 2022): how well the SOURCE is predicted from the embeddings."""
    import polars as pl

    from featstore.probe import run_probe

    try:
        with _progress("probe") as prog:
            rows, sweep_id, run_id = run_probe(db, backbone, preprocess, positive, grl, maps, folds, seed, bootstrap,
                                               prog.update)
    except (ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
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


_EXACT_HELP = "exact search (reads every vector), whatever the set's size"
_ANN_HELP = ("the approximate index (usearch HNSW in <store>.ann/, built on first use, kept up to date), whatever "
             "the set's size; the default from 5,000 vectors (one image) / 8,000 (all images; featstore/ann.py)")


def _search_method(exact: bool, ann: bool) -> str:
    if exact and ann:
        err.print("[red]error:[/] --exact and --ann exclude each other; give one (or neither: by the set's size)")
        raise typer.Exit(2)
    return "exact" if exact else "ann" if ann else "auto"


def _say(line: str) -> None:
    err.print(escape(line), soft_wrap=True, highlight=False)


@app.command(cls=_help(preprocess=_preprocess_names))
def neighbors(image: Optional[str] = typer.Argument(None, help="image_id (or a unique prefix) or a file path"),
              backbone: Optional[str] = typer.Option(None, help="default: the largest embedding set"),
              preprocess: str = typer.Option("original", **_one_of("preprocessing", _preprocess_names)),
              k: int = 10,
              summary: bool = typer.Option(False, help="per source: share of k-NN sharing the source vs the label"),
              exact_search: bool = typer.Option(False, "--exact", help=_EXACT_HELP),
              ann_search: bool = typer.Option(False, "--ann", help=_ANN_HELP),
              db: Optional[Path] = DbOpt):
    """The k most similar images (cosine), or the store-wide source-vs-label neighbour summary. Exact for
    small sets; from a few thousand images on, an approximate index kept beside the store (--exact/--ann)."""
    from featstore.query import render, run_sql
    from featstore.store import sql_dir

    method = _search_method(exact_search, ann_search)
    con = _open(db, read_only=True)
    if backbone is None:
        row = con.execute("SELECT backbone FROM embedding_sets WHERE preprocess = ? "
                          "ORDER BY n_images DESC, backbone LIMIT 1", [preprocess]).fetchall()
        if not row:
            err.print("[red]error:[/] no embeddings in the store (run `featstore embed`)")
            raise typer.Exit(2)
        backbone = row[0][0]
    have = [b for (b,) in con.execute("SELECT DISTINCT backbone FROM embedding_sets WHERE preprocess = ? "
                                      "ORDER BY 1", [preprocess]).fetchall()]
    if backbone not in have:
        from featstore.suggest import unknown

        err.print(f"[red]error:[/] {escape(unknown(f'embedding set for --preprocess {preprocess}', backbone, have))}",
                  soft_wrap=True)
        raise typer.Exit(2)
    from featstore import ann as A

    def the_set():
        try:
            return A.resolve_set(con, backbone, preprocess)
        except ValueError as e:
            err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(2)

    if summary:
        es = the_set()
        from featstore.api import Store
        from featstore.neighbors import neighbor_summary

        con.close()
        with Store(db) as fs:
            Xn, meta = A.unit_vectors(fs.con, es)
            try:
                with _progress("neighbours") as prog:
                    idx = A.knn(fs.con, es, Xn, meta["image_id"].to_numpy(), k, method, say=_say,
                                progress=prog.update)
            except A.AnnError as e:
                err.print(f"[red]error:[/] {escape(str(e))}")
                raise typer.Exit(2)
        df = neighbor_summary(None, meta["source"], meta["label"], k, idx=idx)
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
    n = con.execute("SELECT sum(n_images) FROM embedding_sets WHERE backbone = ? AND preprocess = ?",
                    [backbone, preprocess]).fetchall()[0][0]
    if A.use_ann(method, n, A.QUERY_ANN_MIN):
        try:
            tbl = A.nearest(con, the_set(), hits[0][0], k, say=_say)
        except A.AnnError as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            raise typer.Exit(2)
    else:
        tbl = run_sql(con, (sql_dir() / "nearest_neighbours.sql").read_text(),
                      dict(image_id=hits[0][0], backbone=backbone, preprocess=preprocess, k=str(k)))
    sys.stdout.write(render(tbl, "table"))


@app.command(cls=_help(preprocess=_preprocess_names))
def duplicates(backbone: Optional[str] = typer.Option(None, help="also compare embeddings of this set (cosine)"),
               preprocess: str = typer.Option("original", **_one_of("preprocessing", _preprocess_names)),
               cosine_min: float = typer.Option(0.98, help="embedding rule: cosine similarity at least this"),
               phash_max: int = typer.Option(10, help="perceptual rule: dHash Hamming distance at most this (of 256)"),
               sheet: Path = typer.Option(Path("near_duplicates.png"), help="contact sheet of the pairs"),
               workers: int = typer.Option(2, help="processes that hash images"),
               accept_implausible: bool = typer.Option(False, help="link the pairs even when they are implausibly "
                                                       "many or form a giant group"),
               exact_search: bool = typer.Option(False, "--exact", help="with --backbone: " + _EXACT_HELP),
               ann_search: bool = typer.Option(False, "--ann", help="with --backbone: " + _ANN_HELP),
               db: Optional[Path] = DbOpt):
    """Exact and near-duplicate images within and across sources -> `near_duplicates` + a contact sheet."""
    from featstore.ann import AnnError
    from featstore.duplicates import ImplausibleDuplicates, contact_sheet, find
    from featstore.query import render

    method = _search_method(exact_search, ann_search)
    con = _open(db, must_exist=True)
    try:
        try:
            with _progress("duplicates") as prog:
                pairs = find(con, backbone, preprocess, cosine_min, phash_max, workers=workers,
                             accept_implausible=accept_implausible, progress=prog.update, search=method, say=_say)
        except (ImplausibleDuplicates, ValueError, AnnError) as e:
            err.print(f"[red]error:[/] {escape(str(e))}")
            raise typer.Exit(2)
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
         weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR"),
         trials: Optional[int] = typer.Option(None, min=1, help="trials per Optuna study (default: the demo "
                                              "study's, per head); 1 for a quick run")):
    """Generate synthetic sources -> ingest -> embed -> SQL answers, in a few minutes on 2 cores."""
    from featstore.demo import run_demo

    raise typer.Exit(run_demo(out, n_per_source, weights_dir, trials))


def main():
    app()


if __name__ == "__main__":
    main()
