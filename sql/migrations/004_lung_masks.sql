-- featstore schema version 4: lung masks, one per image, made once and shared by every lung-ROI
-- preprocessing (lungs-isolated/removed/framed/boxed-out, lung-crop) and every backbone.
CREATE TABLE IF NOT EXISTS lung_masks (
    image_id   VARCHAR PRIMARY KEY,
    method     VARCHAR NOT NULL,   -- manifest | xrv-pspnet | classical-v1: how the mask was made
    made_from  VARCHAR,            -- the mask file (manifest) or weights identity (xrv-pspnet)
    ok         BOOLEAN NOT NULL,   -- passed [BenAhmed2021]'s checks; false: the image is left out of lung variants
    reason     VARCHAR,            -- why it was refused (empty, smaller than half, leaks, unreadable)
    fraction   DOUBLE,             -- lung pixels / all pixels
    box_top    DOUBLE,             -- lung bounding box as fractions of height / width
    box_bottom DOUBLE,
    box_left   DOUBLE,
    box_right  DOUBLE,
    height     INTEGER,            -- the mask's own resolution
    width      INTEGER,
    mask       BLOB,               -- 1-bit PNG; NULL when no mask could be made
    made_at    TIMESTAMP NOT NULL
);

-- How many masks each method made per source, and how many were refused.
CREATE OR REPLACE VIEW lung_mask_summary AS
SELECT i.source, m.method, count(*) AS n_masks, count(*) FILTER (WHERE m.ok) AS n_ok,
       count(*) FILTER (WHERE NOT m.ok) AS n_refused, round(avg(m.fraction) FILTER (WHERE m.ok), 3) AS mean_fraction
FROM lung_masks m JOIN images i USING (image_id) GROUP BY ALL ORDER BY i.source, m.method;
