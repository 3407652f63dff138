"""Ingest: manifest rows / folders / dataset adapters -> images, occurrences, ingest_errors.

Each image is identified by the sha256 of its bytes, so re-ingesting is a no-op and
the same file listed under two sources is one image with two occurrences. A bad row
never stops the run: it is written to ingest_errors with the file and the reason.
Only regular files under a size cap are opened; a file whose size or mtime changed since
it was ingested is hashed again, and new content becomes a new image (`ingest_changes`).
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
import stat
import time
from collections import Counter
from typing import NamedTuple
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

import polars as pl

from featstore.decode import DecodeError, decode_bytes, read_regular, stat_error
from featstore.errors import disk_full as _disk_full
from featstore.store import (canonical_images, delete_occurrences_of, duplicate_group_counts, image_count,
                             insert_frame, insert_ingest_run, next_ingest_run_id, occurrence_files,
                             resolve_ingest_errors, store_file_path, stored_counts, stored_image_ids,
                             transaction, update_occurrence_file_stats, upsert_ingest_errors,
                             upsert_ingest_failure)

DEFAULT_LABELS = ("covid", "non_covid")
ANY_LABEL = "*"


# The manifest's column names, where they differ from the standard ones (path, source, label, ...).
@dataclass
class ColumnMap:
    path: str = "path"
    source: str = "source"
    label: str = "label"
    class_: str = "class3"
    patient_id: str = "patient_id"
    view: str = "view"
    sex: str = "sex"
    age: str = "age"
    mask: str = "mask_path"   # optional lung mask file per image (featstore/masks.py)

    def columns(self) -> dict[str, str]:
        return {"path": self.path, "source": self.source, "label": self.label, "class": self.class_,
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
    class_: str | None = None
    patient_id: str | None = None
    view: str | None = None
    sex: str | None = None
    age: float | None = None
    extra: dict | None = None
    age_raw: str | None = None   # the age cell as written, kept whatever it parsed to


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
    n_changed: int = 0          # known (source, path) whose file now holds other bytes: re-ingested
    n_age_unparsed: int = 0     # age cells that were not a plain number of years: age NULL, text kept
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

    def notes(self) -> list[str]:
        """One line per thing the user should know beyond the counts."""
        out = []
        if self.n_changed:
            out.append(f"{self.n_changed} file(s) changed since they were ingested: new content stored as new "
                       "image(s), the old images kept (SELECT * FROM ingest_changes)")
        if self.n_age_unparsed:
            out.append(f"{self.n_age_unparsed} age value(s) are not a number of years: age left NULL, the text "
                       "kept in occurrences.age_raw")
        return out


class StoreFullError(RuntimeError):
    """The disk holding the store filled up while this ingest wrote; nothing of it was stored."""


def _clean(v) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


# A number of years, optionally followed by a years unit: 65, 65.5, 65 y, 65Y, 065Y (DICOM AgeString),
# 65 years. Anything else (65-70, -5, 3 months, 003M, abc, 6,5) is not an age in years: NULL, text kept.
_AGE = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*(?:y|yr|yrs|year|years)?", re.IGNORECASE)
MAX_AGE = 130.0


def _age(v) -> float | None:
    s = _clean(v)
    if s is None:
        return None
    m = _AGE.fullmatch(s)
    if not m:
        return None
    a = float(m.group(1))
    return a if a <= MAX_AGE else None


def _utf8(*texts: str | None) -> bool:
    try:
        for t in texts:
            if t:
                t.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a non-UTF-8 file name reaches Python as lone surrogates
        return False


def _printable(t: str | None) -> str | None:
    """t as valid UTF-8 for the store: undecodable name bytes shown as \\udcXX escapes."""
    return None if t is None else t.encode("utf-8", "backslashreplace").decode("utf-8")


def clip(t: str | None, n: int) -> str | None:
    """t cut to n characters, saying how long it was: a 10 MB manifest cell must not become a 10 MB reason
    (nor 30 MB of terminal output)."""
    return t if t is None or len(t) <= n else f"{t[:n]}… ({len(t):,} characters)"


REASON_MAX = 1000   # characters of a rejection's reason (what it echoes of the input is cut shorter)
FILE_MAX = 8192     # a path longer than any file system allows is a manifest cell, not a path


def normalise_label(v) -> str | None:
    s = _clean(v)
    return s.lower() if s else None


# --- sources of rows ---------------------------------------------------------

def manifest_text(data: bytes, encoding: str | None = None) -> str:
    """Decode a CSV manifest strictly, never lossily: a wrong guess would silently merge sources
    (cp1252 `Clinique-Zé` and `Clinique-Zè` both read as `Clinique-Z\ufffd`). Without `encoding`:
    UTF-8 (a BOM is dropped), or UTF-16 when it starts with a UTF-16 BOM; anything else is refused."""
    if encoding:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r} given with --encoding") from None
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as e:
            raise ValueError(f"manifest is not valid {encoding} ({_where(data, e)}); "
                             "give its real encoding with --encoding") from None
        return text.removeprefix("\ufeff")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        codec, body = "utf-16", data
    else:
        codec, body = "utf-8", data.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode(codec)
    except UnicodeDecodeError as e:
        raise ValueError(f"manifest is not {codec.upper()} ({_where(body, e)}); give its encoding with "
                         "--encoding, e.g. --encoding cp1252 for a Windows/Excel export") from None


def _where(data: bytes, e: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, e.start) + 1
    return f"byte 0x{data[e.start]:02x} on line {line}"


def _duplicate_columns(header: list[str]) -> list[str]:
    return [f"'{n}' (columns {', '.join(str(i + 1) for i, h in enumerate(header) if h == n)})"
            for n, c in Counter(header).items() if c > 1 and n.strip()]


def read_manifest(path: str | Path, encoding: str | None = None, max_bytes: int | None = None) -> pl.DataFrame:
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise ValueError("manifest not found")
    try:
        data, _ = read_regular(p, max_bytes)  # a FIFO or /dev/zero given as --manifest is refused, not read
    except DecodeError as e:
        raise ValueError(f"unreadable manifest: {e}") from e
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df = pl.read_parquet(io.BytesIO(data))
            return df.with_columns(pl.all().cast(pl.Utf8))
        text = manifest_text(data, encoding)
        dups = _duplicate_columns(next(csv.reader(io.StringIO(text)), []))
        if dups:  # polars would rename the second one and the first would be used without a word
            raise ValueError(f"manifest has duplicate column name(s): {'; '.join(dups)}; rename or remove one")
        return pl.read_csv(io.BytesIO(text.encode("utf-8")), infer_schema=False, truncate_ragged_lines=False)
    except ValueError:
        raise
    except Exception as e:  # polars raises ComputeError, NoDataError, ... for unreadable input; csv.Error
        raise ValueError(f"unreadable manifest: {type(e).__name__}: {e}") from e


def _inside(p: Path, roots: list[Path]) -> bool:
    return any(p == r or p.is_relative_to(r) for r in roots)


def _resolve(p: Path) -> Path:
    """p with symlinks followed; ValueError naming the problem (a loop, a NUL byte, a name too long)."""
    try:
        return p.resolve()
    except RuntimeError as e:  # Python 3.11 raises RuntimeError("Symlink loop from ...")
        raise ValueError("symlink loop") from e
    except OSError as e:
        raise ValueError(stat_error(p, e)) from e


def _dangling(link: Path, real: Path) -> bool:
    return os.path.islink(link) and not os.path.lexists(real)


def manifest_rows(manifest: str | Path, cols: ColumnMap | None = None, root: str | Path | None = None,
                  source: str | None = None, allowed_roots: list[str | Path] | None = None,
                  encoding: str | None = None, max_bytes: int | None = None, extra_roots: Iterable = ()
                  ) -> tuple[list[Row], list[Rejection]]:
    """Rows of a CSV/Parquet manifest. Paths are relative to the manifest's folder unless `root`.

    A path that resolves (symlinks followed) outside the allowed roots - by default the folder paths
    are relative to - is refused and recorded, never read: a manifest must not make featstore open
    `../../etc/passwd`. `allowed_roots` replaces that default; `extra_roots` (CLI --allow-root) widens
    it on purpose. The CSV is read as UTF-8 unless `encoding` names another (see manifest_text)."""
    cols = cols or ColumnMap()
    manifest = Path(manifest)
    origin = str(manifest.resolve())
    df = read_manifest(manifest, encoding, max_bytes)
    names = cols.columns()
    missing = [names[k] for k in ("path", "label") if names[k] not in df.columns]
    if source is None and names["source"] not in df.columns:
        missing.append(names["source"] + " (or pass a fixed --source)")
    if missing:
        raise ValueError(f"manifest lacks column(s) {', '.join(missing)}; it has {', '.join(df.columns)}")
    base = Path(root) if root else manifest.parent
    allowed = list(dict.fromkeys(Path(r).resolve() for r in [*(allowed_roots or [base]), *extra_roots]))
    mapped = {v for k, v in names.items() if v in df.columns}
    rows: list[Row] = []
    refused: list[Rejection] = []
    for i, rec in enumerate(df.iter_rows(named=True), start=1):
        raw_path = _clean(rec.get(names["path"]))
        src = source or _clean(rec.get(names["source"])) or ""
        p = (base / raw_path) if raw_path else None
        if p is not None:
            try:
                p = _resolve(p)
            except ValueError as e:  # symlink loops, NUL bytes, names too long for the OS
                why = str(e) if str(e) in ("symlink loop", "file name too long") else f"unusable path: {e}"
                refused.append(Rejection(raw_path[:300] if why == "symlink loop" else repr(raw_path)[:300],
                                         src, why, i))
                continue
            if not _inside(p, allowed):
                refused.append(Rejection(raw_path[:300], src, "path outside the allowed root "
                                         f"({', '.join(map(str, allowed))}): refused; --allow-root DIR permits it", i))
                continue
            if _dangling(base / raw_path, p):
                refused.append(Rejection(raw_path[:300], src, f"broken symlink (its target {p} does not exist)", i))
                continue
        extra = {k: v for k, v in rec.items() if k not in mapped and v not in (None, "")}
        mask = _clean(rec.get(names["mask"]))
        if mask:  # resolved and fenced like the image path, so masks are found from any working directory
            try:
                mp = _resolve(base / mask)
            except ValueError as e:
                refused.append(Rejection(repr(mask)[:300], src, f"unusable mask path: {e}", i))
                continue
            if not _inside(mp, allowed):
                refused.append(Rejection(mask[:300], src, "mask path outside the allowed root: refused", i))
                continue
            extra["mask_path"] = str(mp)
        rows.append(Row(
            path=str(p) if p else "", display=raw_path or "", source=src,
            label=rec.get(names["label"]), origin=origin, row_number=i,
            class_=normalise_label(rec.get(names["class"])), patient_id=_clean(rec.get(names["patient_id"])),
            view=_clean(rec.get(names["view"])), sex=_clean(rec.get(names["sex"])),
            age=_age(rec.get(names["age"])), age_raw=_clean(rec.get(names["age"])), extra=extra or None,
        ))
    return rows, refused


def _check_depth(root: Path, entries: list[Path]) -> None:
    """A root one level off (a source's folder, or a folder of images) would reject every file one by
    one; say it once, up front, with the layout expected and what is there."""
    depths = sorted({len(f.relative_to(root).parts) for f in entries})
    if not entries or depths[-1] >= 3:
        return
    shallow = sorted(entries)[:3]
    found = ", ".join(str(f.relative_to(root)) for f in shallow) + (", ..." if len(entries) > 3 else "")
    hint = ("it looks like one source's folder: give its parent as --folder (ROOT holds one folder per source)"
            if depths == [2] else "put the images in ROOT/<source>/<label>/ folders")
    raise ValueError(f"expected the layout ROOT/<source>/<label>/<image> (e.g. ROOT/nih/covid/0001.png), but no "
                     f"file under {root} is that deep: found {len(entries)} entries like {found}; {hint}")


def folder_rows(root: str | Path, allowed_roots: list[str | Path] | None = None, extra_roots: Iterable = ()
                ) -> tuple[list[Row], list[Rejection]]:
    """ROOT/<source>/<label>/**/file. Files directly under ROOT or ROOT/<source> are rejected.

    Fenced like a manifest: a symlink that resolves outside ROOT (or the `allowed_roots`, and the
    `extra_roots`, CLI --allow-root) is refused and recorded, never read. Symlinked folders are not walked into.
    Every non-folder entry becomes a row, so FIFOs, device nodes, broken links and loops are
    recorded with their reason at read time instead of vanishing."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError("folder not found")
    real_root = root.resolve()
    origin = str(real_root)
    allowed = [Path(r).resolve() for r in [*(allowed_roots or [root]), *extra_roots]]
    if real_root not in allowed:
        allowed.insert(0, real_root)
    rows, bad = [], []

    def unlistable(e: OSError):
        bad.append(Rejection(str(e.filename or root), "", f"cannot list folder: {e.strerror or e}"))

    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unlistable):
        entries += [Path(dirpath) / n for n in filenames if not n.startswith(".")]
        entries += [Path(dirpath) / n for n in dirnames if not n.startswith(".") and os.path.islink(Path(dirpath) / n)]
    _check_depth(root, entries)
    for f in sorted(entries):
        rel = f.relative_to(root)
        src = rel.parts[0] if len(rel.parts) > 1 else ""
        try:
            real = _resolve(f)
        except ValueError as e:
            bad.append(Rejection(str(f), src, str(e)))
            continue
        if not _inside(real, allowed):
            bad.append(Rejection(str(f), src, f"symlink to a path outside the folder root ({real}): refused; "
                                              "--allow-root DIR permits it"))
            continue
        if _dangling(f, real):
            bad.append(Rejection(str(f), src, f"broken symlink (its target {real} does not exist)"))
            continue
        if f.is_symlink() and real.is_dir():
            bad.append(Rejection(str(f), src, "symlink to a folder: not followed (folder mode walks real folders)"))
            continue
        if len(rel.parts) < 3:
            bad.append(Rejection(str(f), src, "not in a ROOT/<source>/<label>/ folder"))
            continue
        rows.append(Row(path=str(real), display=str(rel), source=rel.parts[0], label=rel.parts[1], origin=origin))
    return rows, bad


