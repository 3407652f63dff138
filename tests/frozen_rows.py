"""Frozen result rows for the headline and verdict tests, as DomainBed checks its reporting against
committed sweep records: three small sweeps on eight SYNTHETIC sources (alternately 85% and 10%
COVID, each with its own acquisition fingerprint, switched off for the neutral store), their pooled and
source-mean rows (what `report.headline` and `report.pooled_table` read) in tests/data/verdict_rows/.

    PYTHONPATH=. python tests/frozen_rows.py        # (re)generate this platform's set (as long as the sweeps)

tests/test_honest.py reruns the sweeps (marker slow) and compares every column, so the file cannot rot:
a change to the sweep, scoring or rows that moves a number fails there and is regenerated on purpose.

The floats also depend on the machine's numeric kernels: OpenBLAS picks its kernels by CPU (Haswell on an
AVX2-only CPU, SkylakeX where AVX-512 is), and so do numpy's SIMD loops and torch; a last-bit difference
can tip a near-tie between Optuna's trials and change the chosen model (measured: the same code gave AUCs
up to 0.19 apart on OPENBLAS_CORETYPE=Haswell vs Sandybridge). So there is one set of rows per platform
(tests/data/verdict_rows/<tag>.parquet, the platform it was made on in <tag>.platform; the machines this
project runs on have been AVX2 and AVX-512 ones): the comparison runs where a set was made on this
machine's platform, and is skipped, with the reason, where none was. The verdict and headline tests read
every committed set, on any platform: the rules must hold whichever kernels computed the rows."""
from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

FROZEN_DIR = Path(__file__).resolve().parent / "data" / "verdict_rows"
# what differs between two runs of one sweep (ids, times, the commit)
VOLATILE = ("sweep_id", "created_at", "mlflow_run_id", "seconds", "code_version")
KINDS = ("pooled", "source-mean")
# case -> (store, heads, bootstrap, protocols)
CASES = {
    "confounded": ("confounded", {"logreg": {"trials": 3}}, 200, ("mixed", "loso", "leave-pair-out")),
    "neutral": ("neutral", {"logreg": {"trials": 3}}, 200, ("mixed", "loso", "leave-pair-out")),
    "shortcut": ("confounded", {"logreg": {"trials": 2}, "lightgbm": {"trials": 2, "fixed": {"n_estimators": 50}}},
                 50, ("mixed", "loso")),
}


def platform() -> str:
    """This machine's numeric kernels, as they decide the sweeps' last bits: each BLAS library's kernel
    set (threadpoolctl), numpy's SIMD dispatch (show_config) and torch's CPU capability."""
    import numpy as np
    import scipy.linalg  # noqa: F401 - loads SciPy's own OpenBLAS, which the fits use too
    import torch
    from threadpoolctl import threadpool_info

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    # numpy's and SciPy's own BLAS, which the fits use; not another package's bundled copy (OpenCV's is
    # loaded in some test processes and not others)
    own = [i for i in libs if Path(i.get("filepath", "")).parent.name.startswith(("numpy", "scipy"))]
    blas = sorted({f"{i.get('internal_api')} {i.get('architecture')}" for i in own or libs})
    simd = "+".join(np.show_config(mode="dicts")["SIMD Extensions"]["found"]) or "baseline"
    return f"BLAS {', '.join(blas)}; numpy SIMD {simd}; torch {torch.backends.cpu.get_cpu_capability()}"


def eight_styles():
    from featstore.synth import SourceStyle

    markers = ["top-left", "top-right", "bottom-left", None]
    return tuple(SourceStyle(f"s{k}", 0.85 if k % 2 == 0 else 0.1, gamma=0.7 + 0.12 * k, marker=markers[k % 4],
                             border=(k * 3) % 11, border_value=0.95 if k % 3 == 0 else 0.0, noise=0.005 + 0.005 * k,
                             fov=0.85 + 0.04 * k, fmt=("png8", "png16", "jpeg")[k % 3]) for k in range(8))


def eight_source_stores(folder: Path) -> dict[str, Path]:
    """The confounded and the neutral store, 120 images a source, embedded with pixelstats."""
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.store import connect
    from featstore.synth import generate

    out = {}
    for name, conf in (("confounded", True), ("neutral", False)):
        f = Path(folder) / f"eight-{name}"
        m = generate(f / "data", n_per_source=120, size=96, seed=3, confounders=conf, signal=0.1,
                     sources=eight_styles())
        db = f / "fs.duckdb"
        con = connect(db)
        I.ingest_rows(con, I.manifest_rows(m)[0], str(m), workers=1)
        embed(con, create_backbone("pixelstats"), batch_size=64, workers=0)
        con.close()
        out[name] = db
    return out


def sweep_rows(db, workdir: Path, heads: dict, bootstrap: int, protocols) -> pl.DataFrame:
    from featstore.sweep.run import run_study
    from featstore.sweep.config import parse_study

    st = parse_study(dict(study="verdict", backbones=["pixelstats"], heads=heads,
                          protocols={p: ({"folds": 5} if p == "mixed" else {}) for p in protocols},
                          bootstrap=bootstrap))
    rep = run_study(st, db, workdir, f"sqlite:///{Path(workdir) / 'mlflow.db'}")
    return pl.DataFrame(rep.rows, infer_schema_length=None)


def freeze(rows: pl.DataFrame, case: str) -> pl.DataFrame:
    """One case's rows as they are kept: headline kinds, no volatile columns (the sweep's own order,
    which fixed seeds fix)."""
    return rows.filter(pl.col("kind").is_in(KINDS)).drop(VOLATILE, strict=False).select(
        pl.lit(case).alias("case"), pl.all())


def generate(folder: Path, stores: dict[str, Path] | None = None) -> dict[str, pl.DataFrame]:
    stores = stores or eight_source_stores(folder)
    return {case: freeze(sweep_rows(stores[store], Path(folder) / case, heads, boot, protos), case)
            for case, (store, heads, boot, protos) in CASES.items()}


def tag(plat: str) -> str:
    """A set's file name: torch's CPU capability (readable) and a digest of the whole platform string."""
    import hashlib

    cap = plat.rsplit("torch ", 1)[-1].strip().lower() or "cpu"
    return f"{cap}-{hashlib.sha1(plat.encode()).hexdigest()[:8]}"


def sets() -> dict[str, Path]:
    """Every committed set: its platform string -> its rows' file."""
    return {p.with_suffix(".platform").read_text().strip(): p for p in sorted(FROZEN_DIR.glob("*.parquet"))}


def load(case: str, path: Path) -> pl.DataFrame:
    """A case's frozen rows from one set, in the shape `rep.rows` gives them (metrics and params as dicts)."""
    return pl.read_parquet(path).filter(pl.col("case") == case).drop("case")


def write(frames: dict[str, pl.DataFrame], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.concat(list(frames.values()), how="diagonal_relaxed").write_parquet(path)


if __name__ == "__main__":
    import tempfile

    here = platform()
    out = FROZEN_DIR / f"{tag(here)}.parquet"
    with tempfile.TemporaryDirectory() as tmp:
        write(generate(Path(tmp)), out)
    out.with_suffix(".platform").write_text(here + "\n")
    print(f"wrote {out} ({here})", file=sys.stderr)
