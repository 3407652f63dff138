"""Backbone names and their typed configurations (BackboneSpec), declared without importing any model
library: `featstore --help`, `featstore backbones` and a misspelt name answer without torch. The models
are built by featstore/backbones.py (create_backbone), which re-exports these names.

Each entry carries what the rest of the pipeline needs: input size, channels, the input
pipeline (how its own library / training code resized and normalised images) and feature
dimension; the built Backbone adds its identity: the weight file's sha256 (foundation models: the hash of
their tensors, foundation.state_identity; or `random-init`), plus the input pipeline's identity, so vectors
made by different pipelines never share a set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featstore import weights as W
from featstore.registry import Registry
from featstore.suggest import unknown
from featstore.preprocess import InputPipeline

from featstore.families import FAMILIES, GENERIC_POOLING, HF_JOINT, POOLINGS  # noqa: E402 - no torch

# torchxrayvision: normalize(img, maxval) -> XRayCenterCrop -> XRayResizer (skimage)
XRV_PIPELINE = InputPipeline("xrv")
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# torchvision weights.transforms() (ImageClassification): resize_size differs per weight set
TV_DENSENET121_V1 = InputPipeline("torchvision", resize=256, **_IMAGENET)
TV_RESNET50_V2 = InputPipeline("torchvision", resize=232, **_IMAGENET)
# the NIH model's training code (elsadiq7/..., Software/utils/data_loaders.py): Image.open().convert("L")
# .resize((224, 224)) -- whole image, PIL's default BICUBIC, in uint8 -- then ToTensor (/255) and
# Normalize([0.485], [0.229])
NIH_ONNX_PIPELINE = InputPipeline("pil-uint8", mean=(0.485,), std=(0.229,), resample="bicubic", crop="none")
# weight-free: featstore's original float path, version 0 so existing pixelstats sets keep their identity
PIXELSTATS_PIPELINE = InputPipeline("float", resample="bilinear", version=0)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone entry and its pretrained configuration (what timm's PretrainedCfg holds): input size and
    channels, the input pipeline (resize, crop, resample, mean/std: InputPipeline, checked here), feature
    dimension, weights and where they come from, licence. It travels with every built Backbone; its
    pipeline's identity is part of every weights_id, so the fields of InputPipeline never change meaning."""
    name: str
    family: str            # xrv-densenet | xrv-resnet | tv-densenet | tv-resnet | onnx | pixelstats
    input_size: int
    channels: int
    pipeline: InputPipeline  # how images become its input tensor (featstore.preprocess.to_input)
    feature_dim: int | None  # None: found when built (generic ONNX)
    weights: str | None      # library weight key / file name; None: weight-free
    url: str | None = None
    description: str = ""
    options: dict = field(default_factory=dict)
    licence: str = ""        # as published; gated / non-commercial terms matter to users

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"backbone '{self.name}': channels {self.channels} (1 or 3)")
        self.pipeline.check(self.channels)

    @property
    def norm(self) -> InputPipeline:
        """Old name of `pipeline` (embed.py and embed_ray.py still read spec.norm)."""
        return self.pipeline


REGISTRY: Registry[BackboneSpec] = Registry("backbone")


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a named entry; its family's builder (BUILDERS, `@builder(family)`) makes it."""
    return REGISTRY.register(spec.name, spec)


for _key in ("all", "nih", "pc", "chex", "rsna", "mimic_nb", "mimic_ch"):
    register(BackboneSpec(
        f"xrv-densenet121-res224-{_key}", "xrv-densenet", 224, 1, XRV_PIPELINE, 1024, f"densenet121-res224-{_key}",
        description=f"torchxrayvision DenseNet121, weights densenet121-res224-{_key}; global-average-pooled features"))
register(BackboneSpec("xrv-resnet50-res512-all", "xrv-resnet", 512, 1, XRV_PIPELINE, 2048, "resnet50-res512-all",
                      description="torchxrayvision ResNet50 at 512 px, weights resnet50-res512-all; pooled features"))
register(BackboneSpec("tv-densenet121-imagenet", "tv-densenet", 224, 3, TV_DENSENET121_V1, 1024, "DenseNet121_Weights.IMAGENET1K_V1",
                      description="torchvision DenseNet121, ImageNet weights; pooled features"))
register(BackboneSpec("tv-resnet50-imagenet", "tv-resnet", 224, 3, TV_RESNET50_V2, 2048, "ResNet50_Weights.IMAGENET1K_V2",
                      description="torchvision ResNet50, ImageNet weights; pooled features"))
