"""Optimiser pieces of the reference (``utils.py``): weight-decay parameter groups, LARS, per-parameter gradient
clipping and last-layer freezing. Each is small, pure and tested against an independent computation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .dtypes import at_least_fp32

__all__ = ["get_params_groups", "LARS", "clip_gradients", "cancel_gradients_last_layer", "build_optimizer"]


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two groups: decayed (everything else) and undecayed (names ending ``.bias`` or 1-D tensors).

    As in the reference, ``cls_token``, ``pos_embed``, conv and linear weights and ``last_layer.weight_v`` are
    decayed; LayerNorm/BatchNorm parameters and biases are not. Frozen parameters are left out.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in the reference: SGD-momentum with a layer-wise trust ratio
    ``eta * ||p|| / ||g + wd p||``; weight decay and the trust ratio are skipped for 1-D parameters."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


@torch.no_grad()
def clip_gradients(model: nn.Module | Iterable[torch.Tensor], clip: float) -> torch.Tensor:
    """Per-parameter clipping: each gradient whose L2 norm ``n`` exceeds ``clip`` is scaled by
    ``clip / (n + 1e-6)`` (reference ``utils.clip_gradients``; *not* global-norm clipping).

    Vectorised with ``torch._foreach_norm`` and a single fused multiply, so it costs no host sync on a GPU; on
    CPU only the gradients above the ceiling are multiplied. Returns the per-parameter norms (before clipping)
    as one tensor.
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = at_least_fp32(torch.stack(torch._foreach_norm(grads, 2.0)))
    coefs = clip / (norms + 1e-6)
    if norms.device.type == "cpu":
        # reading the coefficients costs nothing on CPU: scale only the gradients that exceed the ceiling
        # (the multiplication by 1 of all the others is a full pass over the gradients)
        for i in (coefs < 1.0).nonzero().flatten().tolist():
            grads[i].mul_(coefs[i].to(grads[i].dtype))
        return norms
    coefs = coefs.clamp(max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefs.unbind(), grads)])
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """During the first ``freeze_last_layer`` epochs drop (set to ``None``) the gradients of every parameter
    whose name contains ``last_layer``, so the optimiser leaves it completely untouched (reference)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def _fused_supported(param_groups: list[dict]) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except Exception:
        devices = {"cuda"}
    params = [p for g in param_groups for p in g["params"]]
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def build_optimizer(name: str, param_groups: list[dict], fused: bool | None = None) -> torch.optim.Optimizer:
    """``adamw`` (PyTorch defaults), ``sgd`` (momentum 0.9) or ``lars``.

    AdamW uses PyTorch's fused kernel (one pass over parameter, gradient and both moments) wherever it exists for
    the parameters' device, CPU included (``fused=None``, the default): on a 2-core CPU it steps ViT-S + head
    ~5x faster than ``foreach`` (docs/benchmarks.md), same update to rounding. Otherwise PyTorch's default
    (``foreach`` on GPUs). lr and weight decay start at 0 and are set from the schedules every iteration, as in
    the reference.
    """
    if name == "adamw":
        if fused is None:
            fused = _fused_supported(param_groups)
        kwargs = {"fused": True} if fused else {}
        return torch.optim.AdamW(param_groups, lr=0.0, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=0, momentum=0.9, foreach=True)
    if name == "lars":
        return LARS(param_groups)
    raise ValueError(f"unknown optimizer {name!r}: choose adamw, sgd or lars")
