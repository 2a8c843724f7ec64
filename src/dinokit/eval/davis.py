"""DAVIS-2017 semi-supervised video object segmentation by label propagation, and its J & F scores.

Propagation follows the reference ``eval_video_segmentation.py`` (Caron et al., ICCV 2021, Table 5 / App. B;
protocol of Jabri et al. 2020, "Space-Time Correspondence as a Contrastive Random Walk", App. F; reference notes
``shared/reference/dino-reference.md`` §4.5):

* frames: short side resized to 480 (option), long side to ``floor(480 · long / short / 64) · 64``, bilinear;
  /255, normalised with mean (0.485, 0.456, 0.406) and std **(0.228, 0.224, 0.225)** (a quirk inherited from UVC
  that the reference keeps; ``std=IMAGENET_STD`` gives the usual 0.229);
* features: last block, final norm, without CLS (``get_intermediate_layers(x, n=1)[0][:, 1:]``), L2-normalised;
* first-frame labels: the annotation resized to the patch grid with NEAREST and one-hot encoded. Annotations are
  indexed (palette) PNGs of their frame's size; a greyscale PNG is read as label values, an RGB one back through
  the DAVIS palette (a colour outside it is an error);
* for each target frame: the context is frame 0 plus the last ``n_last_frames`` (7) frames' features and *soft*
  segmentations (FIFO); affinity ``exp(<f_t(q), f_c(s)> / 0.1)``, zeroed outside the square neighbourhood
  ``|Δrow|, |Δcol| <= size_mask_neighborhood`` (12 patches; 0 disables it); for each target position only the
  values ``>=`` its ``topk``-th (5) largest over *all* context sources are kept, then each column is normalised
  to sum 1; the soft labels are ``segs · aff``;
* output: bilinear ×patch upsampling, per-channel min-max normalisation (channels whose max is <= 0 untouched),
  argmax, NEAREST resize to the original size, indexed PNG with the DAVIS/PASCAL palette (generated here, not
  downloaded) at ``OUT/<video>/<frame>.png``; frame 0 is the ground-truth annotation.

Scores follow the official ``davis2017-evaluation`` (``--task semi-supervised``): first and last frames are
excluded; per object, J = region IoU (1 when both masks are empty) and F = boundary F-measure with boundaries from
``seg2bmap`` matched within a disk of radius ``ceil(0.008 · image diagonal)``; per object Mean/Recall(>0.5)/Decay
over frames; J&F-Mean = (mean over objects of J-Mean + mean over objects of F-Mean) / 2.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..console import stderr_is_tty
from ..data import as_rgb, load_image
from ..errors import ConfigError, DataError
from ..models.linear import matmul_nt
from .whitening import patch_crop

__all__ = [
    "DAVIS_MEAN", "DAVIS_STD", "IMAGENET_STD", "davis_palette", "write_indexed_png", "frame_size", "read_frame",
    "first_frame_labels", "neighborhood_mask", "extract_patch_features", "propagate_labels", "iter_propagation",
    "propagate_video", "list_videos", "segment_davis", "seg2bmap", "j_measure", "f_measure", "db_statistics",
    "evaluate_video", "evaluate_davis",
]

DAVIS_MEAN = (0.485, 0.456, 0.406)
DAVIS_STD = (0.228, 0.224, 0.225)  # the reference's (UVC's) quirk: 0.228 instead of 0.229
IMAGENET_STD = (0.229, 0.224, 0.225)
VOID_LABEL = 255


# ------------------------------------------------------------------------------------------------- I/O

def davis_palette(n: int = 256) -> np.ndarray:
    """The DAVIS (= PASCAL VOC) colour map ``[n, 3]`` uint8: bits of the label spread over R, G, B from the most
    significant bit down (0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), 4 (0, 0, 128), ...)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        pal[i] = rgb
    return pal


