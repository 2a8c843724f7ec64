"""Self-attention videos: the last block's CLS attention, frame by frame (the reference's
``video_generation.py``, used for the videos of the DINO paper's project page).

* Input: a video file (decoded with OpenCV) or a folder of frames (its image files, in name order with
  numbers compared as numbers: ``f2`` before ``f10``).
* Each frame is prepared as :func:`dinokit.eval.attention.prepare_image` prepares an image (optional resize,
  ImageNet normalisation, crop at the bottom/right to a multiple of the patch size; the reference resizes with
  ``T.Resize`` on the tensor and crops the same way).
* Its map is the **mean over heads** of the last block's attention from the CLS query to every patch
  (``get_last_selfattention(x)[0, :, 0, 1:]``), upsampled ×p (nearest) and drawn min-max normalised in a colour
  map (the reference: ``plt.imsave(..., cmap="inferno")``, which normalises each frame to its own range).
* Output: ``OUT/attention/attn-<frame>.png`` per frame (``--no-frames``: none), ``OUT/attention.npy`` (the
  maps, ``[frames, H/p, W/p]`` float32) and ``OUT/video.mp4`` (or ``.avi``) at the input's frame rate (a folder
  of frames: ``fps``, default 30 as the reference). ``overlay`` blends the map over the frame instead.

Unlike the reference, frames are streamed (decoded, computed in batches of same-sized frames and written one at
a time: memory does not grow with the video's length) and frames are not written to disk first.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..console import stderr_is_tty
from ..data import IMAGE_EXTENSIONS, load_image
from ..errors import ConfigError, DataError
from .attention import _upsample, colormap, prepare_image

__all__ = ["open_frames", "mean_attention", "attention_frame", "write_attention_video", "VIDEO_FORMATS"]

#: output container -> OpenCV FourCC (the reference's choices)
VIDEO_FORMATS = {"mp4": "mp4v", "avi": "XVID"}


def natural_key(path: Path) -> list:
    """Sort key of frame files in number order: ``f2.png`` before ``f10.png`` (runs of digits compare as numbers;
    zero-padded names sort as before)."""
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name) if t]


def _still_image(path: Path) -> bool:
    """A picture of one frame (an animated GIF/WebP or a multi-page TIFF is a video to OpenCV, and stays one)."""
    try:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1) <= 1
    except Exception:  # not readable by PIL: let OpenCV say what it is
        return False


def open_frames(source: str | Path) -> tuple[Iterator[tuple[str, Image.Image]], float | None, int | None]:
    """``(frames, fps, count)`` of a video file or a folder of frames. ``frames`` yields ``(name, RGB image)``
    (``frame-00000``, ... for a video; the file stem for a folder); ``fps`` is the video's (``None`` for a
    folder or when the container does not say); ``count`` the number of frames when known. A file OpenCV cannot
    decode, or a folder without images, is a :class:`DataError`."""
    src = Path(source).expanduser()
    if not src.exists():
        raise DataError(f"video or frame folder not found: {src}")
    if src.is_dir():
        files = sorted((p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)),
                       key=natural_key)
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {src}")
        stems = Counter(p.stem for p in files)
        names = [p.stem if stems[p.stem] == 1 else p.name for p in files]  # f1.png and f1.jpg: both kept
        return ((name, load_image(p)) for name, p in zip(names, files)), None, len(files)
    if src.name.lower().endswith(IMAGE_EXTENSIONS) and _still_image(src):  # OpenCV: 1 frame at a made-up 25 fps
        raise DataError(f"{src} is an image, not a video: dinokit attention --image {src} draws its maps (a folder "
                        "of frames makes a video)")
    import cv2

    cap = cv2.VideoCapture(str(src))
    ok, first = cap.read() if cap.isOpened() else (False, None)
    if not ok:
        cap.release()
        raise DataError(f"cannot decode {src} as a video (OpenCV {cv2.__version__} reads no frame from it); give "
                        "a video file (mp4, avi, mov, ...) or a folder of frames")
    fps = cap.get(cv2.CAP_PROP_FPS)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))

    def frames() -> Iterator[tuple[str, Image.Image]]:
        frame, i = first, 0
        try:
            while frame is not None:
                yield f"frame-{i:05d}", Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                ok, frame = cap.read()
                frame, i = (frame if ok else None), i + 1
        finally:
            cap.release()

    return frames(), (fps if math.isfinite(fps) and fps > 0 else None), (count if count > 0 else None)


@torch.no_grad()
def mean_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, H/p, W/p]``: the mean over heads of the last block's CLS -> patch attention of a batch of
    normalised images ``x [B, 3, H, W]`` (``H, W`` multiples of the patch size), float32 on CPU."""
    if not hasattr(model, "get_last_selfattention"):
        raise ConfigError(f"attention videos need a ViT, not {type(model).__name__}")
    p = int(model.patch_size)
    device = next(model.parameters()).device
    attn = model.get_last_selfattention(x.to(device).float())  # [B, heads, 1 + N, 1 + N]
    return attn[:, :, 0, 1:].mean(dim=1).reshape(len(x), x.shape[-2] // p, x.shape[-1] // p).float().cpu()


def attention_frame(mean_map: torch.Tensor | np.ndarray, image: Image.Image, colour_map: str = "inferno",
                    overlay: bool = False, alpha: float = 0.5) -> np.ndarray:
    """``[H, W, 3]`` uint8: ``mean_map [h, w]`` upsampled to ``image``'s size (nearest), min-max normalised in
    ``colour_map``; with ``overlay`` blended over ``image`` (weight ``alpha`` for the map)."""
    heat = colormap(_upsample(np.asarray(mean_map, dtype=np.float64), image.size), name=colour_map)
    if not overlay:
        return heat
    mixed = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * heat.astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _batches(frames: Iterator[tuple[str, Image.Image]], image_size, patch_size: int, batch_size: int):
    """Lists of ``(name, tensor, shown image)`` of at most ``batch_size`` frames of one size."""
    batch: list[tuple[str, torch.Tensor, Image.Image]] = []
    for name, img in frames:
        try:
            x, shown = prepare_image(img, image_size, patch_size)
        except ConfigError as e:
            raise ConfigError(f"frame {name}: {e}") from None
        if batch and (len(batch) == batch_size or batch[0][1].shape != x.shape):
            yield batch
            batch = []
        batch.append((name, x, shown))
    if batch:
        yield batch


def write_attention_video(model: nn.Module, source: str | Path, out_dir: str | Path,
                          image_size: int | Sequence[int] | None = None, fps: float | None = None,
                          video_format: str = "mp4", colour_map: str = "inferno", overlay: bool = False,
                          save_frames: bool = True, batch_size: int = 8, max_frames: int | None = None,
                          progress: bool = False) -> dict:
    """Write the attention video of ``source`` (see the module docstring); returns ``{"video", "frames",
    "fps", "size", "maps", "frame_dir"}`` (``size`` = ``(width, height)`` of the video). Every frame must have
    the first frame's size after preparation (a video's do; frames of a folder may not: then give
    ``image_size`` as ``(H, W)``); a frame of another size is a :class:`DataError` naming it. The video's width
    and height are the frames' rounded down to even numbers (the codecs' requirement; ``frame_size`` is the
    frames'). Everything is staged in a hidden folder of ``out_dir`` and moved into place at the end: a run
    that fails or is interrupted leaves ``out_dir``'s previous results as they were, a finished one replaces
    them (frame images included)."""
    import cv2
    from tqdm import tqdm

    if video_format not in VIDEO_FORMATS:
        raise ConfigError(f"video format must be one of {', '.join(VIDEO_FORMATS)}, got {video_format!r}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a finite number > 0, got {fps}")
    if batch_size < 1 or (max_frames is not None and max_frames < 1):
        raise ConfigError("batch_size and max_frames must be at least 1")
    colormap(np.zeros((1, 1)), name=colour_map)  # an unknown colour map fails before any work
    frames, video_fps, count = open_frames(source)
    fps = fps or video_fps or 30.0
    if max_frames is not None:
        frames = (f for i, f in zip(range(max_frames), frames))
        count = min(count, max_frames) if count else max_frames
    out = Path(out_dir)
    frame_dir, video_path, maps_path = out / "attention", out / f"video.{video_format}", out / "attention.npy"
    for p in (video_path, maps_path):
        if p.is_dir():
            raise ConfigError(f"{p} is a folder; the attention video writes a file there")
    if frame_dir.exists() and not frame_dir.is_dir():
        raise ConfigError(f"{frame_dir} is a file; the attention video writes its frame images in that folder")
    # everything is written into a staging folder inside OUT and moved into place at the end: a run that fails
    # or is interrupted leaves the previous results as they were, and a successful one replaces all of them
    stage: Path | None = None
    writer, size, video_size, maps, n = None, None, None, [], 0
    bar = tqdm(total=count, desc="attention video", unit="frame", disable=not (progress and stderr_is_tty()),
               dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(frames, image_size, int(model.patch_size), batch_size):
            means = mean_attention(model, torch.stack([x for _, x, _ in batch]))
            for (name, _, shown), m in zip(batch, means):
                if size is None:
                    size = shown.size
                    video_size = (size[0] - size[0] % 2, size[1] - size[1] % 2)  # the codecs take even sizes
                    if min(video_size) < 2:
                        raise DataError(f"frames of {size[1]}x{size[0]} px (HxW) are too small for a video")
                    out.mkdir(parents=True, exist_ok=True)
                    stage = Path(tempfile.mkdtemp(prefix=".attention_video.", dir=out))
                    if save_frames:
                        (stage / "attention").mkdir()
                    writer = cv2.VideoWriter(str(stage / video_path.name),
                                             cv2.VideoWriter_fourcc(*VIDEO_FORMATS[video_format]), float(fps),
                                             video_size)
                    if not writer.isOpened():
                        raise DataError(f"OpenCV cannot write a {video_format} video of {video_size[0]}x"
                                        f"{video_size[1]} px at {fps:g} fps")
                elif shown.size != size:
                    raise DataError(f"frame {name} is {shown.size[1]}x{shown.size[0]} px (HxW) after preparation, "
                                    f"the first frame {size[1]}x{size[0]}: a video needs one size; give "
                                    "--image-size H W")
                rgb = attention_frame(m.numpy(), shown, colour_map, overlay)
                if save_frames:
                    Image.fromarray(rgb).save(stage / "attention" / f"attn-{name}.png")
                writer.write(np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)[:video_size[1],
                                                                                    :video_size[0]]))
                maps.append(m.clone())  # its own small block: a view would keep the batch's buffer (and the heap
                # fragmented between the large attention buffers: memory grew with the video at batch size 1)
                n += 1
                bar.update(1)
        if n == 0:
            raise DataError(f"no frame read from {source}")
        writer.release()
        writer = None
        np.save(stage / maps_path.name, torch.stack(maps).numpy().astype(np.float32))
        os.replace(stage / video_path.name, video_path)
        os.replace(stage / maps_path.name, maps_path)
        if frame_dir.is_dir():
            shutil.rmtree(frame_dir)  # the previous run's frames: this run's results replace them all
        if save_frames:
            os.replace(stage / "attention", frame_dir)
    except OSError as e:
        raise DataError(f"cannot write to {out}: {e.strerror or e}") from None
    finally:
        model.train(was_training)
        bar.close()
        if writer is not None:
            writer.release()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return {"video": video_path, "frames": n, "fps": float(fps), "size": video_size, "frame_size": size,
            "maps": maps_path, "frame_dir": frame_dir if save_frames else None}
