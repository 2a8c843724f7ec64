"""A faster multi-crop augmentation for ordinary photographs, with the reference chain's distribution.

:class:`FastMultiCrop` has the call contract of :class:`dinokit.augmentation.DINOAugmentation` (an image in — a
PIL image, a path, a uint8 tensor or array — and the list ``[global1, global2, local1, ...]`` of normalised float
tensors ``[3, S, S]`` out) and draws every random parameter from the same distribution as the reference
``DataAugmentationDINO`` (Caron et al. 2021; dino-reference.md §3):

* crop boxes exactly like ``RandomResizedCrop.get_params`` (:func:`dinokit.augmentation.sample_crop_boxes`:
  area ``U(scale)``, log-uniform aspect in [3/4, 4/3], 10 tries, then the central fallback); horizontal flip
  p 0.5; colour jitter p 0.8 with brightness/contrast ``U[0.6, 1.4]``, saturation ``U[0.8, 1.2]``, hue
  ``U[-0.1, 0.1]`` in a uniformly random order per crop; greyscale p 0.2; Gaussian blur with ``sigma ~ U[0.1,
  2]`` at p 1.0 / 0.1 / 0.5 (global 1 / global 2 / locals); solarisation p 0.2 on global 2; ImageNet
  normalisation.

What makes it faster (docs/benchmarks.md has the figures, ``benchmarks/augment.py`` measures them):

* **JPEG draft decoding**: given a path (or a not-yet-loaded ``Image.open`` result), the crop boxes are drawn
  from the header's size first, and the JPEG is decoded by libjpeg's DCT scaling at the smallest scale (1/2, 1/4,
  1/8) at which every crop still has at least as many pixels as its output (large photos decode 4-60x less);
* **crop before resize, in one kernel**: each crop is resampled straight from its box of the decoded uint8 image by
  PyTorch's antialiased bicubic kernel for uint8 channels-last images (Pillow's filter, a = -0.5, support widened
  when downscaling), ~7x faster than Pillow's resize at 224 px;
* **batched colour ops**: the 2 global and the L local crops are processed as two float batches; each jitter
  operation runs once per group on the crops that draw it at that position; blur and solarisation run on the
  small crops (after the resize, as in the reference);
* **blur**: Pillow's own ``GaussianBlur`` — three passes per axis of its extended box filter with a replicated
  border — as one matrix per crop applied on both axes (two matrix products).

What differs from the PIL chain, none of it a parameter distribution: pixels stay float between operations where
PIL rounds to uint8 after each (about one grey level per operation; crop-resize within one level of Pillow's);
hue is continuous where PIL quantises it to 1/256 turn; draft decoding replaces the first stage of a large
downscale by libjpeg's DCT scaling (only when every crop keeps at least its output resolution; the boxes are then
rounded to the reduced grid, moving them by at most half a reduced pixel); the random
numbers come from torch's RNG in a different order than torchvision's (same distributions; one
``torch.manual_seed`` fixes everything, as in :class:`DINOAugmentation`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .augmentation import IMAGENET_MEAN, IMAGENET_STD, _check_common, _check_probs
from .data import to_rgb
from .errors import DataError

__all__ = ["FastMultiCrop", "pil_box_blur_matrix", "pil_box_blur_matrices", "hsv_hue_shift"]

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma: PIL's convert("L")
_ALLOCATOR_TUNED = False
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ---------------------------------------------------------------------------------------------------------
# pixel operations on float batches [n, 3, S, S] in [0, 1]


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0:1] * _GREY[0]).add_(x[:, 1:2], alpha=_GREY[1]).add_(x[:, 2:3], alpha=_GREY[2])


_SEXTANT = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def hsv_hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB ``x`` ``[n, 3, H, W]`` (values in [0, 1]) by ``shift`` ``[n]`` turns, keeping
    saturation and value (torchvision's / PIL's ``adjust_hue``; ties of the maximum resolved r, then g, then b).

    Written with cheap element-wise ops only (no ``where``/``remainder``/arg-max): ~4x faster on CPU than the
    textbook form."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    mr = (r == maxc).to(x.dtype)
    mg = (g == maxc).to(x.dtype).mul_(1.0 - mr)
    mb = 1.0 - mr - mg
    # hue * delta, in sextants: max r -> g - b; max g -> b - r + 2 delta; max b -> r - g + 4 delta
    hd = (g - b).mul_(mr).add_(((b - r).add_(delta, alpha=2.0)).mul_(mg)).add_(((r - g).add_(delta, alpha=4.0))
                                                                               .mul_(mb))
    h = hd.div_(delta.clamp_min(1e-12)).add_((6.0 * shift + 6.0).view(-1, 1, 1))  # in [0, 12)
    # channel c = max - delta * clamp(min(k, 4 - k), 0, 1), k = (n_c + h) mod 6, n = (5, 3, 1)
    k = h.unsqueeze(1) + _SEXTANT.to(x.dtype)
    k = k.sub_(torch.floor(k.mul(1.0 / 6.0)).mul_(6.0))
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * k


def _pil_box_radius(sigma: float, passes: int = 3) -> float:
    """Pillow's ``_gaussian_blur_radius`` (Gwosdek et al. 2011, extended box filter)."""
    s2 = sigma * sigma / passes
    length = math.sqrt(12.0 * s2 + 1.0)
    whole = math.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))
    return whole + frac


