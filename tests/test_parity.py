"""Each backbone is fed as its own library / training code feeds it.

featstore's input tensor (decode -> to_input with the spec's pipeline) against the library's own
transform applied to the same decoded image. Bounds, as max |difference| of the input tensor:
  torchxrayvision (normalize, XRayCenterCrop, XRayResizer)      <= 1e-3 on its [-1024, 1024] scale
  torchvision weights.transforms() (ImageClassification)        <= 1e-5 after mean/std
  NIH ONNX model's PIL pipeline (convert L, resize, ToTensor...)  exactly equal
  pixelstats (featstore's original float path, identity kept)     exactly equal to the old code
and, with the real NIH weights, embedding cosine >= 0.9999 to a plain PIL + onnxruntime script.
"""
import hashlib
import csv

import numpy as np
import pytest
import torch

from featstore.backbones import REGISTRY, create_backbone, get_spec
from featstore.decode import decode_file
from featstore.preprocess import to_input

from conftest import CXR, ONNX, needs_cxr, needs_onnx

XRV_TOL, TV_TOL = 1e-3, 1e-5
XRV = ["xrv-densenet121-res224-all", "xrv-resnet50-res512-all"]
TV = {"tv-densenet121-imagenet": ("DenseNet121_Weights", "IMAGENET1K_V1"),
      "tv-resnet50-imagenet": ("ResNet50_Weights", "IMAGENET1K_V2")}
NIH = "mobilenetv3-nih-onnx"


def ours(name, x):
    s = get_spec(name)
    return to_input(x, s.input_size, s.channels, s.norm)


# --- the libraries' own transforms, on what featstore decoded -------------------------------------

def xrv_ref(name, raw, maxval):
    import torchxrayvision as xrv

    img = xrv.datasets.normalize(raw, maxval, reshape=True)
    img = xrv.datasets.XRayCenterCrop()(img)
    return xrv.datasets.XRayResizer(get_spec(name).input_size)(img)


def tv_ref(name, x):
    import torchvision.models as tvm

    enum, member = TV[name]
    t = getattr(getattr(tvm, enum), member).transforms()
    # grey as 3 channels (PIL convert("RGB") of an 'L' image), a float [0, 1] tensor: the preset's tensor input
    return t(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None].expand(3, -1, -1)).numpy()


def nih_ref(u8):
    """The model's training code (Software/utils/data_loaders.py): PIL 'L', .resize((224, 224)) with PIL's
    default filter, then transforms.Resize((224, 224)) (a no-op now), ToTensor, Normalize([0.485], [0.229])."""
    from PIL import Image
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                            transforms.Normalize(mean=[0.485], std=[0.229])])
    return t(Image.fromarray(u8).resize((224, 224))).numpy()


def old_float_path(x, size):
    """featstore's input path before pipelines (PIL 'F' bilinear after a floor-offset centre square)."""
    from PIL import Image

    h, w = x.shape
    s = min(h, w)
    x = x[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if x.shape != (size, size):
        x = np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR, reducing_gap=None), np.float32)
    return x[None]


def check_all(x, raw, maxval):
    """x: featstore's decoded [0, 1] float32 image; raw / maxval: the integer image a library would read."""
    for name in XRV:
        ref = xrv_ref(name, raw, maxval)
        got = ours(name, x)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= XRV_TOL, name
    for name in TV:
        ref = tv_ref(name, x)
        got = ours(name, x)
        assert got.shape == ref.shape == (3, 224, 224)
        assert np.abs(got - ref).max() <= TV_TOL, name
    if raw.dtype == np.uint8:
        np.testing.assert_array_equal(ours(NIH, x), nih_ref(raw))
    np.testing.assert_array_equal(ours("pixelstats", x), old_float_path(x, 256))


# --- synthetic images: always run ---------------------------------------------------------------

