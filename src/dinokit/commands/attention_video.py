"""``dinokit attention-video``: the last block's self-attention over a video, frame by frame (reference
``video_generation.py``; method in :mod:`dinokit.eval.attention_video`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._common import add_model_arguments, check_output_dir, check_positive, load_model, model_info, write_json

HELP = "make a video of a ViT's last-layer CLS self-attention over a video file or a folder of frames"
DESCRIPTION = """Self-attention video (the DINO project page's videos; reference video_generation.py).

For every frame of --input (a video file, or a folder of frames in name order, numbers as numbers: f2 before
f10): resize (optional), normalise, crop to a multiple of the patch size, take the last block's attention from
the CLS token to every patch, averaged over the heads, and draw it min-max normalised in a colour map
(inferno, as the reference). Writes:
  OUT/video.mp4 (or .avi)        the attention video, at the input's frame rate (--fps overrides it)
  OUT/attention/attn-<frame>.png one image per frame (--no-frames: none)
  OUT/attention.npy              the maps [frames, H/p, W/p] (float32)
  OUT/attention_video.json       what was done (frames, fps, size, model, options)

Frames are streamed: memory does not grow with the video. A video's frames keep their size unless
--image-size is given (N: shorter side N, aspect kept; H W: exactly), which also lowers the cost: attention is
quadratic in the number of patches.

examples:
  dinokit attention-video --weights dino_deitsmall8_pretrain.pth --input clip.mp4 --out attn_clip/
  dinokit attention-video --weights run/checkpoint.pth --input frames/ --image-size 360 640 --overlay --out v/"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, workers=False)
    d = parser.add_argument_group("video and output")
    d.add_argument("--input", required=True, metavar="VIDEO_OR_DIR",
                   help="a video file (anything OpenCV decodes: mp4, avi, mov, ...) or a folder of frames")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory")
    d.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                   help="shorter side N (aspect kept), or H W (exact); default: the frames' own size")
    d.add_argument("--fps", type=float, default=None,
                   help="frame rate of the output video; default: the input video's, 30 for a folder of frames")
    d.add_argument("--format", dest="video_format", choices=["mp4", "avi"], default="mp4",
                   help="video container (default: mp4)")
    d.add_argument("--colormap", default="inferno", help="matplotlib colour map (default: inferno, as the reference)")
    d.add_argument("--overlay", action="store_true", help="blend the attention over the frame (half and half)")
    d.add_argument("--no-frames", action="store_true", help="write only the video and the maps, no frame images")
    d.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N frames")
    d.add_argument("--batch-size", type=int, default=8, help="frames per forward pass (default: 8)")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.attention_video import write_attention_video

    if args.image_size is not None and (len(args.image_size) not in (1, 2) or min(args.image_size) <= 0):
        raise ConfigError("--image-size takes one positive number (shorter side) or two (height width)")
    if args.fps is not None:
        check_positive("--fps", args.fps)
    if args.max_frames is not None:
        check_positive("--max-frames", args.max_frames)
    check_positive("--batch-size", args.batch_size)
    out = check_output_dir(args.out)
    source = Path(args.input).expanduser()
    video = out / f"video.{args.video_format}"
    if source.is_file() and video.is_file() and os.path.samefile(video, source):  # links too
        raise ConfigError(f"--out {out} would write {video}, the --input video itself; give another --out")
    model = load_model(args, need_patches=True)  # a ViT without get_last_selfattention: mean_attention says so
    size = None if args.image_size is None else (args.image_size[0] if len(args.image_size) == 1
                                                  else tuple(args.image_size))
    res = write_attention_video(model, source, out, image_size=size, fps=args.fps, video_format=args.video_format,
                                colour_map=args.colormap, overlay=args.overlay, save_frames=not args.no_frames,
                                batch_size=args.batch_size, max_frames=args.max_frames,
                                progress=not args.no_progress)
    (w, h), (fw, fh) = res["size"], res["frame_size"]
    record = {"input": str(source), "video": str(res["video"]), "frames": res["frames"], "fps": res["fps"],
              "width": w, "height": h, "frame_width": fw, "frame_height": fh, "patch_size": int(model.patch_size),
              "image_size": args.image_size, "colormap": args.colormap, "overlay": args.overlay,
              "model": model_info(args, model)}
    write_json(out / "attention_video.json", record)
    even = f" (frames {fw}x{fh}: video sizes are even)" if (fw, fh) != (w, h) else ""
    print(f"{source}: {res['frames']} frames, {w}x{h} px (WxH){even} at {res['fps']:g} fps -> {res['video']}"
          + (f", frames in {res['frame_dir']}/" if res["frame_dir"] else ""))
    return 0
