"""The data a study runs on: one embedding set's arrays and metadata, filtered to the study's sources
and target, read through the store's public API; the zero-shot head's class text embeddings."""
from dataclasses import dataclass, field

import numpy as np

from featstore.split import Meta, make_meta
from featstore.sweep.config import Study, StudyError


# --- the data a study runs on --------------------------------------------------------------

SOURCE_RULE = ("shared file: belongs to every source it occurs in (tested in each held-out one, trains no model "
               "tested on any of them); own metadata from its occurrence with the smallest (source, path)")


@dataclass
class StudyData:
    X: np.ndarray
    meta: Meta
    image_id: np.ndarray
    class_names: list[str]
    weights_id: str
    n_excluded: int
    counts: dict            # (source, class name) -> n
    links: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), int))  # near-duplicate index pairs
    state: dict = field(default_factory=dict)  # what the rows depend on besides the config (results contract)
    head_inputs: dict = field(default_factory=dict)  # head -> what it is built with (zero-shot: text embeddings)
    selection_splits: dict = field(default_factory=dict)  # the plan's selection splits, drawn once per fold
    attributes: dict = field(default_factory=dict)  # demographic attribute -> per-row values (sex, age band)


def load_data(fs, st: Study, backbone: str, preprocess: str) -> StudyData:
    """Embeddings + metadata for one (backbone, preprocessing), filtered to the study's sources
    and target. `fs` is a featstore.api.Store."""
    try:
        wid, _ = fs.embedding_set(backbone, preprocess)
        X, meta = fs.arrays(backbone, preprocess)
    except ValueError as e:
        raise StudyError(f"{st.path or st.study}: {e} (run `featstore embed --backbone {backbone} "
                         f"--preprocess {preprocess}`)") from e
    have = fs.sources()
    check_sources(st, have)
    col = st.label_column if st.target == "binary" else st.class_column
    if col not in meta.columns:
        raise StudyError(f"{st.path or st.study}: column '{col}' not in the store's images "
                         f"(have {', '.join(meta.columns)})")
    src = meta["source"].to_numpy()
    val = meta[col].to_numpy()
    keep = np.ones(len(meta), bool) if not st.sources else np.isin(src, st.sources)
    if st.target == "binary":
        if st.positive not in set(val[keep]):
            raise StudyError(f"{st.path or st.study}: positive '{st.positive}' never occurs in column '{col}'")
        names = [f"not {st.positive}", st.positive]
        y = (val == st.positive).astype(int)
    else:
        keep &= np.isin(val, st.classes)
        names = list(st.classes)
        y = np.array([st.classes.index(v) if v in st.classes else -1 for v in val])
    n_excluded = int((~keep).sum())
    idx = np.flatnonzero(keep)
    iid = meta["image_id"].to_numpy()[idx]
    occ = fs.occurrences_by_image()
    links = np.zeros((0, 2), int)
    # an image in several sources belongs to all of them (split.Meta.members); ingest.canonical_images
    state = dict(source_rule=SOURCE_RULE,
                 neardup_policy=st.near_duplicates, neardup_links=0, neardup_thresholds=None, neardup_found_at=None,
                 mask_method=_mask_method(fs, preprocess, iid))
    pairs = fs.near_duplicate_pairs() if st.near_duplicates != "ignore" else None
    if pairs is not None:
        at = {v: i for i, v in enumerate(iid)}
        used = [p for p in pairs if p[0] in at and p[1] in at]
        links = np.array([(at[p[0]], at[p[1]]) for p in used], dtype=int).reshape(-1, 2)
        if used:
            state.update(neardup_found_at=max(p[4] for p in used), neardup_thresholds="; ".join(
                f"phash_max={h}, cosine_min={c}" for h, c in sorted({(p[2], p[3]) for p in used})))
    merge = st.near_duplicates == "drop-from-train"
    state["neardup_links"] = len(links) if st.near_duplicates != "ignore" else 0
    m = make_meta(src[idx], y[idx], meta["patient_id"].to_numpy()[idx], iid, [occ.get(i, []) for i in iid],
                  links if merge else ())
    counts = {}
    for s, k in zip(m.source, m.y):
        counts[(s, names[k])] = counts.get((s, names[k]), 0) + 1
    data = StudyData(np.ascontiguousarray(X[idx]), m, iid, names, wid, n_excluded, counts, links, state)
    data.attributes = demographics(fs, backbone, preprocess, iid)
    return data


