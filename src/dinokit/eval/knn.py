"""Weighted k-NN evaluation of frozen features (Caron et al. 2021, §4.1 and Appendix; reference
``eval_knn.py``, dino-reference.md §4.1), after Wu et al. 2018's non-parametric classifier.

Protocol, as the reference:

* features: the frozen backbone in eval mode, fp32 (bf16 autocast on request: :func:`eval_autocast`), on the
  evaluation transform (Resize 256 bicubic, CenterCrop 224, ImageNet normalisation); for a ViT the CLS token after
  the final norm;
* train and test features are L2-normalised, so ``test @ train.T`` are cosine similarities;
* for each test image, the ``k`` most similar train images (sorted) vote for their labels with weight
  ``exp(s / T)`` (``T = 0.07``); the class with the largest total wins; top-5 counts the target among the
  ``min(5, k)`` best-scored classes; accuracies in percent; ``k`` in {10, 20, 100, 200} (20 is the number the
  paper reports).

Differences from the reference (same numbers where the reference runs at all):

* any number of classes (inferred as ``max label + 1``; the reference hard-codes 1000 and crashes on labels
  >= 1000) and any number of test images (the reference needs >= 100, it splits into 100 chunks);
* top-5 uses ``min(5, k, num_classes)`` slots (the reference's slice fails with fewer than 5 classes);
* ties between class scores are broken towards the lower class index, i.e. the reference's descending
  ``sort`` made stable; the reference's unstable sort leaves the order of equal scores unspecified (this
  matters only for classes with equal, typically zero, votes);
* a class no neighbour voted for is never a hit, top-1 or top-5 (in the reference it could be one of the
  "5 best" among the tied zeros: with at most 5 classes, or a test class absent from the train set, top-5 was
  then 100% for any features);
* ``k`` larger than the train set is clamped to its size;
* NaN or inf features (a diverged model) are an error: the reference scores them (NaN similarities), and a
  comparison-based vote would rank every target first;
* votes are accumulated with ``scatter_add_`` into a ``[chunk, C]`` tensor instead of a ``[chunk, k, C]``
  one-hot product, test rows are chunked by a memory budget rather than into 100 pieces, and
  :func:`knn_eval` finds the neighbours once for the largest ``k`` and reuses them for every ``k`` (the
  sorted top-``k`` is a prefix of the sorted top-``k_max``) where the reference redoes the whole search per
  ``k``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..console import stderr_is_tty
from ..dtypes import EMULATED_BF16, cpu_supports_bf16
from ..errors import DataError
from ..models.linear import matmul_nt

__all__ = ["knn_classifier", "knn_classify_multi", "knn_eval", "extract_features", "extract_outputs",
           "frozen_features", "default_chunk_size", "aligned_labels", "is_vit", "require_finite"]

#: Bytes of the ``[chunk, n_train]`` similarity block (plus its top-k) aimed for by the default chunking.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def default_chunk_size(n_train: int, num_classes: int = 0, budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Test rows per chunk so that the fp32 ``[chunk, n_train]`` similarities and ``[chunk, C]`` votes stay
    within ``budget_bytes`` (about 1,100 rows for 60k train images, 64 for 1M; at least 1, at most 8192)."""
    per_row = 4 * (max(n_train, 1) + max(num_classes, 1)) + 12 * 256
    return int(max(1, min(8192, budget_bytes // per_row)))


def _as_label_vector(labels, name: str) -> torch.Tensor:
    """Labels as a 1-D integer tensor: lists, NumPy arrays and ``[N, 1]`` columns are accepted."""
    t = torch.as_tensor(labels)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(f"{name} labels must be one integer per row, shape [N]; got shape {tuple(t.shape)}")
    return t


def _check_inputs(train_features, train_labels, test_features, test_labels):
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("features must be 2-D [N, D]")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have dimension {train_features.shape[1]}, test features "
                         f"{test_features.shape[1]}")
    if len(train_labels) != len(train_features) or len(test_labels) != len(test_features):
        raise ValueError("one label per feature row is needed")
    if len(train_features) == 0:
        raise ValueError("the train set is empty")
    if any(len(lab) and int(lab.min()) < 0 for lab in (train_labels, test_labels)):
        raise ValueError("k-NN needs labels >= 0 (found unlabelled images, label -1)")
    for name, f in (("train", train_features), ("test", test_features)):
        if len(f) and not bool(torch.isfinite(f).all()):
            raise ValueError(f"the {name} features hold NaN or inf values (a diverged model?): similarities to "
                             "them are meaningless")


@torch.no_grad()
def knn_classify_multi(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       test_labels: torch.Tensor, ks: Sequence[int], T: float = 0.07,
                       num_classes: int | None = None, chunk_size: int | None = None
                       ) -> dict[int, tuple[float, float]]:
    """Weighted k-NN top-1/top-5 (percent) for several ``k`` with one neighbour search (see the module doc).

    ``train_features [N, D]`` and ``test_features [M, D]`` are used as given (L2-normalise them first, as the
    reference does); the computation runs on ``train_features``' device and dtype. Returns ``{k: (top1,
    top5)}``."""
    train_labels, test_labels = _as_label_vector(train_labels, "train"), _as_label_vector(test_labels, "test")
    _check_inputs(train_features, train_labels, test_features, test_labels)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    device = train_features.device
    train_labels = train_labels.to(device=device, dtype=torch.long)
    test_labels = test_labels.to(device=device, dtype=torch.long)
    largest = int(max(int(train_labels.max()), int(test_labels.max()) if len(test_labels) else 0))
    if num_classes is None:
        num_classes = largest + 1
    elif int(num_classes) <= largest:
        raise ValueError(f"num_classes is {num_classes} but a label is {largest}: labels must be in "
                         f"[0, num_classes)")
    n_train, n_test = len(train_features), len(test_features)
    kmax = min(max(ks), n_train)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_train, num_classes)
    chunk_size = max(1, int(chunk_size))
    classes = torch.arange(num_classes, device=device)
    top1 = {k: 0 for k in ks}
    top5 = {k: 0 for k in ks}
    for start in range(0, n_test, chunk_size):
        feats = test_features[start:start + chunk_size].to(device=device, dtype=train_features.dtype)
        targets = test_labels[start:start + chunk_size]
        sims = matmul_nt(feats, train_features)  # test @ train.T (oneDNN for fp32 on CPU)
        dist, idx = sims.topk(kmax, dim=1, largest=True, sorted=True)
        del sims
        neighbours = train_labels[idx]  # [B, kmax]
        weights = dist.float().div_(T).exp_()
        for k in ks:
            kk = min(k, n_train)
            scores = torch.zeros(len(feats), num_classes, device=device, dtype=torch.float32)
            scores.scatter_add_(1, neighbours[:, :kk], weights[:, :kk])
            # rank of the target under a stable descending sort (ties -> lower class index first)
            target_score = scores.gather(1, targets[:, None])
            # a class no neighbour voted for is not a prediction, whatever its rank among the tied zeros (the
            # reference's unstable sort put such classes in the "top 5" when there were at most 5 classes)
            voted = torch.zeros(len(feats), num_classes, dtype=torch.bool, device=device)
            voted.scatter_(1, neighbours[:, :kk], True)  # not "score > 0": exp(s / T) may underflow for tiny T
            ahead = (scores > target_score) | ((scores == target_score) & (classes[None] < targets[:, None]) & voted)
            rank = ahead.sum(1).masked_fill_(~voted.gather(1, targets[:, None])[:, 0], num_classes)
            top1[k] += int((rank == 0).sum())
            top5[k] += int((rank < min(5, kk, num_classes)).sum())
    denom = max(n_test, 1)
    return {k: (100.0 * top1[k] / denom, 100.0 * top5[k] / denom) for k in ks}


def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: int | None = None,
                   chunk_size: int | None = None) -> tuple[float, float]:
    """The reference's weighted k-NN classifier: ``(top1, top5)`` accuracy in percent.

    Features are assumed L2-normalised by the caller (as in the reference); similarity ``test @ train.T``,
    the ``k`` largest (sorted), votes ``exp(s / T)`` summed per class, prediction = argmax, top-5 = target
    among the ``min(5, k, num_classes)`` best classes. ``num_classes`` defaults to ``max label + 1``;
    ``chunk_size`` (test rows per block) to :func:`default_chunk_size`. Exact differences from the reference
    are listed in the module docstring."""
    return knn_classify_multi(train_features, train_labels, test_features, test_labels, [k], T, num_classes,
                              chunk_size)[int(k)]


