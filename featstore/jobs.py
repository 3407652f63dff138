"""The work of the commands whose job spans modules: the validated options of one command and a
`run()` that does it and returns what happened. A job never prints or exits: it reports progress
through `progress(label)` (a featstore.progress.Ticker), lines through `say`, and failures the user
must see as featstore.errors types, which the CLI maps to its exit status in one place.

Jobs that belong to one stage module live there (query.SqlJob, export.ExportJob,
duplicates.DuplicatesJob, probe.ProbeJob). These span modules that must not import each other (ingest
and its adapters, the two embed engines), reach the report (a sweep's headline, the report itself),
or join several stages (masks and the embeddings built on them; neighbours: the store's API, the index
and the ranking; the MLflow UI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from featstore.errors import Failed, Interrupted, NoSpace, UserError
from featstore.progress import silent
from featstore.store import open_for_command

if TYPE_CHECKING:
    from featstore.ingest import ColumnMap


def _quiet(line: str) -> None:
    pass


# --- ingest -----------------------------------------------------------------------------

@dataclass
class IngestJob:
    """`featstore ingest`: exactly one of a manifest, a folder or a dataset adapter into the store."""
    manifest: Path | None = None
    folder: Path | None = None
    dataset: str | None = None
    imgpath: Path | None = None
    csvpath: Path | None = None
    root: Path | None = None
    source: str | None = None
    columns: ColumnMap | None = None  # None: the standard column names
    allow_root: list[Path] = field(default_factory=list)
    encoding: str | None = None
    max_bytes: int = 512 * 1024 * 1024
    labels: str = "covid,non_covid"
    workers: int = 2
    db: Path | None = None

    def __post_init__(self):
        if len([x for x in (self.manifest, self.folder, self.dataset) if x]) != 1:
            raise UserError("give exactly one of --manifest, --folder, --dataset")
        if self.dataset and self.imgpath is None:
            raise UserError("--dataset needs --imgpath")

    def run(self, progress: Callable = silent):
        """(IngestReport, note). A manifest or folder that cannot be read is recorded and Failed;
        Ctrl-C keeps the committed batches and is Interrupted with what this run stored."""
        import duckdb

        from featstore import ingest as I

        allowed = I.ANY_LABEL if self.labels.strip() == "*" else [x for x in self.labels.split(",") if x.strip()]
        con = open_for_command(self.db)
        try:
            rows, pre, origin, note = self._rows(con)
            before = I.stored_counts(con)
            try:
                with progress("ingest") as prog:
                    prog.update(0, len(rows))
                    rep = I.ingest_rows(con, rows, origin, allowed, pre, self.workers, prog.advance, self.max_bytes)
            except I.StoreFullError as e:
                raise Failed(str(e)) from e
            except (KeyboardInterrupt, duckdb.InterruptException):
                raise Interrupted(f"{self._stored_since(con, before)}; run the same command to resume: rows "
                                  f"already in the store are skipped") from None
        finally:  # never leave the file open in this process: the next open (read-only) would be refused
            con.close()
        return rep, note

    def _rows(self, con):
        from featstore import ingest as I

        note = ""
        try:
            if self.manifest:
                origin = str(self.manifest.resolve())
                rows, pre = I.manifest_rows(self.manifest, self.columns, self.root, self.source, None, self.encoding,
                                            self.max_bytes, extra_roots=self.allow_root)
            elif self.folder:
                origin = str(self.folder.resolve())
                rows, pre = I.folder_rows(self.folder, extra_roots=self.allow_root)
            else:
                from featstore.adapters import adapter_rows

                origin = f"{self.dataset}:{self.imgpath.resolve()}"
                rows, missing = adapter_rows(self.dataset, self.imgpath, self.csvpath, self.source)
                pre = []
                if missing:
                    note = f"{missing} metadata rows have no image under {self.imgpath} (partial download?); skipped"
        except ValueError as e:
            what = str(self.manifest or self.folder or self.imgpath)
            I.record_failure(con, what, self.source or "", str(e), what)
            raise Failed(f"{what}: {e} (recorded in ingest_errors)") from e
        return rows, pre, origin, note

    @staticmethod
    def _stored_since(con, before) -> str:
        import duckdb

        from featstore.ingest import stored_counts

        try:
            try:
                con.rollback()  # an insert cut short is not kept; committed batches are
            except duckdb.Error:
                pass
            images, occ = stored_counts(con)
            return (f"this run stored {images - before[0]} new images and {occ - before[1]} manifest rows "
                    f"(the store holds {images} images, {occ} rows)")
        except duckdb.Error as e:
            return f"what this run stored could not be counted ({e})"


# --- embed ------------------------------------------------------------------------------

@dataclass
class EmbedJob:
    """`featstore embed`: every image without an embedding for (backbone, weights, preprocessing),
    on this machine (engine local) or through Ray Data (engine ray)."""
    backbone: str
    pooling: str | None = None
    preprocess: str = "original"
    masks: str = "auto"
    weights: str | None = None
    weights_dir: Path | None = None
    onnx_output: str | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    limit: int | None = None
    engine: str = "local"
    ray_address: str | None = None
    shards: Path = Path("featstore-shards")
    actors: int | None = None
    db: Path | None = None

    def __post_init__(self):
        if self.engine not in ("local", "ray"):
            raise UserError(f"--engine {self.engine}: choose local or ray")

    def run(self, progress: Callable = silent, say: Callable[[str], None] = _quiet):
        """The EmbedReport. say() gets the backbone's identity once it is built."""
        from featstore.embed import DiskFullError, is_disk_full

        try:
            con = open_for_command(self.db, must_exist=True)
        except UserError:
            raise
        except Exception as e:  # opening writes too (schema views): a store on a full disk fails here
            if not is_disk_full(e):
                raise
            raise NoSpace(str(DiskFullError.opening(e, self.db))) from e
        try:
            name, bb = self._backbone()
            say(f"{bb.name}: weights {bb.weights_id}, {bb.feature_dim}-d, {bb.spec.input_size}px, device {bb.device}")
            if bb.weights_source and bb.weights_source.get("said"):
                say(bb.weights_source["said"])
            return self._embed(con, name, bb, progress)
        finally:
            con.close()

    def _backbone(self):
        """(the set's backbone name, the built backbone)."""
        from featstore.backbones import canonical_name, create_backbone
        from featstore.weights import WeightsMissingError

        name = self.backbone
        try:
            # one name for the set however the pooling is given (--pooling mean == rad-dino@mean)
            if self.pooling or "@" in name:
                name = canonical_name(name, self.pooling, self.weights_dir)
            return name, create_backbone(name, weights=self.weights, weights_dir=self.weights_dir,
                                         device=self.device, output=self.onnx_output)
        except (WeightsMissingError, ValueError) as e:
            raise UserError(str(e)) from e
        except Exception as e:  # noqa: BLE001 - a file that is not what the backbone loads: one line, not a traceback
            if self.weights == "random-init":  # no file read: a fault of featstore's, its traceback helps
                raise
            if not self.weights:  # found through --weights-dir, the hub cache or a download
                raise UserError(f"the weights found for {name} are not usable (expected {_expected_weights(name)}): "
                                f"{type(e).__name__}: {str(e)[:300]}") from e
            raise UserError(f"--weights {self.weights}: not usable as weights for {name} "
                            f"(expected {_expected_weights(name)}): {type(e).__name__}: {str(e)[:300]}") from e

    def _embed(self, con, name, bb, progress):
        from featstore.embed import DecoderDied, DiskFullError
        from featstore.weights import WeightsMissingError

        with progress("embed") as prog:
            def tick(done, total):
                prog.update(done, total, rate=f"{done / max(prog.elapsed(), 1e-9):.1f} img/s")
            try:
                self._make_masks(con, bb)
                if self.engine == "ray":
                    from featstore.embed_ray import embed_ray

                    prog.stop()  # Ray Data draws its own progress bars
                    return embed_ray(con, bb, dict(name=name, weights=self.weights,
                                                   weights_dir=self.weights_dir, output=self.onnx_output),
                                     self.preprocess, self.batch_size, self.shards, self.ray_address, self.actors,
                                     self.limit)
                from featstore.embed import embed

                return embed(con, bb, self.preprocess, self.batch_size, self.workers, self.limit, tick)
            except KeyboardInterrupt:
                raise Interrupted("finished batches are stored; run the same command to resume") from None
            except (ValueError, WeightsMissingError) as e:
                raise UserError(str(e)) from e
            except DiskFullError as e:
                raise NoSpace(str(e)) from e
            except DecoderDied as e:
                raise Failed(str(e)) from e

    def _make_masks(self, con, bb):
        """Lung variants: the missing masks of the images this run will embed, made (`self.masks`)
        before it: the embed stage only reads stored masks."""
        from featstore.embed import default_workers, raise_if_disk_full, todo
        from featstore.masks import ensure_masks
        from featstore.preprocess import get_preprocess

        if not get_preprocess(self.preprocess).needs_mask:
            return
        try:
            ids = [i for i, _ in todo(con, bb, self.preprocess, self.limit)]
            if not ids:
                return
            if self.engine == "ray":
                workers, device = 1, "cpu"
            else:
                workers = max(1, default_workers() if self.workers is None else self.workers)
                device = "cuda" if bb.device == "cuda" else "cpu"
            ensure_masks(con, ids, method=self.masks, weights_dir=self.weights_dir, workers=workers, device=device)
        except Exception as e:  # a full disk: the same one line as embed's own writes
            raise_if_disk_full(con, e, bb, self.preprocess)
            raise


