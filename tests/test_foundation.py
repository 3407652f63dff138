"""Frozen foundation-model backbones: hf, timm and open_clip families, offline.

Tiny random configurations (config_overrides) keep the suite fast on 2 cores; full-size entries are
checked for their declared dimension and input size from the configuration alone. Parity bounds
(max |difference| of the input tensor, after mean/std) against each library's own processor:
  timm resolve_data_config + create_transform, open_clip image_transform   exactly equal
  Hugging Face BitImageProcessor / SiglipImageProcessor                     <= 4 grey levels / std (2 on real X-rays)
  (HF resizes in float, featstore in uint8 as PIL does: one rounding apart)
"""
import csv

import numpy as np
import pytest
import torch

from featstore.backbones import REGISTRY, create_backbone, get_spec
from featstore.foundation import state_identity
from featstore.weights import WeightsMissingError

from conftest import CHEXZERO_TINY, CXR, needs_cxr, tiny_siglip_snapshot

FOUNDATION = [n for n, s in REGISTRY.items() if s.family in ("hf", "timm", "open_clip")]
_T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56)
TINY = {
    "rad-dino": _T, "dinov2-base": _T, "siglip-base": dict(_T, patch_size=14), "medsiglip-448": _T,
    "convnext-base": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
    "biomedclip": dict(timm_model_name="vit_tiny_patch16_224"),
    "chexzero": dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
}


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_named_entry_is_tiny_testable_and_listed():
    assert set(TINY) == set(FOUNDATION)
    for n in FOUNDATION:
        s = get_spec(n)
        assert s.licence and s.feature_dim and s.input_size and s.channels == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUNDATION)
def test_full_size_configuration_declares_dim_and_input_size(name):
    """From the configuration alone (meta device: no weights allocated, no forward pass)."""
    import transformers

    s = get_spec(name)
    o = s.options
    if s.family == "hf":
        cfg = getattr(transformers, o["config_class"])(**o["config"])
        assert cfg.hidden_size == s.feature_dim
        if o["pooling"] != "cls" or name != "dinov2-base":  # DINOv2 runs at 224 with interpolated positions
            assert cfg.image_size == s.input_size
    elif s.family == "timm":
        import timm

        with torch.device("meta"):
            m = timm.create_model(o["arch"], pretrained=False, num_classes=0)
        assert m.num_features == s.feature_dim and m.pretrained_cfg["input_size"][-1] == s.input_size
    else:
        assert o["model_cfg"]["embed_dim"] == s.feature_dim
        assert o["model_cfg"]["vision_cfg"]["image_size"] == s.input_size
    expected = {"rad-dino": (768, 518), "medsiglip-448": (1152, 448), "biomedclip": (512, 224), "chexzero": (512, 224),
                "dinov2-base": (768, 224), "siglip-base": (768, 224), "convnext-base": (1024, 224)}
    assert (s.feature_dim, s.input_size) == expected[name]


# weights_id of the tiny builds, as the code of cce6fbe gave them: identity strings never change
TINY_ID = {
    "rad-dino": "random-init:seed0;pool=cls;config=f444805a;input=pil-uint8.v1.2336963b",
    "dinov2-base": "random-init:seed0;pool=cls;config=f444805a;input=pil-uint8.v1.b39b9836",
    "siglip-base": "random-init:seed0;pool=pooler;config=70bad8cc;input=pil-uint8.v1.c38a580a",
    "medsiglip-448": "random-init:seed0;pool=pooler;config=f444805a;input=pil-uint8.v1.c38a580a",
    "convnext-base": "random-init:seed0;pool=pooler;config=98b6ed46;input=pil-uint8.v1.6d3eae6b",
    "biomedclip": "random-init:seed0;pool=pooler;config=8ed280fa;input=pil-uint8.v1.75a33d1b",
    "chexzero": "random-init:seed0;pool=pooler;config=b4a534c8;input=pil-uint8.v1.be5b6010",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUNDATION)