def write_indexed_png(path: str | Path, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save a 2-D label map as a palette ('P' mode) PNG, the DAVIS result format."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"an indexed PNG needs a 2-D label map, got shape {labels.shape}")
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette((davis_palette() if palette is None else palette).astype(np.uint8).ravel().tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def frame_size(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """Reference frame size ``(h, w)``: the short side becomes ``short_side`` and the long side
    ``floor(short_side · long / short / multiple) · multiple`` (854×480 → 832×480)."""
    if height > width:
        w, h = short_side, int((short_side * height / width) // multiple * multiple)
    else:
        h, w = short_side, int((short_side * width / height) // multiple * multiple)
    if h <= 0 or w <= 0:
        raise ConfigError(f"short side {short_side} with multiple {multiple} gives an empty {h}x{w} frame for a "
                          f"{height}x{width} image; use a larger --short-side")
    return h, w


def read_frame(path: str | Path | Image.Image, short_side: int = 480, multiple: int = 64,
               mean: Sequence[float] = DAVIS_MEAN, std: Sequence[float] = DAVIS_STD) -> tuple[torch.Tensor, int, int]:
    """``(frame [3, h, w], original height, original width)`` preprocessed as the reference: resized with
    (non-antialiased, cv2-like) bilinear interpolation to :func:`frame_size`, rounded to 8-bit as cv2 does, /255,
    normalised with ``mean``/``std`` (default: the reference's DAVIS std quirk).

    A frame is read as :func:`dinokit.data.load_image` reads images (EXIF orientation, every PIL mode to 8-bit
    RGB, 16-bit images rescaled rather than clipped); a PIL image goes through the same conversion
    (:func:`dinokit.data.as_rgb`). An unreadable file is a :class:`DataError` naming it."""
    img = as_rgb(path) if isinstance(path, Image.Image) else load_image(path)
    ori_w, ori_h = img.size
    h, w = frame_size(ori_h, ori_w, short_side, multiple)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)[None]
    if (h, w) != (ori_h, ori_w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
    x = x[0] / 255.0
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x, ori_h, ori_w


def first_frame_labels(labels: np.ndarray, grid_hw: tuple[int, int]) -> torch.Tensor:
    """One-hot ``[1, C, h, w]`` of a label map resized with NEAREST (PIL) to the patch grid ``(h, w)``;
    ``C = max label + 1``. Void pixels (255) count as background."""
    labels = np.asarray(labels).copy()
    labels[labels == VOID_LABEL] = 0
    small = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((grid_hw[1], grid_hw[0]), Image.NEAREST))
    small = torch.from_numpy(small.astype(np.int64))
    n = int(labels.max()) + 1
    return F.one_hot(small, n).permute(2, 0, 1)[None].float()


def _check_object_ids(labels: np.ndarray, name: str) -> None:
    """DAVIS numbers a video's objects 1..K and all of them are in the first frame (the scoring counts
    ``K = max id`` objects, so a missing id would be an absent object scored perfect). Ids with gaps are refused;
    a palette annotation converted to greyscale, whose ids became brightness values (38, 75, ...), is named."""
    ids = np.unique(labels[(labels != 0) & (labels != VOID_LABEL)])
    if ids.size == 0 or ids.size == int(ids[-1]):
        return
    shown = ", ".join(map(str, ids[:6].tolist())) + (", ..." if ids.size > 6 else "")
    luma = np.rint(davis_palette()[1:ids.size + 1].astype(np.float64) @ [0.299, 0.587, 0.114]).astype(int)
    hint = ("; these are the brightness values of DAVIS palette colours: was an indexed PNG converted to "
            "greyscale? Keep annotations as indexed PNGs") if set(ids.tolist()) <= set(luma.tolist()) else ""
    raise DataError(f"{name} has object ids {shown}; DAVIS object ids run 1..K without gaps in the first frame"
                    f"{hint}")


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _read_labels(path: str | Path, what: str = "annotation") -> np.ndarray:
    """The ``[H, W]`` uint8 label map of a PNG: the values of an indexed ('P') or greyscale ('L', '1') image (0
    background, 255 void); an RGB(A) image is read back through the DAVIS palette (black 0, (128, 0, 0) 1,
    (0, 128, 0) 2, ...), so a DAVIS annotation re-saved as RGB gives the same labels. Anything else, or an RGB
    colour outside the palette, is a :class:`DataError` naming the file (``what``: annotation or result)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im.convert("RGB") if mode in ("RGB", "RGBA") else im)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None
    if mode in ("P", "L", "1"):
        return arr.astype(np.uint8)
    if mode not in ("RGB", "RGBA"):
        raise DataError(f"{what} {path} is a mode-{mode} image; it must be an indexed (palette) PNG")
    pal = davis_palette().astype(np.int64)
    index = {int(k): i for i, k in enumerate((pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2])}
    keys = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
    colours, inverse = np.unique(keys, return_inverse=True)
    for c in map(int, colours):
        if c not in index:
            raise DataError(f"{what} {path} is an {mode} PNG with colour {(c >> 16, (c >> 8) & 255, c & 255)}, not a "
                            "DAVIS palette colour; it must be an indexed (palette) PNG")
    ids = np.array([index[int(c)] for c in colours], dtype=np.uint8)
    return ids[inverse].reshape(keys.shape)


# ------------------------------------------------------------------------------------------ propagation

def neighborhood_mask(h: int, w: int, radius: int) -> torch.Tensor:
    """Boolean ``[h·w, h·w]``: True where two grid positions are at most ``radius`` apart in row and column."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)


@torch.no_grad()
def extract_patch_features(model: nn.Module, frame: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(features [h·w, D], h, w)``: last-block, normed patch tokens of one ``[3, H, W]`` frame (no CLS; not yet
    L2-normalised). The frame is cropped to a multiple of ``model.patch_size``."""
    p = model.patch_size
    x = patch_crop(frame, p)[None]
    out = model.get_intermediate_layers(x, n=1)[0][0, 1:]
    h, w = x.shape[-2] // p, x.shape[-1] // p
    if out.shape[0] != h * w:
        raise ValueError(f"model returned {out.shape[0]} patch tokens for a {h}x{w} grid")
    return out, h, w


def propagate_labels(feat_tar: torch.Tensor, ctx_feats: torch.Tensor, ctx_segs: torch.Tensor, topk: int = 5,
                     temperature: float = 0.1, mask: torch.Tensor | None = None,
                     max_elements: int = 1 << 25) -> torch.Tensor:
    """Soft labels ``[C, hw]`` of a target frame from its context (reference ``label_propagation``).

    Args:
        feat_tar: ``[hw, D]`` target features; ``ctx_feats``: ``[n, hw, D]`` context features (both are
            L2-normalised here); ``ctx_segs``: ``[n, C, hw]`` context soft labels.
        topk: per target position, affinities below its ``topk``-th largest over all ``n·hw`` sources are zeroed.
        temperature: the affinity is ``exp(cos / temperature)``.
        mask: optional boolean ``[hw, hw]`` neighbourhood (source × target), shared by all context frames.
        max_elements: target positions are processed in chunks so the affinity block stays below this size
            (the result is identical to the reference's single dense product).
    """
    n, hw, d = ctx_feats.shape
    C = ctx_segs.shape[1]
    src = F.normalize(ctx_feats.float(), dim=-1).reshape(n * hw, d)
    tar = F.normalize(feat_tar.float(), dim=-1)
    segs = ctx_segs.float().permute(1, 0, 2).reshape(C, n * hw)
    k = min(topk, n * hw)
    chunk = max(1, max_elements // (n * hw))
    out = torch.empty(C, tar.shape[0], dtype=torch.float32, device=tar.device)
    for s in range(0, tar.shape[0], chunk):
        sl = slice(s, s + chunk)
        aff = torch.exp(matmul_nt(src, tar[sl]) / temperature)  # [n*hw, chunk]
        if mask is not None:
            aff = (aff.view(n, hw, -1) * mask[:, sl].to(aff.dtype)).view(n * hw, -1)
        kth = torch.topk(aff, k, dim=0).values[-1]
        aff = torch.where(aff < kth, torch.zeros((), dtype=aff.dtype, device=aff.device), aff)
        aff = aff / aff.sum(dim=0, keepdim=True)
        out[:, sl] = segs @ aff
    return out


def _normalize_channels(x: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalisation of ``[C, H, W]``, skipped where a channel's max is <= 0 (reference
    ``norm_mask``; a constant positive channel becomes 0 instead of the reference's NaN)."""
    x = x.clone()
    for c in range(x.shape[0]):
        if x[c].max() > 0:
            x[c] -= x[c].min()
            top = x[c].max()
            if top > 0:
                x[c] /= top
    return x


def _labels_from_soft(seg: torch.Tensor, h: int, w: int, patch: int, out_hw: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(seg.reshape(1, -1, h, w), scale_factor=patch, mode="bilinear", align_corners=False)[0]
    lab = _normalize_channels(up).argmax(dim=0).to(torch.uint8).cpu().numpy()
    if lab.shape != tuple(out_hw):
        lab = np.asarray(Image.fromarray(lab).resize((out_hw[1], out_hw[0]), Image.NEAREST))
    return lab


@torch.no_grad()
def iter_propagation(model: nn.Module, frames: Sequence, first_mask: np.ndarray | str | Path,
                     n_last_frames: int = 7, size_mask_neighborhood: int = 12, topk: int = 5,
                     temperature: float = 0.1, short_side: int = 480, multiple: int = 64,
                     std: Sequence[float] = DAVIS_STD, device: str | torch.device = "cpu",
                     progress: bool = False) -> Iterator[np.ndarray]:
    """Yield one uint8 label map per frame (frame 0: ``first_mask`` itself) at the original resolution.

    ``frames``: image paths / PIL images (preprocessed with :func:`read_frame`) or already preprocessed
    ``[3, H, W]`` tensors (then the output size is ``first_mask``'s). ``first_mask``: the frame-0 label map
    (0 background, 1..K objects) or the path of its indexed PNG.
    """
    from tqdm import tqdm

    if n_last_frames < 0 or topk < 1 or size_mask_neighborhood < 0 or not 0 < temperature < math.inf:
        raise ConfigError("need n_last_frames >= 0, topk >= 1, size_mask_neighborhood >= 0 and a finite "
                          f"temperature > 0 (got {n_last_frames}, {topk}, {size_mask_neighborhood}, {temperature})")
    if len(frames) == 0:
        raise DataError("a video needs at least one frame")
    model.eval()
    labels0 = _read_labels(first_mask) if isinstance(first_mask, str | Path) else np.asarray(first_mask)
    if labels0.ndim != 2:
        raise DataError(f"the first-frame annotation must be a 2-D label map, got shape {labels0.shape}")
    _check_object_ids(labels0, f"annotation {first_mask}" if isinstance(first_mask, str | Path)
                      else "the first-frame annotation")
    out_hw = labels0.shape
    p = model.patch_size

    def load(f):
        if isinstance(f, torch.Tensor):
            return f, out_hw
        x, oh, ow = read_frame(f, short_side, multiple, DAVIS_MEAN, std)
        return x, (oh, ow)

    x0, hw0 = load(frames[0])
    if hw0 != out_hw:
        name = first_mask if isinstance(first_mask, str | Path) else "the first-frame annotation"
        raise DataError(f"annotation {name} is {_hw(out_hw)} px but frame {frames[0]} is {_hw(hw0)} (HxW): an "
                        "annotation must have its frame's size")
    feat0, h, w = extract_patch_features(model, x0.to(device))
    seg0 = first_frame_labels(labels0, (h, w)).to(device).reshape(1, -1, h * w)
    mask = neighborhood_mask(h, w, size_mask_neighborhood).to(device) if size_mask_neighborhood > 0 else None
    queue: deque = deque(maxlen=n_last_frames) if n_last_frames > 0 else deque(maxlen=0)
    yield labels0.astype(np.uint8)
    for t in tqdm(range(1, len(frames)), desc="frames", disable=not (progress and stderr_is_tty()), leave=False):
        x, hw_t = load(frames[t])
        feat, ht, wt = extract_patch_features(model, x.to(device))
        if (ht, wt) != (h, w):
            raise DataError(f"frame {t} has a {ht}x{wt} patch grid, frame 0 {h}x{w}: all frames must share a size")
        ctx_feats = torch.stack([feat0] + [q[0] for q in queue])
        ctx_segs = torch.cat([seg0] + [q[1] for q in queue])
        seg = propagate_labels(feat, ctx_feats, ctx_segs, topk, temperature, mask)
        if n_last_frames > 0:
            queue.append((feat, seg[None]))
        yield _labels_from_soft(seg, h, w, p, hw_t)


def propagate_video(model: nn.Module, frames: Sequence, first_mask: np.ndarray | str | Path, **kw) -> list[np.ndarray]:
    """All label maps of a video (list of uint8 ``[H, W]``); see :func:`iter_propagation` for the arguments
    (``n_last_frames=7, size_mask_neighborhood=12, topk=5, temperature=0.1, short_side=480, ...``)."""
    return list(iter_propagation(model, frames, first_mask, **kw))


def list_videos(davis_root: str | Path, split: str = "val", videos: Sequence[str] | None = None,
                resolution: str = "480p") -> list[str]:
    """Video names from ``ImageSets/2017/<split>.txt`` (or ``videos``), checked against the folders."""
    root = Path(davis_root)
    if not root.is_dir():
        raise DataError(f"DAVIS root {root} does not exist (download DAVIS-2017 trainval 480p from "
                        f"https://davischallenge.org/davis2017/code.html)")
    for sub in (f"JPEGImages/{resolution}", f"Annotations/{resolution}"):
        if not (root / sub).is_dir():
            raise DataError(f"{root} has no {sub}/ folder (expected the DAVIS-2017 layout)")
    if not videos:
        lst = root / "ImageSets" / "2017" / f"{split}.txt"
        if not lst.is_file():
            raise DataError(f"video list {lst} does not exist (or name the videos with --videos)")
        videos = [v.strip() for v in lst.read_text().splitlines() if v.strip()]
    for v in videos:
        if not (root / "JPEGImages" / resolution / v).is_dir():
            raise DataError(f"video {v!r} not found in {root / 'JPEGImages' / resolution}")
        if not (root / "Annotations" / resolution / v).is_dir():
            raise DataError(f"annotations of video {v!r} not found in {root / 'Annotations' / resolution}")
    return list(videos)


def segment_davis(model: nn.Module, davis_root: str | Path, out_dir: str | Path, videos: Sequence[str] | None = None,
                  split: str = "val", resolution: str = "480p", progress: bool = False, **kw) -> list[str]:
    """Propagate frame 0's annotation through every video and write ``OUT/<video>/<frame>.png``.

    ``kw`` go to :func:`iter_propagation` (``n_last_frames``, ``size_mask_neighborhood``, ``topk``,
    ``temperature``, ``short_side``, ``multiple``, ``std``, ``device``). Returns the videos processed.
    """
    from tqdm import tqdm

    root, out_dir = Path(davis_root), Path(out_dir)
    videos = list_videos(root, split, videos, resolution)
    palette = davis_palette()
    for v in tqdm(videos, desc="videos", disable=not (progress and stderr_is_tty())):
        frames = sorted((root / "JPEGImages" / resolution / v).glob("*.jpg"))
        if not frames:
            raise DataError(f"no .jpg frames in {root / 'JPEGImages' / resolution / v}")
        ann = root / "Annotations" / resolution / v / f"{frames[0].stem}.png"
        if not ann.is_file():
            raise DataError(f"first-frame annotation {ann} does not exist")
        for f, lab in zip(frames, iter_propagation(model, frames, ann, progress=progress, **kw)):
            write_indexed_png(out_dir / v / f"{f.stem}.png", lab, palette)
    return videos


# ----------------------------------------------------------------------------------------------- scoring

def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a binary mask (D. Martin's ``seg2bmap`` as in davis2017-evaluation): a
    pixel is on the boundary when it differs from its east, south or south-east neighbour; the last row compares
    east only, the last column south only, the bottom-right pixel is never a boundary."""
    seg = np.asarray(seg).astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _dilate_disk(b: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by the disk ``{dx² + dy² <= r²}`` (skimage ``disk(r)``), zero outside the image, as
    ``cv2.dilate``; computed row by row with running sums."""
    r = int(math.floor(radius))
    if r <= 0:
        return b.copy()
    H, W = b.shape
    cs = np.zeros((H, W + 1), dtype=np.int32)
    np.cumsum(b, axis=1, dtype=np.int32, out=cs[:, 1:])
    idx = np.arange(W)
    runs: dict[int, np.ndarray] = {}
    out = np.zeros_like(b, dtype=bool)
    for dy in range(-r, r + 1):
        a = int(math.floor(math.sqrt(radius * radius - dy * dy) + 1e-9))
        if a not in runs:
            lo, hi = np.clip(idx - a, 0, W), np.clip(idx + a + 1, 0, W)
            runs[a] = (cs[:, hi] - cs[:, lo]) > 0
        row = runs[a]
        if dy >= 0:
            out[: H - dy] |= row[dy:]
        else:
            out[-dy:] |= row[: H + dy]
    return out


def j_measure(annotation: np.ndarray, segmentation: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J: IoU of two binary masks, ignoring ``void`` pixels; 1 when both are empty."""
    a, s = np.asarray(annotation).astype(bool), np.asarray(segmentation).astype(bool)
    if a.shape != s.shape:
        raise ValueError(f"annotation {a.shape} and segmentation {s.shape} differ in size")
    keep = np.ones_like(a) if void is None else ~np.asarray(void).astype(bool)
    inter = np.sum(a & s & keep)
    union = np.sum((a | s) & keep)
    return 1.0 if union == 0 else float(inter / union)


def f_measure(annotation: np.ndarray, segmentation: np.ndarray, void: np.ndarray | None = None,
              bound_th: float = 0.008) -> float:
    """Boundary F-measure of davis2017-evaluation: boundaries by :func:`seg2bmap`, a boundary pixel matches when
    the other mask's boundary lies within a disk of radius ``ceil(bound_th · diagonal)`` pixels (``bound_th`` is
    taken as pixels when >= 1); precision/recall conventions for empty boundaries as the official code."""
    a, s = np.asarray(annotation).astype(bool), np.asarray(segmentation).astype(bool)
    if a.shape != s.shape:
        raise ValueError(f"annotation {a.shape} and segmentation {s.shape} differ in size")
    keep = np.ones_like(a) if void is None else ~np.asarray(void).astype(bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*s.shape))
    fg_b = seg2bmap(s & keep)
    gt_b = seg2bmap(a & keep)
    n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        # all boundary pixels lie in the bounding box of their union, so dilating inside it is exact and faster
        ys, xs = np.nonzero(fg_b | gt_b)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        fg_b, gt_b = fg_b[box], gt_b[box]
        precision = float(np.sum(fg_b & _dilate_disk(gt_b, radius))) / n_fg
        recall = float(np.sum(gt_b & _dilate_disk(fg_b, radius))) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """Mean, recall (fraction > 0.5) and decay (mean of the first quarter minus the last) of per-frame values,
    as davis2017-evaluation's ``db_statistics``."""
    v = np.asarray(per_frame, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    M = float(np.nanmean(v))
    O = float(np.nanmean(v > 0.5))
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[ids[i]: ids[i + 1] + 1] for i in range(4)]
    D = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return M, O, D


def evaluate_video(gt: np.ndarray, res: np.ndarray, bound_th: float = 0.008) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame J and F ``[n_objects, T]`` from label stacks ``[T, H, W]`` (already without the first
    and last frames). Objects are 1..max label of ``gt``; a result label above that is an error; objects missing
    from the result are scored as empty masks."""
    n_obj = int(gt.max()) if gt.size else 0
    J = np.zeros((n_obj, gt.shape[0]))
    Fm = np.zeros((n_obj, gt.shape[0]))
    for k in range(1, n_obj + 1):
        for t in range(gt.shape[0]):
            J[k - 1, t] = j_measure(gt[t] == k, res[t] == k)
            Fm[k - 1, t] = f_measure(gt[t] == k, res[t] == k, bound_th=bound_th)
    return J, Fm


def evaluate_davis(results_dir: str | Path, davis_root: str | Path, videos: Sequence[str] | None = None,
                   split: str = "val", resolution: str = "480p", bound_th: float = 0.008,
                   progress: bool = False) -> dict:
    """Score ``RESULTS/<video>/<frame>.png`` against the DAVIS annotations (official semi-supervised protocol).

    Returns fractions: ``{"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay",
    "per_object": {"<video>_<k>": {"J-Mean", "F-Mean"}}, "per_video": {...}, "n_objects", "videos"}``.
    """
    from tqdm import tqdm

    root, results = Path(davis_root), Path(results_dir)
    videos = list_videos(root, split, videos, resolution)
    if not results.is_dir():
        raise DataError(f"results folder {results} does not exist")
    stats = {"J": [], "F": []}
    per_object: dict[str, dict] = {}
    per_video: dict[str, dict] = {}
    for v in tqdm(videos, desc="scoring", disable=not (progress and stderr_is_tty())):
        ann = sorted((root / "Annotations" / resolution / v).glob("*.png"))
        if not ann:
            raise DataError(f"no annotations in {root / 'Annotations' / resolution / v}")
        gt = [_read_labels(p) for p in ann]
        for p, g in zip(ann, gt):
            if g.shape != gt[0].shape:
                raise DataError(f"annotation {p} is {_hw(g.shape)} px, {ann[0].name} {_hw(gt[0].shape)} (HxW): all "
                                "annotations of a video must share a size")
        gt = np.stack(gt)
        gt[gt == VOID_LABEL] = 0
        _check_object_ids(gt[0], f"annotation {ann[0]}")
        n_obj = int(gt[0].max())
        ids = [p.stem for p in ann][1:-1]
        gt = gt[1:-1]
        # objects are those of the first frame
        gt = np.where(gt > n_obj, 0, gt)
        res = []
        for i in ids:
            p = results / v / f"{i}.png"
            if not p.is_file():
                raise DataError(f"result {p} is missing (results must be indexed PNGs named like the annotations)")
            r = _read_labels(p, "result")
            if r.shape != gt.shape[1:]:
                raise DataError(f"result {p} is {_hw(r.shape)} px, its annotation {_hw(gt.shape[1:])} (HxW)")
            res.append(r)
        res = np.stack(res) if res else np.zeros_like(gt)
        if res.size and int(res.max()) > n_obj:
            raise DataError(f"video {v}: result label {int(res.max())} but only {n_obj} objects in frame 0")
        J, Fm = evaluate_video(gt, res, bound_th) if len(ids) else (np.zeros((n_obj, 0)), np.zeros((n_obj, 0)))
        vj, vf = [], []
        for k in range(n_obj):
            js, fs = db_statistics(J[k]), db_statistics(Fm[k])
            stats["J"].append(js)
            stats["F"].append(fs)
            per_object[f"{v}_{k + 1}"] = {"J-Mean": js[0], "F-Mean": fs[0]}
            vj.append(js[0])
            vf.append(fs[0])
        per_video[v] = {"J&F-Mean": float((np.mean(vj) + np.mean(vf)) / 2) if vj else float("nan"),
                        "J-Mean": float(np.mean(vj)) if vj else float("nan"),
                        "F-Mean": float(np.mean(vf)) if vf else float("nan"), "n_objects": n_obj,
                        "n_frames_scored": len(ids)}
    if not stats["J"]:
        raise DataError("no objects to score (are the first-frame annotations empty?)")
    Js, Fs = np.array(stats["J"]), np.array(stats["F"])
    out = {"J-Mean": float(np.mean(Js[:, 0])), "J-Recall": float(np.mean(Js[:, 1])),
           "J-Decay": float(np.mean(Js[:, 2])), "F-Mean": float(np.mean(Fs[:, 0])),
           "F-Recall": float(np.mean(Fs[:, 1])), "F-Decay": float(np.mean(Fs[:, 2]))}
    out = {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}
    out.update(per_object=per_object, per_video=per_video, n_objects=len(per_object), videos=list(videos))
    return out
