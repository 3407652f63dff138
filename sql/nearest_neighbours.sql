-- The k images most similar to one image by cosine similarity of their embeddings.
-- Variables (featstore sql -f sql/nearest_neighbours.sql --var image_id=... --var backbone=... --var k=10):
--   image_id   default: the first image by id that has an embedding
--   backbone   default: the embedding set with the most images
--   preprocess default: original
SET VARIABLE backbone = coalesce(getvariable('backbone'),
    (SELECT backbone FROM embedding_sets ORDER BY n_images DESC, backbone LIMIT 1));
SET VARIABLE preprocess = coalesce(getvariable('preprocess'), 'original');
SET VARIABLE image_id = coalesce(getvariable('image_id'),
    (SELECT min(image_id) FROM embeddings
     WHERE backbone = getvariable('backbone') AND preprocess = getvariable('preprocess')));
WITH q AS (
    SELECT weights_id, vector FROM embeddings
    WHERE image_id = getvariable('image_id') AND backbone = getvariable('backbone')
      AND preprocess = getvariable('preprocess')
), top AS (  -- rank first, join the metadata of the k winners only (joining all rows first is 6x slower)
    SELECT e.image_id, list_cosine_similarity(e.vector, q.vector) AS sim
    FROM embeddings e JOIN q USING (weights_id)
    WHERE e.backbone = getvariable('backbone') AND e.preprocess = getvariable('preprocess')
      AND e.image_id <> getvariable('image_id')
    ORDER BY sim DESC, e.image_id  -- rank on the exact value, not the rounded one
    LIMIT coalesce(getvariable('k')::INTEGER, 10)
)
SELECT t.image_id, i.source, i.label, i.class, round(t.sim, 4) AS similarity, i.path
FROM top t JOIN images i USING (image_id)
ORDER BY t.sim DESC, t.image_id;
