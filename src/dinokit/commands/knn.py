"""``dinokit knn``: weighted k-NN accuracy of a frozen backbone (reference ``eval_knn.py``; protocol in
:mod:`dinokit.eval.knn`)."""

from __future__ import annotations

import argparse

from ..eval.knn import FEATURES
from ._common import (
    add_eval_size_arguments,
    add_model_arguments,
    add_precision_argument,
    check_output_file,
    check_positive,
    eval_dataset,
    eval_image_size,
    format_table,
    load_model,
    model_info,
    require_labels,
    write_json,
)

HELP = "weighted k-NN classification accuracy of frozen features (DINO protocol)"
DESCRIPTION = """Weighted k-NN evaluation of a frozen backbone (DINO paper §4.1; reference eval_knn.py).

Features (--features): the CLS token after the final norm (pooled output for ResNets; the reference), the mean
of the last block's patch tokens (avgpool), or both, each L2-normalised, concatenated (concat; the demo's
knn_top1); fp32 (--precision bf16: bf16 autocast), eval mode, on Resize(resize_size, bicubic) +
CenterCrop(image_size) + ImageNet normalisation; L2-normalised. --image-size defaults to the size the ViT's
position embedding was trained at (224 for the official checkpoints, the global crop size for dinokit runs),
--resize-size to image_size*256/224; --resize-size equal to --image-size keeps the whole of a square image
(the shorter side is resized, the longer one still center-cropped). Each val image
takes the k most cosine-similar train images, weighted exp(similarity / T). Top-1 / top-5 in percent for every
--k (the paper reports k=20, T=0.07); top-5 counts min(5, k, classes) classes that got votes, so with 5 or fewer
classes it says little. The neighbours are searched once for the largest k.

examples:
  dinokit knn --weights dino_deitsmall16_pretrain.pth --train-data imagenet/train --val-data imagenet/val
  dinokit knn --weights runs/demo/checkpoint.pth --train-data fashion-mnist:DIR --val-data \\
      fashion-mnist:DIR --resize-size 28 --features concat --k 20    # the demo's knn_top1

--train-data / --val-data: a folder with one sub-folder per class (ImageFolder layout; class folders are
matched by name), or fashion-mnist:<dir> (train split for --train-data, test split for --val-data).
--weights: a dinokit or official DINO checkpoint (--checkpoint-key picks teacher/student), a bare backbone
state dict or a .safetensors export; the architecture is inferred unless --arch/--patch-size are given."""


# ------------------------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    d = parser.add_argument_group("data and protocol")
    d.add_argument("--train-data", required=True, metavar="SPEC", help="train images (the k-NN memory bank)")
    d.add_argument("--val-data", required=True, metavar="SPEC", help="images to classify")
    d.add_argument("--k", "--nb-knn", dest="k", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="numbers of neighbours (default: 10 20 100 200)")
    d.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default: 0.07)")
    add_eval_size_arguments(d)
    d.add_argument("--features", choices=FEATURES, default="cls",
                   help="cls (reference), avgpool (mean patch token) or concat (default: cls)")
    add_precision_argument(d)
    d.add_argument("--output", metavar="FILE", default=None, help="write the results as JSON (percent)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..augmentation import eval_resize_size
    from ..eval.knn import aligned_labels, drop_unreadable, extract_features, knn_eval

    for k in args.k:
        check_positive("--k", k)
    check_positive("--temperature", args.temperature)
    if args.output:
        check_output_file(args.output, "--output", files={"--weights": args.weights},
                          image_folders={"--train-data": args.train_data, "--val-data": args.val_data})
    check_positive("--batch-size", args.batch_size)
    model = load_model(args, need_patches=args.features != "cls")
    image_size = eval_image_size(args.image_size, model)
    train_ds = eval_dataset(args.train_data, image_size, "train", args.resize_size)
    val_ds = eval_dataset(args.val_data, image_size, "test", args.resize_size)
    require_labels(train_ds, args.train_data, "train")
    require_labels(val_ds, args.val_data, "val")
    device = next(model.parameters()).device
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device,
              progress=not args.no_progress, precision=args.precision)
    train_feats, _ = extract_features(model, train_ds, desc="train features", features=args.features, **kw)
    val_feats, _ = extract_features(model, val_ds, desc="val features", features=args.features, **kw)
    train_feats, train_labels = drop_unreadable(train_ds, "train", train_feats, train_ds.labels)
    val_feats, val_labels = drop_unreadable(val_ds, "val", val_feats, aligned_labels(train_ds, val_ds))
    num_classes = int(max(int(train_labels.max()), int(val_labels.max()))) + 1
    if too_big := [k for k in sorted(set(args.k)) if k > len(train_labels)]:
        import warnings

        warnings.warn(f"dinokit: --k {' '.join(map(str, too_big))} above the {len(train_labels)} train images: "
                      f"such a k votes with all of them", stacklevel=1)
    bank_device = device if device.type == "cuda" else torch.device("cpu")
    res = knn_eval(train_feats.to(bank_device), train_labels, val_feats.to(bank_device), val_labels,
                   ks=sorted(set(args.k)), T=args.temperature, num_classes=num_classes)
    print(f"k-NN (weighted, T={args.temperature:g}): {len(train_labels)} train / {len(val_labels)} val images, "
          f"{num_classes} classes, {train_feats.shape[1]}-d {args.features} features at {image_size} px"
          f"{' (bf16)' if args.precision == 'bf16' else ''}")
    print(format_table(["k", "top-1", "top-5"],
                       [[k, f"{r['top1']:.2f}", f"{r['top5']:.2f}"] for k, r in res.items()]))
    if args.output:
        payload = {"knn": {str(k): r for k, r in res.items()}, "units": "percent",
                   "temperature": args.temperature, "model": model_info(args, model),
                   "train_data": args.train_data, "val_data": args.val_data, "n_train": len(train_labels),
                   "n_val": len(val_labels), "num_classes": num_classes, "feature_dim": int(train_feats.shape[1]),
                   "image_size": image_size, "resize_size": eval_resize_size(image_size, args.resize_size),
                   "features": args.features, "precision": args.precision}
        print(f"wrote {write_json(args.output, payload)}")
    return 0