def test_tiny_random_forward(name):
    bb = create_backbone(name, weights="random-init", config_overrides=TINY[name], device="cpu")
    s = bb.spec
    x = torch.rand(3, 3, s.input_size, s.input_size)
    out = bb(x)
    assert out.shape == (3, bb.feature_dim) and np.isfinite(out).all()
    np.testing.assert_allclose(bb(x[:1]), out[:1], rtol=1e-4, atol=1e-5)  # eval mode: batch-independent
    # seeded, and the changed configuration is part of the identity: never the full-size entry's set
    again = create_backbone(name, weights="random-init", config_overrides=TINY[name], device="cpu")
    np.testing.assert_array_equal(again(x), out)
    assert ";config=" in bb.weights_id and f";pool={s.options['pooling']};" in bb.weights_id
    assert bb.weights_id == TINY_ID[name]


def test_pooling_is_its_own_entry_and_identity():
    a = create_backbone("rad-dino", weights="random-init", config_overrides=_T)
    b = create_backbone("rad-dino@mean", weights="random-init", config_overrides=_T)
    assert a.name != b.name and ";pool=cls;" in a.weights_id and ";pool=mean;" in b.weights_id
    assert b.weights_id == "random-init:seed0;pool=mean;config=f444805a;input=pil-uint8.v1.2336963b"  # as in cce6fbe
    x = torch.rand(2, 3, 56, 56)
    assert not np.allclose(a(x), b(x))
    # the CLS token is what the model computes; mean pools the patch tokens only
    with torch.no_grad():
        h = a.module.model(pixel_values=x).last_hidden_state
    np.testing.assert_allclose(a(x), h[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b(x), h[:, 1:].mean(1).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        get_spec("rad-dino@max")
    with pytest.raises(ValueError, match="only foundation-model"):
        get_spec("pixelstats@mean")
    # a generic timm CNN learns it has no tokens only when built
    with pytest.raises(ValueError, match="no tokens"):
        create_backbone("timm:convnext_atto@cls", weights="random-init", config_overrides=TINY["convnext-base"])(
            torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("name,pooling,valid", [("convnext-base", "cls", "pooler, mean"),
                                                ("siglip-base", "cls", "pooler, mean"),
                                                ("biomedclip", "mean", "pooler"), ("chexzero", "cls", "pooler"),
                                                ("open_clip:ViT-B-32", "mean", "pooler")])
def test_a_pooling_the_family_lacks_fails_in_one_line_naming_the_valid_ones(name, pooling, valid):
    for call in (lambda: get_spec(f"{name}@{pooling}"),
                 lambda: create_backbone(name, weights="random-init", pooling=pooling)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"pooling '{pooling}' is not available" in msg and f"(valid for {name}: {valid})" in msg


def test_pooling_option_is_the_suffix_and_one_pooling_is_one_set():
    """--pooling / pooling= names the same set as the `@` suffix; an entry's default pooling is the entry
    itself, however spelled; a conflicting suffix and option are refused."""
    from featstore.backbones import canonical_name

    assert canonical_name("rad-dino", "mean") == canonical_name("rad-dino@mean") == "rad-dino@mean"
    assert canonical_name("rad-dino", "cls") == canonical_name("rad-dino@cls") == "rad-dino"
    assert canonical_name("timm:vit_tiny_patch16_224", "cls") == "timm:vit_tiny_patch16_224@cls"
    assert canonical_name("hf:someone/model", "cls") == "hf:someone/model"  # generic hf: CLS by default
    a = create_backbone("rad-dino", weights="random-init", config_overrides=_T, pooling="mean")
    b = create_backbone("rad-dino@mean", weights="random-init", config_overrides=_T)
    c = create_backbone("rad-dino@cls", weights="random-init", config_overrides=_T)
    assert a.name == b.name == "rad-dino@mean" and a.weights_id == b.weights_id and ";pool=mean;" in a.weights_id
    assert c.name == "rad-dino" and ";pool=cls;" in c.weights_id
    x = torch.rand(2, 3, 56, 56)
    np.testing.assert_array_equal(a(x), b(x))
    with pytest.raises(ValueError, match="names pooling 'cls' and --pooling 'mean': give one"):
        create_backbone("rad-dino@cls", weights="random-init", pooling="mean")
    with pytest.raises(ValueError, match="give a pooling after @"):
        get_spec("rad-dino@")


@pytest.mark.parametrize("name,overrides", [("timm:vit_tiny_patch16_224", dict(depth=2, img_size=32)),
                                            ("open_clip:ViT-B-16", dict(layers=2, width=32, head_width=16,
                                                                         patch_size=8, image_size=32))])
def test_generic_entries(name, overrides):
    s = get_spec(name)
    assert s.family == name.split(":")[0] and s.licence
    bb = create_backbone(name, weights="random-init", config_overrides=overrides)
    out = bb(torch.rand(2, 3, bb.spec.input_size, bb.spec.input_size))
    assert out.shape == (2, bb.feature_dim)


def test_generic_hf_offline_without_a_processor_says_what_is_needed(monkeypatch):
    monkeypatch.setenv("FEATSTORE_OFFLINE", "1")  # tests never touch the network (and hub retries take minutes)
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        get_spec("hf:someone/no-such-model")


# --- weights: local folders and files, identity, messages ----------------------------------------

def test_hf_snapshot_folder_offline(tmp_path):
    """A Hugging Face snapshot in <weights-dir>/<org>--<name>; identity = the hash of its tensors."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    ref = Dinov2Model(Dinov2Config(**_T)).eval()
    folder = tmp_path / "microsoft--rad-dino"
    ref.save_pretrained(folder)
    bb = create_backbone("rad-dino", weights_dir=tmp_path)
    from safetensors.torch import load_file

    # the tensors as saved (transformers 5 saves Dinov2's attention under its published key names)
    assert bb.weights_id.startswith(f"{state_identity(load_file(folder / 'model.safetensors'))};pool=cls;input=")
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(bb(x), want, rtol=1e-4, atol=1e-5)


def test_siglip_full_model_snapshot_loads_its_vision_tower(tmp_path):
    """MedSigLIP's repository holds the whole SigLIP (text + image); only the image tower is loaded."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(2)
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ref = SiglipModel(SiglipConfig(text_config=dict(tiny, vocab_size=99), vision_config=dict(tiny, image_size=56,
                                                                                            patch_size=14))).eval()
    ref.save_pretrained(tmp_path / "google--medsiglip-448")
    bb = create_backbone("medsiglip-448", weights_dir=tmp_path)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=x).pooler_output.numpy()
    np.testing.assert_allclose(bb(x), want, rtol=1e-4, atol=1e-5)


def test_timm_and_open_clip_files_offline(tmp_path):
    import safetensors.torch
    import timm

    torch.manual_seed(3)
    ref = timm.create_model("convnext_base", pretrained=False, num_classes=0, **TINY["convnext-base"]).eval()
    d = tmp_path / "timm--convnext_base.fb_in22k_ft_in1k"
    d.mkdir()
    safetensors.torch.save_file(ref.state_dict(), d / "model.safetensors")
    bb = create_backbone("convnext-base", weights_dir=tmp_path, config_overrides=TINY["convnext-base"])
    assert bb.weights_id.startswith(f"{state_identity(ref.state_dict())};pool=pooler")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(bb(x), ref(x).numpy(), rtol=1e-4, atol=1e-5)

    # CheXzero: an OpenAI-CLIP state dict (visual.* keys) given as --weights PATH
    o = TINY["chexzero"]
    donor = create_backbone("chexzero", weights="random-init", config_overrides=o, seed=5)
    ckpt = tmp_path / "best_64_5e-05_original_22000_0.864.pt"
    sd = {f"visual.{k}": v for k, v in donor.module.visual.state_dict().items()} | {"logit_scale": torch.ones(())}
    torch.save(sd, ckpt)
    bb = create_backbone("chexzero", weights=str(ckpt), config_overrides=o)
    assert bb.weights_id.startswith(f"{state_identity(sd)};pool=pooler")
    x = torch.rand(2, 3, 32, 32)
    np.testing.assert_allclose(bb(x), donor(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,repo,files", [
    ("rad-dino", "microsoft/rad-dino", "config.json"),
    ("medsiglip-448", "google/medsiglip-448", "*.safetensors"),
    ("convnext-base", "timm/convnext_base.fb_in22k_ft_in1k", "model.safetensors"),
    ("biomedclip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip_pytorch_model.bin")])
def test_missing_weights_name_files_repo_and_place(name, repo, files, tmp_path):
    with pytest.raises(WeightsMissingError) as e:
        create_backbone(name, weights_dir=tmp_path)
    msg = str(e.value)
    assert repo in msg and files in msg and f"{tmp_path}/{repo.replace('/', '--')}" in msg and "offline" in msg


def test_chexzero_without_a_file_says_to_give_one(tmp_path):
    with pytest.raises(WeightsMissingError, match="--weights PATH"):
        create_backbone("chexzero", weights_dir=tmp_path)


# --- each model fed as its own processor feeds it ------------------------------------------------

def _refs():
    import open_clip
    import timm
    from timm.data import create_transform, resolve_data_config
    from transformers import BitImageProcessor, SiglipImageProcessor

    def hf(p):
        return lambda im: p(im, return_tensors="pt")["pixel_values"][0].numpy()

    # the processors' published preprocessor_config.json values (model cards), built offline
    bit = dict(resample=3, do_convert_rgb=True)
    tt = create_transform(**resolve_data_config(model=timm.create_model("convnext_base", pretrained=False)))
    return {
        "rad-dino": (hf(BitImageProcessor(size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518},
                                          image_mean=[0.5307] * 3, image_std=[0.2583] * 3, **bit)), 4 / 255 / 0.2583),
        "dinov2-base": (hf(BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                             **bit)), 4 / 255 / 0.224),
        "siglip-base": (hf(SiglipImageProcessor()), 4 / 255 / 0.5),
        "medsiglip-448": (hf(SiglipImageProcessor(size={"height": 448, "width": 448})), 4 / 255 / 0.5),
        "convnext-base": (lambda im: tt(im).numpy(), 0.0),
        "biomedclip": (lambda im: open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                                            std=open_clip.OPENAI_DATASET_STD)(im).numpy(), 0.0),
    }


