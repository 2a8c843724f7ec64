"""Safe loading of backbone weights in every format DINO users meet, and architecture inference.

Formats understood by :func:`load_backbone` (reference: dino-reference.md §5; Caron et al. 2021 released the
checkpoints described there):

* **dinokit training checkpoints** (``checkpoint.pth``): ``{'student', 'teacher', 'optimizer', 'epoch',
  'config', ...}``; ``student``/``teacher`` are state dicts of ``MultiCropWrapper(backbone, head)`` with keys
  ``backbone.*``/``head.*`` (``module.``/``_orig_mod.`` prefixes from DDP or ``torch.compile`` allowed). The
  saved ``config`` gives the architecture.
* **Official full checkpoints** (``checkpoint.pth``, ``*_full_checkpoint.pth``): ``student`` with
  ``module.backbone.``/``module.head.`` keys, ``teacher`` with ``backbone.``/``head.`` (or ``module.`` too
  when DDP-wrapped), ``optimizer``, ``fp16_scaler``, ``dino_loss`` and ``args``, a pickled
  ``argparse.Namespace``. The head's weight-norm layer may use either key style (``weight_g``/``weight_v`` or
  ``parametrizations.weight.original0/1``); head keys are dropped here anyway.
* **Official backbone-only releases** (``dino_deitsmall16_pretrain.pth``, ``dino_resnet50_pretrain.pth``):
  bare teacher state dicts without prefixes (ResNet ones without ``fc``).
* **timm's DINO weights** (``vit_small_patch16_224.dino``, ...): timm's ``VisionTransformer`` names its keys
  exactly as the reference does (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.norm1``,
  ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``norm``); a classifier ``head.*``, if
  any, is dropped.
* **dinokit exports** (``dinokit export``): backbone-only ``.safetensors``, architecture in the metadata.

Security: nothing is ever unpickled freely. ``.safetensors`` files are read with :mod:`safetensors`; anything
else goes through ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` (the official
checkpoints' ``args``) added to PyTorch's allow-list. A pickle that would import or call anything else
(``os.system`` from a ``__reduce__``, ...) is refused before any of it runs, with
:class:`~dinokit.errors.CheckpointError`. The reference's ``torch.load`` without ``weights_only`` would run
it (and fails outright on PyTorch >= 2.6, §9).

Loading is strict: unlike the reference's ``load_pretrained_weights`` (``strict=False``, so a wrong
``--arch`` silently evaluates a randomly initialised network, §5), a state dict that does not fit raises
:class:`CheckpointError` listing the first missing, unexpected and mis-shaped keys. The only tolerated
differences are classifier keys (``fc.*``, ``head.*``, ``classifier.*``) that the backbone does not have or
that the file lacks, and missing BatchNorm ``num_batches_tracked`` counters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["safe_load", "read_safetensors_metadata", "is_safetensors", "extract_backbone_state_dict",
           "infer_arch", "checkpoint_arch_hints", "with_num_heads", "load_backbone", "load_state_dict_strict",
           "STANDARD_VITS"]

#: (embed_dim, depth) -> (arch, num_heads) of the reference's ViT sizes (dino-reference.md §2.2).
STANDARD_VITS: dict[tuple[int, int], tuple[str, int]] = {
    (192, 12): ("vit_tiny", 3),
    (384, 12): ("vit_small", 6),
    (768, 12): ("vit_base", 12),
}
_STANDARD_HEADS = {192: 3, 384: 6, 768: 12}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")


# ------------------------------------------------------------------------------------------------ reading

def is_safetensors(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file: by its name, or by its header (8-byte little-endian length,
    then a JSON object) so a renamed file is still recognised."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (PyTorch's run on for several lines)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    cut = line.find(". ")
    return line[:cut] if cut > 0 else line.rstrip(".")


def _refusal_reason(msg: str) -> str:
    """The informative line of PyTorch's weights-only refusal ("Trying to load unsupported GLOBAL ...")."""
    for line in msg.splitlines():
        line = line.strip()
        if "GLOBAL" in line or line.startswith(("Unsupported", "Trying to")):
            return line.rstrip(".")
    return "it contains objects other than tensors and plain containers"


