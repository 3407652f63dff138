"""Report: one self-contained HTML file, Markdown and figures of a sweep. The last stage, a leaf that
only front ends (CLI, API, demo) import: it turns result rows (`results`, `predictions`) into tables
and documents, and writes nothing to the store. Figures are drawn by `figures`; the shortcut evidence
(domain probe figures from MLflow, t-SNE map, neighbor summary, near duplicates) is computed by the
forensics stage (`probe.shortcut_evidence`) and only laid out here.

Rendered from Jinja2 templates (featstore/templates). The HTML opens on the verdict per model and two
figures (per-source unseen AUC as a forest plot, seen vs unseen per model as a dumbbell plot); its
figures are base64 PNGs, its interactive t-SNE map a canvas with a small inline script.

The headline table puts, per head and embedding set, the AUC on images of sources the model saw
(mixed k-fold, pooled out-of-fold) beside the AUC on sources it never saw (leave-one-source-out
pooled, leave-pair-out, seen-unseen), each with its bootstrap 95% CI.
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import numpy as np
import polars as pl

from featstore.figures import dedupe_pooled, dumbbell_figure, file_stem, forest_figure, roc_per_source_figure
from featstore.results import MODEL, source_mean


def fmt_auc(auc, lo, hi) -> str:
    if auc is None:
        return "undefined (one class)"
    if lo is None:
        return f"{auc:.3f}"
    return f"{auc:.3f} [{lo:.3f}, {hi:.3f}]"


def _f(v, d=3):
    return "—" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


# --- the study report -------------------------------------------------------------------------

def latest_sweep(con, study: str | None) -> tuple[str, str]:
    """The named study's latest sweep; without a name, the latest benchmark sweep (never the domain
    probe's rows, which have no seen/unseen tables)."""
    q = "SELECT study, max(sweep_id) FROM results" + \
        (" WHERE study = ?" if study else " WHERE protocol <> 'domain-probe'") + \
        " GROUP BY study ORDER BY max(sweep_id) DESC LIMIT 1"
    rows = con.execute(q, [study] if study else []).fetchall()  # fetchall: DuckDB 2 refuses work beside an open result
    row = rows[0] if rows else None
    if not row:
        have = [r[0] for r in con.execute("SELECT DISTINCT study FROM results").fetchall()]
        raise ValueError(f"no results for study '{study}' in the store; studies: {have or 'none'} "
                         "(run `featstore sweep CONFIG` first)")
    return row[0], row[1]


def _ci(x, lo, hi, d=3) -> str:
    if x is None:
        return "—"
    return f"{x:.{d}f}" if lo is None else f"{x:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def _flag(auc) -> str:
    return " ⚠ below chance" if auc is not None and auc < 0.5 else ""


BASELINE_BACKBONES = ("pixelstats",)  # raw-pixel statistics: the floor, never the reference of a comparison


def _mixed_metrics(g: pl.DataFrame) -> dict:
    """The mixed unit's pooled out-of-fold row (first repeat) metrics: the shortcut estimand and the seen."""
    m = g.filter((pl.col("protocol") == "mixed") & (pl.col("kind") == "pooled") & (pl.col("scope") == "all")
                 & (pl.col("test_set") == "seen")).sort("repeat")
    if not m.height:
        return {}
    x = m.row(0, named=True).get("metrics")
    return (json.loads(x) if isinstance(x, str) else x) or {}