register(BackboneSpec(
    "mobilenetv3-nih-onnx", "onnx", 224, 1, NIH_ONNX_PIPELINE, 576, "mobilenetv3_small_nih14_int8.onnx",
    url="https://github.com/elsadiq7/Quantized-MobileNetV3-Hardware-Acceleration-for-Chest-Xray-Edge-Computing/"
        "raw/a2eba6a378730bc8c26d68be24bc0bbfe242ef9e/Software/models/model_int8.onnx",
    description="MobileNetV3-Small trained on NIH ChestX-ray14, int8 ONNX; 576-d pooled features (/Reshape_output_0)",
    options={"output": "/Reshape_output_0"}))
register(BackboneSpec("onnx", "onnx", 224, 1, NIH_ONNX_PIPELINE, None, None,
                      description="any .onnx file (weights=PATH) and an intermediate tensor (output=NAME); "
                                  "fed as the NIH model is (whole image, PIL uint8 bicubic, /255, (x-0.485)/0.229)"))
register(BackboneSpec("pixelstats", "pixelstats", 256, 1, PIXELSTATS_PIPELINE, 64 + 256, None,
                      description="weight-free baseline: 64-bin intensity histogram + 16x16 thumbnail. "
                                  "Sees contrast curve, borders, burnt-in markers and field of view: "
                                  "a floor for how much source signal raw pixels carry"))


# --- frozen foundation models (featstore/foundation.py) ---------------------------------------------
# Each fed as its own processor feeds it: shorter side to `resize` (bicubic), centre crop, mean/std
# (timm resolve_data_config + create_transform, open_clip preprocess, HF Dinov2 / BitImageProcessor), or
# a plain resize to size x size (HF SiglipImageProcessor). Pooling: `<name>@<pooling>` is its own entry.
_OPENAI_CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# HF's Dinov2Model pooler_output is the layer-normed CLS token, the same vectors as `cls`: `pooler` names that set
_DINOV2_POOLER = {"pooler": "cls"}
_VIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
register(BackboneSpec(
    "rad-dino", "hf", 518, 3, InputPipeline("pil-uint8", crop="short-side-floor", resize=518, resample="bicubic",
                                            mean=(0.5307,) * 3, std=(0.2583,) * 3),
    768, "microsoft/rad-dino", description="RAD-DINO (DINOv2 ViT-B/14 on chest X-rays) at 518 px; CLS token",
    licence="MSRLA (Microsoft Research License Agreement, non-commercial)",
    options=dict(repo="microsoft/rad-dino", pooling="cls", poolings=("cls", "mean"), pooling_aliases=_DINOV2_POOLER,
                 config_class="Dinov2Config",
                 config=dict(_VIT_B, image_size=518, patch_size=14))))
register(BackboneSpec(
    "medsiglip-448", "hf", 448, 3, InputPipeline("pil-uint8", resample="bicubic", crop="none", **_HALF),
    1152, "google/medsiglip-448", description="MedSigLIP-448 image tower (SigLIP So400m/14, medical); "
                                              "attention-pooled (MAP head) embedding",
    licence="Health AI Developer Foundations terms of use (gated: accept on the hub)",
    options=dict(repo="google/medsiglip-448", pooling="pooler", poolings=("pooler", "mean"),
                 config_class="SiglipVisionConfig", vision_tower_class="SiglipVisionModel", cls_token=False,
                 config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                             num_attention_heads=16, image_size=448, patch_size=14),
                 # the text tower of the same checkpoint (zero-shot head); a snapshot's config.json wins
                 text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                  num_attention_heads=16, max_position_embeddings=64, vocab_size=32000))))
register(BackboneSpec(
    "siglip-base", "hf", 224, 3, InputPipeline("pil-uint8", resample="bicubic", crop="none", **_HALF),
    768, "google/siglip-base-patch16-224", description="SigLIP ViT-B/16 image tower; MAP-head embedding",
    licence="apache-2.0",
    options=dict(repo="google/siglip-base-patch16-224", pooling="pooler", poolings=("pooler", "mean"),
                 config_class="SiglipVisionConfig", vision_tower_class="SiglipVisionModel", cls_token=False,
                 config=dict(_VIT_B, image_size=224, patch_size=16),
                 text_config=dict(_VIT_B, max_position_embeddings=64, vocab_size=32000))))
register(BackboneSpec(
    "dinov2-base", "hf", 224, 3, InputPipeline("pil-uint8", crop="short-side-floor", resize=256, resample="bicubic", **_IMAGENET),
    768, "facebook/dinov2-base", description="DINOv2 ViT-B/14 (natural images) at 224 px; CLS token",
    licence="apache-2.0",
    options=dict(repo="facebook/dinov2-base", pooling="cls", poolings=("cls", "mean"), pooling_aliases=_DINOV2_POOLER,
                 config_class="Dinov2Config",
                 config=dict(_VIT_B, image_size=518, patch_size=14))))
