import numpy as np
import pytest
import torch

from featstore.backbones import REGISTRY, create_backbone, get_spec
from featstore.weights import WeightsMissingError

from conftest import ONNX


def _weights_for(name):
    spec = get_spec(name)
    if spec.family == "pixelstats":
        return {}
    if spec.family == "onnx":
        if not ONNX.exists():
            pytest.skip(f"ONNX weights not found at {ONNX}")
        if name == "onnx":
            return {"weights": str(ONNX), "output": "/hs3/Div_output_0"}
        return {"weights_dir": ONNX.parent}
    return {"weights": "random-init"}  # published weights cannot be downloaded here


# weights_id of the builds below, as the code of cce6fbe gave them (tests/test_registry.py pins the rest):
# a changed string makes every stored set of that backbone stale
BUILT_ID = {"pixelstats": "none", "xrv-densenet": "random-init:seed0;input=xrv.v1.4e8737a0",
            "xrv-resnet": "random-init:seed0;input=xrv.v1.4e8737a0",
            "tv-densenet": "random-init:seed0;input=torchvision.v1.4d3d7272",
            "tv-resnet": "random-init:seed0;input=torchvision.v1.1c8ab229"}


def _distinct_builds():
    """One entry per network a test can build here: the 7 xrv DenseNets differ only in their published
    weights, which random-init replaces, so one stands for all (their identities: test_registry.py).
    Foundation-model entries run with tiny configurations in test_foundation.py (full size: minutes on CPU)."""
    out = {}
    for n, s in REGISTRY.items():
        if s.family not in ("hf", "timm", "open_clip"):
            out.setdefault((s.family, s.input_size, s.channels, s.feature_dim, s.pipeline, s.options.get("output")), n)
    return list(out.values())


def _tiny(s):
    # convolutional nets pool whatever size they get: 64 px is enough to run every layer; an ONNX graph
    # has its input size fixed
    return s.input_size if s.family == "onnx" else 64


@pytest.mark.slow
@pytest.mark.parametrize("name", _distinct_builds())
def test_every_backbone_on_tiny_inputs(name):
    bb = create_backbone(name, device="cpu", **_weights_for(name))
    s = bb.spec
    x = torch.rand(2, s.channels, _tiny(s), _tiny(s))
    out = bb(x)
    assert out.shape == (2, bb.feature_dim) and out.dtype == np.float32 and np.isfinite(out).all()
    if s.feature_dim:
        assert bb.feature_dim == s.feature_dim
    assert bb.weights_id
    if s.family in BUILT_ID:
        assert bb.weights_id == BUILT_ID[s.family]


def test_generic_onnx_reads_the_named_tensor():
    if not ONNX.exists():
        pytest.skip(f"ONNX weights not found at {ONNX}")
    assert create_backbone("onnx", weights=str(ONNX), output="/hs3/Div_output_0").feature_dim == 1280
    with pytest.raises(ValueError, match="not in"):
        create_backbone("onnx", weights=str(ONNX), output="/no/such/tensor")