def headline(res: pl.DataFrame, probe: dict | None = None) -> pl.DataFrame:
    """One row per model (backbone x preprocessing x head x selection), sorted by the mean over held-out
    sources of per-source AUC: a number prevalence differences between sources cannot lift. Pooled LOSO
    is not here (see `pooled_table`). `probe`: (backbone, preprocess) -> domain-probe AUC, if run.
    Each model gets two answers (featstore/verdict.py): does it use the source (the shortcut estimand of its
    mixed out-of-fold predictions) and does it transfer (the drop on new sources); their p-values are
    Holm-adjusted over the table's models, one family per question."""
    from featstore.score import format_p, holm, summarise_over_seeds
    from featstore.verdict import judge

    models = []
    for key, g in res.filter(pl.col("status") == "ok").group_by(MODEL, maintain_order=True):
        lo, su = source_mean(g, "loso"), source_mean(g, "seen-unseen")
        mm = _mixed_metrics(g)
        models.append((key, g, lo, su, lo or su, mm))
    p_sc = holm([(mm.get("shortcut") or {}).get("p") for *_, mm in models])
    p_dr = holm([(main or {}).get("gap_p") for *_, main, _ in models])
    out = []
    for (key, g, lo, su, main, mm), pa, pb in zip(models, p_sc, p_dr):
        row = dict(zip(MODEL, key))
        row["role"] = "baseline (raw pixels)" if key[0] in BASELINE_BACKBONES else "model"
        gi = ((main or {}).get("metrics") or {}).get("gap") or {}
        seen = gi.get("seen") if gi.get("seen") is not None else mm.get("seen_mean")
        row["seen: mean per-source AUC (mixed)"] = (f"{seen:.3f} ({mm.get('seen_sources') or gi.get('n_seen')} "
                                                    "sources)" if seen is not None else "—")
        sc = mm.get("shortcut") or {}
        row["uses the source? cross − same-source AUC [CI]"] = (
            _ci(sc["estimate"], sc.get("lo"), sc.get("hi")) + f" ({sc['cross']:.3f} − {sc['same']:.3f}; "
            f"{sc['n_sources']} sources, {sc['n_same_sources']} with both classes)"
            + (f", p {format_p(pa)} (Holm)" if pa is not None else "") if sc.get("estimate") is not None else "—")
        row["LOSO mean per-source AUC (unseen)"] = (
            _ci(lo["auc"], lo["auc_lo"], lo["auc_hi"]) + f" ({lo['n_sources']} sources)" + _flag(lo["auc"])
            if lo else "—")
        row["LOSO worst source"] = (f"{lo['auc_worst']:.3f} ({lo['worst_source']}){_flag(lo['auc_worst'])}"
                                    if lo and lo.get("auc_worst") is not None else "—")
        lpo = source_mean(g.sort("seed"), "leave-pair-out")
        seeds = g.filter((pl.col("protocol") == "leave-pair-out") & (pl.col("kind") == "source-mean"))
        if lpo and lpo.get("auc") is not None:
            txt = f"{lpo['auc']:.3f}"
            if seeds.height > 1:  # selection repeats: the spread that re-selecting alone causes
                txt = summarise_over_seeds(seeds["auc"].to_list())["text"].replace("(n=", "(seeds n=")
            row["leave-pair-out mean (worst pair)"] = (f"{txt} ({lpo['auc_worst']:.3f}, {lpo['worst_source']})"
                                                       f"{_flag(lpo['auc_worst'])}")
        else:
            row["leave-pair-out mean (worst pair)"] = "—"
        if su:
            sseen = (su["metrics"].get("gap") or {}).get("seen")
            row["seen-unseen: seen / unseen mean"] = (f"{sseen:.3f} / " if sseen is not None else "— / ") + \
                _ci(su["auc"], su["auc_lo"], su["auc_hi"]) + _flag(su["auc"])
        else:
            row["seen-unseen: seen / unseen mean"] = "—"
        if main and main.get("gap") is not None:
            row["drop on new sources: seen − unseen [CI]"] = (
                _ci(main["gap"], main.get("gap_lo"), main.get("gap_hi"))
                + f" ({gi.get('n_unseen', main.get('n_sources'))} sources), p {format_p(pb)} (Holm)"
                + f" (seen: {gi.get('seen_from', '?')})")
        else:
            row["drop on new sources: seen − unseen [CI]"] = "—"
        pr = (probe or {}).get((key[0], key[1]))
        v = judge(main, sc or None, ((main or {}).get("metrics") or {}).get("below_chance"), pr, pa, pb)
        row["verdict"] = v.verdict
        row["uses the source?"] = v.uses_source
        row["transfers?"] = v.transfer
        row["why"] = v.reason
        row["_rank"] = main["auc"] if main and main.get("auc") is not None else -1.0
        out.append(row)
    if not out:
        return pl.DataFrame()
    return pl.DataFrame(out).sort("_rank", descending=True, maintain_order=True).drop("_rank")


