"""``build_backbone``: one entry point for every backbone dinokit can pretrain.

* ``vit_tiny`` / ``vit_small`` / ``vit_base`` (and ``deit_*`` aliases): the reference ViT, any patch size;
  ``vit_custom`` takes ``embed_dim``/``depth``/``num_heads`` for small models (e.g. the Fashion-MNIST demo);
* any lower-case torchvision classifier (``resnet50`` ...) without its final class-score layer (the last Linear of
  its ``fc``/``classifier``/``head``/``heads``), so it outputs its penultimate representation;
* ``timm:<name>`` for any timm model, built with ``num_classes=0`` (pooled features); ViT-style timm models accept
  every crop size (``dynamic_img_size``).

Every backbone maps ``[B, 3, H, W]`` to a ``[B, D]`` feature and has ``num_features = D``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .vit import VIT_CONFIGS, VisionTransformer

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Decorator registering ``fn(patch_size=..., drop_path_rate=..., **kwargs) -> nn.Module`` under ``name``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def _make_vit(name: str):
    dim, depth, heads = VIT_CONFIGS[name]

    def build(patch_size: int = 16, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
        kwargs.setdefault("embed_dim", dim)
        kwargs.setdefault("depth", depth)
        kwargs.setdefault("num_heads", heads)
        return VisionTransformer(patch_size=patch_size, drop_path_rate=drop_path_rate, **kwargs)

    return build


for _name in VIT_CONFIGS:
    register_backbone(_name)(_make_vit(_name))


@register_backbone("vit_custom")
def _vit_custom(patch_size: int = 16, drop_path_rate: float = 0.0, embed_dim: int = 192, depth: int = 12,
                num_heads: int = 3, **kwargs) -> nn.Module:
    return VisionTransformer(patch_size=patch_size, drop_path_rate=drop_path_rate, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, **kwargs)


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(n for n in tvm.list_models(module=tvm))


class _NarrowInputSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that, on CPU under autocast with gradients, runs a strided
    convolution in fp32 when its input is narrower than its kernel.

    PyTorch's CPU bf16 convolution backward (torch 2.14, oneDNN) leaves most of the weight gradient unwritten
    in that case — e.g. a 1-pixel-wide input to a 3x3 stride-2 convolution, which a ResNet meets at local crops
    under 32 px: uninitialised memory, NaN or silently wrong values (``tests/test_vit.py::
    test_cnn_strided_convolutions_on_narrow_inputs_get_exact_weight_gradients_under_bf16``). Such feature maps
    are tiny, so fp32 costs nothing measurable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
                and min(x.shape[-2:]) < max(self.kernel_size)):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float()).to(torch.get_autocast_dtype("cpu"))
        return super().forward(x)


def _guard_strided_convs(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is nn.Conv2d and max(m.stride) > 1 and max(m.kernel_size) > 1:
            m.__class__ = _NarrowInputSafeConv2d
    return model


# Layers that may follow the class-score layer inside a torchvision head without changing the feature's size once
# the model's forward flattens it (squeezenet: ReLU and a global pool after its 1x1 class convolution).
_SIZE_PRESERVING = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)


def _keeps_feature_size(m: nn.Module) -> bool:
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return m.output_size in (1, (1, 1))
    if isinstance(m, (nn.GLU, nn.MultiheadAttention)):  # in torch.nn's activation module, not size-preserving
        return False
    return isinstance(m, _SIZE_PRESERVING) or type(m).__module__ == nn.ReLU.__module__  # an activation


def _strip_torchvision_classifier(model: nn.Module, name: str, num_classes: int) -> int:
    """Replace the final class-score layer of a torchvision classifier by ``nn.Identity`` and return its input
    size D, the size of the penultimate representation the model then outputs.

    The head is the first of ``fc`` / ``classifier`` / ``head`` / ``heads`` the model has. A plain ``nn.Linear``
    head is replaced whole (``backbone.fc = nn.Identity()``, as the reference does for ResNets); in a container
    head only its last ``nn.Linear`` (or 1x1 ``nn.Conv2d``: squeezenet) is, so every layer before it stays
    (convnext's LayerNorm2d, maxvit's pooling/LayerNorm/Linear/Tanh, the hidden Linear layers of vgg, alexnet
    and mobilenet_v3). D is derived structurally and checked: the removed layer must produce ``num_classes``
    scores and be followed only by size-preserving layers (dropout, activations, a global pool, flatten), or
    the model is refused (``ValueError``) rather than built with a wrong ``num_features``."""
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            break
    else:
        raise ValueError(f"cannot find the classifier of torchvision model {name!r}")
    modules = list(head.named_modules())
    scorers = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Linear)
               or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1))]
    if not scorers:
        raise ValueError(f"cannot find the classifier of torchvision model {name!r} (no Linear in its {attr})")
    path, layer = modules[scorers[-1]]
    dim, out = (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else \
        (layer.in_channels, layer.out_channels)
    after = [m for _, m in modules[scorers[-1] + 1:] if not list(m.children())]
    if out != num_classes or not all(_keeps_feature_size(m) for m in after):
        raise ValueError(f"cannot find the classifier of torchvision model {name!r}: its {attr} does not end "
                         f"in a {num_classes}-class Linear or 1x1 Conv2d")
    if not path:
        setattr(model, attr, nn.Identity())
    else:
        parent, _, child = path.rpartition(".")
        setattr(head.get_submodule(parent) if parent else head, child, nn.Identity())
    return dim


def _drop_auxiliary_classifiers(model: nn.Module) -> None:
    """googlenet / inception_v3 also compute auxiliary class scores in training mode (and return them in a
    tuple); a backbone has no use for them, so they are removed and the model returns its features alone."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for child in [n for n, _ in model.named_children() if n.lower().startswith("aux")]:
            setattr(model, child, None)