def _expected_weights(backbone: str) -> str:
    from featstore.backbones import get_spec

    family = get_spec(backbone).family
    return {"onnx": "an ONNX model file (.onnx)",
            "tv-densenet": "a torchvision DenseNet121 state dict (.pth)",
            "tv-resnet": "a torchvision ResNet50 state dict (.pth)"}.get(family, f"the {family} weight file")


# --- lung masks ---------------------------------------------------------------------------

@dataclass
class MasksJob:
    """`featstore masks`: the missing lung masks (all of them with `redo`). run() returns the
    MaskReport, the store's `lung_mask_summary` (Arrow) and how many lung-variant embeddings were
    deleted because their mask was re-made."""
    method: str = "auto"
    weights_dir: Path | None = None
    redo: bool = False
    workers: int = 2
    device: str = "cpu"
    db: Path | None = None

    def run(self, progress: Callable = silent):
        from featstore.masks import ensure_masks
        from featstore.weights import WeightsMissingError

        forgot = [0]

        def forget(con, ids):  # in the transaction that replaces the masks: never old vectors on new masks
            from featstore.embed import forget_lung_variants  # only when a redo needs it

            forgot[0] = forget_lung_variants(con, ids)

        con = open_for_command(self.db, must_exist=True)
        try:
            with progress("masks") as prog:
                try:
                    rep = ensure_masks(con, None, self.method, self.weights_dir, self.workers, self.redo,
                                       self.device, prog.update, on_replace=forget)
                except (ValueError, WeightsMissingError) as e:
                    raise UserError(str(e)) from e
            from featstore.api import Store

            return rep, Store.over(con).lung_mask_summary().to_arrow(), forgot[0]
        finally:
            con.close()


