"""Report: one self-contained HTML file, Markdown and figures of a sweep. The last stage, a leaf that
only front ends (CLI, API, demo) import: it turns result rows (`results`, `predictions`) into tables
and documents, and writes nothing to the store. Figures are drawn by `figures`; the shortcut evidence
(domain probe rows, t-SNE coordinates, neighbor summary) is computed and stored by the forensics stage
(`featstore probe`, featstore.probe) and near duplicates by `featstore duplicates`: here they are read
from the store and laid out, never recomputed, and MLflow is never read.

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

from featstore.figures import (dedupe_pooled, dumbbell_figure, file_stem, forest_figure, reliability_figure,
                              roc_per_source_figure)
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
    from featstore.api import Store

    fs = Store.over(con)
    row = fs.latest_sweep(study)
    if not row:
        have = fs.studies()
        named = _study_of_config(study) if study else None
        if named and named != study and named in have:  # a config's name, e.g. synthetic_demo -> synthetic-demo
            return latest_sweep(con, named)
        from featstore.suggest import did_you_mean

        if study and have:
            raise ValueError(f"no results for study '{study}' in the store{did_you_mean(study, have)}; "
                             f"studies: {', '.join(have)}")
        raise ValueError(f"no results for study '{study}' in the store; studies: {', '.join(have) or 'none'} "
                         "(run `featstore sweep CONFIG` first)" if study else
                         "no results in the store (run `featstore sweep CONFIG` first)")
    return row[0], row[1]


def _study_of_config(name: str) -> str | None:
    """The study a config names (`study:`), where `name` is a config file or a shipped config's name."""
    from featstore.sweep.config import StudyError, load_study

    try:
        return load_study(name).study
    except (StudyError, OSError, ValueError):
        return None


def _ci(x, lo, hi, d=3, low=0.0) -> str:
    """`x [lo, hi]`; `x, CI n/a` where an interval was computed but spans the whole scale (low..1: two
    sources give [0, 1]), so it is not printed as if it meant something."""
    from featstore.track import interval

    if x is None:
        return "—"
    if lo is None:
        return f"{x:.{d}f}"
    ci = interval(lo, hi, low)
    return f"{x:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else f"{x:.{d}f}, CI n/a"


def _flag(auc) -> str:
    return " ⚠ below chance" if auc is not None and auc < 0.5 else ""


BASELINE_BACKBONES = ("pixelstats",)  # raw-pixel statistics: the floor, never the reference of a comparison


def headline(res: pl.DataFrame, probe: dict | None = None) -> pl.DataFrame:
    """One row per model (backbone x preprocessing x head x selection), sorted by the mean over held-out
    sources of per-source AUC: a number prevalence differences between sources cannot lift. Pooled LOSO
    is not here (see `pooled_table`). `probe`: (backbone, preprocess) -> domain-probe AUC, if run.
    Each model gets two answers (featstore/verdict.py): does it use the source (the shortcut estimand of its
    mixed out-of-fold predictions) and does it transfer (the drop on new sources); their p-values are
    Holm-adjusted over the table's models, one family per question."""
    from featstore.score import format_p, summarise_over_seeds
    from featstore.verdict import model_verdicts

    out = []
    for mv in model_verdicts(res, probe):
        key, g, lo, su, main, mm, pa, pb = (mv[k] for k in ("key", "g", "lo", "su", "main", "mm", "pa", "pb"))
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
                _ci(su["auc"], su["auc_lo"], su["auc_hi"]) + f" ({su['n_sources']} sources)" + _flag(su["auc"])
        else:
            row["seen-unseen: seen / unseen mean"] = "—"
        if main and main.get("gap") is not None:
            row["drop on new sources: seen − unseen [CI]"] = (
                _ci(main["gap"], main.get("gap_lo"), main.get("gap_hi"), low=-1.0)
                + f" ({gi.get('n_unseen', main.get('n_sources'))} sources), p {format_p(pb)} (Holm)"
                + f" (seen: {gi.get('seen_from', '?')})")
        else:
            row["drop on new sources: seen − unseen [CI]"] = "—"
        v = mv["verdict"]
        row["verdict"] = v.verdict
        row["uses the source?"] = v.uses_source
        row["transfers?"] = v.transfer
        row["why"] = v.reason
        row["_rank"] = main["auc"] if main and main.get("auc") is not None else -1.0
        out.append(row)
    if not out:
        return pl.DataFrame()
    return pl.DataFrame(out).sort("_rank", descending=True, maintain_order=True).drop("_rank")


