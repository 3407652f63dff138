"""How featstore's costs grow with the collection (issue 27): SYNTHETIC 1024-d vectors with the real set's
structure, at 10k, 100k and 1M images (`--sizes`), time and peak memory of each stage, and the growth
exponent between sizes (the log-log slope: 1 is linear, 2 quadratic).

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--trials 2] [--cap 1800] [--workdir DIR]

Structure, from ../shared/cxr's manifest: the six sources in its proportions (cohen_ieee8023 13%,
covid_cxnet 22%, figure1 1%, actualmed 1%, nih_cxr14 39%, pediatric_guangzhou 24%), each with its COVID
prevalence (81%, 100%, 88%, 59%, 0%, 0%), patients holding 1-4 images (mean ~1.5); vectors from
featstore.testing.synthetic_vectors (shaped like a CNN's: narrow cone, clusters) plus a source offset and a
weaker label direction, so the heads have a shortcut and a signal to find. Stored as the embedding set of
`xrv-densenet121-res224-all` (1024-d) with a weights id naming it synthetic, so the shipped study runs on it
unchanged but for its backbone and its trial budget (`--trials` per head and Optuna study: stated in the
table). Each stage runs in its own process (its own peak memory, process + workers), stopped at `--cap`
seconds (then reported as "> cap", a lower bound, and its slope as a lower bound).

Stages: ingest-to-store (image, occurrence and vector rows written), the study per head (logreg,
lightgbm, grl_mlp, each alone over the study's four protocols), the headline (seen-vs-unseen table from the
rows), the report (`featstore report`), the probe (`featstore probe`, 5 folds, 200 bootstrap draws).
Goals: the study at 100k in <= 30 min on 2 cores; memory <= 8 GiB at 1M for all but one head's fit.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

from _common import REPO, PeakMemory, bench_workdir, goal, table

SOURCES = [  # name, share of images, COVID prevalence (../shared/cxr/manifest.csv)
    ("cohen_ieee8023", 527, 427 / 527), ("covid_cxnet", 898, 1.0), ("figure1", 40, 35 / 40),
    ("actualmed", 44, 26 / 44), ("nih_cxr14", 1605, 0.0), ("pediatric_guangzhou", 960, 0.0)]
BACKBONE = "xrv-densenet121-res224-all"
DIM = 1024
HEADS = ("logreg", "lightgbm", "grl_mlp")
STUDY_30MIN = 30 * 60
MEM_BAR_GIB = 8.0


def synthetic_set(n: int, seed: int = 0):
    """The synthetic collection's structure: per image its source index, COVID flag and patient number, and
    a function giving the 1024-d vectors of rows [b0, b1) (made block by block: 1M x 1024 is 4 GiB)."""
    import numpy as np

    from featstore.testing import synthetic_vectors

    g = np.random.default_rng(seed)
    share = np.array([s[1] for s in SOURCES], float)
    src = g.choice(len(SOURCES), n, p=share / share.sum())
    covid = g.random(n) < np.array([s[2] for s in SOURCES])[src]
    # patients: runs of 1-4 images within a source and label (mean ~1.5)
    order = np.lexsort((covid, src))
    patient = np.empty(n, np.int64)
    i = pid = 0
    while i < n:
        m = int(min(g.choice([1, 1, 2, 3, 4][: 2 + (pid % 3)]), n - i))
        patient[order[i:i + m]] = pid
        i, pid = i + m, pid + 1
    offs = g.standard_normal((len(SOURCES), DIM)).astype(np.float32) * np.float32(0.35 / np.sqrt(DIM))
    lab_dir = g.standard_normal(DIM).astype(np.float32) * np.float32(0.12 / np.sqrt(DIM))

    def vectors(b0: int, b1: int):
        X = synthetic_vectors(b1 - b0, DIM, seed, start=b0) + offs[src[b0:b1]] + \
            np.where(covid[b0:b1, None], lab_dir, -lab_dir)
        return X.astype(np.float32)
    return src, covid, patient, vectors


def write_store(db: str, n: int, seed: int = 0) -> None:
    """The synthetic store: images, occurrences and one 1024-d embedding set, in 20k-row blocks."""
    import hashlib
    from datetime import datetime

    import pyarrow as pa

    from featstore.backbone_specs import XRV_PIPELINE, with_pipeline
    from featstore.store import connect, ensure_embedding_table

    src, covid, patient, vectors = synthetic_set(n, seed)
    wid = with_pipeline("synthetic:benchmarks/scale.py", XRV_PIPELINE)
    con = connect(db)
    try:
        tbl = ensure_embedding_table(con, DIM)
        now = datetime.now()
        for b0 in range(0, n, 20_000):
            b1 = min(n, b0 + 20_000)
            ids = [hashlib.sha256(f"scale:{seed}:{i}".encode()).hexdigest() for i in range(b0, b1)]
            s = [SOURCES[k][0] for k in src[b0:b1]]
            lab = ["covid" if c else "non_covid" for c in covid[b0:b1]]
            con.register("_i", pa.table({
                "image_id": ids, "source": s, "label": lab, "patient_id": [f"{s[j]}:{patient[b0 + j]}" for j in range(b1 - b0)],
                "width": [1] * (b1 - b0), "height": [1] * (b1 - b0), "bit_depth": [8] * (b1 - b0),
                "format": ["PNG"] * (b1 - b0), "n_bytes": [1] * (b1 - b0), "path": ids,
                "ingested_at": pa.array([now] * (b1 - b0), pa.timestamp("us"))}))
            con.execute("INSERT INTO images (image_id, source, label, patient_id, width, height, bit_depth, format, "
                        "n_bytes, path, ingested_at) SELECT * FROM _i")
            con.execute("INSERT INTO occurrences (image_id, source, path, label, patient_id, origin, ingest_run, "
                        "ingested_at) SELECT image_id, source, path, label, patient_id, 'benchmarks/scale.py', 0, "
                        "ingested_at FROM _i")
            X = vectors(b0, b1)
            con.register("_e", pa.table({
                "image_id": ids, "backbone": [BACKBONE] * (b1 - b0), "weights_id": [wid] * (b1 - b0),
                "preprocess": ["original"] * (b1 - b0), "dim": pa.array([DIM] * (b1 - b0), pa.int32()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), DIM),
                "embed_run": pa.array([0] * (b1 - b0), pa.int32()),
                "created_at": pa.array([now] * (b1 - b0), pa.timestamp("us"))}))
            con.execute(f"INSERT INTO {tbl} SELECT * FROM _e")
            con.unregister("_i")
            con.unregister("_e")
    finally:
        con.close()


def study_config(work: Path, head: str, trials: int) -> Path:
    import yaml

    from featstore.sweep.config import packaged_studies

    cfg = yaml.safe_load(Path(packaged_studies()["cxr_shortcut.yaml"]).read_text())
    cfg.update(study=f"scale-{head}", backbones=[BACKBONE], heads={head: {"trials": trials}}, bootstrap=200)
    p = work / f"scale-{head}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def stage(name: str, db: str, work: str, trials: int) -> dict:
    """One stage, in this (child) process; returns what it measured beyond time and memory."""
    work = Path(work)
    if name == "ingest":
        write_store(db, int(Path(work, "n").read_text()))
        return {}
    if name.startswith("study:"):
        from featstore.jobs import SweepJob

        rep = SweepJob(study_config(work, name[6:], trials), Path(db), workers=2, workdir=work).run()
        (work / f"rows-{name[6:]}.json").write_text(json.dumps(rep.rows, default=str))
        return dict(trials=rep.n_trials, rows=len(rep.rows))
    if name == "headline":
        from featstore.jobs import sweep_headline

        rows = [r for f in sorted(work.glob("rows-*.json")) for r in json.loads(f.read_text())]
        if not rows:
            raise RuntimeError("no study rows to make a headline of")
        return dict(rows=sweep_headline(rows).height)
    if name == "report":
        from featstore.jobs import ReportJob

        ReportJob(work / "report", study="scale-logreg", db=Path(db)).run()
        return {}
    if name == "probe":
        from featstore.probe import ProbeJob

        rows, _, _ = ProbeJob(BACKBONE, bootstrap=200, maps=False, db=Path(db)).run()
        return dict(rows=len(rows))
    raise ValueError(name)


def _child(name, db, work, trials, out):
    import os

    os.chdir(work)  # MLflow's store and Optuna's journal land in the work folder
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        extra = stage(name, db, work, trials)
        took = time.perf_counter() - t0
    Path(out).write_text(json.dumps(dict(seconds=took, gib=pm.gib, **extra)))


def measure(name: str, db: Path, work: Path, trials: int, cap: float) -> dict:
    out = work / f"{name.replace(':', '-')}.json"
    out.unlink(missing_ok=True)
    p = mp.get_context("spawn").Process(target=_child, args=(name, str(db), str(work), trials, str(out)))
    t0 = time.perf_counter()
    p.start()
    p.join(cap)
    if p.is_alive():  # over the cap: a lower bound
        p.kill()
        p.join()
        return dict(seconds=cap, capped=True, gib=float("nan"))
    if p.exitcode != 0 or not out.exists():
        return dict(seconds=time.perf_counter() - t0, failed=f"exit code {p.exitcode}", gib=float("nan"))
    return json.loads(out.read_text())


def slope(a: dict, b: dict, na: int, nb: int) -> str:
    if a.get("failed") or b.get("failed") or a.get("capped"):
        return "-"
    s = math.log(max(b["seconds"], 1e-3) / max(a["seconds"], 1e-3)) / math.log(nb / na)
    return f"≥ {s:.2f}" if b.get("capped") else f"{s:.2f}"


def fmt(r: dict) -> str:
    if r.get("failed"):
        return r["failed"] if r["failed"].startswith("skipped") else f"failed ({r['failed']})"
    return f"> {r['seconds']:.0f}" if r.get("capped") else f"{r['seconds']:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--trials", type=int, default=2, help="trials per head and Optuna study (the shipped: 12/6/4)")
    ap.add_argument("--cap", type=float, default=3600, help="seconds one stage may take (then a lower bound)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "scale-growth")
    ap.add_argument("--heads", default=",".join(HEADS), help="the study's heads to time, one study each")
    ap.add_argument("--stages", default=None, help="only these stages (e.g. ingest), comma-separated; default all")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    heads = a.heads.split(",")
    stages = ["ingest"] + [f"study:{h}" for h in heads] + ["headline", "report", "probe"]
    if a.stages:
        wanted = a.stages.split(",")
        if "ingest" not in wanted or set(wanted) - set(stages):
            ap.error(f"--stages: names from {', '.join(stages)}, ingest among them (the others read its store)")
        stages = [s for s in stages if s in wanted]
        heads = [h for h in heads if f"study:{h}" in stages]
    bench_workdir(a.workdir)  # its n<size> folders are remade below
    res: dict[int, dict[str, dict]] = {}
    for n in sizes:
        work = a.workdir / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)  # this script's own folder: made here, remade here
        work.mkdir(parents=True)
        (work / "n").write_text(str(n))
        db = work / "featstore.duckdb"
        res[n] = {}
        for s in stages:
            if s in ("headline", "report") and not any(work.glob("rows-*.json")):
                res[n][s] = dict(seconds=0.0, failed="skipped: no study finished under the cap", gib=float("nan"))
                continue
            res[n][s] = measure(s, db, work, a.trials, a.cap)
            sys.stderr.write(f"scale: n={n:,} {s}: {fmt(res[n][s])} s, {res[n][s].get('gib', float('nan')):.2f} GiB\n")
        if not heads:
            continue
        res[n]["study"] = dict(seconds=sum(res[n][f"study:{h}"]["seconds"] for h in heads),
                               capped=any(res[n][f"study:{h}"].get("capped") for h in heads),
                               failed=next((res[n][f"study:{h}"]["failed"] for h in heads
                                            if res[n][f"study:{h}"].get("failed")), None),
                               gib=max(res[n][f"study:{h}"].get("gib", float("nan")) for h in heads))
        if not res[n]["study"]["failed"]:
            res[n]["study"].pop("failed")
    head = ["stage"] + [f"{n:,}: s" for n in sizes] + [f"{n:,}: GiB" for n in sizes] + \
        [f"slope {x:,}→{y:,}" for x, y in zip(sizes, sizes[1:])]
    rows = []
    for s in stages + (["study"] if heads else []):
        r = [s if s != "study" else f"study, heads {'+'.join(heads)}"]
        r += [fmt(res[n][s]) for n in sizes]
        r += [f"{res[n][s].get('gib', float('nan')):.2f}" for n in sizes]
        r += [slope(res[x][s], res[y][s], x, y) for x, y in zip(sizes, sizes[1:])]
        rows.append(r)
    print("### How the costs grow (issue 27, scale.py)\n")
    print(f"SYNTHETIC vectors ({DIM}-d) with ../shared/cxr's sources, prevalences and patients; the shipped study "
          f"`cxr_shortcut` (4 protocols) on them with {a.trials} trial(s) per head and Optuna study (the shipped "
          f"budget is 12 / 6 / 4), 200 bootstrap draws; each stage in its own process, peak memory of it and "
          f"its workers; stopped at {a.cap:.0f} s (then '> cap', a lower bound). slope: log-log growth "
          f"exponent of the wall time between sizes (1 linear, 2 quadratic). Timed once per size: "
          f"the figures carry the machine's load at that minute.\n")
    print(table(head, rows))
    if 100_000 in res and heads:
        st = res[100_000]["study"]
        every = set(heads) == set(HEADS)
        met = None if st.get("failed") else (False if st.get("capped") and st["seconds"] >= STUDY_30MIN else
                                             None if st.get("capped") or not every else st["seconds"] <= STUDY_30MIN)
        goal("27. the shipped study at 100k images, 2 cores (scale.py; reduced trials)", "≤ 30 min",
             f"{'> ' if st.get('capped') else ''}{st['seconds'] / 60:.1f} min ({a.trials} trial(s)/head; heads "
             f"{'+'.join(heads)})", met)
    if 1_000_000 in res:
        r = res[1_000_000]
        worst = max((r[s].get("gib", float("nan")), s) for s in stages if not math.isnan(r[s].get("gib", float("nan"))))
        others = [r[s]["gib"] for s in stages if s != worst[1] and not math.isnan(r[s].get("gib", float("nan")))]
        every = set(stages) == {"ingest", "headline", "report", "probe"} | {f"study:{h}" for h in HEADS}
        if every and others:
            goal("27. memory at 1M, all stages but one head's fit (scale.py)", f"≤ {MEM_BAR_GIB:.0f} GiB",
                 f"{max(others):.2f} GiB (largest: {worst[1]} {worst[0]:.2f} GiB)", max(others) <= MEM_BAR_GIB)
        else:  # a subset of the stages: their figures, the goal left open
            goal("27. memory at 1M, all stages but one head's fit (scale.py)", f"≤ {MEM_BAR_GIB:.0f} GiB",
                 "measured: " + ", ".join(f"{s} {r[s].get('gib', float('nan')):.2f} GiB" for s in stages), None)


if __name__ == "__main__":
    main()
