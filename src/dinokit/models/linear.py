"""fp32 linear layers on CPU through oneDNN instead of the BLAS that ``F.linear`` calls.

PyTorch's CPU ``F.linear`` / ``mm`` in fp32 call MKL's ``sgemm``; under bf16/fp16 they already go to oneDNN. On
AMD CPUs MKL takes a generic code path: on this project's Zen 5-class machine fp32 ``F.linear`` at ViT-S shapes
runs at ~190-210 GFLOP/s while oneDNN's fp32 matmul (the same kernel library PyTorch uses for bf16, reached through
``torch.ops.mkldnn._linear_pointwise``) runs at ~440-480 GFLOP/s forward and for the input gradient and ~320 for
the weight gradient (docs/benchmarks.md). Same IEEE fp32 arithmetic with fp32 accumulation; only the summation
order differs, as between any two BLAS libraries.

:func:`linear` is ``F.linear`` with that path for fp32 CPU tensors outside autocast (and PyTorch's own everywhere
else: GPUs, autocast, other dtypes, ``torch.compile`` tracing); :class:`Linear` is an ``nn.Linear`` that calls it
(same parameters, same state-dict keys). It is taken by default on x86-64 AMD CPUs only: on Intel CPUs MKL takes
its optimised path and measured as fast as oneDNN, so the path's extra transposed copy of the output gradient
made the whole step slower; elsewhere (e.g. ARM, where PyTorch's BLAS may be Accelerate or OpenBLAS) it was never
measured. ``DINOKIT_ONEDNN_LINEAR=0`` in the environment turns it off, ``=1`` on for any x86-64 CPU.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "matmul_nt", "onednn_linear_enabled"]


def _op_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (the path can be taken at all)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def _cpu_vendor() -> str:
    """The x86 vendor string (``AuthenticAMD``, ``GenuineIntel``) from /proc/cpuinfo; "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _available(machine: str | None = None, vendor: str | None = None) -> bool:
    """Default: on for x86-64 AMD CPUs only. On Intel CPUs MKL's fp32 GEMMs are as fast as oneDNN's and the path's
    weight-gradient copies made a ViT-S/16 step slower (1.73 vs 2.15 images/s, Intel Xeon, 2026-12-07).
    ``DINOKIT_ONEDNN_LINEAR=0`` turns it off, ``=1`` on for any x86-64 CPU."""
    switch = os.environ.get("DINOKIT_ONEDNN_LINEAR", "auto")
    if switch == "0" or not _op_available():
        return False
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return False
    if switch == "1":
        return True
    return (_cpu_vendor() if vendor is None else vendor) == "AuthenticAMD"


_ENABLED = _available()


def _register_flop_formula() -> None:
    """Let ``torch.utils.flop_counter.FlopCounterMode`` count the oneDNN linear like ``addmm`` (2 M N K)."""
    from torch.utils.flop_counter import register_flop_formula

    def flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]

    try:
        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(flops)
    except (RuntimeError, ValueError):  # already registered (module re-imported)
        pass


if _op_available():
    _register_flop_formula()


def onednn_linear_enabled() -> bool:
    """Whether fp32 CPU linears of :func:`linear` go through oneDNN in this process."""
    return _ENABLED


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b`` by oneDNN. ``w`` may be a strided view (oneDNN reads its strides, e.g. ``w.t()``); an ``x``
    whose rows are not contiguous is copied contiguous by the op first."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """Forward ``y = x wᵀ + b``; backward ``dx = dy w`` and ``dw = dyᵀ x`` as oneDNN matmuls (``w.t()`` and ``xᵀ``
    passed as strided views; the op copies ``dyᵀ`` contiguous, one transposed copy of ``dy``), ``db`` a column
    sum — the products autograd computes for ``F.linear``."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[0]:
            dx = _onednn(dy, w.t(), None)
        if ctx.needs_input_grad[1]:
            dw = _onednn(dy2.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


# Below this inner or output size MKL was as fast or faster in a whole step: the Fashion-MNIST demo's blocks
# (width 128) ran 13% slower in fp32 through oneDNN (438 vs 504 img/s) although each product alone measured
# 0.9-2x faster; ViT-T (192) and wider gain 1.3-1.6x (docs/benchmarks.md).
MIN_DIM = 192


def _use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (_ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.dim() >= 2 and x.numel() > 0 and min(x.shape[-1], w.shape[0]) >= MIN_DIM
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; fp32 on CPU outside autocast through oneDNN (module docstring)."""
    if _use_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for a 2-D ``b`` (strided views allowed, see :func:`_onednn`) without autograd, for hand-written
    backward passes; fp32 on CPU outside autocast through oneDNN (module docstring), else ``F.linear(a, b)``."""
    if _use_onednn(a, b):
        return _onednn(a, b, None)
    return F.linear(a, b)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, initialisation and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
