"""Frozen foundation-model backbones: Hugging Face transformers, timm and open_clip.

One builder per family (build_hf, build_timm, build_open_clip), called by backbones.create_backbone.
Named entries carry a full-size configuration, so `--weights random-init` needs no network; generic
names (`hf:<repo>`, `timm:<name>`, `open_clip:<arch>`) take theirs from the library or the hub.

Pooling is part of the identity: `<entry>@<pooling>` (or `--pooling`, backbones.canonical_name) is its
own backbone name (its own embedding set) and every weights_id records `;pool=<pooling>`.

Weights (`featstore backbones --files` lists them per entry): `--weights PATH` (a file or a folder, every
family), else in `--weights-dir` a `<org>--<name>/` snapshot, a `<name>/` git clone or a hub cache, else
the Hugging Face hub cache (HF_HUB_CACHE / HF_HOME, read offline too), else a download unless offline.
An entry loads only weights that are what it says: config.json's model_type is the entry's, every tensor
of the model is loaded and none is left over beyond TOWER_EXTRAS (a whole image-text model's text side)
or a timm classifier; a named entry's snapshot preprocessor_config.json must be its pipeline. Anything
else is one WeightsError line naming the file. Identity = state_identity: a hash of the tensors (name,
dtype, shape, bytes), whatever the sharding or format; where they came from (folder, revision) is
recorded beside it, in embed_runs.weights_source.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from featstore import weights as W
from featstore.families import FAMILIES, GENERIC_POOLING, POOLINGS  # noqa: F401 - plain names, no torch
from featstore.registry import Registry

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# what a checkpoint may hold beyond the image tower an entry loads, and nothing else: the text tower and
# the joint projections / temperature of a whole CLIP- or SigLIP-style model (the zero-shot head uses them)
TOWER_EXTRAS = ("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")
log = logging.getLogger("featstore.foundation")


class WeightsError(ValueError):
    """Weights that are not what the entry says, or not readable: one line naming the file, the entry and
    what was found (the CLI exits 2; nothing is stored)."""


def hub_offline() -> bool:
    return W.offline() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "no")


# --- identity: the tensors, whatever the files ------------------------------------------------------

def check_not_lfs_pointer(path: Path, what: str) -> None:
    """A clone made without git-lfs holds ~130-byte text pointers under the weight files' names."""
    try:
        if path.stat().st_size < 1024 and path.read_bytes().startswith(LFS_POINTER):
            raise WeightsError(f"{path}: this is a git-lfs pointer, not the weights of {what}: run `git lfs pull` "
                               f"in {path.parent} (the clone was made without git-lfs)")
    except OSError as e:
        raise WeightsError(f"{path}: not readable as weights of {what} ({type(e).__name__}: {e})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of one weight file (safetensors, or a torch.save state dict, possibly under
    'state_dict', keys possibly prefixed 'module.'); anything else is a WeightsError."""
    check_not_lfs_pointer(path, what)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            import warnings

            with warnings.catch_warnings():  # torch's notes on odd pickles: the error below says it in one line
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, a pickled object: one line
        raise WeightsError(f"{path}: not a readable weight file for {what} ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors, for {what}")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{path}: holds no tensors, so no weights of {what}")
    return sd


def state_identity(state: dict[str, torch.Tensor]) -> str:
    """'tensors:' + sha256 over every tensor's name, dtype, shape and bytes, in name order: the same for
    the same weights however they are sharded or saved (safetensors, .bin, a 'state_dict' wrapper)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous()
        h.update(f"{k}\t{str(t.dtype).removeprefix('torch.')}\t{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "tensors:" + h.hexdigest()


def tensors_identity(files: list[Path], what: str = "") -> str:
    """state_identity of the union of `files` (the shards of one checkpoint). Reading every file also
    checks it (truncated, a git-lfs pointer, not a checkpoint): a WeightsError before anything is built."""
    state, seen = {}, {}
    for f in sorted(files):
        for k, t in read_state(f, what or f.name).items():
            if k in seen:
                raise WeightsError(f"{f}: tensor {k} is also in {seen[k].name}: two checkpoints in one folder?")
            seen[k], state[k] = f, t
    return state_identity(state)


def files_identity(files: list[Path]) -> str:
    """sha256 of one file; several (sharded checkpoints): sha256 over 'name sha256' lines, sorted. The
    identity embedding sets made before tensors_identity record."""
    files = sorted(files, key=lambda p: p.name)
    if len(files) == 1:
        return W.weights_identity(files[0])
    h = hashlib.sha256("".join(f"{p.name} {W.sha256_file(p)}\n" for p in files).encode())
    return "sha256:" + h.hexdigest()


def identity_of(files: list[Path], like: str) -> str:
    """The identity of `files` in the form `like` has (an older set's file sha256, else the tensors')."""
    return files_identity(files) if like.startswith("sha256:") else tensors_identity(files)


# --- where the weights are -------------------------------------------------------------------------

@dataclass(frozen=True)
class Found:
    """Where an entry's weights were found: the folder (HF) or file (timm, open_clip), the weight files,
    how (--weights, weights-dir, git clone, hub cache, download) and the revision when known."""
    path: Path
    files: tuple[Path, ...]
    via: str
    revision: str | None = None

    def record(self) -> dict:
        return dict(path=str(self.path), files=[f.name for f in self.files], via=self.via, revision=self.revision)


def weight_files(folder: Path) -> list[Path]:
    for g in _WEIGHT_GLOBS:  # safetensors first: a snapshot may hold both formats of the same weights
        found = sorted(p for p in folder.glob(g) if p.is_file() and "training_args" not in p.name)
        if found:
            return found
    return []


def hub_caches(wdir: Path | None) -> list[Path]:
    """Hugging Face hub caches to read (huggingface_hub's models--<org>--<name>/snapshots/<rev>/ layout):
    --weights-dir itself or its hub/ (a copied cache or HF_HOME), then HF_HUB_CACHE, else $HF_HOME/hub
    (read now, not when huggingface_hub was imported)."""
    out = [wdir, wdir / "hub"] if wdir is not None else []
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        out.append(Path(env).expanduser())
    else:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        out.append(Path(home).expanduser() / "hub")
    return out


def git_revision(folder: Path) -> str | None:
    """The commit a `git clone` folder is at (its .git/HEAD), or None."""
    git = folder / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines() if (git / "packed-refs").is_file() else []:
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        pass
    return None


def candidate_folders(repo: str, wdir: Path | None, probe: tuple[str, ...]) -> list[tuple[Path, str, str | None]]:
    """(folder, how found, revision) where `repo`'s snapshot may be, in order: <wdir>/<org>--<name>/,
    a `git clone` <wdir>/<name>/, <wdir>/<org>/<name>/, then the hub caches (a snapshot holding one of
    `probe`). Never <wdir> itself: another model's files there would be taken for this one."""
    out = []
    if wdir is not None:
        for c, via in ((wdir / repo.replace("/", "--"), "weights-dir"), (wdir / repo.rpartition("/")[2], "git clone"),
                       (wdir / repo, "weights-dir")):
            out.append((c, via, git_revision(c)))
    from huggingface_hub import try_to_load_from_cache

    for cache in hub_caches(wdir):
        if not (cache / f"models--{repo.replace('/', '--')}").is_dir():
            continue
        for f in probe:
            p = try_to_load_from_cache(repo, f, cache_dir=str(cache))
            if isinstance(p, str):
                out.append((Path(p).parent, f"hub cache {cache}", Path(p).parent.name))
                break
    return out


def _missing(what: str, files: str, repo: str, looked: list[str], wdir: Path | None, why: str) -> W.WeightsMissingError:
    flat, name = repo.replace("/", "--"), repo.rpartition("/")[2]
    where = (f"{wdir}/{flat}/ (or a git clone {wdir}/{name}/)" if wdir else
             f"a folder given by --weights-dir / FEATSTORE_WEIGHTS_DIR, as <dir>/{flat}/ (or a git clone <dir>/{name}/)")
    return W.WeightsMissingError(
        f"weights for {what} not found ({why}; looked in: {', '.join(looked) or 'no --weights-dir'}): download "
        f"{files} from https://huggingface.co/{repo} (`hf download {repo}` fills the hub cache, which is read "
        f"offline too) and put them in {where}")


def find_folder(repo: str, wdir: Path | None, explicit: str | None, files: tuple[str, ...], what: str) -> Found:
    """A Hugging Face snapshot of `repo`: --weights PATH (a folder, or a weight file in one), else
    candidate_folders, else the hub (snapshot_download) unless offline."""
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_file():  # a weight file: its folder holds config.json
            return Found(p.parent, (p,), "--weights", git_revision(p.parent))
        if p.is_dir():
            wf = weight_files(p)
            if not wf:
                raise W.WeightsMissingError(f"--weights {explicit}: no weight files ({', '.join(_WEIGHT_GLOBS)}) "
                                            f"there for {what}")
            return Found(p, tuple(wf), "--weights", git_revision(p))
        raise W.WeightsMissingError(f"--weights {explicit}: no such file or folder (for {what})")
    looked = []
    for c, via, rev in candidate_folders(repo, wdir, ("config.json",)):
        looked.append(str(c))
        if c.is_dir() and (weight_files(c) or (c / "config.json").is_file()):
            wf = weight_files(c)
            if not wf:
                raise W.WeightsMissingError(f"{c}: a snapshot of {repo} without weight files "
                                            f"({', '.join(_WEIGHT_GLOBS)}) for {what}: download them too "
                                            f"(`hf download {repo}`)")
            return Found(c, tuple(wf), via, rev)
    desc = " and ".join(files)
    if hub_offline():
        raise _missing(what, desc, repo, looked, wdir, "offline: FEATSTORE_OFFLINE / HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo, allow_patterns=list(files)))
    except Exception as e:  # gated repo, no network, unknown repo: one message naming the files and the place
        raise _missing(what, desc, repo, looked, wdir, f"{type(e).__name__}: {str(e)[:200]}") from e
    return Found(path, tuple(weight_files(path)), "download", path.name)


def local_folder(repo: str, wdir: Path | None, explicit: str | None, files: tuple[str, ...], what: str) -> Path:
    return find_folder(repo, wdir, explicit, files, what).path


def find_file(spec, explicit: str | None, wdir: Path | None, repo: str | None, names: list[str]) -> Found:
    """One weight file (timm, open_clip): --weights PATH (the file, or a folder holding one of `names`),
    else <wdir>/<names[0]> itself (a name that says which model: `<arch>.safetensors`, CheXzero's exact
    upstream name), else one of `names` in candidate_folders(repo), else the hub unless offline."""
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_dir():
            hits = [p / n for n in names if (p / n).is_file()]
            if not hits:
                raise W.WeightsMissingError(f"--weights {explicit}: a folder without {' or '.join(names)} (for {spec.name})")
            return Found(hits[0], (hits[0],), "--weights", git_revision(p))
        if not p.is_file():
            raise W.WeightsMissingError(f"weights file {p} for {spec.name} not found")
        return Found(p, (p,), "--weights", git_revision(p.parent))
    looked = []
    dirs = [(wdir, "weights-dir", None, names[:1])] if wdir is not None else []
    dirs += [(*c, names) for c in candidate_folders(repo, wdir, tuple(names))] if repo else []
    for d, via, rev, these in dirs:
        for n in these:
            looked.append(str(d / n))
            if (d / n).is_file():
                return Found(d / n, (d / n,), via, rev)
    if not repo:
        raise W.WeightsMissingError(f"weights for {spec.name} not found (looked in: {', '.join(looked) or 'no --weights-dir'});"
                                    f" no hub repository is registered: give --weights PATH to {names[0]}, or put "
                                    f"it, under exactly that name, in --weights-dir")
    if hub_offline():
        raise _missing(spec.name, " or ".join(names), repo, looked, wdir, "offline: FEATSTORE_OFFLINE / HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import hf_hub_download

        p = Path(hf_hub_download(repo, names[-1]))
    except Exception as e:
        raise _missing(spec.name, " or ".join(names), repo, looked, wdir, f"{type(e).__name__}: {str(e)[:200]}") from e
    return Found(p, (p,), "download", p.parent.name)


@contextlib.contextmanager
def library_chatter(lines: list[str]):
    """What transformers / timm / open_clip / huggingface_hub print while loading (LOAD REPORT tables,
    tokenizer and deprecation warnings, progress bars): into `lines` and the featstore.foundation log
    (DEBUG), not the terminal. The builder says one summary line instead."""
    import io
    import warnings

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    names = ("transformers", "timm", "open_clip", "huggingface_hub", "safetensors")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    for n in names:  # transformers' own handler holds sys.stderr itself: redirecting it would not reach it
        lg = logging.getLogger(n)
        lg.handlers, lg.propagate = [handler], False
    caught = []
    try:
        with warnings.catch_warnings(record=True) as rec, contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                caught.extend(rec)
    finally:
        for n, (hs, prop) in saved.items():
            logging.getLogger(n).handlers, logging.getLogger(n).propagate = hs, prop
        for w in caught:
            buf.write(f"{w.category.__name__}: {w.message}\n")
        text = buf.getvalue()
        lines.extend(line for line in text.splitlines() if line.strip())
        if text.strip():
            log.debug("library messages while loading weights:\n%s", text)


def _keys_problem(missing, unexpected, mismatched=()) -> str:
    out = []
    if missing:
        out.append(f"{len(missing)} of the model's tensors missing (e.g. {', '.join(sorted(missing)[:3])})")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected (e.g. {', '.join(sorted(unexpected)[:3])})")
    if mismatched:
        out.append(f"{len(mismatched)} of another shape (e.g. {', '.join(sorted(str(m[0]) for m in mismatched)[:3])})")
    return "; ".join(out)


def strict_load(module: torch.nn.Module, state: dict, allowed_extra: tuple[str, ...], path, what: str) -> int:
    """Load `state` into `module`: every tensor of the module, none unexpected beyond the `allowed_extra`
    prefixes, shapes equal; else one line naming the file, the entry and what was found. -> tensors loaded."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(allowed_extra)]
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise WeightsError(f"{path}: not the weights of {what}: {_keys_problem(missing, unexpected, mismatched)}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    return len(own)


# --- pooling -----------------------------------------------------------------------------------

def pool_tokens(hidden: torch.Tensor, pooler: torch.Tensor | None, pooling: str, n_prefix: int) -> torch.Tensor:
    """hidden: (N, T, D) last hidden state with n_prefix CLS/register tokens first."""
    if pooling == "cls":
        if n_prefix < 1:
            raise ValueError("cls pooling: this model has no CLS token (use mean or pooler)")
        return hidden[:, 0]
    if pooling == "mean":
        return hidden[:, n_prefix:].mean(dim=1)
    if pooling == "pooler":
        if pooler is None:
            raise ValueError("pooler pooling: this model has no pooler output (use cls or mean)")
        return pooler
    raise ValueError(f"unknown pooling '{pooling}' (known: {', '.join(POOLINGS)})")


# --- Hugging Face transformers -----------------------------------------------------------------

class _HFVision(torch.nn.Module):
    def __init__(self, model, pooling: str, n_prefix: int):
        super().__init__()
        self.model, self.pooling, self.n_prefix = model, pooling, n_prefix

    def forward(self, x):
        out = self.model(pixel_values=x)
        return pool_tokens(out.last_hidden_state, getattr(out, "pooler_output", None), self.pooling, self.n_prefix)


def _hf_config(opts: dict, overrides: dict | None, folder: Path | None, repo: str):
    """-> (the image tower's configuration, whether it was taken out of a whole image-text model's)."""
    import transformers

    if folder is not None and (folder / "config.json").is_file():
        cfg = transformers.AutoConfig.from_pretrained(folder)
    elif "config_class" in opts:
        cfg = getattr(transformers, opts["config_class"])(**opts.get("config", {}))
    else:  # generic hf:<repo>: its config.json from the hub or the local cache
        cfg = transformers.AutoConfig.from_pretrained(repo, local_files_only=hub_offline())
    tower = hasattr(cfg, "vision_config") and opts.get("vision_tower", True)
    if tower:
        cfg = cfg.vision_config  # CLIP/SigLIP-style: the image tower only
    for k, v in (overrides or {}).items():
        if k != "text_config":  # the text tower's (zero-shot head), not the image tower's
            setattr(cfg, k, v)
    return cfg, tower


def hf_weight_files(folder: Path) -> list[Path]:
    """The files transformers loads from a snapshot (an index's shards, else model.safetensors, else
    pytorch_model.bin), so that the identity is of what is loaded; else any weight file found."""
    import json

    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise WeightsError(f"{folder / index}: not a shard index ({type(e).__name__}: {e})") from None
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    return weight_files(folder)


def _expected_model_types(opts: dict) -> set[str] | None:
    """The config.json model_type a named entry loads (its image tower's, or the whole model's that holds
    it: siglip for siglip_vision_model); None for a generic hf:<repo>, which names its repository only."""
    if "config_class" not in opts:
        return None
    import transformers

    mt = getattr(transformers, opts["config_class"]).model_type
    return {mt, mt.removesuffix("_vision_model")}


def check_hf_config(folder: Path, opts: dict, what: str) -> str:
    """config.json is there and names the architecture the entry is: -> its model_type."""
    import json

    f, repo = folder / "config.json", opts.get("repo", "")
    if not f.is_file():
        raise WeightsError(f"{folder}: no config.json beside the weights of {what}: a Hugging Face snapshot has one "
                           f"(`hf download {repo} config.json`)")
    check_not_lfs_pointer(f, what)
    try:
        raw = json.loads(f.read_text())
        mt = raw.get("model_type")
    except (ValueError, AttributeError, OSError) as e:
        raise WeightsError(f"{f}: not a model configuration for {what} ({type(e).__name__}: {_first_line(e)})") from None
    want = _expected_model_types(opts)
    if want and mt not in want:
        raise WeightsError(f"{f}: model_type '{mt}' (architectures {raw.get('architectures')}) is not {what}'s "
                           f"({', '.join(sorted(want))}): these are another model's weights")
    return str(mt)


def check_processor(spec, folder: Path) -> None:
    """A named entry feeds the model its own pipeline; a snapshot whose preprocessor_config.json says
    otherwise (a fine-tune at another size, other mean/std) is refused, naming the difference, rather
    than fed the entry's pipeline silently. No preprocessor_config.json: the entry's pipeline."""
    f = folder / "preprocessor_config.json"
    if "config_class" not in spec.options or not f.is_file():
        return
    from transformers import AutoImageProcessor

    try:
        size, pipe = pipeline_from_hf_processor(AutoImageProcessor.from_pretrained(folder))
    except Exception as e:  # noqa: BLE001 - unreadable, or a processor featstore does not reproduce
        raise WeightsError(f"{f}: not the preprocessing of {spec.name} ({type(e).__name__}: {_first_line(e)})") from None
    diffs = [] if size == spec.input_size else [f"input size {size} (entry: {spec.input_size})"]
    for field in pipe._fields:
        a, b = getattr(pipe, field), getattr(spec.pipeline, field)
        same = a == b
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            same = all(abs(float(x) - float(y)) <= 1e-6 for x, y in zip(a, b, strict=True))
        if not same:
            diffs.append(f"{field} {a} (entry: {b})")
    if diffs:
        raise WeightsError(f"{f}: its preprocessing differs from {spec.name}'s: {'; '.join(diffs)}: these weights "
                           f"were trained on other inputs; embed them as hf:{spec.options['repo']} (which follows "
                           f"the snapshot's processor) or use the entry's own snapshot")


def build_hf(spec, weights: str | None, wdir: Path | None, pooling: str, overrides: dict | None):
    """-> (module, weights identity, feature dim, where the weights came from or None)."""
    import transformers

    opts, repo = spec.options, spec.options["repo"]
    found, chatter = None, []
    if weights != W.RANDOM_INIT:
        found = find_folder(repo, wdir, weights, ("config.json", "*.safetensors", "preprocessor_config.json"),
                            spec.name)
        mt = check_hf_config(found.path, opts, spec.name)
        files = hf_weight_files(found.path)
        found = dataclasses.replace(found, files=tuple(files))
        wid = tensors_identity(files, spec.name)  # reads (so checks) every file before anything is built
        with library_chatter(chatter):
            check_processor(spec, found.path)
    try:
        cfg, tower = _hf_config(opts, overrides, found.path if found else None, repo)
    except Exception as e:  # noqa: BLE001 - a config.json transformers refuses: one line naming it
        if found is None:
            raise
        raise WeightsError(f"{found.path / 'config.json'}: not a valid configuration of {spec.name} "
                           f"({type(e).__name__}: {_first_line(e)})") from None
    if found is None:
        model, wid, n = transformers.AutoModel.from_config(cfg), None, None
    else:
        cls = getattr(transformers, opts["vision_tower_class"]) if opts.get("vision_tower_class") else transformers.AutoModel
        with library_chatter(chatter):
            try:
                model, info = cls.from_pretrained(found.path, config=cfg, output_loading_info=True,
                                                  ignore_mismatched_sizes=True)
            except Exception as e:  # noqa: BLE001 - transformers' own refusal: one line, not its traceback
                raise WeightsError(f"{found.path}: not loadable as {spec.name} ({type(e).__name__}: "
                                   f"{_first_line(e)})") from None
        extra = [k for k in info["unexpected_keys"] if tower and k.startswith(TOWER_EXTRAS)]
        unexpected = [k for k in info["unexpected_keys"] if k not in extra]
        if info["missing_keys"] or unexpected or info["mismatched_keys"]:
            raise WeightsError(f"{found.path}: not the weights of {spec.name} ({mt}): "
                               f"{_keys_problem(info['missing_keys'], unexpected, info['mismatched_keys'])}")
        n = (len(model.state_dict()), len(extra))
    model.eval()
    n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0) if opts.get("cls_token", True) else 0
    return _HFVision(model, pooling, n_prefix), wid, int(cfg.hidden_size), _source(spec, found, n, chatter)


def _source(spec, found: Found | None, n: tuple[int, int] | None, chatter: list[str]) -> dict | None:
    """What embed_runs.weights_source records (where the weights came from) and the one line said."""
    if found is None:
        return None
    rev = f", revision {found.revision[:12]}" if found.revision else ""
    skipped = f"; {n[1]} text-tower tensors not used" if n and n[1] else ""
    said = (f"{spec.name}: {n[0] if n else '?'} tensors from {found.path} ({found.via}{rev}){skipped}"
            + (f"; {len(chatter)} lines of library messages recorded (embed_runs.weights_source)" if chatter else ""))
    return dict(found.record(), tensors=n[0] if n else None, said=said, messages=chatter[:200])


# --- timm ---------------------------------------------------------------------------------------

class _TimmPooled(torch.nn.Module):
    def __init__(self, model, pooling: str):
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, x):
        if self.pooling == "pooler":  # the model's own head pooling, before the classifier
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        f = self.model.forward_features(x)
        if f.ndim == 4:  # CNN map (N, C, H, W): no tokens, only the spatial mean
            if self.pooling != "mean":
                raise ValueError(f"{self.pooling} pooling: a convolutional feature map has no tokens (use mean or pooler)")
            return f.mean(dim=(2, 3))
        return pool_tokens(f, None, self.pooling, getattr(self.model, "num_prefix_tokens", 0))


def build_timm(spec, weights: str | None, wdir: Path | None, pooling: str, overrides: dict | None):
    import timm

    arch = spec.options["arch"]
    kw = dict(spec.options.get("kwargs", {}), **(overrides or {}))
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
    wid = found = n = None
    if weights != W.RANDOM_INIT:
        found = _timm_file(spec, model, weights, wdir)
        state = read_state(found.path, spec.name)
        wid = state_identity(state)
        # built without a classifier (num_classes=0): the checkpoint's classifier is the one thing let through
        head = model.pretrained_cfg.get("classifier") or ()
        head = tuple(f"{c}." for c in ((head,) if isinstance(head, str) else head))
        n = (strict_load(model, state, head, found.path, f"{spec.name} (timm {arch})"), 0)
    model.eval()
    dim = model.num_features if pooling != "pooler" else getattr(model, "head_hidden_size", model.num_features)
    return _TimmPooled(model, pooling), wid, int(dim), _source(spec, found, n, [])


def _timm_file(spec, model, weights: str | None, wdir: Path | None) -> Found:
    hub = model.pretrained_cfg.get("hf_hub_id") or f"timm/{spec.options['arch']}"
    names = [f"{spec.options['arch']}.safetensors", "model.safetensors", "pytorch_model.bin"]
    return find_file(spec, weights, wdir, hub, names)


# --- open_clip ----------------------------------------------------------------------------------

class _ClipImage(torch.nn.Module):
    """The image tower only: text towers (PubMedBERT for BiomedCLIP) are not needed for features."""

    def __init__(self, visual, normalize: bool):
        super().__init__()
        self.visual, self.normalize = visual, normalize

    def forward(self, x):
        f = self.visual(x)
        return torch.nn.functional.normalize(f, dim=-1) if self.normalize else f


def open_clip_config(spec, folder: Path | None, overrides: dict | None) -> dict:
    import json

    import open_clip

    if "model_cfg" in spec.options:
        cfg = json.loads(json.dumps(spec.options["model_cfg"]))
    elif folder is not None and (folder / "open_clip_config.json").is_file():
        cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    else:
        cfg = open_clip.get_model_config(spec.options["arch"])
        if cfg is None:
            raise ValueError(f"open_clip has no model config '{spec.options['arch']}' "
                             f"(known: {', '.join(open_clip.list_models()[:20])}, ...)")
    for k, v in (overrides or {}).items():
        if k == "embed_dim":
            cfg["embed_dim"] = v
        elif k == "text_cfg":  # the text tower's (zero-shot head)
            cfg["text_cfg"] = {**cfg.get("text_cfg", {}), **v}
        else:
            cfg["vision_cfg"][k] = v
    return cfg


def build_open_clip(spec, weights: str | None, wdir: Path | None, pooling: str, overrides: dict | None):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if pooling != "pooler":
        raise ValueError(f"{spec.name}: open_clip entries give the model's image embedding only (pooling 'pooler')")
    found = n = state = None
    if weights != W.RANDOM_INIT:
        found = _find_open_clip(spec, weights, wdir)
        state = read_state(found.path, spec.name)
    cfg = open_clip_config(spec, found.path.parent if found else None, overrides)
    chatter = []
    with library_chatter(chatter):
        visual = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]) if isinstance(
            cfg["vision_cfg"], dict) else cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    wid = None
    if state is not None:
        # the image tower, strictly; what is outside visual.* (text tower, logit_scale) is the zero-shot head's
        vis = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        if not vis:
            raise WeightsError(f"{found.path}: not an open_clip checkpoint of {spec.name}: no visual.* tensors "
                               f"(it holds {len(state)}, e.g. {', '.join(sorted(state)[:3])})")
        n = (strict_load(visual, vis, (), found.path, f"{spec.name} (open_clip image tower)"), len(state) - len(vis))
        wid = state_identity(state)
    visual.eval()
    return (_ClipImage(visual, spec.options.get("normalize", False)), wid, int(cfg["embed_dim"]),
            _source(spec, found, n, chatter))


def _find_open_clip(spec, weights: str | None, wdir: Path | None) -> Found:
    repo = spec.options.get("repo")
    names = spec.options.get("files", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
    found = find_file(spec, weights, wdir, repo, names)
    if found.via == "download":
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(repo, "open_clip_config.json")
        except Exception:  # noqa: BLE001 - older repos have none; the entry's own config is used
            pass
    return found


def open_clip_file(spec, weights: str | None, wdir: Path | None) -> Path:
    return _find_open_clip(spec, weights, wdir).path


# family -> build(spec, weights, wdir, pooling, overrides) -> (module, weights identity, feature dim);
# backbones registers one builder for the three (pooling, configuration and identity are shared)
BUILDERS = Registry("foundation-model family")
for _family, _build in zip(FAMILIES, (build_hf, build_timm, build_open_clip), strict=True):
    BUILDERS.register(_family, _build)


# --- generic entries: hf:<repo>, timm:<name>, open_clip:<arch> ------------------------------------

def _resample(v) -> str:
    name = str(getattr(v, "name", v)).lower()
    if name in ("3", "bicubic", "interpolationmode.bicubic"):
        return "bicubic"
    if name in ("2", "bilinear", "interpolationmode.bilinear"):
        return "bilinear"
    raise ValueError(f"resampling {v!r} is not one featstore reproduces (bilinear, bicubic)")


def pipeline_from_timm_cfg(cfg: dict):
    """timm resolve_data_config -> the same transform create_transform(is_training=False) builds."""
    from featstore.preprocess import InputPipeline

    size = int(cfg["input_size"][-1])
    if cfg.get("crop_mode", "center") != "center":
        raise ValueError(f"timm crop_mode {cfg.get('crop_mode')} is not reproduced (center only)")
    resize = int(size / cfg.get("crop_pct", 0.875)) if cfg.get("crop_pct") else size  # timm: floor(size / crop_pct)
    return size, InputPipeline("pil-uint8", crop="short-side", resize=resize, resample=_resample(cfg["interpolation"]),
                               mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]))


def pipeline_from_hf_processor(proc):
    from featstore.preprocess import InputPipeline

    size, crop = dict(proc.size or {}), dict(getattr(proc, "crop_size", None) or {})
    mean, std = tuple(float(v) for v in proc.image_mean), tuple(float(v) for v in proc.image_std)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    rs = _resample(proc.resample)
    if "shortest_edge" in size:
        if not getattr(proc, "do_center_crop", False) or not crop:
            raise ValueError("an HF processor that resizes the shortest edge without a centre crop is not reproduced")
        return int(crop["height"]), InputPipeline("pil-uint8", crop="short-side-floor", resize=int(size["shortest_edge"]), resample=rs,
                                                 mean=mean, std=std)
    if size.get("height") and size.get("height") == size.get("width") and not getattr(proc, "do_center_crop", False):
        return int(size["height"]), InputPipeline("pil-uint8", resample=rs, crop="none", mean=mean, std=std)
    raise ValueError(f"HF processor with size {size} and crop {crop} is not reproduced by featstore")


def generic_spec_fields(name: str, wdir: Path | None = None, weights: str | None = None) -> dict:
    """The BackboneSpec fields of a generic entry (backbones builds the spec: this module does not
    import backbones, which imports it). wdir / weights: where a hf: snapshot is looked for (as its
    weights are), for its processor and config.json."""
    kind, _, arg = name.partition(":")
    if not arg:
        raise ValueError(f"backbone '{name}': give the model after the colon ({kind}:<name>)")
    if kind == "timm":
        import timm

        if not timm.is_model(arg.split(".")[0]):
            raise ValueError(f"backbone '{name}': timm has no model '{arg}'")
        pcfg = timm.models.get_pretrained_cfg(arg) or {}
        from timm.data import resolve_data_config

        size, pipe = pipeline_from_timm_cfg(resolve_data_config(pretrained_cfg=pcfg.to_dict() if hasattr(pcfg, "to_dict") else pcfg))
        return dict(name=name, family="timm", input_size=size, channels=3, pipeline=pipe, feature_dim=None,
                    weights=pcfg.hf_hub_id if hasattr(pcfg, "hf_hub_id") else None,
                    description=f"timm {arg}; head-pooled features", licence=(getattr(pcfg, "license", None) or "see model card"),
                    options=dict(arch=arg, pooling="pooler"))
    if kind == "open_clip":
        import open_clip

        cfg = open_clip.get_model_config(arg)
        if cfg is None:
            raise ValueError(f"backbone '{name}': open_clip has no model config '{arg}'")
        from featstore.preprocess import InputPipeline

        size = cfg["vision_cfg"].get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        pp = cfg.get("preprocess_cfg", {})
        pipe = InputPipeline("pil-uint8", crop="short-side", resize=size, resample=_resample(pp.get("interpolation", "bicubic")),
                             mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                             std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)))
        return dict(name=name, family="open_clip", input_size=size, channels=3, pipeline=pipe,
                    feature_dim=int(cfg["embed_dim"]), weights=None,
                    description=f"open_clip {arg} image tower; projected embedding (weights: --weights PATH)",
                    licence="see model card", options=dict(arch=arg, pooling="pooler"))
    if kind == "hf":
        return _generic_hf_fields(name, arg, wdir, weights)
    raise ValueError(f"unknown backbone family '{kind}' (hf, timm, open_clip)")


def _generic_hf_folder(repo: str, wdir: Path | None, weights: str | None) -> Path | None:
    """The local snapshot a hf:<repo> entry's processor and config come from: --weights (a folder, or a
    file in one), else the first candidate folder holding preprocessor_config.json; None: the hub."""
    if weights and weights != W.RANDOM_INIT:
        p = Path(weights).expanduser()
        return p.parent if p.is_file() else p
    for c, _, _ in candidate_folders(repo, wdir, ("preprocessor_config.json",)):
        if (c / "preprocessor_config.json").is_file():
            return c
    return None


def _generic_hf_fields(name: str, repo: str, wdir: Path | None, weights: str | None) -> dict:
    from transformers import AutoConfig, AutoImageProcessor

    folder = _generic_hf_folder(repo, wdir, weights)
    src = str(folder) if folder is not None else repo
    chatter: list[str] = []
    try:
        with library_chatter(chatter):
            proc = AutoImageProcessor.from_pretrained(src, local_files_only=hub_offline() or folder is not None)
    except Exception as e:  # noqa: BLE001 - offline without a cached copy: say what is needed
        raise ValueError(f"backbone '{name}': its image processor (preprocessor_config.json of {repo}) is needed "
                         f"to feed it as it was trained; not in {folder or 'the hub cache'} and not downloadable "
                         f"({type(e).__name__}); put the snapshot in <weights-dir>/{repo.replace('/', '--')}/ "
                         f"(or `hf download {repo}`)") from e
    size, pipe = pipeline_from_hf_processor(proc)
    opts = dict(repo=repo, pooling="cls")
    try:  # the model type: SigLIP has no CLS token, and its pooler output is the joint image-text embedding
        with library_chatter(chatter):
            opts["model_type"] = AutoConfig.from_pretrained(
                src, local_files_only=hub_offline() or folder is not None).model_type
    except Exception:  # noqa: BLE001 - a processor without its config.json: the type stays unknown
        pass
    what = "CLS token"
    if opts.get("model_type", "").startswith("siglip"):  # no CLS token: the model's own (MAP-head) pooler
        opts.update(cls_token=False, pooling="pooler", poolings=("pooler", "mean"))
        what = "its pooler (MAP head; no CLS token)"
    elif opts.get("model_type") == "dinov2":  # HF's Dinov2 pooler output is the (layer-normed) CLS token
        opts.update(poolings=("cls", "mean"), pooling_aliases={"pooler": "cls"})
    return dict(name=name, family="hf", input_size=size, channels=3, pipeline=pipe, feature_dim=None, weights=repo,
                description=f"Hugging Face {repo}; {what}", licence="see model card", options=opts)
