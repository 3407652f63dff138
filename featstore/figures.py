"""Figures: PNGs drawn from result rows, predictions and representations, for the MLflow runs
(`track`: a unit's ROC and confusion matrix; `probe`: domain-AUC bars, t-SNE maps, the interactive
map's thumbnails) and the study report (`report`: forest, dumbbell and per-source ROC plots). Each
takes what it draws and a path, and returns the path (None where there is nothing to draw).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from featstore.results import MODEL, source_mean


def file_stem(s: str) -> str:
    """A name from the store (backbone, preprocessing, head) made safe as part of a figure's file name."""
    import re

    return re.sub(r"[^0-9A-Za-z_.-]", "_", str(s))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int, **tight) -> None:
    """tight_layout, then the PNG. tight_layout leaves a placeholder layout engine on the figure, and
    savefig draws a figure that has an engine twice (a layout pass, then the picture); the layout is
    done, so the engine goes and the picture is drawn once: the same bytes, about a sixth less time."""
    fig.tight_layout(**tight)
    fig.set_layout_engine(None)
    fig.savefig(path, dpi=dpi)


# --- one unit (MLflow artifacts of a unit run) ------------------------------------------------

def roc_figure(preds: pl.DataFrame, title: str, path: Path) -> Path | None:
    """ROC curves of the pooled test predictions, one curve per test set (seen vs unseen)."""
    from featstore.metrics import roc_auc, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    drawn = 0
    for ts in ("seen", "unseen"):
        d = preds.filter(pl.col("test_set") == ts)
        y, p = d["y"].to_numpy(), d["score"].to_numpy()
        if d.height == 0 or len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{ts} (AUC {roc_auc(y, p):.3f}, n={len(y)})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    import textwrap

    ax.set(xlabel="1 - specificity", ylabel="sensitivity")
    ax.set_title("\n".join(textwrap.wrap(title, 55)), fontsize=8)  # wrapped: a long title is not clipped
    ax.legend(loc="lower right", fontsize=7)
    save(fig, path, 110)
    plt.close(fig)
    return path


def confusion_figure(preds: pl.DataFrame, class_names, title: str, path: Path) -> Path | None:
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    sets = [ts for ts in ("seen", "unseen") if preds.filter(pl.col("test_set") == ts).height]
    if not sets:
        return None
    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.4), squeeze=False)
    K = len(class_names)
    for ax, ts in zip(axes[0], sets):
        d = preds.filter(pl.col("test_set") == ts)
        P = np.array(d["probs"].to_list())
        cm = confusion_matrix(d["y"].to_numpy(), P.argmax(1), labels=list(range(K)))
        ax.imshow(cm, cmap="Blues")
        for i in range(K):
            for j in range(K):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
        ax.set(xticks=range(K), yticks=range(K), xlabel="predicted", ylabel="true", title=ts)
        ax.set_xticklabels(class_names, fontsize=6, rotation=30)
        ax.set_yticklabels(class_names, fontsize=6)
    fig.suptitle(title, fontsize=8)
    save(fig, path, 110)
    plt.close(fig)
    return path


def dedupe_pooled(preds: pl.DataFrame) -> pl.DataFrame:
    # leave-pair-out scores an image once per pair it is held out in (repeated k-fold once per repeat): keep
    # each image once per protocol and test set, so a curve's n is its row's n (one protocol never thins
    # another's images)
    return preds.unique(subset=["protocol", "test_set", "image_id"], keep="first", maintain_order=True)


# --- the study report -------------------------------------------------------------------------

def _model_name(r: dict) -> str:
    sel = "" if r.get("selection") in (None, "train-val") else f" ({r['selection']})"
    return f"{r['head']} · {r['backbone']}/{r['preprocess']}{sel}"


def _main_rows(res: pl.DataFrame) -> list[dict]:
    """Each model's headline evidence: its LOSO source-mean row, else its seen-unseen one (as `headline`)."""
    out = []
    ok = res.filter((pl.col("status") == "ok") & (pl.col("kind") == "source-mean"))
    for _, g in ok.group_by(MODEL, maintain_order=True):
        r = source_mean(g, "loso") or source_mean(g, "seen-unseen")
        if r and r.get("auc") is not None:
            out.append(r)
    return sorted(out, key=lambda r: -r["auc"])


