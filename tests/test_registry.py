"""Registries: one type for backbones' builders, preprocessings, protocols, selections and heads; and the
identities stored embeddings are keyed by, pinned to what the code gave before the registries were
rebuilt (issue 15): a changed string here makes every user's stored set stale."""
import pytest

from featstore import backbones as B

# name -> (input pipeline identity, input size, channels, feature dim), as computed by the code of cce6fbe
IDENTITY = {
    "xrv-densenet121-res224-all": ("xrv.v1.4e8737a0", 224, 1, 1024),
    "xrv-densenet121-res224-nih": ("xrv.v1.4e8737a0", 224, 1, 1024),
    "xrv-densenet121-res224-pc": ("xrv.v1.4e8737a0", 224, 1, 1024),
    "xrv-densenet121-res224-chex": ("xrv.v1.4e8737a0", 224, 1, 1024),
    "xrv-densenet121-res224-rsna": ("xrv.v1.4e8737a0", 224, 1, 1024),
    "xrv-densenet121-res224-mimic_nb": ("xrv.v1.4e8737a0", 224, 1, 1024),
    "xrv-densenet121-res224-mimic_ch": ("xrv.v1.4e8737a0", 224, 1, 1024),
    "xrv-resnet50-res512-all": ("xrv.v1.4e8737a0", 512, 1, 2048),
    "tv-densenet121-imagenet": ("torchvision.v1.4d3d7272", 224, 3, 1024),
    "tv-resnet50-imagenet": ("torchvision.v1.1c8ab229", 224, 3, 2048),
    "mobilenetv3-nih-onnx": ("pil-uint8.v1.0c596330", 224, 1, 576),
    "onnx": ("pil-uint8.v1.0c596330", 224, 1, None),
    "pixelstats": ("", 256, 1, 320),
    "rad-dino": ("pil-uint8.v1.9e686f2e", 518, 3, 768),
    "medsiglip-448": ("pil-uint8.v1.c38a580a", 448, 3, 1152),
    "siglip-base": ("pil-uint8.v1.c38a580a", 224, 3, 768),
    "dinov2-base": ("pil-uint8.v1.e8b4b4e2", 224, 3, 768),
    "biomedclip": ("pil-uint8.v1.75a33d1b", 224, 3, 512),
    "chexzero": ("pil-uint8.v1.8c37630c", 224, 3, 512),
    "convnext-base": ("pil-uint8.v1.6d3eae6b", 224, 3, 1024),
    "rad-dino@mean": ("pil-uint8.v1.9e686f2e", 518, 3, None),
    "rad-dino@pooler": ("pil-uint8.v1.9e686f2e", 518, 3, None),
    "medsiglip-448@mean": ("pil-uint8.v1.c38a580a", 448, 3, None),
    "siglip-base@mean": ("pil-uint8.v1.c38a580a", 224, 3, None),
    "dinov2-base@mean": ("pil-uint8.v1.e8b4b4e2", 224, 3, None),
    "dinov2-base@pooler": ("pil-uint8.v1.e8b4b4e2", 224, 3, None),
    "convnext-base@mean": ("pil-uint8.v1.6d3eae6b", 224, 3, None),
    "timm:convnext_atto": ("pil-uint8.v1.6d3eae6b", 224, 3, None),
    "open_clip:ViT-B-16": ("pil-uint8.v1.75a33d1b", 224, 3, 512),
}


def _every_name():
    """Every registered entry, every other pooling of a foundation entry (its own set), two generic names."""
    out = list(B.REGISTRY)
    for n in B.REGISTRY:
        if B.REGISTRY[n].options.get("poolings"):
            default, valid = B.poolings(n)
            out += [f"{n}@{p}" for p in valid if p != default]
    return out + ["timm:convnext_atto", "open_clip:ViT-B-16"]


def test_every_entry_is_pinned():
    # a new entry gets its line above (its first identity); an old one never changes its line
    assert sorted(_every_name()) == sorted(IDENTITY)


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identity_strings_are_unchanged(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = B.get_spec(name)
    pid, size, channels, dim = IDENTITY[name]
    assert (s.pipeline.identity, s.input_size, s.channels, s.feature_dim) == (pid, size, channels, dim)
    assert B.with_pipeline("sha256:ab", s.pipeline) == (f"sha256:ab;input={pid}" if pid else "sha256:ab")
    assert B.stale_pipeline(name, B.with_pipeline("sha256:ab", s.pipeline)) is None


def test_config_hash_is_unchanged():
    assert B.config_hash({"b": [1, 2], "a": 1}) == "e6f20bdc"
    assert B.config_hash({"a": 1, "b": (1, 2)}) == "e6f20bdc"  # tuple or list, any key order: one name
    assert B.config_hash({"image_size": 56}) == "1f3a8058"
