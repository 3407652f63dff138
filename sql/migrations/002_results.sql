-- featstore schema version 2: benchmark results and test-set predictions.
-- One `results` row per study x sweep x protocol x fold x test set x scope x head x embedding set.
-- Rows describe themselves: everything that made the number is in the row.

CREATE TABLE IF NOT EXISTS results (
    study             VARCHAR NOT NULL,
    sweep_id          VARCHAR NOT NULL,
    protocol          VARCHAR NOT NULL,   -- mixed | loso | leave-pair-out | seen-unseen
    fold              VARCHAR NOT NULL,   -- r0-f3, heldout=<source>, heldout=<a>+<b>, train=<a>+<b>, pooled[-rN]
    repeat            INTEGER NOT NULL,
    test_set          VARCHAR NOT NULL,   -- seen: held-out images of training sources; unseen: sources never fitted on
    scope             VARCHAR NOT NULL,   -- all | <one source of the test set>
    train_sources     VARCHAR[] NOT NULL,
    test_sources      VARCHAR[] NOT NULL,
    backbone          VARCHAR NOT NULL,
    weights_id        VARCHAR NOT NULL,
    preprocess        VARCHAR NOT NULL,
    head              VARCHAR NOT NULL,
    target            VARCHAR NOT NULL,   -- binary | 3class
    selection         VARCHAR NOT NULL,   -- train-val | inner-loso | oracle
    oracle            BOOLEAN NOT NULL,   -- true: selected ON the test set, an upper bound only
    params            JSON,               -- the selected hyperparameters
    seed              INTEGER NOT NULL,
    code_version      VARCHAR NOT NULL,
    status            VARCHAR NOT NULL,   -- ok | failed
    error             VARCHAR,
    n                 INTEGER,
    n_pos             INTEGER,
    n_neg             INTEGER,
    auc               DOUBLE,             -- NULL when undefined (one class), never dropped
    auc_lo            DOUBLE,             -- stratified bootstrap 95% CI
    auc_hi            DOUBLE,
    auc_se            DOUBLE,
    accuracy          DOUBLE,
    sensitivity       DOUBLE,
    specificity       DOUBLE,
    ppv               DOUBLE,
    npv               DOUBLE,
    f1                DOUBLE,
    balanced_accuracy DOUBLE,
    dor               DOUBLE,             -- diagnostic odds ratio, +0.5 continuity correction
    brier             DOUBLE,
    gap               DOUBLE,             -- seen-unseen: AUC(seen) - AUC(unseen), on the unseen row
    gap_p             DOUBLE,             -- its two-sided z-test p (bootstrap SEs)
    metrics           JSON,               -- all metrics (3-class per-class too)
    val_score         DOUBLE,             -- the selection score of the chosen trial
    n_trials          INTEGER,
    n_trials_failed   INTEGER,
    n_dropped_shared  INTEGER,            -- training images dropped because they also occur in a test source
    notes             VARCHAR,
    bootstrap         INTEGER,
    mlflow_run_id     VARCHAR,
    seconds           DOUBLE,
    created_at        TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS predictions (
    study      VARCHAR NOT NULL,
    sweep_id   VARCHAR NOT NULL,
    protocol   VARCHAR NOT NULL,
    fold       VARCHAR NOT NULL,
    test_set   VARCHAR NOT NULL,
    backbone   VARCHAR NOT NULL,
    preprocess VARCHAR NOT NULL,
    head       VARCHAR NOT NULL,
    selection  VARCHAR NOT NULL,
    image_id   VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,
    y          INTEGER NOT NULL,
    prob       DOUBLE NOT NULL,           -- P(positive) for binary, max class probability for 3-class
    score      DOUBLE NOT NULL,           -- what AUC ranks on: log-odds for binary (no saturation)
    probs      DOUBLE[] NOT NULL
);

-- The latest sweep of each study, one line per head and protocol: the headline numbers.
CREATE OR REPLACE VIEW latest_results AS
SELECT r.* FROM results r
JOIN (SELECT study, max(sweep_id) AS sweep_id FROM results GROUP BY study) l USING (study, sweep_id);

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
WHERE scope = 'all' AND NOT starts_with(fold, 'pooled') AND status = 'ok'
GROUP BY ALL ORDER BY ALL;