def _per_source_ci(res: pl.DataFrame, sm: dict) -> list[tuple[str, float, float | None, float | None, int | None]]:
    """(source, AUC, image-level CI low, high, n) for each held-out source behind a source-mean row."""
    per = (sm.get("metrics") or {}).get("per_source") or {}
    folds = res.filter((pl.col("status") == "ok") & (pl.col("kind") == "fold") & (pl.col("test_set") == "unseen")
                       & (pl.col("protocol") == sm["protocol"]) & (pl.col("seed") == sm["seed"])
                       & pl.all_horizontal(*[pl.col(c) == sm[c] for c in MODEL]))
    out = []
    for s, auc in sorted(per.items()):
        d = folds.filter(pl.col("scope") == s)
        if not d.height:
            d = folds.filter((pl.col("scope") == "all") & (pl.col("test_sources").list.len() == 1)
                             & (pl.col("test_sources").list.first() == s))
        r = d.row(0, named=True) if d.height else {}
        out.append((s, float(auc), r.get("auc_lo"), r.get("auc_hi"), r.get("n")))
    return out


def forest_figure(res: pl.DataFrame, path: Path) -> Path | None:
    """Per held-out source AUC with its image-level 95% CI, one row per source per model; each model's
    mean over sources with its source-level 95% CI as a diamond."""
    plt = pyplot()
    mains = _main_rows(res)
    rows = []  # (label, auc, lo, hi, kind, colour)
    colours = plt.get_cmap("tab10")
    for k, sm in enumerate(mains):
        c = colours(k % 10)
        rows.append((f"{_model_name(sm)} — mean of {sm.get('n_sources')} ({sm['protocol']})", sm["auc"],
                     sm.get("auc_lo"), sm.get("auc_hi"), "mean", c))
        for s, auc, lo, hi, n in _per_source_ci(res, sm):
            rows.append((f"   {s}" + (f" (n={n})" if n else ""), auc, lo, hi, "source", c))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.34 * len(rows) + 1.3))
    for i, (label, auc, lo, hi, kind, c) in enumerate(rows):
        y = len(rows) - 1 - i
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], c=c, lw=1.6 if kind == "source" else 0)
        if kind == "mean":
            lo_, hi_ = (lo, hi) if lo is not None else (auc, auc)
            ax.fill([lo_, auc, hi_, auc], [y, y + 0.32, y, y - 0.32], color=c, alpha=0.85)
            ax.plot([auc], [y], "D", c=c, ms=6)
        else:
            ax.plot([auc], [y], "s", c=c, ms=5)
    ax.axvline(0.5, ls=":", c="grey", lw=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows][::-1], fontsize=8)
    for t, r in zip(ax.get_yticklabels(), rows[::-1]):
        if r[4] == "mean":
            t.set_fontweight("bold")
    lows = [r[2] if r[2] is not None else r[1] for r in rows]
    highs = [r[3] if r[3] is not None else r[1] for r in rows]
    ax.set_xlim(min(0.3, min(lows) - 0.02), max(1.0, max(highs)) + 0.02)
    ax.set_xlabel("AUC on the held-out (unseen) source  ·  dotted: chance (0.5)", fontsize=9)
    fig.suptitle("Unseen sources: per-source AUC (image-level 95% CI);\nthe mean over sources as a diamond "
                 "(source-level 95% CI)", fontsize=10, x=0.01, ha="left")
    ax.grid(axis="x", alpha=0.3)
    save(fig, path, 110)
    plt.close(fig)
    return path


def _seen_auc(res: pl.DataFrame, sm: dict) -> float | None:
    gi = (sm.get("metrics") or {}).get("gap") or {}
    if gi.get("seen") is not None:
        return float(gi["seen"])
    m = res.filter((pl.col("status") == "ok") & (pl.col("protocol") == "mixed") & (pl.col("kind") == "pooled")
                   & (pl.col("scope") == "all") & pl.all_horizontal(*[pl.col(c) == sm[c] for c in MODEL]))
    vals = [v for v in m["auc"].to_list() if v is not None]
    return float(np.mean(vals)) if vals else None