def knn_eval(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, ks: Iterable[int] = (10, 20, 100, 200), T: float = 0.07,
             num_classes: int | None = None, chunk_size: int | None = None) -> dict[int, dict[str, float]]:
    """L2-normalise both feature sets (reference: done on rank 0 before the classifier), then
    :func:`knn_classify_multi` for every ``k``. Returns ``{k: {"top1": %, "top5": %}}``."""
    train = F.normalize(train_feats.float(), dim=1, p=2)
    test = F.normalize(test_feats.float(), dim=1, p=2)
    res = knn_classify_multi(train, train_labels, test, test_labels, list(ks), T, num_classes, chunk_size)
    return {k: {"top1": t1, "top5": t5} for k, (t1, t5) in res.items()}


# ------------------------------------------------------------------------------------------- features

def is_vit(model: nn.Module) -> bool:
    """True for backbones with the reference ViT's ``get_intermediate_layers`` and a ``patch_size``."""
    return hasattr(model, "get_intermediate_layers") and isinstance(getattr(model, "patch_size", None), int)


def aligned_labels(train_ds, val_ds) -> torch.Tensor:
    """``val_ds.labels`` renumbered into ``train_ds``'s class indices by class name.

    Two ImageFolder trees number their classes independently (sorted folder names), so a validation folder
    missing one class would otherwise shift every later label. Classes absent from the train set get new
    indices after the train classes (they can never be predicted: they count as errors). Data sets without
    class names (or with identical ones) keep their labels."""
    tc, vc = list(getattr(train_ds, "classes", []) or []), list(getattr(val_ds, "classes", []) or [])
    labels = val_ds.labels.clone()
    if not tc or not vc or tc == vc:
        return labels
    index = {c: i for i, c in enumerate(tc)}
    extra = [c for c in vc if c not in index]
    if len(extra) == len(vc):
        raise DataError(f"no validation class is a train class (train: {_names(tc)}; validation: {_names(vc)}): "
                        "the class sub-folders of the two data sets must have the same names")
    index.update({c: len(tc) + i for i, c in enumerate(extra)})
    mapping = torch.tensor([index[c] for c in vc], dtype=torch.long)
    ok = labels >= 0
    labels[ok] = mapping[labels[ok]]
    if extra:
        n = int((labels >= len(tc)).sum())  # the extra classes' indices follow the train classes'
        warnings.warn(f"dinokit: {len(extra)} validation class(es) not in the train set ({_names(extra)}): their "
                      f"{n} images can never be predicted and count as errors", stacklevel=2)
    return labels


