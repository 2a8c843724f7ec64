"""DINO multi-crop augmentation (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021, Sec. 3.1 and App. "Implementation details"; reference ``DataAugmentationDINO`` in
``main_dino.py``).

Each image gives 2 global crops and ``local_crops_number`` local crops, globals first. Per crop, in order:
RandomResizedCrop (ratio 3/4..4/3, bicubic) -> horizontal flip (p 0.5) -> colour jitter (0.4, 0.4, 0.2, 0.1;
p 0.8, the four operations in random order) -> greyscale (p 0.2) -> Gaussian blur (PIL, radius U[0.1, 2];
p 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals) -> solarisation (threshold 128; p 0.2, global 2 only) ->
tensor -> ImageNet normalisation.

Two implementations of that chain:

* :class:`DINOAugmentation`: the reference, per image with PIL (torchvision ``transforms.v2`` plus two small
  transforms for PIL's Gaussian blur and solarisation). Any image size and mode.
* :class:`BatchMultiCrop`: the same distribution computed on whole uint8 batches of same-size images with
  tensor ops (CPU or GPU), for small images where PIL's per-image cost dominates (e.g. Fashion-MNIST).

:func:`eval_transform` is the reference evaluation transform (resize 256 / centre crop 224, bicubic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image, ImageFilter, ImageOps

from .data import to_rgb
from .errors import ConfigError, DataError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DINOAugmentation", "BatchMultiCrop", "RandomGaussianBlur",
    "RandomSolarize", "ToRGB", "CropParams", "sample_crop_boxes", "eval_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale


# ---------------------------------------------------------------------------------------------------------
# argument checks


def _check_scale(name: str, scale) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be two numbers (min, max), got {scale!r}") from None
    if not (0.0 < lo <= 1.0 and 0.0 < hi <= 1.0):
        raise ConfigError(f"{name} values must be fractions of the image area in (0, 1], got {scale!r}")
    if lo > hi:
        raise ConfigError(f"{name} must be (min, max) with min <= max, got {scale!r}")
    return lo, hi


def _check_size(name: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ConfigError(f"{name} must be a positive integer number of pixels, got {size!r}")
    return int(size)


def _check_prob(name: str, p) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}")
    return p


def _check_probs(name: str, ps, n: int) -> tuple[float, ...]:
    try:
        ps = tuple(ps)
    except TypeError:
        raise ConfigError(f"{name} must be {n} probabilities, got {ps!r}") from None
    if len(ps) != n:
        raise ConfigError(f"{name} must be {n} probabilities (global 1, global 2, locals), got {ps!r}")
    return tuple(_check_prob(name, p) for p in ps)


def _check_stats(name: str, values, positive: bool) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}") from None
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals) or (positive and min(vals) <= 0):
        raise ConfigError(f"{name} must be 3 finite numbers{' > 0' if positive else ''}, got {values!r}")
    return vals  # type: ignore[return-value]


def _check_common(global_crops_scale, local_crops_scale, local_crops_number, global_crop_size,
                  local_crop_size, mean, std):
    gs = _check_scale("global_crops_scale", global_crops_scale)
    ls = _check_scale("local_crops_scale", local_crops_scale)
    if isinstance(local_crops_number, bool) or not isinstance(local_crops_number, (int, np.integer)) \
            or local_crops_number < 0:
        raise ConfigError(f"local_crops_number must be an integer >= 0, got {local_crops_number!r}")
    gsz = _check_size("global_crop_size", global_crop_size)
    lsz = _check_size("local_crop_size", local_crop_size)
    return (gs, ls, int(local_crops_number), gsz, lsz, _check_stats("mean", mean, False),
            _check_stats("std", std, True))


# ---------------------------------------------------------------------------------------------------------
# the reference PIL chain


def _as_pil(img) -> Image.Image:
    """PIL image from a PIL image, a uint8/float tensor ``[H, W]`` / ``[C, H, W]`` or a numpy array
    (``[H, W]`` / ``[H, W, C]``)."""
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, torch.Tensor):
        x = img.detach().cpu()
        if x.ndim == 3:
            if x.shape[0] not in (1, 2, 3, 4):
                raise DataError(f"expected an image tensor [C, H, W] with C in 1..4, got {tuple(x.shape)}")
            x = x[0] if x.shape[0] <= 2 else x[:3].permute(1, 2, 0)
        elif x.ndim != 2:
            raise DataError(f"expected an image tensor [H, W] or [C, H, W], got {tuple(x.shape)}")
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round()
        return Image.fromarray(x.to(torch.uint8).contiguous().numpy())
    if isinstance(img, np.ndarray):
        try:
            return Image.fromarray(img)
        except (TypeError, ValueError) as err:
            raise DataError(f"cannot make an image of a {img.dtype} array of shape {img.shape}: {err}") \
                from err
    raise DataError(f"expected a PIL image, tensor or numpy array, got {type(img).__name__}")


class ToRGB:
    """Any PIL image (or image tensor/array) to 8-bit RGB PIL; see :func:`dinokit.data.to_rgb` (16-bit images
    are rescaled, not clipped)."""

    def __call__(self, img) -> Image.Image:
        img = to_rgb(_as_pil(img))
        if img.width == 0 or img.height == 0:
            raise DataError("cannot augment an image of zero size")
        return img

    def __repr__(self) -> str:
        return "ToRGB()"


class RandomGaussianBlur:
    """With probability ``p``, ``PIL.ImageFilter.GaussianBlur(radius)`` with ``radius ~ U[radius_min,
    radius_max]`` (reference ``utils.GaussianBlur``; Pillow implements it as an extended box blur).

    The coin and the radius come from torch's RNG (the reference uses Python's ``random``; same distribution,
    but one ``torch.manual_seed`` now seeds the whole chain). ``p = 1`` always blurs."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p = _check_prob("blur probability", p)
        if not 0 <= radius_min <= radius_max:
            raise ConfigError(f"blur radius range must satisfy 0 <= min <= max, got "
                              f"({radius_min}, {radius_max})")
        self.radius_min, self.radius_max = float(radius_min), float(radius_max)

    def apply(self, img: Image.Image, radius: float) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0.0 or (self.p < 1.0 and float(torch.rand(())) >= self.p):
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * float(torch.rand(()))
        return self.apply(img, radius)

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class RandomSolarize:
    """With probability ``p``, ``PIL.ImageOps.solarize(img, threshold)``: every value ``v >= threshold``
    becomes ``255 - v`` (reference ``utils.Solarization``, threshold 128). Coin from torch's RNG."""

    def __init__(self, p: float = 0.2, threshold: int = 128):
        self.p = _check_prob("solarize probability", p)
        self.threshold = int(threshold)

    def apply(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=self.threshold)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0.0 or (self.p < 1.0 and float(torch.rand(())) >= self.p):
            return img
        return self.apply(img)

    def __repr__(self) -> str:
        return f"RandomSolarize(p={self.p}, threshold={self.threshold})"


