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
* **uint8 colour ops in OpenCV's SIMD kernels**, one pass each, on the small crops (after the resize, as in the
  reference): brightness, contrast, saturation and greyscale as per-pixel 3x4 colour matrices (``cv2.transform``),
  hue through a float HSV round trip, Pillow's ``GaussianBlur`` (three passes per axis of its extended box filter
  with a replicated border) as ``cv2.sepFilter2D``, solarisation as PIL's lookup table, the normalisation as one
  more colour matrix into float32. OpenCV runs single-threaded in a process that uses this class (one image's
  crops are too small to split; data-loader workers give the parallelism).

What differs from the PIL chain, none of it a parameter distribution: hue is rotated in continuous HSV (exactly
torchvision's tensor ``adjust_hue``, then rounded) where PIL quantises H, S and V to 8 bits (PIL's round trip alone
moves pixels by several grey levels); the saturation blend uses the unrounded luma (PIL's is rounded: within one
grey level); the blur rounds after each pass pair where Pillow rounds after each of its six passes (closer to the
exact filter than Pillow); crop-resize is within one level of Pillow's; draft decoding replaces the first stage of a
large downscale by libjpeg's DCT scaling (only when every crop keeps at least its output resolution; the boxes are
then rounded to the reduced grid, moving them by at most half a reduced pixel); the random numbers come from
torch's RNG in a different order than torchvision's (same distributions; one ``torch.manual_seed`` fixes
everything, as in :class:`DINOAugmentation`). Brightness, contrast, solarisation and greyscale equal PIL's to one
grey level (truncating blends like ``Image.blend``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .augmentation import (
    _GREY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _check_common,
    _check_probs,
    _pil_box_kernel,
    _pil_box_radius,
)
from .data import to_rgb
from .errors import DataError

__all__ = ["FastMultiCrop"]

_PROCESS_TUNED = False
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ---------------------------------------------------------------------------------------------------------
# per-pixel constants (OpenCV colour matrices and lookup tables; values in 0..255)

_LUMA = np.array([_GREY], np.float32)  # [1, 3]: every output channel gets the luma
_EYE = np.eye(3, dtype=np.float32)
_GREY_TO_RGB = np.repeat(_LUMA, 3, axis=0)  # greyscale, kept as 3 channels
_TRUNCATE = -0.5 + 2.0**-10  # added before OpenCV's rounding: PIL's blends truncate (ImagingBlend's (UINT8) cast)
_SOLARIZE = np.array([v if v < 128 else 255 - v for v in range(256)], np.uint8)  # PIL's solarize(threshold=128)


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
    ``decodes_paths``: the trainer's folder data set hands it file paths rather than decoded images.
    """

    decodes_paths = True

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
        # (v / 255 - mean) / std per channel as one colour matrix on 0..255 values
        inv = 1.0 / np.asarray(self.std, np.float64)
        self._normalise = np.concatenate([np.diag(inv / 255.0), (-np.asarray(self.mean) * inv)[:, None]],
                                         axis=1).astype(np.float32)
        # half-width of one box pass at the largest sigma (the kernels are zero-padded to it)
        self._blur_half = int(math.floor(float(_pil_box_radius(torch.tensor([self.blur_sigma[1]]))[0]))) + 1

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
            try:  # Pillow's decompression-bomb limit makes a file unreadable, as in dinokit.data.load_image
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    im = Image.open(img)
            except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise DataError(f"cannot read image {os.fspath(img)}: {type(err).__name__}: {err}") from err
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

    @staticmethod
    def _load(im: Image.Image) -> None:
        """Decode the pixels; what :func:`dinokit.data.load_image` counts as unreadable is a :class:`DataError`."""
        try:
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
            raise DataError(f"cannot decode image: {type(err).__name__}: {err}") from err

    def _decode(self, im: Image.Image, scale: int) -> tuple[np.ndarray, float, float]:
        """Decode (with JPEG draft reduction ``scale`` when possible), EXIF-transpose, RGB; returns the HWC
        array and the (y, x) factors from original to decoded coordinates."""
        h0, w0 = im.height, im.width
        if scale > 1 and self.draft and getattr(im, "format", None) == "JPEG":
            try:
                im.draft("RGB", (max(1, w0 // scale), max(1, h0 // scale)))
            except (OSError, ValueError) as err:
                raise DataError(f"cannot decode image: {type(err).__name__}: {err}") from err
        self._load(im)
        a = self._to_uint8_hwc(im)
        return a, a.shape[0] / h0, a.shape[1] / w0

    # -- rendering --------------------------------------------------------------------------------------
    def _crop_resize(self, x: torch.Tensor, p: dict, idx: range, size: int, fy: float,
                     fx: float) -> list[np.ndarray]:
        """uint8 ``[1, 3, H, W]`` channels-last -> one uint8 ``[size, size, 3]`` array per crop in ``idx``."""
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
            a = np.ascontiguousarray(o[0].permute(1, 2, 0).numpy())  # channels-last output: already contiguous
            outs.append(cv2.flip(a, 1) if flips[i] else a)
        return outs

    @staticmethod
    def _jitter(a: np.ndarray, order: Sequence[int], factors: Sequence[float]) -> np.ndarray:
        """ColorJitter of one uint8 HWC crop: the operations in ``order`` (0 brightness, 1 contrast,
        2 saturation, 3 hue) with ``factors``; each result back in uint8, clipped, like PIL's.

        Brightness, contrast and saturation are PIL's ``ImageEnhance`` blends ``target + f (x - target)`` with
        target black, the mean luma rounded to a grey level, or the luma image: one per-pixel 3x4 colour matrix
        (``cv2.transform``, which saturates to uint8), truncated like PIL's ``Image.blend``. Hue rotates the
        continuous HSV hue (a float HSV round trip: torchvision's tensor ``adjust_hue``), then rounds."""
        for op in order:
            f = float(factors[op])
            if op == 3:
                hsv = cv2.cvtColor(a.astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees [0, 360)
                hsv[:, :, 0] += 360.0 * f + (360.0 if f < 0 else 0.0)  # OpenCV wraps hues in [0, 720)
                a = cv2.convertScaleAbs(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))  # round, saturate
                continue
            m = np.zeros((3, 4), np.float32)
            m[:, 3] = _TRUNCATE
            if op == 2:  # saturation: f x + (1 - f) luma(x)
                m[:, :3] = (1.0 - f) * _LUMA
            elif op == 1:  # contrast: f x + (1 - f) round(mean luma)
                m[:, 3] += (1.0 - f) * round(cv2.mean(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY))[0])
            m[:, :3] += f * _EYE
            a = cv2.transform(a, m)
        return a

    def _blur(self, a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        """Pillow's ``GaussianBlur``: three passes of the extended box ``kernel`` along each axis, replicated
        border, rounded to uint8 after each pass pair (Pillow rounds after each pass)."""
        for _ in range(3):
            a = cv2.sepFilter2D(a, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
        return a

    def _pixels(self, a: np.ndarray, p: dict, i: int, kernels: dict[int, np.ndarray]) -> torch.Tensor:
        """Jitter, greyscale, blur, solarisation and normalisation of crop ``i`` (uint8 HWC in, float ``[3, S,
        S]`` out, channels-last strides), in the reference's order."""
        if p["_jitter"][i]:
            a = self._jitter(a, p["_order"][i], p["_factors"][i])
        if p["_grey"][i]:
            a = cv2.transform(a, _GREY_TO_RGB)
        if i in kernels:
            a = self._blur(a, kernels[i])
        if p["_solarize"][i]:
            a = cv2.LUT(a, _SOLARIZE)
        x = cv2.transform(a.astype(np.float32), self._normalise)  # (v / 255 - mean) / std per channel
        return torch.from_numpy(x).permute(2, 0, 1)

    def __call__(self, img, generator: torch.Generator | None = None, return_params: bool = False):
        global _PROCESS_TUNED
        if not _PROCESS_TUNED:  # once per process (data-loader workers included)
            _PROCESS_TUNED = True
            from .trainer import tune_cpu_allocator

            tune_cpu_allocator()
            cv2.setNumThreads(1)  # one image's crops are too small to split; workers give the parallelism
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
                    self._load(im)
                    im = ImageOps.exif_transpose(im)
                arr, fy, fx = self._decode(im, scale)
        except DataError as err:
            if opened_here:  # name the file
                raise DataError(f"{os.fspath(img)}: {err}") from err
            raise
        finally:
            if opened_here:
                im.close()
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr)
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # channels-last view
        L = self.local_crops_number
        # the per-crop plan as Python values (tiny tensor ops cost more than the pixels here)
        plan = {"_jitter": p["jitter"].tolist(), "_order": p["order"].tolist(), "_factors": p["factors"].tolist(),
                "_grey": p["grayscale"].tolist(), "_solarize": p["solarize"].tolist()}
        blur_idx = p["blur"].nonzero().flatten()
        kernels = {}
        if blur_idx.numel():
            ks = _pil_box_kernel(p["sigma"][blur_idx], self._blur_half).numpy()
            kernels = dict(zip(blur_idx.tolist(), ks))
        with torch.no_grad():
            crops = self._crop_resize(x, p, range(2), self.global_crop_size, fy, fx)
            if L:
                crops += self._crop_resize(x, p, range(2, 2 + L), self.local_crop_size, fy, fx)
            out = [self._pixels(a, plan, i, kernels) for i, a in enumerate(crops)]
        return (out, p) if return_params else out

    def __repr__(self) -> str:
        return (f"FastMultiCrop(global {self.global_crop_size}px scale {self.global_crops_scale}, "
                f"{self.local_crops_number} x local {self.local_crop_size}px scale {self.local_crops_scale}, "
                f"blur {self.blur}, solarize {self.solarize}, draft={self.draft})")
