"""Foundation weights as users have them, and only the weights an entry says (issue: the right model or
a clear refusal). Tiny random models built with the real transformers / timm / open_clip classes, saved
in their own formats and laid out as a --weights-dir snapshot (<org>--<name>/), a git clone (<name>/,
with or without git-lfs), a Hugging Face hub cache (models--<org>--<name>/snapshots/<rev>/, checked with
huggingface_hub's own scan_cache_dir) and single files. No network: HF_HUB_OFFLINE and FEATSTORE_OFFLINE
are set throughout, HF_HUB_CACHE points at an empty folder unless a test fills one."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from featstore.backbones import canonical_name, create_backbone, get_spec
from featstore.foundation import WeightsError, state_identity
from featstore.weights import WeightsMissingError

from conftest import CHEXZERO_TINY, tiny_siglip_snapshot

_T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56)
CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
TIMM_REPO = "timm/convnext_base.fb_in22k_ft_in1k"
CHEXZERO_FILE = "best_64_5e-05_original_22000_0.864.pt"
REV = "0123456789abcdef0123456789abcdef01234567"
LFS = ("version https://git-lfs.github.com/spec/v1\n"
       "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 346345912\n")


@pytest.fixture(autouse=True)
def _isolated_hub(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub-cache")))
    monkeypatch.delenv("HF_HOME", raising=False)


def dinov2_snapshot(folder, seed=1, **cfg):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**dict(_T, **cfg))).eval()
    model.save_pretrained(folder)
    return model


def convnext_file(path, seed=3, num_classes=0, **cfg):
    import safetensors.torch
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("convnext_base", pretrained=False, num_classes=num_classes, **dict(CONVNEXT, **cfg)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(model.state_dict(), path)
    return model


def chexzero_file(path, seed=5):
    donor = create_backbone("chexzero", weights="random-init", config_overrides=CHEXZERO_TINY, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"visual.{k}": v for k, v in donor.module.visual.state_dict().items()} | {"logit_scale": torch.ones(())},
               path)
    return donor


def hub_cache(cache, repo, src, rev=REV):
    """`src`'s files as huggingface_hub lays a download out: blobs by hash, snapshots/<rev>/ links, refs/main."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(rev)
    from huggingface_hub import scan_cache_dir

    seen = {(r.repo_id, rv.commit_hash) for r in scan_cache_dir(cache).repos for rv in r.revisions}
    assert (repo, rev) in seen  # the library itself reads it as a cache of this repository at this revision
    return snap


def git_clone(folder, sha="fedcba9876543210fedcba9876543210fedcba98"):
    (folder / ".git" / "refs" / "heads").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    return sha


def _cls(model, x):
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, 0].numpy()


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- 1. timm: a checkpoint of another model is refused, not loaded as nothing ---------------------------

def test_timm_refuses_a_checkpoint_of_another_model(tmp_path):
    import safetensors.torch
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=32)
    (tmp_path / "vit").mkdir()
    safetensors.torch.save_file(vit.state_dict(), tmp_path / "vit" / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        create_backbone("convnext-base", weights=str(tmp_path / "vit" / "model.safetensors"), config_overrides=CONVNEXT)
    msg = _one_line(e)
    assert str(tmp_path / "vit" / "model.safetensors") in msg and "convnext-base" in msg and "missing" in msg
    # the same architecture at another width: every tensor named, none of the right shape
    convnext_file(tmp_path / "wide" / "model.safetensors", dims=(16, 32, 64, 128))
    with pytest.raises(WeightsError, match="of another shape"):
        create_backbone("convnext-base", weights=str(tmp_path / "wide" / "model.safetensors"), config_overrides=CONVNEXT)
    # a truncated download, a stray file that is no checkpoint: one line naming it
    good = tmp_path / "cut" / "model.safetensors"
    convnext_file(good)
    good.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=f"{good}: not a readable weight file for convnext-base"):
        create_backbone("convnext-base", weights=str(good.parent), config_overrides=CONVNEXT)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / CHEXZERO_FILE).write_bytes(b"\x80\x04 not a pickle of tensors" * 20)
    with pytest.raises(WeightsError, match="not a readable weight file for chexzero"):
        create_backbone("chexzero", weights_dir=tmp_path / "stray", config_overrides=CHEXZERO_TINY)
    # its own checkpoint, with the classifier it was trained with: the classifier is the one thing let through
    ref = convnext_file(tmp_path / "own" / "model.safetensors", num_classes=10)
    bb = create_backbone("convnext-base", weights=str(tmp_path / "own" / "model.safetensors"), config_overrides=CONVNEXT)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(bb(x), want, rtol=1e-5, atol=1e-6)


