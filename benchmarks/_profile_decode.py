import sys, time, csv
from pathlib import Path
import numpy as np
from featstore.decode import decode_file
from featstore.preprocess import to_input, center_square, resize
m = Path(sys.argv[1]); rows = list(csv.DictReader(m.open()))[:300]
paths = [str(m.parent / r["path"]) for r in rows]
t = {"decode": 0.0, "to_input": 0.0}
shapes = []
for p in paths:
    t0 = time.perf_counter(); d = decode_file(p, draft=224); t1 = time.perf_counter()
    x = to_input(d.pixels, 224, 1, ("xrv",)); t2 = time.perf_counter()
    t["decode"] += t1 - t0; t["to_input"] += t2 - t1; shapes.append(d.pixels.shape)
print({k: f"{v / len(paths) * 1e3:.2f} ms" for k, v in t.items()}, "median shape", np.median([s[0] for s in shapes]))
import cProfile, pstats
cProfile.run("[decode_file(p, draft=224) for p in paths[:100]]", "/tmp/prof")
pstats.Stats("/tmp/prof").sort_stats("cumulative").print_stats(18)
