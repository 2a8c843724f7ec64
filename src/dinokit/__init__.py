"""dinokit: DINO self-supervised Vision Transformer pretraining (Caron et al., ICCV 2021), faithful to the
reference implementation and fast on the machines you have.

The whole algorithm lives in a few short modules:
``models`` (backbones), ``head`` (DINOHead), ``loss`` (DINOLoss + centering), ``schedules`` (cosine schedules),
``teacher`` (EMA), ``wrapper`` (MultiCropWrapper), ``optim`` (param groups, clipping, LARS),
``augmentation`` (multi-crop), ``trainer`` (the loop).
"""

from .head import DINOHead
from .loss import DINOLoss, KoLeoLoss, sinkhorn_knopp
from .models import VisionTransformer, build_backbone, vit_base, vit_small, vit_tiny
from .optim import cancel_gradients_last_layer, clip_gradients, get_params_groups
from .schedules import cosine_scheduler
from .teacher import build_teacher, ema_update
from .wrapper import MultiCropWrapper

__version__ = "0.1.0"

__all__ = [
    "DINOHead", "DINOLoss", "MultiCropWrapper", "VisionTransformer", "build_backbone", "vit_tiny", "vit_small",
    "vit_base", "cosine_scheduler", "get_params_groups", "clip_gradients", "cancel_gradients_last_layer",
    "build_teacher", "ema_update", "KoLeoLoss", "sinkhorn_knopp",
]


_LAZY = {"DINOAugmentation": "augmentation", "knn_classifier": "eval.knn", "TrainConfig": "config",
         "Trainer": "trainer", "train": "trainer"}
__all__ += list(_LAZY)  # a star import loads them (and their modules)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    """Names whose modules pull in heavier dependencies (torchvision, the training loop), imported on first
    use; so are the submodules (``dinokit.trainer`` works after a plain ``import dinokit``)."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'dinokit' has no attribute {name!r}")
