"""The `featstore` command line: each command parses its options into the job object of its stage
(featstore/jobs.py, or query.SqlJob, export.ExportJob, ...), runs it and renders what it returns.
Commands neither exit nor catch: `Commands.invoke` is the one place where a featstore.errors type
becomes one line on stderr and its exit status, and a command's returned status becomes the exit."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from featstore.errors import CommandError, UserError

err = Console(stderr=True)


class Commands(TyperGroup):
    """The one error-to-exit mapping: a CommandError is one line (no traceback) and its exit_code; a
    usage error (unknown option, a misspelt name, a missing argument) is one line and exit 2, not a
    framed panel; a command that returns an int exits with it (its own verdict: some images failed,
    ...). Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            code = super().invoke(ctx)
        except CommandError as e:
            colour = "yellow" if e.exit_code == 130 else "red"
            err.print(f"[{colour}]{e.label}:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
            code = e.exit_code
        except Exception as e:  # a full disk is the user's to fix, wherever the write was: one line
            from featstore.errors import NoSpace, disk_full

            if not disk_full(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            err.print(f"[red]error:[/] disk full: {escape(first)}; nothing of this step was kept. Free space "
                      f"on that disk and run the command again", soft_wrap=True, highlight=False)
            code = NoSpace.exit_code
        return code

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            from typer import _click as click  # typer vendors click (and raises its exceptions)
        except ImportError:  # an older typer: click itself
            import click

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.NoArgsIsHelpError as e:  # `featstore` alone, `featstore sweep` alone: the help
            err.print(e.ctx.get_help() if e.ctx else str(e), soft_wrap=True, highlight=False, markup=False)
            code = 2
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            err.print(f"[red]error:[/] {escape(e.format_message())}{escape(hint)}", soft_wrap=True, highlight=False)
            code = e.exit_code
        except typer.Abort:
            err.print("[yellow]aborted[/]")
            code = 1
        sys.exit(code)


# plain help text (rich_markup_mode=None): usage reads `sweep [OPTIONS] CONFIG`, flags show no `<bool>`
app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="featstore: a chest X-ray feature store. Ingest once, embed once, query with SQL.")


def _print_version(ctx: typer.Context, value: bool):
    if value:
        import featstore

        typer.echo(f"featstore {featstore.__version__}")
        ctx.exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print featstore's version and exit")):
    pass


def _backbone_names() -> list[str]:
    from featstore.backbone_specs import REGISTRY  # names only: no model library imported

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
    from featstore.lungs import MASK_METHODS  # names only: featstore.masks imports the store

    return list(MASK_METHODS)


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
                        import textwrap

                        # "\b": click keeps these lines; wrapped here, never inside a hyphenated name
                        self.epilog = "\b\n" + textwrap.fill(
                            f"--{p.name.replace('_', '-')} is one of: {', '.join(names)}", 78,
                            break_on_hyphens=False, break_long_words=False)
            return super().format_help(ctx, formatter)
    return ChoicesHelp


DbOpt = typer.Option(None, "--db", envvar="FEATSTORE_DB", help="DuckDB file (default ./featstore.duckdb)")


def _job(cls, ctx: typer.Context):
    """The command's job: its options, by name, are the job's fields (a renamed one fails at once)."""
    return cls(**ctx.params)


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
    from featstore.ingest import ColumnMap
    from featstore.jobs import IngestJob

    job = IngestJob(manifest, folder, dataset, imgpath, csvpath, root, source,
                    ColumnMap(path_col, source_col, label_col, class_col, patient_col, view_col, sex_col, age_col,
                              mask_col), allow_root, encoding, max_bytes, labels, workers, db)
    rep, note = job.run(_progress)
    _print_ingest(rep, note)
    return 0 if rep.ok else 1


def _print_ingest(rep, note=""):
    from collections import Counter

    from featstore.ingest import clip

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
        for reason, n in Counter(_reason_kind(e.reason) for e in rep.errors).most_common(20):
            err.print(f"  {n:6d}  {escape(clip(reason, 200))}")
        for e in rep.errors[:10]:  # names are data, not markup; a huge cell is cut, saying its length
            err.print(f"    {escape(clip(e.file, 300))}: {escape(clip(e.reason, 300))}")


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0]


# --- embed --------------------------------------------------------------------