def safe_load(path: str | os.PathLike) -> Any:
    """Load a weights file without executing any code from it.

    ``.safetensors`` (recognised by name or header): ``safetensors.torch.load_file`` on CPU, a ``dict`` of
    tensors. Anything else: ``torch.load(map_location='cpu', weights_only=True)`` with ``argparse.Namespace``
    allowed (the ``args`` entry of official full checkpoints). Raises :class:`CheckpointError` naming the file
    when it is missing, unreadable, truncated, not a checkpoint, or a pickle that would run code (refused by
    the weights-only unpickler before anything is imported or called).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a weights file")
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...
            kind = _other_format(path, unknown="")
            if kind or _head(path).startswith((b"PK", b"\x80")):
                kind = kind or "a PyTorch checkpoint (rename it to .pth)"
                raise CheckpointError(f"{path} is named .safetensors but is {kind}") from None
            raise CheckpointError(f"cannot read safetensors file {path}: {_first_line(e)}") from None
    kind = _other_format(path)
    if kind:
        raise CheckpointError(f"{path} is not a weights file: it is {kind}. Pass a .pth checkpoint or a "
                              ".safetensors file") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": irrelevant to the user
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            raise CheckpointError(
                f"refused to load {path}: the safe weights-only unpickler rejects it "
                f"({_refusal_reason(msg)}); "
                "dinokit never unpickles arbitrary Python objects (they can run code): keep only tensors and "
                "plain containers in the file, or convert it to .safetensors") from None
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint or safetensors file (truncated or another "
            f"format?): {type(e).__name__}: {_first_line(e)}") from None


_MAGICS = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"GIF8", "a GIF image"),
           (b"BM", "a BMP image"), (b"RIFF", "a RIFF file (WebP image?)"), (b"\x1f\x8b", "gzip-compressed"),
           (b"%PDF", "a PDF document"))


def _head(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _other_format(path: Path, unknown: str = "neither a zip archive nor a pickle (corrupt, or another format)"
                  ) -> str:
    """What a file that cannot be a PyTorch checkpoint (zip archive or pickle) looks like, or ``""`` when it
    may be one (or cannot be read: torch.load then reports the read error). ``unknown``: what to call a file
    none of the known signatures matches."""
    if not path.is_file():
        return ""
    head = _head(path)
    if not head:
        return "empty"
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # torch.save's zip archive, a (legacy) pickle
        return ""
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file"
    return unknown


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (``{}`` when it has none or is not one)."""
    if not is_safetensors(path):
        return {}
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in meta.items()}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------ state dicts

def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _looks_like_state_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(k, str) for k in d) and any(
        isinstance(v, torch.Tensor) for v in d.values())


