-- featstore schema version 6: the result-row contract (featstore/results.py is its spec).
-- What used to be parsed out of fold-name strings gets its own columns, and every row records the
-- state it depended on (near-duplicate links, lung-mask method, how shared images were assigned).
ALTER TABLE results ADD COLUMN kind VARCHAR DEFAULT 'fold';
ALTER TABLE results ALTER COLUMN kind SET NOT NULL;
ALTER TABLE results ADD COLUMN uncertainty VARCHAR;        -- image | source | selection: what the CI resamples
ALTER TABLE results ADD COLUMN gap_lo DOUBLE;
ALTER TABLE results ADD COLUMN gap_hi DOUBLE;
ALTER TABLE results ADD COLUMN n_sources INTEGER;
ALTER TABLE results ADD COLUMN auc_worst DOUBLE;
ALTER TABLE results ADD COLUMN worst_source VARCHAR;
ALTER TABLE results ADD COLUMN source_rule VARCHAR;
ALTER TABLE results ADD COLUMN neardup_policy VARCHAR;
ALTER TABLE results ADD COLUMN neardup_links INTEGER;
ALTER TABLE results ADD COLUMN neardup_thresholds VARCHAR;
ALTER TABLE results ADD COLUMN neardup_found_at TIMESTAMP;
ALTER TABLE results ADD COLUMN mask_method VARCHAR;
ALTER TABLE results ADD COLUMN fit_info JSON;
ALTER TABLE predictions ADD COLUMN seed INTEGER;  -- the selection seed (several with selection_repeats)
-- DuckDB: updates after the ALTERs, in one transaction
UPDATE results SET kind = CASE WHEN starts_with(fold, 'pooled') THEN 'pooled' ELSE 'fold' END;
UPDATE results SET uncertainty = 'image' WHERE auc_lo IS NOT NULL;

CREATE OR REPLACE VIEW latest_results AS
SELECT r.* FROM results r
JOIN (SELECT study, max(sweep_id) AS sweep_id FROM results GROUP BY study) l USING (study, sweep_id);

-- Per unit and test set, over folds (each fold one model): mean, spread, worst.
CREATE OR REPLACE VIEW result_summary AS
SELECT study, sweep_id, backbone, preprocess, head, selection, oracle, protocol, test_set,
       count(*)                       AS n_folds,
       count(auc)                     AS n_folds_with_auc,
       avg(auc)                       AS auc_mean,
       stddev_samp(auc)               AS auc_std,
       min(auc)                       AS auc_worst,
       arg_min(fold, auc)             AS worst_fold,
       avg(balanced_accuracy)         AS balanced_accuracy_mean
FROM results
WHERE scope = 'all' AND kind = 'fold' AND status = 'ok'
GROUP BY ALL ORDER BY ALL;