def _build_torchvision(name: str, **kwargs) -> nn.Module:
    """A torchvision classifier without its final class-score layer (:func:`_strip_torchvision_classifier`): it
    outputs its penultimate representation, ``[B, num_features]``."""
    import torchvision.models as tvm

    kwargs.pop("patch_size", None)
    kwargs.pop("img_size", None)
    dpr = kwargs.pop("drop_path_rate", 0.0)
    model = None
    if dpr:
        try:  # only some torchvision models (e.g. convnext, swin, efficientnet) have stochastic depth
            model = tvm.get_model(name, weights=None, stochastic_depth_prob=dpr, **kwargs)
        except TypeError:
            model = None
    if model is None:
        model = tvm.get_model(name, weights=None, **kwargs)
    model.num_features = _strip_torchvision_classifier(model, name, kwargs.get("num_classes", 1000))
    _drop_auxiliary_classifiers(model)
    return _guard_strided_convs(model)


def timm_patch_size(model: nn.Module) -> int | None:
    p = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(p, (tuple, list)) and p:
        p = p[0]
    return p if isinstance(p, int) else None


def _build_timm(name: str, patch_size: int | None = None, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` without pretrained weights. ViT-style models get
    ``dynamic_img_size=True`` (multi-crop feeds global and local crops of different sizes; the position embedding
    is interpolated) and ``img_size`` when given; ``patch_size`` other than dinokit's default 16 is passed to models
    that take one (a timm name such as ``vit_small_patch8_224`` decides the patch otherwise). Options a model does
    not accept (a ResNet has no image or patch size) are left out; an ignored non-default ``patch_size`` warns."""
    import difflib
    import re
    import warnings

    import timm

    optional: dict = {"dynamic_img_size": True}
    if kwargs.get("img_size") is not None:
        optional["img_size"] = kwargs.pop("img_size")
    kwargs.pop("img_size", None)
    if patch_size is not None and patch_size != 16:
        optional["patch_size"] = patch_size
    while True:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                      **optional, **kwargs)
            break
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if not m or m.group(1) not in optional:
                raise
            del optional[m.group(1)]
        except RuntimeError as e:
            if not str(e).startswith("Unknown model"):
                raise
            close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
            hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else \
                " (timm.list_models() lists them)"
            raise ValueError(f"unknown timm model {name!r}{hint}") from None
    actual = timm_patch_size(model)
    if patch_size is not None and patch_size != 16 and actual != patch_size:
        what = f"has patch size {actual}" if actual else "has no patch size"
        warnings.warn(f"dinokit: timm:{name} {what}; patch_size {patch_size} is ignored", stacklevel=3)
    return _guard_strided_convs(model)


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone` (torchvision names are added lazily; ``timm:<name>`` too)."""
    return sorted(_REGISTRY) + _torchvision_names()


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """Build a backbone returning ``[B, D]`` features (``model.num_features == D``).

    ``arch``: ``vit_tiny`` | ``vit_small`` | ``vit_base`` | ``vit_custom`` | ``deit_*`` | a torchvision model name
    (e.g. ``resnet50``) | ``timm:<name>``. ``drop_path_rate`` is stochastic depth (the reference uses 0.1 for the
    student, 0 for the teacher).
    """
    arch = arch.replace("deit", "vit") if arch.startswith("deit") else arch
    if arch in _REGISTRY:
        return _REGISTRY[arch](patch_size=patch_size, drop_path_rate=drop_path_rate, **kwargs)
    if arch.startswith("timm:"):
        return _build_timm(arch[5:], patch_size=patch_size, drop_path_rate=drop_path_rate, **kwargs)
    if arch in _torchvision_names():
        return _build_torchvision(arch, patch_size=patch_size, drop_path_rate=drop_path_rate, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(sorted(_REGISTRY))}, a torchvision "
                     f"model name (e.g. resnet50) or timm:<name>")