def extract_backbone_state_dict(obj: Any, checkpoint_key: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's state dict, with reference key names, from any supported checkpoint object.

    1. Pick the sub-dictionary: ``obj[checkpoint_key]`` when present (``teacher`` by default, as the
       reference's ``--checkpoint_key``), else ``obj['state_dict']``/``obj['model']`` when present, else
       ``obj`` itself. A full checkpoint without ``checkpoint_key`` raises :class:`CheckpointError` listing
       its entries.
    2. Strip leading ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes, in any combination.
    3. A ``MultiCropWrapper`` state dict (keys ``backbone.*``/``head.*``): keep the ``backbone.`` keys, prefix
       removed (and any wrapper prefix after it); the DINO ``head.*`` is dropped.
    4. A bare ViT state dict: drop classifier ``head.*`` keys (timm classifiers, DeiT).

    The reference instead replaces ``module.`` and ``backbone.`` *anywhere* in a key; stripping prefixes only
    is the same for DINO checkpoints and does not corrupt timm keys such as ``patch_embed.backbone.*``.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a checkpoint dictionary, got {type(obj).__name__}")
    sd: Any = obj
    if checkpoint_key and checkpoint_key in obj and isinstance(obj[checkpoint_key], dict):
        sd = obj[checkpoint_key]
    elif "student" in obj or "teacher" in obj:
        raise CheckpointError(f"checkpoint has no {checkpoint_key!r} entry (it has: "
                              f"{', '.join(sorted(map(str, obj)))}); choose one with --checkpoint-key")
    else:
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict) and _looks_like_state_dict(obj[key]):
                sd = obj[key]
                break
    if not _looks_like_state_dict(sd):
        what = ", ".join(sorted(map(str, sd))[:12]) if isinstance(sd, dict) else type(sd).__name__
        raise CheckpointError(f"no tensors found where a state dict was expected (entries: {what})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"not a state dict: entries {', '.join(map(str, bad[:5]))} are not tensors")
    sd = {_strip_wrappers(k): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {_strip_wrappers(k[len("backbone."):]): v for k, v in sd.items() if k.startswith("backbone.")}
    elif "cls_token" in sd or "patch_embed.proj.weight" in sd:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return sd


# ---------------------------------------------------------------------------------------- architecture

def _default_heads(dim: int) -> int:
    if dim in _STANDARD_HEADS:
        return _STANDARD_HEADS[dim]
    if dim % 64 == 0:
        return dim // 64
    if dim % 32 == 0:
        return dim // 32
    return 1


_RESNETS = {  # (bottleneck, blocks per stage) -> depth name
    (False, (2, 2, 2, 2)): "18", (False, (3, 4, 6, 3)): "34", (True, (3, 4, 6, 3)): "50",
    (True, (3, 4, 23, 3)): "101", (True, (3, 8, 36, 3)): "152",
}


def _infer_resnet(sd: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd:
        return None
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(idx))
    bottleneck = "layer1.0.conv3.weight" in sd
    depth = _RESNETS.get((bottleneck, tuple(counts)))
    if depth is None:
        return None
    if not bottleneck:
        return {"arch": f"resnet{depth}", "embed_dim": 512}
    width = sd["layer1.0.conv1.weight"].shape[0]
    groups = width // sd["layer1.0.conv2.weight"].shape[1]
    if groups == 1:
        name = {64: f"resnet{depth}", 128: f"wide_resnet{depth}_2"}.get(width)
    else:
        name = f"resnext{depth}_{groups}x{width // groups}d"
    if name is None:
        return None
    return {"arch": name, "embed_dim": 2048}


def infer_arch(state_dict: dict[str, torch.Tensor], hints: dict[str, Any] | None = None) -> dict[str, Any]:
    """Architecture of a backbone state dict (reference key names), from tensor shapes.

    ViT (``patch_embed.proj.weight`` + ``blocks.N.*``): ``patch_size`` from the patch convolution,
    ``embed_dim`` its output channels, ``depth`` the number of blocks, ``img_size = sqrt(pos_embed tokens -
    1) * patch_size`` (the grid the position embedding was stored at), and ``num_heads``, which no shape
    reveals: taken from ``hints`` (a training config / export metadata) when given, else 3/6/12 for widths
    192/384/768 and ``dim // 64`` otherwise (a warning says so for non-standard widths). ``arch`` is
    ``vit_tiny``/``vit_small``/ ``vit_base`` for the reference sizes, ``vit_custom`` otherwise. A non-4 MLP
    ratio or missing qkv bias add ``mlp_ratio``/``qkv_bias`` entries.

    torchvision ResNets (``conv1``, ``layer1..4``; with or without ``fc``): ``resnet18/34/50/101/152``,
    ``wide_resnet50_2``/``101_2``, ``resnext50_32x4d``, ``resnext101_32x8d``/``64x4d``.

    Returns ``dict(arch, patch_size, embed_dim, depth, num_heads, img_size)`` (``None`` where meaningless);
    raises :class:`CheckpointError` when the layout is not recognised (then pass ``arch=`` explicitly).
    """
    hints = hints or {}
    w = state_dict.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4 and any(k.startswith("blocks.") for k in state_dict):
        embed_dim, in_chans, ph, pw = w.shape
        if ph != pw:
            raise CheckpointError(f"non-square patches {ph}x{pw} are not supported")
        depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
        img_size = stored_image_size(state_dict, class_tokens=(1,))
        heads = hints.get("num_heads")
        std = STANDARD_VITS.get((embed_dim, depth))
        if heads is None:
            heads = std[1] if std else _default_heads(embed_dim)
            if embed_dim not in _STANDARD_HEADS:
                warnings.warn(f"dinokit: the number of attention heads cannot be read from the weights; assuming "
                              f"{heads} for width {embed_dim} (pass --num-heads N, num_heads= in Python, or use a "
                              f"dinokit checkpoint or export, which record it)", stacklevel=2)
        heads = int(heads)
        arch = std[0] if std and heads == std[1] else "vit_custom"
        info: dict[str, Any] = {"arch": arch, "patch_size": int(pw), "embed_dim": int(embed_dim),
                                "depth": depth, "num_heads": heads, "img_size": img_size}
        fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
        if fc1 is not None and fc1.shape[0] != 4 * embed_dim:
            info["mlp_ratio"] = fc1.shape[0] / embed_dim
        if "blocks.0.attn.qkv.weight" in state_dict and "blocks.0.attn.qkv.bias" not in state_dict:
            info["qkv_bias"] = False
        if in_chans != 3:
            info["in_chans"] = int(in_chans)
        if ("mlp_ratio" in info or "qkv_bias" in info or "in_chans" in info) and arch != "vit_custom":
            info["arch"] = "vit_custom"
        return info
    res = _infer_resnet(state_dict)
    if res is not None:
        return {"arch": res["arch"], "patch_size": None, "embed_dim": res["embed_dim"], "depth": None,
                "num_heads": None, "img_size": None}
    sample = ", ".join(list(state_dict)[:6])
    raise CheckpointError(f"cannot infer the architecture from the weights (first keys: {sample}); pass "
                          "--arch (and --patch-size)")


def checkpoint_arch_hints(obj: Any, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Architecture facts recorded next to the weights: a dinokit checkpoint's ``config``, an official
    checkpoint's ``args`` Namespace, or a dinokit export's safetensors metadata; ``{}`` when there are
    none."""
    src: dict[str, Any] = {}
    if metadata:
        src = dict(metadata)
    elif isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        src = obj["config"]
    elif isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace):
        src = vars(obj["args"])
    hints: dict[str, Any] = {}
    if isinstance(src.get("arch"), str) and src["arch"]:
        hints["arch"] = src["arch"]
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "img_size"):
        try:
            if src.get(key) not in (None, ""):
                hints[key] = int(src[key])
        except (TypeError, ValueError):
            pass
    if "img_size" not in hints and isinstance(src.get("global_crop_size"), int):  # what dinokit trains at
        hints["img_size"] = src["global_crop_size"]
    arch = hints.get("arch", "")
    if arch and arch != "vit_custom":  # a dinokit config's embed_dim/depth/num_heads are for vit_custom only
        for key in ("embed_dim", "depth", "num_heads"):
            if key in hints and not (metadata and key == "num_heads"):
                hints.pop(key)
    return hints


def with_num_heads(hints: dict[str, Any], num_heads: Any, source: str | os.PathLike) -> dict[str, Any]:
    """``hints`` with the attention-head count a caller gives (``--num-heads``, ``num_heads=``) for weights whose
    file does not record it (a bare state dict: no shape reveals the heads). A count below 1, or one that differs
    from what the file records (a custom ViT's config or export metadata, or the standard count of the recorded
    ``vit_tiny``/``vit_small``/``vit_base``), is a :class:`CheckpointError`: it would build another model that
    loads the same weights "strictly" and gives other features."""
    from .models.vit import VIT_CONFIGS

    if num_heads is None:
        return hints
    n = int(num_heads)
    if n < 1:
        raise CheckpointError(f"num_heads must be at least 1, got {num_heads}")
    recorded = hints.get("num_heads")
    arch = str(hints.get("arch", "")).replace("deit", "vit")
    if recorded is None and arch in VIT_CONFIGS:
        recorded = VIT_CONFIGS[arch][2]
    if recorded is not None and int(recorded) != n:
        raise CheckpointError(f"{source} records {recorded} attention heads ({hints.get('arch') or 'its config'}); "
                              f"--num-heads {n} contradicts it (the option is for a bare state dict that records "
                              "none): leave it out")
    return {**hints, "num_heads": n}


def _vit_kwargs(info: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if info.get("img_size"):
        kw["img_size"] = info["img_size"]
    if info["arch"] == "vit_custom":
        kw.update(embed_dim=info["embed_dim"], depth=info["depth"], num_heads=info["num_heads"])
    for key in ("mlp_ratio", "qkv_bias", "in_chans"):
        if key in info:
            kw[key] = info[key]
    return kw


def _is_vit_arch(arch: str) -> bool:
    return arch.startswith(("vit_", "deit_"))


def stored_image_size(sd: dict[str, torch.Tensor], class_tokens: tuple[int, ...] = (1, 0)) -> int | None:
    """The image size a ViT's position embedding was stored at: ``sqrt(grid tokens) * patch``, with the first of
    ``class_tokens`` (1 for the reference ViT; 1 or 0 for timm models) that leaves a square grid; ``None``
    without one."""
    pos, w = sd.get("pos_embed"), sd.get("patch_embed.proj.weight")
    if pos is None or w is None or pos.ndim != 3 or w.ndim != 4:
        return None
    for prefix in class_tokens:
        side = math.isqrt(max(pos.shape[1] - prefix, 0))
        if side and side * side == pos.shape[1] - prefix:
            return side * int(w.shape[-1])
    return None


def build_kwargs(info: dict[str, Any]) -> dict[str, Any]:
    """``build_backbone`` keyword arguments for a resolved architecture (:func:`resolve_arch`): the ViT's sizes,
    or the image size a ``timm:`` model was trained at (its position embedding's grid); nothing otherwise."""
    if _is_vit_arch(info["arch"]):
        return _vit_kwargs(info)
    if info["arch"].startswith("timm:") and info.get("img_size"):
        return {"img_size": info["img_size"]}
    return {}


# ------------------------------------------------------------------------------------------------ loading

def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "weights",
                           describe: str | None = None) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a one-line :class:`CheckpointError` listing the
    first differing keys and shapes when it does not fit.

    Tolerated: classifier keys (``fc.``, ``head.``, ``classifier.``) in the file that the model lacks (they
    are ignored), classifier keys of the model missing from the file (official ResNet releases have no
    ``fc``), and missing BatchNorm ``num_batches_tracked`` counters."""
    expected = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if k in expected or not k.startswith(_CLASSIFIER_PREFIXES)}
    missing = [k for k in expected if k not in sd and not k.startswith(_CLASSIFIER_PREFIXES)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}" for k, v in sd.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        what = describe or type(model).__name__
        parts = []
        for name, items, n, sep in (("missing keys", missing, 5, ", "),
                                    ("unexpected keys", unexpected, 5, ", "),
                                    ("shape mismatches", shapes, 3, "; ")):
            if items:
                more = f"{sep}..." if len(items) > n else ""
                parts.append(f"{len(items)} {name} ({sep.join(items[:n])}{more})")
        raise CheckpointError(f"{source} do not fit {what}: {'; '.join(parts)}. Pass the --arch/--patch-size "
                              "the weights were trained with (or check --checkpoint-key)")
    result = model.load_state_dict(sd, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith(_CLASSIFIER_PREFIXES)
                and not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise CheckpointError(f"{source}: unexpected load result {result}")


def resolve_arch(sd: dict[str, torch.Tensor], hints: dict[str, Any], arch: str | None = None,
                 patch_size: int | None = None) -> dict[str, Any]:
    """Architecture to build: an explicit ``arch``/``patch_size`` wins; otherwise a recorded non-ViT ``arch``
    (torchvision / ``timm:`` name) is used as is, and ViTs are read from the tensor shapes (with the recorded
    ``num_heads``)."""
    if not arch and hints.get("arch") and not _is_vit_arch(hints["arch"]):
        arch = hints["arch"]
    if arch and not _is_vit_arch(arch):
        img_size = (stored_image_size(sd) or hints.get("img_size")) if arch.startswith("timm:") else None
        return {"arch": arch, "patch_size": patch_size, "embed_dim": None, "depth": None, "num_heads": None,
                "img_size": img_size}
    try:
        with warnings.catch_warnings():
            if arch and arch != "vit_custom":  # the number of heads comes from the named architecture
                warnings.simplefilter("ignore")
            info = infer_arch(sd, hints)
    except CheckpointError:
        if arch:  # let the strict load explain the mismatch
            return {"arch": arch, "patch_size": patch_size or hints.get("patch_size") or 16,
                    "embed_dim": None, "depth": None, "num_heads": None, "img_size": None}
        raise
    if arch:
        arch = arch.replace("deit", "vit", 1) if arch.startswith("deit") else arch
        if arch != "vit_custom":
            from .models.vit import VIT_CONFIGS

            info["arch"] = arch
            if arch in VIT_CONFIGS:
                info["embed_dim"], info["depth"], info["num_heads"] = VIT_CONFIGS[arch]
            for key in ("mlp_ratio", "qkv_bias", "in_chans"):
                info.pop(key, None)
    if patch_size:
        info["patch_size"] = int(patch_size)
    return info


def load_backbone(path: str | os.PathLike, arch: str | None = None, patch_size: int | None = None,
                  checkpoint_key: str = "teacher", **kw: Any) -> nn.Module:
    """Build the backbone stored in ``path`` and load its weights strictly; returned in eval mode on CPU.

    ``arch``/``patch_size`` override what is recorded or inferred (:func:`infer_arch`, hints from a dinokit
    ``config``, an official ``args`` or export metadata); ``checkpoint_key`` picks ``teacher`` (default, as
    the reference evaluates) or ``student`` of a full checkpoint; extra ``kw`` go to
    :func:`dinokit.models.build_backbone` (e.g. ``num_heads=`` for a ``vit_custom`` bare state dict). The
    resolved architecture is stored as ``model.dinokit_arch``. Raises :class:`CheckpointError` for unsafe,
    unreadable or non-fitting files.
    """
    from .models import build_backbone

    obj = safe_load(path)
    meta = read_safetensors_metadata(path)
    sd = extract_backbone_state_dict(obj, checkpoint_key)
    hints = with_num_heads(checkpoint_arch_hints(obj, meta), kw.get("num_heads"), path)
    info = resolve_arch(sd, hints, arch, patch_size)
    build_kw = {**build_kwargs(info), **kw}
    try:
        model = build_backbone(info["arch"], patch_size=info.get("patch_size") or 16, **build_kw)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot build {info['arch']!r} for {path}: {_first_line(e)}") from None
    desc = info["arch"] + (f" (patch {info['patch_size']})" if info.get("patch_size") else "")
    load_state_dict_strict(model, sd, source=f"weights in {path}", describe=desc)
    model.dinokit_arch = info
    return model.eval()