def _to_normalized_tensor(mean, std) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


class DINOAugmentation:
    """The reference multi-crop augmentation (``DataAugmentationDINO``), with PIL.

    ``aug(img) -> [global1, global2, local1, ..., localL]``: float tensors ``[3, S, S]`` normalised with
    ``mean``/``std``. ``img`` may be a PIL image of any mode (converted to RGB by :class:`ToRGB`; 16-bit
    images are rescaled), a uint8 image tensor ``[H, W]``/``[C, H, W]`` or a numpy array. Images smaller than
    a crop are upscaled by RandomResizedCrop. All randomness comes from torch's RNG.

    The per-crop transforms are ``self.global1``, ``self.global2`` and ``self.local`` (``T.Compose`` objects),
    built exactly as in the paper's reference code (see the module docstring); ``self.transforms`` lists the
    transform of every output crop in order.
    """

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 blur: Sequence[float] = (1.0, 0.1, 0.5), solarize: Sequence[float] = (0.0, 0.2, 0.0)):
        (self.global_crops_scale, self.local_crops_scale, self.local_crops_number, self.global_crop_size,
         self.local_crop_size, self.mean, self.std) = _check_common(
            global_crops_scale, local_crops_scale, local_crops_number, global_crop_size, local_crop_size,
            mean, std)
        # Gaussian-blur and solarisation probabilities of global crop 1, global crop 2 and the local crops
        self.blur = _check_probs("blur", blur, 3)
        self.solarize = _check_probs("solarize", solarize, 3)
        self.to_rgb = ToRGB()

        def flip_and_color_jitter():
            return [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]

        def rrc(size, scale):
            return T.RandomResizedCrop(size, scale=scale, ratio=_RATIO,
                                       interpolation=T.InterpolationMode.BICUBIC, antialias=True)

        tail = _to_normalized_tensor(self.mean, self.std)
        gsize, gscale = self.global_crop_size, self.global_crops_scale
        # with the default probabilities exactly the reference's chains (no solarisation step where it has none)
        blur, sol = self.blur, self.solarize
        self.global1, self.global2, self.local = (
            T.Compose([rrc(size, scale), *flip_and_color_jitter(), RandomGaussianBlur(blur[i]),
                       *([RandomSolarize(sol[i])] if sol[i] else []), *tail])
            for i, (size, scale) in enumerate([(gsize, gscale), (gsize, gscale),
                                               (self.local_crop_size, self.local_crops_scale)]))

    @property
    def transforms(self) -> list:
        return [self.global1, self.global2] + [self.local] * self.local_crops_number

    def __call__(self, img) -> list[torch.Tensor]:
        img = self.to_rgb(img)
        crops = [self.global1(img), self.global2(img)]
        return crops + [self.local(img) for _ in range(self.local_crops_number)]

    def __repr__(self) -> str:
        return (f"DINOAugmentation(global {self.global_crop_size}px scale {self.global_crops_scale}, "
                f"{self.local_crops_number} x local {self.local_crop_size}px scale {self.local_crops_scale})")


