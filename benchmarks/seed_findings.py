"""Issue 25's seed findings on ../shared/cxr: adaptation curves, the ensemble beside its members, in-lung
attribution share per source. Prints Markdown (a section of benchmarks/RESULTS.md).

    python benchmarks/seed_findings.py --db STORE --workdir DIR [--from-store]

STORE must hold ../shared/cxr ingested and embedded with mobilenetv3-nih-onnx (`featstore ingest`, `featstore
embed --backbone mobilenetv3-nih-onnx --weights-dir ../shared/weights`). Without --from-store it runs, in DIR:
`featstore masks --method classical-v1`, the two studies below (`featstore sweep`), and `featstore attribution`
with a RANDOM-INIT xrv-densenet121-res224-all (no weights needed; say so wherever the numbers go); with it,
it only reads the latest rows of those studies and the latest attribution run from STORE.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from _common import bench_workdir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

ADAPT = """study: cxr-adapt
target: binary
positive: covid
backbones: [mobilenetv3-nih-onnx]
heads:
  logreg: {trials: 8}
protocols:
  adapt: {ks: [0, 5, 10, 20, 40, 80], draws: 10}
selection: train-val
seed: 0
bootstrap: 200
"""
ENSEMBLE = """study: cxr-ensemble
target: binary
positive: covid
backbones: [mobilenetv3-nih-onnx]
heads:
  logreg: {trials: 8}
  lightgbm: {trials: 4}
protocols:
  mixed: {folds: 5}
  loso: {}
  leave-pair-out: {}
ensembles:
  - heads: [logreg, lightgbm]
selection: train-val
seed: 0
bootstrap: 500
"""


def featstore(*args, cwd):
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "featstore.cli", *args], cwd=cwd, check=True,
                   env={**__import__("os").environ, "PYTHONPATH": str(HERE.parent)})
    return time.time() - t0


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def f3(v):
    return "–" if v is None else f"{v:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--workdir", type=Path, default=Path("seed-findings-work"))
    ap.add_argument("--from-store", action="store_true", help="read the rows already stored; run nothing")
    ap.add_argument("--per-source", type=int, default=60)
    a = ap.parse_args()
    db = str(Path(a.db).resolve())
    secs = {}
    if not a.from_store:
        bench_workdir(a.workdir)  # its study configs are rewritten here
        (a.workdir / "cxr_adapt.yaml").write_text(ADAPT)
        (a.workdir / "cxr_ensemble.yaml").write_text(ENSEMBLE)
        secs["masks"] = featstore("masks", "--method", "classical-v1", "--db", db, cwd=a.workdir)
        secs["adapt sweep"] = featstore("sweep", "cxr_adapt.yaml", "--db", db, cwd=a.workdir)
        secs["ensemble sweep"] = featstore("sweep", "cxr_ensemble.yaml", "--db", db, cwd=a.workdir)
        secs["attribution"] = featstore("attribution", "--backbone", "xrv-densenet121-res224-all", "--weights",
                                        "random-init", "--per-source", str(a.per_source), "--db", db,
                                        "--out", str(a.workdir / "attribution"), cwd=a.workdir)
    from featstore.api import open_store
    from featstore.attribution import summarise
    from featstore.store import attribution_rows

    with open_store(db) as fs:
        ad = fs.results(study="cxr-adapt").filter(pl.col("kind") == "adapt")
        ens = fs.results(study="cxr-ensemble")
        att = attribution_rows(fs.con)
    out = ["## Issue 25: adapting to a new site, the ensemble head, attribution inside the lungs "
           "(benchmarks/seed_findings.py)\n",
           "On ../shared/cxr, mobilenetv3-nih-onnx embeddings. "
           + (", ".join(f"{k} {v:.0f} s" for k, v in secs.items()) + " (2 cores, nice)." if secs else
              "Rows read from the store (`--from-store`).") + "\n"]
    out.append("### Adapting to a held-out site (protocol adapt, logreg)\n")
    out.append("Unseen AUC on the site's images never added, mean over draws [95% t interval over the **draws** of "
               "the k images; the scored images' own sampling is not in it]. Sites: those with both classes and "
               "room for k = 5 per class (figure1 has 5 non-COVID images: no room). Ks a site cannot give while "
               "keeping max(k, 10) of each class to score are left out.\n")
    rows = []
    for r in ad.sort(["scope", "fold"]).iter_rows(named=True):
        m = json.loads(r["metrics"]) if isinstance(r["metrics"], str) else r["metrics"]
        rows.append((r["scope"], m["arm"], m["k"], f"{f3(r['auc'])} [{f3(r['auc_lo'])}, {f3(r['auc_hi'])}]",
                     m["n_draws"], r["n"]))
    rows.sort(key=lambda t: (t[0], t[1] != "with-sources", t[2]))
    out.append(table(["site", "trained on", "k per class", "AUC [95% CI over draws]", "draws", "images scored"],
                     rows) + "\n")
    out.append("### The ensemble beside its members (cxr-ensemble)\n")
    out.append("Mean per-source AUC over held-out sources (LOSO: source-level 95% CI; leave-pair-out: mean over "
               "pairs, no CI) and the mixed 5-fold pooled out-of-fold AUC (image-level CI).\n")
    rows = []
    for h in sorted(set(ens["head"].to_list()), key=lambda h: (h.startswith("ensemble"), h)):
        g = ens.filter(pl.col("head") == h)

        def pick(proto, kind):
            d = g.filter((pl.col("protocol") == proto) & (pl.col("kind") == kind) & (pl.col("scope") == "all")
                         & (pl.col("test_set") == ("seen" if proto == "mixed" else "unseen")))
            if not d.height:
                return "–"
            r = d.row(0, named=True)
            return f3(r["auc"]) + (f" [{f3(r['auc_lo'])}, {f3(r['auc_hi'])}]" if r["auc_lo"] is not None else "")
        rows.append((h, pick("mixed", "pooled"), pick("loso", "source-mean"), pick("leave-pair-out", "source-mean")))
    out.append(table(["head", "mixed 5-fold pooled AUC", "LOSO mean per-source AUC", "leave-pair-out mean"], rows)
               + "\n")
    if att.height:
        s = summarise(att)
        out.append("### In-lung attribution share per source (featstore attribution)\n")
        out.append(f"xrv-densenet121-res224-all with **RANDOM-INIT weights** ({att['weights_id'][0].split(';')[0]}; "
                   "no trained weights offline): the maps say where a random trunk's features carry the head's "
                   "evidence, not where a trained model looks. Head logreg fitted out-of-fold (5 folds, patients "
                   f"grouped) on the pooled maps; method {att['method'][0]} against the training mean map; "
                   f"{att.height} images (a seeded draw of up to {a.per_source // 1} per source among those with a "
                   "classical-v1 lung mask that passed the checks). 95% t interval over images.\n")
        rows = [(x["source"], x["label"], x["n"], f"{x['in_lung_share']:.3f}"
                 + (f" [{x['lo']:.3f}, {x['hi']:.3f}]" if x["lo"] is not None else ""),
                 f"{x['lung_fraction']:.3f}", f"{x['enrichment']:.2f}") for x in s.iter_rows(named=True)]
        out.append(table(["source", "label", "images", "in-lung share [95% CI]", "lung area", "enrichment"], rows)
                   + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