def dumbbell_figure(res: pl.DataFrame, path: Path) -> Path | None:
    """Seen (mixed k-fold or seen-unseen's seen set) vs unseen mean per-source AUC, one line per model."""
    plt = pyplot()
    pts = [(_model_name(sm), _seen_auc(res, sm), sm["auc"], sm.get("auc_lo"), sm.get("auc_hi"))
           for sm in _main_rows(res)]
    pts = [p for p in pts if p[1] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(pts) + 1.8))
    for i, (name, seen, unseen, lo, hi) in enumerate(pts):
        y = len(pts) - 1 - i
        ax.plot([unseen, seen], [y, y], c="#bbb", lw=3, zorder=1)
        if lo is not None:
            ax.plot([lo, hi], [y - 0.18, y - 0.18], c="#d35400", lw=1)
        ax.scatter([seen], [y], s=60, c="#2471a3", zorder=2, label="seen sources" if i == 0 else None)
        ax.scatter([unseen], [y], s=60, c="#d35400", marker="D", zorder=2,
                   label="unseen sources (mean, source-level CI)" if i == 0 else None)
        ax.annotate(f"gap {seen - unseen:+.3f}", (max(seen, unseen), y), xytext=(8, -3), textcoords="offset points",
                    fontsize=8)
    ax.axvline(0.5, ls=":", c="grey", lw=1)
    ax.set_yticks(range(len(pts)), [p[0] for p in pts][::-1], fontsize=8)
    ax.set_xlim(min(0.45, min(min(p[1], p[2], p[3] if p[3] is not None else 1) for p in pts) - 0.03),
                max(1.0, max(p[4] or 0 for p in pts)) + 0.1)
    ax.set_ylim(-0.7, len(pts) - 0.3)
    ax.set_xlabel("AUC", fontsize=9)
    fig.suptitle("Seen vs unseen sources per model\n(a long bar: the model does better on the sources it trained on)",
                 fontsize=10, x=0.01, ha="left")
    fig.legend(fontsize=8, loc="upper right", frameon=False, ncol=1)
    ax.grid(axis="x", alpha=0.3)
    save(fig, path, 110, rect=(0, 0, 1, 0.97))
    plt.close(fig)
    return path


def roc_per_source_figure(preds: pl.DataFrame, title: str, path: Path) -> Path | None:
    """One ROC per held-out source (LOSO) and the seen one (pooled mixed k-fold), one model."""
    import textwrap

    from featstore.metrics import roc_auc, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    drawn = 0
    seen = preds.filter(pl.col("protocol") == "mixed")
    curves = [("mixed k-fold, sources pooled", seen, dict(c="black", lw=2, ls="--"))]
    unseen = preds.filter(pl.col("protocol") == "loso")
    for s in sorted(set(unseen["source"].to_list())):
        curves.append((f"unseen: {s}", unseen.filter(pl.col("source") == s), dict(lw=1.4)))
    for name, d, kw in curves:
        y, p = d["y"].to_numpy(), d["score"].to_numpy()
        if d.height == 0 or len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y, p):.3f}, n={len(y)})", **kw)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    save(fig, path, 110)
    plt.close(fig)
    return path


# --- representations: t-SNE maps, domain AUC --------------------------------------------------

def palettes(sources, labels) -> tuple[dict, dict]:
    """Two palettes that share no colour: qualitative tab10 for sources, a dark-to-light viridis ramp
    for labels, so a map coloured by source is never read as one coloured by label."""
    plt = pyplot()
    import matplotlib.colors as mc

    tab = plt.get_cmap("tab10")
    src = {s: mc.to_hex(tab(i % 10)) for i, s in enumerate(sorted(set(sources)))}
    labs = sorted(set(labels))
    vir = plt.get_cmap("viridis")
    lab = {v: mc.to_hex(vir(0.05 + 0.85 * i / max(1, len(labs) - 1))) for i, v in enumerate(labs)}
    return src, lab