def verdict_cards(res: pl.DataFrame, head: pl.DataFrame) -> list[dict]:
    """One card per model, in the headline's order, every card the same rows so they compare at a
    glance: verdict, seen → unseen (each with its interval, or why it has none), worst held-out source,
    leave-pair-out, the two questions' answers with their figures (or "—"), and the verdict's reason once."""
    from featstore.track import ModelRuns, model_figures

    cards = []
    for r in head.iter_rows(named=True) if head.height else []:
        key = tuple(r[k] for k in MODEL)
        g = res.filter(pl.all_horizontal([pl.col(k) == v for k, v in zip(MODEL, key)]))
        f = model_figures(g)
        t = f["text"]
        cards.append(dict(model=ModelRuns.name((key[0], key[1], key[2], key[3])), verdict=r["verdict"], why=r["why"],
                          cls=VERDICT_CLASS.get(r["verdict"], ""),
                          seen=t.get("seen", "— (no mixed k-fold)"), unseen=t.get("unseen", "— (no held-out source "
                                                                                         "with both classes)"),
                          worst=t.get("worst", "—"), pairs=t.get("pairs", "— (no leave-pair-out)"),
                          uses_source=f"{r['uses the source?']}: {r['uses the source? cross − same-source AUC [CI]']}",
                          drop=f"{r['transfers?']}: {r['drop on new sources: seen − unseen [CI]']}"))
    return cards


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
            out.append({"model": f"{r['head']} {r['backbone']}/{r['preprocess']}", "selection": r["selection"],
                        "reference": f"{ref['head']} {ref['backbone']}/{ref['preprocess']}",
                        "difference [CI]": _ci(d.get("estimate"), d.get("lo"), d.get("hi"), low=-1.0),
                        "_p": d.get("p"), "sources": d.get("n_sources"), "uncertainty": d.get("uncertainty")})
    if not out:
        return pl.DataFrame()
    adj = holm([o["_p"] for o in out])
    for o, pa in zip(out, adj):
        o["p"], o["p (Holm)"] = format_p(o.pop("_p")), format_p(pa)
    return pl.DataFrame(out)


def _metrics(r) -> dict:
    m = r.get("metrics")
    return json.loads(m) if isinstance(m, str) else (m or {})


