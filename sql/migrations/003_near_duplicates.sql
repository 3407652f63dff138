-- featstore schema version 3: near-duplicate images (same picture, different bytes: cropped,
-- resized, re-encoded), found by `featstore duplicates`. One row per pair (image_a < image_b).
CREATE TABLE IF NOT EXISTS near_duplicates (
    image_a        VARCHAR NOT NULL,
    image_b        VARCHAR NOT NULL,
    source_a       VARCHAR NOT NULL,
    source_b       VARCHAR NOT NULL,
    label_a        VARCHAR NOT NULL,
    label_b        VARCHAR NOT NULL,
    cosine         DOUBLE,            -- embedding cosine similarity (NULL: no embedding set given)
    phash_distance INTEGER,           -- Hamming distance of 256-bit difference hashes
    method         VARCHAR NOT NULL,  -- phash | embedding | both: which rule flagged the pair
    backbone       VARCHAR,
    preprocess     VARCHAR,
    cosine_min     DOUBLE NOT NULL,   -- the thresholds in force when the pair was found
    phash_max      INTEGER NOT NULL,
    found_at       TIMESTAMP NOT NULL,
    PRIMARY KEY (image_a, image_b)
);

CREATE TABLE IF NOT EXISTS image_hashes (
    image_id VARCHAR PRIMARY KEY,
    dhash    BLOB NOT NULL             -- 16x16 (256-bit) difference hash of the decoded grey image
);

CREATE OR REPLACE VIEW near_duplicate_pairs_by_source AS
SELECT least(source_a, source_b) AS source_1, greatest(source_a, source_b) AS source_2,
       count(*) AS n_pairs, count(*) FILTER (WHERE label_a <> label_b) AS n_label_conflicts,
       count(*) FILTER (WHERE method = 'both') AS n_both_rules
FROM near_duplicates GROUP BY ALL ORDER BY n_pairs DESC;