def drop_unreadable(ds, what: str, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``rows`` (tensors aligned with ``ds``'s images, e.g. features extracted in data-set order and labels)
    without the images found unreadable during the extraction, with one warning naming them. Extraction
    substitutes the next readable image for an unreadable one (:class:`dinokit.data.ImageFolderDataset`); its
    row must not count, twice or under the unreadable file's label. ``ds`` may be a ``Subset``."""
    base, idx = (ds.dataset, list(ds.indices)) if isinstance(ds, torch.utils.data.Subset) else (ds, None)
    if not hasattr(base, "readable"):
        return rows
    keep = base.readable() if idx is None else base.readable()[idx]
    if bool(keep.all()):
        return rows
    bad = (~keep).nonzero().flatten().tolist()
    names = [base.samples[i if idx is None else idx[i]][0] for i in bad]
    warnings.warn(f"dinokit: {len(bad)} unreadable image(s) of the {what} data left out ({_names(names, 3)}); "
                  f"{int(keep.sum())} of {len(keep)} used", stacklevel=2)
    return tuple(r[keep] for r in rows)


def _names(classes: list[str], most: int = 5) -> str:
    return ", ".join(classes[:most]) + (f" and {len(classes) - most} more" if len(classes) > most else "")


def frozen_features(model: nn.Module, x: torch.Tensor, n_last_blocks: int = 1,
                    avgpool_patchtokens: bool = False) -> torch.Tensor:
    """The frozen feature of the reference's evaluation scripts for a batch ``x``.

    * ``n_last_blocks == 1`` without avgpool: ``model(x)`` (ViT: CLS after the final norm; ResNet: pooled).
    * ViT, ``n_last_blocks = n``: concatenation of the CLS tokens of the last ``n`` blocks, each through the
      final norm (``get_intermediate_layers``), oldest first: ``n * D`` (reference ``eval_linear.py``, ViT-S
      setting ``n = 4``).
    * ``avgpool_patchtokens``: the mean of the last block's patch tokens is added. With ``n = 1`` it is
      **interleaved** with the CLS token exactly as the reference does (``stack([cls, avg], -1).flatten``:
      ``cls_0, avg_0, cls_1, avg_1, ...``; ViT-B setting); with ``n > 1`` (where the reference's reshape
      fails) it is concatenated after the CLS tokens.
    """
    if n_last_blocks == 1 and not avgpool_patchtokens:
        return model(x)
    if not is_vit(model):
        raise ValueError("n_last_blocks > 1 / avgpool_patchtokens need a ViT backbone")
    out = model.get_intermediate_layers(x, n_last_blocks)
    feat = torch.cat([o[:, 0] for o in out], dim=-1)
    if avgpool_patchtokens:
        avg = out[-1][:, 1:].mean(dim=1)
        if n_last_blocks == 1:
            feat = torch.stack((feat, avg), dim=-1).reshape(feat.shape[0], -1)
        else:
            feat = torch.cat((feat, avg), dim=-1)
    return feat


FEATURES = ("cls", "avgpool", "concat")


def concat_features(cls: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
    """``concat``: the CLS token and the mean patch token, each L2-normalised, side by side, L2-normalised again
    (both halves weigh the same in the cosine similarity; the Fashion-MNIST demo's ``knn_top1`` feature)."""
    cls, avg = F.normalize(cls.float(), dim=1), F.normalize(avg.float(), dim=1)
    return F.normalize(torch.cat([cls, avg], dim=1), dim=1)


def _loader(data, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=num_workers, pin_memory=False,
                                       persistent_workers=False)


EVAL_PRECISIONS = ("fp32", "bf16")


def eval_autocast(precision: str, device: str | torch.device):
    """The forward's numeric context for ``precision``: nothing for ``"fp32"`` (the reference's evaluation
    protocol), bf16 autocast on ``device`` for ``"bf16"`` (faster on CPUs with bf16 units and on GPUs; features
    differ from fp32 ones by bf16 rounding, the outputs are returned in fp32 either way)."""
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(EVAL_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    global _EMULATED_BF16_WARNED
    if kind == "cpu" and not _EMULATED_BF16_WARNED and not cpu_supports_bf16():
        _EMULATED_BF16_WARNED = True
        warnings.warn(f"dinokit: {EMULATED_BF16}", stacklevel=2)
    return torch.autocast(kind, dtype=torch.bfloat16)


_EMULATED_BF16_WARNED = False  # once per process: eval_autocast is entered once per batch


@torch.no_grad()
def extract_outputs(model: nn.Module, data, fn: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]],
                    batch_size: int = 128, num_workers: int = 0, device: str | torch.device = "cpu",
                    progress: bool = True, desc: str = "features", precision: str = "fp32"
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``fn(model, images)`` (returning a tuple of ``[B, ...]`` tensors) over a data set or loader in its
    order, with the model in eval mode, no gradients, in ``precision`` (:func:`eval_autocast`; default fp32).
    Returns the outputs stacked on CPU (preallocated once, float32) and the labels (int64). The model's
    train/eval mode is restored afterwards."""
    from tqdm import tqdm  # not tqdm.auto: its asyncio wrapper calls iter() on a DataLoader once more (workers twice)

    device = torch.device(device)
    loader = _loader(data, batch_size, num_workers)
    try:
        n = len(loader.dataset)
    except TypeError:
        n = None
    was_training = model.training
    model.eval().to(device)
    outs: list[torch.Tensor] | None = None
    parts: list[list[torch.Tensor]] | None = None
    labels: list[torch.Tensor] = []
    pos = 0
    try:
        bar = tqdm(loader, desc=desc, disable=not (progress and stderr_is_tty()), leave=False, dynamic_ncols=True)
        for batch in bar:
            images, target = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
            images = images.to(device, non_blocking=True).float()
            with eval_autocast(precision, device):
                res = fn(model, images)
            res = tuple(r.detach().float().cpu() for r in (res if isinstance(res, tuple) else (res,)))
            b = len(images)
            if n is not None:
                if outs is None:
                    outs = [torch.empty((n, *r.shape[1:]), dtype=torch.float32) for r in res]
                for o, r in zip(outs, res):
                    o[pos:pos + b] = r
            else:
                parts = parts or [[] for _ in res]
                for p, r in zip(parts, res):
                    p.append(r)
            pos += b
            if target is None:
                labels.append(torch.full((b,), -1, dtype=torch.long))
            else:
                labels.append(torch.as_tensor(target, dtype=torch.long).reshape(-1).cpu())
    finally:
        model.train(was_training)
    if n is not None:
        if outs is None:
            return [], torch.zeros(0, dtype=torch.long)
        outs = [o[:pos] for o in outs]
    else:
        outs = [torch.cat(p) for p in parts] if parts else []
    for o in outs:
        require_finite(o, f"the model's {desc}")
    return outs, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def require_finite(features: torch.Tensor, what: str = "features") -> None:
    """Raise :class:`DataError` when rows of ``features [N, ...]`` hold NaN or inf: a diverged or corrupt model.
    Every evaluation would score them as if they meant something (the k-NN vote of NaN similarities ranked
    every target first: 100%)."""
    if len(features) == 0 or bool(torch.isfinite(features).all()):
        return
    bad = int((~torch.isfinite(features.reshape(len(features), -1))).any(1).sum())
    raise DataError(f"{what} are not finite (NaN or inf) for {bad} of {len(features)} images: the weights are "
                    "diverged or corrupt")


def extract_features(model: nn.Module, dataset_or_loader, batch_size: int = 128, num_workers: int = 0,
                     device: str | torch.device = "cpu", n_last_blocks: int = 1,
                     avgpool_patchtokens: bool = False, patch_tokens: bool = False,
                     progress: bool = True, desc: str = "features", features: str = "cls",
                     precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image, in data-set order: ``(features float32 [N, D] on CPU, labels int64)``.

    The model runs in eval mode under ``no_grad`` in fp32 (reference ``extract_features``; the reference also
    gathers across GPUs, which a single process does not need). The feature is :func:`frozen_features`
    (``model(x)`` by default: the ViT CLS token). ``patch_tokens=True`` instead returns the last block's patch
    tokens after the final norm, ``[N, num_patches, D]`` (CLS excluded). ``features="avgpool"`` returns the
    mean of the last block's patch tokens, ``"concat"`` :func:`concat_features` of the CLS token and that mean
    ``[N, 2D]`` (the Fashion-MNIST demo's feature); both need a ViT and
    ignore ``n_last_blocks``/``avgpool_patchtokens``. Labels are ``-1`` for unlabelled images; a DataLoader passed
    in must not shuffle. ``desc`` labels the progress bar. ``precision="bf16"`` runs the forward under bf16
    autocast (:func:`eval_autocast`)."""
    if features not in FEATURES:
        raise ValueError(f"features must be cls, avgpool or concat, got {features!r}")
    if features != "cls" and not is_vit(model):
        raise ValueError(f"{features} features need a ViT backbone")
    if patch_tokens:
        if not is_vit(model):
            raise ValueError("patch_tokens needs a ViT backbone")

        def fn(m, x):
            return m.get_intermediate_layers(x, 1)[-1][:, 1:]
    elif features != "cls":
        def fn(m, x):
            tokens = m.get_intermediate_layers(x, 1)[-1]
            avg = tokens[:, 1:].mean(dim=1)
            if features == "avgpool":
                return avg
            return concat_features(tokens[:, 0], avg)
    else:
        def fn(m, x):
            return frozen_features(m, x, n_last_blocks, avgpool_patchtokens)

    outs, labels = extract_outputs(model, dataset_or_loader, fn, batch_size=batch_size,
                                   num_workers=num_workers, device=device, progress=progress, desc=desc,
                                   precision=precision)
    if not outs:
        return torch.zeros(0, 0), labels
    return outs[0], labels


def feature_summary(features: torch.Tensor) -> dict[str, Any]:
    """Small diagnostics of a feature bank (dimension, mean norm, NaN count)."""
    norms = features.float().norm(dim=1) if features.numel() else torch.zeros(0)
    return {"n": int(features.shape[0]), "dim": int(features.shape[1]) if features.ndim > 1 else 0,
            "mean_norm": float(norms.mean()) if len(norms) else math.nan,
            "non_finite": int((~torch.isfinite(features)).sum())}