# --- the benchmark ------------------------------------------------------------------------

@dataclass
class StudyJob:
    """What `featstore sweep` and `featstore sweep-worker` share: a study config (a file or a shipped
    name), the store (default: the config's `db`), trials and a time limit per Optuna study."""
    config: Path
    db: Path | None = None
    trials: int | None = None
    timeout: float | None = None

    label = "study"
    on_interrupt = ""

    def run(self, progress: Callable = silent):
        """Load the config and run the study; a config, data or busy-store error is a UserError."""
        from featstore.options import TIMING, timing

        for name in TIMING:  # a bad one is one line, at once: before the model libraries load
            timing(name)
        from featstore.store import NotAStoreError, SnapshotError, StoreBusyError
        from featstore.sweep.config import StudyError, load_study
        try:
            st = load_study(self.config)
            db = self.db or (Path(st.db) if st.db else None)
            with progress(self.label) as prog:
                def tick(done, total, what):
                    prog.update(done, total, what, rate="studies")
                return self._run(st, db, tick)
        except (StudyError, FileNotFoundError, StoreBusyError, NotAStoreError, SnapshotError) as e:
            raise UserError(str(e)) from e
        except KeyboardInterrupt:
            raise Interrupted(self.on_interrupt) from None

    def _run(self, st, db, tick):
        raise NotImplementedError