def _check(images):
    from PIL import Image

    from featstore.preprocess import to_input, to_uint8

    worst = {}
    for name, (ref, tol) in _refs().items():
        s = get_spec(name)
        for x in images:
            im = Image.fromarray(to_uint8(x)).convert("RGB")
            got, want = to_input(x, s.input_size, s.channels, s.pipeline), ref(im)
            assert got.shape == want.shape
            worst[name] = max(worst.get(name, 0.0), float(np.abs(got - want).max()))
        assert worst[name] <= tol + 1e-6, (name, worst[name])
    return worst


@pytest.mark.slow
def test_parity_synthetic_odd_shapes():
    rng = np.random.default_rng(0)
    imgs = []
    for shape in [(301, 257), (277, 375), (600, 601), (97, 403)]:  # odd / even offsets, up- and down-sizing
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        u8 = np.clip(127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 20, shape), 0, 255)
        imgs.append(u8.astype(np.uint8).astype(np.float32) / 255.0)
    _check(imgs)


@pytest.mark.slow
@needs_cxr
def test_parity_on_real_images():
    from featstore.decode import decode_file

    rows = list(csv.DictReader(open(CXR / "manifest.csv")))
    paths = [CXR / r["path"] for r in rows[::len(rows) // 8][:8]]
    _check([decode_file(p, draft=518).pixels for p in paths])


def test_chexzero_pipeline_is_its_published_normalisation():
    p = get_spec("chexzero").pipeline
    # CheXzero zero_shot.py: Normalize((101.48761,) * 3, (83.43944,) * 3) on 0..255 pixels
    assert np.allclose(np.array(p.mean) * 255, 101.48761) and np.allclose(np.array(p.std) * 255, 83.43944)


# --- embed, store, re-embed nothing ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["rad-dino", "convnext-base", "chexzero"])
def test_embed_stores_and_resumes(name, ingested, monkeypatch):
    from featstore.embed import embed

    con, _ = ingested
    bb = create_backbone(name, weights="random-init", config_overrides=TINY[name])
    rep = embed(con, bb, workers=0, limit=4)
    assert rep.n_embedded == 4 and not rep.failed
    assert embed(con, bb, workers=0, limit=4).n_embedded == 4  # the next 4: the first ones are not redone
    rows = con.execute("SELECT count(*), count(DISTINCT weights_id) FROM embeddings WHERE backbone = ?",
                       [name]).fetchone()
    assert rows == (8, 1)
    if name == "rad-dino":  # another pooling: another set, beside the first
        other = create_backbone("rad-dino@mean", weights="random-init", config_overrides=_T)
        assert embed(con, other, workers=0, limit=4).n_embedded == 4
        assert con.execute("SELECT count(DISTINCT backbone) FROM embeddings WHERE backbone LIKE 'rad-dino%'"
                           ).fetchone()[0] == 2


@pytest.mark.slow
def test_cli_lists_licences_and_embeds_random_init(tmp_path, synth_manifest):
    from typer.testing import CliRunner

    from featstore.cli import app

    r = CliRunner().invoke(app, ["backbones"])
    assert r.exit_code == 0, r.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in r.output.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()}
    for n in FOUNDATION:  # name, input, ch, dim, pooling, zero-shot, weights, licence (first line of its cell)
        s = get_spec(n)
        name, size, ch, dim, pool, zs, _, lic = rows[n][:8]
        assert (size, dim) == (str(s.input_size), str(s.feature_dim)) and pool.startswith(s.options["pooling"])
        assert lic and lic != "-" and (zs == "text tower") == (n in ("siglip-base", "medsiglip-448", "biomedclip",
                                                                     "chexzero"))
    assert "MSRLA" in r.output and "gated" in r.output

    # --pooling names the set as the @ suffix does; recorded in every row's weights_id
    db = tmp_path / "fs.duckdb"
    r = CliRunner().invoke(app, ["ingest", "--manifest", str(synth_manifest), "--workers", "1", "--db", str(db)])
    assert r.exit_code in (0, 1), r.output  # 1: the manifest's planted bad files
    r = CliRunner().invoke(app, ["embed", "--backbone", "dinov2-base", "--pooling", "mean", "--weights", "random-init",
                                 "--limit", "2", "--workers", "0", "--db", str(db)])
    assert r.exit_code == 0, r.output
    from featstore.store import connect

    con = connect(db)  # as the CLI opened it (DuckDB refuses another configuration in one process)
    got = con.execute("SELECT backbone, weights_id FROM embeddings").fetchall()
    con.close()
    assert len(got) == 2 and all(b == "dinov2-base@mean" and ";pool=mean;" in w for b, w in got)
    for args, msg in ((["--backbone", "biomedclip", "--pooling", "cls"], "valid for biomedclip: pooler"),
                      (["--backbone", "rad-dino@max"], "unknown pooling 'max'"),
                      (["--backbone", "rad-din@mean"], "did you mean 'rad-dino'")):
        r = CliRunner().invoke(app, ["embed", *args, "--weights", "random-init", "--db", str(db)])
        assert r.exit_code == 2 and msg in " ".join(r.output.replace("│", " ").split()), r.output


# --- zero-shot: the text tower of the weights an embedding set was made with --------------------------

PROMPTS = {"covid": ["COVID-19 pneumonia", "viral pneumonia"], "normal": ["normal chest x-ray"]}


def _head(tower, X, prompts=PROMPTS, key_class=None):
    from featstore.heads import ZeroShotHead
    from featstore.zeroshot import class_texts

    ct = class_texts(tower, prompts, key_class or {"covid": 1, "normal": 0})
    return ZeroShotHead(**ct.as_head_inputs(), n_classes=2).fit(X, np.arange(len(X)) % 2), ct


def test_zeroshot_open_clip_random_init_is_the_models_own_zero_shot():
    """Random-init open_clip: the text tower comes from the set's seed and configuration; the whole CLIP
    built from them has the stored image embeddings as its encode_image, and the head's probabilities are
    the model's own zero-shot softmax (prompt ensembling: mean of normalised prompt embeddings)."""
    import torch.nn.functional as Fn
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    from featstore import foundation as F
    from featstore.zeroshot import text_tower

    bb = create_backbone("chexzero", weights="random-init", config_overrides=CHEXZERO_TINY, seed=3)
    x = torch.rand(5, 3, 32, 32)
    X = bb(x)
    head, ct = _head(text_tower("chexzero", bb.weights_id, config_overrides=CHEXZERO_TINY), X)
    P = head.predict_proba(X)
    cfg = F.open_clip_config(get_spec("chexzero"), None, CHEXZERO_TINY)
    torch.manual_seed(3)
    clip = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                quick_gelu=True).eval()
    tok = SimpleTokenizer(context_length=77)
    with torch.no_grad():
        np.testing.assert_allclose(clip.encode_image(x).numpy(), X, rtol=1e-5, atol=1e-6)  # the same weights
        img = clip.encode_image(x, normalize=True).double()
        cls = [Fn.normalize(clip.encode_text(tok(PROMPTS[k]), normalize=True).mean(0), dim=0) for k in ("normal", "covid")]
        want = torch.softmax(clip.logit_scale.exp() * img @ torch.stack(cls).double().T, dim=1).numpy()
    assert P.shape == (5, 2) and np.allclose(P.sum(1), 1)
    np.testing.assert_allclose(P, want, rtol=1e-5, atol=1e-6)
    again, ct2 = _head(text_tower("chexzero", bb.weights_id, config_overrides=CHEXZERO_TINY), X)
    np.testing.assert_array_equal(again.predict_proba(X), P)  # deterministic, to the bit
    assert ct2.identity == ct.identity


