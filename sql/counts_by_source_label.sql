-- Images per source x label. A file listed by two sources counts in both
-- (n_occurrences); n_images counts distinct contents.
SELECT source, label, n_occurrences, n_images
FROM source_label_counts
ORDER BY source, label;
