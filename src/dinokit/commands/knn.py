"""``dinokit knn``: weighted k-NN accuracy of a frozen backbone (reference ``eval_knn.py``; protocol in
:mod:`dinokit.eval.knn`). Also home of the helpers the knn / linear / features / attention commands share."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..trainer import resolve_device  # noqa: F401  (re-exported for the other evaluation commands)

HELP = "weighted k-NN classification accuracy of frozen features (DINO protocol)"
DESCRIPTION = """Weighted k-NN evaluation of a frozen backbone (DINO paper §4.1; reference eval_knn.py).

Features: the CLS token after the final norm (pooled output for ResNets), fp32, eval mode, on
Resize(image_size*256/224, bicubic) + CenterCrop(image_size) + ImageNet normalisation; L2-normalised. Each
val image takes the k most cosine-similar train images, weighted exp(similarity / T). Top-1 / top-5 in percent
for every --k (the paper reports k=20, T=0.07). The neighbours are searched once for the largest k.

examples:
  dinokit knn --weights dino_deitsmall16_pretrain.pth --train-data imagenet/train --val-data imagenet/val
  dinokit knn --weights run/checkpoint.pth --train-data fashion-mnist:data/fmnist --val-data \\
      fashion-mnist:data/fmnist --image-size 32 --k 20

--train-data / --val-data: a folder with one sub-folder per class (ImageFolder layout; class folders are
matched by name), or fashion-mnist:<dir> (train split for --train-data, test split for --val-data).
--weights: a dinokit or official DINO checkpoint (--checkpoint-key picks teacher/student), a bare backbone
state dict or a .safetensors export; the architecture is inferred unless --arch/--patch-size are given."""


# ------------------------------------------------------------------------------------ shared helpers

def add_model_arguments(parser: argparse.ArgumentParser, workers: bool = True, patch_default=None) -> None:
    """``--weights --arch --patch-size --checkpoint-key --device [--batch-size --num-workers]``,
    ``--no-progress``."""
    g = parser.add_argument_group("model")
    g.add_argument("--weights", required=True, metavar="FILE",
                   help="backbone weights: dinokit/official checkpoint (.pth), backbone state dict or "
                        ".safetensors")
    g.add_argument("--arch", default=None,
                   help="architecture (vit_small, vit_base, resnet50, timm:<name>, ...); default: inferred")
    g.add_argument("--patch-size", "--patch_size", dest="patch_size", type=int, default=patch_default,
                   help="ViT patch size; default: inferred from the weights")
    g.add_argument("--checkpoint-key", "--checkpoint_key", dest="checkpoint_key", default="teacher",
                   choices=["teacher", "student"],
                   help="network of a full training checkpoint to use (default: teacher, as the reference)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    if workers:
        g.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
        g.add_argument("--num-workers", type=int, default=2,
                       help="image-decoding worker processes (default: 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_frozen_model(args: argparse.Namespace):
    """The backbone of ``--weights`` in eval mode, gradients off, on ``--device``."""
    from ..weights import load_backbone

    if not Path(args.weights).expanduser().exists():
        from ..errors import CheckpointError

        raise CheckpointError(f"weights file not found: {args.weights}")
    model = load_backbone(Path(args.weights).expanduser(), arch=args.arch, patch_size=args.patch_size,
                          checkpoint_key=args.checkpoint_key)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(resolve_device(args.device))


def model_info(args: argparse.Namespace, model) -> dict[str, Any]:
    info = dict(getattr(model, "dinokit_arch", {}) or {})
    return {"weights": str(args.weights), "checkpoint_key": args.checkpoint_key,
            **{k: v for k, v in info.items() if v is not None}}


def check_positive(name: str, value: int | float) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def eval_dataset(spec: str, image_size: int, split: str):
    """``build_dataset(spec, eval_transform(image_size), split)``."""
    from ..augmentation import eval_transform
    from ..data import build_dataset

    check_positive("--image-size", image_size)
    return build_dataset(spec, transform=eval_transform(image_size), split=split)


def require_labels(ds, spec: str, what: str) -> None:
    if not getattr(ds, "has_labels", False):
        raise DataError(f"{what} data {spec} has images without a class: put every image in a class "
                        "sub-folder")


def jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    d = parser.add_argument_group("data and protocol")
    d.add_argument("--train-data", required=True, metavar="SPEC", help="train images (the k-NN memory bank)")
    d.add_argument("--val-data", required=True, metavar="SPEC", help="images to classify")
    d.add_argument("--k", "--nb-knn", dest="k", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="numbers of neighbours (default: 10 20 100 200)")
    d.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default: 0.07)")
    d.add_argument("--image-size", type=int, default=224, help="center-crop size (default: 224)")
    d.add_argument("--output", metavar="FILE", default=None, help="write the results as JSON (percent)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.knn import aligned_labels, extract_features, knn_eval

    for k in args.k:
        check_positive("--k", k)
    check_positive("--temperature", args.temperature)
    check_positive("--batch-size", args.batch_size)
    model = load_frozen_model(args)
    train_ds = eval_dataset(args.train_data, args.image_size, "train")
    val_ds = eval_dataset(args.val_data, args.image_size, "test")
    require_labels(train_ds, args.train_data, "train")
    require_labels(val_ds, args.val_data, "val")
    device = next(model.parameters()).device
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device,
              progress=not args.no_progress)
    train_feats, _ = extract_features(model, train_ds, desc="train features", **kw)
    val_feats, _ = extract_features(model, val_ds, desc="val features", **kw)
    train_labels, val_labels = train_ds.labels, aligned_labels(train_ds, val_ds)
    num_classes = int(max(int(train_labels.max()), int(val_labels.max()))) + 1
    bank_device = device if device.type == "cuda" else torch.device("cpu")
    res = knn_eval(train_feats.to(bank_device), train_labels, val_feats.to(bank_device), val_labels,
                   ks=sorted(set(args.k)), T=args.temperature, num_classes=num_classes)
    print(f"k-NN (weighted, T={args.temperature:g}): {len(train_ds)} train / {len(val_ds)} val images, "
          f"{num_classes} classes, {train_feats.shape[1]}-d features")
    print(format_table(["k", "top-1", "top-5"],
                       [[k, f"{r['top1']:.2f}", f"{r['top5']:.2f}"] for k, r in res.items()]))
    if args.output:
        payload = {"knn": {str(k): r for k, r in res.items()}, "units": "percent",
                   "temperature": args.temperature, "model": model_info(args, model),
                   "train_data": args.train_data, "val_data": args.val_data, "n_train": len(train_ds),
                   "n_val": len(val_ds), "num_classes": num_classes, "feature_dim": int(train_feats.shape[1]),
                   "image_size": args.image_size}
        print(f"wrote {write_json(args.output, payload)}")
    return 0
