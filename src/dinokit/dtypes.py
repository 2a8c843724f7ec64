"""One dtype rule shared by the numerics: compute in *at least* float32.

Low-precision values (bf16/fp16 under autocast) are upcast for softmaxes, sums and normalisations; float64
stays float64 (``x.float()`` would silently round a float64 run, e.g. the float64 equivalence tests against
the reference, to float32)."""

from __future__ import annotations

import torch

__all__ = ["at_least_fp32", "at_least_fp32_dtype"]


def at_least_fp32_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 if it is narrower, else ``x`` itself (no copy)."""
    return x.to(at_least_fp32_dtype(x.dtype))
