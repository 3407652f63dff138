import sys, time, tempfile, cProfile, pstats
sys.path.insert(0, "benchmarks")
from pathlib import Path
from embed_throughput import replicate
from featstore import ingest as I
from featstore.backbones import create_backbone
from featstore.embed import embed
from featstore.store import connect
tmp = Path(tempfile.mkdtemp())
m = replicate(Path(".gpudata/manifest.csv"), 5, tmp / "c")
con = connect(tmp / "b.duckdb")
I.ingest_rows(con, I.manifest_rows(m)[0], str(m), workers=16)
bb = create_backbone("xrv-densenet121-res224-all", weights="random-init", device="cuda")
embed(con, bb, "original", 256, 12, limit=512)
pr = cProfile.Profile(); pr.enable(); t0 = time.perf_counter()
r = embed(con, bb, "original", 256, 12)
dt = time.perf_counter() - t0; pr.disable()
print("img/s", r.n_embedded / dt)
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
import os, torch, numpy as np
x = torch.rand(256, 1, 224, 224) * 2048 - 1024
g = create_backbone("xrv-densenet121-res224-all", weights="random-init", device="cuda")
g(x); a = g(x * 0.5)
os.environ["FEATSTORE_CUDA_GRAPHS"] = "0"
e = create_backbone("xrv-densenet121-res224-all", weights="random-init", device="cuda")
b = e(x * 0.5)
print("graph vs eager max abs diff", float(np.abs(a - b).max()), "scale", float(np.abs(b).mean()))