def eval_resize_size(image_size: int, resize_size: int | None = None) -> int:
    """The evaluation resize (shorter side): ``resize_size`` when given, else ``int(image_size * 256 / 224)``
    (256 for 224, the reference's values)."""
    return int(image_size * 256 / 224) if resize_size is None else resize_size


def eval_transform(image_size: int = 224, resize_size: int | None = None,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Reference evaluation transform (k-NN and linear probe): RGB -> Resize(shorter side ``resize_size``,
    bicubic) -> CenterCrop(``image_size``) -> tensor -> Normalize. ``resize_size`` defaults to
    ``int(image_size * 256 / 224)`` (256 for 224, the reference's values)."""
    image_size = _check_size("image_size", image_size)
    resize_size = _check_size("resize_size", eval_resize_size(image_size, resize_size))
    mean, std = _check_stats("mean", mean, False), _check_stats("std", std, True)
    resize = T.Resize(resize_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    return T.Compose([ToRGB(), resize, T.CenterCrop(image_size), *_to_normalized_tensor(mean, std)])


# ---------------------------------------------------------------------------------------------------------
# the batched tensor chain


@dataclass
class CropParams:
    """Random parameters of ``n = views * batch`` crops (view-major: all samples of view 0, then view 1, ...).
    Boxes are in input pixels (``top``, ``left``, ``height``, ``width``, int64); ``order`` holds, per sample,
    the jitter operation order (0 brightness, 1 contrast, 2 saturation, 3 hue); ``factors`` the four jitter
    factors (brightness, contrast, saturation, hue shift)."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def to(self, device) -> CropParams:
        return CropParams(**{k: v.to(device) for k, v in self.__dict__.items()})


def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float] =
_RATIO,
                      generator: torch.Generator | None = None):
    """``n`` RandomResizedCrop boxes ``(top, left, h, w)`` for an image ``height x width``, drawn exactly like
    ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 tries of area ``U(scale) * H * W`` and
    log-uniform aspect ratio, the first try that fits wins, position uniform; if none fits, the central crop
    clamped to ``ratio``. Vectorised over ``n``; returns int64 tensors on the generator's device."""
    dev = generator.device if generator is not None else torch.device("cpu")
    area = float(height * width)
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(n, 2, 10, generator=generator, device=dev, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[:, 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1).long()
    h = h.gather(1, first).squeeze(1).long()
    pos = torch.rand(n, 2, generator=generator, device=dev, dtype=torch.float64)
    top = torch.minimum(torch.floor(pos[:, 0] * (height - h + 1)).long(), height - h)
    left = torch.minimum(torch.floor(pos[:, 1] * (width - w + 1)).long(), width - w)
    # fallback: central crop
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    ft, fl = (height - fh) // 2, (width - fw) // 2
    top = torch.where(found, top, torch.full_like(top, ft))
    left = torch.where(found, left, torch.full_like(left, fl))
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    return top, left, h, w


def _cubic(d: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Pillow's bicubic kernel (a = -0.5), support 2."""
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = (((d - 5) * d + 8) * d - 4) * a
    return torch.where(d < 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _triangle(d: torch.Tensor) -> torch.Tensor:
    return (1 - d.abs()).clamp_min(0)


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int,
                     interpolation: str = "bicubic") -> torch.Tensor:
    """``[n, out_size, in_size]`` float32 weights that resize the crop ``[start, start + length)`` of a line
    of
    ``in_size`` pixels to ``out_size`` pixels like Pillow's ``Image.crop(...).resize(..., BICUBIC)``: output
    pixel ``i`` samples at ``(i + 0.5) * length / out_size`` with the kernel widened by the downscale factor
    (antialiasing), taps confined to the crop, weights normalised to sum 1."""
    kernel, support = (_cubic, 2.0) if interpolation == "bicubic" else (_triangle, 1.0)
    n, dev = start.shape[0], start.device
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size
    fscale = scale.clamp_min(1.0)
    # taps per output pixel: enough for the widest kernel possible (a crop can be at most in_size long)
    ntaps = int(math.ceil(2 * support * max(1.0, in_size / out_size))) + 2
    center = (torch.arange(out_size, dtype=torch.float32, device=dev)[None, :, None] + 0.5) * scale
    first = torch.floor(center - support * fscale + 0.5)
    taps = first + torch.arange(ntaps, dtype=torch.float32, device=dev)  # crop-relative pixel indices
    w = kernel((taps + 0.5 - center) / fscale) * ((taps >= 0) & (taps < length))
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    idx = (taps + start).clamp(0, in_size - 1).long()
    return torch.zeros(n, out_size, in_size, dtype=torch.float32, device=dev).scatter_add_(2, idx, w)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return _GREY[0] * x[:, 0:1] + _GREY[1] * x[:, 1:2] + _GREY[2] * x[:, 2:3]


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB ``x`` ``[N, 3, H, W]`` in [0, 1] by ``shift`` ``[N]`` (fractions of a turn),
    through HSV like torchvision's/PIL's ``adjust_hue`` (value and saturation kept)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-12)
    dsafe = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / dsafe,
                    torch.where(maxc == g, 2.0 + (b - r) / dsafe, 4.0 + (r - g) / dsafe))
    h6 = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)  # hue in sextants, [0, 6)
    # HSV -> RGB: channel c = v - v * s * clamp(min(k, 4 - k), 0, 1) with k = (n_c + h6) mod 6, n = (5, 3, 1)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                        + h6.unsqueeze(1), 6.0)
    v = maxc.unsqueeze(1)
    return v - v * s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _pil_box_radius(sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """Pillow's ``_gaussian_blur_radius``: the fractional box radius whose ``passes`` box blurs have the
    variance of a Gaussian of std ``sigma`` (Gwosdek et al. 2011, "extended box filter")."""
    s2 = sigma.to(torch.float64) ** 2 / passes
    length = torch.sqrt(12.0 * s2 + 1.0)
    whole = torch.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))
    return whole + frac


def _pil_box_kernel(sigma: torch.Tensor, half: int) -> torch.Tensor:
    """``[n, 2 * half + 1]`` kernel of one pass of Pillow's extended box blur for ``GaussianBlur(sigma)``:
    ``2R + 1`` taps of weight ``1 / (2r + 1)`` and two end taps of ``(r - R) / (2r + 1)``, with
    ``r`` = :func:`_pil_box_radius` and ``R = floor(r)``. Pillow applies it 3 times per axis."""
    r = _pil_box_radius(sigma)[:, None]
    whole = torch.floor(r)
    t = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float64).abs()
    end_tap = torch.where(t == whole + 1, (r - whole) / (2 * r + 1), 0.0)
    box = torch.where(t <= whole, 1.0 / (2 * r + 1), end_tap)
    return (box / box.sum(dim=1, keepdim=True)).to(torch.float32)


