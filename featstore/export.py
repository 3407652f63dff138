"""Export the store as a Hive-partitioned Parquet dataset readable without featstore.

DIR/images/source=<s>/…            one row per distinct image (its first source), plus `sources`
DIR/occurrences/source=<s>/…       every accepted manifest row
DIR/embeddings/backbone=<b>/preprocess=<p>/source=<s>/…   metadata + vector
DIR/ingest_errors.parquet, DIR/embed_runs.parquet
DIR/featstore-export.json          what this export wrote (files, sizes): the only files a later
                                   `--overwrite` export may remove

An export never deletes what it did not write: DIR must be new or empty, or hold a previous export
(then only the files its featstore-export.json lists are removed, and only if nothing else is in
the way). The files are written into a staging folder inside DIR first and moved into place last;
featstore-export.json is written after them, so a killed export never reads as complete.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from featstore.ownfiles import is_own, listing, read_manifest, remove_own, shown, write_json_atomic
from featstore.store import write_parquet_tables

MANIFEST = "featstore-export.json"
_TOP = ("images", "occurrences", "embeddings", "ingest_errors.parquet", "embed_runs.parquet")


class ExportRefused(FileExistsError):
    """DIR holds something this export did not write, where it would write."""


STAGE = ".featstore-export-staging"   # the files are written here first; a killed export's is replaced
PARTIAL = "featstore-export.partial.json"  # while files move: every file the folder may hold of an export


def export_parquet(con, out: str | Path, overwrite: bool = False) -> dict[str, int]:
    """The export, written into DIR/.featstore-export-staging, then moved into place file by file;
    DIR/featstore-export.json (what says the export is complete) is written last, atomically. While
    files move, DIR/featstore-export.partial.json lists the old export's files and the new ones, so
    that a run killed then leaves no complete-looking export and the next --overwrite knows them."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out} is a file, not a folder; give a new folder for the export")
    out.mkdir(parents=True, exist_ok=True)
    old = _previous_export(out, overwrite)
    stage = out / STAGE
    if os.path.lexists(stage):  # a killed export's: only ever written by featstore
        if stage.is_symlink() or not stage.is_dir():
            raise ExportRefused(f"{stage} is not a folder featstore made; nothing was removed")
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        counts = write_parquet_tables(con, stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # made above; only this export wrote into it
        raise
    new = listing(stage)
    write_json_atomic(out / PARTIAL, {"featstore_export": 1, "complete": False, "files": new,
                                      "old": {k: v for d in old for k, v in d.items()}})
    if os.path.lexists(out / MANIFEST):
        (out / MANIFEST).unlink()  # from here until the end the folder does not read as a complete export
    for files in old:
        remove_own(out, {k: v for k, v in files.items() if k.split("/")[0] in _TOP})
    for rel in sorted(new):  # file by file: folders already there (even a user's empty ones) are kept
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(stage / rel, out / rel)  # no file is in the way: checked, then our old ones removed
    shutil.rmtree(stage)  # its own folders, now empty
    write_json_atomic(out / MANIFEST, {"featstore_export": 1, "complete": True, "counts": counts, "files": new})
    (out / PARTIAL).unlink()
    return counts


def _previous_export(out: Path, overwrite: bool) -> list[dict[str, int]]:
    """The file lists of the previous export in `out` whose files may be removed (two after an export
    killed while moving files: the old export's and the new one's); refuses (before anything is
    touched) when `out` is not empty and not allowed to be replaced, when it holds no previous export,
    or when any file in the way was not written by that export."""
    entries = set(os.listdir(out)) - {STAGE}
    if not entries:
        return []
    if not overwrite:
        raise ExportRefused(f"{out} is not empty; give a new or empty folder, or --overwrite to replace a "
                            f"previous featstore export there (only the files it wrote are removed)")
    try:  # an export killed while moving files leaves the partial list (old and new files), no manifest
        partial = read_manifest(out / PARTIAL)
        old = [partial, read_manifest(out / PARTIAL, "old")] if partial is not None else \
            [read_manifest(out / MANIFEST)]
    except ValueError as e:
        raise ExportRefused(f"{e}; nothing was removed") from e
    if old[0] is None:
        raise ExportRefused(f"{out} holds {shown(listing(out, skip=(STAGE,)))} but no featstore export ({MANIFEST} "
                            f"is missing): --overwrite only replaces a previous export; nothing was removed. Export "
                            f"into a new folder")
    foreign = []
    for top in _TOP:
        p = out / top
        if not os.path.lexists(p):
            continue
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            foreign.append(top)
            continue
        for rel in ([top] if p.is_file() else [f"{top}/{r}" for r in listing(p)]):
            if not any(is_own(out, rel, files) for files in old):
                foreign.append(rel)
    if foreign:
        raise ExportRefused(f"{out} holds files a featstore export did not write where the export goes: "
                            f"{shown(foreign)}; nothing was removed. Export into a new folder")
    return old


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