# --- reading files (in worker processes) --------------------------------------

class ProbeJob(NamedTuple):
    path: str
    max_bytes: int | None = None   # None: decode's default cap
    expect: str | None = None      # the image id stored for this path: bytes that still hash to it are not decoded


class Probe(NamedTuple):
    image_id: str | None = None    # None when `error`
    width: int = 0
    height: int = 0
    bit_depth: int = 0
    format: str = ""
    n_bytes: int = 0
    mtime_ns: int | None = None    # of the bytes hashed (fstat of the open file)
    error: str | None = None
    same: bool = False             # hashed to ProbeJob.expect: unchanged, not decoded


def probe_file(job: ProbeJob | str) -> Probe:
    """Hash and decode one file (a path or a ProbeJob); never raises."""
    if isinstance(job, str):
        job = ProbeJob(job)
    try:
        data, st = read_regular(job.path, job.max_bytes)
        digest = hashlib.sha256(data).hexdigest()
        if job.expect is not None and digest == job.expect:
            return Probe(digest, n_bytes=len(data), mtime_ns=st.st_mtime_ns, same=True)
        d = decode_bytes(data, job.path)
        return Probe(digest, d.width, d.height, d.bit_depth, d.format, len(data), st.st_mtime_ns)
    except DecodeError as e:
        return Probe(error=str(e))
    except Exception as e:  # a decoder bug must not kill the run; record it
        return Probe(error=f"unexpected {type(e).__name__}: {e}")


