"""Issue 27: `featstore embed` as a user times it, against the plain script's whole command.

    python benchmarks/embed_command.py [--manifest ../shared/cxr/manifest.csv] [--reps 3] [--profile]

Both are timed cold as whole commands (process start, imports, model load, every image, exit), one after
the other in the same minutes, alternating, `--reps` times: `featstore embed --backbone mobilenetv3-nih-onnx`
into a fresh copy of an ingested store (everything it does: hash re-check, store writes, index upkeep),
and `python benchmarks/plain_embed.py MODEL LIST` over the same images (no store, no checks). The ratio is
featstore's time over the script's (bar: <= 1.2). `--profile` also runs featstore's command once under
cProfile and prints where its time beyond the script's goes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MANIFEST, REPO, WEIGHTS, goal, need_real_set, table

HERE = Path(__file__).resolve().parent
BACKBONE = "mobilenetv3-nih-onnx"
BAR = 1.2


def featstore_cmd(*args) -> list[str]:
    exe = Path(sys.executable).with_name("featstore")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "featstore.cli", *args]


def timed(cmd: list[str], env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    need_real_set()
    model = WEIGHTS / "mobilenetv3_nih.onnx"
    if not model.exists():
        model = next(WEIGHTS.glob("*.onnx"))
    with tempfile.TemporaryDirectory(prefix="featstore-embed-cmd-") as tmp:
        tmp = Path(tmp)
        base = tmp / "ingested.duckdb"
        subprocess.run(featstore_cmd("ingest", "--manifest", str(a.manifest), "--db", str(base)), check=True,
                       stdout=subprocess.DEVNULL)
        import duckdb

        with duckdb.connect(str(base), read_only=True) as con:
            paths = [p for (p,) in con.execute("SELECT path FROM images ORDER BY image_id").fetchall()]
        listing = tmp / "list.txt"
        listing.write_text("\n".join(paths))
        ours, plain = [], []
        for r in range(a.reps):
            db = tmp / f"run{r}.duckdb"
            shutil.copy(base, db)
            ours.append(timed(featstore_cmd("embed", "--backbone", BACKBONE, "--weights-dir", str(WEIGHTS),
                                            "--db", str(db))))
            plain.append(timed([sys.executable, str(HERE / "plain_embed.py"), str(model), str(listing)]))
            db.unlink()
            sys.stderr.write(f"embed_command: rep {r}: featstore {ours[-1]:.1f} s, script {plain[-1]:.1f} s\n")
        load = os.getloadavg()[0]
        ratio = statistics.median(o / p for o, p in zip(ours, plain))
        print("### `featstore embed` as a whole command vs the plain script (issue 27, embed_command.py)\n")
        print(f"{len(paths):,} images of {a.manifest.parent.name}, {BACKBONE} on the CPU; both cold whole "
              f"commands, alternating, {a.reps} times in the same minutes (load average {load:.1f} at the end). "
              f"featstore embeds into a fresh copy of an ingested store; the script stores nothing.\n")
        print(table(["rep", "featstore embed s", "plain script s", "ratio"],
                    [[str(i), f"{o:.1f}", f"{p:.1f}", f"{o / p:.2f}"] for i, (o, p) in enumerate(zip(ours, plain))]))
        goal("27. `featstore embed` whole command / plain script's (embed_command.py, median)", f"≤ {BAR}",
             f"{ratio:.2f}", ratio <= BAR)
        if a.profile:
            db = tmp / "prof.duckdb"
            shutil.copy(base, db)
            out = tmp / "embed.prof"
            subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "featstore.cli", "embed",
                            "--backbone", BACKBONE, "--weights-dir", str(WEIGHTS), "--db", str(db)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
            import pstats

            pstats.Stats(str(out), stream=sys.stderr).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
