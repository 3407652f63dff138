"""Embedding pipeline images/s vs the bare model on pre-decoded tensors, side by side.

    python benchmarks/embed_throughput.py --manifest ../shared/cxr/manifest.csv --weights-dir ../shared/weights

For each backbone: ingest into a fresh temporary store, run `embed` over N images
(decode in DataLoader workers, preprocess, forward, Arrow write per batch) and time it;
then decode the same N images up front and time the bare forward passes at the same
batch size. Prints both and their ratio (1.0 = the pipeline costs nothing on top of the model).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from featstore import ingest as I
from featstore.backbones import create_backbone
from featstore.decode import decode_file
from featstore.embed import embed, todo
from featstore.preprocess import get_preprocess, to_input
from featstore.store import connect


def bare(bb, items, batch_size, preprocess="original"):
    s = bb.spec
    fn = get_preprocess(preprocess)
    xs = torch.stack([torch.from_numpy(to_input(fn(decode_file(p, draft=s.input_size).pixels), s.input_size,
                                                s.channels, s.norm)) for _, p in items])
    bb(xs[:batch_size])  # warm-up, as the pipeline's first batch also pays it
    t0 = time.perf_counter()
    for i in range(0, len(xs), batch_size):
        bb(xs[i:i + batch_size])
    return len(xs) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", type=Path, default=Path("../shared/cxr/manifest.csv"))
    ap.add_argument("--weights-dir", type=Path, default=Path("../shared/weights"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--backbones", default="mobilenetv3-nih-onnx:1024,xrv-densenet121-res224-all:256",
                    help="name:n_images,...")
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"cuda={torch.cuda.is_available()}; batch {a.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        con = connect(Path(tmp) / "bench.duckdb")
        rows, _ = I.manifest_rows(a.manifest)
        rep = I.ingest_rows(con, rows, str(a.manifest), workers=2)
        print(f"ingest: {rep.n_images} images in {rep.seconds:.1f}s ({rep.n_rows / rep.seconds:.0f} rows/s)")
        print(f"{'backbone':32} {'weights':18} {'n':>5} {'pipeline img/s':>15} {'bare img/s':>11} {'ratio':>6}")
        for entry in a.backbones.split(","):
            name, n = entry.split(":")
            n = int(n)
            w = None if "onnx" in name or name == "pixelstats" else "random-init"
            bb = create_backbone(name, weights=w, weights_dir=a.weights_dir)
            items = todo(con, bb, "original", limit=n)
            t0 = time.perf_counter()
            r = embed(con, bb, "original", a.batch_size, a.workers, limit=n)
            pipe = r.n_embedded / (time.perf_counter() - t0)
            b = bare(bb, items, a.batch_size)
            print(f"{name:32} {bb.weights_id[:18]:18} {r.n_embedded:5d} {pipe:15.1f} {b:11.1f} {pipe / b:6.2f}")


if __name__ == "__main__":
    main()