def test_zeroshot_open_clip_checkpoint_by_identity(tmp_path):
    """A whole-model checkpoint in --weights-dir: found again by the set's tensor hash, its text tower loaded;
    a checkpoint with the image tower only, or other weights under the same name, are refused."""
    from open_clip.model import CLIP

    from featstore import foundation as F
    from featstore.zeroshot import ZeroShotError, text_tower

    cfg = F.open_clip_config(get_spec("chexzero"), None, CHEXZERO_TINY)
    torch.manual_seed(7)
    clip = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                quick_gelu=True).eval()
    name = "best_64_5e-05_original_22000_0.864.pt"
    torch.save(clip.state_dict(), tmp_path / name)
    bb = create_backbone("chexzero", weights_dir=tmp_path, config_overrides=CHEXZERO_TINY)
    assert bb.weights_id.startswith(f"{state_identity(clip.state_dict())};pool=pooler;config=")
    x = torch.rand(3, 3, 32, 32)
    X = bb(x)
    head, _ = _head(text_tower("chexzero", bb.weights_id, tmp_path, CHEXZERO_TINY), X, {"normal": ["normal chest x-ray"],
                                                                                         "covid": ["covid pneumonia"]})
    from open_clip.tokenizer import SimpleTokenizer

    with torch.no_grad():
        logits, _ = clip.get_logits(x, SimpleTokenizer()(["normal chest x-ray", "covid pneumonia"]))
    np.testing.assert_allclose(head.predict_proba(X), torch.softmax(logits.double(), 1).numpy(), rtol=1e-5, atol=1e-6)

    other = tmp_path / "other"
    other.mkdir()
    torch.save({k: v for k, v in clip.state_dict().items() if k.startswith("visual.") or k == "logit_scale"},
               other / name)
    with pytest.raises(ZeroShotError, match=r"are not those chexzero embeddings were made with"):
        text_tower("chexzero", bb.weights_id, other, CHEXZERO_TINY)
    visual_only = create_backbone("chexzero", weights_dir=other, config_overrides=CHEXZERO_TINY)
    with pytest.raises(ZeroShotError, match="holds no text tower"):
        text_tower("chexzero", visual_only.weights_id, other, CHEXZERO_TINY)


