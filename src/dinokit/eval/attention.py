"""Self-attention maps of the last block (Caron et al. 2021, §4.2.1 / Fig. 1, 3; reference
``visualize_attention.py``, dino-reference.md §4.3).

* The image is resized (bilinear, as ``T.Resize`` on a PIL image), converted to a tensor, normalised with the
  ImageNet statistics and cropped at the bottom/right to a multiple of the patch size (the reference's crop).
  ``image_size`` as two numbers ``(H, W)`` resizes exactly, as the reference's ``--image_size 480 480``; one
  number resizes the shorter side and keeps the aspect ratio (the reference squashes non-square images);
  ``None`` keeps the size.
* The map of head ``j`` is the last block's post-softmax attention from the CLS query to every patch
  (``get_last_selfattention(x)[0, j, 0, 1:]``), reshaped to the ``H/p x W/p`` patch grid.
* Threshold masks (paper: 0.6): per head, sort ascending, divide by the sum, cumulative sum, keep the patches
  whose cumulative value exceeds ``1 - threshold``, restore the order. This keeps the smallest set of the
  most-attended patches holding at least ``threshold`` of the head's attention mass.
* Images: the maps upsampled ×p (nearest) as colour heat-maps (``viridis``, matplotlib's default used by the
  reference; through matplotlib when installed, otherwise a built-in table) alone and blended over the image,
  one per head plus the mean over heads; masks drawn in a per-head colour at alpha 0.5 with their contour; the
  raw maps as ``.npy``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import as_rgb, to_rgb
from ..errors import ConfigError

__all__ = ["prepare_image", "attention_maps", "threshold_masks", "save_attention_images", "colormap",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# viridis sampled at 0, 1/16, ..., 1 (used when matplotlib is not installed)
_VIRIDIS_ANCHORS = np.array([
    [68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141], [44, 114, 142],
    [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115], [94, 201, 98],
    [132, 212, 75], [173, 220, 48], [216, 226, 25], [253, 231, 37]], dtype=np.float64)

# distinct mask colours (RGB), cycled over heads
_MASK_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
                 (220, 190, 255)]


@functools.lru_cache(maxsize=8)
def _lut(name: str = "viridis") -> np.ndarray:
    try:
        import matplotlib

        cmap = matplotlib.colormaps[name]
        return (np.asarray(cmap(np.linspace(0, 1, 256)))[:, :3] * 255).round().astype(np.uint8)
    except KeyError:
        raise ConfigError(f"unknown colour map {name!r} (matplotlib's names: viridis, inferno, magma, ...)") from None
    except Exception:  # matplotlib missing or broken: viridis from the built-in anchors
        if name != "viridis":
            raise ConfigError(f"colour map {name!r} needs matplotlib") from None
        x = np.linspace(0, 1, 256) * (len(_VIRIDIS_ANCHORS) - 1)
        lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS_ANCHORS) - 2)
        t = (x - lo)[:, None]
        rgb = (1 - t) * _VIRIDIS_ANCHORS[lo] + t * _VIRIDIS_ANCHORS[lo + 1]
        return rgb.round().astype(np.uint8)


def colormap(values: np.ndarray, normalize: bool = True, name: str = "viridis") -> np.ndarray:
    """``[H, W]`` floats -> ``[H, W, 3]`` uint8 colours of matplotlib's map ``name`` (256 levels; min-max
    normalised when ``normalize``, as ``plt.imsave`` does)."""
    v = np.asarray(values, dtype=np.float64)
    if normalize:
        lo, hi = float(v.min()), float(v.max())
        v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    idx = np.clip(np.rint(v * 255), 0, 255).astype(np.int64)
    return _lut(name)[idx]


def prepare_image(image: Image.Image, image_size: int | Sequence[int] | None, patch_size: int
                  ) -> tuple[torch.Tensor, Image.Image]:
    """``(normalised tensor [3, H, W], the RGB image at that size)`` with ``H, W`` multiples of ``patch_size``
    (see the module docstring for ``image_size``). ``image`` is first converted as :func:`dinokit.data.load_image`
    reads files (EXIF orientation, 16-bit images rescaled; :func:`dinokit.data.as_rgb`), so an image
    opened with PIL gives the maps of the file."""
    from torchvision.transforms import functional as TF

    img = as_rgb(image)
    if image_size is not None:
        if isinstance(image_size, int) or len(image_size) == 1:
            size = int(image_size if isinstance(image_size, int) else image_size[0])
            w, h = img.size
            scale = size / min(w, h)
            new = (max(int(round(h * scale)), 1), max(int(round(w * scale)), 1))
        else:
            new = (int(image_size[0]), int(image_size[1]))
        img = TF.resize(img, list(new), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    w, h = img.size
    h2, w2 = h - h % patch_size, w - w % patch_size
    if h2 == 0 or w2 == 0:
        raise ConfigError(f"an image of {h}x{w} px (HxW) is smaller than one {patch_size}-pixel patch")
    img = img.crop((0, 0, w2, h2))
    x = TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
    return x, img


@torch.no_grad()
def attention_maps(model: nn.Module, image_tensor: torch.Tensor) -> torch.Tensor:
    """CLS -> patch attention of the last block per head, ``[heads, H/p, W/p]`` float32 on CPU.

    ``image_tensor``: ``[3, H, W]`` or ``[1, 3, H, W]``, normalised; cropped at the bottom/right to a multiple
    of ``model.patch_size`` if needed (reference). The model must have ``get_last_selfattention``."""
    if not hasattr(model, "get_last_selfattention"):
        raise ValueError(f"{type(model).__name__} has no get_last_selfattention (attention maps need a ViT)")
    p = int(model.patch_size)
    x = image_tensor if image_tensor.ndim == 4 else image_tensor[None]
    if x.shape[0] != 1:
        raise ValueError("attention_maps takes one image")
    H, W = x.shape[-2] - x.shape[-2] % p, x.shape[-1] - x.shape[-1] % p
    x = x[..., :H, :W]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        attn = model.get_last_selfattention(x.to(device).float())
    finally:
        model.train(was_training)
    heads = attn.shape[1]
    return attn[0, :, 0, 1:].reshape(heads, H // p, W // p).float().cpu()


def threshold_masks(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean masks (same shape as ``attn``, ``[heads, ...]``) keeping, per head, the most-attended patches
    whose attention sums to at least ``threshold`` of the head's total: the reference's sort / normalise /
    cumsum ``> 1 - threshold`` / unsort."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    flat = attn.reshape(attn.shape[0], -1).double()
    val, idx = torch.sort(flat, dim=1)
    val = val / val.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=1) > (1 - threshold)
    keep = torch.empty_like(keep_sorted)
    keep.scatter_(1, idx, keep_sorted)  # the same as indexing with argsort(idx), the reference's unsort
    return keep.reshape(attn.shape)


def _upsample(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a ``[h, w]`` grid to ``size = (W, H)`` pixels."""
    h, w = a.shape
    W, H = size
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    return a[rows][:, cols]


