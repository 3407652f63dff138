"""Study configs (YAML or TOML; the shipped ones in featstore/studies/): read and validated up front.

The config is checked by pydantic models, one per section, before any work: every problem names
the key (dotted path), the value given and what is allowed, all problems at once; unknown keys are
refused with a "did you mean". What needs the store (sources, columns, embeddings, feasible folds)
is checked by `featstore.sweep.data.load_data` / `featstore.sweep.plan.check_feasible`, still before
any fitting.
"""
import difflib
import inspect
import io
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, PrivateAttr, ValidationError,
                      ValidationInfo, create_model, field_serializer, field_validator, model_validator)
from pydantic_core import PydanticCustomError
from sklearn.utils._param_validation import InvalidParameterError, Options, validate_parameter_constraints

from featstore.heads import HEADS
from featstore.options import Name, Names, Section, distinct, one_or_list
from featstore.split import PROTOCOLS, SELECTIONS, honest_selections


TARGETS = ("binary", "3class")


NEAR_DUPLICATES = ("drop-from-train", "warn", "refuse", "ignore")


class StudyError(ValueError):
    """A study config or the data it names cannot run; raised before any work starts.
    `problems` lists (key, message) for config errors."""

    def __init__(self, msg: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(msg)
        self.problems = problems or []


# --- value types: featstore/options.py (Name, Names, Section), shared with the protocol registry --------


def _backbone_names(v):
    """A mapping backbone -> {pooling: one or a list} becomes `<entry>@<pooling>` names; one or a list of
    names passes as it is (`_canonical` then names each set as embed stores it)."""
    if not isinstance(v, dict):
        return one_or_list(v)
    out = []
    for name, opts in v.items():
        opts = {} if opts is None else opts
        if not isinstance(opts, dict) or set(opts) - {"pooling"}:
            raise PydanticCustomError("backbone_opts", "{name}: the one option is pooling (cls, mean or pooler, "
                                      "or a list of them)", {"name": name})
        pool = opts.get("pooling")
        out += [name] if pool is None else [f"{name}@{p}" for p in one_or_list(pool)]
    return out


def _canonical(v):
    from featstore.backbones import canonical_name

    out = []
    for name in v:
        if "@" in name:
            try:
                name = canonical_name(name)
            except ValueError as e:  # pooling not offered by the entry: the valid ones, one line
                raise PydanticCustomError("pooling", "{msg}", {"msg": str(e)})
        out.append(name)
    return distinct(out)


# embedding sets: names (`<entry>@<pooling>` too) or name -> {pooling: ...}; each as embed names its set
Backbones = Annotated[list[Name], BeforeValidator(_backbone_names), AfterValidator(_canonical)]


# --- protocols: each entry's options schema is in featstore/split.py (PROTOCOLS) ----------------

class NamedSections(Section):
    """name -> options, or a list of names (each with default options); `name:` alone (null) too."""

    @model_validator(mode="before")
    @classmethod
    def _names(cls, v):
        kind = cls.what
        if isinstance(v, str):
            raise PydanticCustomError("names_form", f"a single name; write a list of {kind}s ([{{v}}]) or a mapping "
                                      f"{kind} -> options", {"v": v})
        if isinstance(v, list):
            if not all(isinstance(x, str) for x in v):
                raise PydanticCustomError("names_form", f"a list must hold {kind} names ({', '.join(_keys(cls))}); "
                                          f"options go in a mapping ({kind}: options)")
            return dict.fromkeys(v, {})
        if isinstance(v, dict):
            return {k: ({} if o is None else o) for k, o in v.items()}
        return v

    @model_validator(mode="after")
    def _some(self):
        if not self.model_fields_set:
            raise PydanticCustomError("empty", f"needs at least one {self.what}: {', '.join(_keys(type(self)))}")
        return self


class ProtocolsBase(NamedSections):
    what: ClassVar[str] = "protocol"


def _field(name: str) -> str:
    return name.replace("-", "_")


# one optional section per registered protocol, its schema the entry's own (split.PROTOCOLS)
Protocols = create_model("Protocols", __base__=ProtocolsBase, __doc__="Protocol name -> its options, or a list of "
                         "protocol names.", **{_field(n): (p.options | None, Field(None, alias=n) if _field(n) != n
                                                           else None) for n, p in PROTOCOLS.items()})


# --- heads: options per head, fixed hyperparameters checked against each estimator ----------

class Fixed(Section):
    """Hyperparameters held fixed (the search space is in featstore/heads.py)."""
    what: ClassVar[str] = "hyperparameter"
    head: ClassVar[str] = ""


def _constraints(cls) -> dict:
    # the estimator's own sklearn constraints where it declares them, tightened by the bounds below
    return {**(getattr(cls, "_parameter_constraints", None) or {}), **_BOUNDS.get(cls.__name__, {})}


def _check_hyperparameter(cls, v, info: ValidationInfo):
    spec = HEADS[cls.head]
    cons = _constraints(spec.cls).get(info.field_name)
    if cons is None:
        return v
    if isinstance(v, bool) and "boolean" not in cons:  # sklearn's Interval takes True for 1
        raise PydanticCustomError("hyperparameter", "must be {allowed}", {"allowed": _allowed(cons, info.field_name)})
    try:
        validate_parameter_constraints({info.field_name: cons}, {info.field_name: v}, caller_name=spec.cls.__name__)
    except InvalidParameterError:
        raise PydanticCustomError("hyperparameter", "must be {allowed}", {"allowed": _allowed(cons, info.field_name)})
    return v


def _allowed(cons, name) -> str:
    try:
        validate_parameter_constraints({name: cons}, {name: object()}, caller_name="x")
    except InvalidParameterError as e:
        msg = str(e)
        return msg[msg.index(" must be ") + 9:msg.rindex(". Got")]
    return "any value"


class _TwoWidths(Options):
    """sklearn constraint: the GRL head's two hidden-layer widths, positive integers."""

    def __init__(self):
        super().__init__(list, set())

    def is_satisfied_by(self, v):
        return isinstance(v, list | tuple) and len(v) == 2 and all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in v)

    def __str__(self):
        return "two positive integers (layer widths)"


