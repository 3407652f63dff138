"""Study configs (YAML or TOML in benchmarks/): read, validate up front, load the data they name.

Every error names the key and the allowed values, and comes before any fitting starts.
"""
from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from featstore.heads import HEADS
from featstore.split import PROTOCOLS, SELECTIONS, Meta, make_folds, make_meta

TARGETS = ("binary", "3class")
KEYS = {"study", "description", "db", "target", "positive", "label_column", "class_column", "classes", "sources",
        "backbones", "preprocess", "heads", "protocols", "selection", "oracle", "seed", "bootstrap", "timeout",
        "workers", "shared_images", "near_duplicates"}
NEAR_DUPLICATES = ("drop-from-train", "warn", "refuse", "ignore")


class StudyError(ValueError):
    """A study config or the data it names cannot run; raised before any work starts."""


@dataclass
class HeadConfig:
    name: str
    trials: int = 10
    fixed: dict = field(default_factory=dict)


@dataclass
class Study:
    study: str
    path: Path | None = None
    description: str = ""
    db: str | None = None
    target: str = "binary"
    positive: str = "covid"
    label_column: str = "label"
    class_column: str = "class"
    classes: list[str] = field(default_factory=lambda: ["normal", "pneumonia", "covid"])
    sources: list[str] | None = None
    backbones: list[str] = field(default_factory=list)
    preprocess: list[str] = field(default_factory=lambda: ["original"])
    heads: list[HeadConfig] = field(default_factory=list)
    protocols: dict[str, dict] = field(default_factory=dict)
    selection: str = "train-val"
    oracle: bool = False
    seed: int = 0
    bootstrap: int = 1000
    timeout: float | None = None
    workers: int = 1
    shared_images: str = "drop-from-train"
    near_duplicates: str = "drop-from-train"   # what to do with `featstore duplicates` pairs


def _fail(where, msg):
    raise StudyError(f"{where}: {msg}")


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.exists():
        raise StudyError(f"{path}: no such study config")
    text = path.read_text()
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error is a config error
        raise StudyError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from e
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    return parse_study(raw, path)


def parse_study(raw: dict, path: Path | None = None) -> Study:
    where = str(path or "study")
    unknown = set(raw) - KEYS
    if unknown:
        _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(KEYS))}")
    if not raw.get("study"):
        _fail(where, "'study' (a name) is required")
    st = Study(study=str(raw["study"]), path=path)
    for k in ("description", "db", "positive", "label_column", "class_column", "selection", "shared_images",
              "near_duplicates"):
        if k in raw:
            setattr(st, k, str(raw[k]))
    st.target = str(raw.get("target", "binary"))
    if st.target not in TARGETS:
        _fail(where, f"target '{st.target}' not one of {', '.join(TARGETS)}")
    if "classes" in raw:
        st.classes = [str(c) for c in raw["classes"]]
    if raw.get("sources") not in (None, "all"):
        st.sources = [str(s) for s in raw["sources"]]
    st.backbones = [str(b) for b in _list(raw.get("backbones"), "backbones", where)]
    if not st.backbones:
        _fail(where, "'backbones' needs at least one backbone (see `featstore backbones`)")
    st.preprocess = [str(p) for p in _list(raw.get("preprocess", ["original"]), "preprocess", where)]
    heads = raw.get("heads")
    if not heads:
        _fail(where, f"'heads' needs at least one of {', '.join(HEADS)}")
    if isinstance(heads, list):
        heads = {h: {} for h in heads}
    for name, hc in heads.items():
        if name not in HEADS:
            _fail(where, f"heads: unknown head '{name}'; choose from {', '.join(HEADS)}")
        hc = hc or {}
        bad = set(hc) - {"trials", "fixed"}
        if bad:
            _fail(where, f"heads.{name}: unknown key(s) {sorted(bad)}; allowed: trials, fixed")
        fixed = dict(hc.get("fixed") or {})
        allowed = set(inspect.signature(HEADS[name].cls.__init__).parameters) - {"self", "random_state"}
        if set(fixed) - allowed:
            _fail(where, f"heads.{name}.fixed: unknown hyperparameter(s) {sorted(set(fixed) - allowed)}; "
                         f"allowed: {', '.join(sorted(allowed))}")
        st.heads.append(HeadConfig(name, int(hc.get("trials", 10)), fixed))
    protos = raw.get("protocols")
    if not protos:
        _fail(where, f"'protocols' needs at least one of {', '.join(PROTOCOLS)}")
    if isinstance(protos, list):
        protos = {p: {} for p in protos}
    allowed = {"mixed": {"folds", "repeats"}, "loso": set(), "leave-pair-out": set(),
               "seen-unseen": {"train_sources", "unseen_sources", "test_fraction"}}
    for name, opts in protos.items():
        if name not in PROTOCOLS:
            _fail(where, f"protocols: unknown protocol '{name}'; choose from {', '.join(PROTOCOLS)}")
        opts = dict(opts or {})
        bad = set(opts) - allowed[name]
        if bad:
            _fail(where, f"protocols.{name}: unknown key(s) {sorted(bad)}; allowed: {sorted(allowed[name]) or 'none'}")
        if name == "seen-unseen" and not opts.get("train_sources"):
            _fail(where, "protocols.seen-unseen.train_sources: name the training sources")
        st.protocols[name] = opts
    if st.selection not in SELECTIONS[:2]:
        _fail(where, f"selection '{st.selection}' not one of {', '.join(SELECTIONS[:2])} "
                     "(the oracle is `oracle: true`, reported apart)")
    if st.shared_images != "drop-from-train":
        _fail(where, "shared_images: only 'drop-from-train' is implemented (images that also occur in a test "
                     "source are removed from training)")
    if st.near_duplicates not in NEAR_DUPLICATES:
        _fail(where, f"near_duplicates '{st.near_duplicates}' not one of {', '.join(NEAR_DUPLICATES)}")
    st.oracle = bool(raw.get("oracle", False))
    st.seed = int(raw.get("seed", 0))
    st.bootstrap = int(raw.get("bootstrap", 1000))
    st.timeout = float(raw["timeout"]) if raw.get("timeout") is not None else None
    st.workers = int(raw.get("workers", 1))
    return st