def test_the_onnx_backbone_loads_without_importing_the_onnx_package():
    """The shipped ONNX entry names an inner tensor (/Reshape_output_0): its graph is read and given that
    output through ONNX's own protobuf class, without `import onnx` (0.8 s of every embed command); the
    bytes handed to onnxruntime, and so the vectors, are those of `onnx.load` + an appended output."""
    import subprocess
    import sys

    if not ONNX.exists():
        pytest.skip(f"ONNX weights not found at {ONNX}")
    code = ("import sys; from featstore.backbones import create_backbone; "
            f"b = create_backbone('mobilenetv3-nih-onnx', weights_dir={str(ONNX.parent)!r}); "
            "print(b.feature_dim, b.spec.input_size, 'onnx' in sys.modules, 'ml_dtypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["576", "224", "False", "False"], out
    import onnx
    import onnxruntime as ort

    from featstore.backbones import _read_onnx_graph

    model = onnx.load(str(ONNX))
    model.graph.output.append(onnx.ValueInfoProto(name="/Reshape_output_0"))
    ours = _read_onnx_graph(ONNX)
    ours.graph.output.add(name="/Reshape_output_0")
    assert ours.SerializeToString() == model.SerializeToString()
    bb = create_backbone("mobilenetv3-nih-onnx", weights_dir=ONNX.parent)
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want = ref.run(["/Reshape_output_0"], {"input": x.numpy()})[0].reshape(2, -1)
    assert np.array_equal(bb(x), want)


def test_an_onnx_graph_with_external_tensors_gives_the_same_vectors(tmp_path):
    """A graph whose weights live in a side file (onnx's external data) is read through `onnx.load`, which
    brings them in: the inner tensor's vectors equal those of the one-file graph."""
    import onnx

    if not ONNX.exists():
        pytest.skip(f"ONNX weights not found at {ONNX}")
    ext = tmp_path / "m.onnx"
    onnx.save(onnx.load(str(ONNX)), str(ext), save_as_external_data=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").stat().st_size > 0
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(1))
    a = create_backbone("onnx", weights=str(ext), output="/Reshape_output_0")(x)
    b = create_backbone("onnx", weights=str(ONNX), output="/Reshape_output_0")(x)
    assert a.shape == (2, 576) and np.array_equal(a, b)


@pytest.mark.parametrize("name", ["xrv-densenet121-res224-all", "xrv-resnet50-res512-all", "tv-densenet121-imagenet",
                                  "mobilenetv3-nih-onnx"])
def test_missing_weight_says_which_file_goes_where(name, tmp_path):
    with pytest.raises(WeightsMissingError) as e:
        create_backbone(name, weights_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "put " in msg


def test_random_init_is_seeded():
    a = create_backbone("tv-resnet50-imagenet", weights="random-init")
    b = create_backbone("tv-resnet50-imagenet", weights="random-init")
    x = torch.rand(1, 3, 64, 64)
    np.testing.assert_array_equal(a(x), b(x))


@pytest.mark.slow
def test_xrv_densenet_loads_from_weights_dir(tmp_path):
    """The real torchxrayvision loading path, offline: a checkpoint file in --weights-dir."""
    import torchxrayvision as xrv

    from featstore.weights import sha256_file

    fname = xrv.models.model_urls["densenet121-res224-rsna"]["weights_url"].rsplit("/", 1)[1]
    torch.manual_seed(3)
    saved = xrv.models.DenseNet(num_classes=len(xrv.models.model_urls["densenet121-res224-rsna"]["labels"]))
    torch.save(saved, tmp_path / fname)
    bb = create_backbone("xrv-densenet121-res224-rsna", weights_dir=tmp_path)
    # the weight file's identity, then the input pipeline's (featstore.backbones.with_pipeline)
    assert bb.weights_id == f"sha256:{sha256_file(tmp_path / fname)};input={bb.spec.pipeline.identity}"
    x = torch.rand(2, 1, 224, 224) * 2048 - 1024
    np.testing.assert_allclose(bb(x), saved.eval().features2(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_torchvision_loads_from_weights_dir(tmp_path):
    import torchvision

    torch.manual_seed(4)
    ref = torchvision.models.densenet121(weights=None)
    torch.save(ref.state_dict(), tmp_path / "densenet121-a639ec97.pth")
    bb = create_backbone("tv-densenet121-imagenet", weights_dir=tmp_path)
    assert bb.weights_id.startswith("sha256:")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(ref.eval().features(x)), 1), 1)
    np.testing.assert_allclose(bb(x), want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xrv-densenet121-res224-all", "tv-resnet50-imagenet", "xrv-resnet50-res512-all"])
def test_backbone_is_in_eval_mode(name):
    bb = create_backbone(name, weights="random-init")
    assert not any(m.training for m in bb.module.modules())
    s = bb.spec
    x = torch.rand(2, s.channels, _tiny(s), _tiny(s))
    # eval mode: an image's features do not depend on the rest of the batch
    np.testing.assert_allclose(bb(x)[:1], bb(x[:1]), rtol=1e-3, atol=1e-4)


def test_pixelstats_marks_non_finite_images_nan_instead_of_crashing():
    """NaN used to become bin index -2**63 (an index error that killed every embed run); Inf was
    clamped into a plausible white. Now such an image's vector is NaN, for embed's finiteness check
    to reject, and the other images' vectors are unchanged."""
    bb = create_backbone("pixelstats", device="cpu")
    x = torch.rand(4, 1, 256, 256)
    clean = bb(x)
    x[1, 0, 3, 3], x[2, 0, 0, 0], x[3, 0, 5, 5] = float("nan"), float("inf"), float("-inf")
    out = bb(x)
    assert np.isnan(out[1:]).all()
    np.testing.assert_array_equal(out[0], clean[0])