@app.command(cls=_help(backbone=_backbone_names, preprocess=_preprocess_names, masks=_mask_methods))
def embed(
    ctx: typer.Context,
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
    weights: Optional[str] = typer.Option(None, help="a weight file or a folder, for every family (a Hugging Face "
                                          "snapshot, a timm or open_clip file or the folder holding it), or "
                                          "'random-init' (recorded as such)"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR",
                                               help="look for weights here first: <org>--<name>/ snapshots, <name>/ "
                                                    "git clones, a hub cache, single files (`featstore backbones "
                                                    "--files NAME` says which)"),
    onnx_output: Optional[str] = typer.Option(None, help="generic onnx backbone: tensor to read"),
    batch_size: int = typer.Option(32, min=1),
    workers: Optional[int] = typer.Option(None, min=0, help="decode processes (default: cores, at most 4)"),
    device: str = typer.Option("auto", **_one_of("device", ["auto", "cpu", "cuda"])),
    limit: Optional[int] = typer.Option(None, min=1, help="embed at most N images this run (N >= 1; leave it out "
                                        "for all)"),
    engine: str = typer.Option("local", **_one_of("engine", ["local", "ray"]),
                               help="local (decode processes on this machine) or ray (Ray Data: every CPU/GPU of a cluster)"),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="ray: a cluster to join "
                                               "(auto, ray://head:10001); default: start Ray on this machine"),
    shards: Path = typer.Option(Path("featstore-shards"), help="ray: Parquet shards land here before the import"),
    actors: Optional[int] = typer.Option(None, min=1, help="ray: backbone replicas (default: one per GPU, else 1)"),
    db: Optional[Path] = DbOpt,
):
    """Embed every image that has no embedding yet for (backbone, weights, preprocessing)."""
    from featstore.jobs import EmbedJob

    rep = _job(EmbedJob, ctx).run(_progress, _say)
    err.print(f"embedded {rep.n_embedded} of {rep.n_todo} missing images in {rep.seconds:.1f}s "
              f"({rep.images_per_s:.1f} img/s); {len(rep.failed)} failed (listed in embed_errors)")
    if rep.torn_shards:
        err.print(f"{rep.torn_shards} shard file(s) torn by an earlier killed run were dropped; their images were "
                  f"embedded again")
    for image_id, path, reason in rep.failed[:10]:
        err.print(f"  {escape(path)}: {escape(reason)}")
    return 1 if rep.failed else 0


@app.command(cls=_help(method=_mask_methods))
def masks(
    ctx: typer.Context,
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
    from featstore.jobs import MasksJob
    from featstore.query import render

    rep, summary, n_invalidated = _job(MasksJob, ctx).run(_progress)
    if rep.note:
        err.print(f"note: {escape(rep.note)}")
    made = ", ".join(f"{n} {m}" for m, n in rep.by_method.items()) or "none needed"
    err.print(f"masks made: {made}; refused {len(rep.refused)} (they are left out of the lung variants)"
              + (f"; {n_invalidated} lung-variant embeddings deleted for re-made masks" if n_invalidated else ""))
    err.print(render(summary, "table"), end="", markup=False, highlight=False)  # already rendered: data stays text


@app.command()
def backbones(files: Optional[str] = typer.Option(None, "--files", metavar="NAME|all",
                                                  help="the files entry NAME (or all) needs, and where they go")):
    """List the backbone registry (--files NAME: which weight files an entry needs, and where to put them)."""
    from featstore.backbone_specs import FAMILIES, has_text_tower, list_backbones, poolings

    if files is not None:
        return _backbone_files(files)
    t = Table("name", "input", "ch", "dim", "pooling", "zero-shot", "weights", "licence", "what")
    t.columns[6].overflow = "fold"  # hub repositories are long; cut, they could not be copied
    for s in list_backbones():
        pool = "-"
        if s.family in FAMILIES:  # the default, then the others --pooling / <name>@<pooling> offers
            default, valid = poolings(s.name)
            others = [p for p in valid if p != default]
            pool = default + (f" (or {', '.join(others)})" if others else "") + "".join(
                f"; {a} = {b}" for a, b in s.options.get("pooling_aliases", {}).items())  # the same set
        t.add_row(s.name, str(s.input_size), str(s.channels), str(s.feature_dim or "?"), pool,
                  "text tower" if has_text_tower(s) else "", s.weights or "none", s.licence or "-", s.description)
    Console(width=220).print(t)
    err.print("which files each entry needs, and where they go: featstore backbones --files NAME (or all)")


def _backbone_files(name: str) -> None:
    from featstore.backbones import get_spec, list_backbones, needed_files

    specs = list_backbones() if name == "all" else [get_spec(_backbone_option()["parser"](name))]
    t = Table("name", "for", "files", "where they go")
    for c in t.columns[2:]:
        c.overflow = "fold"
    for s in specs:
        for what, f, where in needed_files(s):
            t.add_row(s.name, what, f, where)
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
    from featstore.query import SqlJob

    job = SqlJob(query, file, fmt, out, var, write, allow_read, db)
    table = job.run()
    if out:
        err.print(f"wrote {table.num_rows} rows to {escape(str(out))}")
    else:
        sys.stdout.write(job.text(table))


@app.command()
def export(ctx: typer.Context,
           parquet: Optional[Path] = typer.Option(None, help="new or empty output folder: Hive-partitioned "
                                                  "Parquet by source"),
           overwrite: bool = typer.Option(False, help="--parquet DIR may hold a previous featstore export: its "
                                          "files (listed in DIR/featstore-export.json) are replaced; nothing else "
                                          "is removed, and any other file where the export goes stops it"),
           snapshot: Optional[Path] = typer.Option(None, help="new folder: the whole store (DuckDB EXPORT DATABASE, "
                                                   "Parquet); sweep workers read it with --db DIR"),
           db: Optional[Path] = DbOpt):
    """Write metadata and embeddings as Parquet partitioned by source (readable without featstore),
    or a snapshot of the whole store for sweep workers. Never deletes what it did not write."""
    from featstore.export import ExportJob

    _job(ExportJob, ctx).run(say=_say)


# --- the benchmark ---------------------------------------------------------------------

@app.command()
def sweep(
    ctx: typer.Context,
    config: Path = typer.Argument(..., metavar="CONFIG", help="study config (YAML or TOML), or a shipped one "
                                  "by name: cxr_shortcut, synthetic_demo"),
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
    from featstore.jobs import SweepJob, sweep_headline, sweep_warnings

    rep = _job(SweepJob, ctx).run(_progress)
    err.print(f"sweep {rep.sweep_id}: {rep.n_tasks} Optuna studies, {rep.n_trials} trials, {rep.n_failed} failed, "
              f"{len(rep.rows)} result rows, {rep.seconds:.1f}s; MLflow {rep.mlflow_uri} (run {rep.parent_run_id})")
    err.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in rep.phases.items())
              + " (search/refit summed over workers)")
    _print_headline(sweep_headline(rep.rows))
    for note in sweep_warnings(rep.rows):
        err.print(f"[bold red]{escape(note)}[/]")
    return 1 if rep.n_failed else 0


