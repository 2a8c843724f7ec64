"""One dtype rule shared by the numerics: compute in *at least* float32.

Low-precision values (bf16/fp16 under autocast) are upcast for softmaxes, sums and normalisations; float64
stays float64 (``x.float()`` would silently round a float64 run, e.g. the float64 equivalence tests against
the reference, to float32)."""

from __future__ import annotations

import platform

import torch

__all__ = ["EMULATED_BF16", "at_least_fp32", "at_least_fp32_dtype", "cpu_supports_bf16"]

#: the warning for bf16 asked for on a CPU where :func:`cpu_supports_bf16` is false (training and evaluations)
EMULATED_BF16 = ("precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): it is emulated, typically 2-3x "
                 "slower than fp32 here")


def at_least_fp32_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 if it is narrower, else ``x`` itself (no copy)."""
    return x.to(at_least_fp32_dtype(x.dtype))


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 dot products, where bf16 autocast pays off: AVX512-BF16 or AMX on x86,
    oneDNN's bf16 check elsewhere (on ARM it asks for the BF16 extension).

    On x86 oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is true on any AVX-512 CPU because
    oneDNN can *emulate* bf16 there, converting to fp32 on the fly; measured on such a CPU (an Intel Xeon whose
    AVX-512 lacks the BF16 instructions) a bf16 GEMM at ViT-S shapes ran at 60 GFLOP/s against fp32's 150-280, and
    the Fashion-MNIST demo's step at 157 images/s against 466 in fp32."""
    cpu = getattr(torch, "cpu", None)
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        try:
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        except Exception:
            return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False
