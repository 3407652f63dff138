-- Everything that failed to ingest and has not been ingested since, newest first,
-- plus the images that failed to decode at embed time.
SELECT 'ingest' AS stage, source, file, reason, row_number, last_seen AS time
FROM open_ingest_errors
UNION ALL
SELECT 'embed' AS stage, i.source, e.path AS file, e.reason || ' [' || e.backbone || '/' || e.preprocess || ']',
       NULL, e.time
FROM embed_errors e LEFT JOIN images i USING (image_id)
ORDER BY time DESC, source, file;