# --- 2. an HF entry loads its own model only --------------------------------------------------------------

def test_hf_entry_refuses_another_models_folder(tmp_path):
    # --weights-dir that IS a model folder (a RAD-DINO clone): not taken for dinov2-base
    clone = tmp_path / "somewhere"
    dinov2_snapshot(clone)
    with pytest.raises(WeightsMissingError) as e:
        create_backbone("dinov2-base", weights_dir=clone)
    assert "facebook--dinov2-base" in _one_line(e)
    # a SigLIP folder given to rad-dino: its config.json names another architecture
    folder, _, _ = tiny_siglip_snapshot(tmp_path / "siglip", repo="google/siglip-base-patch16-224")
    with pytest.raises(WeightsError) as e:
        create_backbone("rad-dino", weights=str(folder))
    msg = _one_line(e)
    assert str(folder / "config.json") in msg and "model_type 'siglip'" in msg and "rad-dino" in msg
    # the right model_type, the wrong tensors: a deeper model, or one tensor short
    deep = tmp_path / "deep"
    dinov2_snapshot(deep, num_hidden_layers=3)
    cfg = json.loads((deep / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2, stage_names=["stem", "stage1", "stage2"],
                                                      out_features=["stage2"], out_indices=[2])))
    with pytest.raises(WeightsError, match=r"unexpected \(e\.g\. encoder\.layer\.2\."):
        create_backbone("rad-dino", weights=str(deep))
    (deep / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))  # one transformers refuses
    with pytest.raises(WeightsError, match="config.json: not a valid configuration of rad-dino"):
        create_backbone("rad-dino", weights=str(deep))
    from safetensors.torch import load_file, save_file

    short = tmp_path / "short"
    dinov2_snapshot(short)
    sd = load_file(short / "model.safetensors")
    sd.pop("layernorm.weight")
    save_file(sd, short / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"1 of the model's tensors missing \(e\.g\. layernorm\.weight\)"):
        create_backbone("rad-dino", weights=str(short))


# --- 3. a named entry and the snapshot's preprocessor_config.json -------------------------------------------

def test_named_entry_refuses_a_snapshot_processor_that_differs(tmp_path):
    from transformers import BitImageProcessor

    folder = tmp_path / "microsoft--rad-dino"
    dinov2_snapshot(folder)
    plain = create_backbone("rad-dino", weights_dir=tmp_path).weights_id
    # the published RAD-DINO processor: the entry's own pipeline, the same identity
    BitImageProcessor(size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518}, resample=3,
                      image_mean=[0.5307] * 3, image_std=[0.2583] * 3, do_convert_rgb=True).save_pretrained(folder)
    assert create_backbone("rad-dino", weights_dir=tmp_path).weights_id == plain
    # rewritten to 224 px and mean/std 0.5: refused, naming the differences
    BitImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    with pytest.raises(WeightsError) as e:
        create_backbone("rad-dino", weights_dir=tmp_path)
    msg = _one_line(e)
    assert "preprocessor_config.json" in msg and "input size 224 (entry: 518)" in msg
    assert "mean (0.5, 0.5, 0.5)" in msg and "resize 224 (entry: 518)" in msg


# --- 4. identity: the tensors, whatever the files; where they came from recorded beside it -----------------

