"""2, 7 and 8. The benchmark study end to end on the real set (ingest -> embed -> sweep -> report),
the second embed over the embedded store, and peak memory of embed and sweep.

    python benchmarks/end_to_end.py [--workdir DIR] [--study featstore/studies/cxr_shortcut.yaml]

Everything runs in a fresh store in --workdir (kept, so the other scripts can reuse it:
run_all.py passes it on). Peak memory = resident memory of this process plus its workers,
sampled every 0.1 s during each stage.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import MANIFEST, REPO, WEIGHTS, PeakMemory, bench_workdir, goal, need_real_set, table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--study", type=Path, default=REPO / "featstore" / "studies" / "cxr_shortcut.yaml")
    ap.add_argument("--backbone", default="mobilenetv3-nih-onnx")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    need_real_set()
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.sweep.run import run_study
    from featstore.embed import embed
    from featstore.report import write_report
    from featstore.store import connect
    from featstore.sweep.config import load_study

    bench_workdir(a.workdir, clear=True)  # a fresh store every run, in a folder that is the benchmark's own
    db = a.workdir / "featstore.duckdb"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(a.workdir / 'mlflow.db').resolve()}"
    stages = []

    def stage(name, fn):
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
        stages.append([name, f"{dt:.1f}", f"{mem.gib:.2f}"])
        return out, dt

    con = connect(db)
    rep, _ = stage("ingest", lambda: I.ingest_rows(con, I.manifest_rows(MANIFEST)[0], str(MANIFEST),
                                                   workers=a.workers))
    bb = create_backbone(a.backbone, weights_dir=WEIGHTS)
    first, t_first = stage(f"embed ({a.backbone})", lambda: embed(con, bb, "original", 64))
    second, t_second = stage("embed again (nothing to do)", lambda: embed(con, bb, "original", 64))
    con.close()
    st = load_study(a.study)
    sw, t_sweep = stage(f"sweep {a.study.name} ({a.workers} workers)",
                        lambda: run_study(st, db, workdir=a.workdir, workers=a.workers))

    def report():
        c = connect(db)
        try:
            return write_report(c, a.workdir / "report", st.study, sw.sweep_id)
        finally:
            c.close()
    stage("report", report)
    total = sum(float(s[1]) for s in stages)
    stages.append(["total", f"{total:.1f}", f"{max(float(s[2]) for s in stages):.2f}"])
    print("### 7, 8. End to end on ../shared/cxr, and peak memory\n")
    print(f"{rep.n_images:,} images ingested ({len(rep.errors)} rejected); {first.n_embedded:,} embedded at "
          f"{first.images_per_s:.0f} img/s; sweep: {sw.n_tasks} Optuna studies, {sw.n_trials} trials, "
          f"{len(sw.rows)} result rows\n")
    print(table(["stage", "wall s", "peak memory GiB (process + workers)"], stages))
    goal("3. the real study's sweep on 2 cores (end_to_end.py)", "≤ 120 s", f"{t_sweep:.0f} s", t_sweep <= 120)
    print(f"\nIssue 14, goal 3: the study's sweep in {t_sweep:.1f} s on {os.cpu_count()} cores, goal <= 120 s: "
          f"{'met' if t_sweep <= 120 else 'NOT met'} ({sw.n_trials / t_sweep:.2f} trials/s over all heads; "
          f"per head: sweep_heads.py)")
    # where the sweep's time went, per head: the workers' CPU seconds are the fitting work itself, so
    # their sum over the cores is a floor no scheduling reaches below with these methods and budgets
    cpu_all = sum(h["cpu"] for h in sw.by_head.values())
    rows = [[head, h["studies"], h["trials"], f"{h['search']:.0f}", f"{h['refit']:.0f}", f"{h['cpu']:.0f}",
             f"{h['cpu'] / max(h['trials'], 1):.2f}", f"{100 * h['cpu'] / max(cpu_all, 1e-9):.0f}%"]
            for head, h in sw.by_head.items()]
    ph = sw.phases
    print(f"\n### The sweep's time by head ({a.workers} workers on {os.cpu_count()} cores)\n")
    print(table(["head", "Optuna studies", "trials", "search s (worker wall)", "refit s (worker wall)",
                 "CPU s (search + refit)", "CPU s per trial (refits included)", "share of the CPU"], rows))
    floor = cpu_all / min(a.workers, os.cpu_count() or 1)
    print(f"\nFitting CPU {cpu_all:.0f} s over {min(a.workers, os.cpu_count() or 1)} cores: a floor of {floor:.0f} s "
          f"for this study's methods and trial budgets (the sweep took {t_sweep:.0f} s: load {ph['load']:.0f} s, "
          f"scoring and tracking in the parent {ph['score_track']:.0f} s, results written {ph['write']:.0f} s)."
          + (f" The 120 s goal needs the fitting work itself {floor / 120:.1f}x smaller." if floor > 120 else ""))
    print("\n### 2. Second embed over the embedded store\n")
    print(table(["first embed s", "second embed s", "images embedded the second time", "ratio (bar <= 0.02)"],
                [[f"{t_first:.2f}", f"{t_second:.3f}", second.n_embedded, f"{t_second / t_first:.4f}"]]))


if __name__ == "__main__":
    main()