@dataclass
class SweepJob(StudyJob):
    """`featstore sweep`: every protocol x head x embedding set, Optuna per fold; MLflow and result rows.
    run() returns the benchmark's SweepReport."""
    workers: int | None = None
    workdir: Path = Path(".")
    storage: str | None = None
    tracking_uri: str | None = None

    label = "sweep"
    on_interrupt = "finished trials are in the Optuna storage; run the same command to resume"

    def _run(self, st, db, tick):
        from featstore.sweep.run import run_study

        return run_study(st, db, self.workdir, self.tracking_uri, self.workers, self.trials, self.timeout, tick,
                         self.storage)


def sweep_headline(rows: list[dict]):
    """The seen-vs-unseen table of a sweep's rows, the oracle selections left out (they are no result)."""
    import polars as pl

    from featstore.report import headline

    return headline(pl.DataFrame(rows, infer_schema_length=None).filter(~pl.col("oracle")))


def sweep_warnings(rows: list[dict]) -> list[str]:
    return sorted({r["notes"] for r in rows if r.get("notes") and "WARNING" in r["notes"]})


@dataclass
class WorkerJob(StudyJob):
    """`featstore sweep-worker`: trials of studies nobody runs, on shared storage. run() returns
    (studies, trials)."""
    storage: str = ""
    workers: int = 1

    label = "worker"
    on_interrupt = "finished trials are in the shared storage"

    def _run(self, st, db, tick):
        from featstore.sweep.run import run_worker

        return run_worker(st, db, self.storage, self.workers, self.trials, self.timeout, tick)


# --- the report ----------------------------------------------------------------------------

@dataclass
class ReportResult:
    study: str
    sweep_id: str
    headline: object  # polars DataFrame
    files: list[Path]
    mlflow_run: str | None = None  # the sweep's MLflow run the report was attached to
    attach_error: str | None = None  # why it was not (a tracking problem never fails the report)
    warnings: list[str] = field(default_factory=list)  # what the report could not show (evidence a probe did not store)


@dataclass
class ReportJob:
    """`featstore report`: Markdown + HTML from a sweep's result rows, attached to its MLflow run."""
    out: Path = Path("report")
    study: str | None = None
    sweep_id: str | None = None
    tracking_uri: str | None = None  # the MLflow store to attach the report to (default: the sweep's); never read
    db: Path | None = None

    def run(self) -> ReportResult:
        from featstore.report import write_report
        from featstore.track import attach_report

        con = open_for_command(self.db, read_only=True)
        try:
            r = write_report(con, self.out, self.study, self.sweep_id)
        except ValueError as e:
            raise UserError(str(e)) from e
        finally:
            con.close()
        res = ReportResult(r["study"], r["sweep_id"], r["headline"], [self.out / "report.md", self.out / "report.html"],
                           warnings=r["warnings"])
        try:
            res.mlflow_run = attach_report(res.study, res.sweep_id, res.files, self.tracking_uri)
        except Exception as e:  # noqa: BLE001
            res.attach_error = str(e)
        return res



