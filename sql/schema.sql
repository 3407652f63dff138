-- featstore schema, version 1. Applied by featstore.store; later versions add
-- migrations in sql/migrations/NNN_name.sql and bump schema_version.
-- Vectors live in one table per dimension, embeddings_d<dim> (vector FLOAT[dim]),
-- created on first use; the `embeddings` view unions them (see featstore/store.py).

CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER NOT NULL,
    applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- One row per distinct image content. source/label/... are those of its occurrence with the
-- smallest (source, path), whatever the ingest order (featstore.ingest.canonical_images);
-- `occurrences` keeps every manifest row.
CREATE TABLE IF NOT EXISTS images (
    image_id    VARCHAR PRIMARY KEY,   -- sha256 of the file bytes
    source      VARCHAR NOT NULL,
    label       VARCHAR NOT NULL,
    class       VARCHAR,
    patient_id  VARCHAR,
    view        VARCHAR,
    sex         VARCHAR,
    age         DOUBLE,
    width       INTEGER NOT NULL,      -- as stored in the file
    height      INTEGER NOT NULL,
    bit_depth   INTEGER NOT NULL,
    format      VARCHAR NOT NULL,      -- PNG, JPEG, DICOM, NIFTI, ...
    n_bytes     BIGINT NOT NULL,
    path        VARCHAR NOT NULL,      -- absolute path of that occurrence
    ingested_at TIMESTAMP NOT NULL
);

-- Every manifest row / folder file that was accepted.
CREATE TABLE IF NOT EXISTS occurrences (
    image_id    VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,      -- absolute path
    label       VARCHAR NOT NULL,
    class       VARCHAR,
    patient_id  VARCHAR,
    view        VARCHAR,
    sex         VARCHAR,
    age         DOUBLE,
    origin      VARCHAR NOT NULL,      -- manifest file, folder or adapter it came from
    extra       JSON,                  -- manifest columns featstore does not map
    ingest_run  INTEGER NOT NULL,
    ingested_at TIMESTAMP NOT NULL,
    PRIMARY KEY (source, path)
);

CREATE SEQUENCE IF NOT EXISTS ingest_run_seq START 1;
CREATE TABLE IF NOT EXISTS ingest_runs (
    run_id          INTEGER PRIMARY KEY,
    origin          VARCHAR NOT NULL,
    n_rows          INTEGER,
    n_new_images    INTEGER,
    n_new_occurrences INTEGER,
    n_already       INTEGER,
    n_errors        INTEGER,
    seconds         DOUBLE,
    started_at      TIMESTAMP NOT NULL,
    finished_at     TIMESTAMP
);

-- Everything rejected at ingest. One row per (file, source, reason); re-running
-- the same ingest updates last_seen instead of piling up copies.
CREATE TABLE IF NOT EXISTS ingest_errors (
    file        VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    origin      VARCHAR,
    row_number  INTEGER,               -- 1-based data row in the manifest, if any
    ingest_run  INTEGER,
    time        TIMESTAMP NOT NULL,    -- first seen
    last_seen   TIMESTAMP NOT NULL,
    resolved    BOOLEAN NOT NULL DEFAULT false,  -- the file was ingested later
    PRIMARY KEY (file, source, reason)
);

CREATE SEQUENCE IF NOT EXISTS embed_run_seq START 1;
CREATE TABLE IF NOT EXISTS embed_runs (
    run_id       INTEGER PRIMARY KEY,
    backbone     VARCHAR NOT NULL,
    weights_id   VARCHAR NOT NULL,
    preprocess   VARCHAR NOT NULL,
    dim          INTEGER NOT NULL,
    device       VARCHAR NOT NULL,
    batch_size   INTEGER NOT NULL,
    workers      INTEGER NOT NULL,
    n_todo       INTEGER NOT NULL,
    n_embedded   INTEGER,
    n_failed     INTEGER,
    seconds      DOUBLE,
    images_per_s DOUBLE,
    status       VARCHAR NOT NULL,     -- running | completed | interrupted
    started_at   TIMESTAMP NOT NULL,
    finished_at  TIMESTAMP
);

-- Images that could not be decoded or preprocessed at embed time.
CREATE TABLE IF NOT EXISTS embed_errors (
    image_id    VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,
    backbone    VARCHAR NOT NULL,
    preprocess  VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    embed_run   INTEGER,
    time        TIMESTAMP NOT NULL,
    PRIMARY KEY (image_id, backbone, preprocess)
);

-- Views for the obvious questions -------------------------------------------

-- Counts per source x label over occurrences: a file listed by two sources
-- counts in both; n_images counts distinct contents.
CREATE OR REPLACE VIEW source_label_counts AS
SELECT source, label, count(*) AS n_occurrences, count(DISTINCT image_id) AS n_images
FROM occurrences GROUP BY ALL ORDER BY source, label;

-- Groups of byte-identical files (one image, several occurrences).
CREATE OR REPLACE VIEW duplicate_groups AS
SELECT image_id,
       count(*)                                     AS n_occurrences,
       count(DISTINCT source)                       AS n_sources,
       list(DISTINCT source ORDER BY source)        AS sources,
       list(DISTINCT label ORDER BY label)          AS labels,
       count(DISTINCT source) > 1                   AS cross_source,
       count(DISTINCT label) > 1                    AS label_conflict,
       list(path ORDER BY source, path)             AS paths
FROM occurrences GROUP BY image_id HAVING count(*) > 1;

-- Occurrences of one image that disagree on the label.
CREATE OR REPLACE VIEW label_conflicts AS
SELECT o.image_id, o.source, o.path, o.label, o.class
FROM occurrences o JOIN duplicate_groups d USING (image_id)
WHERE d.label_conflict ORDER BY o.image_id, o.source, o.path;

CREATE OR REPLACE VIEW open_ingest_errors AS
SELECT * FROM ingest_errors WHERE NOT resolved ORDER BY source, file;
