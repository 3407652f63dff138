"""Export the store as a Hive-partitioned Parquet dataset readable without featstore.

DIR/images/source=<s>/…            one row per distinct image (its first source), plus `sources`
DIR/occurrences/source=<s>/…       every accepted manifest row
DIR/embeddings/backbone=<b>/preprocess=<p>/source=<s>/…   metadata + vector
DIR/ingest_errors.parquet, DIR/embed_runs.parquet
DIR/featstore-export.json          what this export wrote (files, sizes): the only files a later
                                   `--overwrite` export may remove

An export never deletes what it did not write: DIR must be new or empty, or hold a previous export
(then only the files its featstore-export.json lists are removed, and only if nothing else is in
the way). The files are written into a fresh folder inside DIR first and moved into place last.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from featstore.store import embedding_tables

_META = "i.image_id, i.label, i.class, i.patient_id, i.view, i.sex, i.age, i.source"
MANIFEST = "featstore-export.json"
_TOP = ("images", "occurrences", "embeddings", "ingest_errors.parquet", "embed_runs.parquet")


class ExportRefused(FileExistsError):
    """DIR holds something this export did not write, where it would write."""


def export_parquet(con, out: str | Path, overwrite: bool = False) -> dict[str, int]:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out} is a file, not a folder; give a new folder for the export")
    out.mkdir(parents=True, exist_ok=True)
    old = _previous_export(out, overwrite)
    stage = Path(tempfile.mkdtemp(prefix=".featstore-export-", dir=out))
    try:
        counts = _write(con, stage)
    except BaseException:
        shutil.rmtree(stage)  # made by mkdtemp above; only this export wrote into it
        raise
    new = _listing(stage)
    _remove_own(out, old)
    _write_manifest(out, new, counts)  # before the moves: a crash between them leaves only listed files
    for rel in sorted(new):  # file by file: folders already there (even a user's empty ones) are kept
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(stage / rel, out / rel)  # no file is in the way: checked, then our old ones removed
    for d, _, _ in sorted(os.walk(stage), key=lambda w: len(w[0]), reverse=True):
        os.rmdir(d)  # stage's own folders, now empty
    return counts


def _write(con, dest: Path) -> dict[str, int]:
    counts = {}
    sources = "(SELECT image_id, list(DISTINCT source ORDER BY source) AS sources FROM occurrences GROUP BY image_id)"

    def copy(query: str, target: Path, partition: str | None = None, pattern: str = "data_{i}") -> int:
        n = con.execute(f"SELECT count(*) FROM ({query})").fetchone()[0]
        if partition:
            # the target path is bound, not pasted: a folder name may hold a quote
            con.execute(f"COPY ({query}) TO ? (FORMAT parquet, PARTITION_BY ({partition}), "
                        f"FILENAME_PATTERN '{pattern}', OVERWRITE_OR_IGNORE)", [str(target)])
        else:
            con.execute(f"COPY ({query}) TO ? (FORMAT parquet)", [str(target)])
        return n

    counts["images"] = copy(f"SELECT i.*, s.sources FROM images i LEFT JOIN {sources} s USING (image_id)",
                            dest / "images", "source")
    counts["occurrences"] = copy("SELECT * FROM occurrences", dest / "occurrences", "source")
    n_emb = 0
    for table, dim in embedding_tables(con):
        if con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
            q = (f"SELECT {_META}, s.sources, e.backbone, e.weights_id, e.preprocess, e.dim, e.vector, e.created_at "
                 f"FROM {table} e JOIN images i USING (image_id) LEFT JOIN {sources} s USING (image_id)")
            # one file name per table: two tables (e.g. two `onnx` models) can share a partition
            n_emb += copy(q, dest / "embeddings", "backbone, preprocess, source", f"d{dim}_{{i}}")
    counts["embeddings"] = n_emb
    counts["ingest_errors"] = copy("SELECT * FROM ingest_errors", dest / "ingest_errors.parquet")
    counts["embed_runs"] = copy("SELECT * FROM embed_runs", dest / "embed_runs.parquet")
    return counts


def _listing(root: Path) -> dict[str, int]:
    """Every file under root (relative POSIX path -> size)."""
    files = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            files[p.relative_to(root).as_posix()] = p.lstat().st_size
    return files


def _write_manifest(out: Path, files: dict[str, int], counts: dict[str, int]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"featstore_export": 1, "counts": counts, "files": files}, indent=1))
    os.replace(tmp, out / MANIFEST)


def _previous_export(out: Path, overwrite: bool) -> dict[str, int]:
    """The files of the previous export in `out` that may be removed; refuses (before anything is
    touched) when `out` is not empty and not allowed to be replaced, or when any file in the way was
    not written by that export."""
    if not os.listdir(out):
        return {}
    if not overwrite:
        raise ExportRefused(f"{out} is not empty; give a new or empty folder, or --overwrite to replace a "
                            f"previous featstore export there (only the files it wrote are removed)")
    old = {}
    if os.path.lexists(out / MANIFEST):
        try:
            if not stat.S_ISREG((out / MANIFEST).lstat().st_mode):
                raise ValueError("not a regular file")
            old = json.loads((out / MANIFEST).read_text())["files"]
            if not isinstance(old, dict):
                raise ValueError("no file list")
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ExportRefused(f"{out / MANIFEST} cannot be read ({e}); nothing was removed") from e
    foreign = []
    for top in _TOP:
        p = out / top
        if not os.path.lexists(p):
            continue
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            foreign.append(top)
            continue
        if p.is_file():
            if not _own(out, top, old):
                foreign.append(top)
            continue
        for d, dirs, names in os.walk(p):  # os.walk does not follow links below the top
            for n in names + [x for x in dirs if (Path(d) / x).is_symlink()]:
                rel = (Path(d) / n).relative_to(out).as_posix()
                if not _own(out, rel, old):
                    foreign.append(rel)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ExportRefused(f"{out} holds files a featstore export did not write where the export goes: "
                            f"{', '.join(foreign[:5])}{more}; nothing was removed. Export into a new folder"
                            + ("" if old else f" ({out / MANIFEST} is missing)"))
    return old


def _own(out: Path, rel: str, old: dict[str, int]) -> bool:
    """rel is a regular file the previous export listed, unchanged in size, reached without links."""
    if rel not in old or rel.startswith("/") or ".." in rel.split("/") or rel.split("/")[0] not in _TOP:
        return False
    p = out
    for part in rel.split("/")[:-1]:
        p = p / part
        if p.is_symlink():
            return False
    st = (p / rel.split("/")[-1]).lstat()
    return stat.S_ISREG(st.st_mode) and st.st_size == old[rel]


def _remove_own(out: Path, old: dict[str, int]) -> None:
    """Remove the previous export's files (each checked again), then the folders they leave empty."""
    dirs = set()
    for rel in old:
        p = out / rel
        if os.path.lexists(p) and _own(out, rel, old):
            p.unlink()
            dirs.update(p.parents)
    for d in sorted((d for d in dirs if out in d.parents), key=lambda d: len(d.parts), reverse=True):
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


@dataclass
class ExportJob:
    """`featstore export`: Hive-partitioned Parquet by source (`parquet`) and/or a snapshot of the
    whole store (`snapshot`). run() says each part as it is written."""
    parquet: Path | None = None
    overwrite: bool = False
    snapshot: Path | None = None
    db: Path | None = None

    def __post_init__(self):
        from featstore.errors import UserError

        if not self.parquet and not self.snapshot:
            raise UserError("give --parquet DIR and/or --snapshot DIR")

    def run(self, say=lambda line: None) -> None:
        from featstore.errors import UserError
        from featstore.store import export_snapshot, open_for_command

        con = open_for_command(self.db, read_only=True, advice=False)
        try:
            if self.parquet:
                try:
                    counts = export_parquet(con, self.parquet, overwrite=self.overwrite)
                except FileExistsError as e:
                    raise UserError(str(e)) from e
                say(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {self.parquet}")
            if self.snapshot:
                try:
                    export_snapshot(con, self.snapshot)
                except FileExistsError as e:
                    raise UserError(str(e)) from e
                say(f"snapshot -> {self.snapshot} (read it with --db {self.snapshot})")
        finally:
            con.close()
