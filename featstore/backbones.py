"""The one factory, create_backbone(name, weights=...): builds a registered entry. The names and their typed
configurations are declared in featstore/backbone_specs.py without importing model libraries, and
re-exported here.

The built Backbone adds its identity: the weight file's sha256 (foundation models: the hash of
their tensors, foundation.state_identity; or `random-init`), plus the input pipeline's identity, so vectors
made by different pipelines never share a set.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from featstore import weights as W
from featstore.backbone_specs import (  # noqa: F401 - the registry's names, where featstore.backbones always had them
    GENERIC_PREFIXES, NIH_ONNX_PIPELINE, PIXELSTATS_PIPELINE, REGISTRY, TV_DENSENET121_V1, TV_RESNET50_V2,
    XRV_PIPELINE, BackboneSpec, canonical_name, get_spec, list_backbones, pooling_aliases, poolings, register,
    split_identity, stale_pipeline, with_pipeline)
from featstore.registry import Registry
from featstore.suggest import unknown
from featstore.preprocess import InputPipeline

if TYPE_CHECKING:
    import torch


def pick_device(device: str = "auto", family: str | None = None) -> str:
    """cpu or cuda. An ONNX graph runs on CUDA where onnxruntime has its CUDA provider (onnxruntime-gpu),
    whatever torch sees; torch is not imported for it."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device '{device}' (auto, cpu or cuda)")
    if device == "cpu":
        return device
    if family == "onnx":
        import onnxruntime as ort

        has, who = "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime has no CUDA provider " \
            "(pip install onnxruntime-gpu)"
    else:
        import torch

        has, who = torch.cuda.is_available(), "torch sees no CUDA device"
    if device == "cuda" and not has:
        raise ValueError(f"--device cuda asked for, but {who}")
    return "cuda" if has else "cpu"


class Backbone:
    """A frozen feature extractor: float32 (N, C, H, W) -> float32 (N, D) numpy. Its inputs are made by
    featstore.preprocess.to_input with spec.pipeline; weights_id names the weights and that pipeline.
    Torch models take a tensor of input_dtype (or a NumPy array); input_dtype None: the model takes NumPy
    float32 arrays and needs no torch (ONNX graphs)."""

    def __init__(self, spec: BackboneSpec, weights_id: str, fn: Callable[[np.ndarray], np.ndarray],
                 feature_dim: int, device: str, module: torch.nn.Module | None = None,
                 input_dtype: torch.dtype | None = None):
        self.spec, self.weights_id, self._fn = spec, weights_id, fn
        self.feature_dim, self.device, self.module = feature_dim, device, module
        # what the embed pipeline hands over: bf16 on CUDA, where the model computes in bf16
        # anyway, halves the bytes workers share, pin and copy to the GPU
        self.input_dtype = input_dtype
        # where the weights were found (folder or file, revision, files) and the one line said about it;
        # recorded beside weights_id in embed_runs.weights_source, not part of the identity
        self.weights_source: dict | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        out = self._fn(batch)
        if out.shape[1] != self.feature_dim:
            raise RuntimeError(f"{self.name} gave {out.shape[1]}-d features, expected {self.feature_dim}")
        return out

    def __repr__(self):
        return f"Backbone({self.name}, weights={self.weights_id}, dim={self.feature_dim}, device={self.device})"