def probe_aucs(con) -> dict:
    """(backbone, preprocess) -> the latest domain probe's macro AUC on all images, where one was run."""
    rows = con.execute("SELECT backbone, preprocess, arg_max(auc, sweep_id) FROM results WHERE study = 'domain-probe' "
                       "AND head = 'raw' AND test_set = 'all images' AND scope = 'all' GROUP BY ALL").fetchall()
    return {(b, p): a for b, p, a in rows}


REFERENCE_HEAD = "logreg"  # fixed before any result: every other head is compared with it


def compare_models(res: pl.DataFrame, preds: pl.DataFrame) -> pl.DataFrame:
    """Paired, source-level comparison of every head with the reference head (`REFERENCE_HEAD`, logistic
    regression, fixed beforehand: never the best on these test images, which would be a winner's curse)
    of the same embedding set, on identical LOSO test images (binary targets). Raw-pixel baselines
    (`BASELINE_BACKBONES`) are never a reference. p Holm-adjusted over the table's rows."""
    from featstore.score import format_p, holm, paired_bootstrap_auc_diff

    sm = res.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "loso") & (pl.col("status") == "ok")
                    & pl.col("auc").is_not_null())
    if sm.height < 2 or not preds.height:
        return pl.DataFrame()
    p = preds.filter(pl.col("protocol") == "loso")

    def scores(r):
        return p.filter((pl.col("backbone") == r["backbone"]) & (pl.col("preprocess") == r["preprocess"])
                        & (pl.col("head") == r["head"]) & (pl.col("selection") == r["selection"])).select(
            "fold", "image_id", "y", "score", pl.col("fold").str.strip_prefix("heldout=").alias("src"))
    rows = list(sm.iter_rows(named=True))
    out = []
    for ref in rows:
        if ref["head"] != REFERENCE_HEAD or ref["backbone"] in BASELINE_BACKBONES:
            continue
        a = scores(ref)
        for r in rows:
            if r["head"] == REFERENCE_HEAD or (r["backbone"], r["preprocess"], r["selection"]) != \
                    (ref["backbone"], ref["preprocess"], ref["selection"]):
                continue
            j = scores(r).join(a, on=["fold", "image_id"], suffix="_ref")
            if not j.height:
                continue
            d = paired_bootstrap_auc_diff(j["y"].to_numpy(), j["score"].to_numpy(), j["score_ref"].to_numpy(),
                                          j["src"].to_numpy(), n_boot=int(ref.get("bootstrap") or 0) or 0,
                                          seed=int(ref["seed"]))
            out.append({"model": f"{r['head']} {r['backbone']}/{r['preprocess']}",
                        "reference": f"{ref['head']} {ref['backbone']}/{ref['preprocess']}",
                        "difference [CI]": _ci(d.get("estimate"), d.get("lo"), d.get("hi")),
                        "_p": d.get("p"), "sources": d.get("n_sources"), "uncertainty": d.get("uncertainty")})
    if not out:
        return pl.DataFrame()
    adj = holm([o["_p"] for o in out])
    for o, pa in zip(out, adj):
        o["p"], o["p (Holm)"] = format_p(o.pop("_p")), format_p(pa)
    return pl.DataFrame(out)