register(BackboneSpec(
    "biomedclip", "open_clip", 224, 3, InputPipeline("pil-uint8", crop="short-side", resize=224, resample="bicubic", **_OPENAI_CLIP),
    512, "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    description="BiomedCLIP image tower (ViT-B/16, PMC-15M), 512-d projected embedding",
    licence="mit",
    options=dict(repo="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", arch="biomedclip",
                 pooling="pooler", poolings=("pooler",), files=["open_clip_pytorch_model.bin"],
                 model_cfg=dict(embed_dim=512, vision_cfg=dict(
                     timm_model_name="vit_base_patch16_224", timm_model_pretrained=False, timm_pool="",
                     timm_proj="linear", image_size=224),
                     # its open_clip_config.json's text tower (PubMedBERT, 256 tokens); the checkpoint
                     # folder's own open_clip_config.json wins when there is one
                     text_cfg=dict(hf_model_name="microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   hf_tokenizer_name="microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   hf_proj_type="mlp", hf_pooler_type="cls_last_hidden_state_pooler",
                                   context_length=256)))))
register(BackboneSpec(
    "chexzero", "open_clip", 224, 3,
    # CheXzero's zero_shot.py: Resize(224, bicubic) and Normalize(101.48761, 83.43944) on 0-255 pixels
    InputPipeline("pil-uint8", crop="short-side", resize=224, resample="bicubic", mean=(101.48761 / 255,) * 3, std=(83.43944 / 255,) * 3),
    512, "best_64_5e-05_original_22000_0.864.pt",
    description="CheXzero (OpenAI CLIP ViT-B/32 fine-tuned on MIMIC-CXR reports), 512-d image embedding; "
                "weights: a checkpoint from the CheXzero repository's Google Drive, --weights PATH",
    licence="see model card (github.com/rajpurkarlab/CheXzero)",
    options=dict(arch="ViT-B-32", pooling="pooler", poolings=("pooler",), files=["best_64_5e-05_original_22000_0.864.pt"],
                 download="the CheXzero repository's Google Drive (github.com/rajpurkarlab/CheXzero, README: checkpoints)",
                 model_cfg=dict(embed_dim=512, quick_gelu=True,
                                vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
                                # OpenAI CLIP's text transformer, as CheXzero fine-tuned it (77 tokens)
                                text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)))))
register(BackboneSpec(
    "convnext-base", "timm", 224, 3, InputPipeline("pil-uint8", crop="short-side", resize=256, resample="bicubic", **_IMAGENET),
    1024, "timm/convnext_base.fb_in22k_ft_in1k", description="ConvNeXt-Base (timm, IN-22k -> IN-1k); "
                                                            "head-pooled (avg + LayerNorm) features",
    licence="apache-2.0", options=dict(arch="convnext_base", pooling="pooler", poolings=("pooler", "mean"))))

GENERIC_PREFIXES = ("hf:", "timm:", "open_clip:")


def list_backbones() -> list[BackboneSpec]:
    return list(REGISTRY.values())


def poolings(name: str, weights_dir: str | os.PathLike | None = None) -> tuple[str, tuple[str, ...]]:
    """(default pooling, valid poolings) of a foundation-model entry or generic name (no `@`). A generic
    hf:<repo> reads its snapshot's config (a SigLIP has no CLS token: its pooler is the default)."""
    if name in REGISTRY:
        spec = REGISTRY[name]
        if spec.family not in FAMILIES:
            raise ValueError(f"backbone '{name}' has one fixed feature; only foundation-model entries (hf, timm, "
                             f"open_clip) take a pooling")
        return spec.options["pooling"], tuple(spec.options.get("poolings") or GENERIC_POOLING[spec.family][1])
    kind = name.partition(":")[0]
    if name.startswith("hf:"):
        try:
            o = get_spec(name, weights_dir).options
            return o["pooling"], tuple(o.get("poolings") or GENERIC_POOLING[kind][1])
        except ValueError:  # no processor to be had: the name is refused when built, with what is needed
            return GENERIC_POOLING[kind]
    if name.startswith(GENERIC_PREFIXES):
        return GENERIC_POOLING[kind]
    get_spec(name)  # raises: unknown backbone, with the known ones
    raise AssertionError(name)


