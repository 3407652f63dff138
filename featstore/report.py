"""Report: Markdown + HTML + figures from the store's `results` and `predictions` rows only.

The headline table puts, per head and embedding set, the AUC on images of sources the model saw
(mixed k-fold, pooled out-of-fold) beside the AUC on sources it never saw (leave-one-source-out
pooled, leave-pair-out, seen-unseen), each with its bootstrap 95% CI.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import polars as pl


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_auc(auc, lo, hi) -> str:
    if auc is None:
        return "undefined (one class)"
    if lo is None:
        return f"{auc:.3f}"
    return f"{auc:.3f} [{lo:.3f}, {hi:.3f}]"


def _f(v, d=3):
    return "—" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


# --- artifacts of one unit (MLflow) ----------------------------------------------------------

def roc_figure(preds: pl.DataFrame, title: str, path: Path) -> Path | None:
    """ROC curves of the pooled test predictions, one curve per test set (seen vs unseen)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    drawn = 0
    for ts in ("seen", "unseen"):
        d = preds.filter(pl.col("test_set") == ts)
        y, p = d["y"].to_numpy(), d["score"].to_numpy()
        if d.height == 0 or len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{ts} (AUC {roc_auc_score(y, p):.3f}, n={len(y)})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.title.set_fontsize(8)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_figure(preds: pl.DataFrame, class_names, title: str, path: Path) -> Path | None:
    from sklearn.metrics import confusion_matrix

    plt = _plt()
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def unit_artifacts(folder: Path, unit_rows: list[dict], preds: pl.DataFrame | None, class_names, title: str):
    out = []
    cols = ["fold", "test_set", "scope", "n", "n_pos", "n_neg", "auc", "auc_lo", "auc_hi", "accuracy",
            "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "dor", "brier", "status", "error"]
    pl.DataFrame([{c: r.get(c) for c in cols} for r in unit_rows], infer_schema_length=None).write_csv(
        folder / "per_source.csv")
    out.append(folder / "per_source.csv")
    if preds is not None and preds.height:
        pooled = _dedupe_pooled(preds)
        for fig in (roc_figure(pooled, title, folder / "roc_seen_vs_unseen.png") if len(class_names) == 2 else None,
                    confusion_figure(pooled, class_names, title, folder / "confusion.png")):
            if fig:
                out.append(fig)
    return out


def _dedupe_pooled(preds: pl.DataFrame) -> pl.DataFrame:
    # leave-pair-out scores an image once per pair it is held out in: keep each image once per test set
    return preds.unique(subset=["test_set", "image_id"], keep="first", maintain_order=True)


# --- the study report -------------------------------------------------------------------------

def latest_sweep(con, study: str | None) -> tuple[str, str]:
    q = "SELECT study, max(sweep_id) FROM results" + (" WHERE study = ?" if study else "") + \
        " GROUP BY study ORDER BY max(sweep_id) DESC LIMIT 1"
    rows = con.execute(q, [study] if study else []).fetchall()  # fetchall: DuckDB 2 refuses work beside an open result
    row = rows[0] if rows else None
    if not row:
        have = [r[0] for r in con.execute("SELECT DISTINCT study FROM results").fetchall()]
        raise ValueError(f"no results for study '{study}' in the store; studies: {have or 'none'} "
                         "(run `featstore sweep CONFIG` first)")
    return row[0], row[1]


def headline(res: pl.DataFrame) -> pl.DataFrame:
    """One row per backbone x preprocessing x head x selection: seen vs unseen AUC with CIs."""
    out = []
    keys = ["backbone", "preprocess", "head", "selection"]
    for key, g in res.filter(pl.col("status") == "ok").group_by(keys, maintain_order=True):
        row = dict(zip(keys, key))
        all_ = g.filter(pl.col("scope") == "all")

        def one(proto, fold_prefix, ts):
            d = all_.filter((pl.col("protocol") == proto) & pl.col("fold").str.starts_with(fold_prefix)
                            & (pl.col("test_set") == ts))
            return d.row(0, named=True) if d.height else None
        reps = all_.filter((pl.col("protocol") == "mixed") & pl.col("fold").str.starts_with("pooled-r"))
        m = one("mixed", "pooled", "seen")
        if reps.height > 1:  # repeated k-fold: mean +- sd of the per-repeat pooled AUCs
            row["mixed AUC (seen sources)"] = (f"{reps['auc'].mean():.3f} ± {reps['auc'].std():.3f} "
                                               f"over {reps.height} repeats")
        else:
            row["mixed AUC (seen sources)"] = fmt_auc(m["auc"], m["auc_lo"], m["auc_hi"]) if m else "—"
        lo = one("loso", "pooled", "unseen")
        row["LOSO AUC (unseen, pooled)"] = fmt_auc(lo["auc"], lo["auc_lo"], lo["auc_hi"]) if lo else "—"
        per = all_.filter((pl.col("protocol") == "loso") & ~pl.col("fold").str.starts_with("pooled")
                          & pl.col("auc").is_not_null()).sort("auc")
        row["LOSO worst source AUC"] = (f"{per['auc'][0]:.3f} ({per['fold'][0].removeprefix('heldout=')}; "
                                        f"{per.height} of {all_.filter((pl.col('protocol') == 'loso') & ~pl.col('fold').str.starts_with('pooled')).height} "
                                        "sources have both classes)") if per.height else "—"
        lpo = all_.filter((pl.col("protocol") == "leave-pair-out") & (pl.col("test_set") == "unseen"))
        if lpo.height:
            a = lpo["auc"].drop_nulls()
            worst = lpo.sort("auc").row(0, named=True)
            row["leave-pair-out AUC mean ± sd (worst)"] = (f"{a.mean():.3f} ± {a.std() or 0:.3f} "
                                                          f"({worst['auc']:.3f}, {worst['fold']})")
        else:
            row["leave-pair-out AUC mean ± sd (worst)"] = "—"
        su = all_.filter(pl.col("protocol") == "seen-unseen")
        if su.height:
            s = su.filter(pl.col("test_set") == "seen").row(0, named=True)
            u = su.filter(pl.col("test_set") == "unseen").row(0, named=True)
            row["seen-unseen: seen AUC"] = fmt_auc(s["auc"], s["auc_lo"], s["auc_hi"])
            row["seen-unseen: unseen AUC"] = fmt_auc(u["auc"], u["auc_lo"], u["auc_hi"])
            row["gap (p)"] = "—" if u["gap"] is None else f"{u['gap']:+.3f} (p={u['gap_p']:.2g})"
        out.append(row)
    return pl.DataFrame(out)


def per_source(res: pl.DataFrame) -> pl.DataFrame:
    d = res.filter((pl.col("status") == "ok") & (pl.col("protocol") == "loso") & (pl.col("scope") == "all")
                   & ~pl.col("fold").str.starts_with("pooled"))
    return d.select("backbone", "preprocess", "head", "selection", "fold", "n", "n_pos", "n_neg",
                    pl.struct("auc", "auc_lo", "auc_hi").map_elements(
                        lambda s: fmt_auc(s["auc"], s["auc_lo"], s["auc_hi"]), return_dtype=pl.Utf8).alias("AUC"),
                    "sensitivity", "specificity", "accuracy").sort("backbone", "preprocess", "head", "fold")


def pairs(res: pl.DataFrame) -> pl.DataFrame:
    d = res.filter((pl.col("status") == "ok") & (pl.col("protocol") == "leave-pair-out") & (pl.col("scope") == "all"))
    return d.select("backbone", "preprocess", "head", "selection", "fold", "n", "n_pos", "n_neg",
                    pl.struct("auc", "auc_lo", "auc_hi").map_elements(
                        lambda s: fmt_auc(s["auc"], s["auc_lo"], s["auc_hi"]), return_dtype=pl.Utf8).alias("AUC"),
                    "balanced_accuracy", "dor").sort("backbone", "preprocess", "head", "fold")


def markdown_table(df: pl.DataFrame) -> str:
    if df.height == 0:
        return "_(none)_\n"
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.iter_rows():
        lines.append("| " + " | ".join(_f(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def html_table(df: pl.DataFrame) -> str:
    if df.height == 0:
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_f(v))}</td>" for v in r) + "</tr>" for r in df.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(con, out: str | Path, study: str | None = None, sweep_id: str | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sweep_id is None:
        study, sweep_id = latest_sweep(con, study)
    res = pl.from_arrow(con.sql("SELECT * FROM results WHERE study = ? AND sweep_id = ? ORDER BY ALL",
                                params=[study, sweep_id]).to_arrow_table())
    preds = pl.from_arrow(con.sql("SELECT * FROM predictions WHERE study = ? AND sweep_id = ?",
                                  params=[study, sweep_id]).to_arrow_table())
    honest = res.filter(~pl.col("oracle"))
    oracle = res.filter(pl.col("oracle"))
    head = headline(honest)
    figs = []
    for (bb, pre, hd), g in preds.filter(pl.col("selection") != "oracle").group_by(
            ["backbone", "preprocess", "head"], maintain_order=True):
        both = pl.concat([g.filter(pl.col("protocol") == "mixed").with_columns(test_set=pl.lit("seen")),
                          g.filter(pl.col("protocol") == "loso")])
        f = roc_figure(both, f"{hd} on {bb}/{pre}: mixed (seen) vs LOSO (unseen)", out / f"roc_{hd}_{bb}_{pre}.png")
        if f:
            figs.append(f.name)
    failed = res.filter(pl.col("status") != "ok")
    meta = res.row(0, named=True) if res.height else {}
    sections = [
        ("Seen vs unseen sources", head,
         "AUC with stratified bootstrap 95% CI "
         f"({meta.get('bootstrap')} resamples). *mixed* = patient-grouped stratified k-fold ignoring source, "
         "pooled out-of-fold; *LOSO* = leave one source out, pooled over held-out sources (every image scored "
         "by a model that never saw its source); *leave-pair-out* = one mostly-positive and one mostly-negative "
         "source held out together, mean ± sd over pairs; *seen-unseen* = trained on named sources, tested on "
         "their held-out images (seen) and on every other source (unseen); gap p from a two-sided z-test with "
         "bootstrap SEs. Hyperparameters chosen on training sources only "
         f"(selection: {', '.join(sorted(set(honest['selection'].to_list())))})."),
        ("Leave-one-source-out, per held-out source", per_source(honest),
         "AUC is undefined where the held-out source has one class; its sensitivity or specificity is shown."),
        ("Leave-pair-out, per pair", pairs(honest), ""),
    ]
    if oracle.height:
        sections.append(("ORACLE upper bound (selected on the test set; not a result)", headline(oracle),
                         "Hyperparameters chosen on the held-out data itself: how much selection alone could gain."))
    if failed.height:
        sections.append(("Failed", failed.select("protocol", "head", "fold", "error"), ""))
    dropped = res.filter(pl.col("n_dropped_shared") > 0).select("protocol", "fold", "n_dropped_shared").unique()
    title = f"featstore report — {study}"
    md = [f"# {title}\n", f"sweep `{sweep_id}`, {res.height} result rows, code {meta.get('code_version')}, "
          f"seed {meta.get('seed')}, target {meta.get('target')}.\n"]
    htm = [f"<h1>{html.escape(title)}</h1><p>sweep <code>{html.escape(sweep_id)}</code>, {res.height} result rows, "
           f"code {html.escape(str(meta.get('code_version')))}, seed {meta.get('seed')}.</p>"]
    for name, df, note in sections:
        md += [f"## {name}\n", (note + "\n") if note else "", markdown_table(df)]
        htm += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(note)}</p>" if note else "", html_table(df)]
    sets = sorted({(r["backbone"], r["preprocess"]) for r in res.select("backbone", "preprocess").unique()
                   .iter_rows(named=True)})
    ev_md, ev_htm = shortcut_evidence(con, sets, out)
    shared_note = ("Images that also occur in a test source (the same file in two collections) were dropped "
                   "from training: " + ", ".join(f"{r[0]} {r[1]}: {r[2]}" for r in dropped.iter_rows())
                   if dropped.height else "No training image also occurred in a test source.")
    md += ["## Shared images\n", shared_note + "\n"]
    htm += ["<h2>Shared images</h2>", f"<p>{html.escape(shared_note)}</p>"]
    if figs:
        md += ["## ROC curves\n"] + [f"![{f}]({f})\n" for f in figs]
        htm += ["<h2>ROC curves</h2>"] + [f'<img src="{html.escape(f)}" width="420">' for f in figs]
    md += ev_md
    htm += ev_htm
    (out / "report.md").write_text("\n".join(md))
    css = "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;" \
          "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}"
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                                     f"</title><style>{css}</style></head><body>{''.join(htm)}</body></html>")
    (out / "headline.json").write_text(json.dumps(head.to_dicts(), indent=1))
    return dict(study=study, sweep_id=sweep_id, headline=head, files=[out / "report.md", out / "report.html", *figs])


