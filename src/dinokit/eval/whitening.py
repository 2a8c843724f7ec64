"""Global image descriptors and PCA whitening shared by retrieval and copy detection.

* :func:`gem` -- generalised-mean pooling (Radenović et al. 2018) as the reference ``eval_copy_detection.py``
  applies it to the patch tokens of the last normed ViT block: clamp at ``eps = 1e-6``, then
  ``(mean_over_patches x^p)^(1/p)`` with ``p = 4`` (reference §4.6).
* :func:`describe` -- a ``[B, 3, H, W]`` batch to one global descriptor per image: the CLS token
  (``model(x)``, reference ``eval_image_retrieval.py``, §4.7), GeM of the patch tokens, or CLS ⊕ GeM
  (reference ``eval_copy_detection.py``, §4.6).
* :class:`PCAWhitening` -- PCA whitening learned on a separate image set (the paper: 20k YFCC100M images for
  Copydays). ``mode="reference"`` reproduces the reference exactly: the *uncentred* second-moment matrix
  ``FᵀF / n`` is eigendecomposed, eigenvalues are floored at ``max · 1e-5``, and the mean of the whitening
  features is subtracted before projecting. ``mode="centered"`` is textbook PCA whitening (covariance of the
  centred features), which is what the maths intends; the two differ by a rank-one term ``μμᵀ`` that mostly
  affects the leading eigenvector.

References: Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, ICCV 2021, §5.2/App. B;
``shared/reference/dino-reference.md`` §4.6-4.7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["DESCRIPTORS", "gem", "describe", "patch_crop", "PCAWhitening"]

DESCRIPTORS = ("cls", "gem", "cls+gem")


def gem(tokens: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM pooling over the token axis: ``[B, N, D] -> [B, D]``, ``(mean_n clamp(x, eps)^p)^(1/p)``.

    Identical to the reference's ``avg_pool2d(x.clamp(min=1e-6).pow(4), (h, w)).pow(1/4)`` on the patch grid.
    """
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def patch_crop(x: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    """Crop ``[..., H, W]`` at the bottom/right to multiples of ``patch_size``.

    The reference ViT's strided patch convolution silently ignores the remainder, so this crop gives the same
    tokens; dinokit's ViT refuses indivisible inputs instead of guessing.
    """
    if not patch_size:
        return x
    H, W = x.shape[-2:]
    h, w = H - H % patch_size, W - W % patch_size
    if h == 0 or w == 0:
        raise ConfigError(f"image of {H}x{W} pixels is smaller than one {patch_size}-pixel patch")
    return x[..., :h, :w]


def describe(model: nn.Module, x: torch.Tensor, descriptor: str = "cls", gem_p: float = 4.0) -> torch.Tensor:
    """Global descriptors ``[B, D']`` of a normalised image batch (not L2-normalised).

    ``descriptor``: ``"cls"`` -- ``model(x)`` (the CLS token after the final norm for a ViT, the pooled feature
    for a CNN); ``"gem"`` -- GeM(p) over the patch tokens of the last normed block; ``"cls+gem"`` -- both
    concatenated (the Copydays descriptor, 2·D). The input is cropped to a multiple of ``model.patch_size``.
    """
    if descriptor not in DESCRIPTORS:
        raise ConfigError(f"unknown descriptor {descriptor!r}; choose from {', '.join(DESCRIPTORS)}")
    x = patch_crop(x, getattr(model, "patch_size", None))
    if descriptor == "cls":
        return model(x)
    from .knn import is_vit

    if not is_vit(model):  # timm's get_intermediate_layers drops the CLS token and the final norm
        raise ConfigError(f"descriptor {descriptor!r} needs the patch tokens of a dinokit ViT; use --descriptor "
                          f"cls for this backbone")
    tokens = model.get_intermediate_layers(x, n=1)[0]
    pooled = gem(tokens[:, 1:], p=gem_p)
    if descriptor == "gem":
        return pooled
    return torch.cat((tokens[:, 0], pooled), dim=1)


class PCAWhitening:
    """PCA whitening ``x ↦ diag(λ^-whit) Vᵀ (x - μ)`` learned from whitening-set features.

    Args:
        mode: ``"reference"`` (second-moment matrix of the *uncentred* features, as DINO's copy-detection
            script) or ``"centered"`` (covariance of the centred features, textbook PCA).
        dim: number of leading components to keep (``None``: all, as the reference).
        whit: whitening power (0.5 = full whitening, 0 = plain PCA rotation).
        eig_floor: eigenvalues below ``max(λ) · eig_floor`` are raised to it (reference: 1e-5).
    """

    def __init__(self, mode: str = "reference", dim: int | None = None, whit: float = 0.5,
                 eig_floor: float = 1e-5):
        if mode not in ("reference", "centered"):
            raise ConfigError(f"whitening mode must be 'reference' or 'centered', not {mode!r}")
        self.mode, self.dim, self.whit, self.eig_floor = mode, dim, whit, eig_floor
        self.mean: torch.Tensor | None = None
        self.proj: torch.Tensor | None = None  # [dim, D]
        self.energy_kept: float | None = None

    def fit(self, feats: torch.Tensor) -> PCAWhitening:
        """Learn μ and the projection from ``feats`` ``[n, D]`` (computed in float64)."""
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ConfigError(f"whitening needs at least 2 feature vectors, got shape {tuple(feats.shape)}")
        f = feats.detach().to(torch.float64).cpu()
        self.mean = f.mean(dim=0)
        g = f if self.mode == "reference" else f - self.mean
        cov = g.T @ g / g.shape[0]
        evals, evecs = torch.linalg.eigh(cov)
        eps = evals.max() * self.eig_floor
        evals = torch.where(evals < eps, eps, evals)
        order = torch.argsort(evals, descending=True)
        keep = order if self.dim is None else order[: self.dim]
        self.energy_kept = float(evals[keep].sum() / evals.sum())
        self.proj = torch.diag(evals[keep] ** -self.whit) @ evecs[:, keep].T
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten ``[n, D]`` features (returned in ``x``'s dtype, not L2-normalised)."""
        if self.proj is None:
            raise RuntimeError("PCAWhitening.apply called before fit")
        y = (x.detach().to(torch.float64).cpu() - self.mean) @ self.proj.T
        return y.to(dtype=x.dtype, device=x.device)

    __call__ = apply

    def state_dict(self) -> dict:
        return {"mode": self.mode, "dim": self.dim, "whit": self.whit, "eig_floor": self.eig_floor,
                "mean": self.mean, "proj": self.proj}


def l2n(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows."""
    return F.normalize(x, dim=-1, p=2)
