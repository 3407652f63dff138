"""The result-row contract: one spec for the `results` table, the metric list and MLflow metric names.

Every number featstore reports is a row of `results`. This module is the single place that says
which columns a row has (their DuckDB types and meaning), which of them are metrics, and what each
metric is called in MLflow. `track` writes rows through it, `report` reads them through it, and
`tests/test_results_contract.py` checks it against `DESCRIBE results`, so the three cannot drift.

Row kinds (`kind`):
    fold         one fitted model scored on one test set (scope 'all' or one source of it)
    pooled       out-of-fold predictions of every fold's own model pooled into one set (mixed, loso).
                 Pooled LOSO mixes sources whose positive rates differ, so a model that recognises the
                 source scores well on it: a secondary number, never a headline. The mixed pooled row's
                 `metrics` carry the verdict's shortcut estimand (`shortcut`: score.source_contrast,
                 cross-source minus same-source AUC, patient-level CI; `shortcut_source_level` beside it)
                 and the model's one seen (`seen_mean`: mean per-source AUC).
    source-mean  the mean over held-out sources (each with both classes) of per-source AUCs, with a
                 source-level (cluster) bootstrap CI; `auc_worst` / `worst_source` name the worst one;
                 `gap` = the drop on new sources (seen - unseen, LOSO and seen-unseen only);
                 `metrics.below_chance`: score.below_chance over the held-out sources.
    adapt        protocol `adapt`'s learning curve: one row per (site, arm, k), the mean unseen AUC over random
                 draws of k labelled images per class from the site (`metrics`: k, arm, per_draw), its
                 t interval over draws (`uncertainty = 'draws'`); featstore/sweep/adapt.py.

`uncertainty` says what a row's CI resamples: 'image' (stratified bootstrap of the test images),
'source' (held-out sources, then images within them), 'selection' (selection seeds), 'draws' (the adapt
curve's random draws of labelled images), or NULL.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import polars as pl


@dataclass(frozen=True)
class Column:
    name: str
    type: str            # DuckDB type, as DESCRIBE prints it
    doc: str
    nullable: bool = True
    metric: bool = False  # a test-set metric: computed by score, logged to MLflow


def _c(name, type_, doc, nullable=True):
    return Column(name, type_, doc, nullable)


def _m(name, type_, doc):
    return Column(name, type_, doc, True, True)


KINDS = ("fold", "pooled", "source-mean", "adapt")

# Order = the table's column order (002_results.sql, then columns later migrations appended).
COLUMNS: tuple[Column, ...] = (
    _c("study", "VARCHAR", "study name (the config's `study`)", False),
    _c("sweep_id", "VARCHAR", "UTC start time of the sweep that made the row", False),
    _c("protocol", "VARCHAR", "mixed | loso | leave-pair-out | seen-unseen", False),
    _c("fold", "VARCHAR", "fold name (r0-f3, heldout=<source>, heldout=<a>+<b>, train=<a>+<b>, pooled[-rN])", False),
    _c("repeat", "INTEGER", "repeat index (mixed with repeats; 0 otherwise)", False),
    _c("test_set", "VARCHAR", "seen: held-out images of training sources; unseen: sources never fitted on", False),
    _c("scope", "VARCHAR", "all | one source of the test set", False),
    _c("train_sources", "VARCHAR[]", "sources the model was fitted on", False),
    _c("test_sources", "VARCHAR[]", "sources of the test set", False),
    _c("backbone", "VARCHAR", "embedding backbone", False),
    _c("weights_id", "VARCHAR", "weights identity (sha256 of the file, or random-init:seedN)", False),
    _c("preprocess", "VARCHAR", "preprocessing of the embedded images", False),
    _c("head", "VARCHAR", "logreg | grl_mlp | lightgbm", False),
    _c("target", "VARCHAR", "binary | 3class", False),
    _c("selection", "VARCHAR", "train-val | inner-loso | oracle", False),
    _c("oracle", "BOOLEAN", "true: selected ON the test set, an upper bound only", False),
    _c("params", "JSON", "the selected hyperparameters"),
    _c("seed", "INTEGER", "the study seed", False),
    _c("code_version", "VARCHAR", "featstore version (and git commit)", False),
    _c("status", "VARCHAR", "ok | failed", False),
    _c("error", "VARCHAR", "why the fold failed"),
    _m("n", "INTEGER", "test images"),
    _m("n_pos", "INTEGER", "positives in the test set"),
    _m("n_neg", "INTEGER", "negatives in the test set"),
    _m("auc", "DOUBLE", "ROC AUC (on log-odds); NULL when undefined (one class), never dropped"),
    _m("auc_lo", "DOUBLE", "95% CI low; what it resamples is in `uncertainty`"),
    _m("auc_hi", "DOUBLE", "95% CI high"),
    _m("auc_se", "DOUBLE", "bootstrap standard error of the AUC"),
    _m("accuracy", "DOUBLE", "accuracy at threshold 0.5"),
    _m("sensitivity", "DOUBLE", "true positive rate"),
    _m("specificity", "DOUBLE", "true negative rate"),
    _m("ppv", "DOUBLE", "positive predictive value"),
    _m("npv", "DOUBLE", "negative predictive value"),
    _m("f1", "DOUBLE", "F1 of the positive class"),
    _m("balanced_accuracy", "DOUBLE", "(sensitivity + specificity) / 2; 3-class: mean per-class accuracy"),
    _m("dor", "DOUBLE", "diagnostic odds ratio, +0.5 continuity correction"),
    _m("brier", "DOUBLE", "Brier score"),
    _m("gap", "DOUBLE", "AUC(seen) - AUC(unseen), on the unseen row"),
    _m("gap_p", "DOUBLE", "two-sided p of the gap"),
    _c("metrics", "JSON", "every metric (3-class per-class ones too)"),
    _c("val_score", "DOUBLE", "the selection score of the chosen trial"),
    _c("n_trials", "INTEGER", "Optuna trials run"),
    _c("n_trials_failed", "INTEGER", "trials that failed"),
    _c("n_dropped_shared", "INTEGER", "training images dropped because they also occur in a test source"),
    _c("notes", "VARCHAR", "warnings about the fold"),
    _c("bootstrap", "INTEGER", "bootstrap resamples behind the CIs"),
    _c("mlflow_run_id", "VARCHAR", "the MLflow run of the row"),
    _c("seconds", "DOUBLE", "search + fit seconds"),
    _c("created_at", "TIMESTAMP", "when the row was written", False),
    # 006_result_contract.sql
    _c("kind", "VARCHAR", "fold | pooled | source-mean | adapt (see featstore/results.py)", False),
    _c("uncertainty", "VARCHAR", "what the CI resamples: image | source | selection | draws"),
    _m("gap_lo", "DOUBLE", "95% CI of the gap, low"),
    _m("gap_hi", "DOUBLE", "95% CI of the gap, high"),
    _m("n_sources", "INTEGER", "held-out sources behind the number"),
    _m("auc_worst", "DOUBLE", "source-mean rows: the lowest per-source AUC"),
    _c("worst_source", "VARCHAR", "source-mean rows: the source with the lowest AUC"),
    _c("source_rule", "VARCHAR", "how an image that occurs in several sources was assigned to them"),
    _c("neardup_policy", "VARCHAR", "near_duplicates setting: drop-from-train | warn | refuse | ignore"),
    _c("neardup_links", "INTEGER", "near-duplicate pairs among the study's images that were used"),
    _c("neardup_thresholds", "VARCHAR", "the thresholds those pairs were found with"),
    _c("neardup_found_at", "TIMESTAMP", "when the newest pair used was found (NULL: none)"),
    _c("mask_method", "VARCHAR", "lung-mask method(s) behind a lung-ROI preprocessing (NULL otherwise)"),
    _c("fit_info", "JSON", "what the head reports about its fit (e.g. GRL best_epoch, n_epochs)"),
)

NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
# The metrics score computes per test set, in column order.
METRICS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.metric and c.name not in
                                 ("gap", "gap_p", "gap_lo", "gap_hi", "n_sources", "auc_worst"))
LIST_COLUMNS = tuple(c.name for c in COLUMNS if c.type.endswith("[]"))

# One metric vocabulary for MLflow unit runs, the same names whatever the protocol, so the
# comparison view lines runs up column by column.
UNIT_METRICS = {
    "auc_seen": "seen: mean over the training sources of the per-source AUC on their held-out images (mixed "
                "k-fold, or seen-unseen's seen set): the seen of the table, the figures and the gap",
    "auc_unseen_mean": "mean over held-out sources (both classes) of the per-source AUC",
    "auc_unseen_mean_lo": "its 95% CI low (see uncertainty)",
    "auc_unseen_mean_hi": "its 95% CI high",
    "auc_unseen_worst": "the lowest per-source AUC among held-out sources",
    "auc_unseen_pooled": "AUC of pooled out-of-fold predictions (prevalence-sensitive: secondary)",
    "gap": "auc_seen - auc_unseen_mean",
    "gap_lo": "its 95% CI low",
    "gap_hi": "its 95% CI high",
    "balanced_accuracy_unseen_mean": "mean over held-out sources of balanced accuracy",
    "n_unseen_sources": "held-out sources with both classes behind the mean",
    "shortcut": "does it use the source? AUC over cross-source minus same-source positive-negative pairs of the "
                "mixed out-of-fold predictions (score.source_contrast)",
    "shortcut_lo": "its 95% CI low (patients resampled within sources)",
    "shortcut_hi": "its 95% CI high",
    "auc_cross_source": "AUC over positive-negative pairs from different sources (mixed out-of-fold)",
    "auc_same_source": "AUC over positive-negative pairs from the same source (mixed out-of-fold)",
    "n_shortcut_sources": "sources behind the shortcut estimand",
    "worst_group_auc_unseen": "held-out images: the lowest (source x label) group AUC, a group against every image "
                              "of the other label (score.group_metrics; pooled, else the folds' mean)",
    "worst_group_accuracy_unseen": "held-out images: the lowest (source x label) group accuracy",
    "ece_unseen": "held-out images: expected calibration error of P(positive), 10 equal-width bins (score.ece)",
}


def mlflow_name(metric: str, test_set: str | None = None, scope: str | None = None) -> str:
    """`auc_unseen`, `auc_unseen.<source>`: metric first, so MLflow sorts a metric's variants together."""
    name = metric if not test_set or test_set == "-" else f"{metric}_{test_set}"
    if scope and scope != "all":
        name += "." + mlflow_safe(scope)
    return name