def demographics(fs, backbone: str, preprocess: str, image_ids) -> dict:
    """sex and age band per image (None where the manifest has none); only attributes some image has."""
    from featstore.split import age_band

    d = fs.embeddings(backbone, preprocess, vectors=False).select("image_id", "sex", "age")
    at = dict(zip(d["image_id"].to_list(), zip(d["sex"].to_list(), d["age"].to_list())))
    sex = np.array([at.get(i, (None, None))[0] for i in image_ids], dtype=object)
    band = age_band([at.get(i, (None, None))[1] for i in image_ids])
    return {k: v for k, v in (("sex", sex), ("age_band", band)) if any(x is not None for x in v)}


def check_sources(st: Study, have: list[str]) -> None:
    """Every source the config names (sources, a protocol's train_sources / unseen_sources) is one
    the store has and the study uses; else one line per key with the closest name."""
    from featstore.suggest import unknown

    problems = []
    if st.sources:
        problems += [f"sources: {unknown('source', s, have)}" for s in st.sources if s not in have]
    usable = [s for s in have if not st.sources or s in st.sources]
    for proto, opts in st.protocols.items():
        for key in ("train_sources", "unseen_sources"):
            for s in opts.get(key) or ():
                if s in usable:
                    continue
                where = f"protocols.{proto}.{key}"
                if s in have:  # in the store, left out by `sources:`
                    problems.append(f"{where}: source '{s}' is not among the study's sources "
                                    f"({', '.join(usable)}); add it to sources")
                else:
                    problems.append(f"{where}: {unknown('source', s, usable)}")
    if problems:
        raise StudyError(f"{st.path or st.study}: " + "; ".join(problems))


def _mask_method(fs, preprocess: str, image_ids) -> str | None:
    """The lung-mask method(s) behind a lung-ROI preprocessing's images; None for other preprocessings."""
    from featstore.preprocess import get_preprocess

    if not get_preprocess(preprocess).needs_mask:
        return None
    return ",".join(fs.lung_mask_methods(image_ids)) or None


def zeroshot_inputs(st: Study, hc, bb: str, pre: str, data: StudyData, fs, towers: dict) -> dict:
    """The zero-shot head's class text embeddings for one embedding set, from the text tower of the weights
    it was made with (one tower per backbone and weights, whatever the preprocessing). Anything that
    cannot work (no text tower, a pooling outside the joint space, other weights, prompts that do not
    name the classes) is a StudyError, one line, before any fitting."""
    from featstore import zeroshot as Z

    where = f"{st.path or st.study}: heads.zeroshot: {bb}/{pre}"
    prompts = hc.fixed["prompts"]
    labels = []
    if st.target == "binary":
        labels = fs.column_values(st.label_column)
    key = (bb, data.weights_id.partition(";input=")[0])
    try:
        kc = Z.key_classes(prompts, data.class_names, st.target, st.positive, labels)
        if key not in towers:
            towers[key] = Z.text_tower(bb, data.weights_id, hc.options.get("weights_dir"),
                                       (hc.options.get("config_overrides") or {}).get(bb))
        ct = Z.class_texts(towers[key], prompts, kc)
    except Z.ZeroShotError as e:
        raise StudyError(f"{where}: {str(e).removeprefix('zero-shot head: ')}") from None
    except Exception as e:  # noqa: BLE001 - a model library failing to build or load: one line, not a traceback
        raise StudyError(f"{where}: the text tower could not be built ({type(e).__name__}: {str(e)[:300]})") from e
    if ct.embeddings.shape[1] != data.X.shape[1]:
        raise StudyError(f"{where}: the text embeddings are {ct.embeddings.shape[1]}-d, the stored image "
                         f"embeddings {data.X.shape[1]}-d: not one joint image-text space")
    return dict(ct.as_head_inputs(), n_classes=len(data.class_names))
