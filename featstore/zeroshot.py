"""Zero-shot classification from an embedding set's own text tower.

Class prompts become text embeddings through the text tower of the very weights the embedding set was
made with (its weights_id: the hash of the weight tensors, or of the files for older sets, checked again
here, or random-init with its seed and configuration); heads.ZeroShotHead scores the stored image
embeddings against them. No training: the one head that never saw a source.

Only embeddings in the joint image-text space qualify:
- open_clip entries store `encode_image`: the image tower's output after its projection (`pooler`, the
  only pooling open_clip entries have);
- Hugging Face SigLIP entries with pooling `pooler` store `get_image_features`: SigLIP has no separate
  projection, its attention-pooling head's output is the joint embedding. Their `mean` pooling is not.
- Other Hugging Face vision towers (CLIP-style, whose projection lives outside the vision model), CLS
  or mean-of-patches poolings, timm and the rest have no text side: refused, one line saying why.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from featstore import foundation as F
from featstore import weights as W

# Hugging Face model types whose vision tower's pooler output *is* the joint-space image embedding
from featstore.backbone_specs import has_text_tower  # noqa: E402,F401 - declared without torch
from featstore.families import HF_JOINT  # noqa: E402,F401


class ZeroShotError(ValueError):
    """An embedding set the zero-shot head cannot use, or a text tower that cannot be had."""


@dataclass
class TextTower:
    backbone: str
    weights: str           # the weights identity it was built from (sha256:... or random-init:seedN)
    logit_scale: float     # exp(learned temperature): what the model multiplies cosine similarities by
    encode: Callable[[list[str]], np.ndarray]  # prompts -> unit-norm float64 [n, D]
    source: str            # where its weights came from, for messages and records


def parse_weights_id(weights_id: str) -> dict:
    """'sha256:..;pool=pooler;config=ab12cd34;input=...' -> {weights, pool, config, input}."""
    head, _, pid = weights_id.partition(";input=")
    w, *rest = head.split(";")
    out = dict(weights=w, input=pid)
    for part in rest:
        k, _, v = part.partition("=")
        out[k] = v
    return out


def joint_space_problem(backbone: str, weights_id: str) -> str | None:
    """Why embedding set (backbone, weights_id) is not in a joint image-text space, or None."""
    from featstore.backbones import get_spec

    spec = get_spec(backbone)
    pool = parse_weights_id(weights_id).get("pool", spec.options.get("pooling"))
    if spec.family == "open_clip":
        return None if pool == "pooler" else (
            f"{backbone} stores pooling '{pool}', not the projected image embedding (pooler)")
    if spec.family == "hf":
        if not has_text_tower(spec):
            return (f"{backbone} is a Hugging Face vision tower without a text side registered; its pooler output "
                    f"is not projected into a joint image-text space (zero-shot works with SigLIP / MedSigLIP "
                    f"entries and open_clip ones)")
        if pool != "pooler":
            return (f"{backbone} stores pooling '{pool}', not the projected image features (SigLIP's pooler "
                    f"output, get_image_features): embed with --pooling pooler")
        return None
    return f"{backbone} ({spec.family}) has no text tower"


def text_tower(backbone: str, weights_id: str, weights_dir=None, config_overrides: dict | None = None) -> TextTower:
    """The text tower of the weights embedding set (backbone, weights_id) was made with."""
    from featstore.backbones import config_hash, get_spec

    spec = get_spec(backbone)
    why = joint_space_problem(backbone, weights_id)
    if why:
        raise ZeroShotError(f"zero-shot head: {why}")
    parts = parse_weights_id(weights_id)
    have = parts.get("config")
    if have and not config_overrides:
        raise ZeroShotError(f"zero-shot head: {backbone} embeddings ({weights_id}) were made with a changed model "
                            f"configuration (config={have}); give the zero-shot head the same config_overrides")
    if config_overrides and config_hash(config_overrides) != have:
        raise ZeroShotError(f"zero-shot head: config_overrides (config={config_hash(config_overrides)}) are not the "
                            f"configuration {backbone} embeddings were made with "
                            f"({'config=' + have if have else 'the entry as registered'})")
    w = parts["weights"]
    seed = None
    if w.startswith(W.RANDOM_INIT):
        seed = int(w.rpartition("seed")[2] or 0)
    wdir = W.weights_dir(weights_dir)
    build = _open_clip_text if spec.family == "open_clip" else _hf_text
    return build(spec, w, seed, wdir, config_overrides or {})


def _check_identity(backbone: str, want: str, got: str, where) -> None:
    if got != want:
        raise ZeroShotError(f"zero-shot head: the weights found at {where} ({got}) are not those {backbone} "
                            f"embeddings were made with ({want}); put those in --weights-dir / "
                            f"FEATSTORE_WEIGHTS_DIR (or the head's weights_dir)")


# --- open_clip -----------------------------------------------------------------------------------

def _open_clip_text(spec, w: str, seed: int | None, wdir: Path | None, overrides: dict) -> TextTower:
    from open_clip.model import CLIP, CustomTextCLIP

    path = None
    if seed is None:
        try:
            path = F.open_clip_file(spec, None, wdir)
        except W.WeightsMissingError as e:
            raise ZeroShotError(f"zero-shot head: {e}") from None
        _check_identity(spec.name, w, F.identity_of([path], w), path)
    cfg = F.open_clip_config(spec, path.parent if path else None, overrides)
    folder_cfg = path.parent / "open_clip_config.json" if path else None
    if folder_cfg is not None and folder_cfg.is_file() and "model_cfg" in spec.options:
        # the checkpoint's own published text tower wins over the entry's copy of it
        cfg["text_cfg"] = {**json.loads(folder_cfg.read_text())["model_cfg"].get("text_cfg", {}),
                           **overrides.get("text_cfg", {})}
    tc = dict(cfg.get("text_cfg") or {})
    if not tc:
        raise ZeroShotError(f"zero-shot head: {spec.name}: no text tower configuration (text_cfg) is known")
    hf_src = None
    if tc.get("hf_model_name"):  # BiomedCLIP: a Hugging Face BERT; its config.json and tokenizer are needed
        hf_src = _hf_text_folder(tc["hf_model_name"], wdir, spec.name)
        tc.update(hf_model_name=str(hf_src), hf_model_pretrained=False)
    kw = {k: cfg[k] for k in ("init_logit_scale", "init_logit_bias", "nonscalar_logit_scale") if k in cfg}
    cls = CustomTextCLIP if hf_src is not None or cfg.get("custom_text") else CLIP
    if seed is not None:  # as create_backbone seeds: the image tower is built first, so it is the stored one
        torch.manual_seed(seed)
    model = cls(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=tc,
                quick_gelu=cfg.get("quick_gelu", False), **kw)
    if path is not None:
        from open_clip.factory import load_checkpoint

        incompatible = load_checkpoint(model, str(path), strict=False)
        missing = [k for k in incompatible.missing_keys if not k.startswith("visual.")]
        if missing:
            raise ZeroShotError(f"zero-shot head: {path} holds no text tower for {spec.name} (keys missing, e.g. "
                                f"{', '.join(missing[:3])}): a checkpoint of the whole model is needed")
    model.visual = None  # the stored embeddings are the image side; only the text side runs here
    model.eval()
    tok = _open_clip_tokenizer(spec, cfg, tc, hf_src, folder_cfg)

    @torch.no_grad()
    def encode(prompts: list[str]) -> np.ndarray:
        return model.encode_text(tok(list(prompts)), normalize=True).double().numpy()

    scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    return TextTower(spec.name, w, scale, encode, str(path) if path else f"{W.RANDOM_INIT} seed {seed}")


def _open_clip_tokenizer(spec, cfg, tc, hf_src, folder_cfg):
    import open_clip
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    ctx = tc.get("context_length", 77)
    kw = tc.get("tokenizer_kwargs", {})
    try:
        if hf_src is not None:
            return HFTokenizer(str(hf_src), context_length=ctx, **kw)
        if "model_cfg" not in spec.options and not (folder_cfg and folder_cfg.is_file()):
            return open_clip.get_tokenizer(spec.options["arch"], context_length=ctx)  # the library's choice
        return SimpleTokenizer(context_length=ctx, **kw)  # OpenAI CLIP's BPE, shipped with open_clip
    except Exception as e:  # noqa: BLE001 - a tokenizer needing the network or a missing package: one line
        raise ZeroShotError(f"zero-shot head: {spec.name}: its tokenizer could not be loaded "
                            f"({type(e).__name__}: {str(e)[:200]})") from None


def _hf_text_folder(repo: str, wdir: Path | None, what: str) -> Path:
    """A Hugging Face text model's folder (config.json + tokenizer files): a local path, <wdir>/<org>--<name>,
    else the hub (snapshot) unless offline."""
    if Path(repo).is_dir():
        return Path(repo)
    for c in ([wdir / repo.replace("/", "--"), wdir / repo] if wdir else []):
        if (c / "config.json").is_file():
            return c
    files = ("config.json", "vocab.txt", "tokenizer*", "special_tokens_map.json")
    where = f"{wdir}/{repo.replace('/', '--')}/" if wdir else f"<weights-dir>/{repo.replace('/', '--')}/"
    if F.hub_offline():
        raise ZeroShotError(f"zero-shot head: {what}'s text model {repo} is needed (config.json and its tokenizer "
                            f"files); offline: download them from https://huggingface.co/{repo} and put them in {where}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=list(files)))
    except Exception as e:  # noqa: BLE001
        raise ZeroShotError(f"zero-shot head: {what}'s text model {repo} could not be had ({type(e).__name__}); "
                            f"download config.json and its tokenizer files from https://huggingface.co/{repo} "
                            f"and put them in {where}") from None


# --- Hugging Face (SigLIP, MedSigLIP) --------------------------------------------------------------

_HF_TEXT_FILES = ("config.json", "*.safetensors", "*.json", "spiece.model", "tokenizer*")


def _hf_text(spec, w: str, seed: int | None, wdir: Path | None, overrides: dict) -> TextTower:
    import transformers

    repo = spec.options["repo"]
    folder = None
    if seed is None:
        try:
            folder = F.local_folder(repo, wdir, None, _HF_TEXT_FILES, spec.name)
        except W.WeightsMissingError as e:
            raise ZeroShotError(f"zero-shot head: {e}") from None
        files = F.weight_files(folder) if w.startswith("sha256:") else F.hf_weight_files(folder)
        _check_identity(spec.name, w, F.identity_of(files, w), folder)
        model = transformers.AutoModel.from_pretrained(folder)
    else:
        cfg = _hf_full_config(spec, overrides)
        torch.manual_seed(seed)  # random-init: the text tower from the set's seed (the image tower was built alone)
        model = transformers.AutoModel.from_config(cfg)
    if not hasattr(model, "get_text_features"):
        raise ZeroShotError(f"zero-shot head: {spec.name}: the model at {folder or repo} "
                            f"({type(model).__name__}) has no text tower")
    model.vision_model = None  # the stored embeddings are the image side
    model.eval()
    tok = _hf_tokenizer(spec, folder, wdir)
    length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def encode(prompts: list[str]) -> np.ndarray:
        # SigLIP was trained on text padded to its full length ("max_length"), and pools the last token
        t = tok(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        out = model.get_text_features(input_ids=t["input_ids"])
        f = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.nn.functional.normalize(f, dim=-1).double().numpy()

    scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    return TextTower(spec.name, w, scale, encode, str(folder) if folder else f"{W.RANDOM_INIT} seed {seed}")


def _hf_full_config(spec, overrides: dict):
    """random-init: the whole model's configuration (image tower as the entry's, text tower beside it)."""
    import transformers

    o = spec.options
    if "text_config" not in o:
        try:
            cfg = transformers.AutoConfig.from_pretrained(o["repo"])
        except Exception as e:  # noqa: BLE001
            raise ZeroShotError(f"zero-shot head: {spec.name}: its configuration (config.json of {o['repo']}) is "
                                f"needed ({type(e).__name__})") from None
        return cfg
    vision = dict(o.get("config", {}), **{k: v for k, v in overrides.items() if k != "text_config"})
    text = dict(o["text_config"], **overrides.get("text_config", {}))
    text.setdefault("projection_size", vision.get("hidden_size"))
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


def _hf_tokenizer(spec, folder: Path | None, wdir: Path | None):
    from transformers import AutoTokenizer

    repo = spec.options["repo"]
    src = folder
    if src is None:  # random-init: random weights, but real text still needs the model's own tokenizer
        for c in ([wdir / repo.replace("/", "--"), wdir] if wdir else []):
            if any(c.glob("tokenizer*")) or (c / "spiece.model").is_file():
                src = c
                break
    if src is None and F.hub_offline():
        raise ZeroShotError(f"zero-shot head: {spec.name} with random-init weights still needs its tokenizer "
                            f"(tokenizer files of {repo}); offline: put them in <weights-dir>/{repo.replace('/', '--')}/")
    try:
        return AutoTokenizer.from_pretrained(str(src) if src else repo)
    except Exception as e:  # noqa: BLE001 - e.g. SiglipTokenizer needs the sentencepiece package
        raise ZeroShotError(f"zero-shot head: {spec.name}: its tokenizer could not be loaded from {src or repo} "
                            f"({type(e).__name__}: {str(e)[:200]})") from None


# --- prompts -> class embeddings ---------------------------------------------------------------------

@dataclass
class ClassTexts:
    """What the zero-shot head scores against: one unit vector per prompt group, the class each group
    counts towards (binary: several label values may make up 'not <positive>'), the model's scale."""
    keys: list[str]
    embeddings: np.ndarray   # [M, D] float64, unit norm: the mean of the group's prompt embeddings, renormalised
    key_class: np.ndarray    # [M] int: class index of each group
    logit_scale: float
    identity: str            # sha256 of all of the above, for the records

    def as_head_inputs(self) -> dict:
        return dict(text_embeddings=self.embeddings, key_class=self.key_class, logit_scale=self.logit_scale,
                    text_identity=self.identity)


