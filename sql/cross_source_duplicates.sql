-- Byte-identical files listed under more than one source (one image, several
-- occurrences), and whether their labels agree.
SELECT image_id, n_occurrences, sources, labels, label_conflict, paths
FROM duplicate_groups
WHERE cross_source
ORDER BY n_occurrences DESC, image_id;