def tsne(Z, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    Z = np.asarray(Z, dtype=np.float64)
    if Z.shape[1] > 50 and len(Z) > 50:
        Z = PCA(50, random_state=seed).fit_transform(Z)
    return TSNE(2, perplexity=float(min(30, max(5, (len(Z) - 1) // 4))), init="pca",
                random_state=seed).fit_transform(Z)


def map_png(xy, colour_by: dict, title: str, path: Path) -> Path:
    """One large panel per colouring; sources and labels get palettes that share no colour (palettes)."""
    plt = pyplot()
    values = {k: np.asarray(v).astype(str) for k, v in colour_by.items()}
    src_pal, lab_pal = palettes(values.get("source", []), values.get("label", []))
    fig, axes = plt.subplots(1, len(values), figsize=(7.5 * len(values), 7.2), squeeze=False)
    for ax, (name, vals) in zip(axes[0], values.items()):
        pal = lab_pal if name == "label" else src_pal if name == "source" else palettes(vals, [])[0]
        for v in sorted(set(vals)):
            m = vals == v
            ax.scatter(xy[m, 0], xy[m, 1], s=12, alpha=0.75, c=pal[v], label=f"{v} ({m.sum()})", linewidths=0)
        ax.set(xticks=[], yticks=[])
        ax.set_title(f"coloured by {name}", fontsize=11)
        ax.legend(fontsize=9, markerscale=2.2, loc="upper center", bbox_to_anchor=(0.5, -0.01),
                  ncol=min(4, len(set(vals))), frameon=False)
    fig.suptitle(title, fontsize=11)
    save(fig, path, 100)
    plt.close(fig)
    return path


def embedding_map(Z, colour_by: dict[str, np.ndarray], title: str, path: Path, seed: int = 0) -> Path:
    """t-SNE (after PCA to 50 dims) of a representation, one large panel per colouring
    ([Tartaglione2020], [Trivedi2022])."""
    return map_png(tsne(Z, seed), colour_by, title, path)


def thumbnail_uri(path: str | None, side: int = 64) -> str | None:
    """A small grey JPEG of an image file as a data URI (the interactive map's hover picture)."""
    import base64
    import io

    from PIL import Image

    from featstore.decode import decode_file

    if not path:
        return None
    try:
        px = decode_file(path, draft=side * 2).pixels
    except Exception:  # noqa: BLE001 - a moved or unreadable file: that point has no thumbnail
        return None
    im = Image.fromarray((np.clip(px, 0, 1) * 255).astype(np.uint8))
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.convert("L").save(buf, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def domain_auc_bars(rows: list[dict], title: str, path: Path) -> Path:
    """Per-source domain AUC (this source vs the rest), raw embedding vs GRL representation."""
    plt = pyplot()
    per = [r for r in rows if r["scope"] != "all" and r["test_set"] == "all images"]
    sources = sorted({r["scope"] for r in per})
    heads = sorted({r["head"] for r in per}, key=lambda h: h != "raw")
    fig, ax = plt.subplots(figsize=(1.1 * len(sources) + 2, 3.6))
    width = 0.8 / max(1, len(heads))
    for k, h in enumerate(heads):
        vals = [next((r["auc"] for r in per if r["head"] == h and r["scope"] == s), np.nan) for s in sources]
        ax.bar(np.arange(len(sources)) + k * width, vals, width, label=h)
    ax.axhline(0.5, ls=":", c="grey")
    ax.set(ylim=(0, 1), ylabel="domain AUC", title=title, xticks=np.arange(len(sources)) + width * (len(heads) - 1) / 2)
    ax.set_xticklabels(sources, rotation=30, ha="right", fontsize=7)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    save(fig, path, 110)
    plt.close(fig)
    return path


def adapt_figure(rows: pl.DataFrame, path: Path) -> Path | None:
    """Protocol `adapt`'s learning curves: unseen AUC vs k labelled images per class, one panel per site, a
    line per model and arm (with-sources solid, site-only dashed), bars = 95% t interval over draws."""
    d = rows.filter((pl.col("kind") == "adapt") & pl.col("auc").is_not_null())
    if not d.height:
        return None
    import json

    plt = pyplot()
    sites = sorted(set(d["scope"].to_list()))
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.6), squeeze=False, sharey=True)
    for ax, site in zip(axes[0], sites):
        g = d.filter(pl.col("scope") == site)
        curves: dict = {}
        for r in g.iter_rows(named=True):
            m = r["metrics"] if isinstance(r["metrics"], dict) else json.loads(r["metrics"])
            key = (f"{r['head']} · {r['backbone']}/{r['preprocess']}", m["arm"])
            curves.setdefault(key, []).append((m["k"], r["auc"], r.get("auc_lo"), r.get("auc_hi")))
        for (model, arm), pts in sorted(curves.items()):
            pts.sort()
            k = [p[0] for p in pts]
            a = [p[1] for p in pts]
            lo = [p[1] - p[2] if p[2] is not None else 0 for p in pts]
            hi = [p[3] - p[1] if p[3] is not None else 0 for p in pts]
            ax.errorbar(k, a, yerr=[lo, hi], marker="o", ms=3, capsize=2,
                        linestyle="-" if arm == "with-sources" else "--", label=f"{model} ({arm})")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("k labelled images per class from the site")
    axes[0][0].set_ylabel("AUC on the site's other images")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    save(fig, path, 100)
    plt.close(fig)
    return path


def reliability_figure(curves: dict[str, list[dict]], title: str, path: Path) -> Path | None:
    """Reliability diagram: per model (label -> score.ece bins) the observed frequency of positives
    against the mean predicted probability in each bin; the diagonal is perfect calibration."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    for label, bins in curves.items():
        ax.plot([b["confidence"] for b in bins], [b["frequency"] for b in bins], marker="o", ms=3, lw=1, label=label)
    ax.set(xlabel="mean predicted P(positive)", ylabel="observed frequency of positives", xlim=(0, 1), ylim=(0, 1),
           title=title)
    ax.legend(fontsize=6, loc="upper left")
    save(fig, path, 110)
    plt.close(fig)
    return path