def _blur_matrix(kernel: torch.Tensor, apply: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, size, size]`` matrices applying the 1-D ``kernel`` ``[n, 2R + 1]`` with a replicated border;
    identity where ``apply`` is False."""
    n, ntap = kernel.shape
    radius, dev = ntap // 2, kernel.device
    t = torch.arange(-radius, radius + 1, device=dev)
    k = torch.where(apply[:, None], kernel, (t == 0).to(kernel.dtype).expand_as(kernel))
    idx = (torch.arange(size, device=dev)[:, None] + t).clamp(0, size - 1)
    return torch.zeros(n, size, size, device=dev, dtype=kernel.dtype).scatter_add_(
        2, idx.expand(n, size, ntap), k[:, None, :].expand(n, size, ntap))


def _separable(x: torch.Tensor, my: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """``my[b] @ x[b, c] @ mx[b]^T`` for every sample b and channel c (two bmm calls). ``x``: ``[n, C, H,
    W]``, ``my``: ``[n, S, H]``, ``mx``: ``[n, R, W]`` -> ``[n, C, S, R]``."""
    n, C, H, W = x.shape
    S, R = my.shape[1], mx.shape[1]
    rows = torch.bmm(my, x.permute(0, 2, 1, 3).reshape(n, H, C * W))  # [n, S, C*W]
    rows = rows.view(n, S, C, W).permute(0, 2, 1, 3).reshape(n, C * S, W)
    return torch.bmm(rows, mx.transpose(1, 2)).view(n, C, S, R)


class BatchMultiCrop:
    """DINO multi-crop on whole batches with tensor ops: ``aug(images_uint8 [B, C, H, W]) -> [global1,
    global2, local1, ...]``, each ``[B, 3, S, S]`` float32 normalised, on the input's device (CPU or CUDA).

    Same chain, same parameter distributions as :class:`DINOAugmentation` (the reference, Caron et al. 2021),
    per sample:

    * **crop**: boxes drawn exactly like torchvision's ``RandomResizedCrop.get_params`` (10 tries, then the
      central-crop fallback; :func:`sample_crop_boxes`), resampled like Pillow's ``crop().resize(BICUBIC)``
      (a = -0.5 kernel, support widened when downscaling, taps confined to the crop, horizontal then vertical
      pass, each clipped to [0, 1]) as batched matrix products with per-sample resampling matrices; the
      **flip** is the same matrix with its output columns reversed.
    * **colour jitter** (p ``jitter_p``): brightness, contrast, saturation and hue factors drawn from the same
      uniform ranges as ``ColorJitter`` and applied in a per-sample uniformly random order (like
      ``ColorJitter``), each op clipped to [0, 1] like PIL's uint8 output. Brightness (blend with black),
      contrast (blend with the mean luma) and saturation (blend with the luma image) are PIL's
      ``ImageEnhance`` formulas; hue rotates the HSV hue.
    * **greyscale** (p ``grayscale_p``): ITU-R 601 luma (PIL's ``convert("L")``) replicated to 3 channels.
    * **Gaussian blur** (p ``blur[view]``, sigma ~ U[0.1, 2]): Pillow's own ``GaussianBlur`` filter, i.e.
      three passes per axis of its extended box filter with a replicated border, with a per-sample kernel
      (batched matrix products for crops up to 64 px, grouped convolutions above).
    * **solarisation** (p ``solarize[view]``): ``x >= 0.5 -> 1 - x``.
    * normalisation with ``mean``/``std``.

    What differs from the PIL chain, and why the distribution is preserved:

    * Pixels stay float between operations where PIL rounds to uint8 after each one (and after each resize and
      blur pass): differences of about one grey level per operation, no change to any parameter distribution.
      Solarising continuous values at 0.5 equals PIL's rounding to uint8 then thresholding at 128
      (v >= 127.5 rounds to >= 128). Measured against Pillow: crop-resize within 1 grey level, blur within 3.
    * Hue in PIL is quantised to 1/256 turn; here it is continuous.
    * Single-channel inputs are processed on one channel and replicated to RGB at the end: for grey images
      saturation, hue and greyscale are exact no-ops in the reference (a grey pixel's luma is itself and its
      HSV saturation is 0), so they are skipped, while their random draws are still made (the same RNG
      stream, and the same parameter distribution as for RGB inputs).
    * The random numbers come from a ``torch.Generator`` (argument to ``__call__``, else the one given to the
      constructor, else torch's global RNG) and are drawn on the generator's device, so a seed gives the same
      crops on CPU and GPU; the draws differ from torchvision's stream, not their distribution.

    ``__call__(images, generator=None, return_params=False)``; with ``return_params`` it returns
    ``(crops, {"global": CropParams, "local": CropParams})`` (for tests and diagnostics). Inputs may be uint8
    (0..255) or float in [0, 1], ``[B, H, W]`` or ``[B, C, H, W]`` with C = 1, 3 (or 4: alpha dropped).
    """

    def __init__(self, global_crop_size: int = 224, local_crop_size: int = 96, local_crops_number: int = 8,
                 global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 blur: Sequence[float] = (1.0, 0.1, 0.5), solarize: Sequence[float] = (0.0, 0.2, 0.0),
                 jitter_p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, grayscale_p: float = 0.2, flip_p: float = 0.5,
                 generator: torch.Generator | None = None, *, ratio: Sequence[float] = _RATIO,
                 blur_sigma: Sequence[float] = (0.1, 2.0), interpolation: str = "bicubic"):
        (self.global_crops_scale, self.local_crops_scale, self.local_crops_number, self.global_crop_size,
         self.local_crop_size, self.mean, self.std) = _check_common(
            global_crops_scale, local_crops_scale, local_crops_number, global_crop_size, local_crop_size,
            mean, std)
        self.blur = _check_probs("blur", blur, 3)
        self.solarize = _check_probs("solarize", solarize, 3)
        self.jitter_p = _check_prob("jitter_p", jitter_p)
        self.grayscale_p = _check_prob("grayscale_p", grayscale_p)
        self.flip_p = _check_prob("flip_p", flip_p)
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if not (isinstance(hue, (int, float)) and 0 <= hue <= 0.5):
            raise ConfigError(f"hue must be a number in [0, 0.5], got {hue!r}")
        self.brightness, self.contrast, self.saturation, self.hue = (float(brightness), float(contrast),
                                                                     float(saturation), float(hue))
        try:
            r0, r1 = (float(v) for v in ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"ratio must be two numbers (min, max), got {ratio!r}") from None
        if not 0 < r0 <= r1:
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {ratio!r}")
        self.ratio = (r0, r1)
        try:
            s0, s1 = (float(v) for v in blur_sigma)
        except (TypeError, ValueError):
            raise ConfigError(f"blur_sigma must be two numbers (min, max), got {blur_sigma!r}") from None
        if not 0 < s0 <= s1:
            raise ConfigError(f"blur_sigma must satisfy 0 < min <= max, got {blur_sigma!r}")
        self.blur_sigma = (s0, s1)
        if interpolation not in ("bicubic", "bilinear"):
            raise ConfigError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        self.interpolation = interpolation
        self.generator = generator

    # -- parameters -------------------------------------------------------------------------------------
    def sample_params(self, batch: int, height: int, width: int, views: int, scale: Sequence[float],
                      blur_p: Sequence[float], solarize_p: Sequence[float],
                      generator: torch.Generator | None = None) -> CropParams:
        """Random parameters for ``views`` crops of each of ``batch`` images of size ``height x width``;
        ``blur_p``/``solarize_p`` give one probability per view."""
        g = generator
        dev = g.device if g is not None else torch.device("cpu")
        n = views * batch
        top, left, h, w = sample_crop_boxes(n, height, width, scale, self.ratio, g)
        u = torch.rand(n, 6, generator=g, device=dev)
        per_view = torch.arange(views, device=dev).repeat_interleave(batch)
        bp = torch.tensor(list(blur_p), dtype=torch.float32, device=dev)[per_view]
        sp = torch.tensor(list(solarize_p), dtype=torch.float32, device=dev)[per_view]
        order = torch.rand(n, 4, generator=g, device=dev).argsort(dim=1)  # uniform random permutations
        fu = torch.rand(n, 4, generator=g, device=dev, dtype=torch.float64)
        lo = torch.tensor([max(0.0, 1 - self.brightness), max(0.0, 1 - self.contrast),
                           max(0.0, 1 - self.saturation), -self.hue], dtype=torch.float64, device=dev)
        hi = torch.tensor([1 + self.brightness, 1 + self.contrast, 1 + self.saturation, self.hue],
                          dtype=torch.float64, device=dev)
        factors = (lo + (hi - lo) * fu).float()
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, 5]
        return CropParams(top=top, left=left, height=h, width=w, flip=u[:, 0] < self.flip_p,
                          jitter=u[:, 1] < self.jitter_p, order=order, factors=factors,
                          grayscale=u[:, 2] < self.grayscale_p, blur=u[:, 3] < bp, sigma=sigma,
                          solarize=u[:, 4] < sp)

    # -- rendering --------------------------------------------------------------------------------------
    def _crop_resize(self, x: torch.Tensor, p: CropParams, views: int, size: int) -> torch.Tensor:
        """Crop + resize (+ flip) of every view of every image: like Pillow, a horizontal pass then a vertical
        pass, each clamped to [0, 1] (Pillow stores each pass as uint8, clipping bicubic overshoot)."""
        B, C, H, W = x.shape
        wy = _resample_matrix(p.top, p.height, size, H, self.interpolation).to(x.dtype)
        wx = _resample_matrix(p.left, p.width, size, W, self.interpolation).to(x.dtype)
        wx = torch.where(p.flip[:, None, None], wx.flip(1), wx)  # horizontal flip = reversed output columns
        # horizontal: per image b, [C*H, W] @ [W, views*size] (one bmm over the batch, the image read once)
        wx = wx.view(views, B, size, W).permute(1, 3, 0, 2).reshape(B, W, views * size)
        cols = torch.bmm(x.reshape(B, C * H, W), wx).clamp_(0.0, 1.0)  # [B, C*H, views*size]
        # vertical: per crop, [size, H] @ [H, C*size]
        cols = cols.view(B, C, H, views, size).permute(3, 0, 2, 1, 4).reshape(views * B, H, C * size)
        out = torch.bmm(wy.view(views * B, size, H), cols)  # [views*B, size, C*size]
        return out.view(views * B, size, C, size).permute(0, 2, 1, 3).clamp_(0.0, 1.0).contiguous()

    def _jitter(self, x: torch.Tensor, p: CropParams) -> torch.Tensor:
        rgb = x.shape[1] == 3
        n = x.shape[0]
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=x.device, dtype=x.dtype)
        factors = torch.where(p.jitter[:, None], p.factors.to(x.dtype), identity)
        if not rgb:  # saturation and hue are exact no-ops on grey images
            grey_noop = torch.tensor([False, False, True, True], device=x.device)
            factors = torch.where(grey_noop, identity, factors)
        for k in range(4):
            op = p.order[:, k]
            f = factors.gather(1, op[:, None]).squeeze(1)
            is_hue = op == 3
            # brightness: blend with 0; contrast: with the mean luma; saturation: with the luma image.
            # blend == 1 (identity, or a hue step) gives exactly x.
            blend = torch.where(is_hue, torch.ones_like(f), f).view(n, 1, 1, 1)
            grey = _luma(x) if rgb else x
            use_mean = (op == 1).to(x.dtype).view(n, 1, 1, 1)
            use_grey = (op == 2).to(x.dtype).view(n, 1, 1, 1)
            target = use_mean * grey.mean(dim=(1, 2, 3), keepdim=True) + use_grey * grey
            x = (blend * x + (1 - blend) * target).clamp_(0.0, 1.0)
            if rgb and self.hue > 0:
                idx = torch.nonzero(is_hue & p.jitter).squeeze(1)
                if idx.numel():
                    x = x.index_copy(0, idx, _adjust_hue(x.index_select(0, idx), f.index_select(0, idx)))
        return x

    def _blur(self, x: torch.Tensor, p: CropParams) -> torch.Tensor:
        """Pillow's GaussianBlur: 3 passes of the extended box filter per axis, each with a replicated
        border."""
        n, C, h, w = x.shape
        half = int(math.floor(float(_pil_box_radius(torch.tensor([self.blur_sigma[1]]))[0]))) + 1
        box = _pil_box_kernel(p.sigma.to(x.device), half)
        if h <= 64:  # small crops: the 3 passes as one matrix per sample, applied with two batched products
            one = _blur_matrix(box, p.blur.to(x.device), h)
            m = torch.bmm(torch.bmm(one, one), one).to(x.dtype)
            return _separable(x, m, m)
        identity = (torch.arange(-half, half + 1, device=x.device) == 0).to(box.dtype)
        k = torch.where(p.blur.to(x.device)[:, None], box, identity).to(x.dtype).repeat_interleave(C, dim=0)
        y = x.reshape(1, n * C, h, w)
        for _ in range(3):
            y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * C)
        for _ in range(3):
            y = F.conv2d(F.pad(y, (0, 0, half, half), mode="replicate"), k[:, None, :, None], groups=n * C)
        return y.view(n, C, h, w)

    def _render(self, x: torch.Tensor, p: CropParams, views: int, size: int) -> torch.Tensor:
        out = self._crop_resize(x, p, views, size)
        out = self._jitter(out, p)
        if out.shape[1] == 3:
            grey = _luma(out).expand(-1, 3, -1, -1)
            out = torch.where(p.grayscale.view(-1, 1, 1, 1), grey, out)
        if bool(p.blur.any()):
            out = self._blur(out, p)
        out = torch.where(p.solarize.view(-1, 1, 1, 1) & (out >= 0.5), 1.0 - out, out)
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=out.device, dtype=out.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=out.device, dtype=out.dtype).view(1, 3, 1, 1)
        return ((out - mean) / std).contiguous()

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 return_params: bool = False):
        if not isinstance(images, torch.Tensor):
            raise DataError(f"BatchMultiCrop expects an image tensor [B, C, H, W], got "
                            f"{type(images).__name__}")
        x = images
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] not in (1, 3, 4) or min(x.shape[0], x.shape[2], x.shape[3]) == 0:
            raise DataError(f"BatchMultiCrop expects images [B, H, W] or [B, C, H, W] with C in 1/3/4 and B, "
                            f"H, "
                            f"W > 0, got {tuple(images.shape)}")
        if x.shape[1] == 4:
            x = x[:, :3]
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif x.is_floating_point():
            x = x.float().clamp(0.0, 1.0)
        else:
            raise DataError(f"BatchMultiCrop expects uint8 (0..255) or float (0..1) images, got {x.dtype}")
        gen = generator if generator is not None else self.generator
        B, _, H, W = x.shape
        pg = self.sample_params(B, H, W, 2, self.global_crops_scale, self.blur[:2], self.solarize[:2], gen)
        crops = list(self._render(x, pg.to(x.device), 2, self.global_crop_size).split(B))
        pl = None
        if self.local_crops_number:
            L = self.local_crops_number
            pl = self.sample_params(B, H, W, L, self.local_crops_scale, [self.blur[2]] * L,
                                    [self.solarize[2]] * L, gen)
            crops += list(self._render(x, pl.to(x.device), L, self.local_crop_size).split(B))
        if return_params:
            return crops, {"global": pg, "local": pl}
        return crops

    def __repr__(self) -> str:
        return (f"BatchMultiCrop(global {self.global_crop_size}px scale {self.global_crops_scale}, "
                f"{self.local_crops_number} x local {self.local_crop_size}px scale {self.local_crops_scale}, "
                f"blur {self.blur}, solarize {self.solarize})")
