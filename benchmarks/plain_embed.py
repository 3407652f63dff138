"""The yardstick of issue 14, goal 1: a plain single-process script embedding images with the CXR
MobileNetV3 ONNX model, no store. featstore's embed is measured against it in embed_throughput.py.

    python benchmarks/plain_embed.py MODEL.onnx LIST.txt   (LIST: one image path per line) -> JSON line
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

model, listing = sys.argv[1], sys.argv[2]
paths = open(listing).read().split()
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
opts.log_severity_level = 3
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
t0 = time.perf_counter()
batch, n = [], 0
for i, p in enumerate(paths):
    im = Image.open(p)
    im.draft("L", (224, 224))
    im = im.convert("L")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((224, 224), Image.BILINEAR)
    batch.append((np.asarray(im, np.float32) / 255 - 0.485) / 0.229)
    if len(batch) == 64 or i == len(paths) - 1:
        n += len(sess.run([out], {inp: np.stack(batch)[:, None]})[0])
        batch = []
dt = time.perf_counter() - t0
print(json.dumps(dict(n=n, seconds=dt, images_per_s=n / dt)))