def robust_table(res: pl.DataFrame, cmp_: pl.DataFrame) -> pl.DataFrame:
    """Every head against logistic regression (the ERM reference) under each selection rule (LOSO): mean
    per-source unseen AUC with its source-level CI, the worst held-out source, worst-group AUC and ECE on
    the pooled held-out images, and the paired comparison with the reference (compare_models: the same
    test, Holm over its rows)."""
    sm = res.filter((pl.col("kind") == "source-mean") & (pl.col("protocol") == "loso") & (pl.col("status") == "ok"))
    pooled = res.filter((pl.col("kind") == "pooled") & (pl.col("protocol") == "loso") & (pl.col("test_set") == "unseen")
                        & (pl.col("scope") == "all"))
    if not sm.height:
        return pl.DataFrame()
    out = []
    for r in sm.iter_rows(named=True):
        key = (r["backbone"], r["preprocess"], r["head"], r["selection"])
        pm = [_metrics(p) for p in pooled.iter_rows(named=True)
              if (p["backbone"], p["preprocess"], p["head"], p["selection"]) == key]
        pm = pm[0] if pm else {}
        c = cmp_.filter((pl.col("model") == f"{r['head']} {r['backbone']}/{r['preprocess']}")
                        & (pl.col("selection") == r["selection"])) if cmp_.height else cmp_
        c = c.row(0, named=True) if c.height else {}
        out.append({"selection": r["selection"], "head": r["head"], "embedding": f"{r['backbone']}/{r['preprocess']}",
                    "unseen AUC, mean [CI]": _ci(r["auc"], r.get("auc_lo"), r.get("auc_hi")),
                    "worst source": f"{_f(r.get('auc_worst'))} ({r.get('worst_source') or '—'})",
                    "worst-group AUC": _f(pm.get("worst_group_auc")),
                    "worst group": pm.get("worst_group_auc_group") or "—",
                    "ECE": _f(pm.get("ece")),
                    "vs logreg [CI]": c.get("difference [CI]", "reference" if r["head"] == REFERENCE_HEAD else "—"),
                    "p (Holm)": c.get("p (Holm)", "—")})
    order = {s: i for i, s in enumerate(dict.fromkeys(r["selection"] for r in out))}
    out.sort(key=lambda o: (order[o["selection"]], o["head"] != REFERENCE_HEAD, o["head"]))
    return pl.DataFrame(out)


def reliability_curves(res: pl.DataFrame) -> dict:
    """model label -> the pooled LOSO unseen reliability bins (score.ece), for the reliability figure."""
    pooled = res.filter((pl.col("kind") == "pooled") & (pl.col("protocol") == "loso") & (pl.col("test_set") == "unseen")
                        & (pl.col("scope") == "all"))
    return {f"{r['head']} · {r['selection']}": _metrics(r).get("reliability") or [] for r in pooled.iter_rows(named=True)}


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


_MD_SPECIAL = re.compile(r"([\\`*_\[\]()!|#])")


def _md(text) -> str:
    """Text from the store (source names, labels, errors) as inert Markdown: raw HTML would pass
    through a Markdown renderer, | and line breaks would break a table, and link or image syntax
    (`[x](javascript:...)`, `![x](https://...)`) would make a viewer follow or fetch a URL; every
    Markdown punctuation character is backslash-escaped (CommonMark shows it as itself)."""
    t = html.escape(str(text), quote=False).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(r"\\\1", t)


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

REPORT_MANIFEST = ".featstore-report.json"  # the files the last report wrote: the only ones a report replaces


def write_report(con, out: str | Path, study: str | None = None, sweep_id: str | None = None) -> dict:
    """Render into a fresh folder beside `out`, then move the files in: a report that fails writes
    nothing, and only the report's own files are replaced in `out`. Reads the store only (the probes'
    evidence included); what it cannot show is named in the report and in the returned `warnings`."""
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        r = _write_report(con, tmp, study, sweep_id)
        _place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r["files"] = [out / Path(f).name for f in r["files"]]
    return r


def _place(tmp: Path, out: Path) -> None:
    """Move the rendered files from tmp into out. A new out is the renamed tmp (one step). Into an
    existing out, every file is checked first: a file in the way must be one the previous report wrote
    (listed in out/.featstore-report.json, unchanged), else nothing moves; the list is written last."""
    from featstore.ownfiles import is_own, listing, read_manifest, remove_own, shown, write_json_atomic

    new = listing(tmp)
    if not os.path.lexists(out):
        write_json_atomic(tmp / REPORT_MANIFEST, {"featstore_report": 1, "files": new})
        os.rename(tmp, out)
        tmp.mkdir()  # for the caller's cleanup
        return
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"--out {out} is not a folder; give a folder for the report")
    try:  # "previous": set while files move, so a report killed then still knows its files
        old = read_manifest(out / REPORT_MANIFEST) or {}
        prev = read_manifest(out / REPORT_MANIFEST, "previous", optional=True) or {}
    except ValueError as e:
        raise FileExistsError(f"{e}; nothing was written") from e
    in_way = [n for n in new if os.path.lexists(out / n) and not (is_own(out, n, old) or is_own(out, n, prev))]
    if in_way:
        raise FileExistsError(f"{out} holds {shown(in_way)}, not written by an earlier featstore report; nothing "
                              f"was written (move them, or give another --out)")
    write_json_atomic(out / REPORT_MANIFEST, {"featstore_report": 1, "files": new, "previous": {**prev, **old}})
    gone = {k: v for k, v in {**prev, **old}.items() if k not in new and "/" not in k}
    remove_own(out, gone)  # figures this report no longer makes
    for n in sorted(new):
        os.replace(tmp / n, out / n)
    write_json_atomic(out / REPORT_MANIFEST, {"featstore_report": 1, "files": new})


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


