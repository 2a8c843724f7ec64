"""``dinokit linear``: linear-probe accuracy of a frozen backbone (reference ``eval_linear.py``; protocol in
:mod:`dinokit.eval.linear`)."""

from __future__ import annotations

import argparse

from ..augmentation import eval_resize_size
from ._common import (
    add_eval_size_arguments,
    add_model_arguments,
    add_precision_argument,
    check_eval_sizes,
    check_output_file,
    check_positive,
    eval_image_size,
    format_table,
    last_blocks,
    load_model,
    model_info,
    write_json,
)

HELP = "linear-probe classification accuracy of frozen features (cached features; --augment: DINO protocol)"
DESCRIPTION = """Linear probe on a frozen backbone (DINO paper §4.1; reference eval_linear.py).

Feature: CLS tokens of the last --n-last-blocks blocks (ViT-S setting: 4), or with --avgpool-patchtokens
(ViT-B setting: --n-last-blocks 1) the CLS token interleaved with the mean patch token; the pooled output
for ResNets. Linear layer N(0, 0.01^2) init, SGD momentum 0.9, weight decay 0, lr = --lr * batch/256, cosine
annealing to 0 over --epochs, cross-entropy. Validation after epochs 1, 1+N, 1+2N, ... (--val-freq N) and the
last; the best top-1 over those is reported (as the reference does) along with the last epoch. No top-5 below 5
classes; a class only the validation data has is a miss.

Default (fast, CPU-friendly): frozen features are computed once without augmentation and every --lr of the
sweep is trained on them in the same run. --augment runs the reference protocol instead: RandomResizedCrop +
flip on every training image every epoch (one backbone forward per image per epoch, shared by all --lr).
Evaluation images: Resize(--resize-size, bicubic) + CenterCrop(--image-size); --image-size defaults to the size
the ViT's position embedding was trained at (224 for the official checkpoints, the global crop size for dinokit
runs), --resize-size to image_size*256/224 (set it equal to --image-size to keep the whole of a square image).
The default's numbers are not the paper's protocol: use --augment to compare with published results (the JSON
records the mode).

examples:
  dinokit linear --weights dino_deitsmall16_pretrain.pth --train-data imagenet/train --val-data imagenet/val
  dinokit linear --weights run/checkpoint.pth --train-data fashion-mnist:data/fmnist \\
      --val-data fashion-mnist:data/fmnist --resize-size 28 --lr 0.001 0.01 0.1 --epochs 100"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    d = parser.add_argument_group("data and protocol")
    d.add_argument("--train-data", required=True, metavar="SPEC",
                   help="labelled train images: class sub-folders, or fashion-mnist:<dir> (train split)")
    d.add_argument("--val-data", required=True, metavar="SPEC",
                   help="labelled validation images (fashion-mnist:<dir>: test split)")
    d.add_argument("--n-last-blocks", type=int, default=4,
                   help="concatenate the CLS tokens of this many last blocks (default: 4, ViT-S setting)")
    d.add_argument("--avgpool-patchtokens", action="store_true",
                   help="add the mean patch token of the last block (ViT-B setting, with --n-last-blocks 1)")
    d.add_argument("--epochs", type=int, default=100, help="training epochs (default: 100)")
    d.add_argument("--lr", type=float, nargs="+", default=[0.001],
                   help="base learning rate(s), scaled by batch-size/256; several values are swept in one "
                        "run (default: 0.001)")
    d.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (default: 0)")
    d.add_argument("--augment", action="store_true",
                   help="reference protocol: augmented images every epoch (slow) instead of cached features")
    add_eval_size_arguments(d)
    d.add_argument("--val-freq", type=int, default=1,
                   help="validate after epochs 1, 1+N, 1+2N, ... and the last, as the reference (default: 1)")
    d.add_argument("--seed", type=int, default=0,
                   help="initialisation, shuffling and --augment's crops seed (default: 0)")
    add_precision_argument(d)
    d.add_argument("--output", metavar="FILE", default=None, help="write the results as JSON (percent)")


def run(args: argparse.Namespace) -> int:
    from ..eval.linear import linear_probe

    for name in ("epochs", "batch_size", "n_last_blocks", "val_freq"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.output:
        check_output_file(args.output, "--output", files={"--weights": args.weights},
                          image_folders={"--train-data": args.train_data, "--val-data": args.val_data})
    for lr in args.lr:
        check_positive("--lr", lr)
    model = load_model(args)
    image_size = eval_image_size(args.image_size, model)
    check_eval_sizes(image_size, args.resize_size)
    device = next(model.parameters()).device
    res = linear_probe(model, args.train_data, args.val_data, lrs=args.lr, epochs=args.epochs,
                       n_last_blocks=last_blocks(model, args.n_last_blocks),
                       avgpool_patchtokens=args.avgpool_patchtokens,
                       batch_size=args.batch_size, augment=args.augment, image_size=image_size,
                       resize_size=args.resize_size,
                       num_workers=args.num_workers, device=device, weight_decay=args.weight_decay,
                       seed=args.seed, val_freq=args.val_freq, progress=not args.no_progress,
                       precision=args.precision)
    print(f"linear probe ({res['mode']}): {res['n_train']} train / {res['n_val']} val images, "
          f"{res['num_labels']} classes, {res['feature_dim']}-d features, {args.epochs} epochs")
    def p2(v):  # top-5 is None with fewer than 5 classes
        return "n/a" if v is None else f"{v:.2f}"

    rows = [[f"{r['lr']:g}", f"{r['lr_scaled']:.3g}", p2(r["best"]["top1"]), p2(r["best"]["top5"]),
             r["best"]["epoch"], p2(r["last"]["top1"]), p2(r["last"]["top5"])] for r in res["results"]]
    print(format_table(["lr", "lr*bs/256", "best top-1", "top-5", "epoch", "last top-1", "top-5"], rows))
    b = res["best"]
    print(f"best: lr {b['lr']:g}, top-1 {b['best']['top1']:.2f} (epoch {b['best']['epoch']}), "
          f"top-5 {p2(b['best']['top5'])}; last epoch top-1 {b['last']['top1']:.2f}")
    if args.output:
        payload = {"linear": res, "units": "percent", "model": model_info(args, model),
                   "train_data": args.train_data, "val_data": args.val_data, "image_size": image_size,
                   "resize_size": eval_resize_size(image_size, args.resize_size)}
        print(f"wrote {write_json(args.output, payload)}")
    return 0
