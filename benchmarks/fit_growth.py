"""How one fit of each head grows with the collection (issue 27), and what that makes of the shipped study
at 100k images on 2 cores.

    python benchmarks/fit_growth.py [--sizes 3971,16000,64000] [--heads logreg,lightgbm,grl_mlp]

Data: scale.py's SYNTHETIC 1024-d vectors with ../shared/cxr's sources, prevalences and patients. Each head
is fitted once per size at its default hyperparameters through `featstore.sweep.fit.fit_head` (what a trial
and a refit run), single-threaded as a study runs it, on 80 % of the images (a fold's training share),
target COVID, source as domain. Measured: the fit's CPU seconds (process time: the host's load moves it less
than wall time), sizes alternating per head in one run. slope: log-log growth exponent between sizes.

Projection to the shipped study at 100k (`--study-cpu`: the real study's fitting CPU seconds per head at
3,971 images, from end_to_end.py's per-head table): study CPU x fit(100k) / fit(3,971), the fit at 100k
extrapolated from the two largest sizes with their slope when 100k is not among them; divided by 2 cores.
A projection, labelled as one: it assumes each trial's fit grows like the default fit.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from _common import goal, table

REAL_N = 3971
# the shipped study's fitting CPU seconds per head on the real set (end_to_end.py, 2026-12-03: RESULTS.md,
# "The sweep's time by head"): trials + refits, 60 Optuna studies, 440 trials
STUDY_CPU = {"logreg": 57.0, "lightgbm": 678.0, "grl_mlp": 538.0}


def data(n: int, seed: int = 0):
    from scale import synthetic_set

    src, covid, _, vectors = synthetic_set(n, seed)
    X = vectors(0, n)
    tr = np.random.default_rng(seed).permutation(n)[: int(0.8 * n)]
    return X[tr], covid[tr].astype(int), src[tr]


def fit_cpu(head: str, X, y, d) -> float:
    from featstore.sweep.fit import fit_head, single_threaded

    with single_threaded():
        t0 = time.process_time()
        fit_head(head, {}, X, y, d, seed=0)
        return time.process_time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="3971,16000,64000")
    ap.add_argument("--heads", default="logreg,lightgbm,grl_mlp")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    heads = a.heads.split(",")
    sets = {n: data(n) for n in sizes}
    cpu = {h: {} for h in heads}
    for n in sizes:  # every head at one size, then the next: the heads see the same minutes
        for h in heads:
            cpu[h][n] = fit_cpu(h, *sets[n])
            print(f"fit_growth: {h} n={n:,}: {cpu[h][n]:.1f} CPU s", flush=True)
    rows, total = [], 0.0
    for h in heads:
        slopes = [math.log(cpu[h][b] / cpu[h][x]) / math.log(b / x) for x, b in zip(sizes, sizes[1:])]
        at = lambda n: cpu[h][n] if n in cpu[h] else \
            cpu[h][sizes[-1]] * (n / sizes[-1]) ** slopes[-1]  # noqa: E731 - from the largest measured size
        ratio = at(100_000) / (cpu[h][REAL_N] if REAL_N in cpu[h] else cpu[h][sizes[0]] * (REAL_N / sizes[0]) ** slopes[0])
        proj = STUDY_CPU.get(h, float("nan")) * ratio
        total += proj
        rows.append([h] + [f"{cpu[h][n]:.1f}" for n in sizes] + [f"{s:.2f}" for s in slopes] +
                    [f"{ratio:.0f}x", f"{proj / 60:.0f}"])
    head = ["head"] + [f"fit CPU s, {n:,}" for n in sizes] + [f"slope {x:,}→{b:,}" for x, b in zip(sizes, sizes[1:])] + \
        ["fit 100k ÷ fit 3,971", "shipped study's fitting at 100k: CPU min (projected)"]
    print("### One fit per head as the collection grows (fit_growth.py)\n")
    print(f"SYNTHETIC 1024-d vectors (scale.py's), 80 % of the images as the training share, each head at its "
          f"default hyperparameters, one thread; CPU seconds of one fit. Projection: the real study's fitting "
          f"CPU per head at 3,971 images ({', '.join(f'{h} {v:.0f} s' for h, v in STUDY_CPU.items())}) times "
          f"the fit's growth to 100k (extrapolated from the largest sizes' slope where 100k was not run).\n")
    print(table(head, rows))
    if set(heads) == set(STUDY_CPU):
        wall = total / 2 / 60
        print(f"\nThe shipped study's fitting alone at 100k: {total / 60:.0f} CPU min, so at least {wall:.0f} min "
              f"on 2 cores (perfect use of both), before scoring, tracking and writing.")
        goal("27. the shipped study at 100k images, 2 cores (fit_growth.py: fitting CPU, projected)", "≤ 30 min",
             f"≥ {wall:.0f} min (fitting alone, projected)", wall <= 30)


if __name__ == "__main__":
    main()