def _contour(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw_outline(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``rgb [H, W, 3]`` with the border of the boolean ``mask [H, W]`` drawn as a white line inside a black one
    (inside the mask: visible on any colour, also where the image has the mask's own colour)."""
    out = rgb.copy()
    outer = _contour(mask)
    out[outer] = 0
    out[_contour(mask & ~outer)] = 255
    return out


def save_attention_images(image: Image.Image, attn: torch.Tensor, masks: torch.Tensor | None, out_dir,
                          prefix: str = "", threshold: float | None = None, alpha: float = 0.5) -> list[Path]:
    """Write the visualisations of one image to ``out_dir``; returns the written paths.

    ``image``: the RGB image the maps were computed on (from :func:`prepare_image`); ``attn``: ``[heads, h,
    w]``; ``masks``: boolean ``[heads, h, w]`` or ``None``. Files (``P`` = ``prefix + "-"`` when a prefix is
    given): ``P img.png``; per head ``j`` and for the mean over heads: ``P attn-head{j}.png`` /
    ``P attn-mean.png`` (heat-map) and ``P overlay-head{j}.png`` / ``P overlay-mean.png`` (blended over the
    image); per head ``P mask-th{threshold}-head{j}.png``; ``P attn.npy`` (``[heads, h, w]`` float32) and,
    with masks, ``P masks.npy``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre = f"{prefix}-" if prefix else ""
    img = np.asarray(to_rgb(image), dtype=np.float64)
    size = image.size
    maps = attn.detach().float().cpu().numpy()
    written: list[Path] = []

    def save(arr: np.ndarray, name: str) -> None:
        path = out / f"{pre}{name}"
        Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(path)
        written.append(path)

    save(img, "img.png")
    items = [(f"head{j}", maps[j]) for j in range(len(maps))] + [("mean", maps.mean(axis=0))]
    for name, m in items:
        heat = colormap(_upsample(m, size)).astype(np.float64)
        save(heat, f"attn-{name}.png")
        save((1 - alpha) * img + alpha * heat, f"overlay-{name}.png")
    if masks is not None:
        mk = masks.detach().cpu().numpy().astype(bool)
        tag = f"th{threshold:g}-" if threshold is not None else ""
        for j in range(len(mk)):
            m = _upsample(mk[j], size)
            colour = np.array(_MASK_COLOURS[j % len(_MASK_COLOURS)], dtype=np.float64)
            blended = img.copy()
            blended[m] = (1 - alpha) * img[m] + alpha * colour
            save(draw_outline(blended, m), f"mask-{tag}head{j}.png")
        np.save(out / f"{pre}masks.npy", mk)
        written.append(out / f"{pre}masks.npy")
    np.save(out / f"{pre}attn.npy", maps.astype(np.float32))
    written.append(out / f"{pre}attn.npy")
    return written
