-- Per-source centroids of one embedding set and the cosine distance between each
-- pair of centroids: how far apart the sources sit in embedding space.
-- Variables: backbone (default: the largest embedding set), preprocess (default: original).
SET VARIABLE backbone = coalesce(getvariable('backbone'),
    (SELECT backbone FROM embedding_sets ORDER BY n_images DESC, backbone LIMIT 1));
SET VARIABLE preprocess = coalesce(getvariable('preprocess'), 'original');
WITH v AS (
    SELECT i.source, e.vector FROM embeddings e JOIN images i USING (image_id)
    WHERE e.backbone = getvariable('backbone') AND e.preprocess = getvariable('preprocess')
),
el AS (  -- one row per (source, vector element)
    SELECT source, generate_subscripts(vector, 1) AS k, unnest(vector) AS x FROM v
),
c AS (
    SELECT source, list(m ORDER BY k) AS centroid, max(n) AS n_images
    FROM (SELECT source, k, avg(x) AS m, count(*) AS n FROM el GROUP BY source, k) GROUP BY source
)
SELECT a.source AS source_a, b.source AS source_b, a.n_images AS n_a, b.n_images AS n_b,
       round(1 - list_cosine_similarity(a.centroid, b.centroid), 4) AS cosine_distance
FROM c a CROSS JOIN c b
ORDER BY source_a, source_b;