def class_texts(tower: TextTower, prompts: dict[str, list[str]], key_class: dict[str, int]) -> ClassTexts:
    """Prompts per group -> one embedding per group (prompt ensembling: the mean of its prompts'
    normalised embeddings, normalised again, as CLIP's zero-shot evaluation does)."""
    keys = list(prompts)
    rows = []
    for k in keys:
        e = tower.encode(prompts[k]).mean(axis=0)
        rows.append(e / max(np.linalg.norm(e), 1e-12))
    E = np.stack(rows)
    kc = np.array([key_class[k] for k in keys], dtype=np.int64)
    h = hashlib.sha256()
    for part in (E.astype("<f8").tobytes(), kc.astype("<i8").tobytes(), repr(tower.logit_scale).encode(),
                 json.dumps(prompts, sort_keys=True).encode()):
        h.update(part)
    return ClassTexts(keys, E, kc, tower.logit_scale, "sha256:" + h.hexdigest())


def key_classes(prompts: dict, class_names: list[str], target: str, positive: str, labels) -> dict[str, int]:
    """Which class each prompt group counts towards, in the study's class order. 3class: one group per
    class, named as the class. binary (classes ['not <positive>', positive]): the positive, and any of
    'not <positive>' or the other label values, which together make up the negative class."""
    keys = list(prompts)
    if target != "binary":
        missing = [c for c in class_names if c not in prompts]
        extra = [k for k in keys if k not in class_names]
        if missing or extra:
            raise ZeroShotError("zero-shot prompts must name each class once (" + ", ".join(class_names) + ")"
                                + (f"; missing {', '.join(missing)}" if missing else "")
                                + (f"; not a class: {', '.join(extra)}" if extra else ""))
        return {k: class_names.index(k) for k in keys}
    neg = {class_names[0], *[lab for lab in labels if lab != positive]}
    if positive not in prompts:
        raise ZeroShotError(f"zero-shot prompts need the positive class '{positive}'")
    bad = [k for k in keys if k != positive and k not in neg]
    if bad:
        raise ZeroShotError(f"zero-shot prompts: {', '.join(bad)} is neither the positive '{positive}' nor a negative "
                            f"('{class_names[0]}' or a label value: {', '.join(sorted(neg - {class_names[0]}))})")
    if len(keys) < 2:
        raise ZeroShotError(f"zero-shot prompts need a negative side too ('{class_names[0]}' or label values)")
    return {k: 1 if k == positive else 0 for k in keys}
