"""Ingest: manifest rows / folders / dataset adapters -> images, occurrences, ingest_errors.

Each image is identified by the sha256 of its bytes, so re-ingesting is a no-op and
the same file listed under two sources is one image with two occurrences. A bad row
never stops the run: it is written to ingest_errors with the file and the reason.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

import polars as pl

from featstore.decode import DecodeError, decode_bytes, read_file
from featstore.store import insert_frame as _insert

DEFAULT_LABELS = ("covid", "non_covid")
ANY_LABEL = "*"

# Standard column names; a manifest with other names maps them with ColumnMap.
FIELDS = ("path", "source", "label", "class", "patient_id", "view", "sex", "age")


@dataclass
class ColumnMap:
    path: str = "path"
    source: str = "source"
    label: str = "label"
    klass: str = "class3"
    patient_id: str = "patient_id"
    view: str = "view"
    sex: str = "sex"
    age: str = "age"
    mask: str = "mask_path"   # optional lung mask file per image (featstore/masks.py)

    def columns(self) -> dict[str, str]:
        return {"path": self.path, "source": self.source, "label": self.label, "class": self.klass,
                "patient_id": self.patient_id, "view": self.view, "sex": self.sex, "age": self.age,
                "mask": self.mask}


@dataclass
class Row:
    """One candidate occurrence, before its file is read."""
    path: str            # absolute
    source: str
    label: str
    origin: str
    display: str = ""    # the path as the user wrote it
    row_number: int | None = None
    klass: str | None = None
    patient_id: str | None = None
    view: str | None = None
    sex: str | None = None
    age: float | None = None
    extra: dict | None = None


@dataclass
class Rejection:
    file: str
    source: str
    reason: str
    row_number: int | None = None


@dataclass
class IngestReport:
    origin: str
    run_id: int = 0
    n_rows: int = 0
    n_new_images: int = 0
    n_new_occurrences: int = 0
    n_already: int = 0
    errors: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    # store-wide facts after this ingest
    n_images: int = 0
    n_occurrences: int = 0
    n_duplicate_groups: int = 0
    n_cross_source_groups: int = 0
    n_label_conflicts: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def _clean(v) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _age(v) -> float | None:
    s = _clean(v)
    if s is None:
        return None
    digits = "".join(ch for ch in s if ch.isdigit() or ch == ".")
    try:
        a = float(digits)
    except ValueError:
        return None
    return a if math.isfinite(a) else None


def normalise_label(v) -> str | None:
    s = _clean(v)
    return s.lower() if s else None


# --- sources of rows ---------------------------------------------------------

def read_manifest(path: str | Path) -> pl.DataFrame:
    p = Path(path)
    if not p.exists():
        raise ValueError("manifest not found")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df = pl.read_parquet(p)
            return df.with_columns(pl.all().cast(pl.Utf8))
        return pl.read_csv(p, infer_schema=False, encoding="utf8-lossy", truncate_ragged_lines=False)
    except Exception as e:  # polars raises ComputeError, NoDataError, ... for unreadable input
        raise ValueError(f"unreadable manifest: {type(e).__name__}: {e}") from e


def _inside(p: Path, roots: list[Path]) -> bool:
    return any(p == r or p.is_relative_to(r) for r in roots)


def manifest_rows(manifest: str | Path, cols: ColumnMap | None = None, root: str | Path | None = None,
                  source: str | None = None, allowed_roots: list[str | Path] | None = None
                  ) -> tuple[list[Row], list[Rejection]]:
    """Rows of a CSV/Parquet manifest. Paths are relative to the manifest's folder unless `root`.

    A path that resolves (symlinks followed) outside the allowed roots - by default the folder paths
    are relative to - is refused and recorded, never read: a manifest must not make featstore open
    `../../etc/passwd`. `allowed_roots` (CLI --allow-root) widens that on purpose."""
    cols = cols or ColumnMap()
    manifest = Path(manifest)
    origin = str(manifest.resolve())
    df = read_manifest(manifest)
    names = cols.columns()
    missing = [names[k] for k in ("path", "label") if names[k] not in df.columns]
    if source is None and names["source"] not in df.columns:
        missing.append(names["source"] + " (or pass a fixed --source)")
    if missing:
        raise ValueError(f"manifest lacks column(s) {', '.join(missing)}; it has {', '.join(df.columns)}")
    base = Path(root) if root else manifest.parent
    allowed = [Path(r).resolve() for r in (allowed_roots or [base])]
    mapped = {v for k, v in names.items() if v in df.columns}
    rows: list[Row] = []
    refused: list[Rejection] = []
    for i, rec in enumerate(df.iter_rows(named=True), start=1):
        raw_path = _clean(rec.get(names["path"]))
        src = source or _clean(rec.get(names["source"])) or ""
        p = (base / raw_path) if raw_path else None
        if p is not None:
            try:
                p = p.resolve()
            except (OSError, ValueError) as e:  # NUL bytes, names too long for the OS
                refused.append(Rejection(repr(raw_path)[:300], src, f"unusable path: {e}", i))
                continue
            if not _inside(p, allowed):
                refused.append(Rejection(raw_path[:300], src, "path outside the allowed root "
                                         f"({', '.join(map(str, allowed))}): refused; --allow-root DIR permits it", i))
                continue
        extra = {k: v for k, v in rec.items() if k not in mapped and v not in (None, "")}
        mask = _clean(rec.get(names["mask"]))
        if mask:  # resolved and fenced like the image path, so masks are found from any working directory
            try:
                mp = (base / mask).resolve()
            except (OSError, ValueError) as e:
                refused.append(Rejection(repr(mask)[:300], src, f"unusable mask path: {e}", i))
                continue
            if not _inside(mp, allowed):
                refused.append(Rejection(mask[:300], src, "mask path outside the allowed root: refused", i))
                continue
            extra["mask_path"] = str(mp)
        rows.append(Row(
            path=str(p) if p else "", display=raw_path or "", source=src,
            label=rec.get(names["label"]), origin=origin, row_number=i,
            klass=normalise_label(rec.get(names["class"])), patient_id=_clean(rec.get(names["patient_id"])),
            view=_clean(rec.get(names["view"])), sex=_clean(rec.get(names["sex"])),
            age=_age(rec.get(names["age"])), extra=extra or None,
        ))
    return rows, refused


def folder_rows(root: str | Path) -> tuple[list[Row], list[Rejection]]:
    """ROOT/<source>/<label>/**/file. Files directly under ROOT or ROOT/<source> are rejected."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError("folder not found")
    origin = str(root.resolve())
    rows, bad = [], []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(root)
        if len(rel.parts) < 3:
            bad.append(Rejection(str(f), rel.parts[0] if len(rel.parts) > 1 else "",
                                 "not in a ROOT/<source>/<label>/ folder"))
            continue
        rows.append(Row(path=str(f.resolve()), display=str(rel), source=rel.parts[0],
                        label=rel.parts[1], origin=origin))
    return rows, bad


