-- featstore schema version 9: attribution inside the lungs (`featstore attribution`, featstore/attribution.py).
-- One row per attributed image and run: the share of the head's evidence map (CAM or Grad-CAM through the
-- frozen backbone, for the class it predicts) that falls inside the image's stored lung mask.
CREATE TABLE IF NOT EXISTS attribution (
    run_id        VARCHAR NOT NULL,   -- UTC start of the `featstore attribution` run
    image_id      VARCHAR NOT NULL,
    source        VARCHAR NOT NULL,
    label         VARCHAR,
    backbone      VARCHAR NOT NULL,
    weights_id    VARCHAR NOT NULL,   -- random-init:seedN when the weights were random
    preprocess    VARCHAR NOT NULL,
    head          VARCHAR NOT NULL,   -- fitted out-of-fold on the attributed images' pooled feature maps
    method        VARCHAR NOT NULL,   -- cam (exact, linear head) | grad-cam (captum LayerGradCam)
    mask_method   VARCHAR,            -- how the lung mask was made (lung_masks.method)
    score         DOUBLE,             -- the head's log-odds for the positive label
    in_lung_share DOUBLE,             -- evidence mass inside the lungs / all evidence mass (NULL: no evidence)
    lung_fraction DOUBLE,             -- the lung mask's share of the input (an evenly spread map's share)
    folds         INTEGER NOT NULL,
    seed          INTEGER NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

-- Per run, backbone, head, preprocessing, source and label: images, mean in-lung share, mean lung fraction.
CREATE OR REPLACE VIEW attribution_summary AS
SELECT run_id, backbone, weights_id, head, preprocess, source, label, count(*) AS n_images,
       round(avg(in_lung_share), 3) AS mean_in_lung_share, round(avg(lung_fraction), 3) AS mean_lung_fraction,
       round(avg(in_lung_share / lung_fraction), 3) AS mean_enrichment
FROM attribution GROUP BY ALL ORDER BY ALL;
