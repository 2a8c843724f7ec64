"""The helpers every evaluation command shares (knn, linear, features, attention, retrieval, davis, copydetect):
the model arguments and loader, argument checks, datasets, JSON output and the console tables."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..checkpoint import can_create_in, refuse_dangling_link, write_text_atomic
from ..data import IMAGE_EXTENSIONS
from ..errors import CheckpointError, ConfigError, DataError, write_failed
from ..trainer import resolve_device

__all__ = ["add_model_arguments", "add_precision_argument", "add_whiten_dim_argument", "check_output_dir",
           "check_output_file", "check_positive", "check_whiten_dim", "eval_dataset", "format_table", "last_blocks",
           "jsonable", "load_model", "model_info", "pct", "refuse_overwriting_inputs", "require_labels",
           "resolve_device", "write_json"]


# ------------------------------------------------------------------------------------------------ model

def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True, workers: bool = True,
                        batch_size: int | None = 128, patch_default: int | None = None) -> None:
    """The "model" argument group: ``--weights --arch --patch-size --checkpoint-key --device``, with ``workers``
    also ``--batch-size`` (default ``batch_size``; ``None``: none, or the command adds its own) and
    ``--num-workers``, then ``--no-progress``. ``required=False`` for a command that can run without weights."""
    g = parser.add_argument_group("model")
    g.add_argument("--weights", required=required, metavar="FILE",
                   help="backbone weights: dinokit/official checkpoint (.pth), backbone state dict or "
                        ".safetensors")
    g.add_argument("--arch", default=None,
                   help="architecture (vit_small, vit_base, resnet50, timm:<name>, ...); default: inferred")
    g.add_argument("--patch-size", "--patch_size", dest="patch_size", type=int, default=patch_default,
                   help="ViT patch size; default: inferred from the weights")
    g.add_argument("--num-heads", "--num_heads", dest="num_heads", type=int, default=None,
                   help="ViT attention heads, for a bare state dict of a non-standard width (dinokit checkpoints "
                        "and exports record it; standard widths are known); default: inferred")
    g.add_argument("--checkpoint-key", "--checkpoint_key", dest="checkpoint_key", default="teacher",
                   choices=["teacher", "student"],
                   help="network of a full training checkpoint to use (default: teacher, as the reference)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    if workers:
        if batch_size is not None:
            g.add_argument("--batch-size", type=int, default=batch_size,
                           help=f"images per forward pass (default: {batch_size})")
        g.add_argument("--num-workers", type=int, default=2, help="image-decoding worker processes (default: 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(args: argparse.Namespace, need_patches: bool = False):
    """The backbone of ``--weights`` (via :func:`dinokit.weights.load_backbone`) in eval mode, gradients off, on
    ``--device``. ``need_patches``: refuse a backbone without patch tokens (not a ViT)."""
    if not args.weights:
        raise ConfigError("--weights is required")
    if getattr(args, "num_workers", 0) < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    path = Path(args.weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights file not found: {args.weights}")
    from ..weights import load_backbone

    extra = {}
    if getattr(args, "num_heads", None) is not None:
        check_positive("--num-heads", args.num_heads)
        extra["num_heads"] = args.num_heads
    model = load_backbone(path, arch=args.arch, patch_size=args.patch_size, checkpoint_key=args.checkpoint_key,
                          **extra)
    if need_patches and not (hasattr(model, "get_intermediate_layers") and getattr(model, "patch_size", None)):
        raise ConfigError(f"this evaluation needs a ViT (patch tokens); {type(model).__name__} has none")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(resolve_device(args.device))


def model_info(args: argparse.Namespace, model=None) -> dict[str, Any]:
    """The model record of a result file: ``--weights``, ``--arch``, ``--patch-size``, ``--checkpoint-key``,
    overridden and completed by the architecture the loader resolved (``model.dinokit_arch``) when known."""
    resolved = getattr(model, "dinokit_arch", None) or {}
    return {"weights": str(args.weights), "arch": args.arch, "patch_size": args.patch_size,
            "checkpoint_key": args.checkpoint_key, **{k: v for k, v in resolved.items() if v is not None}}


# --------------------------------------------------------------------------------------- checks, data

def check_positive(name: str, value: int | float) -> None:
    if value is None or not value > 0:  # not "<= 0": NaN must fail too
        raise ConfigError(f"{name} must be > 0, got {value}")


def add_eval_size_arguments(group) -> None:
    """``--image-size`` (default: the model's trained size, see :func:`eval_image_size`) and ``--resize-size``."""
    group.add_argument("--image-size", type=int, default=None,
                       help="center-crop size (default: the ViT's trained input size, else 224)")
    group.add_argument("--resize-size", type=int, default=None,
                       help="shorter side before the crop (default: image size x 256/224)")


def add_precision_argument(group) -> None:
    """``--precision fp32|bf16`` of the feature-extracting evaluations."""
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="the backbone's forward: fp32 (default; the reference's evaluation protocol) or bf16 "
                            "autocast (about 1.7x faster extraction on CPUs with bf16 units, e.g. AMD Zen 4/5, "
                            "and on GPUs; 2-3x *slower* on CPUs without them, where it is emulated; features differ "
                            "from fp32 ones by bf16 rounding)")