# --- neighbours -------------------------------------------------------------------------------

@dataclass
class NeighborsJob:
    """`featstore neighbors`: one image's k most similar images, or (summary) per source the share of
    k-NN that share the source vs the label. search: exact, ann or auto (by the set's size)."""
    image: str | None = None
    backbone: str | None = None  # default: the largest set for `preprocess`
    preprocess: str = "original"
    k: int = 10
    summary: bool = False
    search: str = "auto"
    db: Path | None = None

    def run(self, progress: Callable = silent, say: Callable[[str], None] = _quiet):
        """An Arrow table: the neighbours (the columns of sql/nearest_neighbours.sql) or the summary."""
        import polars as pl

        from featstore.api import Store

        con = open_for_command(self.db, read_only=True)
        try:
            sets = Store.over(con).embedding_sets().filter(pl.col("preprocess") == self.preprocess)
            backbone = self.backbone or self._largest(sets)
            have = sorted(set(sets["backbone"]))
            if backbone not in have:
                from featstore.suggest import unknown

                raise UserError(unknown(f"embedding set for --preprocess {self.preprocess}", backbone, have))
            if self.summary:
                return self._summary(con, backbone, progress, say)
            if self.image is None:
                raise UserError("give an IMAGE, or --summary")
            return self._nearest(con, backbone, int(sets.filter(pl.col("backbone") == backbone)["n_images"].sum()),
                                 say)
        finally:
            con.close()

    @staticmethod
    def _largest(sets) -> str:
        if sets.is_empty():
            raise UserError("no embeddings in the store (run `featstore embed`)")
        return sets.sort(["n_images", "backbone"], descending=[True, False])["backbone"][0]

    def _set(self, con, backbone):
        from featstore.ann import resolve_set

        try:
            return resolve_set(con, backbone, self.preprocess)
        except ValueError as e:
            raise UserError(str(e)) from e

    def _summary(self, con, backbone, progress, say):
        from featstore import ann as A
        from featstore.api import Store
        from featstore.neighbors import neighbor_summary

        es = self._set(con, backbone)
        con.close()
        with Store(self.db) as fs:
            Xn, meta = A.unit_vectors(fs.con, es)
            try:
                with progress("neighbours") as prog:
                    idx = A.knn(fs.con, es, Xn, meta["image_id"].to_numpy(), self.k, self.search, say=say,
                                progress=prog.update)
            except A.AnnError as e:
                raise UserError(str(e)) from e
        return neighbor_summary(None, meta["source"], meta["label"], self.k, idx=idx).to_arrow()

    def _nearest(self, con, backbone, n, say):
        from featstore import ann as A
        from featstore.api import Store
        from featstore.query import run_sql
        from featstore.store import sql_dir

        hits = Store.over(con).image_ids_like(self.image)
        if len(hits) != 1:
            raise UserError(f"'{self.image}' matches {len(hits)} images; give a longer image_id prefix or a path")
        if A.use_ann(self.search, n, A.QUERY_ANN_MIN):
            try:
                return A.nearest(con, self._set(con, backbone), hits[0], self.k, say=say)
            except A.AnnError as e:
                raise UserError(str(e)) from e
        return run_sql(con, (sql_dir() / "nearest_neighbours.sql").read_text(),
                       dict(image_id=hits[0], backbone=backbone, preprocess=self.preprocess, k=str(self.k)))


# --- the MLflow UI ------------------------------------------------------------------------------

