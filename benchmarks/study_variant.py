"""Issue 27: a faster variant of the shipped real study against the study as shipped, side by side: time
by head, and whether the study's conclusions move (each model's verdict and its two answers, and every
per-source AUC against the shipped run's interval).

    python benchmarks/study_variant.py --db STORE [--set HEAD.PARAM=VALUE ...] [--trials HEAD=N ...]
                                       [--baseline SWEEP_ID] [--study featstore/studies/cxr_shortcut.yaml]

STORE holds the real set's mobilenetv3-nih-onnx embeddings (end_to_end.py leaves one). Without --baseline
both arms run here, one after the other, with the study's workers: "shipped" (the config as it is) and
"variant" (the config with each --set fixed on its head and each --trials budget). With --baseline the
shipped arm is that earlier sweep's stored rows (`latest`: the study's newest sweep in STORE; its time is
not re-measured, the table says so). The sweeps run on a copy of STORE in a temporary folder: STORE is
only read.
A model's conclusions "move" when its verdict, or either answer behind it (does it use the source; does
it hold on new sources), differs; a per-source AUC moves when the variant's lies outside the shipped
95% interval (the interval resamples what its row says: images of that source).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from _common import REPO, table


def _value(v: str):
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def variant_config(raw: dict, sets: list[str], trials: list[str]) -> dict:
    """The shipped config with head.param=value fixed and head=n trials."""
    raw = json.loads(json.dumps(raw))
    for s in sets:
        key, _, val = s.partition("=")
        head, _, param = key.partition(".")
        if head not in raw["heads"] or not param or not val:
            raise SystemExit(f"--set {s!r}: want HEAD.PARAM=VALUE with HEAD one of {sorted(raw['heads'])}")
        h = raw["heads"][head] = dict(raw["heads"][head] or {})
        h["fixed"] = {**(h.get("fixed") or {}), param: _value(val)}
    for s in trials:
        head, _, n = s.partition("=")
        if head not in raw["heads"] or not n.isdigit():
            raise SystemExit(f"--trials {s!r}: want HEAD=N with HEAD one of {sorted(raw['heads'])}")
        raw["heads"][head] = {**(raw["heads"][head] or {}), "trials": int(n)}
    return raw


def compare(base, var) -> tuple[list, list, int, int]:
    """(model rows, AUC rows to show, models moved, AUCs outside the shipped interval, AUCs compared) between
    two sweeps' result frames. Every row with an AUC is compared (folds, per-source scopes, pooled, source
    means); the rows shown are the headline ones (pooled, source-mean) and any that moved."""
    import polars as pl

    from featstore.verdict import model_verdicts

    vb = {m["key"]: m["verdict"] for m in model_verdicts(base)}
    vv = {m["key"]: m["verdict"] for m in model_verdicts(var)}
    models, moved = [], 0
    for key in vb:
        a, b = vb[key], vv.get(key)
        same = b is not None and (a.verdict, a.uses_source, a.transfer) == (b.verdict, b.uses_source, b.transfer)
        moved += not same
        models.append([key[2], key[3], f"{a.verdict} ({a.uses_source}; {a.transfer})",
                       f"{b.verdict} ({b.uses_source}; {b.transfer})" if b else "missing", "same" if same else "MOVED"])
    key = ["protocol", "head", "selection", "kind", "fold", "test_set", "scope"]
    keep = (pl.col("status") == "ok") & pl.col("auc").is_not_null() & (pl.col("kind") != "adapt")
    j = (base.filter(keep).select([*key, "auc", "auc_lo", "auc_hi"])
         .join(var.filter(keep).select([*key, "auc"]), on=key, suffix="_v", how="left").sort(key))
    aucs, out = [], 0
    for r in j.iter_rows(named=True):
        inside = r["auc_v"] is not None and (r["auc_lo"] is None or r["auc_lo"] <= r["auc_v"] <= r["auc_hi"])
        out += not inside
        if r["kind"] in ("pooled", "source-mean") or not inside:  # the headline rows, and every row that moved
            ci = f" [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}]" if r["auc_lo"] is not None else ""
            aucs.append([r["protocol"], r["head"], r["kind"], r["fold"], r["test_set"], r["scope"],
                         f"{r['auc']:.3f}{ci}", "-" if r["auc_v"] is None else f"{r['auc_v']:.3f}",
                         "yes" if inside else "NO"])
    return models, aucs, moved, out, j.height


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path, required=True)
    ap.add_argument("--study", type=Path, default=REPO / "featstore" / "studies" / "cxr_shortcut.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="HEAD.PARAM=VALUE")
    ap.add_argument("--trials", action="append", default=[], metavar="HEAD=N")
    ap.add_argument("--baseline", help="an earlier sweep id of the shipped study in STORE (not re-run)")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    if not a.sets and not a.trials:
        raise SystemExit("nothing to vary: give --set and/or --trials")
    import polars as pl

    from featstore.store import connect
    from featstore.sweep.config import parse_study
    from featstore.sweep.run import run_study
    from featstore.track import results_frame

    raw = yaml.safe_load(a.study.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="study-variant-"))
    db = scratch / "featstore.duckdb"
    shutil.copyfile(a.db, db)  # the sweeps write their rows here, never into STORE
    try:
        arms = {"shipped": raw, "variant": variant_config(raw, a.sets, a.trials)}
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        frames, times = {}, {}
        for arm, cfg in arms.items():
            if arm == "shipped" and a.baseline:
                with connect(db, read_only=True) as con:
                    if a.baseline == "latest":
                        a.baseline = con.execute("SELECT max(sweep_id) FROM results WHERE study = ?",
                                                 [raw["study"]]).fetchall()[0][0] or "none"
                    frames[arm] = pl.from_arrow(con.sql("SELECT * FROM results WHERE sweep_id = ?",
                                                        params=[a.baseline]).to_arrow_table())
                if not frames[arm].height:
                    raise SystemExit(f"{a.db}: no result rows of sweep {a.baseline}")
                continue
            st = parse_study(cfg)
            t0 = time.perf_counter()
            rep = run_study(st, db, workdir=scratch / arm, workers=a.workers)
            times[arm] = (time.perf_counter() - t0, rep.by_head)
            frames[arm] = results_frame(rep.rows)
        models, aucs, moved, out, n_auc = compare(frames["shipped"], frames["variant"])
        what = ", ".join(a.sets + [f"{t} trials" for t in a.trials])
        print(f"### Issue 27: the shipped real study against a faster variant ({what})\n")
        print(f"{a.study.name}; shipped arm: {'sweep ' + a.baseline + ' (stored, not re-run)' if a.baseline else 'run here'}; "
              f"variant run here after it.\n")
        rows = []
        for arm, (wall, by) in times.items():
            cpu = sum(h["cpu"] for h in by.values())
            rows.append([arm, f"{wall:.0f}", f"{cpu:.0f}"] + [f"{by[h]['cpu']:.0f}" if h in by else "-"
                                                               for h in raw["heads"]])
        print(table(["arm", "sweep wall s", "fitting CPU s"] + [f"{h} CPU s" for h in raw["heads"]], rows))
        print("\nEach model's verdict (does it use the source; does it hold on new sources):\n")
        print(table(["head", "selection", "shipped", "variant", ""], models))
        print("\nAUCs: the pooled and source-mean rows, and any row whose variant AUC is outside the shipped 95% "
              "interval (each interval resamples what its row's `uncertainty` says):\n")
        print(table(["protocol", "head", "kind", "fold", "test set", "scope", "shipped AUC [95% CI]", "variant AUC",
                     "inside the shipped CI"], aucs))
        print(f"\nModels whose conclusions moved: {moved} of {len(models)}; AUCs outside the shipped interval: {out} "
              f"of {n_auc} compared (every fold, per-source, pooled and source-mean row with an AUC).")
        wall = times["variant"][0]
        print(f"GOAL|27. the real study as a faster variant ({what}): ≤ 120 s, its conclusions unchanged|≤ 120 s, "
              f"0 models moved|{wall:.0f} s; {moved} of {len(models)} models moved, {out} of {n_auc} AUCs outside "
              f"the shipped intervals|{'met' if wall <= 120 and not moved else 'NOT met'}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