# --- shortcut evidence (issue 4): pictures from the probe, tables from the store ----------------

def embedding_map(Z, colour_by: dict[str, np.ndarray], title: str, path: Path, seed: int = 0) -> Path:
    """t-SNE (after PCA to 50 dims) of a representation, one panel per colouring (papers 002, 003)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _plt()
    Z = np.asarray(Z, dtype=np.float64)
    if Z.shape[1] > 50:
        Z = PCA(50, random_state=seed).fit_transform(Z)
    xy = TSNE(2, perplexity=min(30, max(5, len(Z) // 50)), init="pca", random_state=seed).fit_transform(Z)
    fig, axes = plt.subplots(1, len(colour_by), figsize=(5.2 * len(colour_by), 4.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], colour_by.items()):
        values = np.asarray(values).astype(str)
        for v in sorted(set(values)):
            m = values == v
            ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, label=f"{v} ({m.sum()})")
        ax.set(title=f"by {name}", xticks=[], yticks=[])
        ax.legend(fontsize=6, markerscale=3, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def domain_auc_bars(rows: list[dict], title: str, path: Path) -> Path:
    """Per-source domain AUC (this source vs the rest), raw embedding vs GRL representation."""
    plt = _plt()
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def shortcut_evidence(con, backbones: list[tuple[str, str]], out: Path) -> tuple[list[str], list[str]]:
    """Markdown and HTML parts: the latest domain probe of each embedding set (table, bar chart and
    maps fetched from its MLflow run), near duplicates per source pair, neighbour summary."""
    md, htm = ["## Shortcut evidence\n"], ["<h2>Shortcut evidence</h2>"]
    for bb, pre in backbones:
        probe = pl.from_arrow(con.sql(
            "SELECT * FROM results WHERE study = 'domain-probe' AND backbone = ? AND preprocess = ? AND sweep_id = "
            "(SELECT max(sweep_id) FROM results WHERE study = 'domain-probe' AND backbone = ? AND preprocess = ?)",
            params=[bb, pre, bb, pre]).to_arrow_table())
        md.append(f"### {bb} / {pre}\n")
        htm.append(f"<h3>{html.escape(bb)} / {html.escape(pre)}</h3>")
        if probe.height == 0:
            note = f"No domain probe yet: `featstore probe --backbone {bb} --preprocess {pre}`."
            md.append(note + "\n")
            htm.append(f"<p>{html.escape(note)}</p>")
        else:
            tab = probe.filter(pl.col("scope") == "all").select(
                pl.col("head").alias("representation"), pl.col("test_set").alias("images"),
                pl.struct("auc", "auc_lo", "auc_hi").map_elements(lambda s: fmt_auc(s["auc"], s["auc_lo"], s["auc_hi"]),
                                                                  return_dtype=pl.Utf8).alias("domain AUC (macro OvR)"))
            note = ("How well logistic regression recovers the SOURCE from the representation (0.5 = not at all; "
                    "paper 003 found 0.94-0.97 on pretrained embeddings).")
            md += [note + "\n", markdown_table(tab)]
            htm += [f"<p>{html.escape(note)}</p>", html_table(tab)]
            figs = _fetch_artifacts(probe["mlflow_run_id"][0], out, f"{bb}_{pre}")
            md += [f"![{f}]({f})\n" for f in figs]
            htm += [f'<img src="{html.escape(f)}" width="640">' for f in figs]
        from featstore.api import Store
        from featstore.neighbors import neighbour_summary

        X, meta = Store.over(con).arrays(bb, pre)
        nb = neighbour_summary(X, meta["source"], meta["label"], k=10).with_columns(
            pl.col("same_source", "same_source_chance", "same_label", "same_label_chance").round(3))
        note = ("Each image's 10 nearest neighbours (cosine): the share from its own source and with its own label, "
                "beside chance. Sharing the source far above chance = the embedding encodes where images came from.")
        md += [note + "\n", markdown_table(nb)]
        htm += [f"<p>{html.escape(note)}</p>", html_table(nb)]
    has_nd = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'near_duplicates'").fetchall()[0][0]
    if has_nd:
        nd = pl.from_arrow(con.sql("SELECT * FROM near_duplicate_pairs_by_source").to_arrow_table())
        note = ("Near duplicates (same picture, different bytes) per source pair, from `featstore duplicates`; "
                "exact copies are counted in `duplicate_groups`.")
        md += ["### Near duplicates\n", note + "\n", markdown_table(nd)]
        htm += ["<h3>Near duplicates</h3>", f"<p>{html.escape(note)}</p>", html_table(nd)]
    return md, htm


def _fetch_artifacts(run_id: str | None, out: Path, prefix: str) -> list[str]:
    if not run_id:
        return []
    try:
        from mlflow import MlflowClient

        from featstore.track import tracking_uri

        c = MlflowClient(tracking_uri())
        names = []
        for a in c.list_artifacts(run_id):
            if a.path.endswith(".png"):
                local = Path(c.download_artifacts(run_id, a.path, str(out)))
                target = out / f"{prefix}_{local.name}"
                local.replace(target)
                names.append(target.name)
        return names
    except Exception:  # noqa: BLE001 - a report without pictures beats no report; the table is there
        return []