def _box_taps(sigma: float, passes: int = 3) -> list[float]:
    """One pass of Pillow's extended box filter: ``2R + 1`` taps of ``1 / (2r + 1)`` and two end taps of
    ``(r - R) / (2r + 1)`` (``r`` = :func:`_pil_box_radius`, ``R = floor(r)``), as a list of ``2R + 3`` taps."""
    r = _pil_box_radius(float(sigma), passes)
    whole = math.floor(r)
    end = (r - whole) / (2 * r + 1)
    return [end] + [1.0 / (2 * r + 1)] * (2 * whole + 1) + [end]


def _one_pass_matrix(taps: list[float], size: int) -> torch.Tensor:
    """One box pass with a replicated border as a ``[size, size]`` float64 matrix."""
    half = len(taps) // 2
    m = np.zeros((size, size))
    rows = np.arange(size)
    for t, w in enumerate(taps):
        m[rows, np.clip(rows + t - half, 0, size - 1)] += w  # one (row, col) per row per tap
    return torch.from_numpy(m)


def pil_box_blur_matrix(sigma: float, size: int, passes: int = 3) -> torch.Tensor:
    """``[size, size]`` float64 matrix ``M`` with ``M @ line`` = Pillow's ``GaussianBlur(sigma)`` along one axis:
    ``passes`` extended box filters, each with a replicated border (Pillow's ``ImagingGaussianBlur``).

    Built in O(size * taps): interior rows are the composed kernel on the band; the rows within reach of a border
    are taken from the exact product of the one-pass operators on a small window."""
    taps = _box_taps(sigma, passes)
    comp = np.array([1.0])
    for _ in range(passes):
        comp = np.convolve(comp, taps)
    half = len(comp) // 2  # reach of the composed filter
    if size <= 4 * half + 2:
        one = _one_pass_matrix(taps, size)
        m = one
        for _ in range(passes - 1):
            m = one @ m
        return m
    m = torch.zeros(size, size, dtype=torch.float64)
    for d in range(-half, half + 1):
        m.diagonal(d).fill_(float(comp[half + d]))
    w = 2 * half + 2  # window whose first `half` rows of the product see no fake right border
    one = _one_pass_matrix(taps, w)
    edge = one
    for _ in range(passes - 1):
        edge = one @ edge
    m[:half] = 0.0
    m[:half, :w] = edge[:half]
    m[-half:] = 0.0
    m[-half:, -w:] = edge[:half].flip(0).flip(1)  # the filter is symmetric: mirror the left border
    return m


def pil_box_blur_matrices(sigmas: Sequence[float], size: int, passes: int = 3) -> torch.Tensor:
    """:func:`pil_box_blur_matrix` for several ``sigmas`` at once, float32 ``[n, size, size]`` (the band filled
    diagonal by diagonal for all of them, the border rows from small exact products)."""
    comps, edges = [], []
    for sg in sigmas:
        taps = _box_taps(sg, passes)
        comp = np.array([1.0])
        for _ in range(passes):
            comp = np.convolve(comp, taps)
        comps.append(comp)
    half = max(len(c) for c in comps) // 2
    if size <= 4 * half + 2:
        return torch.stack([pil_box_blur_matrix(sg, size, passes) for sg in sigmas]).float()
    w = 2 * half + 2
    band = np.zeros((len(comps), 2 * half + 1))
    for i, (sg, comp) in enumerate(zip(sigmas, comps)):
        h = len(comp) // 2
        band[i, half - h: half + h + 1] = comp
        one = _one_pass_matrix(_box_taps(sg, passes), w).numpy()
        edge = one
        for _ in range(passes - 1):
            edge = one @ edge
        edges.append(edge[:half])
    band_t = torch.from_numpy(band).float()
    m = torch.zeros(len(comps), size, size)
    for d in range(-half, half + 1):
        m.diagonal(d, dim1=1, dim2=2).copy_(band_t[:, half + d, None])
    e = torch.from_numpy(np.stack(edges)).float()  # [n, half, w]
    m[:, :half] = 0.0
    m[:, :half, :w] = e
    m[:, -half:] = 0.0
    m[:, -half:, -w:] = e.flip(1).flip(2)
    return m


