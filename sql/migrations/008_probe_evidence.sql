-- featstore schema version 8: the domain probe's forensic evidence as rows. `featstore probe` computes and
-- writes them with its `results` rows (same sweep_id, study 'domain-probe'); the report only lays them out.
-- t-SNE coordinates (PCA to 50 dims first) of a seeded subsample of the embedding set, per representation
-- (raw: the embeddings; grl_mlp: the cross-fitted GRL representation), as the probe's `head` column names them.
CREATE TABLE IF NOT EXISTS probe_map_points (
    sweep_id       VARCHAR NOT NULL,
    backbone       VARCHAR NOT NULL,
    preprocess     VARCHAR NOT NULL,
    representation VARCHAR NOT NULL,
    image_id       VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,
    label          VARCHAR NOT NULL,
    x              DOUBLE NOT NULL,
    y              DOUBLE NOT NULL,
    n_total        INTEGER NOT NULL,  -- images in the set; the map holds a seeded subsample of at most 1,500
    seed           INTEGER NOT NULL,
    PRIMARY KEY (sweep_id, representation, image_id)
);

-- per source, the share of each image's k nearest neighbours (cosine) from its own source and with its own
-- label, beside chance (featstore.neighbors.neighbor_summary)
CREATE TABLE IF NOT EXISTS probe_neighbors (
    sweep_id           VARCHAR NOT NULL,
    backbone           VARCHAR NOT NULL,
    preprocess         VARCHAR NOT NULL,
    source             VARCHAR NOT NULL,
    n                  INTEGER NOT NULL,
    k                  INTEGER NOT NULL,
    same_source        DOUBLE NOT NULL,
    same_source_chance DOUBLE NOT NULL,
    same_label         DOUBLE NOT NULL,
    same_label_chance  DOUBLE NOT NULL,
    PRIMARY KEY (sweep_id, source)
);
