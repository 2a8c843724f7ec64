"""torch.hub-style constructors of the released DINO architectures (reference ``hubconf.py``,
dino-reference.md §4.8), that **never download**: pass the path of a local weights file (any format
:func:`dinokit.weights.safe_load` reads: the official ``dino_deitsmall16_pretrain.pth`` etc., a full
training checkpoint, a dinokit export) or get random weights.

| entry point | model | loading |
|---|---|---|
| ``dino_vits16`` | ``vit_small``, patch 16, ``num_classes=0`` | strict |
| ``dino_vits8`` | ``vit_small``, patch 8 | strict |
| ``dino_vitb16`` | ``vit_base``, patch 16 | strict |
| ``dino_vitb8`` | ``vit_base``, patch 8 | strict |
| ``dino_resnet50`` | torchvision ``resnet50``, ``fc = Identity`` | only ``fc.*`` may differ (*) |

(*) the reference loads ResNet-50 with ``strict=False`` because the release has no ``fc``; here only the
``fc.*`` keys are allowed to be missing or extra.

"Strict" also covers what tensor shapes cannot tell: weights whose file records another number of attention
heads (a dinokit checkpoint's config, an export's metadata) are refused, e.g. a 12-head width-384 ViT offered to
``dino_vits16`` (6 heads); :func:`dinokit.weights.load_backbone` builds whatever the file records.

As in the reference the models return the CLS token (ResNet: the pooled 2048-d feature) from ``forward``; use
``get_intermediate_layers`` / ``get_last_selfattention`` for patch tokens and attention. The repository's
top-level ``hubconf.py`` exposes the same functions for ``torch.hub.load(<repo dir>, "dino_vits16",
source="local", weights=...)``. The reference's ``pretrained=`` keyword is accepted: ``pretrained=False`` gives
random weights, ``pretrained=True`` without ``weights=`` is an error (nothing is downloaded).
"""

from __future__ import annotations

import os

from torch import nn

Path = str | os.PathLike

__all__ = ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50"]


def _state_dict(weights: Path | None, checkpoint_key: str, pretrained: bool | None = None
                ) -> tuple[dict | None, dict]:
    """The backbone state dict of ``weights`` and the architecture facts recorded beside it (a dinokit
    checkpoint's config, an export's metadata: :func:`dinokit.weights.checkpoint_arch_hints`). ``pretrained`` is
    the reference's keyword (which downloads the release): ``True`` without ``weights`` is refused, as dinokit
    never downloads; ``False`` means random weights."""
    from .errors import CheckpointError

    if weights is None:
        if pretrained:
            raise CheckpointError("dinokit never downloads weights: pass weights=<local file> (e.g. an official "
                                  "release such as dino_deitsmall16_pretrain.pth), or pretrained=False for random "
                                  "weights")
        return None, {}
    from .weights import checkpoint_arch_hints, extract_backbone_state_dict, read_safetensors_metadata, safe_load

    try:
        obj = safe_load(weights)
        return (extract_backbone_state_dict(obj, checkpoint_key),
                checkpoint_arch_hints(obj, read_safetensors_metadata(weights)))
    except CheckpointError as e:  # its advice names the CLI's option
        raise CheckpointError(str(e).replace("--checkpoint-key", "checkpoint_key=")) from None


def _load_into(model: nn.Module, sd: dict | None, weights: Path | None, what: str) -> nn.Module:
    if sd is not None:
        from .errors import CheckpointError
        from .weights import load_state_dict_strict

        try:
            load_state_dict_strict(model, sd, source=f"weights in {weights}", describe=what)
        except CheckpointError as e:  # its advice names CLI options; say what fits in Python
            msg = str(e).split(". Pass the --arch", 1)[0]
            raise CheckpointError(f"{msg}. Use the entry point of the architecture the weights were trained with "
                                  "(or dinokit.weights.load_backbone, which reads it from the file)") from None
    return model


def _vit(arch: str, patch_size: int, weights, checkpoint_key: str, **kwargs) -> nn.Module:
    from .models import build_backbone
    from .weights import stored_image_size

    sd, hints = _state_dict(weights, checkpoint_key, kwargs.pop("pretrained", None))
    if sd is not None and kwargs.get("num_heads") is not None:  # a count the file records is not overridden
        from .errors import CheckpointError
        from .weights import with_num_heads

        try:
            with_num_heads(hints, kwargs["num_heads"], weights)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("--num-heads ", "num_heads=")) from None
    if sd is not None and "img_size" not in kwargs and (size := stored_image_size(sd, class_tokens=(1,))):
        kwargs["img_size"] = size  # e.g. a run trained at 96 px: its position embedding's grid
    model = build_backbone(arch, patch_size=patch_size, num_classes=0, **kwargs)
    heads, built = hints.get("num_heads"), model.blocks[0].attn.num_heads if len(model.blocks) else None
    if heads and built and heads != built and "num_heads" not in kwargs:
        # the weights' shapes cannot tell heads apart: a 12-head width-384 ViT loads "strictly" into ViT-S (6 heads)
        # and gives other features, so the recorded count decides
        from .errors import CheckpointError

        raise CheckpointError(f"weights in {weights} were trained with {heads} attention heads, {arch} has {built}: "
                              "use dinokit.weights.load_backbone(path), which builds the architecture recorded in "
                              "the file")
    return _load_into(model, sd, weights, f"{arch} (patch {patch_size})")


def dino_vits16(weights: Path | None = None, checkpoint_key: str = "teacher", **kwargs) -> nn.Module:
    """ViT-S/16 (21M parameters; reference release: 74.5 k-NN / 77.0 linear on ImageNet)."""
    return _vit("vit_small", 16, weights, checkpoint_key, **kwargs)


def dino_vits8(weights: Path | None = None, checkpoint_key: str = "teacher", **kwargs) -> nn.Module:
    """ViT-S/8 (21M parameters; 78.3 k-NN / 79.7 linear)."""
    return _vit("vit_small", 8, weights, checkpoint_key, **kwargs)


def dino_vitb16(weights: Path | None = None, checkpoint_key: str = "teacher", **kwargs) -> nn.Module:
    """ViT-B/16 (85M parameters; 76.1 k-NN / 78.2 linear)."""
    return _vit("vit_base", 16, weights, checkpoint_key, **kwargs)


def dino_vitb8(weights: Path | None = None, checkpoint_key: str = "teacher", **kwargs) -> nn.Module:
    """ViT-B/8 (85M parameters; 77.4 k-NN / 80.1 linear)."""
    return _vit("vit_base", 8, weights, checkpoint_key, **kwargs)


def dino_resnet50(weights: Path | None = None, checkpoint_key: str = "teacher",
                  **kwargs) -> nn.Module:
    """torchvision ResNet-50 with ``fc = Identity`` (2048-d output; 67.5 k-NN / 75.3 linear). The reference
    loads with ``strict=False`` because the release has no ``fc``; here only ``fc.*`` may differ."""
    from torchvision.models import resnet50

    pretrained = kwargs.pop("pretrained", None)
    model = resnet50(weights=None, **kwargs)
    model.fc = nn.Identity()
    model.num_features = 2048
    return _load_into(model, _state_dict(weights, checkpoint_key, pretrained)[0], weights, "resnet50")
