"""The DINO projection head (Caron et al. 2021, §3.1 and Appendix: "a 3-layer MLP with hidden dimension 2048
followed by l2 normalization and a weight normalized fully connected layer with K dimensions").

``DINOHead`` equals the reference ``vision_transformer.DINOHead``: Linear-GELU-Linear-GELU-Linear (optional
BatchNorm after the hidden linears), L2-normalised bottleneck, then a weight-normalised linear layer without
bias whose gain ``g`` is fixed at 1 when ``norm_last_layer`` (every logit is then a cosine similarity).

The weight norm is written out (``weight_g``, ``weight_v`` parameters) rather than taken from the deprecated
``nn.utils.weight_norm``: state-dict keys stay those of official checkpoints, it needs no hooks, and the
normalisation is computed once per forward (the multi-crop wrapper calls the head once per step), applied to the
output instead of the weight when the batch has fewer rows than the layer has inputs (fewer elements to touch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .models.linear import Linear, linear, matmul_nt

__all__ = ["DINOHead", "WeightNormLinear"]


class _ScaledOutputWeightNorm(torch.autograd.Function):
    """``y = (x v^T) * s`` with ``s = g / ||v||_row``: the weight-normalised layer applied to the output, with a
    backward written out so the ``[out, in]`` weight is touched as few times as possible.

    Forward and backward follow what autograd does on ``F.linear(x, v) * (g / vector_norm(v))`` under the
    caller's autocast state (same dtypes, same roundings): the product in the autocast dtype (``x`` and ``v``
    cast), the scaling in fp32. The backward gives, with ``z = x v^T``, ``dz = dy * s`` (in ``z``'s dtype) and
    ``c = sum_rows(dy * z)``::

        dx = dz v,   dg = c / ||v||,   dv = dz^T x - (c g / ||v||^3) v

    ``dv`` is one matrix product plus one fused multiply-add over the weight, where autograd's generic path runs
    the norm's backward (a division and a multiplication over the weight), casts the product's gradient to fp32
    and adds the two contributions (docs/benchmarks.md: the head's last layer)."""

    @staticmethod
    def forward(ctx, x, v, g, lowp):
        norm = torch.linalg.vector_norm(v, dim=1)  # [out], fp32
        s = g.squeeze(1) / norm
        xl, vl = (x, v) if lowp is None else (x.to(lowp), v.to(lowp))
        z = matmul_nt(xl, vl)
        ctx.save_for_backward(xl, vl, v, g, z, s, norm)
        ctx.x_dtype = x.dtype
        return z * s

    @staticmethod
    def backward(ctx, dy):
        xl, vl, v, g, z, s, norm = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):
            dz = (dy * s).to(z.dtype)
            dx = dv = dg = None
            if ctx.needs_input_grad[0]:
                dx = matmul_nt(dz, vl.t()).to(ctx.x_dtype)
            c = None
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                c = (dy * z).flatten(0, -2).sum(0)  # d loss / d s, [out]
            if ctx.needs_input_grad[1]:
                coef = -c * s / (norm * norm)  # d loss / d ||v|| over ||v||: the norm's term along v
                dvl = matmul_nt(dz.flatten(0, -2).t(), xl.flatten(0, -2).t())  # [out, in], autocast dtype
                # mixed dtypes promote inside the one kernel (no separate cast pass); same dtype: in place
                dv = torch.addcmul(dvl, v, coef.unsqueeze(1)) if dvl.dtype != v.dtype else \
                    dvl.addcmul_(v, coef.unsqueeze(1))
            if ctx.needs_input_grad[2]:
                dg = (c / norm).unsqueeze(1)
        return dx, dv, dg, None


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||_row).T`` with ``g: [out, 1]``, ``v: [out, in]``, no bias (reference last layer)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's default init, as the reference leaves it (applied after _init_weights).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows < self.in_features:
            # x (v * s)^T == (x v^T) * s with s = g / ||v||: scaling the [rows, out] output touches fewer
            # elements than the [out, in] weight (and its gradient) when there are fewer rows than inputs
            # (the DINO head at small per-process batches: 10 B rows against 256 inputs).
            dev = x.device.type
            lowp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            with torch.autocast(dev, enabled=False):
                return _ScaledOutputWeightNorm.apply(x, self.weight_v, self.weight_g, lowp)
        return linear(x, self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept torch's ``parametrizations.weight_norm`` key style (original0 = g, original1 = v).
        for new, old in (("weight_g", "parametrizations.weight.original0"),
                         ("weight_v", "parametrizations.weight.original1")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """Projection head: ``in_dim -> hidden_dim (x nlayers-1) -> bottleneck_dim -> L2 norm -> out_dim``.

    Args mirror the reference: ``use_bn`` adds BatchNorm1d after each hidden linear; ``norm_last_layer`` freezes
    the weight-norm gain at 1 (more stable; the paper's ViT-S uses False, ViT-B True); ``nlayers >= 1``.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