@app.command("sweep-worker")
def sweep_worker(
    ctx: typer.Context,
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
    from featstore.jobs import WorkerJob

    n_studies, n_trials = _job(WorkerJob, ctx).run(_progress)
    err.print(f"worker done: ran {n_trials} trials in {n_studies} Optuna studies")


def _print_headline(df):
    t = Table(title="AUC [95% CI]: seen vs unseen sources")
    for c in df.columns:  # source names are data: Text, never rich markup
        t.add_column(Text(c), overflow="fold")
    for r in df.iter_rows():
        t.add_row(*[Text(str(v)) for v in r])
    Console(width=220).print(t)


@app.command()
def report(ctx: typer.Context,
           out: Path = typer.Option(Path("report"), help="output folder"),
           study: Optional[str] = typer.Option(None, help="study name (default: the latest swept)"),
           sweep_id: Optional[str] = typer.Option(None, help="a particular sweep (default: the study's latest)"),
           tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                                      help="the MLflow store the sweep wrote to, to attach the "
                                                      "report to (default: sqlite:///./mlflow.db); never read "
                                                      "for the report itself"),
           db: Optional[Path] = DbOpt):
    """Write Markdown + HTML (seen-vs-unseen tables, per-source metrics, ROC curves) from results rows."""
    from featstore.jobs import ReportJob

    r = _job(ReportJob, ctx).run()
    _print_headline(r.headline)
    for w in r.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}")
    err.print(f"report for {escape(r.study)} (sweep {r.sweep_id}): {escape(', '.join(map(str, r.files)))}")
    if r.attach_error is not None:
        err.print(f"[yellow]warning:[/] the report was not attached to the MLflow sweep run: {escape(r.attach_error)}")
    elif r.mlflow_run:
        err.print(f"attached to MLflow run {r.mlflow_run} (artifacts: report/)")