def _bounds():
    from numbers import Integral, Real

    from sklearn.utils._param_validation import Interval, StrOptions

    def ge(t, a):
        return Interval(t, a, None, closed="left")

    def gt(t, a):
        return Interval(t, a, None, closed="neither")

    unit_open, unit = Interval(Real, 0, 1, closed="right"), Interval(Real, 0, 1, closed="both")
    return {
        "LogisticHead": dict(C=[gt(Real, 0)], l1_ratio=[unit], class_weight=[StrOptions({"balanced"}), dict, None],
                             max_iter=[ge(Integral, 1)]),
        "LightGBMHead": dict(n_estimators=[ge(Integral, 1)], learning_rate=[gt(Real, 0)],
                             num_leaves=[Interval(Integral, 2, 131072, closed="both")],
                             min_child_samples=[ge(Integral, 0)], colsample_bytree=[unit_open],
                             subsample=[unit_open], reg_lambda=[ge(Real, 0)], n_jobs=[Integral, None],
                             early_stopping_rounds=[ge(Integral, 1), None],
                             val_fraction=[Interval(Real, 0, 1, closed="neither")],
                             max_bin=[Interval(Integral, 2, None, closed="left")]),
        "GRLHead": dict(hidden=[_TwoWidths()]),  # stricter than the head's own [tuple, list]
    }


_BOUNDS = _bounds()


def _no_default(schema):
    schema.pop("default", None)  # unset means the head's own default (or the search space), not null


class HeadOptions(Section):
    trials: int = Field(10, ge=1, description="Optuna trials per fold")

    @model_validator(mode="before")
    @classmethod
    def _empty_fixed(cls, v):
        return {**v, "fixed": {}} if isinstance(v, dict) and "fixed" in v and v["fixed"] is None else v


