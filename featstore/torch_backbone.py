"""The torch side of a backbone: the modules featstore wraps models in and the function that runs them.

Imported only by the builders of torch models (featstore.backbones), so that building and running an ONNX
backbone never imports torch (2 s of every `featstore embed` command).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch


class Pooled(torch.nn.Module):
    """Runs fn (a feature method of `model`); registering model makes .eval()/.to() reach it."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.fn(x)


class PixelStats(torch.nn.Module):
    """64-bin histogram of [0,1] intensities (fractions) + 16x16 mean-pooled thumbnail."""

    bins = 64
    thumb = 16

    def forward(self, x):
        x = x[:, :1]
        n = x.shape[0]
        # NaN survives clamp and casts to a bin index far out of range (and clamp would turn Inf into
        # a plausible 1.0): bin finite values only, and give an image with any non-finite pixel a NaN
        # vector, as a network would, for the caller's finiteness check to reject
        bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp(0, 1)
        idx = (x.flatten(1) * (self.bins - 1e-4)).long()
        hist = torch.zeros(n, self.bins, device=x.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        hist = hist / idx.shape[1]
        thumb = torch.nn.functional.adaptive_avg_pool2d(x, self.thumb).flatten(1)
        out = torch.cat([hist, thumb], dim=1)
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)  # no sync: CUDA-graph safe


class CudaGraphed:
    """bf16 forward on CUDA, replayed from a CUDA graph for full batches.

    A DenseNet121 forward is ~500 kernel launches from Python; at batch 256 on an H100 launching
    them costs more than running them, and the pipeline's other threads (pinning, store writes)
    slow launching further. A graph replays them all in one call. Other batch shapes (the last,
    partial batch) run eagerly; FEATSTORE_CUDA_GRAPHS=0 turns graphs off."""

    def __init__(self, net):
        self.net, self.graph, self.static_in, self.static_out = net, None, None, None
        self.enabled = os.environ.get("FEATSTORE_CUDA_GRAPHS", "1") not in ("0", "false", "no")

    def _fwd(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self.net(x).float()

    def _capture(self, x):
        self.static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN picks its algorithms outside the capture
                self._fwd(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pinning thread keeps calling CUDA during the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_out = self._fwd(self.static_in)

    @torch.no_grad()
    def __call__(self, x):
        if not self.enabled or (self.graph is not None and x.shape != self.static_in.shape):
            return self._fwd(x)
        if self.graph is None:
            self._capture(x)
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def runner(fn: torch.nn.Module, device: str) -> tuple[Callable, torch.nn.Module, torch.dtype]:
    """(batch -> float32 NumPy features, the module on its device in eval mode, the input dtype it takes:
    bf16 on CUDA, where it computes in bf16 anyway and the workers then share half the bytes)."""
    net = fn.to(device).eval()
    cuda = device == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
        graphed = CudaGraphed(net)

    def run(batch: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if cuda:
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return graphed(batch).cpu().numpy()  # .cpu() copies before the next replay overwrites
        with torch.inference_mode():
            return net(batch).float().numpy()

    return run, net, torch.bfloat16 if cuda else torch.float32