def mlflow_safe(text: str) -> str:
    """A source name (any text) as part of an MLflow metric name, which allows few characters and
    refuses a name that path normalisation would change ("a//b", "../x", "x/", "a/./b"): other
    characters, and empty, "." and ".." segments, become underscores. The real name stays in the
    run's params and tags."""
    import hashlib

    text = str(text)
    s = re.sub(r"[^0-9A-Za-z_\-. /]", "_", text)
    s = "/".join(p if p not in ("", ".", "..") else "_" * max(len(p), 1) for p in s.split("/"))
    # a changed name carries a short hash of the real one, so two sources never share a metric
    return s if s == text else f"{s}_{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def _json(v):
    def clean(x):
        if isinstance(x, dict):
            return {str(k): clean(w) for k, w in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(w) for w in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x
    return json.dumps(clean(v), sort_keys=True, default=float) if v is not None else None


def normalise(row: dict, now: datetime | None = None) -> dict:
    """A row as the table stores it: every column present, JSON as text, NaN/inf as NULL.
    Unknown keys are an error: a row carries exactly the contract's columns."""
    extra = set(row) - set(NAMES)
    if extra:
        raise KeyError(f"result row has columns the contract does not know: {sorted(extra)}")
    if row.get("kind", "fold") not in KINDS:
        raise ValueError(f"result row kind '{row['kind']}' not one of {KINDS}")
    out = {}
    for c in COLUMNS:
        v = row.get(c.name)
        if c.type == "JSON":
            v = _json(v)
        elif c.name == "created_at":
            v = v or now or datetime.now(timezone.utc).replace(tzinfo=None)
        elif c.name == "kind":
            v = v or "fold"
        elif isinstance(v, float) and not math.isfinite(v):
            v = None
        if v is None and not c.nullable:
            raise ValueError(f"result row column '{c.name}' must not be NULL")
        out[c.name] = v
    return out


def ddl() -> str:
    """CREATE TABLE text for the contract (what 002 + 006 migrations build)."""
    cols = ",\n".join(f"    {c.name} {c.type}{'' if c.nullable else ' NOT NULL'}" for c in COLUMNS)
    return f"CREATE TABLE results (\n{cols}\n);"


def _ok(rows, **eq):
    return [r for r in rows if r.get("status", "ok") == "ok" and all(r.get(k) == v for k, v in eq.items())]


def unseen_units(rows: list[dict]) -> list[tuple[str, float | None]]:
    """(held-out unit, AUC) for one model unit's rows: per held-out source for loso and seen-unseen,
    per held-out pair for leave-pair-out (its sources have one class each, so the pair is the unit)."""
    out = []
    for r in _ok(rows, kind="fold", test_set="unseen"):
        if r["protocol"] == "leave-pair-out":
            if r["scope"] == "all":
                out.append(("+".join(r["test_sources"]), r.get("auc")))
        elif r["scope"] != "all" or len(r["test_sources"]) == 1:
            out.append((r["scope"] if r["scope"] != "all" else r["test_sources"][0], r.get("auc")))
    return sorted(out, key=lambda t: t[0])


def unit_summary(rows: list[dict]) -> dict:
    """The unit-level vocabulary (UNIT_METRICS) from one unit's rows, whatever the protocol.
    A source-mean row, where scoring made one, supplies the CI; else the mean has none."""
    out: dict = {}
    seen = [r for r in _ok(rows, test_set="seen", scope="all") if r["kind"] in ("pooled", "fold")]
    pooled_seen = [r for r in seen if r["kind"] == "pooled"]
    seen = pooled_seen or seen
    if len(seen) == 1 and seen[0].get("auc") is not None:
        out["auc_seen"] = seen[0]["auc"]
    elif seen:
        vals = [r["auc"] for r in seen if r.get("auc") is not None]
        if vals:
            out["auc_seen"] = sum(vals) / len(vals)
    for r in pooled_seen[:1]:  # mixed: the one seen (mean per-source AUC) and the shortcut estimand
        m = r.get("metrics") or {}
        if m.get("seen_mean") is not None:
            out["auc_seen"] = m["seen_mean"]
        sc = m.get("shortcut") or {}
        out.update(shortcut=sc.get("estimate"), shortcut_lo=sc.get("lo"), shortcut_hi=sc.get("hi"),
                   auc_cross_source=sc.get("cross"), auc_same_source=sc.get("same"),
                   n_shortcut_sources=sc.get("n_sources") if sc.get("estimate") is not None else None)
    units = [(u, a) for u, a in unseen_units(rows) if a is not None]
    if units:
        out["auc_unseen_mean"] = sum(a for _, a in units) / len(units)
        out["auc_unseen_worst"] = min(a for _, a in units)
        out["n_unseen_sources"] = len(units)
        bal = [r.get("balanced_accuracy") for r in _ok(rows, kind="fold", test_set="unseen")
               if r.get("balanced_accuracy") is not None and (r["scope"] != "all" or len(r["test_sources"]) == 1)]
        if bal:
            out["balanced_accuracy_unseen_mean"] = sum(bal) / len(bal)
    sm = _ok(rows, kind="source-mean", test_set="unseen", scope="all")
    if sm:
        out.update(auc_unseen_mean=sm[0]["auc"], auc_unseen_mean_lo=sm[0].get("auc_lo"),
                   auc_unseen_mean_hi=sm[0].get("auc_hi"))
        if sm[0].get("gap") is not None:
            out.update(gap=sm[0]["gap"], gap_lo=sm[0].get("gap_lo"), gap_hi=sm[0].get("gap_hi"))
            gi = (sm[0].get("metrics") or {}).get("gap") or {}
            if gi.get("seen") is not None and sm[0]["protocol"] != "leave-pair-out":
                out["auc_seen"] = gi["seen"]  # the seen the gap subtracts from
    pooled_unseen = _ok(rows, kind="pooled", test_set="unseen", scope="all")
    if pooled_unseen and pooled_unseen[0].get("auc") is not None:
        out["auc_unseen_pooled"] = pooled_unseen[0]["auc"]
    # worst group and calibration on the held-out images: the pooled row, else the mean over folds
    for key in ("worst_group_auc", "worst_group_accuracy", "ece"):
        src = pooled_unseen or _ok(rows, kind="fold", test_set="unseen", scope="all")
        vals = [(r.get("metrics") or {}).get(key) if isinstance(r.get("metrics"), dict) else None for r in src]
        vals = [v for v in vals if v is not None]
        if vals:
            out[f"{key}_unseen"] = sum(vals) / len(vals)
    if "gap" not in out and "auc_seen" in out and "auc_unseen_mean" in out:
        out["gap"] = out["auc_seen"] - out["auc_unseen_mean"]
    return {k: v for k, v in out.items() if v is not None}


# --- reading rows: what identifies a model, where its headline number is ----------------------------

MODEL = ["backbone", "preprocess", "head", "selection"]


def source_mean(g: pl.DataFrame, proto: str) -> dict | None:
    """The row of kind source-mean for `proto` in one model's rows `g`, metrics parsed; None if absent."""
    d = g.filter((pl.col("protocol") == proto) & (pl.col("kind") == "source-mean"))
    if not d.height:
        return None
    r = d.row(0, named=True)
    if isinstance(r.get("metrics"), str):
        r["metrics"] = json.loads(r["metrics"])
    return r