def _head_section(name, spec):
    params = [p for p in inspect.signature(spec.cls.__init__).parameters if p not in ("self", "random_state")]
    fixed = create_model(f"Fixed_{name}", __base__=Fixed, __doc__=f"{spec.cls.__name__} hyperparameters held fixed",
                         __validators__={"_check": field_validator(*params, mode="after")(
                             classmethod(_check_hyperparameter))},
                         **{p: (Any, Field(None, json_schema_extra=_no_default,
                                            description=_allowed(_constraints(spec.cls)[p], p)
                                            if p in _constraints(spec.cls) else None)) for p in params})
    fixed.head = name
    return create_model(f"Head_{name}", __base__=HeadOptions, __doc__=spec.description,
                        fixed=(fixed, Field(default_factory=fixed, description="hyperparameters held fixed")))


class HeadsBase(NamedSections):
    what: ClassVar[str] = "head"


class ZeroShot(Section):
    """The zero-shot head: class prompts through the embedding set's own text tower (CLIP family, SigLIP,
    MedSigLIP, BiomedCLIP, CheXzero); no training, no hyperparameters, one trial per fold."""
    prompts: dict[Name, Names] = Field(min_length=2, description=(
        "prompt group -> one or more texts (several: their embeddings are averaged). 3class: one group per "
        "class, named as the class. binary: the positive label, and 'not <positive>' and/or other label values, "
        "which together make up the negative class"))
    trials: int = Field(1, ge=1, le=1, description="nothing to search: one trial per fold")
    weights_dir: str | None = Field(None, description="where the text tower's weights are looked for (default: "
                                    "FEATSTORE_WEIGHTS_DIR); they must be the ones the embedding set was made with")
    config_overrides: dict[Name, dict] | None = Field(None, description="backbone -> the changed model configuration "
                                                      "its embedding set was made with (create_backbone("
                                                      "config_overrides=...), tests); checked against the set's "
                                                      "weights_id")

    @field_validator("prompts")
    @classmethod
    def _nonempty(cls, v):
        empty = [k for k, texts in v.items() if not texts]
        if empty:
            raise PydanticCustomError("prompts", "group(s) {empty} have no prompt", {"empty": ", ".join(empty)})
        return v


Heads = create_model("Heads", __base__=HeadsBase, __doc__="head name -> {trials, fixed}, or a list of head names",
                     **{n: ((ZeroShot if n == "zeroshot" else _head_section(n, s)) | None, None)
                        for n, s in HEADS.items()})


class HeadConfig(BaseModel):
    """One head of a study, as the sweep uses it."""
    name: str
    trials: int = 10
    fixed: dict = Field(default_factory=dict)
    options: dict = Field(default_factory=dict)  # zero-shot: weights_dir, config_overrides (not hyperparameters)


class Ensemble(Section):
    """An `ensemble` head (featstore/sweep/ensemble.py): the mean of its members' log-odds, fold by fold."""
    heads: Names = Field(min_length=1, description="member heads (of the study's heads)")
    backbones: Names | None = Field(None, description="combine these embedding sets (default: one ensemble per "
                                    "embedding set, of its heads)")
    preprocess: Names | None = Field(None, description="combine these preprocessings (default: one per "
                                     "preprocessing)")


# --- the study -----------------------------------------------------------------------------