@app.command()
def ui(ctx: typer.Context,
       host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1 keeps it on this machine); any other "
                                "address needs --expose"),
       port: int = typer.Option(5000, min=1, max=65535),
       expose: bool = typer.Option(False, help="allow a --host other than loopback: the MLflow UI has NO login, so "
                                   "anyone who reaches HOST:PORT can read and change every run (prefer an SSH "
                                   "tunnel: ssh -L 5000:127.0.0.1:5000 server)"),
       tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI",
                                                  help="default: sqlite:///./mlflow.db")):
    """Start the MLflow UI on the sweeps' tracking store (on this machine only, unless --expose)."""
    from featstore.jobs import UiJob

    def warn(line):
        head, _, rest = line.partition(": ")
        err.print(f"[bold red]{escape(head)}:[/] {escape(rest)}")

    return _job(UiJob, ctx).run(say=_say, warn=warn)  # soft-wrapped: a link is never cut across lines


# --- shortcut forensics ---------------------------------------------------------------

@app.command(cls=_help(preprocess=_preprocess_names))
def probe(ctx: typer.Context,
          backbone: str = typer.Option(..., help="embedding set to probe (a backbone with embeddings in the store)"),
          preprocess: str = typer.Option("original", **_one_of("preprocessing", _preprocess_names)),
          positive: str = typer.Option("covid", help="the positive label (the GRL head's class target)"),
          grl: bool = typer.Option(True, help="also probe a cross-fitted GRL head's representation"),
          folds: int = 5, seed: int = 0, bootstrap: int = 500,
          maps: bool = typer.Option(True, help="t-SNE maps by source and label (raw and GRL) as MLflow artifacts"),
          db: Optional[Path] = DbOpt):
    """Domain probe (Trivedi et al. 2022): how well the SOURCE is predicted from the embeddings."""
    from featstore.probe import ProbeJob, summary
    from featstore.report import fmt_auc

    rows, sweep_id, run_id = _job(ProbeJob, ctx).run(_progress)
    t = Table("representation", "images", "sources", "macro AUC [95% CI]", "per source", title=(
        f"domain probe: {backbone}/{preprocess} (0.5 = source not recoverable)"))
    for r in summary(rows):
        t.add_row(Text(r["head"]), Text(r["test_set"]), str(r["n_sources"]),
                  fmt_auc(r["auc"], r["auc_lo"], r["auc_hi"]),
                  Text(", ".join(f"{s}: {a:.2f}" for s, a in r["per_source"].items())))
    Console(width=200).print(t)
    err.print(f"{len(rows)} rows in `results` (study 'domain-probe', sweep {sweep_id}); MLflow run {run_id}")

@app.command(cls=_help(backbone=_backbone_names, preprocess=_preprocess_names))
def attribution(ctx: typer.Context,
                backbone: str = typer.Option(..., **_backbone_option(), help="a torch backbone with a convolutional "
                                             "trunk (xrv-densenet121-*, tv-densenet121-imagenet, "
                                             "tv-resnet50-imagenet)"),
                weights: Optional[str] = typer.Option(None, help="a weight file, or random-init (seeded; recorded)"),
                weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR"),
                head: str = typer.Option("logreg", **_one_of("head", ["logreg", "grl_mlp"]),
                                         help="logreg: exact CAM; grl_mlp: Grad-CAM (captum)"),
                preprocess: str = typer.Option("original", **_one_of("preprocessing", _preprocess_names)),
                per_source: int = typer.Option(60, min=4, help="images per source (half of each label where it has "
                                               "both), a seeded draw of those with a stored lung mask"),
                folds: int = typer.Option(5, min=2, help="the head is fitted out-of-fold (patients grouped)"),
                seed: int = 0,
                out: Optional[Path] = typer.Option(Path("attribution"), help="folder for the maps (a figure per "
                                                   "source)"),
                figures: int = typer.Option(3, min=0, help="images per source in its figure"),
                device: str = typer.Option("cpu", **_one_of("device", ["cpu", "cuda"])),
                db: Optional[Path] = DbOpt):
    """Where the score comes from: the share of a head's CAM / Grad-CAM evidence inside the stored lung masks."""
    from featstore.attribution import AttributionJob

    r = _job(AttributionJob, ctx).run(_progress)
    s = r["summary"]
    t = Table("source", "label", "images", "in-lung share [95% CI]", "lung area", "enrichment",
              title=f"attribution inside the lungs: {head} on {backbone} ({r['rows']['method'][0]}; "
              f"weights {r['rows']['weights_id'][0].split(';')[0]})")
    for x in s.iter_rows(named=True):
        ci = f" [{x['lo']:.2f}, {x['hi']:.2f}]" if x["lo"] is not None else ""
        t.add_row(Text(x["source"]), Text(str(x["label"])), str(x["n"]), f"{x['in_lung_share']:.2f}{ci}",
                  f"{x['lung_fraction']:.2f}", f"{x['enrichment']:.2f}")
    Console(width=200).print(t)
    err.print(f"{r['rows'].height} rows in `attribution` (run {r['run_id']}); interval: t over images"
              + (f"; figures: {', '.join(str(p) for p in r['files'])}" if r["files"] else ""))