def _write_report(con, out: Path, study: str | None, sweep_id: str | None) -> dict:
    from markupsafe import Markup

    from featstore.probe import MAP_POINTS

    from featstore.api import Store

    if sweep_id is None:
        study, sweep_id = latest_sweep(con, study)
    fs = Store.over(con)
    res, preds = fs.sweep(study, sweep_id)
    if not res.height:
        raise ValueError(f"no results for study '{study}', sweep '{sweep_id}' in the store")
    honest = res.filter(~pl.col("oracle"))
    oracle = res.filter(pl.col("oracle"))
    head = headline(honest, fs.probe_aucs())
    meta = res.row(0, named=True)

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
    f = reliability_figure(reliability_curves(honest), "Reliability, pooled held-out sources (LOSO)",
                           out / "reliability_unseen.png")
    more = []  # figures after the tables: the first screen keeps the verdict cards and the two summary figures
    if f:
        more.append(fig(f, "Calibration on unseen sources",
                       "Observed frequency of positives against the mean predicted probability per bin, pooled "
                       "LOSO held-out images; the diagonal is perfect calibration (ECE in the head table)."))
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
        ("Every head against logistic regression (ERM) under each selection rule", robust_table(honest, cmp_),
         "LOSO. *unseen AUC*: mean over held-out sources (both classes) of the per-source AUC, source-level 95% CI; "
         "*worst source*: the lowest of them. *worst-group AUC*: groups are (source, label) of the pooled held-out "
         "images, a group against every image of the other label (score.group_metrics; groups of 5+); *ECE*: "
         "expected calibration error of P(positive), 10 bins, pooled held-out images (reliability figure below). "
         "*vs logreg*: the paired comparison above (source-level paired bootstrap, Holm over its rows). Every rule "
         "selects on the training sources only (split.SELECTIONS)."),
        ("Pooled LOSO (secondary: prevalence-sensitive)", pooled_table(honest),
         "Warning: pooling held-out sources whose positive rates differ rewards recognising the source; "
         "read the per-source means above. Uncertainty: image-level bootstrap 95% CI."),
        ("Leave-one-source-out, per held-out source", per_source(honest),
         "AUC is undefined where the held-out source has one class; its sensitivity or specificity is shown. "
         "Uncertainty: image-level bootstrap 95% CI within the source."),
        ("Leave-pair-out, per pair", pairs(honest), "Uncertainty: image-level bootstrap 95% CI within the pair."),
    ]
    extra_figs = issue25_sections(con, honest, out, sections)
    more += [fig(p, t, c) for p, t, c in extra_figs]
    if oracle.height:
        sections.append(("ORACLE upper bound (selected on the test set; not a result)", headline(oracle),
                         "Hyperparameters chosen on the held-out data itself: how much selection alone could gain."))
    if failed.height:
        sections.append(("Failed", failed.select("protocol", "head", "fold", "error"), ""))
    sections = [dict(name=n, note=note, md=markdown_table(df), html=Markup(html_table(df))) for n, df, note in sections]
    verdicts = verdict_cards(honest, head)
    dropped = res.filter(pl.col("n_dropped_shared") > 0).select("protocol", "fold", "n_dropped_shared").unique()
    shared_note = ("Images that also occur in a test source (the same file in two collections) were dropped "
                   "from training: " + ", ".join(f"{r[0]} {r[1]}: {r[2]}" for r in dropped.iter_rows())
                   if dropped.height else "No training image also occurred in a test source.")
    sets = sorted({(r["backbone"], r["preprocess"]) for r in res.select("backbone", "preprocess").unique()
                   .iter_rows(named=True)})
    evidence = evidence_sections(shortcut_evidence(con, sets, out), out)
    ctx = dict(title=f"featstore report — {study}", study=study, sweep_id=sweep_id, n_rows=res.height,
               code_version=str(meta.get("code_version")), seed=meta.get("seed"), target=meta.get("target"),
               verdicts=verdicts, top=top, more=more, sections=sections, shared_note=shared_note, rocs=rocs,
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


# --- adapting to a held-out site; attribution inside the lungs ---------------------------------------

def adapt_table(res: pl.DataFrame) -> pl.DataFrame:
    """Protocol `adapt`'s curve rows: per model, site, arm and k, the mean AUC over draws and its t interval."""
    d = res.filter((pl.col("kind") == "adapt") & (pl.col("status") == "ok"))
    out = []
    for r in d.iter_rows(named=True):
        m = r["metrics"] if isinstance(r["metrics"], dict) else json.loads(r["metrics"] or "{}")
        out.append({"model": f"{r['head']} · {r['backbone']}/{r['preprocess']}", "site": r["scope"],
                    "trained on": m.get("arm"), "k per class": m.get("k"),
                    "AUC on the site's other images [95% CI over draws]": fmt_auc(r["auc"], r["auc_lo"], r["auc_hi"]),
                    "draws": m.get("n_draws"), "images scored": r["n"]})
    if not out:
        return pl.DataFrame()
    return pl.DataFrame(out).sort(["model", "site", "trained on", "k per class"],
                                  descending=[False, False, True, False])


def attribution_table(summary: pl.DataFrame) -> pl.DataFrame:
    return summary.select(
        pl.col("source"), pl.col("label"), pl.col("head"),
        (pl.col("backbone") + "/" + pl.col("preprocess")).alias("embedding"),
        pl.col("weights_id").str.split(";").list.first().alias("weights"), pl.col("n").alias("images"),
        pl.struct("in_lung_share", "lo", "hi").map_elements(
            lambda s: fmt_auc(s["in_lung_share"], s["lo"], s["hi"]), return_dtype=pl.Utf8)
        .alias("in-lung share [95% CI over images]"),
        pl.col("lung_fraction").round(3).alias("lung area"), pl.col("enrichment").round(2))


def issue25_sections(con, honest: pl.DataFrame, out: Path, sections: list) -> list[tuple]:
    """The adapt curves (a table and a figure) and the latest `featstore attribution` run (a table), when
    present; appends the tables to `sections` and returns the figures as (path, title, caption)."""
    from featstore.figures import adapt_figure
    from featstore.store import attribution_rows

    figs = []
    ad = adapt_table(honest)
    if ad.height:
        sections.append((
            "Adapting to a held-out site with k labelled images per class (protocol adapt)", ad,
            "Each site left out, then k labelled images per class of it added to training (whole patients, "
            "several random draws per k), the head refitted with the hyperparameters selected on the training "
            "sources only, and scored on the site's images never added in that draw (the same images at every k "
            "of a draw). *with-sources*: the training sources plus the k images (k = 0: the LOSO model); "
            "*site-only*: the k images alone — does the rest help or hurt? Uncertainty: **draws** (a t interval "
            "over the random draws of the k images; the scored images' own sampling is not in it). As "
            "[BenAhmed2021] warned, a rise need not mean the disease was learned: the k images also teach the "
            "site's look."))
        f = adapt_figure(honest, out / "adapt_curves.png")
        if f:
            figs.append((f, "Adapting to a held-out site", "Unseen AUC vs k labelled images per class from the site "
                         "(solid: with the training sources; dashed: the site's images alone); bars: 95% t interval "
                         "over draws."))
    att = attribution_rows(con)
    if att.height:
        from featstore.attribution import summarise

        sm = summarise(att)
        random_w = any(str(w).startswith("random-init") for w in att["weights_id"].to_list())
        sections.append((
            "Attribution inside the lungs (featstore attribution)", attribution_table(sm),
            f"Run {att['run_id'][0]}, {att.height} images, method {att['method'][0]}: the head ({att['head'][0]}, "
            "fitted out-of-fold, patients grouped) on a frozen torch backbone's last feature maps; the map is where "
            "the log-odds moves away from the training images' mean map, for the class predicted, upsampled to the "
            "input; *in-lung share* = its mass inside the stored lung mask (mapped through the backbone's crop). An "
            "evenly spread map gives the lung area; enrichment = share / area. Uncertainty: t interval over "
            "images." + (" The backbone's weights were RANDOM (random-init): the maps say where a random trunk's "
                         "features carry the head's evidence, not where a trained model looks." if random_w else "")))
    return figs


# --- shortcut evidence: computed by the forensics stage, laid out here ------------------------------


# --- shortcut evidence: computed and stored by the forensics stage, laid out here -------------------

def shortcut_evidence(con, sets: list[tuple[str, str]], out: Path) -> dict:
    """The stored shortcut evidence, its figures drawn into `out` from the rows:
    sets: per (backbone, preprocess) in order, dict(backbone, preprocess, probe (the latest domain
    probe's rows, empty if none), figs (file names: its per-source bar chart, the GRL representation's
    map), map (the raw embeddings' map: png, n, total, seed, points, palettes; or None), neighbors (its
    k-NN summary, or None)); neardup: None without a near-duplicate search, else dict(table (pairs per
    source pair), sheet (dict(file, n, total), or None)); warnings: one line per thing not shown."""
    from featstore.api import Store
    from featstore.figures import domain_auc_bars, map_png, palettes, thumbnail_uri

    fs = Store.over(con)
    warnings: list[str] = []
    out_sets = []
    for bb, pre in sets:
        stem = f"{file_stem(bb)}_{file_stem(pre)}"
        got = fs.probe_evidence(bb, pre)
        probe, points, nb = got["probe"], got["points"], got["neighbors"]
        ev = dict(backbone=bb, preprocess=pre, probe=probe, figs=[], map=None, neighbors=None)
        if probe.height:
            ev["figs"].append(domain_auc_bars(probe.to_dicts(), f"domain AUC per source: {bb}/{pre}",
                                              out / f"{stem}_domain_auc.png").name)
            if not points.height:
                warnings.append(f"the t-SNE maps of {bb}/{pre}: its latest domain probe (sweep {probe['sweep_id'][0]}) "
                                f"stored none (run with --no-maps, or before schema version 8); rerun `featstore "
                                f"probe --backbone {bb} --preprocess {pre}`")
            if not nb.height:
                warnings.append(f"the neighbour summary of {bb}/{pre}: its latest domain probe stored none (run "
                                f"before schema version 8); rerun `featstore probe --backbone {bb} --preprocess {pre}`")
        if points.height:
            raw = points.filter(pl.col("representation") == "raw")
            grl = points.filter(pl.col("representation") == "grl_mlp")
            if grl.height:
                ev["figs"].append(map_png(grl.select("x", "y").to_numpy(), dict(source=grl["source"], label=grl["label"]),
                                          f"t-SNE of the GRL representation ({bb}/{pre})", out / f"{stem}_map_grl.png").name)
            if raw.height:
                xy = raw.select("x", "y").to_numpy()
                src, lab = raw["source"].to_list(), raw["label"].to_list()
                n, total, seed = raw.height, int(raw["n_total"][0]), int(raw["seed"][0])
                name = f"map_{stem}.png"
                map_png(xy, dict(source=src, label=lab),
                        f"t-SNE of {bb}/{pre} embeddings ({n} of {total} images)", out / name)
                lo, hi = xy.min(0), xy.max(0)
                norm = (xy - lo) / np.where(hi - lo > 0, hi - lo, 1)
                ps, pal_l = palettes(src, lab)
                pts = [dict(x=round(float(a), 4), y=round(float(b), 4), id=i, source=s_, label=l_, thumb=thumbnail_uri(p))
                       for (a, b), i, s_, l_, p in zip(norm, raw["image_id"].to_list(), src, lab, raw["path"].to_list())]
                ev["map"] = dict(png=name, n=n, total=total, seed=seed, points=pts, palettes=dict(source=ps, label=pal_l))
        if nb.height:
            ev["neighbors"] = nb.with_columns(
                pl.col("same_source", "same_source_chance", "same_label", "same_label_chance").round(3))
        out_sets.append(ev)
    nd = None
    dup = Store.over(con).near_duplicate_summary()
    if dup is not None:
        nd = dict(table=dup["by_source"], sheet=None)
        pairs = dup["pairs"]
        # an empty table is what a store holds before `featstore duplicates` ever ran: say so, not "(none)"
        nd["ran"] = pairs.height > 0
        nd["exact_across"] = dup["exact_across"]
        if pairs.height:
            from featstore.duplicates import contact_sheet

            contact_sheet(con, out / "near_duplicates.png", pairs, n=24)
            nd["sheet"] = dict(file="near_duplicates.png", n=min(24, pairs.height), total=pairs.height)
    return dict(sets=out_sets, neardup=nd, warnings=warnings)


def evidence_sections(ev: dict, out: Path) -> dict:
    """shortcut_evidence's rows and figure files as the templates' tables, notes and data URIs."""
    from markupsafe import Markup

    sets = []
    for e in ev["sets"]:
        bb, pre, probe = e["backbone"], e["preprocess"], e["probe"]
        s = dict(backbone=bb, preprocess=pre, probe=None, figs=[], map=None, nb=None)
        if probe.height == 0:
            s["probe_note"] = (f"No domain probe yet: `featstore probe --backbone {bb} --preprocess {pre}` computes "
                               "the evidence shown here (the source probe, the t-SNE maps, the neighbour summary).")
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
        if nb is not None:
            s["nb_note"] = (f"Each image's {nb['k'][0]} nearest neighbours (cosine): the share from its own source "
                            "and with its own label, beside chance. Sharing the source far above chance = the "
                            "embedding encodes where images came from.")
            nb = nb.drop("k")
            s["nb"] = dict(md=markdown_table(nb), html=Markup(html_table(nb)))
        sets.append(s)
    nd = None
    if ev["neardup"] is not None:
        tab = ev["neardup"]["table"]
        exact = ev["neardup"].get("exact_across")
        exact_txt = (f" Exact copies (same bytes) listed under more than one source: {exact} groups "
                     "(`duplicate_groups`)." if exact is not None else "")
        if ev["neardup"].get("ran", True):
            nd = dict(note="Near duplicates (same picture, different bytes) per source pair, from `featstore "
                           "duplicates`; exact copies are counted in `duplicate_groups`." + exact_txt,
                      md=markdown_table(tab), html=Markup(html_table(tab)), sheet=None)
        else:  # no pair recorded: the search was not run (it replaces the table with what it finds)
            note = ("Near-duplicate search: not run (no pairs recorded in this store; `featstore duplicates` finds "
                    "the same picture saved with different bytes)." + exact_txt)
            nd = dict(note=note, md="_not run_\n", html=Markup("<p><em>not run</em></p>"), sheet=None)
        if ev["neardup"]["sheet"]:
            sh = ev["neardup"]["sheet"]
            nd["sheet"] = dict(sh, uri=_data_uri(out / sh["file"]))
    return dict(sets=sets, neardup=nd, warnings=list(ev["warnings"]))
