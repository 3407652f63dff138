"""Registries: one type for backbones' builders, preprocessings, protocols, selections and heads; and the
identities stored embeddings are keyed by, pinned to what the code gave before the registries were
rebuilt: a changed string here makes every user's stored set stale."""
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
    "medsiglip-448@mean": ("pil-uint8.v1.c38a580a", 448, 3, None),
    "siglip-base@mean": ("pil-uint8.v1.c38a580a", 224, 3, None),
    "dinov2-base@mean": ("pil-uint8.v1.e8b4b4e2", 224, 3, None),
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identity_strings_are_unchanged(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = B.get_spec(name)
    pid, size, channels, dim = IDENTITY[name]
    assert (s.pipeline.identity, s.input_size, s.channels, s.feature_dim) == (pid, size, channels, dim)
    assert B.with_pipeline("sha256:ab", s.pipeline) == (f"sha256:ab;input={pid}" if pid else "sha256:ab")
    assert B.stale_pipeline(name, B.with_pipeline("sha256:ab", s.pipeline)) is None


def test_dinov2_pooler_is_an_alias_of_cls():
    # HF's Dinov2 pooler output is the CLS token: `@pooler` names the entry's own (cls) set, not another
    for n in ("rad-dino", "dinov2-base"):
        assert B.canonical_name(f"{n}@pooler") == n and B.get_spec(f"{n}@pooler") is B.REGISTRY[n]


def test_config_hash_is_unchanged():
    assert B.config_hash({"b": [1, 2], "a": 1}) == "e6f20bdc"
    assert B.config_hash({"a": 1, "b": (1, 2)}) == "e6f20bdc"  # tuple or list, any key order: one name
    assert B.config_hash({"image_size": 56}) == "1f3a8058"


# --- the registry type --------------------------------------------------------------------------

def test_registry_registers_once_and_says_did_you_mean():
    from featstore.registry import Registry

    r = Registry("colour")
    assert r.register("red", 1) == 1

    @r.register("green")
    def green():
        return 2

    assert r.names() == ("red", "green") and r.entries() == (1, green) and list(r) == ["red", "green"]
    assert r.get("green") is green and "red" in r and len(r) == 2 and r.where(lambda e: e == 1) == ("red",)
    with pytest.raises(ValueError, match="colour 'red' is registered already"):
        r.register("red", 3)
    with pytest.raises(ValueError, match=r"^unknown colour 'gren' \(did you mean 'green'\?\); known: red, green$"):
        r.get("gren")
    assert r.get("blue", None) is None
    r.register("red", 4, replace=True)
    assert r["red"] == 4


def _registries():
    from featstore.heads import HEADS
    from featstore.preprocess import PIPELINE_KINDS, PREPROCESSINGS
    from featstore.split import PROTOCOLS, SELECTIONS

    return {"backbone": B.REGISTRY, "backbone family": B.BUILDERS, "input pipeline kind": PIPELINE_KINDS,
            "preprocessing": PREPROCESSINGS, "protocol": PROTOCOLS, "selection": SELECTIONS, "head": HEADS}


@pytest.mark.parametrize("kind", sorted(_registries()))
def test_every_registry_is_one_type_and_names_its_entries(kind):
    from featstore.registry import Registry

    r = _registries()[kind]
    assert isinstance(r, Registry) and r.kind == kind and len(r) > 0
    for name, entry in r.items():
        assert getattr(entry, "name", name) == name  # an entry that carries its name carries the one it is under
    with pytest.raises(ValueError, match=f"^unknown {kind} 'no-such-thing'"):
        r.get("no-such-thing")


# --- backbones: builders per family, the typed configuration ----------------------------------------

@pytest.mark.parametrize("name", list(B.REGISTRY))
def test_every_entry_has_its_family_builder(name):
    assert B.REGISTRY[name].family in B.BUILDERS


def test_every_foundation_family_is_built_through_the_backbone_builders():
    from featstore import foundation as F

    assert F.BUILDERS.names() == F.FAMILIES and set(F.FAMILIES) <= set(B.BUILDERS)


def test_a_new_family_is_one_builder_and_one_entry():
    from dataclasses import replace

    spec = replace(B.REGISTRY["pixelstats"], name="test-pixels", family="test-pixels")
    B.builder("test-pixels")(lambda s, req: B.BUILDERS["pixelstats"](replace(s, family="pixelstats"), req))
    try:
        B.register(spec)
        bb = B.create_backbone("test-pixels", device="cpu")
        assert bb.name == "test-pixels" and bb.weights_id == "none" and bb.feature_dim == 320
        with pytest.raises(ValueError, match="backbone 'test-pixels' is registered already"):
            B.register(spec)
    finally:
        B.REGISTRY.pop("test-pixels", None)
        B.BUILDERS.pop("test-pixels", None)
    with pytest.raises(ValueError, match=r"unknown backbone 'pixelstat' \(did you mean 'pixelstats'\?\); known: "):
        B.get_spec("pixelstat")


@pytest.mark.parametrize("change,problem", [
    (dict(kind="jpeg"), "unknown input pipeline kind 'jpeg'"),
    (dict(crop="middle"), "unknown crop 'middle'"),
    (dict(resample="lanczos"), "unknown resample 'lanczos'"),
    (dict(mean=(0.5, 0.5), std=(0.5, 0.5)), "give one value or 3"),
    (dict(std=(0.0,) * 3), "must be positive"),
    (dict(resize=0), "needs resize > 0"),
])
def test_a_pipeline_that_cannot_run_is_refused_when_the_entry_is_made(change, problem):
    from dataclasses import replace

    spec = B.REGISTRY["convnext-base"]
    with pytest.raises(ValueError, match=problem):
        replace(spec, pipeline=spec.pipeline._replace(**change))


# --- preprocessings: entries with their flags and options ------------------------------------------

def _preprocessings():
    from featstore.preprocess import PREPROCESSINGS

    return list(PREPROCESSINGS)


@pytest.mark.parametrize("name", _preprocessings())
def test_every_preprocessing_on_a_tiny_image(name):
    import numpy as np

    from featstore.preprocess import get_preprocess

    p = get_preprocess(name)
    assert p.name == name and p.description
    x = np.random.default_rng(0).random((37, 29), dtype=np.float32)
    mask = np.zeros((37, 29), bool)
    mask[8:30, 5:25] = True
    out = p(x, mask) if p.needs_mask else p(x)
    assert out.ndim == 2 and out.dtype == np.float32 and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1  # still decode's [0, 1] contract
    with pytest.raises(ValueError, match="needs the image's lung mask" if p.needs_mask else "takes no lung mask"):
        p(x) if p.needs_mask else p(x, mask)


def test_preprocessing_flags_and_options():
    from featstore.lungs import VARIANTS
    from featstore.preprocess import PREPROCESSINGS, get_preprocess

    assert PREPROCESSINGS.where(lambda p: p.needs_mask) == tuple(VARIANTS)
    assert get_preprocess("clahe").options == {"clip_limit": 0.01} and get_preprocess("histeq").options == {"nbins": 256}
    with pytest.raises(ValueError, match=r"unknown preprocessing 'clahee' \(did you mean 'clahe'\?\)"):
        get_preprocess("clahee")


# --- protocols: entries with their options schema ----------------------------------------------

def test_every_protocol_section_of_the_study_schema_is_the_entrys_own():
    from featstore.split import PROTOCOLS
    from featstore.sweep.config import Protocols

    fields = {(f.alias or n): f for n, f in Protocols.model_fields.items()}
    assert list(fields) == list(PROTOCOLS)
    for name, p in PROTOCOLS.items():
        assert p.options in fields[name].annotation.__args__ and p.description


def test_make_folds_checks_options_against_the_protocols_schema():
    from featstore.split import make_folds, make_meta

    m = make_meta(["a"] * 4 + ["b"] * 4, [0, 1] * 4)
    with pytest.raises(ValueError, match=r"^protocol 'mixed': fold: Extra inputs are not permitted$"):
        make_folds(m, "mixed", fold=2)
    with pytest.raises(ValueError, match=r"^protocol 'seen-unseen': train_sources: Field required$"):
        make_folds(m, "seen-unseen")
    with pytest.raises(ValueError, match=r"^unknown protocol 'kfold'; known: mixed, loso"):
        make_folds(m, "kfold")
