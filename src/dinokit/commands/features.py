"""``dinokit features``: frozen features of a folder of images (or Fashion-MNIST) to a ``.safetensors``
file."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ._common import (
    add_eval_size_arguments,
    add_model_arguments,
    add_precision_argument,
    check_output_file,
    check_positive,
    eval_dataset,
    eval_image_size,
    last_blocks,
    load_model,
    model_info,
)

HELP = "extract frozen features (CLS, last-n CLS, patch tokens) of images to a .safetensors file"
DESCRIPTION = """Extract frozen features (eval mode; fp32, or bf16 autocast with --precision bf16) with the
evaluation transform (Resize(resize_size, bicubic) + CenterCrop(image_size) + ImageNet normalisation).
--image-size defaults to the size the ViT's position embedding was trained at (224 for the official checkpoints,
the global crop size for dinokit runs), --resize-size to image_size*256/224 (equal to --image-size: the whole
image).

Output (safetensors):
  features      [N, D]: the CLS token after the final norm (pooled output for ResNets); with
                --n-last-blocks n, the CLS tokens of the last n blocks concatenated (n*D)
  labels        [N] int64, when every image has a class (folder layout: class sub-folders)
  patch_tokens  [N, P, D] with --patch-tokens: the last block's patch tokens after the final norm
metadata: the model (arch, patch size, weights), the settings, "classes" (JSON list) and "paths": a JSON list
of the image paths relative to "root", in torchvision ImageFolder order (= the row order). When the list is
very large it goes to <out>.paths.json instead ("paths_file").

Read it back with safetensors.torch.load_file(out) and safetensors.safe_open(out, "pt").metadata().

examples:
  dinokit features --weights dino_deitsmall16_pretrain.pth --data photos/ --out feats.safetensors
  dinokit features --weights runs/demo/checkpoint.pth --data fashion-mnist:data/fmnist --split test \\
      --resize-size 28 --out fmnist_test.safetensors"""

# Keep the safetensors header well under its 100 MB limit.
_MAX_INLINE_PATHS = 32 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    d = parser.add_argument_group("data and output")
    d.add_argument("--data", required=True, metavar="SPEC", help="a folder of images or fashion-mnist:<dir>")
    d.add_argument("--split", default="train", choices=["train", "test"],
                   help="Fashion-MNIST split (ignored for folders; default: train)")
    d.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    d.add_argument("--n-last-blocks", type=int, default=1,
                   help="concatenate the CLS tokens of the last n blocks (ViT; default: 1)")
    d.add_argument("--patch-tokens", action="store_true", help="also save the last block's patch tokens")
    add_precision_argument(d)
    add_eval_size_arguments(d)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..augmentation import eval_resize_size
    from ..checkpoint import save_safetensors_atomic
    from ..errors import ConfigError, write_failed
    from ..eval.knn import drop_unreadable, extract_outputs, frozen_features, is_vit

    check_positive("--n-last-blocks", args.n_last_blocks)
    check_positive("--batch-size", args.batch_size)
    out = check_output_file(args.out, files={"--weights": args.weights}, image_folders={"--data": args.data})
    model = load_model(args)
    image_size = eval_image_size(args.image_size, model)
    ds = eval_dataset(args.data, image_size, args.split, args.resize_size)
    vit = is_vit(model)
    if (args.patch_tokens or args.n_last_blocks > 1) and not vit:
        raise ConfigError("--patch-tokens / --n-last-blocks > 1 need a ViT backbone")
    n = last_blocks(model, args.n_last_blocks)

    def fn(m, x):
        if args.patch_tokens:
            out = m.get_intermediate_layers(x, n)
            return torch.cat([o[:, 0] for o in out], dim=-1), out[-1][:, 1:]
        return frozen_features(m, x, n)

    device = next(model.parameters()).device
    outs, _ = extract_outputs(model, ds, fn, batch_size=args.batch_size, num_workers=args.num_workers,
                              device=device, progress=not args.no_progress, precision=args.precision)
    labels = ds.labels  # each file's own label (an unreadable file's row holds a substitute: dropped below)
    index = torch.arange(len(ds))
    *outs, labels, index = drop_unreadable(ds, "input", *outs, labels, index)
    tensors = {"features": outs[0].contiguous()}
    if args.patch_tokens:
        tensors["patch_tokens"] = outs[1].contiguous()
    if getattr(ds, "has_labels", False):
        tensors["labels"] = labels.to(torch.int64).contiguous()

    meta = {"format": "dinokit-features", "data": str(args.data), "n": str(len(index)),
            "feature": f"cls_last_{n}_blocks" if n > 1 else "cls", "n_last_blocks": str(n),
            "image_size": str(image_size), "resize_size": str(eval_resize_size(image_size, args.resize_size)),
            "precision": args.precision,
            "model": json.dumps(model_info(args, model))}
    if ":" in str(args.data) and not Path(args.data).exists():
        meta["split"] = args.split
    classes = list(getattr(ds, "classes", []) or [])
    if classes:
        meta["classes"] = json.dumps(classes)
    samples = getattr(ds, "samples", None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # before the side file too, which goes beside --out
        if samples is not None:
            root = Path(getattr(ds, "root", os.path.commonpath([p for p, _ in samples]) if samples else "."))
            rel = [os.path.relpath(samples[i][0], root) for i in index.tolist()]
            meta["root"] = str(root.resolve())
            text = json.dumps(rel)
            if len(text) <= _MAX_INLINE_PATHS:
                meta["paths"] = text
            else:
                side = out.with_name(out.name + ".paths.json")
                side.write_text(text)
                meta["paths_file"] = side.name
        save_safetensors_atomic(tensors, out, meta)
    except OSError as e:
        raise write_failed(out, e) from None
    shape = "x".join(map(str, tensors["features"].shape))
    extra = f", patch_tokens {'x'.join(map(str, tensors['patch_tokens'].shape))}" if args.patch_tokens else ""
    print(f"wrote {out}: features {shape}{extra}{', labels' if 'labels' in tensors else ''} "
          f"({len(index)} images)")
    return 0
