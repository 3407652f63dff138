"""`featstore sweep`, one file per step, in the order the data flows:

config    the study config: schema, reading, validation (no store)
data      the arrays a study runs on, read through the public store API (featstore.api.Store)
plan      every protocol's folds, checked feasible, and the Optuna tasks with their selection splits
fit       Optuna per task (journal or PostgreSQL), then the selected head refitted and its test predictions
adapt     protocol `adapt`: the learning curves (k labelled images of the held-out site added, refitted)
rows      task results -> result rows of the contract (featstore.results): metrics, CIs, source means
tracking  rows -> the MLflow run tree (unit -> fold -> trial)
ensemble  the `ensemble` head: members' log-odds averaged fold by fold (no refit), scored and tracked as a head
run       `featstore sweep` / `featstore sweep-worker`: wires the steps, writes the store once at the end

`python -m featstore.sweep.config` prints the study config's JSON schema.
"""