@dataclass
class UiJob:
    """`featstore ui`: the MLflow UI on the sweeps' tracking store, on loopback unless `expose`.
    run() serves until the server ends (CommandError with its exit code) or Ctrl-C (returns 130)."""
    host: str = "127.0.0.1"
    port: int = 5000
    expose: bool = False
    tracking_uri: str | None = None

    def run(self, say: Callable[[str], None] = _quiet, warn: Callable[[str], None] = _quiet) -> int:
        import socket
        import subprocess

        from featstore.errors import CommandError
        from featstore.track import tracking_uri as default_uri
        from featstore.track import ui_url

        import os

        from featstore.track import MODEL_VIEW, sqlite_path

        host, port = self.host, self.port
        uri = self.tracking_uri or default_uri()
        db = sqlite_path(uri)
        if db is not None and not db.is_file():  # MLflow would create an empty store and serve it
            raise UserError(f"{db}: no MLflow store here (`featstore sweep` makes one in the folder it runs in); "
                            f"run `featstore ui` there, or give --tracking-uri")
        self._check_host(warn)
        studies = _studies(uri)  # before the server starts: the links are ready the moment it answers
        # a benchmark study's models before the domain probe's (forensics, not models a reader compares)
        studies = sorted(studies, key=lambda s: s[0] == "domain-probe")
        # MLflow's background job runners serve GenAI features featstore does not use
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        child = subprocess.Popen(_mlflow_ui_argv(uri, host, port), preexec_fn=_die_with_parent, env=env)
        probe = "::1" if host in ("::", "::0") else "127.0.0.1" if host == "0.0.0.0" else host
        try:
            ready = False
            while not ready and child.poll() is None:  # the URL is said once the server answers, not before
                try:
                    socket.create_connection((probe, port), timeout=1).close()
                    ready = True
                except OSError:
                    try:
                        child.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        pass
            if ready:
                base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
                # first, the newest study's models as the headline table (runs table, classic view)
                lines = [f"{name} — models: {ui_url(base, exp_id, MODEL_VIEW)}" for name, exp_id in studies[:1]]
                lines.append(f"MLflow UI for {uri} at {ui_url(base)} (Ctrl-C stops it)")
                lines += [f"  {name} — models: {ui_url(base, exp_id, MODEL_VIEW)}" for name, exp_id in studies[1:]]
                say("\n".join(lines))
                child.wait()
        except KeyboardInterrupt:
            child.terminate()
            child.wait()
            return 130
        raise CommandError(f"the MLflow UI stopped (exit code {child.returncode}); its messages are above",
                           child.returncode if child.returncode > 0 else 1)

    def _check_host(self, warn) -> None:
        """Refuse a non-loopback host without `expose`, and a port that cannot be bound: now, clearly,
        rather than print a URL and let MLflow exit 0 on a busy port."""
        import errno
        import socket

        host, port = self.host, self.port
        if not _loopback(host):
            if not self.expose:
                raise UserError(f"--host {host} would serve the MLflow UI, which has no login, to the network; add "
                                f"--expose to do that anyway, or use an SSH tunnel to 127.0.0.1")
            warn(f"WARNING: the MLflow UI has no authentication: anyone who can reach {host}:{port} can read and "
                 f"change every run and artifact")
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
                s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}"
                            + (" (another server, perhaps an MLflow UI, uses it; pick another --port)"
                               if e.errno == errno.EADDRINUSE else "")) from e


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
        from featstore.track import MODEL_VIEW, share_model_view

        client = MlflowClient(uri)
        exps = client.search_experiments(filter_string=f"tags.`{k}` = '{v}'", max_results=n,
                                         order_by=["last_update_time DESC"])
        for e in exps:  # a study tracked by an older featstore: its model-runs view, for the link
            if f"mlflow.sharedViewState.{MODEL_VIEW}" not in e.tags:
                share_model_view(client, e.experiment_id)
        return [(e.name, e.experiment_id) for e in exps]
    except Exception:  # noqa: BLE001 - links are a convenience; the UI is up
        return []


def _mlflow_ui_argv(uri: str, host: str, port: int) -> list[str]:
    import sys

    from featstore.track import artifacts_destination

    # one server process (MLflow's default is 4, too many on a laptop); its access log would bury the links
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1", "--uvicorn-opts", "--log-level warning"]
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