def _block_banded_matmul(m: torch.Tensor, x: torch.Tensor, block: int, band: int) -> torch.Tensor:
    """``m @ x`` for ``m`` ``[n, S, S]`` zero beyond ``band`` off the diagonal and ``x`` ``[n, S, cols]``: the
    block-diagonal part as one batched product of ``block``-sized blocks, plus the few cross-block terms at each
    block boundary (a ``2 band`` window). Exact; ~S / block times fewer FLOPs than the dense product."""
    n, S, cols = x.shape
    nb = S // block
    blocks = torch.diagonal(m.view(n, nb, block, nb, block), dim1=1, dim2=3).permute(0, 3, 1, 2)
    y = torch.matmul(blocks, x.view(n, nb, block, cols)).view(n, S, cols)
    idx = (torch.arange(1, nb) * block)[:, None] + torch.arange(-band, band)  # [nb - 1, 2 band]
    w = m[:, idx[:, :, None], idx[:, None, :]]  # [n, nb - 1, 2 band, 2 band]
    w[:, :, :band, :band] = 0.0  # keep only the cross-block quadrants
    w[:, :, band:, band:] = 0.0
    return y.index_add_(1, idx.flatten(), torch.matmul(w, x[:, idx]).view(n, -1, cols))


# ---------------------------------------------------------------------------------------------------------