class Study(Section):
    """A study config: what to fit on which data, how to split, how to select."""
    study: Name = Field(description="the study's name, used for the MLflow experiment and the results rows")
    description: str = ""
    db: str | None = Field(None, description="the store (default: --db / FEATSTORE_DB)")
    target: Literal[TARGETS] = Field("binary", description="binary: positive vs the rest of label_column; "
                                     "3class: classes of class_column")
    positive: Name = "covid"
    label_column: Name = "label"
    class_column: Name = "class"
    classes: Names = Field(["normal", "pneumonia", "covid"], min_length=2)
    sources: Names | None = Field(None, description="sources to use, or all (default)")
    backbones: Backbones = Field(min_length=1, description="embedding sets to use (see `featstore backbones`): "
                                 "names, `<entry>@<pooling>`, or a mapping name -> {pooling: one or a list}")
    preprocess: Names = Field(["original"], min_length=1)
    heads: Heads = Field(description="head -> {trials, fixed}, or a list of heads")
    protocols: Protocols = Field(description="protocol -> options, or a list of protocols")
    selection: Literal[honest_selections()] | list[Literal[honest_selections()]] = Field(
        "train-val", description="model selection that never sees the test source, or a list of such rules (each "
        "head is then a model per rule, compared under each); the oracle is `oracle: true`")
    oracle: bool = Field(False, description="add an upper bound selected on the test set, reported apart")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the CIs (0: no CIs)")
    selection_repeats: int = Field(1, ge=1, le=50, description="leave-pair-out: re-run model selection under this "
                                   "many seeds (seed, seed+1, ...); the report shows mean ± sd over them")
    timeout: float | None = Field(None, gt=0, description="seconds per Optuna study")
    workers: int = Field(1, ge=1, description="worker processes")
    shared_images: Literal["drop-from-train"] = Field(
        "drop-from-train", description="the only one implemented: images that also occur in a test source "
        "are removed from training")
    near_duplicates: Literal[NEAR_DUPLICATES] = Field("drop-from-train",
                                                      description="what to do with `featstore duplicates` pairs")
    ensembles: list[Ensemble] = Field([], description="`ensemble` heads: the mean log-odds of member heads and/or "
                                      "backbones, fold by fold, from their predictions (no retraining)")
    _path: Path | None = PrivateAttr(None)

    @property
    def selections(self) -> list[str]:
        """The honest rules, in the order written (`selection` is one or a list)."""
        return list(self.selection) if isinstance(self.selection, list) else [self.selection]

    @property
    def path(self) -> Path | None:
        return self._path

    @path.setter
    def path(self, p):
        self._path = p

    @field_validator("ensembles", mode="after")
    @classmethod
    def _ensemble_members(cls, v, info: ValidationInfo):
        """Members are the study's own heads and embedding sets; an ensemble needs two of them (binary)."""
        d = info.data
        heads = {h.name for h in d.get("heads") or []}
        for i, e in enumerate(v):
            if d.get("target") != "binary":
                raise PydanticCustomError("ensemble", "ensembles[{i}]: an ensemble averages log-odds: binary targets "
                                          "only", {"i": i})
            for what, names, have in (("head", e.heads, heads), ("backbone", e.backbones or [],
                                                                 set(d.get("backbones") or [])),
                                      ("preprocessing", e.preprocess or [], set(d.get("preprocess") or []))):
                unknown = [n for n in names if n not in have]
                if unknown:
                    raise PydanticCustomError("ensemble", "ensembles[{i}]: {what} {unknown} not in the study's "
                                              "{what}s ({have})", {"i": i, "what": what, "unknown": ", ".join(unknown),
                                                                  "have": ", ".join(sorted(have))})
            n = len(e.heads) * max(1, len(e.backbones or [])) * max(1, len(e.preprocess or []))
            if n < 2:
                raise PydanticCustomError("ensemble", "ensembles[{i}]: needs two members or more (heads x backbones "
                                          "x preprocessings)", {"i": i})
        return v

    @field_validator("sources", mode="before")
    @classmethod
    def _all(cls, v):
        return None if v == "all" else v

    @field_validator("description", mode="before")
    @classmethod
    def _blank(cls, v):
        return "" if v is None else v

    @field_validator("selection", mode="before")
    @classmethod
    def _no_oracle(cls, v):
        if isinstance(v, list):
            if not v:
                raise PydanticCustomError("selection", "give at least one selection rule")
            if len(set(map(str, v))) < len(v):
                raise PydanticCustomError("selection", "a selection rule is listed twice")
            for x in v:
                cls._no_oracle(x)
            return v
        if isinstance(v, str) and v in SELECTIONS and SELECTIONS[v].is_oracle:
            raise PydanticCustomError("oracle", "the oracle is not a selection rule: set `oracle: true` (it is "
                                      "reported apart)")
        return v

    # heads and protocols are validated as sections, then kept in the shape the sweep uses, in the
    # order written: a list of HeadConfig; protocol name -> the options given
    @field_validator("heads", mode="wrap")
    @classmethod
    def _head_list(cls, v, handler, info: ValidationInfo):
        m = handler(v)
        order = dict.fromkeys(v) if isinstance(v, dict | list) else []
        out = []
        for n in order:
            if n not in m.model_fields_set:
                continue
            h = getattr(m, n)
            if isinstance(h, ZeroShot):
                _check_prompts(h.prompts, info.data)
                out.append(HeadConfig(name=n, trials=1, fixed=dict(prompts=h.prompts),
                                      options=h.model_dump(exclude={"prompts", "trials"}, exclude_none=True)))
            else:
                out.append(HeadConfig(name=n, trials=h.trials, fixed=h.fixed.model_dump(exclude_unset=True)))
        return out

    @field_validator("protocols", mode="wrap")
    @classmethod
    def _protocol_dict(cls, v, handler):
        m = handler(v)
        fields = {(f.alias or n): n for n, f in Protocols.model_fields.items()}
        order = list(v) if isinstance(v, dict | list) else []
        return {p: getattr(m, fields[p]).model_dump(exclude_unset=True)
                for p in order if p in fields and fields[p] in m.model_fields_set}

    @field_serializer("heads")
    def _heads_as_written(self, heads):
        return {h.name: ({**h.fixed, **h.options} if h.name == "zeroshot" else {"trials": h.trials, "fixed": h.fixed})
                for h in heads}

    @field_serializer("protocols")
    def _protocols_as_written(self, protocols):
        return protocols