SHAPES = [(301, 257), (256, 300), (224, 224), (180, 200), (512, 511), (97, 403)]


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_synthetic_8bit(shape):
    rng = np.random.default_rng(sum(shape))
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    smooth = 127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)  # structure, not only noise: filters matter
    u8 = np.clip(smooth + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
    x = u8.astype(np.float32) / 255.0  # what decode returns for an 8-bit file
    check_all(x, u8, 255)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_parity_synthetic_16bit_keeps_precision(shape):
    """A 16-bit image is not crushed to 8 bits for the pipelines that take more (xrv: normalize(img, 65535))."""
    rng = np.random.default_rng(7)
    u16 = rng.integers(0, 65536, shape, dtype=np.uint16)
    x = u16.astype(np.float32) / 65535.0  # decode of a 16-bit PNG
    check_all(x, u16, 65535)
    # two 16-bit levels inside one 8-bit step stay apart through xrv and torchvision
    flat = np.full((224, 224), 30000, np.uint16)
    for name in XRV[:1] + list(TV)[:1]:
        assert not np.array_equal(ours(name, flat), ours(name, flat + 100))


def test_uint8_quantisation_is_exact_and_full_range():
    from featstore.preprocess import to_uint8

    u = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(to_uint8(u.astype(np.float32) / 255.0), u)  # decode's 8-bit values: byte-exact
    v = np.array([[0, 257, 32768, 65535]], np.uint16)
    np.testing.assert_array_equal(to_uint8(v.astype(np.float32) / 65535.0), [[0, 1, 128, 255]])  # not clipped


def _input_paths():
    """Every distinct input path of the registry, (pipeline, input size, channels) -> the first entry with it:
    the 7 xrv DenseNets share one, so they are checked once."""
    out = {}
    for name, s in REGISTRY.items():
        out.setdefault((s.pipeline, s.input_size, s.channels), name)
    return out


@pytest.mark.parametrize("name", sorted(_input_paths().values()))
def test_every_input_path_on_tiny_odd_images(name):
    """Each normalisation / input pipeline of the registry: the backbone's tensor from a tiny odd-shaped
    image (portrait and landscape), float32 C-contiguous and writable; uint8 / uint16 hand-over (a later
    embed change) gives exactly what decode's float gives; so does tuple(pipeline), which embed_ray sends
    to its workers."""
    s = get_spec(name)
    rng = np.random.default_rng(1)
    for shape in ((37, 29), (29, 37)):
        u8 = rng.integers(0, 256, shape, dtype=np.uint8)
        u16 = rng.integers(0, 65536, shape, dtype=np.uint16)
        for raw, maxval in ((u8, 255.0), (u16, 65535.0)):
            ref = to_input(raw.astype(np.float32) / maxval, s.input_size, s.channels, s.pipeline)
            assert ref.shape == (s.channels, s.input_size, s.input_size) and ref.dtype == np.float32
            assert ref.flags.c_contiguous and ref.flags.writeable and np.isfinite(ref).all()
            np.testing.assert_array_equal(to_input(raw, s.input_size, s.channels, s.pipeline), ref)
            np.testing.assert_array_equal(to_input(raw, s.input_size, s.channels, tuple(s.pipeline)), ref)


def test_every_pipeline_kind_is_used_by_an_entry():
    from featstore.preprocess import PIPELINE_KINDS

    assert {s.pipeline.kind for s in REGISTRY.values()} == set(PIPELINE_KINDS)


def test_torchvision_presets_match_the_weights():
    import torchvision.models as tvm

    for name, (enum, member) in TV.items():
        t, p = getattr(getattr(tvm, enum), member).transforms(), get_spec(name).pipeline
        assert (t.resize_size, t.crop_size) == ([p.resize], [get_spec(name).input_size])
        assert tuple(t.mean) == p.mean and tuple(t.std) == p.std
        assert t.interpolation.value == "bilinear" and t.antialias is True


# --- identity: a pipeline change is a new embedding set -----------------------------------------

def test_weights_id_records_the_input_pipeline():
    from featstore.backbones import split_identity, stale_pipeline

    a = create_backbone("xrv-densenet121-res224-all", weights="random-init")
    w, pid = split_identity(a.weights_id)
    assert w == "random-init:seed0" and pid == get_spec(a.name).pipeline.identity and pid.startswith("xrv.")
    assert stale_pipeline(a.name, a.weights_id) is None
    assert "older input pipeline" in stale_pipeline(a.name, "random-init:seed0")
    # pixelstats' pipeline did not change: its sets keep their identity
    assert create_backbone("pixelstats").weights_id == "none"
    # every field is part of the identity; distinct pipelines in the registry have distinct identities
    p = get_spec(NIH).pipeline
    assert len({p.identity, p._replace(resample="bilinear").identity, p._replace(crop="center-square").identity,
                p._replace(version=2).identity}) == 4
    pipes = {s.pipeline for s in REGISTRY.values()}
    assert len({q.identity for q in pipes}) == len(pipes)


@pytest.mark.slow
def test_a_pipeline_change_makes_a_new_set_and_readers_never_mix(con, synth_manifest, monkeypatch):
    from dataclasses import replace

    from featstore import backbones as B
    from featstore import ingest as I
    from featstore.api import Store
    from featstore.embed import embed

    rows, _ = I.manifest_rows(synth_manifest)
    I.ingest_rows(con, rows, str(synth_manifest), workers=1)
    name = "xrv-densenet121-res224-all"
    embed(con, create_backbone(name, weights="random-init"), workers=0, limit=3)
    spec = B.get_spec(name)
    monkeypatch.setitem(B.REGISTRY, name, replace(spec, pipeline=spec.pipeline._replace(version=2)))
    rep = embed(con, create_backbone(name, weights="random-init"), workers=0, limit=3)
    assert rep.n_embedded == 3  # not "nothing to do": the old vectors do not count for the new pipeline
    assert con.execute("SELECT count(DISTINCT weights_id) FROM embeddings").fetchone()[0] == 2
    # readers take the current pipeline's set and say why the other is left out, never mixing the two
    with pytest.warns(UserWarning, match="older input pipeline|input pipeline"):
        X, meta = Store.over(con).arrays(name)
    assert len(X) == 3
    monkeypatch.setitem(B.REGISTRY, name, replace(spec, pipeline=spec.pipeline._replace(version=3)))
    with pytest.raises(ValueError, match="several weight sets"):  # neither is current: refuse
        Store.over(con).arrays(name)


# --- real images ---------------------------------------------------------------------------------

def _real_paths(n=20):
    rows = list(csv.DictReader(open(CXR / "manifest.csv")))
    return [CXR / r["path"] for r in rows[::len(rows) // n][:n]]


@pytest.mark.slow
@needs_cxr
def test_parity_on_real_images():
    from featstore.preprocess import to_uint8

    paths = _real_paths()
    for p in paths:
        d = decode_file(p, draft=224)  # as embed decodes them
        assert d.bit_depth == 8, p
        check_all(d.pixels, to_uint8(d.pixels), 255)
    dicoms = sorted((CXR / "dicom").glob("*.dcm"))
    for p in dicoms:  # decode's DICOM [0, 1] (VOI, MONOCHROME1) as the library's input, maxval 1
        x = decode_file(p).pixels
        check_all(x, x, 1.0)
    assert len(paths) == 20


@needs_cxr
@needs_onnx
def test_nih_onnx_embeddings_match_a_plain_pil_script():
    import onnx
    import onnxruntime as ort
    from PIL import Image

    m = onnx.load(str(ONNX))
    m.graph.output.append(onnx.ValueInfoProto(name="/Reshape_output_0"))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def script(path):  # what a person would write from the model's README and training code
        a = np.asarray(Image.open(path).convert("L").resize((224, 224)), np.float32) / 255
        x = ((a - 0.485) / 0.229)[None, None].astype(np.float32)
        return sess.run(["/Reshape_output_0"], {"input": x})[0].reshape(-1)

    bb = create_backbone(NIH, weights_dir=ONNX.parent, device="cpu")
    paths = _real_paths()
    x = torch.stack([torch.from_numpy(ours(NIH, decode_file(p, draft=224).pixels)) for p in paths])
    got = bb(x)
    for p, g in zip(paths, got):
        want = script(p)
        cos = float(g @ want / np.linalg.norm(g) / np.linalg.norm(want))
        assert cos >= 0.9999, (p, cos)


def test_ray_workers_feed_the_same_input(tmp_path):
    """embed_ray hands its decode tasks tuple(spec.norm); they make the local path's tensor."""
    from PIL import Image

    from featstore.embed_ray import _decode

    u8 = np.random.default_rng(2).integers(0, 256, (250, 230), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "a.png")
    for name in (NIH, XRV[0], "tv-resnet50-imagenet", "pixelstats"):
        s = get_spec(name)
        iid = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()  # embed checks the bytes still match
        batch = {"image_id": np.array([iid]), "path": np.array([str(tmp_path / "a.png")]),
                 "mask": np.array([b""], dtype=object), "source": np.array(["s"])}
        out = _decode(batch, "original", s.input_size, s.channels, tuple(s.norm))
        assert out["error"][0] == ""
        np.testing.assert_array_equal(out["x"][0], ours(name, u8.astype(np.float32) / 255.0))
