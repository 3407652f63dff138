"""4. Fitting each head through featstore vs the bare library fit on the same arrays.

    python benchmarks/head_overhead.py [--db STORE] [--backbone mobilenetv3-nih-onnx]

Arrays: the store's embeddings (default: the real set with mobilenetv3-nih-onnx), binary COVID
target, source as domain. featstore: `sweep.fit_head` (registry -> estimator -> fit), exactly what a
trial runs. Bare: scikit-learn's StandardScaler + LogisticRegression, LightGBM's LGBMClassifier, and
a plain torch loop training the same GRL network for the same epochs (no early stop on either side).
Same hyperparameters, one thread each; best of 3, alternating, so both see the same machine.
Ratio = featstore / bare (bar: <= 1.15).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import table
from featstore.api import open_store
from featstore.sweep.fit import fit_head


def bare_logreg(X, y, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=0)).fit(X, y)


def bare_lgbm(X, y):
    import lightgbm as lgb

    return lgb.LGBMClassifier(n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=20,
                              colsample_bytree=0.5, subsample=0.8, subsample_freq=1, reg_lambda=1.0, n_jobs=1,
                              random_state=0, deterministic=True, force_row_wise=True, verbose=-1).fit(X, y)


def bare_grl(X, y, d, epochs, hidden=(256, 64), lam0=10.0, bs=256):
    """The GRL network and schedule of featstore's GRLHead, written as a plain torch loop."""
    import torch
    import torch.nn.functional as F
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from torch import nn

    class Rev(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lam):
            ctx.lam = lam
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return -ctx.lam * g, None

    torch.manual_seed(0)
    Xs = StandardScaler().fit_transform(X).astype(np.float32)
    tr, va = train_test_split(np.arange(len(y)), test_size=0.1, stratify=y, random_state=0)
    Xt, yt, dt = torch.from_numpy(Xs[tr]), torch.from_numpy(y[tr]).long(), torch.from_numpy(d[tr]).long()
    Xv, yv = torch.from_numpy(Xs[va]), torch.from_numpy(y[va]).long()
    fe = nn.Sequential(nn.Linear(X.shape[1], hidden[0]), nn.BatchNorm1d(hidden[0]), nn.ReLU(), nn.Dropout(0.0),
                       nn.Linear(hidden[0], hidden[1]), nn.BatchNorm1d(hidden[1]), nn.ReLU())
    ch, dh = nn.Linear(hidden[1], 2), nn.Linear(hidden[1], int(d.max()) + 1)
    opt = torch.optim.AdamW(list(fe.parameters()) + list(ch.parameters()), lr=1e-3, weight_decay=1e-2, amsgrad=True)

    def refit():
        with torch.no_grad():
            z = fe(Xt)
        o = torch.optim.LBFGS(dh.parameters(), max_iter=50, line_search_fn="strong_wolfe")

        def closure():
            o.zero_grad()
            loss = F.cross_entropy(dh(z), dt) + 1e-2 * dh.weight.pow(2).sum()
            loss.backward()
            return loss
        o.step(closure)
    fe.eval()
    refit()
    for epoch in range(epochs):
        lam = lam0 ** (1 - epoch / epochs)
        fe.train(), ch.train()
        for b in torch.randperm(len(tr)).split(bs):
            if len(b) < 2:
                continue
            z = fe(Xt[b])
            loss = F.cross_entropy(ch(z), yt[b]) + F.cross_entropy(dh(Rev.apply(z, lam)), dt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        fe.eval(), ch.eval()
        refit()
        with torch.no_grad():
            F.cross_entropy(ch(fe(Xv)), yv)
    return fe


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    import torch

    from _common import MANIFEST, WEIGHTS, need_real_set

    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=Path)
    ap.add_argument("--backbone", default="mobilenetv3-nih-onnx")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.db is None:
        import tempfile

        from featstore import ingest as I
        from featstore.backbones import create_backbone
        from featstore.embed import embed
        from featstore.store import connect

        need_real_set()
        a.db = Path(tempfile.mkdtemp()) / "fs.duckdb"
        con = connect(a.db)
        I.ingest_rows(con, I.manifest_rows(MANIFEST)[0], str(MANIFEST), workers=2)
        embed(con, create_backbone(a.backbone, weights_dir=WEIGHTS), "original", 64)
        con.close()
    with open_store(a.db) as fs:
        X, meta = fs.arrays(a.backbone)
    y = (meta["label"] == "covid").to_numpy().astype(int)
    src = meta["source"].to_numpy()
    d = np.unique(src, return_inverse=True)[1]
    E = a.epochs
    cases = {
        "logreg": (lambda: fit_head("logreg", dict(C=0.1, l1_ratio=0.0, class_weight=None), X, y, src, 0),
                   lambda: bare_logreg(X, y, 0.1), "sklearn StandardScaler + LogisticRegression"),
        "lightgbm": (lambda: fit_head("lightgbm", {}, X, y, src, 0), lambda: bare_lgbm(X, y), "lightgbm LGBMClassifier"),
        "grl_mlp": (lambda: fit_head("grl_mlp", dict(max_epochs=E, patience=E + 1), X, y, src, 0),
                    lambda: bare_grl(X, y, d, E), f"plain torch loop, same network, {E} epochs"),
    }
    rows = []
    for name, (ours, bare, what) in cases.items():
        t_ours, t_bare = [], []
        for _ in range(a.repeat):
            t_ours.append(timed(ours))
            t_bare.append(timed(bare))
        o, b = min(t_ours), min(t_bare)
        rows.append([name, what, f"{X.shape[0]:,} x {X.shape[1]}", f"{o:.3f}", f"{b:.3f}", f"{o / b:.2f}"])
    print("### 4. Head fit: featstore vs the bare library\n")
    print(table(["head", "bare reference", "arrays", "featstore s", "bare s", "ratio (bar <= 1.15)"], rows))


if __name__ == "__main__":
    main()