def _list(v, key, where):
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list):
        _fail(where, f"'{key}' must be a list")
    return v


# --- the data a study runs on --------------------------------------------------------------

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


def load_data(fs, st: Study, backbone: str, preprocess: str) -> StudyData:
    """Embeddings + metadata for one (backbone, preprocessing), filtered to the study's sources
    and target. `fs` is a featstore.api.Store."""
    try:
        wid, _ = fs._set(backbone, preprocess, None)
        X, meta = fs.arrays(backbone, preprocess)
    except ValueError as e:
        raise StudyError(f"{st.path or st.study}: {e} (run `featstore embed --backbone {backbone} "
                         f"--preprocess {preprocess}`)") from e
    have = sorted(set(fs.con.execute("SELECT DISTINCT source FROM images").fetchall()))
    have = [h for (h,) in have]
    if st.sources:
        unknown = sorted(set(st.sources) - set(have))
        if unknown:
            raise StudyError(f"{st.path or st.study}: sources: unknown source(s) {unknown}; the store has {have}")
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
    occ = dict(fs.con.execute("SELECT image_id, list(DISTINCT source) FROM occurrences GROUP BY 1").fetchall())
    links = np.zeros((0, 2), int)
    if st.near_duplicates != "ignore" and fs.con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'near_duplicates'").fetchall()[0][0]:
        at = {v: i for i, v in enumerate(iid)}
        pairs = fs.con.execute("SELECT image_a, image_b FROM near_duplicates").fetchall()
        links = np.array([(at[a], at[b]) for a, b in pairs if a in at and b in at], dtype=int).reshape(-1, 2)
    merge = st.near_duplicates == "drop-from-train"
    m = make_meta(src[idx], y[idx], meta["patient_id"].to_numpy()[idx], iid, [occ.get(i, []) for i in iid],
                  links if merge else ())
    counts = {}
    for s, k in zip(m.source, m.y):
        counts[(s, names[k])] = counts.get((s, names[k]), 0) + 1
    return StudyData(np.ascontiguousarray(X[idx]), m, iid, names, wid, n_excluded, counts, links)


def check_feasible(st: Study, data: StudyData, protocol: str) -> list:
    """Build the folds of one protocol and refuse the impossible before any work: every training
    set needs every class, and so does every model-selection split."""
    from featstore.split import selection_splits

    where = f"{st.path or st.study}: protocols.{protocol}"
    try:
        folds = make_folds(data.meta, protocol, positive=1, seed=st.seed, **st.protocols[protocol])
    except ValueError as e:
        raise StudyError(f"{where}: {e}") from e
    k = len(data.class_names)
    for f in folds:
        ytr = data.meta.y[f.train]
        if len(np.unique(ytr)) < k:
            raise StudyError(f"{where}: fold {f.name} trains on one class only ({len(f.train)} images from "
                             f"{', '.join(f.train_sources)}); pick sources with both classes")
        if len(f.train) < 20:
            raise StudyError(f"{where}: fold {f.name} has only {len(f.train)} training images")
        for name, te in f.tests.items():
            if len(te) == 0:
                raise StudyError(f"{where}: fold {f.name} has an empty {name} test set")
        if len(data.links) and st.near_duplicates in ("warn", "refuse"):
            tr = np.zeros(len(data.meta.y), bool)
            tr[f.train] = True
            te = np.zeros(len(data.meta.y), bool)
            te[np.concatenate(list(f.tests.values()))] = True
            leaks = int(sum((te[a] and tr[b]) or (te[b] and tr[a]) for a, b in data.links))
            if leaks:
                msg = (f"fold {f.name}: {leaks} test images have a near duplicate in training "
                       "(`featstore sql \"SELECT * FROM near_duplicates\"`)")
                if st.near_duplicates == "refuse":
                    raise StudyError(f"{where}: {msg}; set near_duplicates: drop-from-train to exclude them")
                f.notes.append("WARNING: " + msg)
        try:
            splits = selection_splits(data.meta, f.train, st.selection, st.seed)
        except ValueError as e:
            raise StudyError(f"{where}: fold {f.name}: {e}") from e
        yval = np.concatenate([data.meta.y[v] for _, v in splits])
        if len(np.unique(yval)) < k:
            raise StudyError(f"{where}: fold {f.name}: the '{st.selection}' validation data has one class only")
        for a, _ in splits:
            if len(np.unique(data.meta.y[a])) < k:
                raise StudyError(f"{where}: fold {f.name}: a '{st.selection}' fitting split has one class only; "
                                 "use selection: train-val")
    return folds