def config_hash(overrides: dict) -> str:
    """8 hex digits naming a changed configuration in weights_id (`;config=`): canonical JSON, so the
    same overrides written in a study config (lists, any key order) give the same name."""
    import json

    return hashlib.sha256(json.dumps(overrides, sort_keys=True, default=list).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class BuildRequest:
    """What create_backbone was asked for, handed to the family's builder."""
    weights: str | None
    wdir: Path | None
    device: str
    output: str | None = None
    seed: int = 0
    config_overrides: dict | None = None

    @property
    def random(self) -> bool:
        return self.weights == W.RANDOM_INIT

    def seeded(self) -> str:
        """Seed torch for a random initialisation; its identity (recorded instead of a weight file's)."""
        import torch

        torch.manual_seed(self.seed)
        return f"{W.RANDOM_INIT}:seed{self.seed}"


# family -> builder(spec, BuildRequest) -> Backbone; a new family is one `@builder("name")` function
BUILDERS: Registry[Callable[[BackboneSpec, BuildRequest], Backbone]] = Registry("backbone family")


def builder(family: str):
    """Register the function that builds every entry of `family` (timm's register_model, per family)."""
    return BUILDERS.register(family)


def create_backbone(name: str, weights: str | None = None, weights_dir: str | os.PathLike | None = None,
                    device: str = "auto", output: str | None = None, seed: int = 0,
                    config_overrides: dict | None = None, pooling: str | None = None) -> Backbone:
    """Build a registered backbone.

    weights: None for the entry's published weights; "random-init" for seeded random
    initialisation (recorded as such); or a path to a weight file. For the generic
    `onnx` entry weights is the .onnx path and output the tensor to read. For foundation-model
    entries weights may be a file or a folder (a Hugging Face snapshot, or the folder holding a timm /
    open_clip file), checked to be the entry's (foundation.WeightsError otherwise); config_overrides changes their
    configuration (tests: tiny random models; the registry entries stay full-size). pooling (cls, mean,
    pooler; foundation-model entries) is the same as a `@pooling` suffix: the backbone's name becomes
    canonical_name(name, pooling), its own embedding set.
    """
    wdir = W.weights_dir(weights_dir)
    spec = get_spec(canonical_name(name, pooling, wdir) if pooling or "@" in name else name, wdir, weights)
    build = BUILDERS.get(spec.family)
    dev = pick_device(device, spec.family)
    req = BuildRequest(weights, wdir, dev, output, seed, config_overrides)
    return build(spec, req)


@builder("pixelstats")
def _build_pixelstats(spec: BackboneSpec, req: BuildRequest) -> Backbone:
    if req.weights:
        raise ValueError(f"--weights {req.weights}: {spec.name} has no weights; leave --weights out")
    from featstore.torch_backbone import PixelStats

    return _torch_backbone(spec, "none", PixelStats(), req.device)


@builder("onnx")
def _build_onnx(spec: BackboneSpec, req: BuildRequest) -> Backbone:
    return _onnx_backbone(spec, req.weights, req.wdir, req.output or spec.options.get("output"), req.device)


def _build_foundation(spec: BackboneSpec, req: BuildRequest) -> Backbone:
    from featstore import foundation as F

    wid = req.seeded() if req.random else None
    pooling = spec.options.get("pooling", "cls")
    net, fwid, dim, source = F.BUILDERS[spec.family](spec, req.weights, req.wdir, pooling, req.config_overrides)
    spec = dataclasses.replace(spec, feature_dim=dim)
    # the pooling is recorded in every row's weights_id too, not only in the entry name
    wid = f"{wid or fwid};pool={pooling}"
    if req.config_overrides:  # a changed configuration is another model: never the entry's embedding set
        o = req.config_overrides
        size = int(o.get("image_size", o.get("img_size", spec.input_size)))
        p = spec.pipeline
        spec = dataclasses.replace(spec, input_size=size, pipeline=p._replace(
            resize=round(p.resize * size / spec.input_size)) if p.resize else p)
        wid += ";config=" + config_hash(o)
    bb = _torch_backbone(spec, wid, net, req.device, net)
    bb.weights_source = source
    return bb


for _family in ("hf", "timm", "open_clip"):  # featstore.foundation.FAMILIES, without importing it here
    builder(_family)(_build_foundation)


@builder("xrv-densenet")
def _build_xrv_densenet(spec: BackboneSpec, req: BuildRequest) -> Backbone:
    import torchxrayvision as xrv

    from featstore.torch_backbone import Pooled

    if req.random:
        wid = req.seeded()
        m = xrv.models.DenseNet(weights=None, num_classes=len(xrv.models.model_urls[spec.weights]["labels"]))
    else:
        path = _library_file(spec, req.weights, req.wdir)
        m = xrv.models.DenseNet(weights=spec.weights, cache_dir=str(path.parent) + os.sep)
        wid = W.weights_identity(path)
    return _torch_backbone(spec, wid, Pooled(m, m.features2), req.device, m)


@builder("xrv-resnet")
def _build_xrv_resnet(spec: BackboneSpec, req: BuildRequest) -> Backbone:
    from featstore.torch_backbone import Pooled

    wid = req.seeded() if req.random else None
    m = _xrv_resnet(spec, None if req.random else _library_file(spec, req.weights, req.wdir))
    wid = wid or W.weights_identity(m.weights_filename_local)
    return _torch_backbone(spec, wid, Pooled(m, m.features), req.device, m)


def _torchvision(spec: BackboneSpec, req: BuildRequest, arch: str):
    """A torchvision classifier (weights: `<Enum>.<member>`, fetched from the enum's own URL), and its identity."""
    import torch
    import torchvision.models as tvm

    wid = req.seeded() if req.random else None
    enum_name, member = spec.weights.split(".")
    wenum = getattr(getattr(tvm, enum_name), member)
    m = getattr(tvm, arch)(weights=None)
    if not req.random:
        path = _library_file(spec, req.weights, req.wdir, url=wenum.url)
        state = torch.load(path, map_location="cpu", weights_only=True)
        m.load_state_dict(_fix_densenet_keys(state) if arch.startswith("densenet") else state)
        wid = W.weights_identity(path)
    return m, wid


@builder("tv-densenet")
def _build_tv_densenet(spec: BackboneSpec, req: BuildRequest) -> Backbone:
    import torch

    from featstore.torch_backbone import Pooled

    m, wid = _torchvision(spec, req, "densenet121")
    feats = m.features

    def f(x):
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(feats(x)), 1), 1)
    return _torch_backbone(spec, wid, Pooled(m, f), req.device, m)