def test_zeroshot_hf_siglip_snapshot_matches_transformers(tmp_path):
    """SigLIP (a whole-model snapshot, text and image): the stored `pooler` embedding is get_image_features;
    the head's probabilities are the softmax of SiglipModel's own logits_per_image (its bias cancels)."""
    from featstore.zeroshot import ZeroShotError, text_tower

    folder, model, tok = tiny_siglip_snapshot(tmp_path)
    bb = create_backbone("siglip-base", weights_dir=tmp_path)
    x = torch.rand(3, 3, 224, 224)
    X = bb(x)
    texts = {"normal": ["normal chest x-ray"], "covid": ["covid-19 pneumonia"]}
    head, _ = _head(text_tower("siglip-base", bb.weights_id, tmp_path), X, texts)
    t = tok(["normal chest x-ray", "covid-19 pneumonia"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], pixel_values=x)
        np.testing.assert_allclose(model.get_image_features(pixel_values=x).pooler_output.numpy(), X,
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.predict_proba(X), torch.softmax(out.logits_per_image.double(), 1).numpy(),
                               rtol=1e-5, atol=1e-6)
    # other weights in the folder the set names: refused, not silently used
    other = tmp_path / "other"
    tiny_siglip_snapshot(other, seed=1)
    with pytest.raises(ZeroShotError, match="are not those siglip-base embeddings were made with"):
        text_tower("siglip-base", bb.weights_id, other)