def test_identity_is_the_tensors_not_the_files(tmp_path):
    from safetensors.torch import load_file

    single = tmp_path / "single"
    ref = dinov2_snapshot(single)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()
    shutil.copy(single / "config.json", tmp_path / "bin")
    torch.save(load_file(single / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    ids = {k: create_backbone("rad-dino", weights=str(tmp_path / k)).weights_id for k in ("single", "sharded", "bin")}
    assert len(set(ids.values())) == 1, ids
    assert ids["single"].startswith(state_identity(load_file(single / "model.safetensors")))
    dinov2_snapshot(tmp_path / "other", seed=2)
    assert create_backbone("rad-dino", weights=str(tmp_path / "other")).weights_id != ids["single"]


def test_folder_and_revision_are_recorded_in_embed_runs(tmp_path, ingested, monkeypatch):
    from featstore.embed import embed

    con, _ = ingested
    cache = tmp_path / "hub"
    src = tmp_path / "src"
    dinov2_snapshot(src)
    snap = hub_cache(cache, "microsoft/rad-dino", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    bb = create_backbone("rad-dino", config_overrides=dict(image_size=56))
    assert embed(con, bb, workers=0, limit=2).n_embedded == 2
    got = json.loads(con.execute("SELECT weights_source FROM embed_runs").fetchone()[0])
    assert got["revision"] == REV and got["path"] == str(snap) and got["files"] == ["model.safetensors"]
    assert got["via"].startswith("hub cache")
    # a git clone: its HEAD commit
    clone = tmp_path / "w" / "rad-dino"
    dinov2_snapshot(clone)
    sha = git_clone(clone)
    bb = create_backbone("rad-dino", weights_dir=tmp_path / "w", config_overrides=dict(image_size=56))
    assert bb.weights_source["revision"] == sha and bb.weights_source["via"] == "git clone"


# --- 5. the Hugging Face hub cache, offline ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["HF_HUB_CACHE", "HF_HOME", "weights-dir=cache", "weights-dir=HF_HOME"])
def test_hub_cache_is_read_offline(tmp_path, monkeypatch, how):
    src = tmp_path / "src"
    ref = dinov2_snapshot(src)
    home = tmp_path / "hf-home"
    hub_cache(home / "hub", "microsoft/rad-dino", src)
    wdir = None
    if how == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    elif how == "HF_HOME":
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(home))
    else:
        wdir = home / "hub" if how == "weights-dir=cache" else home
    bb = create_backbone("rad-dino", weights_dir=wdir)
    assert bb.weights_source["revision"] == REV
    x = torch.rand(2, 3, 56, 56)
    np.testing.assert_allclose(bb(x), _cls(ref, x), rtol=1e-4, atol=1e-5)


def test_hub_cache_timm_and_the_message_names_hf_download(tmp_path, monkeypatch):
    src = tmp_path / "src"
    ref = convnext_file(src / "model.safetensors")
    hub_cache(tmp_path / "hub", TIMM_REPO, src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    bb = create_backbone("convnext-base", config_overrides=CONVNEXT)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(bb(x), ref(x).numpy(), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsMissingError) as e:
        create_backbone("rad-dino", weights_dir=tmp_path / "w")
    msg = _one_line(e)
    assert "`hf download microsoft/rad-dino`" in msg and "huggingface-cli" not in msg
    assert f"{tmp_path / 'w'}/microsoft--rad-dino/" in msg and f"{tmp_path / 'w'}/rad-dino/" in msg


# --- 6. git clones: named after the repository, and made without git-lfs ------------------------------------

def test_git_clone_named_after_the_repo(tmp_path):
    ref = dinov2_snapshot(tmp_path / "rad-dino")
    git_clone(tmp_path / "rad-dino")
    bb = create_backbone("rad-dino", weights_dir=tmp_path)
    x = torch.rand(2, 3, 56, 56)
    np.testing.assert_allclose(bb(x), _cls(ref, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,layout", [
    ("rad-dino", "rad-dino/model.safetensors"),
    ("rad-dino", "microsoft--rad-dino/pytorch_model.bin"),
    ("convnext-base", "convnext_base.fb_in22k_ft_in1k/model.safetensors"),
    ("chexzero", CHEXZERO_FILE)])
def test_git_lfs_pointer_says_git_lfs_pull(tmp_path, name, layout):
    path = tmp_path / layout
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "rad-dino":
        dinov2_snapshot(path.parent)
        for f in path.parent.glob("model*.safetensors"):
            f.unlink()
    path.write_text(LFS)
    with pytest.raises(WeightsError) as e:
        create_backbone(name, weights_dir=tmp_path, config_overrides={"rad-dino": None, "convnext-base": CONVNEXT,
                                                                       "chexzero": CHEXZERO_TINY}[name])
    msg = _one_line(e)
    assert f"{path}: this is a git-lfs pointer" in msg and "run `git lfs pull`" in msg


# --- 7. hf:<repo> entries: --weights-dir, and SigLIP's pooler --------------------------------------------------

@pytest.mark.parametrize("layout", ["someone--tiny-siglip", "tiny-siglip", "--weights"])
def test_generic_hf_honours_weights_dir_and_defaults_siglip_to_its_pooler(tmp_path, layout):
    from transformers import SiglipImageProcessor

    folder, model, _ = tiny_siglip_snapshot(tmp_path, repo="someone/tiny-siglip")
    SiglipImageProcessor().save_pretrained(folder)
    kw = dict(weights_dir=tmp_path)
    if layout == "tiny-siglip":
        folder = folder.rename(tmp_path / "tiny-siglip")
    elif layout == "--weights":
        kw = dict(weights=str(folder))
    bb = create_backbone("hf:someone/tiny-siglip", **kw)  # no FEATSTORE_WEIGHTS_DIR: the argument alone
    assert bb.name == "hf:someone/tiny-siglip" and ";pool=pooler;" in bb.weights_id
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        want = model.vision_model(pixel_values=x).pooler_output.numpy()
    np.testing.assert_allclose(bb(x), want, rtol=1e-4, atol=1e-5)
    assert canonical_name("hf:someone/tiny-siglip", "pooler", kw.get("weights_dir")) == "hf:someone/tiny-siglip" or \
        layout == "--weights"


# --- 8. --weights: a file or a folder for every family; bad files: one line, exit 2, nothing stored --------------

def test_weights_is_a_file_or_a_folder_for_every_family(tmp_path):
    ref = dinov2_snapshot(tmp_path / "hf")
    x = torch.rand(2, 3, 56, 56)
    np.testing.assert_allclose(create_backbone("rad-dino", weights=str(tmp_path / "hf" / "model.safetensors"))(x),
                               _cls(ref, x), rtol=1e-4, atol=1e-5)
    ref = convnext_file(tmp_path / "timm" / "model.safetensors")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(create_backbone("convnext-base", weights=str(tmp_path / "timm"),
                                                   config_overrides=CONVNEXT)(x), ref(x).numpy(), rtol=1e-5, atol=1e-6)
    donor = chexzero_file(tmp_path / "clip" / CHEXZERO_FILE)
    x = torch.rand(2, 3, 32, 32)
    np.testing.assert_allclose(create_backbone("chexzero", weights=str(tmp_path / "clip"),
                                               config_overrides=CHEXZERO_TINY)(x), donor(x), rtol=1e-5, atol=1e-6)


def test_embed_help_says_file_or_folder():
    from typer.testing import CliRunner

    from featstore.cli import app

    r = CliRunner().invoke(app, ["embed", "--help"], terminal_width=200)
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 0 and "a weight file or a folder, for every family" in text


def _truncated(d):
    dinov2_snapshot(d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f"{f}: not a readable weight file for rad-dino"


def _no_config(d):
    dinov2_snapshot(d)
    (d / "config.json").unlink()
    return f"{d}: no config.json beside the weights of rad-dino"


def _stray_pt(d):
    d.mkdir(parents=True)
    dinov2_snapshot(d.parent / "tmp-src")
    shutil.copy(d.parent / "tmp-src" / "config.json", d)
    (d / "model.pt").write_bytes(b"not a checkpoint at all\x00" * 40)
    return f"{d / 'model.pt'}: not a readable weight file for rad-dino"


def _wrong_arch(d):
    tiny_siglip_snapshot(d.parent, repo="microsoft/rad-dino")
    return f"{d / 'config.json'}: model_type 'siglip'"


@pytest.mark.parametrize("case", [_truncated, _no_config, _stray_pt, _wrong_arch])
def test_bad_file_via_weights_dir_is_one_line_exit_2_nothing_stored(tmp_path, synth_manifest, case):
    from typer.testing import CliRunner

    from featstore.cli import app
    from featstore.store import connect

    db = tmp_path / "fs.duckdb"
    r = CliRunner().invoke(app, ["ingest", "--manifest", str(synth_manifest), "--workers", "1", "--db", str(db)])
    assert r.exit_code in (0, 1), r.output
    want = case(tmp_path / "w" / "microsoft--rad-dino")
    r = CliRunner().invoke(app, ["embed", "--backbone", "rad-dino", "--weights-dir", str(tmp_path / "w"),
                                 "--workers", "0", "--db", str(db)], terminal_width=400)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len([ln for ln in r.output.splitlines() if ln.strip()]) <= 3, r.output
    assert want in " ".join(r.output.replace("│", " ").split()), r.output
    con = connect(db)
    try:
        assert con.execute("SELECT count(*) FROM embed_runs").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0
    finally:
        con.close()


# --- 9. which files, where; library chatter; DINOv2's pooler ---------------------------------------------------

def test_backbones_files_lists_what_each_entry_needs_and_where():
    from typer.testing import CliRunner

    from featstore.backbones import needed_files
    from featstore.cli import app

    flat = {n: " ".join(" ".join(t) for t in needed_files(get_spec(n))) for n in ("biomedclip", "chexzero", "rad-dino")}
    assert "open_clip_pytorch_model.bin" in flat["biomedclip"]
    assert "zero-shot" in flat["biomedclip"] and "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract" in flat["biomedclip"]
    assert f"{CHEXZERO_FILE} (exactly this name)" in flat["chexzero"] and f"<weights-dir>/{CHEXZERO_FILE}" in flat["chexzero"]
    assert "<weights-dir>/microsoft--rad-dino/" in flat["rad-dino"] and "<weights-dir>/rad-dino/" in flat["rad-dino"]
    assert "`hf download microsoft/rad-dino`" in flat["rad-dino"] and "preprocessor_config.json" in flat["rad-dino"]
    r = CliRunner().invoke(app, ["backbones", "--files", "chexzero"], terminal_width=220)
    assert r.exit_code == 0 and CHEXZERO_FILE in r.output, r.output
    r = CliRunner().invoke(app, ["backbones", "--files", "all"], terminal_width=220)
    assert r.exit_code == 0 and all(n in r.output for n in ("pixelstats", "convnext-base", "tv-resnet50-imagenet"))


def test_library_chatter_is_captured_and_one_line_said(tmp_path, capfd):
    tiny_siglip_snapshot(tmp_path)  # a whole SigLIP: its text tower is unexpected by the image tower
    capfd.readouterr()
    bb = create_backbone("siglip-base", weights_dir=tmp_path)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "text_model" not in out + err, out + err
    src = bb.weights_source
    assert any("LOAD REPORT" in line for line in src["messages"])
    assert "text-tower tensors not used" in src["said"] and "\n" not in src["said"]


def test_dinov2_pooler_is_its_cls_token_one_set():
    assert canonical_name("rad-dino@pooler") == canonical_name("rad-dino", "pooler") == "rad-dino"
    assert canonical_name("dinov2-base", "pooler") == "dinov2-base"
    a = create_backbone("rad-dino@pooler", weights="random-init", config_overrides=_T)
    b = create_backbone("rad-dino", weights="random-init", config_overrides=_T)
    assert a.name == b.name and a.weights_id == b.weights_id
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():  # HF's Dinov2 pooler_output is the CLS token: the vectors are the same
        out = b.module.model(pixel_values=x)
    np.testing.assert_allclose(out.pooler_output.numpy(), out.last_hidden_state[:, 0].numpy())


@pytest.mark.slow
def test_embed_says_one_summary_line_and_records_the_chatter(tmp_path, synth_manifest):
    """A whole SigLIP through the CLI: no LOAD REPORT on the terminal, one line saying what was loaded from
    where; the library's messages are in embed_runs.weights_source."""
    from typer.testing import CliRunner

    from featstore.cli import app
    from featstore.store import connect

    folder, _, _ = tiny_siglip_snapshot(tmp_path / "w")
    db = tmp_path / "fs.duckdb"
    r = CliRunner().invoke(app, ["ingest", "--manifest", str(synth_manifest), "--workers", "1", "--db", str(db)])
    assert r.exit_code in (0, 1), r.output
    r = CliRunner().invoke(app, ["embed", "--backbone", "siglip-base", "--weights-dir", str(tmp_path / "w"), "--limit", "2",
                                 "--workers", "0", "--db", str(db)], terminal_width=400)
    assert r.exit_code == 0, r.output
    assert "LOAD REPORT" not in r.output and "text_model." not in r.output, r.output
    said = [ln for ln in r.output.splitlines() if "tensors from" in ln]
    assert len(said) == 1 and str(folder) in said[0] and "text-tower tensors not used" in said[0], r.output
    con = connect(db)
    try:
        src = json.loads(con.execute("SELECT weights_source FROM embed_runs").fetchone()[0])
    finally:
        con.close()
    assert src["path"] == str(folder) and src["via"] == "weights-dir"
    assert any("LOAD REPORT" in m for m in src["messages"])