@builder("tv-resnet")
def _build_tv_resnet(spec: BackboneSpec, req: BuildRequest) -> Backbone:
    import torch

    from featstore.torch_backbone import Pooled

    m, wid = _torchvision(spec, req, "resnet50")
    m.fc = torch.nn.Identity()
    return _torch_backbone(spec, wid, Pooled(m, m), req.device, m)


def _library_file(spec: BackboneSpec, weights: str | None, wdir: Path | None, url: str | None = None) -> Path:
    """Explicit file, else weights dir / library cache / download."""
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise W.WeightsMissingError(f"weights file {p} for {spec.name} not found")
        if spec.family.startswith("xrv"):  # torchxrayvision loads its file by name from p's folder
            import torchxrayvision as xrv

            expected = os.path.basename(xrv.models.model_urls[spec.weights]["weights_url"])
            if p.name != expected:
                raise ValueError(f"--weights {p}: {spec.name} loads the torchxrayvision file {expected} (by that "
                                 f"name, from the file's folder); give that file, or put it in --weights-dir")
        return p
    if spec.family.startswith("xrv"):
        import torchxrayvision as xrv

        url = xrv.models.model_urls[spec.weights]["weights_url"]
        cache = Path(xrv.utils.get_cache_dir())
    else:
        import torch

        cache = Path(torch.hub.get_dir()) / "checkpoints"
    return W.resolve(os.path.basename(url), url, wdir, cache, W.http_download, what=spec.name)


def _xrv_resnet(spec: BackboneSpec, path: Path | None):
    """torchxrayvision's ResNet class; it insists on weights, so random-init builds the
    same object with its own layer layout and no file."""
    import torch
    import torchvision
    import torchxrayvision as xrv

    if path is not None:
        return xrv.models.ResNet(weights=spec.weights, cache_dir=str(path.parent) + os.sep)
    m = xrv.models.ResNet.__new__(xrv.models.ResNet)
    torch.nn.Module.__init__(m)
    info = xrv.models.model_urls[spec.weights]
    m.weights, m.apply_sigmoid, m.weights_dict = spec.weights, False, info
    m.targets = m.pathologies = info["labels"]
    m.model = torchvision.models.resnet50(num_classes=len(info["labels"]), weights=None)
    m.model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    m.input_resolution = info.get("input_resolution", 512)
    m.weights_filename_local = None
    return m.eval()