def _check_prompts(prompts: dict, data: dict) -> None:
    """What the config alone can tell: 3class prompts name each class; binary ones the positive (the
    negative groups are checked against the store's labels before any work, featstore.sweep.plan.plan)."""
    from featstore.zeroshot import ZeroShotError, key_classes

    if "target" not in data:  # target itself invalid: reported on its own
        return
    try:
        if data["target"] == "binary":
            if "positive" in data:
                key_classes(prompts, [f"not {data['positive']}", data["positive"]], "binary", data["positive"],
                            [k for k in prompts if k != data["positive"]])
        elif "classes" in data:
            key_classes(prompts, list(data["classes"]), data["target"], "", [])
    except ZeroShotError as e:
        raise PydanticCustomError("prompts", "zeroshot.prompts: {msg}", {"msg": str(e).removeprefix("zero-shot prompts")
                                                                          .lstrip(": ")})


def study_schema() -> dict:
    """The JSON schema of a study config."""
    return Study.model_json_schema()


# --- reading -------------------------------------------------------------------------------

class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (PyYAML silently keeps the last)."""


def _no_duplicate_keys(loader, node, deep=False):
    seen = {}
    for k, _ in node.value:
        if k.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(k, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", k.start_mark)
            seen[key] = k.start_mark.line
        except TypeError:  # unhashable key: the mapping constructor says so
            pass
    return loader.construct_mapping(node, deep)


_YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def packaged_studies() -> dict[str, Path]:
    """The study configs that ship with featstore (package data), by file name."""
    d = resources.files("featstore") / "studies"  # a Path: featstore installs as files, never zipped
    return {p.name: p for p in sorted(d.iterdir()) if p.suffix in (".yaml", ".toml")}


def load_study(path: str | Path) -> Study:
    """A config file; a bare name that is no file here, e.g. `cxr_shortcut` or `cxr_shortcut.yaml`,
    names a shipped config (`packaged_studies`), so an installed wheel runs them."""
    path = Path(path)
    shipped = packaged_studies()
    if not path.exists() and path.parent == Path("."):
        path = shipped.get(path.name) or shipped.get(path.name + ".yaml") or path
    if not path.is_file():
        from featstore.suggest import did_you_mean

        raise StudyError(f"{path}: no such study config" + (" (a folder)" if path.is_dir() else "")
                         + did_you_mean(path.stem, [p.stem for p in shipped.values()])
                         + f" (shipped: {', '.join(p.stem for p in shipped.values())})")
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        if kind == "YAML":
            text = io.StringIO(text)
            text.name = str(path)  # YAML errors then name the file
        raw = tomllib.loads(text) if kind == "TOML" else yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (safe)
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: cannot read the study config: {e}") from e
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise StudyError(f"{path}: not valid {kind}: {e}") from e
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    return parse_study(raw, path)


def parse_study(raw: dict, path: Path | None = None) -> Study:
    """Validate a config mapping; StudyError lists every problem (key, value, what is allowed)."""
    where = str(path or "study")
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        st = Study.model_validate(raw)
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
        if len(problems) == 1:
            msg = f"{where}: {problems[0][0]}: {problems[0][1]}"
        else:
            msg = f"{where}: {len(problems)} problems in the study config:\n" + "\n".join(
                f"  {k}: {m}" for k, m in problems)
        raise StudyError(msg, problems) from None
    st.path = path
    return st


# --- messages ------------------------------------------------------------------------------

def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _show(v) -> str:
    s = json.dumps(v, default=str, ensure_ascii=False)
    return s if len(s) <= 80 else s[:77] + "..."


def _model_in(tp):
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for a in get_args(tp):
        if (m := _model_in(a)) is not None:
            return m
    return None


def _model_at(loc):
    m = Study
    for part in loc:
        if isinstance(part, int):
            continue
        f = next((f for n, f in m.model_fields.items() if part in (n, f.alias)), None)
        if f is None or (m := _model_in(f.annotation)) is None:
            return None
    return m


def _keys(m) -> list[str]:
    return [f.alias or n for n, f in m.model_fields.items()]


def _everywhere(m=None, path="") -> dict[str, list[str]]:
    """key -> the sections that have it, for 'did you mean' across sections."""
    m, out = m or Study, {}
    for k, f in zip(_keys(m), m.model_fields.values()):
        out.setdefault(k, []).append(path or "the top level")
        if (sub := _model_in(f.annotation)) is not None:
            sub_path = ".".join(filter(None, [path, "<head>" if m.what == "head" else k]))
            for kk, ps in _everywhere(sub, sub_path).items():
                out.setdefault(kk, []).extend(p for p in ps if p not in out.get(kk, []))
    return out


def _unknown(loc, key) -> str:
    m = _model_at(loc[:-1])
    allowed = _keys(m) if m is not None else []
    what = m.what if m is not None else "key"
    msg = f"unknown {what} {_show(key)}"
    close = difflib.get_close_matches(str(key), allowed, n=2)
    if close:
        msg += f" (did you mean {' or '.join(close)}?)"
    elif what == "key":  # a key of another section, or a typo of one
        elsewhere = _everywhere()
        near = difflib.get_close_matches(str(key), list(elsewhere), n=1)
        if near:
            places = " or ".join(elsewhere[near[0]])
            msg += (f" ({near[0]} belongs under {places})" if near[0] == key else
                    f" (did you mean {near[0]}? it belongs under {places})")
    return msg + (f"; allowed: {', '.join(allowed)}" if allowed else "")


def _problem(err) -> tuple[str, str]:
    loc = err["loc"]
    key = _dotted(loc)
    t = err["type"]
    if t == "extra_forbidden":
        return key, _unknown(loc, loc[-1])
    if t == "invalid_key":  # YAML `1:` or `null:` as a key
        return _dotted(loc[:-1] + (str(loc[-1]),)), f"{_show(loc[-1])} is not a key name; keys are text"
    if t == "missing":
        m = _model_at(loc[:-1])
        f = next((f for n, f in m.model_fields.items() if loc[-1] in (n, f.alias)), None) if m else None
        return key, "required" + (f": {f.description}" if f is not None and f.description else "")
    v = err.get("input")
    msg = err["msg"]
    if t in ("model_type", "dict_type"):
        msg = "must be a mapping of keys"
    for old, new in (("Input should be", "must be"), ("List should have", "must have"), (" after validation", "")):
        msg = msg.replace(old, new)
    if t in ("name_bool", "names_form", "oracle", "empty", "overlap", "duplicate", "pooling", "prompts",
             "backbone_opts"):
        return key, f"{_show(v)}: {msg}" if t in ("name_bool", "names_form") else msg
    hint = ""
    if isinstance(v, str):
        try:
            float(v)
            hint = " (this is text: YAML reads 1e-3 as text, write 1.0e-3; or drop the quotes)"
        except ValueError:
            pass
    return key, f"{_show(v)} is not allowed; {msg}{hint}"


if __name__ == "__main__":  # python -m featstore.sweep.config > study.schema.json
    print(json.dumps(study_schema(), indent=1))
