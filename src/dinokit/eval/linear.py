"""Linear probe on frozen features (Caron et al. 2021, §4.1 "Linear and k-NN classification on ImageNet";
reference ``eval_linear.py``, dino-reference.md §4.2).

Protocol, as the reference:

* frozen backbone in eval mode, no gradients, fp32; the feature is :func:`dinokit.eval.knn.frozen_features`:
  the CLS tokens of the last ``n_last_blocks`` blocks (each through the final norm) concatenated (ViT-S
  setting: 4), optionally with the average of the last block's patch tokens (ViT-B setting: ``n = 1`` with
  ``avgpool_patchtokens``, interleaved with the CLS token exactly as the reference does; for ``n > 1``, where
  the reference's reshape fails, it is concatenated); the pooled output for ResNets;
* :class:`LinearClassifier`: ``nn.Linear(dim, num_labels)``, weight ``N(0, 0.01^2)``, bias 0, on the
  flattened feature;
* SGD, momentum 0.9, weight decay 0, ``lr = base_lr * batch_size / 256`` (reference: ``0.001 * 128 * GPUs /
  256``), ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch, cross-entropy, 100 epochs;
* train augmentation (``augment=True``): ``RandomResizedCrop(image_size)`` (scale (0.08, 1), bilinear),
  horizontal flip, ImageNet normalisation; validation: Resize(256, bicubic) + CenterCrop(224) + normalisation;
* validation every epoch; the reported number is the **best** top-1 over epochs on the validation set (as the
  reference's ``best_acc``, an optimistic protocol); the last epoch's accuracy is reported too.

Speed (CPU-friendly default, ``augment=False``): the frozen features of the train and val sets are computed
**once** with the evaluation transform (no augmentation) and the linear layers are trained on the cached
features; the reference's augmented protocol (a backbone forward per image per epoch) stays available with
``augment=True``. In both modes the val features are computed once (the val transform is deterministic, so
this equals re-extracting them every epoch), and several base learning rates (``lrs``, the paper's sweep)
are trained side by side on the same batches: one feature computation serves all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..console import stderr_is_tty
from ..models.linear import Linear

__all__ = ["LinearClassifier", "LinearSweep", "train_linear_on_features", "linear_probe", "train_transform",
           "accuracy"]


class LinearClassifier(nn.Module):
    """A linear layer on the flattened frozen feature; weight ``N(0, 0.01^2)``, bias 0 (reference)."""

    def __init__(self, dim: int, num_labels: int = 1000, generator: torch.Generator | None = None):
        super().__init__()
        self.num_labels = num_labels
        self.linear = Linear(dim, num_labels)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 0.01, generator=generator)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[float]:
    """Number of correct predictions within the top ``k`` classes, per ``k`` (clamped to the classes)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(targets[:, None])
    return [float(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in topk]


class LinearSweep:
    """One :class:`LinearClassifier` per base learning rate, trained side by side on the same batches.

    Each has its own parameter group of one SGD optimiser (momentum 0.9, ``weight_decay``) with
    ``lr = base_lr * batch_size / 256``, and one ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` anneals all of
    them per epoch. Every classifier starts from the same initial weights (drawn from ``seed``)."""

    def __init__(self, dim: int, num_labels: int, lrs: Sequence[float], batch_size: int, epochs: int,
                 weight_decay: float = 0.0, seed: int = 0, device: str | torch.device = "cpu"):
        self.lrs = [float(lr) for lr in lrs]
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"learning rates must be > 0, got {lrs}")
        self.scaled = [lr * batch_size / 256.0 for lr in self.lrs]
        self.classifiers = []
        for _ in self.lrs:
            g = torch.Generator().manual_seed(seed)
            self.classifiers.append(LinearClassifier(dim, num_labels, generator=g).to(device))
        groups = [{"params": list(c.parameters()), "lr": lr} for c, lr in zip(self.classifiers, self.scaled)]
        self.optimizer = torch.optim.SGD(groups, lr=self.scaled[0], momentum=0.9, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(epochs, 1),
                                                                    eta_min=0.0)
        self.num_labels = num_labels

    def step(self, feats: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """One SGD step of every classifier on a batch; returns the losses."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = [F.cross_entropy(c(feats), labels) for c in self.classifiers]
        torch.stack(losses).sum().backward()  # disjoint parameters: each gets its own loss's gradient
        self.optimizer.step()
        return [float(v.detach()) for v in losses]

    def end_epoch(self) -> None:
        self.scheduler.step()

    @torch.no_grad()
    def evaluate(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> list[dict]:
        """Top-1 / top-5 (percent) and loss of every classifier. Top-5 is ``None`` with fewer than 5 classes (as
        the reference, which reports top-1 alone there: it would be 100% for any classifier). A validation label
        the classifier has no output for (a class absent from the training data) is a miss, and has no loss."""
        n = len(labels)
        out = []
        for c in self.classifiers:
            c.eval()
            t1 = t5 = loss = 0.0
            for s in range(0, n, batch_size):
                logits = c(feats[s:s + batch_size])
                y = labels[s:s + batch_size]
                known = y < logits.shape[1]
                if bool(known.any()):
                    loss += float(F.cross_entropy(logits[known], y[known], reduction="sum"))
                a1, a5 = accuracy(logits, y, (1, 5))
                t1, t5 = t1 + a1, t5 + a5
            c.train()
            n_known = int((labels < c.num_labels).sum())
            out.append({"top1": 100.0 * t1 / max(n, 1),
                        "top5": 100.0 * t5 / max(n, 1) if c.num_labels >= 5 else None,
                        "loss": loss / max(n_known, 1)})
        return out


def _summarise(sweep: LinearSweep, history: list[list[dict]]) -> list[dict[str, Any]]:
    results = []
    for i, (lr, scaled) in enumerate(zip(sweep.lrs, sweep.scaled)):
        per_epoch = [h[i] for h in history]
        best = max(per_epoch, key=lambda r: (r["top1"], -r["epoch"]))
        keys = ("epoch", "top1", "top5")
        results.append({"lr": lr, "lr_scaled": scaled, "best": {k: best[k] for k in keys},
                        "last": {k: per_epoch[-1][k] for k in ("epoch", "top1", "top5")},
                        "history": [{k: r[k] for k in ("epoch", "top1", "top5", "train_loss")}
                                    for r in per_epoch]})
    return results


def _run_epochs(sweep: LinearSweep, batches, val_feats, val_labels, epochs: int, val_freq: int,
                progress: bool, check_batches: bool = False) -> list[dict[str, Any]]:
    """Drive ``sweep`` for ``epochs``: ``batches(epoch)`` yields ``(features, labels)`` training batches
    (``check_batches``: refuse non-finite ones, for features computed anew every epoch)."""
    from tqdm import tqdm

    if not bool(torch.isfinite(val_feats).all()):
        raise _non_finite("validation")
    history: list[list[dict]] = []
    bar = tqdm(range(epochs), desc="linear", disable=not (progress and stderr_is_tty()), leave=False,
               dynamic_ncols=True)
    for epoch in bar:
        totals = [0.0] * len(sweep.lrs)
        count = 0
        for feats, labels in batches(epoch):
            if check_batches and not bool(torch.isfinite(feats).all()):
                raise _non_finite("training")
            for i, v in enumerate(sweep.step(feats, labels)):
                totals[i] += v
            count += 1  # the mean of the batch losses, as the reference logs it
        sweep.end_epoch()
        if epoch % val_freq == 0 or epoch == epochs - 1:  # the reference's epochs 1, 1 + N, ... (1-based) and the last
            res = sweep.evaluate(val_feats, val_labels)
            for i, r in enumerate(res):
                r.update(epoch=epoch + 1, train_loss=totals[i] / max(count, 1))
            history.append(res)
            bar.set_postfix(top1=f"{max(r['top1'] for r in res):.2f}")
    return _summarise(sweep, history)


def _non_finite(which: str):
    from ..errors import DataError

    return DataError(f"the {which} features are not finite (NaN or inf): the model's weights have diverged; a "
                     "linear probe of them means nothing")


def train_linear_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                             val_labels: torch.Tensor, lrs: Sequence[float] = (0.001,), epochs: int = 100,
                             batch_size: int = 128, num_labels: int | None = None, weight_decay: float = 0.0,
                             seed: int = 0, val_freq: int = 1, device: str | torch.device = "cpu",
                             progress: bool = False) -> list[dict[str, Any]]:
    """The linear protocol on cached features (no augmentation): each epoch visits the train features in a
    fresh random order (``seed``), in batches of ``batch_size`` (the last one smaller, as the reference's
    loader). Returns, per base lr, ``{"lr", "lr_scaled", "best": {epoch, top1, top5}, "last": {...},
    "history": [...]}`` (accuracies in percent)."""
    device = torch.device(device)
    train_feats = train_feats.float().reshape(len(train_feats), -1).to(device)
    val_feats = val_feats.float().reshape(len(val_feats), -1).to(device)
    train_labels = train_labels.long().to(device)
    val_labels = val_labels.long().to(device)
    if num_labels is None:  # the classes of the training data (a validation-only class is a miss)
        num_labels = int(train_labels.max()) + 1
    if not bool(torch.isfinite(train_feats).all()):  # cached: checked once
        raise _non_finite("training")
    sweep = LinearSweep(train_feats.shape[1], num_labels, lrs, batch_size, epochs, weight_decay, seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    n = len(train_labels)

    def batches(epoch):
        order = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            yield train_feats[idx], train_labels[idx]

    return _run_epochs(sweep, batches, val_feats, val_labels, epochs, val_freq, progress)


class _FlagUnreadable(torch.utils.data.Dataset):
    """``(image, label, readable)``: ``readable`` is False when the file at the index could not be read and the
    data set served the next one instead (:class:`dinokit.data.ImageFolderDataset`), so that its row can be
    dropped from the batch (the augmented linear probe leaves unreadable images out, as the cached one does)."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        ok = self.base.readable(i) if hasattr(self.base, "readable") else True
        return image, label, ok


def train_transform(image_size: int = 224):
    """Reference train augmentation: RandomResizedCrop(image_size) (torchvision defaults: scale (0.08, 1),
    bilinear), RandomHorizontalFlip, ToTensor, Normalize(ImageNet)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def linear_probe(model: nn.Module, train_spec, val_spec, lrs: Sequence[float] = (0.001,), epochs: int = 100,
                 n_last_blocks: int = 4, avgpool_patchtokens: bool = False, batch_size: int = 128,
                 augment: bool = False, image_size: int = 224, num_workers: int = 0,
                 device: str | torch.device = "cpu", weight_decay: float = 0.0, seed: int = 0,
                 val_freq: int = 1, progress: bool = True, resize_size: int | None = None,
                 precision: str = "fp32") -> dict[str, Any]:
    """The whole linear evaluation of a frozen ``model`` on data specs (a folder, ``fashion-mnist:DIR``; see
    :func:`dinokit.data.build_dataset`; Fashion-MNIST uses its train split for ``train_spec`` and its test
    split for ``val_spec``). Returns ``{"results": [per lr], "best": the best lr's entry, "feature_dim",
    "num_labels", "n_train", "n_val", "mode"}``. ``precision="bf16"``: the frozen backbone's forward under bf16
    autocast (:func:`dinokit.eval.knn.eval_autocast`); the classifiers train in fp32 either way."""
    from ..augmentation import eval_transform
    from ..data import build_dataset
    from ..errors import DataError
    from .knn import aligned_labels, drop_unreadable, eval_autocast, extract_features, is_vit

    device = torch.device(device)
    model = model.eval().to(device)
    if not is_vit(model):  # the reference's ResNet-50 setting: the pooled output
        n_last_blocks, avgpool_patchtokens = 1, False
    tf = eval_transform(image_size, resize_size)
    train_ds = build_dataset(train_spec, transform=tf, split="train", unreadable="leave_out")
    val_ds = build_dataset(val_spec, transform=tf, split="test", unreadable="leave_out")
    for name, ds in (("train", train_ds), ("validation", val_ds)):
        if not ds.has_labels:
            raise DataError(f"the {name} data ({train_spec if name == 'train' else val_spec}) has unlabelled "
                            "images: the linear probe needs class sub-folders")
    val_labels = aligned_labels(train_ds, val_ds)
    train_labels = train_ds.labels.clone()
    num_labels = len(train_ds.classes)  # a validation-only class has no output: its images count as misses
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, n_last_blocks=n_last_blocks,
              avgpool_patchtokens=avgpool_patchtokens, progress=progress, precision=precision)
    val_feats, _ = extract_features(model, val_ds, desc="val features", **kw)
    val_feats, val_labels = drop_unreadable(val_ds, "validation", val_feats, val_labels)
    if not augment:
        train_feats, _ = extract_features(model, train_ds, desc="train features", **kw)
        train_feats, train_labels = drop_unreadable(train_ds, "train", train_feats, train_labels)
        results = train_linear_on_features(train_feats, train_labels, val_feats, val_labels, lrs, epochs,
                                           batch_size, num_labels, weight_decay, seed, val_freq, device,
                                           progress)
        dim = train_feats.shape[1]
    else:
        from .knn import frozen_features

        aug_ds = build_dataset(train_spec, transform=train_transform(image_size), split="train",
                               unreadable="leave_out")
        dim = val_feats.shape[1]
        sweep = LinearSweep(dim, num_labels, lrs, batch_size, epochs, weight_decay, seed, device)
        g = torch.Generator().manual_seed(seed + 1)
        loader = torch.utils.data.DataLoader(_FlagUnreadable(aug_ds), batch_size=batch_size, shuffle=True,
                                             generator=g, num_workers=num_workers, drop_last=False)

        def batches(epoch):  # the augmented data set lists the same files as train_ds: same labels
            for images, labels, ok in loader:
                if not bool(ok.all()):  # an unreadable file's row (another image in its place) is left out
                    images, labels = images[ok], labels[ok]
                    if not len(labels):
                        continue
                with torch.no_grad(), eval_autocast(precision, device):
                    feats = frozen_features(model, images.to(device), n_last_blocks, avgpool_patchtokens)
                yield feats.float().reshape(len(feats), -1), labels.long().to(device)

        with torch.random.fork_rng(devices=[]):  # the crops drawn in this process (no loader workers): seeded
            torch.manual_seed(seed + 2)
            results = _run_epochs(sweep, batches, val_feats.to(device), val_labels.to(device), epochs, val_freq,
                                  progress, check_batches=True)
        (train_labels,) = drop_unreadable(aug_ds, "train", train_labels)  # after a full pass: the images used
    best = max(results, key=lambda r: r["best"]["top1"])
    return {"mode": "augment" if augment else "cached-features", "results": results, "best": best,
            "feature_dim": int(dim), "num_labels": num_labels, "n_train": len(train_labels), "n_val": len(val_labels),
            "epochs": epochs, "batch_size": batch_size, "n_last_blocks": n_last_blocks,
            "avgpool_patchtokens": avgpool_patchtokens, "weight_decay": weight_decay, "precision": precision}