def _fix_densenet_keys(state: dict) -> dict:
    # torchvision's densenet checkpoints use old 'norm.1' style keys; torchvision fixes them the same way
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for k, v in state.items():
        m = pat.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _torch_backbone(spec: BackboneSpec, wid: str, fn: torch.nn.Module, device: str,
                    module: torch.nn.Module | None = None) -> Backbone:
    from featstore.torch_backbone import runner

    run, net, dtype = runner(fn, device)
    return Backbone(spec, with_pipeline(wid, spec.pipeline), run, spec.feature_dim, device, module or net, dtype)


@functools.cache
def _onnx_model_proto():
    """ONNX's ModelProto, from the onnx package's generated protobuf module loaded on its own: `import onnx`
    also initialises ml_dtypes (0.8 s of every embed command), which reading and editing a graph's outputs
    never uses. The same class and bytes as `onnx.load` gives (tests/test_backbones.py); `import onnx` where
    the package does not ship that module."""
    import importlib.util

    spec = importlib.util.find_spec("onnx")  # finds the package without running its __init__
    pb2 = Path(next(iter(spec.submodule_search_locations or []), "")) / "onnx_ml_pb2.py" if spec else None
    if not pb2 or not pb2.is_file():
        import onnx

        return onnx.ModelProto
    mspec = importlib.util.spec_from_file_location("featstore._onnx_ml_pb2", pb2)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.ModelProto


def _read_onnx_graph(path: Path):
    """The model's protobuf; a graph whose tensors live in external files is read by `onnx.load`, which
    brings their data in (the bytes handed to onnxruntime carry no folder to find them from)."""
    model = _onnx_model_proto()()
    model.ParseFromString(path.read_bytes())
    if any(t.data_location == 1 for t in model.graph.initializer):  # TensorProto.EXTERNAL
        import onnx

        return onnx.load(str(path))
    return model