class FastMultiCrop:
    """Multi-crop augmentation with the reference distribution, optimised for photos (see the module docstring).

    ``aug(img) -> [global1, global2, local1, ..., localL]``, float32 ``[3, S, S]`` normalised with ``mean`` and
    ``std``. ``img``: a path, an ``Image.open`` result (draft decoding applies while it is not loaded), any PIL
    image (any mode, converted to RGB like the reference), a uint8 tensor ``[C, H, W]`` / ``[H, W]`` or a uint8
    array ``[H, W, C]`` / ``[H, W]``. EXIF orientation is applied to images it decodes itself (paths, unloaded
    ``Image.open`` results); decoded images are taken as they are. Randomness: torch's global RNG, or the
    ``generator`` given to the call or the constructor.

    ``blur``: probabilities for (global 1, global 2, locals); ``solarize``: likewise; ``draft``: allow JPEG draft
    decoding. ``return_params=True`` also returns the drawn parameters (a dict of tensors; for tests).
    """

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 blur: Sequence[float] = (1.0, 0.1, 0.5), solarize: Sequence[float] = (0.0, 0.2, 0.0),
                 draft: bool = True, generator: torch.Generator | None = None):
        (self.global_crops_scale, self.local_crops_scale, self.local_crops_number, self.global_crop_size,
         self.local_crop_size, self.mean, self.std) = _check_common(
            global_crops_scale, local_crops_scale, local_crops_number, global_crop_size, local_crop_size,
            mean, std)
        self.blur = _check_probs("blur", blur, 3)
        self.solarize = _check_probs("solarize", solarize, 3)
        self.draft = bool(draft)
        self.generator = generator
        # reference constants (DataAugmentationDINO)
        self.flip_p, self.jitter_p, self.grayscale_p = 0.5, 0.8, 0.2
        self.jitter_lo = (0.6, 0.6, 0.8, -0.1)  # brightness, contrast, saturation, hue
        self.jitter_hi = (1.4, 1.4, 1.2, 0.1)
        self.blur_sigma = (0.1, 2.0)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._blur_cache: dict[tuple[int, float], torch.Tensor] = {}

    # -- parameters -------------------------------------------------------------------------------------
    def sample_params(self, height: int, width: int, generator: torch.Generator | None = None) -> dict:
        """All random parameters of one image's crops (2 globals then the locals), as tensors.

        One ``torch.rand`` draw (36 uniforms per crop), then NumPy: crop boxes exactly as
        ``RandomResizedCrop.get_params`` (area ``U(scale) * H * W``, log-uniform aspect, 10 tries, first fit,
        uniform position, else the central crop clamped to the ratio range), the coins, a uniformly random jitter
        order, the jitter factors and the blur radius."""
        L = self.local_crops_number
        n = 2 + L
        u = torch.rand(n, 36, generator=generator, dtype=torch.float64).numpy()
        lo_s = np.array([self.global_crops_scale[0]] * 2 + [self.local_crops_scale[0]] * L)[:, None]
        hi_s = np.array([self.global_crops_scale[1]] * 2 + [self.local_crops_scale[1]] * L)[:, None]
        area = float(height * width)
        target = area * (lo_s + (hi_s - lo_s) * u[:, 0:10])
        lr0, lr1 = math.log(_RATIO[0]), math.log(_RATIO[1])
        aspect = np.exp(lr0 + (lr1 - lr0) * u[:, 10:20])
        w = np.round(np.sqrt(target * aspect))
        h = np.round(np.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.argmax(axis=1)
        found = ok.any(axis=1)
        rows = np.arange(n)
        w, h = w[rows, first].astype(np.int64), h[rows, first].astype(np.int64)
        top = np.minimum(np.floor(u[:, 20] * (height - h + 1)).astype(np.int64), height - h)
        left = np.minimum(np.floor(u[:, 21] * (width - w + 1)).astype(np.int64), width - w)
        in_ratio = width / height
        if in_ratio < _RATIO[0]:
            fw, fh = width, int(round(width / _RATIO[0]))
        elif in_ratio > _RATIO[1]:
            fh, fw = height, int(round(height * _RATIO[1]))
        else:
            fw, fh = width, height
        top = np.where(found, top, (height - fh) // 2)
        left = np.where(found, left, (width - fw) // 2)
        h = np.where(found, h, fh)
        w = np.where(found, w, fw)
        order = np.argsort(u[:, 27:31], axis=1)
        lo = np.array(self.jitter_lo)
        hi = np.array(self.jitter_hi)
        factors = lo + (hi - lo) * u[:, 31:35]
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, 35]
        bp = np.array([self.blur[0], self.blur[1]] + [self.blur[2]] * L)
        sp = np.array([self.solarize[0], self.solarize[1]] + [self.solarize[2]] * L)
        t = torch.from_numpy
        return {"top": t(top), "left": t(left), "height": t(h), "width": t(w), "flip": t(u[:, 22] < self.flip_p),
                "jitter": t(u[:, 23] < self.jitter_p), "order": t(order), "factors": t(factors.astype(np.float32)),
                "grayscale": t(u[:, 24] < self.grayscale_p), "blur": t(u[:, 25] < bp),
                "sigma": t(sigma.astype(np.float32)), "solarize": t(u[:, 26] < sp)}

    # -- decoding ---------------------------------------------------------------------------------------
    def _draft_scale(self, p: dict) -> int:
        """Largest JPEG reduction (1, 2, 4, 8) at which every crop keeps at least its output resolution."""
        sizes = torch.tensor([self.global_crop_size] * 2 + [self.local_crop_size] * self.local_crops_number)
        room = torch.minimum(p["height"], p["width"]) // sizes  # integer downscale each crop allows
        worst = int(room.min())
        return 8 if worst >= 8 else 4 if worst >= 4 else 2 if worst >= 2 else 1

    @staticmethod
    def _to_uint8_hwc(img: Image.Image) -> np.ndarray:
        return np.array(to_rgb(img))  # a writable copy (torch.from_numpy refuses read-only buffers quietly)

    def _open(self, img) -> tuple[Image.Image | None, np.ndarray | None, tuple[int, int]]:
        """(lazily opened PIL image or None, decoded HWC uint8 array or None, (height, width))."""
        if isinstance(img, (str, os.PathLike)):
            try:
                im = Image.open(img)
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read image {os.fspath(img)}: {err}") from err
            return im, None, (im.height, im.width)
        if isinstance(img, Image.Image):
            return img, None, (img.height, img.width)
        if isinstance(img, torch.Tensor):
            x = img.detach().cpu()
            if x.ndim == 3 and x.shape[0] in (1, 3, 4):
                x = x.permute(1, 2, 0)
            a = x.numpy()
        elif isinstance(img, np.ndarray):
            a = img
        else:
            raise DataError(f"expected a path, PIL image, tensor or numpy array, got {type(img).__name__}")
        if a.dtype != np.uint8:
            raise DataError(f"expected a uint8 image, got {a.dtype} (use a PIL image for other depths)")
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        elif a.ndim != 3 or a.shape[2] not in (3, 4):
            raise DataError(f"expected an image [H, W], [H, W, 3/4] or [C, H, W], got shape {a.shape}")
        a = a[:, :, :3]
        return None, a, (a.shape[0], a.shape[1])

    def _decode(self, im: Image.Image, scale: int) -> tuple[np.ndarray, float, float]:
        """Decode (with JPEG draft reduction ``scale`` when possible), EXIF-transpose, RGB; returns the HWC
        array and the (y, x) factors from original to decoded coordinates."""
        h0, w0 = im.height, im.width
        try:
            if scale > 1 and self.draft and getattr(im, "format", None) == "JPEG":
                im.draft("RGB", (max(1, w0 // scale), max(1, h0 // scale)))
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise DataError(f"cannot decode image: {type(err).__name__}: {err}") from err
        a = self._to_uint8_hwc(im)
        return a, a.shape[0] / h0, a.shape[1] / w0

    # -- rendering --------------------------------------------------------------------------------------
    def _crop_resize(self, x: torch.Tensor, p: dict, idx: range, size: int, fy: float, fx: float) -> torch.Tensor:
        """uint8 ``[1, 3, H, W]`` channels-last -> float ``[len(idx), 3, size, size]`` in [0, 1]."""
        H, W = x.shape[-2:]
        outs = []
        tops, lefts, hs, ws = (p[k].tolist() for k in ("top", "left", "height", "width"))
        flips = p["flip"].tolist()
        for i in idx:
            t, l_, h, w = tops[i], lefts[i], hs[i], ws[i]
            if fy != 1.0 or fx != 1.0:  # box in decoded (draft) coordinates
                t2, l2 = int(round(t * fy)), int(round(l_ * fx))
                h, w = max(1, min(H - t2, int(round(h * fy)))), max(1, min(W - l2, int(round(w * fx))))
                t, l_ = t2, l2
            c = x[:, :, t:t + h, l_:l_ + w]
            o = F.interpolate(c, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            if flips[i]:
                o = o.flip(-1)
            outs.append(o)
        return torch.cat(outs).float().mul_(1.0 / 255.0)

    def _jitter(self, x: torch.Tensor, p: dict, sel: slice) -> torch.Tensor:
        """ColorJitter with per-crop factors and order: at each of the 4 positions, the crops whose operation
        there is brightness, contrast or saturation are blended in one pass (PIL's ``ImageEnhance``:
        ``target + f (x - target)`` with target black, the mean luma rounded to a grey level, or the luma
        image), the crops whose operation is hue are hue-shifted; each result clipped to [0, 1] like PIL.
        The per-position plan is made on Python lists (tiny tensor ops cost more than the pixels here)."""
        jit = p["jitter"][sel].tolist()
        if not any(jit):
            return x
        order, fac = p["order"][sel].tolist(), p["factors"][sel].tolist()
        n = len(jit)
        for pos in range(4):
            ops = [order[i][pos] if jit[i] else -1 for i in range(n)]
            for is_hue in (False, True):
                rows = [i for i in range(n) if (ops[i] == 3 if is_hue else 0 <= ops[i] <= 2)]
                if not rows:
                    continue
                idx = None if len(rows) == n else torch.tensor(rows)
                y = x if idx is None else x.index_select(0, idx)
                f = torch.tensor([fac[i][ops[i]] for i in rows], dtype=x.dtype)
                if is_hue:
                    y = hsv_hue_shift(y, f)
                else:
                    kinds = [ops[i] for i in rows]
                    f = f.view(-1, 1, 1, 1)
                    if all(k == 0 for k in kinds):  # brightness only: blend with black
                        y = y.mul_(f)
                    else:
                        grey = _luma(y)  # [m, 1, H, W]
                        if all(k == 2 for k in kinds):  # saturation only: blend with the luma image
                            target = grey
                        else:  # contrast: the mean luma, rounded to a grey level like PIL
                            mean = grey.mean(dim=(1, 2, 3), keepdim=True).mul_(255.0).round_().div_(255.0)
                            is_c = torch.tensor([k == 1 for k in kinds], dtype=x.dtype).view(-1, 1, 1, 1)
                            is_s = torch.tensor([k == 2 for k in kinds], dtype=x.dtype).view(-1, 1, 1, 1)
                            target = grey.mul_(is_s).add_(mean.mul_(is_c))
                        y = y.sub_(target).mul_(f).add_(target)
                y = y.clamp_(0.0, 1.0)
                if idx is None:
                    x = y
                else:
                    x.index_copy_(0, idx, y)
        return x

    def _blur(self, x: torch.Tensor, p: dict, sel: slice) -> torch.Tensor:
        flags, sig = p["blur"][sel], p["sigma"][sel]
        if not bool(flags.any()):
            return x
        idx = flags.nonzero().flatten()
        y = x.index_select(0, idx)
        n, C, S, _ = y.shape
        m = pil_box_blur_matrices([float(v) for v in sig[idx].tolist()], S)  # [n, S, S]
        band = 3 * (math.floor(_pil_box_radius(self.blur_sigma[1])) + 1)  # reach of 3 box passes
        block = next((b for b in (32, 48, 56, 64) if S % b == 0 and S > b >= 2 * band), 0)
        if block and S >= 64:  # exploit the band (exact; ~2x faster than the dense products at 224 px)
            t = _block_banded_matmul(m, y.permute(0, 2, 1, 3).reshape(n, S, C * S), block, band)  # along y
            t = t.view(n, S, C, S).permute(0, 3, 2, 1).reshape(n, S, C * S)  # [n, x, C * y]
            y = _block_banded_matmul(m, t, block, band).view(n, S, C, S).permute(0, 2, 3, 1)  # along x
        else:
            m = m.unsqueeze(1)
            y = torch.matmul(torch.matmul(m, y), m.transpose(-1, -2))  # vertical then horizontal passes
        if idx.numel() == x.shape[0]:
            return y
        return x.index_copy(0, idx, y)

    def _finish(self, x: torch.Tensor, p: dict, sel: slice) -> torch.Tensor:
        x = self._jitter(x, p, sel)
        grey = p["grayscale"][sel]
        if bool(grey.any()):
            x = torch.where(grey.view(-1, 1, 1, 1), _luma(x).expand(-1, 3, -1, -1), x)
        x = self._blur(x, p, sel)
        sol = p["solarize"][sel]
        if bool(sol.any()):
            x = torch.where(sol.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        return x.sub_(self._mean).mul_(self._inv_std)

    def __call__(self, img, generator: torch.Generator | None = None, return_params: bool = False):
        global _ALLOCATOR_TUNED
        if not _ALLOCATOR_TUNED:  # once per process (data-loader workers included)
            _ALLOCATOR_TUNED = True
            from .trainer import tune_cpu_allocator

            tune_cpu_allocator()
        g = generator if generator is not None else self.generator
        im, arr, (H, W) = self._open(img)
        if H == 0 or W == 0:
            raise DataError("cannot augment an image of zero size")
        opened_here = im is not None and isinstance(img, (str, os.PathLike))
        lazy = im is not None and bool(getattr(im, "tile", None))  # header read, pixels not decoded yet
        try:
            orient = 1
            if lazy:  # EXIF orientation first: the crop boxes live in the displayed image's coordinates
                try:
                    orient = int(im.getexif().get(0x0112, 1))
                except Exception:  # a broken EXIF block: keep the image un-rotated, like load_image
                    orient = 1
                if orient in (5, 6, 7, 8):
                    H, W = W, H
            p = self.sample_params(H, W, g)
            fy = fx = 1.0
            if arr is None:
                scale = self._draft_scale(p) if (lazy and orient == 1) else 1
                if orient != 1:
                    im.load()
                    im = ImageOps.exif_transpose(im)
                arr, fy, fx = self._decode(im, scale)
        finally:
            if opened_here:
                im.close()
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr)
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # channels-last view
        L = self.local_crops_number
        with torch.no_grad():
            glob = self._finish(self._crop_resize(x, p, range(2), self.global_crop_size, fy, fx), p, slice(0, 2))
            crops = list(glob.unbind(0))
            if L:
                loc = self._crop_resize(x, p, range(2, 2 + L), self.local_crop_size, fy, fx)
                crops += list(self._finish(loc, p, slice(2, 2 + L)).unbind(0))
        return (crops, p) if return_params else crops

    def __repr__(self) -> str:
        return (f"FastMultiCrop(global {self.global_crop_size}px scale {self.global_crops_scale}, "
                f"{self.local_crops_number} x local {self.local_crop_size}px scale {self.local_crops_scale}, "
                f"blur {self.blur}, solarize {self.solarize}, draft={self.draft})")