def pooled_table(res: pl.DataFrame) -> pl.DataFrame:
    """Secondary: pooled out-of-fold LOSO AUC. It mixes held-out sources whose positive rates differ,
    so a model that only recognises the source can score well here."""
    d = res.filter((pl.col("status") == "ok") & (pl.col("kind") == "pooled") & (pl.col("protocol") == "loso")
                   & (pl.col("scope") == "all"))
    return d.select(*MODEL, pl.struct("auc", "auc_lo", "auc_hi").map_elements(
        lambda s: _ci(s["auc"], s["auc_lo"], s["auc_hi"]), return_dtype=pl.Utf8).alias("pooled LOSO AUC [image CI]"))


def per_source(res: pl.DataFrame) -> pl.DataFrame:
    d = res.filter((pl.col("status") == "ok") & (pl.col("protocol") == "loso") & (pl.col("scope") == "all")
                   & (pl.col("kind") == "fold"))
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


def _md(text) -> str:
    """Text from the store (source names, labels, errors) as inert Markdown: raw HTML would pass
    through a Markdown renderer, | and line breaks would break a table."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(df: pl.DataFrame) -> str:
    if df.height == 0:
        return "_(none)_\n"
    cols = df.columns
    lines = ["| " + " | ".join(_md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in df.iter_rows():
        lines.append("| " + " | ".join(_md(_f(v)) for v in r) + " |")
    return "\n".join(lines) + "\n"


# --- tables as HTML: coloured cells, inline Markdown in notes --------------------------------------

VERDICT_CLASS = {"shortcut likely": "v-shortcut", "drops on new sources": "v-drops", "generalises": "v-generalises",
                 "inconclusive": "v-inconclusive"}
_NUM = re.compile(r"^\s*(-?\d+\.\d+)")


def auc_colour(v: float | None) -> str | None:
    """Diverging red-white-blue centred at 0.5 (chance): red below, blue above, pale near chance."""
    if v is None or not np.isfinite(v):
        return None
    import matplotlib
    import matplotlib.colors as mc

    t = float(np.clip((v - 0.5) / 0.5, -1, 1))
    r, g, b, _ = matplotlib.colormaps["RdBu"]((t + 1) / 2)
    w = 0.6  # blend with white so the text stays readable
    return mc.to_hex((r * (1 - w) + w, g * (1 - w) + w, b * (1 - w) + w))


def inline_md(text: str) -> str:
    """A note's `code`, **bold** and *emphasis* as HTML; everything else escaped."""
    t = html.escape(str(text), quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", t)


def html_table(df: pl.DataFrame) -> str:
    """Cells of AUC columns coloured on a scale centred at 0.5, verdict cells by verdict."""
    if df.height == 0:
        return "<p><em>(none)</em></p>"
    auc_cols = {c for c in df.columns
                if "auc" in c.lower() and "gap" not in c.lower() and "difference" not in c.lower()}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = []
    for r in df.iter_rows(named=True):
        cells = []
        for c, v in r.items():
            text = html.escape(_f(v))
            if c == "verdict":
                cells.append(f'<td class="verdict {VERDICT_CLASS.get(str(v), "")}">{text}</td>')
                continue
            colour = None
            if c in auc_cols:
                m = _NUM.match(str(v)) if v is not None else None
                colour = auc_colour(float(m.group(1)) if m else (v if isinstance(v, float) else None))
            cells.append(f'<td style="background:{colour}">{text}</td>' if colour else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# --- the report: render into a fresh folder, move in ----------------------------------------------

def write_report(con, out: str | Path, study: str | None = None, sweep_id: str | None = None,
                 tracking_uri: str | None = None) -> dict:
    """Render into a fresh folder beside `out`, then move the files in: a report that fails writes
    nothing, and only the report's own files are replaced in `out`. tracking_uri: the MLflow store the
    sweep and the domain probes wrote to (default featstore.track.tracking_uri()), for the probes'
    figures; what cannot be fetched is named in the report and in the returned `warnings`."""
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        r = _write_report(con, tmp, study, sweep_id, tracking_uri)
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            dest = out / f.name
            if dest.is_dir() and not dest.is_symlink():
                raise FileExistsError(f"{dest} is a folder; the report would replace it with a file")
            os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r["files"] = [out / Path(f).name for f in r["files"]]
    return r


def _template(name: str):
    from importlib.resources import files

    import jinja2

    env = jinja2.Environment(autoescape=name.endswith(".html.j2"), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = _md
    env.filters["inline_md"] = lambda t: __import__("markupsafe").Markup(inline_md(t))
    return env.from_string((files("featstore") / "templates" / name).read_text(encoding="utf-8"))


def _data_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can end the element or open a comment."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _write_report(con, out: Path, study: str | None, sweep_id: str | None, tracking_uri: str | None) -> dict:
    from markupsafe import Markup

    from featstore.probe import MAP_POINTS, shortcut_evidence  # the forensics stage (scikit-learn: loaded here)

    if sweep_id is None:
        study, sweep_id = latest_sweep(con, study)
    res = pl.from_arrow(con.sql("SELECT * FROM results WHERE study = ? AND sweep_id = ? ORDER BY ALL",
                                params=[study, sweep_id]).to_arrow_table())
    if not res.height:
        raise ValueError(f"no results for study '{study}', sweep '{sweep_id}' in the store")
    preds = pl.from_arrow(con.sql("SELECT * FROM predictions WHERE study = ? AND sweep_id = ?",
                                  params=[study, sweep_id]).to_arrow_table())
    honest = res.filter(~pl.col("oracle"))
    oracle = res.filter(pl.col("oracle"))
    head = headline(honest, probe_aucs(con))
    meta = res.row(0, named=True)
    seed = int(meta.get("seed") or 0)

    def fig(path, title, caption=""):
        return dict(file=path.name, title=title, caption=caption, uri=_data_uri(path))

    top = []
    f = forest_figure(honest, out / "forest_unseen_auc.png")
    if f:
        top.append(fig(f, "Per-source unseen AUC",
                       "Each held-out source: AUC of the model fitted without it, with its image-level bootstrap 95% "
                       "CI. Diamond: the mean over held-out sources with its source-level 95% CI (what the verdict "
                       "and the ranking use)."))
    f = dumbbell_figure(honest, out / "dumbbell_seen_unseen.png")
    if f:
        top.append(fig(f, "Seen vs unseen sources",
                       "Circle: AUC on held-out images of sources the model trained on; diamond: mean per-source AUC "
                       "on sources it never saw. The gap's CI and p are in the table below."))
    rocs = []
    binary = meta.get("target") != "3class"
    for (bb, pre, hd), g in preds.filter(pl.col("selection") != "oracle").group_by(
            ["backbone", "preprocess", "head"], maintain_order=True):
        if not binary:
            break
        f = roc_per_source_figure(dedupe_pooled(g), f"{hd} on {bb}/{pre}: seen (mixed k-fold) vs each unseen "
                                  "source (LOSO)", out / f"roc_{file_stem(hd)}_{file_stem(bb)}_{file_stem(pre)}.png")
        if f:
            rocs.append(fig(f, f"{hd} on {bb}/{pre}"))
    failed = res.filter(pl.col("status") != "ok")
    cmp_ = compare_models(honest, preds)
    sels = ", ".join(sorted(set(honest["selection"].to_list())))
    sections = [
        ("Headline: seen vs unseen sources — does it use the source? does it transfer?", head,
         f"{head.height} models; two tests each, one family per question, Holm-adjusted over the {head.height} "
         "models (2 families of "
         f"{head.height} tests). *uses the source?* = AUC over positive–negative pairs from different sources − "
         "AUC over pairs from the same source, on the mixed k-fold out-of-fold predictions (a model that ranks "
         "by disease ranks both alike; one that ranks by source ranks cross-source pairs far better), "
         "**patient-level** 95% CI (patients resampled within each source, sources fixed), p for a difference "
         "no larger than 0.05. *drop on new sources* = seen − unseen mean per-source AUC, seen = the same "
         "head's mixed k-fold mean per-source AUC (the *seen* column; the same in the figures and MLflow), "
         "**source-level** 95% CI (t with the sources' df, held-out sources resampled, then images within "
         "them): a domain shift drops too, so a drop is never called a shortcut. *LOSO mean*: source-level "
         "95% CI; leave-pair-out: the mean and the worst pair without a CI (pairs share sources), or with "
         "`selection_repeats`, mean ± sd over selection seeds (selection-level). A held-out source counts as "
         "below chance only by a permutation test with Holm over the model's held-out sources. *role*: "
         "raw-pixel baselines are a floor, never a reference. Models are sorted by the LOSO mean (ties keep "
         "their order). ⚠ marks an AUC below chance. AUC cells: red below chance, white at 0.5, blue above. "
         f"Verdict rules: featstore/verdict.py. Hyperparameters chosen on training sources only (selection: "
         f"{sels}); {meta.get('bootstrap')} resamples."),
        ("Head comparisons with the reference head (paired)", cmp_,
         f"{cmp_.height} tests, Holm-adjusted. Each head against logistic regression on the same embedding set "
         "(the reference fixed beforehand; raw-pixel baselines are never one), on identical LOSO test images: "
         "difference of mean per-source AUC, source-level paired bootstrap 95% CI (t interval) and p (the same "
         "resample applied to both models)."),
        ("Pooled LOSO (secondary: prevalence-sensitive)", pooled_table(honest),
         "Warning: pooling held-out sources whose positive rates differ rewards recognising the source; "
         "read the per-source means above. Uncertainty: image-level bootstrap 95% CI."),
        ("Leave-one-source-out, per held-out source", per_source(honest),
         "AUC is undefined where the held-out source has one class; its sensitivity or specificity is shown. "
         "Uncertainty: image-level bootstrap 95% CI within the source."),
        ("Leave-pair-out, per pair", pairs(honest), "Uncertainty: image-level bootstrap 95% CI within the pair."),
    ]
    if oracle.height:
        sections.append(("ORACLE upper bound (selected on the test set; not a result)", headline(oracle),
                         "Hyperparameters chosen on the held-out data itself: how much selection alone could gain."))
    if failed.height:
        sections.append(("Failed", failed.select("protocol", "head", "fold", "error"), ""))
    sections = [dict(name=n, note=note, md=markdown_table(df), html=Markup(html_table(df))) for n, df, note in sections]
    verdicts = [dict(model=f"{r['head']} · {r['backbone']}/{r['preprocess']}"
                     + ("" if r["selection"] == "train-val" else f" ({r['selection']})"),
                     verdict=r["verdict"], why=r["why"], cls=VERDICT_CLASS.get(r["verdict"], ""),
                     uses_source=r["uses the source?"], transfers=r["transfers?"],
                     unseen=r["LOSO mean per-source AUC (unseen)"] if r["LOSO mean per-source AUC (unseen)"] != "—"
                     else r["seen-unseen: seen / unseen mean"]) for r in head.iter_rows(named=True)] \
        if head.height else []
    dropped = res.filter(pl.col("n_dropped_shared") > 0).select("protocol", "fold", "n_dropped_shared").unique()
    shared_note = ("Images that also occur in a test source (the same file in two collections) were dropped "
                   "from training: " + ", ".join(f"{r[0]} {r[1]}: {r[2]}" for r in dropped.iter_rows())
                   if dropped.height else "No training image also occurred in a test source.")
    sets = sorted({(r["backbone"], r["preprocess"]) for r in res.select("backbone", "preprocess").unique()
                   .iter_rows(named=True)})
    evidence = evidence_sections(shortcut_evidence(con, sets, out, seed, tracking_uri), out)
    ctx = dict(title=f"featstore report — {study}", study=study, sweep_id=sweep_id, n_rows=res.height,
               code_version=str(meta.get("code_version")), seed=meta.get("seed"), target=meta.get("target"),
               verdicts=verdicts, top=top, sections=sections, shared_note=shared_note, rocs=rocs,
               evidence=evidence, map_cap=MAP_POINTS)
    (out / "report.md").write_text(_template("report.md.j2").render(**ctx), encoding="utf-8")
    for ev in evidence["sets"]:
        if ev.get("map"):
            ev["map"]["json"] = Markup(_script_json(dict(points=ev["map"]["points"], palettes=ev["map"]["palettes"])))
    (out / "report.html").write_text(_template("report.html.j2").render(**ctx), encoding="utf-8")
    (out / "headline.json").write_text(json.dumps(head.to_dicts(), indent=1))
    files = [out / "report.md", out / "report.html", out / "headline.json"] + \
        [p for p in sorted(out.iterdir()) if p.suffix == ".png"]
    return dict(study=study, sweep_id=sweep_id, headline=head, files=files, warnings=evidence["warnings"])


# --- shortcut evidence: computed by the forensics stage, laid out here ------------------------------

def evidence_sections(ev: dict, out: Path) -> dict:
    """probe.shortcut_evidence's rows and figure files as the templates' tables, notes and data URIs."""
    from markupsafe import Markup

    from featstore.probe import NEIGHBORS_K

    sets = []
    for e in ev["sets"]:
        bb, pre, probe = e["backbone"], e["preprocess"], e["probe"]
        s = dict(backbone=bb, preprocess=pre, probe=None, figs=[], map=None)
        if probe.height == 0:
            s["probe_note"] = f"No domain probe yet: `featstore probe --backbone {bb} --preprocess {pre}`."
        else:
            tab = probe.filter(pl.col("scope") == "all").select(
                pl.col("head").alias("representation"), pl.col("test_set").alias("images"),
                pl.struct("auc", "auc_lo", "auc_hi").map_elements(lambda s: fmt_auc(s["auc"], s["auc_lo"], s["auc_hi"]),
                                                                  return_dtype=pl.Utf8).alias("domain AUC (macro OvR)"))
            s["probe_note"] = ("How well logistic regression recovers the SOURCE from the representation (0.5 = not "
                               "at all; Trivedi et al. 2022 found 0.94-0.97 on pretrained embeddings).")
            s["probe"] = dict(md=markdown_table(tab), html=Markup(html_table(tab)))
            s["figs"] = [dict(file=f, title=f, uri=_data_uri(out / f)) for f in e["figs"]]
        if e["map"]:
            s["map"] = dict(e["map"], uri=_data_uri(out / e["map"]["png"]))
        nb = e["neighbors"]
        s["nb_note"] = (f"Each image's {NEIGHBORS_K} nearest neighbours (cosine): the share from its own source and "
                        "with its own label, beside chance. Sharing the source far above chance = the embedding "
                        "encodes where images came from.")
        s["nb"] = dict(md=markdown_table(nb), html=Markup(html_table(nb)))
        sets.append(s)
    nd = None
    if ev["neardup"] is not None:
        tab = ev["neardup"]["table"]
        nd = dict(note="Near duplicates (same picture, different bytes) per source pair, from `featstore duplicates`; "
                       "exact copies are counted in `duplicate_groups`.",
                  md=markdown_table(tab), html=Markup(html_table(tab)), sheet=None)
        if ev["neardup"]["sheet"]:
            sh = ev["neardup"]["sheet"]
            nd["sheet"] = dict(sh, uri=_data_uri(out / sh["file"]))
    return dict(sets=sets, neardup=nd, warnings=list(ev["warnings"]))