def _onnx_backbone(spec: BackboneSpec, weights: str | None, wdir: Path | None, output: str | None,
                   device: str) -> Backbone:
    import onnxruntime as ort

    if spec.name == "onnx":
        if not weights or weights == W.RANDOM_INIT:
            raise ValueError("the generic onnx backbone needs weights=PATH to an .onnx file (--weights)")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise W.WeightsMissingError(f"ONNX model {path} not found")
    elif weights == W.RANDOM_INIT:
        raise ValueError(f"{spec.name} is a fixed ONNX graph; random-init is not available for it")
    else:
        path = Path(weights) if weights else W.resolve(spec.weights, spec.url, wdir,
                                                      Path.home() / ".cache" / "featstore", W.http_download, spec.name)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the int8 graph warns about every unused initializer
    # no busy-waiting between batches: spinning threads would take the cores the decode workers need
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if output:  # an inner tensor as the output: the graph's outputs edited, then handed over as bytes
        model = _read_onnx_graph(path)
        known = {o for n in model.graph.node for o in n.output}
        if output not in known:
            near = [k for k in sorted(known) if "pool" in k.lower() or "reshape" in k.lower() or "flatten" in k.lower()]
            raise ValueError(f"tensor '{output}' is not in {path.name}; candidates: {', '.join(near[:12])}")
        if output not in {o.name for o in model.graph.output}:
            model.graph.output.add(name=output)
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    else:  # the graph as it is: onnxruntime alone reads it
        sess = ort.InferenceSession(str(path), opts, providers=providers)
        output = sess.get_outputs()[0].name
    inp = sess.get_inputs()[0]  # the graph's first input that is not an initializer
    input_name = inp.name
    dims = [d if isinstance(d, int) else 0 for d in inp.shape]  # symbolic ('batch') or unknown: 0, as onnx says
    channels = dims[1] if len(dims) == 4 and dims[1] else spec.channels
    size = dims[2] if len(dims) == 4 and dims[2] else spec.input_size
    if (channels, size) != (spec.channels, spec.input_size):
        spec = dataclasses.replace(spec, input_size=size, channels=channels)

    def run(batch: np.ndarray) -> np.ndarray:
        x = batch if isinstance(batch, np.ndarray) else batch.numpy()  # a CPU tensor (the Ray engine's, tests')
        out = sess.run([output], {input_name: np.ascontiguousarray(x, np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)

    dim = spec.feature_dim or run(np.zeros((1, channels, size, size), np.float32)).shape[1]
    # what the session runs on: onnxruntime-gpu without usable CUDA libraries falls back to the CPU quietly
    ran_on = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
    return Backbone(spec, with_pipeline(W.weights_identity(path), spec.pipeline), run, dim, ran_on)


# --- which files an entry needs, and where they go (`featstore backbones --files`) -------------------

_WHERE_HF = ("<weights-dir>/{flat}/, a git clone <weights-dir>/{name}/ (`git lfs pull` in it), or the "
             "Hugging Face hub cache (`hf download {repo}`; HF_HOME / HF_HUB_CACHE, read offline too)")


def needed_files(spec: BackboneSpec) -> list[tuple[str, str, str]]:
    """(what, files, where they go) for each download an entry needs: its weights, and for a zero-shot
    head whatever else its text tower needs (BiomedCLIP's tokenizer lives in a second repository)."""
    o = spec.options
    if spec.family == "pixelstats":
        return [("weights", "none (weight-free)", "-")]
    if spec.family in ("hf", "timm", "open_clip") and o.get("repo") or spec.family == "timm":
        repo = o.get("repo") or spec.weights
        where = _WHERE_HF.format(flat=repo.replace("/", "--"), name=repo.rpartition("/")[2], repo=repo)
        if spec.family == "hf":
            out = [("weights", "config.json, model.safetensors (or its shards with model.safetensors.index.json, or "
                               "pytorch_model.bin), preprocessor_config.json (checked against the entry's pipeline)",
                    f"from https://huggingface.co/{repo} into {where}")]
            if "text_config" in o:
                out.append(("zero-shot", "the same snapshot's tokenizer files (tokenizer.json or spiece.model, "
                                         "tokenizer_config.json, special_tokens_map.json)", "beside the weights"))
            return out
        if spec.family == "timm":
            return [("weights", f"model.safetensors (or {o['arch']}.safetensors, pytorch_model.bin)",
                     f"from https://huggingface.co/{repo} into {where}, or <weights-dir>/{o['arch']}.safetensors, "
                     f"or --weights FILE")]
        names = o.get("files") or ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        out = [("weights", " or ".join(names) + " (and open_clip_config.json)", f"from https://huggingface.co/{repo} "
                f"into {where}, or --weights FILE")]
        text = (o.get("model_cfg") or {}).get("text_cfg", {}).get("hf_tokenizer_name")
        if text:
            out.append(("zero-shot", f"the text model {text}: config.json, vocab.txt, tokenizer_config.json, "
                                     f"special_tokens_map.json",
                        f"from https://huggingface.co/{text} into <weights-dir>/{text.replace('/', '--')}/"))
        return out
    if spec.family == "open_clip":  # no hub repository: one file, under its exact upstream name
        names = o.get("files") or []
        if not names:
            return [("weights", "an open_clip checkpoint", "--weights FILE")]
        src = f"from {o['download']} " if o.get("download") else ""
        return [("weights", f"{names[0]} (exactly this name)", f"{src}into <weights-dir>/{names[0]}, or --weights FILE")]
    if spec.family.startswith("xrv"):
        import torchxrayvision as xrv

        url = xrv.models.model_urls[spec.weights]["weights_url"]
        return [("weights", os.path.basename(url), f"from {url} into <weights-dir>/ or {xrv.utils.get_cache_dir()} "
                                                   f"(downloaded when online)")]
    if spec.family.startswith("tv-"):
        import torch
        import torchvision.models as tvm

        enum_name, member = spec.weights.split(".")
        url = getattr(getattr(tvm, enum_name), member).url
        return [("weights", os.path.basename(url), f"from {url} into <weights-dir>/ or "
                                                   f"{Path(torch.hub.get_dir()) / 'checkpoints'} (downloaded when online)")]
    if spec.family == "onnx":
        if not spec.weights:
            return [("weights", "any .onnx file", "--weights FILE")]
        return [("weights", spec.weights, f"from {spec.url} into <weights-dir>/ or ~/.cache/featstore/ "
                                          f"(downloaded when online)")]
    return [("weights", spec.weights or "-", "-")]
