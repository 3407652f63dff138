"""Frozen foundation-model backbones: Hugging Face transformers, timm and open_clip.

One builder per family (build_hf, build_timm, build_open_clip), called by backbones.create_backbone.
Named entries carry a full-size configuration, so `--weights random-init` needs no network; generic
names (`hf:<repo>`, `timm:<name>`, `open_clip:<arch>`) take theirs from the library or the hub.

Pooling is part of the identity: `<entry>@<pooling>` (or `--pooling`, backbones.canonical_name) is its
own backbone name (its own embedding set) and every weights_id records `;pool=<pooling>`. Weights: `--weights-dir` (a Hugging Face snapshot
folder, a timm file, an open_clip checkpoint), else the hub download unless offline; identity =
sha256 over the weight files.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from featstore import weights as W
from featstore.registry import Registry

FAMILIES = ("hf", "timm", "open_clip")
POOLINGS = ("cls", "mean", "pooler")
# generic entries: (default pooling, valid poolings). open_clip gives the model's own image embedding
# only (its projection to the joint image-text space); hf/timm models that lack a CLS token or a
# pooler say so when built
GENERIC_POOLING = {"hf": ("cls", POOLINGS), "timm": ("pooler", POOLINGS), "open_clip": ("pooler", ("pooler",))}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth", "*.pt")


def hub_offline() -> bool:
    return W.offline() or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "no")


def files_identity(files: list[Path]) -> str:
    """sha256 of one file; several (sharded checkpoints): sha256 over 'name sha256' lines, sorted."""
    files = sorted(files, key=lambda p: p.name)
    if len(files) == 1:
        return W.weights_identity(files[0])
    h = hashlib.sha256("".join(f"{p.name} {W.sha256_file(p)}\n" for p in files).encode())
    return "sha256:" + h.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    for g in _WEIGHT_GLOBS:  # safetensors first: a snapshot may hold both formats of the same weights
        found = sorted(p for p in folder.glob(g) if p.is_file() and "training_args" not in p.name)
        if found:
            return found
    return []


def _missing(what: str, files: str, repo: str, looked: list[str], wdir: Path | None, why: str) -> W.WeightsMissingError:
    where = (f"{wdir}/{repo.replace('/', '--')}/" if wdir else
             f"a folder given by --weights-dir / FEATSTORE_WEIGHTS_DIR, as <dir>/{repo.replace('/', '--')}/")
    return W.WeightsMissingError(
        f"weights for {what} not found ({why}; looked in: {', '.join(looked) or 'no --weights-dir'}): download "
        f"{files} from https://huggingface.co/{repo} (huggingface-cli download {repo}) and put them in {where}")


def local_folder(repo: str, wdir: Path | None, explicit: str | None, files: tuple[str, ...], what: str) -> Path:
    """A Hugging Face snapshot folder for `repo`: --weights PATH (a folder), <wdir>/<org>--<name>, <wdir>
    itself when it holds the files, else the hub (snapshot_download) unless offline."""
    looked = []
    cands = [Path(explicit).expanduser()] if explicit else []
    if wdir is not None:
        cands += [wdir / repo.replace("/", "--"), wdir / repo, wdir]
    for c in cands:
        looked.append(str(c))
        if c.is_dir() and weight_files(c):
            return c
    if explicit:
        raise W.WeightsMissingError(f"--weights {explicit}: no weight files ({', '.join(_WEIGHT_GLOBS)}) there for {what}")
    desc = " and ".join(files)
    if hub_offline():
        raise _missing(what, desc, repo, looked, wdir, "offline: FEATSTORE_OFFLINE / HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=list(files)))
    except Exception as e:  # gated repo, no network, unknown repo: one message naming the files and the place
        raise _missing(what, desc, repo, looked, wdir, f"{type(e).__name__}: {str(e)[:200]}") from e


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
    import transformers

    if folder is not None and (folder / "config.json").is_file():
        cfg = transformers.AutoConfig.from_pretrained(folder)
    elif "config_class" in opts:
        cfg = getattr(transformers, opts["config_class"])(**opts.get("config", {}))
    else:  # generic hf:<repo>: its config.json from the hub or the local cache
        cfg = transformers.AutoConfig.from_pretrained(repo)
    if hasattr(cfg, "vision_config") and opts.get("vision_tower", True):
        cfg = cfg.vision_config  # CLIP/SigLIP-style: the image tower only
    for k, v in (overrides or {}).items():
        if k != "text_config":  # the text tower's (zero-shot head), not the image tower's
            setattr(cfg, k, v)
    return cfg


def build_hf(spec, weights: str | None, wdir: Path | None, pooling: str, overrides: dict | None):
    """-> (module, weights identity, feature dim)."""
    import transformers

    opts, repo = spec.options, spec.options["repo"]
    folder = None
    if weights != W.RANDOM_INIT:
        folder = local_folder(repo, wdir, weights, ("config.json", "*.safetensors", "preprocessor_config.json"),
                              spec.name)
    cfg = _hf_config(opts, overrides, folder, repo)
    if folder is None:
        model = transformers.AutoModel.from_config(cfg)
        wid = None
    else:
        cls = transformers.AutoModel
        model = cls.from_pretrained(folder, config=cfg) if not opts.get("vision_tower_class") else \
            getattr(transformers, opts["vision_tower_class"]).from_pretrained(folder, config=cfg)
        wid = files_identity(weight_files(folder))
    model.eval()
    n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0) if opts.get("cls_token", True) else 0
    return _HFVision(model, pooling, n_prefix), wid, int(cfg.hidden_size)


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
    wid = None
    if weights != W.RANDOM_INIT:
        path = _timm_file(spec, model, weights, wdir)
        timm.models.load_checkpoint(model, str(path), strict=False, filter_fn=None)
        wid = W.weights_identity(path)
    model.eval()
    dim = model.num_features if pooling != "pooler" else getattr(model, "head_hidden_size", model.num_features)
    return _TimmPooled(model, pooling), wid, int(dim)


def _timm_file(spec, model, weights: str | None, wdir: Path | None) -> Path:
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise W.WeightsMissingError(f"weights file {p} for {spec.name} not found")
        return p
    hub = model.pretrained_cfg.get("hf_hub_id") or f"timm/{spec.options['arch']}"
    names = [f"{spec.options['arch']}.safetensors", "model.safetensors", "pytorch_model.bin"]
    looked = []
    for d in ([wdir / hub.replace("/", "--"), wdir] if wdir else []):
        for n in names:
            looked.append(str(d / n))
            if (d / n).is_file():
                return d / n
    if hub_offline():
        raise _missing(spec.name, "model.safetensors", hub, looked, wdir, "offline: FEATSTORE_OFFLINE / HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(hub, "model.safetensors"))
    except Exception as e:
        raise _missing(spec.name, "model.safetensors", hub, looked, wdir, f"{type(e).__name__}: {str(e)[:200]}") from e


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
    path = None
    if weights != W.RANDOM_INIT:
        path = open_clip_file(spec, weights, wdir)
    cfg = open_clip_config(spec, path.parent if path else None, overrides)
    visual = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]) if isinstance(
        cfg["vision_cfg"], dict) else cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    wid = None
    if path is not None:
        sd = torch.load(path, map_location="cpu", weights_only=True) if path.suffix != ".safetensors" else \
            __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path))
        sd = sd.get("state_dict", sd)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        missing, unexpected = visual.load_state_dict(vis, strict=False)
        if missing:
            raise ValueError(f"{path}: not an open_clip checkpoint of {spec.options.get('arch')} "
                             f"(image tower keys missing, e.g. {missing[:3]})")
        wid = W.weights_identity(path)
    visual.eval()
    return _ClipImage(visual, spec.options.get("normalize", False)), wid, int(cfg["embed_dim"])


def open_clip_file(spec, weights: str | None, wdir: Path | None) -> Path:
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise W.WeightsMissingError(f"weights file {p} for {spec.name} not found")
        return p
    repo = spec.options.get("repo")
    names = spec.options.get("files", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
    looked = []
    for d in ([wdir / repo.replace("/", "--"), wdir] if (wdir and repo) else [wdir] if wdir else []):
        for n in names:
            looked.append(str(d / n))
            if (d / n).is_file():
                return d / n
    if not repo:
        raise W.WeightsMissingError(f"weights for {spec.name} not found (looked in: {', '.join(looked) or 'no --weights-dir'});"
                                    f" no hub repository is registered: give --weights PATH to an open_clip checkpoint")
    if hub_offline():
        raise _missing(spec.name, " or ".join(names), repo, looked, wdir, "offline: FEATSTORE_OFFLINE / HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import hf_hub_download

        p = Path(hf_hub_download(repo, names[-1]))
        try:
            hf_hub_download(repo, "open_clip_config.json")
        except Exception:  # noqa: BLE001 - older repos have none; the entry's own config is used
            pass
        return p
    except Exception as e:
        raise _missing(spec.name, " or ".join(names), repo, looked, wdir, f"{type(e).__name__}: {str(e)[:200]}") from e


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


def generic_spec_fields(name: str) -> dict:
    """The BackboneSpec fields of a generic entry (backbones builds the spec: this module does not
    import backbones, which imports it)."""
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
        from transformers import AutoImageProcessor

        src = arg
        wdir = W.weights_dir()
        if wdir is not None and (wdir / arg.replace("/", "--") / "preprocessor_config.json").is_file():
            src = str(wdir / arg.replace("/", "--"))
        try:
            proc = AutoImageProcessor.from_pretrained(src, local_files_only=hub_offline())
        except Exception as e:  # noqa: BLE001 - offline without a cached copy: say what is needed
            raise ValueError(f"backbone '{name}': its image processor (preprocessor_config.json of {arg}) is needed "
                             f"to feed it as it was trained; not in the hub cache and not downloadable "
                             f"({type(e).__name__}); put the snapshot in <weights-dir>/{arg.replace('/', '--')}/") from e
        size, pipe = pipeline_from_hf_processor(proc)
        opts = dict(repo=arg, pooling="cls")
        try:  # the model type: SigLIP has no CLS token, and its pooler output is the joint image-text embedding
            from transformers import AutoConfig

            opts["model_type"] = AutoConfig.from_pretrained(src, local_files_only=hub_offline()).model_type
        except Exception:  # noqa: BLE001 - a processor without its config.json: the type stays unknown
            pass
        if opts.get("model_type", "").startswith("siglip"):
            opts["cls_token"] = False
        return dict(name=name, family="hf", input_size=size, channels=3, pipeline=pipe, feature_dim=None, weights=arg,
                    description=f"Hugging Face {arg}; CLS token", licence="see model card", options=opts)
    raise ValueError(f"unknown backbone family '{kind}' (hf, timm, open_clip)")