def _probe_all(paths: list[ProbeJob], workers: int, progress: Callable[[int], None] | None) -> list[Probe]:
    if workers <= 1 or len(paths) < 64:
        out = []
        for p in paths:
            out.append(probe_file(p))
            if progress:
                progress(1)
        return out
    out = []
    chunk = max(8, min(256, len(paths) // (workers * 8) or 1))
    from featstore.procs import process_pool

    with process_pool(workers) as ex:  # workers die with this process, kill -9 included
        for r in ex.map(probe_file, paths, chunksize=chunk):
            out.append(r)
            if progress:
                progress(1)
    return out


def _unchanged(path: str, size: int | None, mtime_ns: int | None) -> bool:
    """Same size and mtime as when ingested: not read again. Unknown (rows ingested before schema 5)
    or different: hashed again. stat only, so a FIFO or device here is never opened."""
    if size is None or mtime_ns is None:
        return False
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns == mtime_ns




def _db_file(con) -> str:
    try:
        return store_file_path(con) or "the store"
    except Exception:
        return "the store"


# --- the ingest itself --------------------------------------------------------

def ingest_rows(con, rows: Iterable[Row], origin: str, labels: Iterable[str] | str = DEFAULT_LABELS,
                pre_rejected: Iterable[Rejection] = (), workers: int = 2,
                progress: Callable[[int], None] | None = None, max_bytes: int | None = None) -> IngestReport:
    """Ingest rows in one transaction. Files above `max_bytes` (default FEATSTORE_MAX_BYTES or 512 MiB)
    and anything that is not a regular file are recorded, never read. Raises StoreFullError (one line
    to show) when the disk fills: then nothing of this ingest is stored."""
    t0 = time.perf_counter()
    origin = _printable(origin)
    rows, pre_rejected = list(rows), list(pre_rejected)
    allowed = None if labels == ANY_LABEL else {normalise_label(x) for x in labels}
    report = IngestReport(origin=origin, n_rows=len(rows) + len(pre_rejected))
    report.n_age_unparsed = sum(1 for r in rows if r.age_raw and r.age is None)
    started = datetime.now()
    errors: list[Rejection] = pre_rejected

    seen: dict[tuple[str, str], int | None] = {}
    todo: list[Row] = []
    jobs: list[ProbeJob] = []
    existing = {(s, p): (i, n, m) for s, p, i, n, m in occurrence_files(con)}
    for r in rows:
        shown = r.path or r.display
        r.label = normalise_label(r.label)
        if not _utf8(r.path, r.source, r.label):  # the store holds UTF-8 only; a lossy path would not reopen
            errors.append(Rejection(_printable(shown), _printable(r.source) or "",
                                    "file name is not valid UTF-8 (a Latin-1 name?): cannot be stored; "
                                    "rename it to UTF-8 (e.g. convmv -f latin1 -t utf8)", r.row_number))
            continue
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
            errors.append(Rejection(shown, r.source, f"unknown label '{clip(r.label, 100)}' (allowed: "
                                    f"{clip(', '.join(sorted(allowed)), 200)})", r.row_number))
            continue
        key = (r.source, r.path)
        if key in seen:
            first = seen[key]
            where = f" as row {first}" if first else ""
            errors.append(Rejection(shown, r.source, f"duplicate manifest row (same source and path{where})", r.row_number))
            continue
        seen[key] = r.row_number
        expect = None
        if key in existing:
            expect, size, mtime = existing[key]
            if _unchanged(r.path, size, mtime):
                report.n_already += 1
                continue
        todo.append(r)
        jobs.append(ProbeJob(r.path, max_bytes, expect))

    if progress and len(rows) > len(todo):  # rows refused or known unchanged are done already
        progress(len(rows) - len(todo))
    probes = _probe_all(jobs, workers, progress)
    now = datetime.now()
    known = set()
    ids = list({p.image_id for p in probes if p.image_id and not p.same})
    if ids:
        known = stored_image_ids(con, ids)
    new_images, new_occ, same, changed = {}, [], [], []
    for r, job, p in zip(todo, jobs, probes):
        if p.error:
            reason = p.error
            if job.expect is not None:  # it was ingested before: say that its rows stay as they were
                reason += " (ingested before; its stored rows are kept)"
            errors.append(Rejection(r.path, r.source, reason, r.row_number))
            continue
        if p.same:  # re-hashed, same bytes (touched, copied, or ingested before size/mtime were kept)
            report.n_already += 1
            same.append({"source": r.source, "path": r.path, "size_bytes": p.n_bytes, "mtime_ns": p.mtime_ns})
            continue
        if job.expect is not None:
            changed.append({"source": r.source, "path": r.path, "old_image_id": job.expect,
                            "new_image_id": p.image_id, "size_bytes": p.n_bytes, "mtime_ns": p.mtime_ns})
        occ = dict(image_id=p.image_id, source=r.source, path=r.path, label=r.label, **{"class": r.class_},
                   patient_id=r.patient_id, view=r.view, sex=r.sex, age=r.age, age_raw=r.age_raw,
                   origin=_printable(r.origin), extra=json.dumps(r.extra) if r.extra else None,
                   size_bytes=p.n_bytes, mtime_ns=p.mtime_ns, ingested_at=now)
        new_occ.append(occ)
        if p.image_id not in known and p.image_id not in new_images:
            img = {k: occ[k] for k in ("image_id", "source", "label", "class", "patient_id", "view", "sex", "age",
                                       "age_raw")}
            img.update(width=p.width, height=p.height, bit_depth=p.bit_depth, format=p.format, n_bytes=p.n_bytes,
                       path=r.path, ingested_at=now)
            new_images[p.image_id] = img
    report.n_changed = len(changed)
    # names from the disk may hold undecodable bytes: stored and printed as escapes, never as a crash
    errors = [Rejection(clip(_printable(e.file), FILE_MAX), clip(_printable(e.source), FILE_MAX) or "",
                        clip(_printable(e.reason), REASON_MAX), e.row_number) for e in errors]

    n_before = image_count(con)
    db_file = _db_file(con)
    try:
        with transaction(con):  # all of this ingest or none of it (an interrupt included)
            run_id = next_ingest_run_id(con)
            report.run_id = run_id
            for o in new_occ:
                o["ingest_run"] = run_id
            if changed:  # the path now holds other bytes: its occurrence moves to the new image; the old image stays
                ch = pl.DataFrame(changed, schema=_CHANGE_SCHEMA).with_columns(
                    ingest_run=pl.lit(run_id, pl.Int32), changed_at=pl.lit(now, pl.Datetime("us")))
                insert_frame(con, "ingest_changes", ch)
                delete_occurrences_of(con, ch.select("source", "path"))
            if new_images:
                insert_frame(con, "images", pl.DataFrame(list(new_images.values()), schema=_IMAGE_SCHEMA))
            if new_occ:
                insert_frame(con, "occurrences", pl.DataFrame(new_occ, schema=_OCC_SCHEMA))
                canonical_images(con)
            if same:  # remember size and mtime, so the next ingest need not read them
                update_occurrence_file_stats(con, pl.DataFrame(same, schema=_IDENT_SCHEMA))
            ok = [(o["source"], o["path"]) for o in new_occ] + [(o["source"], o["path"]) for o in same]
            if ok:  # files that failed before and are now in: mark their errors resolved
                resolve_ingest_errors(con, pl.DataFrame(ok, schema={"source": _STR, "path": _STR}, orient="row"))
            if errors:  # one statement for all of them (one each took minutes for 100,000 missing files)
                rej = pl.DataFrame({"file": [e.file for e in errors], "source": [e.source for e in errors],
                                    "reason": [e.reason for e in errors],
                                    "row_number": [e.row_number for e in errors]},
                                   schema={"file": _STR, "source": _STR, "reason": _STR, "row_number": pl.Int32})
                # ON CONFLICT may touch a row once per statement: the last of equal keys wins, as before
                rej = rej.unique(["file", "source", "reason"], keep="last", maintain_order=True)
                upsert_ingest_errors(con, rej, origin, run_id, now)
            report.n_new_images = len(new_images)
            report.n_new_occurrences = len(new_occ)
            report.errors = errors
            report.seconds = time.perf_counter() - t0
            insert_ingest_run(con, [run_id, origin, report.n_rows, report.n_new_images, report.n_new_occurrences,
                                    report.n_already, len(errors), report.seconds, started, datetime.now()])
    except Exception as e:  # after the rollback (or DuckDB's own, when the COMMIT failed)
        if _disk_full(e):
            raise StoreFullError(
                f"disk full while writing the store {db_file}: nothing of this ingest was stored, the store "
                f"holds what it held before ({n_before} images); free space on that disk (or use --db on "
                f"another one) and run the same command again") from e
        raise
    _store_facts(con, report)
    return report


# canonical_images (an image's own row is its first occurrence's) and stored_counts are the store layer's
# (featstore/store.py), imported above: ingest_rows calls the first, jobs asks ingest for the second.

def _store_facts(con, report: IngestReport) -> None:
    report.n_images, report.n_occurrences = stored_counts(con)
    report.n_duplicate_groups, report.n_cross_source_groups, report.n_label_conflicts = duplicate_group_counts(con)


def record_failure(con, file: str, source: str, reason: str, origin: str) -> None:
    """A whole input (manifest, folder) could not be read: record it, the run goes on."""
    upsert_ingest_failure(con, file, source, reason, origin, datetime.now())


_STR = pl.Utf8
_IMAGE_SCHEMA = {"image_id": _STR, "source": _STR, "label": _STR, "class": _STR, "patient_id": _STR,
                 "view": _STR, "sex": _STR, "age": pl.Float64, "age_raw": _STR, "width": pl.Int32, "height": pl.Int32,
                 "bit_depth": pl.Int32, "format": _STR, "n_bytes": pl.Int64, "path": _STR,
                 "ingested_at": pl.Datetime("us")}
_OCC_SCHEMA = {"image_id": _STR, "source": _STR, "path": _STR, "label": _STR, "class": _STR, "patient_id": _STR,
               "view": _STR, "sex": _STR, "age": pl.Float64, "age_raw": _STR, "origin": _STR, "extra": _STR,
               "size_bytes": pl.Int64, "mtime_ns": pl.Int64, "ingest_run": pl.Int32, "ingested_at": pl.Datetime("us")}
_IDENT_SCHEMA = {"source": _STR, "path": _STR, "size_bytes": pl.Int64, "mtime_ns": pl.Int64}
_CHANGE_SCHEMA = {"source": _STR, "path": _STR, "old_image_id": _STR, "new_image_id": _STR,
                  "size_bytes": pl.Int64, "mtime_ns": pl.Int64}
