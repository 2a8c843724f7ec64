"""``dinokit davis``: DAVIS-2017 video object segmentation by label propagation, scored with J & F.
Protocol: :mod:`dinokit.eval.davis` (reference §4.5)."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from ..errors import ConfigError, DataError
from ._common import (
    add_model_arguments,
    check_output_dir,
    check_output_file,
    format_table,
    load_model,
    model_info,
    pct,
    resolve_device,
    write_json,
)

HELP = "DAVIS-2017 video object segmentation by label propagation (J&F)"
DESCRIPTION = """Semi-supervised video object segmentation by nearest-neighbour label propagation of frozen patch
features (DINO paper, Table 5; protocol of Jabri et al. 2020).

examples:
  dinokit davis --weights dino_vits8.pth --davis-root data/DAVIS --out runs/davis_vits8
  dinokit davis --weights run/checkpoint.pth --davis-root data/DAVIS --out runs/davis --videos bike-packing dogs-jump
  dinokit davis --eval-only --davis-root data/DAVIS --out runs/davis       # score existing PNGs

DAVIS-ROOT holds JPEGImages/480p/<video>/*.jpg, Annotations/480p/<video>/*.png and ImageSets/2017/val.txt
(DAVIS-2017 trainval 480p from https://davischallenge.org/davis2017/code.html). Writes OUT/<video>/<frame>.png
(indexed, DAVIS palette), then scores them as davis2017-evaluation does (first and last frames excluded) and writes
OUT/davis_results.json plus the official global_results-<split>.csv and per-sequence_results-<split>.csv.
Metrics are printed in percent and stored as fractions.

Annotations must have their frame's size and be indexed (palette) PNGs, as DAVIS ships them; a greyscale PNG is
read as label values (0 background, 1..K objects, 255 void) and an RGB PNG back through the DAVIS palette (black
background, (128,0,0) object 1, (0,128,0) object 2, ...; any other colour is refused)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False, workers=False)
    parser.add_argument("--davis-root", "--data-path", dest="davis_root", required=True, metavar="DIR",
                        help="DAVIS-2017 folder (JPEGImages/, Annotations/, ImageSets/)")
    parser.add_argument("--out", "--output-dir", dest="out", required=True, metavar="DIR",
                        help="where OUT/<video>/<frame>.png and the scores are written")
    parser.add_argument("--n-last-frames", type=int, default=7, help="previous frames in the context (default: 7)")
    parser.add_argument("--size-mask-neighborhood", type=int, default=12,
                        help="spatial neighbourhood radius in patches; 0 = whole frame (default: 12)")
    parser.add_argument("--topk", type=int, default=5, help="sources kept per target patch (default: 5)")
    parser.add_argument("--temperature", type=float, default=0.1, help="affinity temperature, > 0 (default: 0.1)")
    parser.add_argument("--short-side", type=int, default=480,
                        help="frames are resized to this short side; the long side is floored to a multiple of "
                             "64 (default: 480, the reference)")
    parser.add_argument("--imagenet-std", action="store_true",
                        help="normalise with std 0.229 instead of the reference's 0.228 quirk")
    parser.add_argument("--videos", nargs="+", default=None, metavar="NAME",
                        help="videos to process (default: all of ImageSets/2017/<split>.txt)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default: val)")
    parser.add_argument("--resolution", default="480p", help="JPEGImages/ and Annotations/ sub-folder (480p)")
    parser.add_argument("--bound-th", type=float, default=0.008,
                        help="F boundary tolerance as a fraction of the image diagonal, >= 0; a value >= 1 is "
                             "taken as pixels (default: 0.008)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-eval", action="store_true", help="only write the segmentations")
    mode.add_argument("--eval-only", action="store_true", help="only score the PNGs already in OUT")
    parser.add_argument("--output", default=None, metavar="FILE", help="JSON result (default: OUT/davis_results.json)")


def _write_official_csvs(out: Path, split: str, res: dict) -> None:
    with open(out / f"global_results-{split}.csv", "w", newline="") as f:
        keys = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
        w = csv.writer(f)
        w.writerow(keys)
        w.writerow([f"{res[k]:.6f}" for k in keys])
    with open(out / f"per-sequence_results-{split}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Sequence", "J-Mean", "F-Mean"])
        for name, m in res["per_object"].items():
            w.writerow([name, f"{m['J-Mean']:.6f}", f"{m['F-Mean']:.6f}"])


def _refuse_out_in_the_inputs(out: Path, root: Path, resolution: str, videos: list[str]) -> None:
    """The segmentations go to OUT/<video>/<frame>.png: an OUT that is the ground truth's (or the frames') folder
    would replace the annotations and then score them against themselves."""
    for sub in ("Annotations", "JPEGImages"):
        inputs = root / sub / resolution
        for v in videos:
            if (out / v).is_dir() and (out / v).resolve() == (inputs / v).resolve():
                raise ConfigError(f"--out {out} is the data set's {sub}/{resolution} folder: the segmentations would "
                                  f"replace its files (and be scored against themselves); give another --out")


def run(args: argparse.Namespace) -> int:
    from ..eval.davis import DAVIS_STD, IMAGENET_STD, evaluate_davis, list_videos, segment_davis

    if args.n_last_frames < 0 or args.topk < 1 or args.size_mask_neighborhood < 0 or args.short_side < 1:
        raise ConfigError("need --n-last-frames >= 0, --topk >= 1, --size-mask-neighborhood >= 0, --short-side >= 1")
    if not 0 < args.temperature < math.inf:
        raise ConfigError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not 0 <= args.bound_th < math.inf:
        raise ConfigError(f"--bound-th must be a finite number >= 0, got {args.bound_th}")
    out = check_output_dir(args.out)
    if args.output:
        check_output_file(args.output, "--output", files={"--weights": args.weights},
                          roots={"--davis-root": args.davis_root})
    videos = list_videos(args.davis_root, args.split, args.videos, args.resolution)
    _refuse_out_in_the_inputs(out, Path(args.davis_root), args.resolution, videos)
    progress = not args.no_progress
    settings = {"n_last_frames": args.n_last_frames, "size_mask_neighborhood": args.size_mask_neighborhood,
                "topk": args.topk, "temperature": args.temperature, "short_side": args.short_side,
                "std": list(IMAGENET_STD if args.imagenet_std else DAVIS_STD)}
    if not args.eval_only:
        model = load_model(args, need_patches=True)
        segment_davis(model, args.davis_root, out, videos=videos, split=args.split, resolution=args.resolution,
                      progress=progress, n_last_frames=args.n_last_frames,
                      size_mask_neighborhood=args.size_mask_neighborhood, topk=args.topk,
                      temperature=args.temperature, short_side=args.short_side,
                      std=IMAGENET_STD if args.imagenet_std else DAVIS_STD, device=resolve_device(args.device))
        print(f"segmentations written to {out}/<video>/")
        if args.no_eval:
            return 0
    elif not out.is_dir():
        raise DataError(f"results folder {out} does not exist")
    res = evaluate_davis(out, args.davis_root, videos, args.split, args.resolution, args.bound_th, progress)
    rows = [[v, pct(m["J&F-Mean"]), pct(m["J-Mean"]), pct(m["F-Mean"]), str(m["n_objects"])]
            for v, m in res["per_video"].items()]
    rows.append(["mean (over objects)", pct(res["J&F-Mean"]), pct(res["J-Mean"]), pct(res["F-Mean"]),
                 str(res["n_objects"])])
    print(format_table(["video", "J&F", "J", "F", "objects"], rows, left_first=True))
    print(f"J-Recall {pct(res['J-Recall'])}  J-Decay {pct(res['J-Decay'])}  "
          f"F-Recall {pct(res['F-Recall'])}  F-Decay {pct(res['F-Decay'])}")
    out.mkdir(parents=True, exist_ok=True)
    _write_official_csvs(out, args.split, res)
    res["settings"] = settings if not args.eval_only else None
    res["model"] = model_info(args, model) if not args.eval_only else None
    path = write_json(args.output or out / "davis_results.json", res)
    print(f"results written to {path}")
    return 0