def add_whiten_dim_argument(parser: argparse.ArgumentParser) -> None:
    """``--whiten-dim N`` of the whitening evaluations (retrieval, copydetect); see :func:`check_whiten_dim`."""
    parser.add_argument("--whiten-dim", type=int, default=None, metavar="N",
                        help="keep the N leading whitened dimensions, 1 to the descriptor's dimension (default: "
                             "all); needs --whiten")


def check_whiten_dim(args: argparse.Namespace) -> None:
    """``--whiten-dim`` needs ``--whiten`` and is positive (its upper bound, the descriptor's dimension, is
    checked by :func:`dinokit.eval.retrieval.fit_whitening` on the first whitening image)."""
    if args.whiten_dim is not None:
        if args.whiten is None:
            raise ConfigError("--whiten-dim needs --whiten (whitening is off without it)")
        check_positive("--whiten-dim", args.whiten_dim)


def eval_image_size(requested: int | None, model) -> int:
    """``--image-size`` when given, else the input size the ViT's position embedding was trained at (pos-embed
    grid x patch: 224 for the official checkpoints, the global crop size for dinokit runs), else 224. A ViT
    needs a size that is a multiple of its patch size."""
    if requested is not None:
        check_positive("--image-size", requested)
    size = requested or (getattr(model, "dinokit_arch", None) or {}).get("img_size") or 224
    patch = getattr(model, "patch_size", None)
    if isinstance(patch, int) and size % patch:
        near = sorted({max(patch, size // patch * patch), (size // patch + 1) * patch})
        raise ConfigError(f"--image-size {size} is not a multiple of the ViT's patch size {patch} (e.g. "
                          f"{' or '.join(map(str, near))})")
    return size


def last_blocks(model, n: int, option: str = "--n-last-blocks") -> int:
    """``n`` for a ViT with at least ``n`` blocks; else all its blocks, with a warning (the result records the
    number actually used)."""
    import warnings

    check_positive(option, n)
    depth = len(getattr(model, "blocks", ()) or ())
    if depth and n > depth:
        warnings.warn(f"dinokit: {option} {n} but the ViT has {depth} blocks: using its {depth}", stacklevel=2)
        return depth
    return n


def check_eval_sizes(image_size: int, resize_size: int | None) -> None:
    """One-line errors for a non-positive size or a resize smaller than the centre crop."""
    check_positive("--image-size", image_size)
    if resize_size is not None:
        check_positive("--resize-size", resize_size)
        if resize_size < image_size:
            raise ConfigError(f"--resize-size {resize_size} is smaller than --image-size {image_size}: the centre "
                              "crop would not fit")


def eval_dataset(spec: str, image_size: int, split: str, resize_size: int | None = None):
    """``build_dataset(spec, eval_transform(image_size, resize_size), split)``."""
    from ..augmentation import eval_transform
    from ..data import build_dataset

    check_eval_sizes(image_size, resize_size)
    return build_dataset(spec, transform=eval_transform(image_size, resize_size), split=split, unreadable="leave_out")


def require_labels(ds, spec: str, what: str) -> None:
    if not getattr(ds, "has_labels", False):
        raise DataError(f"{what} data {spec} has images without a class: put every image in a class "
                        "sub-folder")


# ------------------------------------------------------------------------------------------------ output

def jsonable(obj):
    """``obj`` with NaN/inf as ``None``, keys as strings, tuples as lists and paths as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _folder_to_create_in(start: Path, path: Path, option: str) -> Path:
    """The nearest existing ancestor of ``start`` (itself included), where ``mkdir -p`` would create ``path``'s
    missing folders; a file there is refused."""
    base = start
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{option} {path}: {base} is not a folder")
    return base


def _local_path(spec: Any) -> Path | None:
    """The existing file or folder an input option names; a data spec such as ``fashion-mnist:DIR`` names DIR."""
    if not spec:
        return None
    p = Path(str(spec)).expanduser()
    if p.exists():
        return p
    head, sep, rest = str(spec).partition(":")
    return _local_path(rest) if sep and rest and "/" not in head else None


#: files of a data folder that the evaluations read besides images: Fashion-MNIST's IDX files, revisitop's and
#: place recognition's ground truth; and DAVIS's image-set lists, every file under ImageSets/
_DATA_FILE_PATTERNS = ("*-ubyte", "*-ubyte.gz", "gnd_*.json", "gnd_*.pkl", "positives.json", "ground_truth.csv")
_DATA_SUBFOLDERS = ("ImageSets",)


def _is_data_file(path: Path, folder: Path) -> bool:
    parts = path.relative_to(folder).parts
    return (path.name.lower().endswith(IMAGE_EXTENSIONS) or any(path.match(p) for p in _DATA_FILE_PATTERNS)
            or (len(parts) > 1 and parts[0] in _DATA_SUBFOLDERS))


def refuse_overwriting_inputs(path: str | Path, option: str, files: dict[str, Any] | None = None,
                              image_folders: dict[str, Any] | None = None,
                              roots: dict[str, Any] | None = None) -> None:
    """Refuse an output file that would replace an input: one of ``files`` (``{option: path}``, e.g. the
    weights; the same file through any link), or a file the evaluations read inside one of ``image_folders``
    (class folders, ``fashion-mnist:DIR``) or ``roots`` (retrieval, copy-detection, DAVIS data sets): an image, an
    IDX file or a ground-truth file. A new file, or one that is no input (a result file written there before),
    is fine."""
    import os

    path = Path(path).expanduser()
    if not path.is_file():
        return
    out = path.resolve()
    for name, spec in (files or {}).items():
        src = _local_path(spec)
        if src is not None and src.is_file() and os.path.samefile(src, path):  # hard links too
            raise ConfigError(f"{option} {path} is the {name} file: writing it would replace that input; give "
                              f"another {option}")
    for kind, folders in (("folder", image_folders), ("data set", roots)):
        for name, spec in (folders or {}).items():
            folder = _local_path(spec)
            if folder is None or not folder.is_dir() or folder.resolve() not in out.parents:
                continue
            if _is_data_file(out, folder.resolve()):
                what = "an image" if out.name.lower().endswith(IMAGE_EXTENSIONS) else "a file"
                raise ConfigError(f"{option} {path} is {what} of the {name} {kind} {folder}: writing it would "
                                  f"replace that input; give another {option}")


def check_output_file(path: str | Path, option: str = "--out", **inputs: dict[str, Any]) -> Path:
    """Refuse, before any work, an output file that cannot be written: an existing folder, a parent that is a
    file, or a folder without write permission (the nearest existing ancestor, which ``mkdir -p`` would use);
    ``inputs`` (``files=``, ``image_folders=``, ``roots=``): an output that would replace an input
    (:func:`refuse_overwriting_inputs`)."""
    import os

    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name")
    refuse_overwriting_inputs(path, option, **inputs)
    base = _folder_to_create_in(path.parent, path, option)
    writable = os.access(path, os.W_OK) if path.exists() else can_create_in(base)
    if not writable:
        raise ConfigError(f"{option} {path}: no permission to write there")
    return path


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """As :func:`check_output_file` for an output folder (which may exist)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder")
    refuse_dangling_link(path, f"{option} {path}", "folder")
    if not can_create_in(_folder_to_create_in(path, path, option)):
        raise ConfigError(f"{option} {path}: no permission to write there")
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    try:  # written beside and renamed: a hard link to the path keeps its file, a crash leaves the old result
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(jsonable(payload), indent=2) + "\n")
    except OSError as e:
        raise write_failed(path, e) from None
    return path


def pct(x) -> str:
    """A fraction as a percentage, ``n/a`` for none/NaN."""
    return "  n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:5.2f}"


def format_table(header: list[str], rows: list[list[Any]], left_first: bool = False) -> str:
    """Header, dashes, rows; columns right-aligned, the first left-aligned with ``left_first`` (row labels)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if left_first and not i else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
