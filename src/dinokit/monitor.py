"""Online monitoring during training: a weighted k-NN (T = 0.07, k = 20) of the teacher backbone on a labelled
subset, the reference's evaluation protocol at small scale."""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig

__all__ = ["online_knn", "knn_transform", "tensor_eval_batch"]

_CACHE: dict[tuple, Any] = {}


def knn_transform(cfg: TrainConfig):
    """Evaluation transform of same-size tensor data sets (Fashion-MNIST): resized straight to the training
    resolution ``global_crop_size``. Image folders get :func:`dinokit.augmentation.eval_transform` at that size
    instead (the reference's resize-256 / centre-crop-224 proportions, as ``dinokit knn``): see
    :func:`knn_data`."""
    import torchvision.transforms.v2 as T

    from .augmentation import IMAGENET_MEAN, IMAGENET_STD

    size = cfg.global_crop_size
    return T.Compose([T.ToImage(), T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform_for(cfg: TrainConfig, ds):
    """The evaluation transform of data set ``ds`` at the training resolution: :func:`knn_transform` for
    same-size tensor data sets, :func:`dinokit.augmentation.eval_transform` (resize, centre crop) for folders of
    photos of any size, as ``dinokit knn`` evaluates them."""
    from .augmentation import eval_transform
    from .data import ImageFolderDataset

    return eval_transform(cfg.global_crop_size) if isinstance(ds, ImageFolderDataset) else knn_transform(cfg)


def _subset(ds, n: int, seed: int = 0):
    if n <= 0 or len(ds) <= n:
        return ds, ds.labels
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values
    return torch.utils.data.Subset(ds, idx.tolist()), ds.labels[idx]


def tensor_eval_batch(images: torch.Tensor, size: int, mean=None, std=None) -> torch.Tensor:
    """:func:`knn_transform` on a batch of same-size uint8 images ``[B, H, W]`` / ``[B, C, H, W]`` with tensor ops
    (identical at the native size; antialiased bicubic otherwise): ``[B, 3, size, size]`` float, normalised."""
    from .augmentation import IMAGENET_MEAN, IMAGENET_STD

    x = images.unsqueeze(1) if images.ndim == 3 else images[:, :3]
    x = x.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN if mean is None else mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD if std is None else std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _tensor_features(backbone, ds, cfg: TrainConfig, device, batch_size: int = 1000):
    """Fast path for in-memory tensor data sets (Fashion-MNIST): no PIL, whole batches; None otherwise."""
    base, idx = (ds.dataset, ds.indices) if isinstance(ds, torch.utils.data.Subset) else (ds, None)
    images = getattr(base, "images", None)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return None
    if idx is not None:
        images = images[torch.as_tensor(idx)]
    from .eval.knn import require_finite

    out = [backbone(tensor_eval_batch(images[i:i + batch_size], cfg.global_crop_size).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    feats = torch.cat(out)
    require_finite(feats, "the model's k-NN monitor features")  # as extract_features checks the other path's
    return feats


def knn_data(cfg: TrainConfig):
    """The monitor's ``((train, labels), (val, labels))``, built once per process and cached. Raises
    :class:`DataError` for missing data or images without a class, so a run can check them before training."""
    from .data import build_dataset
    from .errors import ConfigError, DataError

    if not (cfg.knn_train and cfg.knn_val):
        raise ConfigError("the online k-NN monitor (knn_every / knn_every_minutes) needs both knn_train and knn_val "
                          "(labelled data: folders with class sub-folders, or fashion-mnist)")
    key = (cfg.knn_train, cfg.knn_val, cfg.knn_subset, cfg.global_crop_size)
    if key not in _CACHE:
        sets = []
        for name, spec, split in (("knn_train", cfg.knn_train, "train"), ("knn_val", cfg.knn_val, "test")):
            try:
                ds = build_dataset(spec, transform=None, split=split, unreadable="leave_out")
            except DataError as e:  # "image directory X does not exist" read as a --data problem
                raise DataError(f"--{name.replace('_', '-')}: {e}") from None
            ds.transform = eval_transform_for(cfg, ds)
            if not getattr(ds, "has_labels", False):
                raise DataError(f"{name} {spec} has images without a class: the k-NN monitor needs labelled data "
                                "(every image in a class sub-folder)")
            sets.append(ds)
        _CACHE[key] = (_subset(sets[0], cfg.knn_subset), _subset(sets[1], cfg.knn_subset, seed=1))
    return _CACHE[key]


def online_knn(backbone: torch.nn.Module, cfg: TrainConfig, device: torch.device, k: int = 20,
               T: float = 0.07) -> dict[str, Any]:
    from .eval.knn import drop_unreadable, extract_features, knn_classifier

    (train_ds, train_labels), (val_ds, val_labels) = knn_data(cfg)
    was_training = backbone.training
    backbone.eval()
    try:
        ftrain, fval = (_tensor_features(backbone, ds, cfg, device) for ds in (train_ds, val_ds))
        if ftrain is None or fval is None:
            ftrain, _ = extract_features(backbone, train_ds, batch_size=256, device=device, progress=False,
                                         desc="k-NN monitor features")
            fval, _ = extract_features(backbone, val_ds, batch_size=256, device=device, progress=False,
                                       desc="k-NN monitor features")
            ftrain, train_labels = drop_unreadable(train_ds, "k-NN monitor's train", ftrain, train_labels)
            fval, val_labels = drop_unreadable(val_ds, "k-NN monitor's validation", fval, val_labels)
    finally:
        backbone.train(was_training)
    ftrain = torch.nn.functional.normalize(ftrain, dim=1)
    fval = torch.nn.functional.normalize(fval, dim=1)
    top1, top5 = knn_classifier(ftrain, train_labels, fval, val_labels, k, T)
    return {"knn_top1": float(top1), "knn_top5": float(top5), "knn_k": k, "knn_T": T,
            "knn_n_train": len(train_labels), "knn_n_val": len(val_labels)}
