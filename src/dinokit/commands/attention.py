"""``dinokit attention``: last-block self-attention maps and threshold masks of a ViT (reference
``visualize_attention.py``; method in :mod:`dinokit.eval.attention`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_model_arguments, check_output_dir, load_model

HELP = "save the last-layer CLS self-attention maps (per head) and threshold masks of images"
DESCRIPTION = """Self-attention visualisation (DINO paper Fig. 1/3; reference visualize_attention.py).

For every --image: resize (bilinear), normalise, crop to a multiple of the patch size, take the last block's
attention from the CLS token to every patch, per head. Writes to --out, prefixed by the image's file name:
  <name>-img.png                 the image as fed to the network
  <name>-attn-head<j>.png        heat-map of head j (and -attn-mean.png, the mean over heads)
  <name>-overlay-head<j>.png     the heat-map blended over the image (and -overlay-mean.png)
  <name>-mask-th<t>-head<j>.png  the smallest set of patches holding a fraction t of head j's attention
  <name>-attn.npy / -masks.npy   the raw maps [heads, H/p, W/p] and masks

--image-size N resizes the shorter side to N and keeps the aspect ratio; --image-size H W resizes to exactly
H x W (the reference's --image_size 480 480, which squashes non-square images).

example:
  dinokit attention --weights dino_deitsmall8_pretrain.pth --image cat.jpg --image dog.png --out attn/"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, workers=False)
    d = parser.add_argument_group("images and output")
    d.add_argument("--image", required=True, action="extend", nargs="+", metavar="IMG",
                   help="image file(s); repeat or list several")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory")
    d.add_argument("--threshold", type=float, default=0.6,
                   help="attention mass kept by the masks (paper: 0.6; 0 disables the masks)")
    d.add_argument("--image-size", type=int, nargs="+", default=[480], metavar="N",
                   help="shorter side N (aspect kept), or H W (exact), each at least the patch size; default: 480")


def run(args: argparse.Namespace) -> int:
    from ..data import load_image
    from ..errors import ConfigError, DataError
    from ..eval.attention import attention_maps, prepare_image, save_attention_images, threshold_masks
    from ..eval.knn import is_vit

    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if len(args.image_size) not in (1, 2) or min(args.image_size) <= 0:
        raise ConfigError("--image-size takes one positive number (shorter side) or two (height width)")
    out = check_output_dir(args.out)
    images = [Path(p).expanduser() for p in args.image]
    for p in images:
        if p.is_dir():
            raise DataError(f"--image {p} is a folder; give image files")
        if not p.is_file():
            raise DataError(f"image not found: {p}" if not p.exists() else f"--image {p} is not a regular file")
    model = load_model(args)
    if not (is_vit(model) and hasattr(model, "get_last_selfattention")):
        raise ConfigError(f"attention maps need a ViT backbone, not {type(model).__name__}")
    if min(args.image_size) < model.patch_size:
        raise ConfigError(f"--image-size {' '.join(map(str, args.image_size))}: a side of {min(args.image_size)} px "
                          f"is smaller than one {model.patch_size}-pixel patch")
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    used: set[str] = set()
    # an input image inside --out named like an output (OUT/a-img.png for OUT/a.png) must not be replaced
    inputs_here = {p.name for p in images if p.parent.resolve() == out.resolve()} if out.is_dir() else set()
    for path in images:
        img = load_image(path)
        x, shown = prepare_image(img, size, model.patch_size)
        maps = attention_maps(model, x)
        masks = threshold_masks(maps, args.threshold) if args.threshold > 0 else None
        prefix, n = path.stem, 0
        # two images with the same name (a/x.png, b/x.png, x_1.png): keep all; never write over an input
        while prefix in used or any(name.startswith(f"{prefix}-") for name in inputs_here):
            n += 1
            prefix = f"{path.stem}_{n}"
        used.add(prefix)
        try:
            written = save_attention_images(shown, maps, masks, out, prefix=prefix,
                                            threshold=args.threshold if masks is not None else None)
        except OSError as e:
            raise DataError(f"cannot write to {out}: {e.strerror or e}") from None
        h, w = maps.shape[1:]
        print(f"{path}: {shown.height}x{shown.width} px (HxW), {maps.shape[0]} heads, {h}x{w} patches -> "
              f"{len(written)} files {out / prefix}-*")
    return 0
