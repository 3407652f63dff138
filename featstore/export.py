"""Export the store as a Hive-partitioned Parquet dataset readable without featstore.

DIR/images/source=<s>/…            one row per distinct image (its first source), plus `sources`
DIR/occurrences/source=<s>/…       every accepted manifest row
DIR/embeddings/backbone=<b>/preprocess=<p>/source=<s>/…   metadata + vector
DIR/ingest_errors.parquet, DIR/embed_runs.parquet
"""
from __future__ import annotations

import shutil
from pathlib import Path

from featstore.store import embedding_tables

_META = "i.image_id, i.label, i.class, i.patient_id, i.view, i.sex, i.age, i.source"


def export_parquet(con, out: str | Path) -> dict[str, int]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    sources = "(SELECT image_id, list(DISTINCT source ORDER BY source) AS sources FROM occurrences GROUP BY image_id)"

    def copy(query: str, dest: Path, partition: str | None = None) -> int:
        n = con.execute(f"SELECT count(*) FROM ({query})").fetchone()[0]
        if partition:
            con.execute(f"COPY ({query}) TO '{dest}' (FORMAT parquet, PARTITION_BY ({partition}), OVERWRITE_OR_IGNORE)")
        else:
            con.execute(f"COPY ({query}) TO '{dest}' (FORMAT parquet)")
        return n

    for sub in ("images", "occurrences", "embeddings"):  # stale partitions would mix with the new ones
        shutil.rmtree(out / sub, ignore_errors=True)
    counts["images"] = copy(f"SELECT i.*, s.sources FROM images i LEFT JOIN {sources} s USING (image_id)",
                            out / "images", "source")
    counts["occurrences"] = copy("SELECT * FROM occurrences", out / "occurrences", "source")
    n_emb = 0
    for table, _ in embedding_tables(con):
        if con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
            q = (f"SELECT {_META}, s.sources, e.backbone, e.weights_id, e.preprocess, e.dim, e.vector, e.created_at "
                 f"FROM {table} e JOIN images i USING (image_id) LEFT JOIN {sources} s USING (image_id)")
            n_emb += copy(q, out / "embeddings", "backbone, preprocess, source")
    counts["embeddings"] = n_emb
    counts["ingest_errors"] = copy("SELECT * FROM ingest_errors", out / "ingest_errors.parquet")
    counts["embed_runs"] = copy("SELECT * FROM embed_runs", out / "embed_runs.parquet")
    return counts