_EXACT_HELP = "exact search (reads every vector), whatever the set's size"
_ANN_HELP = ("the approximate index (usearch HNSW in <store>.ann/, built on first use, kept up to date), whatever "
             "the set's size; the default from 5,000 vectors (one image) / 8,000 (all images; featstore/ann.py)")


def _search_method(exact: bool, ann: bool) -> str:
    if exact and ann:
        raise UserError("--exact and --ann exclude each other; give one (or neither: by the set's size)")
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
    from featstore.jobs import NeighborsJob
    from featstore.query import render

    job = NeighborsJob(image, backbone, preprocess, k, summary, _search_method(exact_search, ann_search), db)
    sys.stdout.write(render(job.run(_progress, _say), "table"))


@app.command(cls=_help(preprocess=_preprocess_names))
def duplicates(backbone: Optional[str] = typer.Option(None, help="also compare embeddings of this set (cosine)"),
               preprocess: str = typer.Option("original", **_one_of("preprocessing", _preprocess_names)),
               cosine_min: float = typer.Option(0.98, help="embedding rule: cosine similarity at least this"),
               phash_max: int = typer.Option(10, min=0, max=256,
                                             help="perceptual rule: dHash Hamming distance at most this (of 256)"),
               sheet: Path = typer.Option(Path("near_duplicates.png"), help="contact sheet of the pairs"),
               workers: int = typer.Option(2, help="processes that hash images"),
               accept_implausible: bool = typer.Option(False, help="link the pairs even when they are implausibly "
                                                       "many or form a giant group"),
               exact_search: bool = typer.Option(False, "--exact", help="with --backbone: " + _EXACT_HELP),
               ann_search: bool = typer.Option(False, "--ann", help="with --backbone: " + _ANN_HELP),
               match: bool = typer.Option(True, help="also check wider candidates (k-NN, dHash <= 20) by "
                                          "local-feature matching: finds cropped, bordered, re-windowed copies"),
               db: Optional[Path] = DbOpt):
    """Exact and near-duplicate images within and across sources -> `near_duplicates` + a contact sheet."""
    from featstore.duplicates import DuplicatesJob
    from featstore.query import render

    job = DuplicatesJob(backbone, preprocess, cosine_min, phash_max, sheet, workers, accept_implausible,
                        _search_method(exact_search, ann_search), db, match)
    pairs, (groups, across), by = job.run(_progress, _say)
    err.print(f"exact copies (same bytes): {groups} groups, {across} across sources")
    err.print(f"near duplicates: {pairs.height} pairs (dHash <= {phash_max}"
              + (f" or cosine >= {cosine_min} on {backbone}/{preprocess}" if backbone else "")
              + (", or confirmed by local-feature matching" if match else "") + ")")
    sys.stdout.write(render(by, "table"))
    if pairs.height:
        err.print(f"contact sheet: {escape(str(sheet))}; all pairs: featstore sql \"SELECT * FROM near_duplicates\"")


# --- synthetic data and the demo ---------------------------------------------------

@app.command()
def synth(out: Path = typer.Option(Path("featstore-demo/data")), n_per_source: int = 120, seed: int = 0,
          no_confounders: bool = False, plant_bad: bool = False):
    """Write SYNTHETIC multi-source CXR-like images with planted source confounders."""
    from featstore.synth import generate

    m = generate(out, n_per_source=n_per_source, seed=seed, confounders=not no_confounders, plant_bad=plant_bad)
    err.print(f"SYNTHETIC images and manifest written: {m}")


@app.command()
def demo(out: Path = typer.Option(Path("featstore-demo"), help="working folder: new, empty, or an earlier "
                                  "demo's (only the files that demo made are replaced; anything else stops it)"),
         n_per_source: int = 150,
         weights_dir: Optional[Path] = typer.Option(None, envvar="FEATSTORE_WEIGHTS_DIR"),
         trials: Optional[int] = typer.Option(None, min=1, help="trials per Optuna study (default: the demo "
                                              "study's, per head); 1 for a quick run")):
    """Generate synthetic sources -> ingest -> embed -> SQL answers, in a few minutes on 2 cores."""
    from featstore.demo import run_demo

    return run_demo(out, n_per_source, weights_dir, trials)


def main():
    app()


if __name__ == "__main__":
    main()
