-- featstore schema version 5: what ingest needs to notice a changed file, and raw ages.
-- size_bytes / mtime_ns: of the bytes hashed at ingest; a re-ingest reads (and hashes) a known
-- file again only when these differ (NULL for rows ingested before version 5: hashed once, then filled).
ALTER TABLE occurrences ADD COLUMN IF NOT EXISTS size_bytes BIGINT;
ALTER TABLE occurrences ADD COLUMN IF NOT EXISTS mtime_ns BIGINT;
-- the age cell as written; `age` is NULL when it is not a plain number of years (65-70, -5, 3 months)
ALTER TABLE occurrences ADD COLUMN IF NOT EXISTS age_raw VARCHAR;
ALTER TABLE images ADD COLUMN IF NOT EXISTS age_raw VARCHAR;

-- A known (source, path) whose file held other bytes at a later ingest. The occurrence moved to the
-- new image (new sha256); the old image row and its embeddings are kept.
CREATE TABLE IF NOT EXISTS ingest_changes (
    source       VARCHAR NOT NULL,
    path         VARCHAR NOT NULL,
    old_image_id VARCHAR NOT NULL,
    new_image_id VARCHAR NOT NULL,
    size_bytes   BIGINT,
    mtime_ns     BIGINT,
    ingest_run   INTEGER NOT NULL,
    changed_at   TIMESTAMP NOT NULL
);

-- Images no occurrence points to any more: every path that held them now holds other bytes.
CREATE OR REPLACE VIEW superseded_images AS
SELECT i.*, c.path AS changed_path, c.new_image_id, c.changed_at
FROM images i JOIN ingest_changes c ON c.old_image_id = i.image_id
WHERE NOT EXISTS (SELECT 1 FROM occurrences o WHERE o.image_id = i.image_id);