# --- reading files (in worker processes) --------------------------------------

def probe_file(path: str) -> tuple:
    """(image_id, width, height, bit_depth, format, n_bytes) or ('error', reason)."""
    try:
        data = read_file(path)
        digest = hashlib.sha256(data).hexdigest()
        d = decode_bytes(data, path)
        return (digest, d.width, d.height, d.bit_depth, d.format, len(data))
    except DecodeError as e:
        return ("error", str(e))
    except Exception as e:  # a decoder bug must not kill the run; record it
        return ("error", f"unexpected {type(e).__name__}: {e}")


def _probe_all(paths: list[str], workers: int, progress: Callable[[int], None] | None) -> list[tuple]:
    if workers <= 1 or len(paths) < 64:
        out = []
        for p in paths:
            out.append(probe_file(p))
            if progress:
                progress(1)
        return out
    out = []
    chunk = max(8, min(256, len(paths) // (workers * 8) or 1))
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for r in ex.map(probe_file, paths, chunksize=chunk):
            out.append(r)
            if progress:
                progress(1)
    return out


# --- the ingest itself --------------------------------------------------------

def ingest_rows(con, rows: Iterable[Row], origin: str, labels: Iterable[str] | str = DEFAULT_LABELS,
                pre_rejected: Iterable[Rejection] = (), workers: int = 2,
                progress: Callable[[int], None] | None = None) -> IngestReport:
    t0 = time.perf_counter()
    rows, pre_rejected = list(rows), list(pre_rejected)
    allowed = None if labels == ANY_LABEL else {normalise_label(x) for x in labels}
    report = IngestReport(origin=origin, n_rows=len(rows) + len(pre_rejected))
    started = datetime.now()
    run_id = con.execute("SELECT nextval('ingest_run_seq')").fetchone()[0]
    report.run_id = run_id
    errors: list[Rejection] = pre_rejected

    seen: dict[tuple[str, str], int | None] = {}
    todo: list[Row] = []
    existing = {(s, p) for s, p in con.execute("SELECT source, path FROM occurrences").fetchall()}
    for r in rows:
        shown = r.path or r.display
        r.label = normalise_label(r.label)
        if not r.path:
            errors.append(Rejection(shown or f"<row {r.row_number}>", r.source, "empty path", r.row_number))
            continue
        if not r.source:
            errors.append(Rejection(shown, "", "empty source", r.row_number))
            continue
        if not r.label:
            errors.append(Rejection(shown, r.source, "empty label", r.row_number))
            continue
        if allowed is not None and r.label not in allowed:
            errors.append(Rejection(shown, r.source, f"unknown label '{r.label}' (allowed: {', '.join(sorted(allowed))})",
                                    r.row_number))
            continue
        key = (r.source, r.path)
        if key in seen:
            first = seen[key]
            where = f" as row {first}" if first else ""
            errors.append(Rejection(shown, r.source, f"duplicate manifest row (same source and path{where})", r.row_number))
            continue
        seen[key] = r.row_number
        if key in existing:
            report.n_already += 1
            continue
        todo.append(r)

    probes = _probe_all([r.path for r in todo], workers, progress)
    now = datetime.now()
    known = set()
    if todo:
        ids = list({p[0] for p in probes if p[0] != "error"})
        if ids:
            con.register("_ids", pl.DataFrame({"image_id": ids}).to_arrow())
            known = {x for (x,) in con.execute("SELECT image_id FROM images JOIN _ids USING (image_id)").fetchall()}
            con.unregister("_ids")
    new_images, new_occ = {}, []
    for r, p in zip(todo, probes):
        if p[0] == "error":
            errors.append(Rejection(r.path, r.source, p[1], r.row_number))
            continue
        image_id, w, h, bits, fmt, n = p
        occ = dict(image_id=image_id, source=r.source, path=r.path, label=r.label, **{"class": r.klass},
                   patient_id=r.patient_id, view=r.view, sex=r.sex, age=r.age, origin=r.origin,
                   extra=json.dumps(r.extra) if r.extra else None, ingest_run=run_id, ingested_at=now)
        new_occ.append(occ)
        if image_id not in known and image_id not in new_images:
            img = {k: occ[k] for k in ("image_id", "source", "label", "class", "patient_id", "view", "sex", "age")}
            img.update(width=w, height=h, bit_depth=bits, format=fmt, n_bytes=n, path=r.path, ingested_at=now)
            new_images[image_id] = img

    con.execute("BEGIN")
    try:
        if new_images:
            _insert(con, "images", pl.DataFrame(list(new_images.values()), schema=_IMAGE_SCHEMA))
        if new_occ:
            _insert(con, "occurrences", pl.DataFrame(new_occ, schema=_OCC_SCHEMA))
            # files that failed before and are now in: mark their errors resolved
            con.execute("""UPDATE ingest_errors SET resolved = true
                           WHERE NOT resolved AND EXISTS (SELECT 1 FROM occurrences o
                                 WHERE o.ingest_run = ? AND o.source = ingest_errors.source
                                   AND (o.path = ingest_errors.file))""", [run_id])
        for e in errors:
            con.execute(
                """INSERT INTO ingest_errors (file, source, reason, origin, row_number, ingest_run, time, last_seen)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (file, source, reason) DO UPDATE SET
                     last_seen = excluded.last_seen, ingest_run = excluded.ingest_run,
                     row_number = excluded.row_number, resolved = false""",
                [e.file, e.source, e.reason, origin, e.row_number, run_id, now, now],
            )
        report.n_new_images = len(new_images)
        report.n_new_occurrences = len(new_occ)
        report.errors = errors
        report.seconds = time.perf_counter() - t0
        con.execute(
            """INSERT INTO ingest_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [run_id, origin, report.n_rows, report.n_new_images, report.n_new_occurrences, report.n_already,
             len(errors), report.seconds, started, datetime.now()],
        )
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    _store_facts(con, report)
    return report


def _store_facts(con, report: IngestReport) -> None:
    report.n_images, report.n_occurrences = con.execute(
        "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM occurrences)").fetchone()
    report.n_duplicate_groups, report.n_cross_source_groups, report.n_label_conflicts = con.execute(
        "SELECT count(*), count(*) FILTER (cross_source), count(*) FILTER (label_conflict) FROM duplicate_groups"
    ).fetchone()


def record_failure(con, file: str, source: str, reason: str, origin: str) -> None:
    """A whole input (manifest, folder) could not be read: record it, the run goes on."""
    now = datetime.now()
    con.execute(
        """INSERT INTO ingest_errors (file, source, reason, origin, time, last_seen) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (file, source, reason) DO UPDATE SET last_seen = excluded.last_seen, resolved = false""",
        [file, source, reason, origin, now, now],
    )


_STR = pl.Utf8
_IMAGE_SCHEMA = {"image_id": _STR, "source": _STR, "label": _STR, "class": _STR, "patient_id": _STR,
                 "view": _STR, "sex": _STR, "age": pl.Float64, "width": pl.Int32, "height": pl.Int32,
                 "bit_depth": pl.Int32, "format": _STR, "n_bytes": pl.Int64, "path": _STR,
                 "ingested_at": pl.Datetime("us")}
_OCC_SCHEMA = {"image_id": _STR, "source": _STR, "path": _STR, "label": _STR, "class": _STR, "patient_id": _STR,
               "view": _STR, "sex": _STR, "age": pl.Float64, "origin": _STR, "extra": _STR,
               "ingest_run": pl.Int32, "ingested_at": pl.Datetime("us")}