@pytest.mark.parametrize("name,pool,message", [
    ("siglip-base@mean", "mean", "stores pooling 'mean', not the projected image features"),
    ("rad-dino", "cls", "without a text side"),
    ("convnext-base", "pooler", r"convnext-base \(timm\) has no text tower"),
    ("pixelstats", None, r"pixelstats \(pixelstats\) has no text tower")])
def test_zeroshot_refuses_sets_outside_the_joint_space(name, pool, message):
    from featstore.zeroshot import ZeroShotError, text_tower

    wid = f"random-init:seed0{f';pool={pool}' if pool else ''};input=x"
    with pytest.raises(ZeroShotError, match=message) as e:
        text_tower(name, wid)
    assert "\n" not in str(e.value)


def test_zeroshot_needs_the_configuration_the_set_was_made_with():
    from featstore.zeroshot import ZeroShotError, text_tower

    wid = create_backbone("chexzero", weights="random-init", config_overrides=CHEXZERO_TINY).weights_id
    with pytest.raises(ZeroShotError, match="changed model configuration"):
        text_tower("chexzero", wid)
    with pytest.raises(ZeroShotError, match="are not the configuration"):
        text_tower("chexzero", wid, config_overrides=dict(CHEXZERO_TINY, layers=3))


def test_zeroshot_generic_hf_siglip(tmp_path, monkeypatch):
    """hf:<repo> of a SigLIP snapshot: no CLS token, and its `pooler` set is in the joint space."""
    from transformers import SiglipImageProcessor

    from featstore.zeroshot import text_tower

    folder, model, tok = tiny_siglip_snapshot(tmp_path, repo="someone/tiny-siglip")
    SiglipImageProcessor().save_pretrained(folder)
    monkeypatch.setenv("FEATSTORE_WEIGHTS_DIR", str(tmp_path))
    assert get_spec("hf:someone/tiny-siglip").options["model_type"] == "siglip"
    # no CLS token: the model's own pooler is the default, and `@pooler` names that same set
    bb = create_backbone("hf:someone/tiny-siglip")
    assert bb.name == create_backbone("hf:someone/tiny-siglip", pooling="pooler").name == "hf:someone/tiny-siglip"
    assert ";pool=pooler;" in bb.weights_id
    with pytest.raises(ValueError, match="pooling 'cls' is not available"):
        create_backbone("hf:someone/tiny-siglip@cls")
    x = torch.rand(2, 3, 224, 224)
    head, _ = _head(text_tower(bb.name, bb.weights_id), bb(x), {"normal": ["normal"], "covid": ["covid pneumonia"]})
    t = tok(["normal", "covid pneumonia"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        want = torch.softmax(model(input_ids=t["input_ids"], pixel_values=x).logits_per_image.double(), 1).numpy()
    np.testing.assert_allclose(head.predict_proba(bb(x)), want, rtol=1e-5, atol=1e-6)
