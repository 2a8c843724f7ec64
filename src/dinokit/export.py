"""Export a backbone to a clean ``.safetensors`` file (``dinokit export``).

The file holds the backbone's state dict only (no ``module.``/``backbone.``/``_orig_mod.`` prefixes, no DINO
head, contiguous CPU tensors), with the reference's key names (dino-reference.md §2.2, §5), i.e. the keys of
an official backbone-only release such as ``dino_deitsmall16_pretrain.pth``. Those are also timm's
``VisionTransformer`` key names, so the file loads directly into timm (:func:`timm_name_for` gives the model
name; e.g. ``timm.create_model("vit_small_patch16_224.dino", pretrained=True,
pretrained_cfg_overlay=dict(file="backbone.safetensors"), num_classes=0)``) as well as into
:func:`dinokit.weights.load_backbone` and ``dinokit.hub``. The safetensors metadata records ``format``
(``dinokit``), ``arch``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``img_size``, the source
file and checkpoint key, so later loads need no ``--arch``.

timm note: timm models named ``*_224`` expect a 14 x 14 (p = 16) or 28 x 28 (p = 8) position embedding. A
backbone pretrained at another crop size (e.g. 32 px on Fashion-MNIST) is resampled by timm's loader with its
own interpolation, which differs from the reference's ``+0.1`` bicubic form; pass timm ``img_size=`` equal to
the exported ``img_size`` to load it unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_safetensors_atomic
from .errors import CheckpointError, write_failed
from .weights import (
    checkpoint_arch_hints,
    extract_backbone_state_dict,
    read_safetensors_metadata,
    resolve_arch,
    safe_load,
    with_num_heads,
)

__all__ = ["export_backbone", "timm_name_for", "export_state_dict"]

_TIMM_DINO = {
    ("vit_small", 16): "vit_small_patch16_224.dino",
    ("vit_small", 8): "vit_small_patch8_224.dino",
    ("vit_base", 16): "vit_base_patch16_224.dino",
    ("vit_base", 8): "vit_base_patch8_224.dino",
    ("vit_tiny", 16): "vit_tiny_patch16_224",
}


def timm_name_for(info: dict[str, Any]) -> str | None:
    """timm model name with the same architecture as ``info`` (``arch`` + ``patch_size``, as returned by
    :func:`dinokit.weights.infer_arch` or stored in an export's metadata): the DINO release tags
    ``vit_small_patch16_224.dino``, ``vit_small_patch8_224.dino``, ``vit_base_patch16_224.dino``,
    ``vit_base_patch8_224.dino``; ``vit_tiny_patch16_224`` for ViT-Tiny/16 (no DINO release). ``None`` when
    timm has no such model (custom widths, other patch sizes, non-ViT backbones: a torchvision ResNet's keys
    are not timm's)."""
    arch = str(info.get("arch") or "")
    arch = arch.replace("deit", "vit", 1) if arch.startswith("deit") else arch
    try:
        patch = int(info.get("patch_size") or 0)
    except (TypeError, ValueError):
        return None
    if arch.startswith("timm:"):
        return arch[5:]
    return _TIMM_DINO.get((arch, patch))


def export_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (no shared storage, as safetensors requires)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def export_backbone(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike,
                    checkpoint_key: str = "teacher", arch: str | None = None,
                    patch_size: int | None = None, num_heads: int | None = None) -> dict[str, Any]:
    """Write the backbone of ``checkpoint_path`` (any format :func:`dinokit.weights.load_backbone` reads:
    dinokit / official training checkpoints, use ``checkpoint_key``; bare state dicts; safetensors) to
    ``out_path`` as a backbone-only safetensors file with architecture metadata.

    The state dict is first loaded strictly into the architecture it claims to be, so a file that would not
    load later is refused now (:class:`CheckpointError`). ``num_heads`` gives the attention heads of a custom-width
    ViT whose file does not record them (a bare state dict; the weights' shapes cannot tell); it is written to the
    metadata, which later loads trust. ``out_path`` may not be ``checkpoint_path`` itself. Returns the metadata
    written (plus ``path`` and ``timm_name``)."""
    from .models import build_backbone
    from .weights import build_kwargs, load_state_dict_strict

    src, out = Path(checkpoint_path), Path(out_path)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise CheckpointError(f"--out {out} is the checkpoint being exported: writing it would replace the checkpoint "
                              "(optimizer, head, student) by the backbone; give another file name")
    obj = safe_load(src)
    sd = extract_backbone_state_dict(obj, checkpoint_key)
    hints = with_num_heads(checkpoint_arch_hints(obj, read_safetensors_metadata(src)), num_heads, src)
    info = resolve_arch(sd, hints, arch, patch_size)
    kw = build_kwargs(info)
    try:
        model = build_backbone(info["arch"], patch_size=info.get("patch_size") or 16, **kw)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot build {info['arch']!r} for {src}: {e}") from None
    load_state_dict_strict(model, sd, source=f"weights in {src}", describe=info["arch"])
    keep = set(model.state_dict())
    tensors = export_state_dict({k: v for k, v in sd.items() if k in keep})
    meta = {"format": "dinokit", "arch": str(info["arch"]), "source": src.name,
            "checkpoint_key": checkpoint_key or ""}
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "img_size", "mlp_ratio", "qkv_bias",
                "in_chans"):
        if info.get(key) is not None:
            meta[key] = str(info[key])
    if "pos_embed" not in tensors:  # a CNN (e.g. timm:resnet18) has no image size: timm's constructor refuses one
        meta.pop("img_size", None)
    if info.get("num_heads") is not None and "num_heads" not in hints and info["arch"] == "vit_custom":
        meta.pop("num_heads")  # guessed for a bare state dict (warned): not written as if the file recorded it
    name = timm_name_for(info)
    if name:
        meta["timm_name"] = name
    if out.is_dir():
        raise CheckpointError(f"cannot write {out}: it is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(tensors, out, meta)
    except OSError as e:
        raise write_failed(out, e, CheckpointError) from None
    return {**meta, "path": str(out), "n_tensors": len(tensors),
            "n_params": int(sum(t.numel() for t in tensors.values()))}