def pooling_aliases(name: str, weights_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Poolings that are another by construction (HF's Dinov2 pooler output is its CLS token): one set."""
    if name in REGISTRY:
        return dict(REGISTRY[name].options.get("pooling_aliases", {}))
    if name.startswith("hf:"):
        try:
            return dict(get_spec(name, weights_dir).options.get("pooling_aliases", {}))
        except ValueError:
            return {}
    return {}


def canonical_name(name: str, pooling: str | None = None, weights_dir: str | os.PathLike | None = None) -> str:
    """The embedding set's backbone name for `name` with `pooling` (or its `@pooling` suffix): the entry's
    own name for its default pooling, `<entry>@<pooling>` for another. Two poolings are two sets; one
    pooling is one set however it is spelled (`rad-dino`, `rad-dino@cls`, `--pooling cls`, and
    `rad-dino@pooler`: an alias of cls for DINOv2 models)."""
    base, at, suffix = name.partition("@")
    if at and not suffix:
        raise ValueError(f"backbone '{name}': give a pooling after @ ({', '.join(POOLINGS)})")
    if pooling and suffix and pooling != suffix:
        raise ValueError(f"backbone '{name}' names pooling '{suffix}' and --pooling '{pooling}': give one")
    want = pooling or suffix
    if not want:
        return name
    default, valid = poolings(base, weights_dir)
    aliases = pooling_aliases(base, weights_dir)
    want = aliases.get(want, want)
    if want not in valid:
        what = f"unknown pooling '{want}'" if want not in POOLINGS else f"pooling '{want}' is not available"
        also = "".join(f"; {a} = {b}" for a, b in aliases.items())
        raise ValueError(f"backbone '{base}': {what} (valid for {base}: {', '.join(valid)}{also})")
    return base if want == default else f"{base}@{want}"


def get_spec(name: str, weights_dir: str | os.PathLike | None = None, weights: str | None = None) -> BackboneSpec:
    """A registered entry; `<entry>@<pooling>` (cls, mean, pooler) for another pooling of it, which is its
    own name and so its own embedding set; `hf:<repo>`, `timm:<name>`, `open_clip:<arch>` for generic ones
    (a hf: snapshot is looked for as its weights are: weights, weights_dir, the hub cache)."""
    if name in REGISTRY:
        return REGISTRY[name]
    base = name.partition("@")[0]
    if base in REGISTRY or base.startswith(GENERIC_PREFIXES):
        from featstore import foundation as F

        name = canonical_name(name, weights_dir=weights_dir) if "@" in name else name
        spec = REGISTRY[base] if base in REGISTRY else BackboneSpec(**F.generic_spec_fields(
            base, W.weights_dir(weights_dir), weights))
        pooling = name.partition("@")[2]
        if pooling:
            default = spec.options["pooling"]
            spec = dataclasses.replace(spec, name=name, options={**spec.options, "pooling": pooling,
                                                                  "default_pooling": default},
                                       feature_dim=None)
        return spec
    raise ValueError(f"{unknown('backbone', name, REGISTRY)}; or hf:<repo>, timm:<name>, open_clip:<arch>, "
                     f"and <entry>@<cls|mean|pooler>")


def with_pipeline(weights_identity: str, pipeline: InputPipeline) -> str:
    """The weights_id an embedding records: the weights' identity, then ';input=' and the input
    pipeline's identity (none for the version-0 float path, so pixelstats sets keep theirs). A changed
    pipeline therefore gives a new embedding set: `embed` makes it anew, and readers refuse to mix it
    with the old one (api.Store._set: several weight sets)."""
    pid = pipeline.identity
    return f"{weights_identity};input={pid}" if pid else weights_identity


def split_identity(weights_id: str) -> tuple[str, str]:
    """weights_id -> (weights identity, input pipeline identity or '' when none is recorded)."""
    w, sep, pid = weights_id.partition(";input=")
    return w, pid


def stale_pipeline(name: str, weights_id: str) -> str | None:
    """Why an embedding set of backbone `name` was not made by its current input pipeline, or None."""
    want = get_spec(name).pipeline.identity
    have = split_identity(weights_id)[1]
    if have == want:
        return None
    return (f"{name} embeddings with weights_id {weights_id} were made by "
            f"{'an older input pipeline' if not have else 'input pipeline ' + have}; the current one is "
            f"{want or 'the original float path'}: re-embed (`featstore embed --backbone {name}`)")




def has_text_tower(spec) -> bool:
    """Whether the entry's checkpoint carries a text tower (the zero-shot head's)."""
    o = spec.options
    if spec.family == "open_clip":
        return True
    if spec.family == "hf":
        if "text_config" in o:
            return True
        return o.get("config_class", "").lower().startswith("siglip") or o.get("model_type") in HF_JOINT
    return False
