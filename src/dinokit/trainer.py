"""The DINO training loop (Caron et al. 2021, Algorithm 1), with the reference's mechanics:

per iteration ``it``: set lr (all groups) and weight decay (group 0) from the cosine schedules; teacher on the
2 global crops, student on all crops, DINO loss (centre updated inside; plus ``koleo_loss_weight`` x KoLeo on
the student's global-crop CLS features when that is > 0, a DINOv2 option); backward; per-parameter clipping;
last layer's gradients dropped during ``freeze_last_layer`` epochs; optimiser step; EMA of the teacher with the
cosine momentum. Teacher temperature is per epoch (per iteration in time-budgeted runs).

Engineering around it: bf16/fp16 autocast, DDP under torchrun, exact resume (model, teacher, optimiser,
scaler, centre, epoch and iteration, every RNG; per-sample augmentation seeds make the data stream independent
of worker count and resume point), atomic checkpoints, JSON-lines logs, TensorBoard, a progress bar, collapse
diagnostics, an online k-NN monitor, and a time budget that plans the whole schedule to fit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from . import distributed as D
from .checkpoint import (
    fault_kill,
    find_resume_checkpoint,
    lock_output_dir,
    probe_write,
    refuse_dangling_link,
    remove_stale_temp_files,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
    write_text_atomic,
)
from .config import TrainConfig, config_to_dict
from .console import eprint, stderr_is_tty
from .dtypes import EMULATED_BF16, at_least_fp32, cpu_supports_bf16
from .errors import CheckpointError, ConfigError, DinokitError
from .head import DINOHead
from .loss import DINOLoss, KoLeoLoss
from .models import build_backbone
from .optim import build_optimizer, cancel_gradients_last_layer, clip_gradients, get_params_groups
from .schedules import cosine_scheduler
from .shards import is_shard_spec
from .teacher import ema_update
from .wrapper import MultiCropWrapper

__all__ = ["Trainer", "train", "count_noun", "format_duration", "resolve_device", "resolve_precision",
           "build_student_teacher", "NonFiniteLossError", "Stopped"]


class NonFiniteLossError(DinokitError):
    exit_code = 3


class Stopped(DinokitError):
    """Training stopped on SIGTERM / SIGINT after a checkpoint (the same command resumes). Exit status 128 + the
    signal's number, as a process killed by it would have."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class _StopSignals:
    """While training: the first SIGTERM or SIGINT (scheduler pre-emption, ``docker stop``, ``kill``, Ctrl-C)
    only records a stop request, which the loop honours after the current iteration by writing a checkpoint;
    a second SIGINT interrupts at once. Main thread only (elsewhere: nothing changes), and only where the signal
    has Python's default handling; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                old = signal.getsignal(sig)
                # only Python's defaults are taken over: an ignored signal (SIGINT of a background job) stays
                # ignored, and a handler someone installed stays theirs (submitit's SIGTERM bypass: SLURM jobs
                # are checkpointed and requeued by submitit on SIGUSR2, see dinokit.submitit_launcher)
                if old not in (signal.SIG_DFL, signal.default_int_handler):
                    continue
                self._old[sig] = old
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to the training process (which stops after a checkpoint); they
    end with it (PyTorch's workers watch their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------------------
# set-up helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a ConfigError.
    Shared by training and every evaluation command."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a GPU (it uses a gradient scaler); use bf16 or fp32 on CPU")
    return precision


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel (``mallopt``: no ``mmap`` for large
    blocks, no trimming). A CPU training step frees and re-allocates the same activation and gradient buffers every
    iteration; by default each large one is an ``mmap``/``munmap`` pair whose pages the kernel faults in and zeroes
    again on every step. Numerics are untouched. Returns whether it was applied (glibc only; set
    ``DINOKIT_MALLOC_TUNING=0`` to opt out)."""
    if os.environ.get("DINOKIT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, big = -1, -3, ctypes.c_int(2**31 - 1)
        return bool(libc.mallopt(m_mmap_threshold, big)) and bool(libc.mallopt(m_trim_threshold, big))
    except (OSError, AttributeError):
        return False


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _backbone_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cfg.arch == "vit_custom":
        kw.update(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    if cfg.arch.startswith(("vit", "deit", "timm:")):  # timm models that take no image size leave it out
        kw["img_size"] = cfg.global_crop_size
    return kw


def _check_crops_fit_patches(cfg: TrainConfig, backbone: nn.Module) -> None:
    """A timm model's own patch size (its name decides it, e.g. ``vit_small_patch8_224``) must divide the crop
    sizes, and torchvision's ViTs take one image size only; dinokit's ViTs are checked by
    ``TrainConfig.validate`` (timm and torchvision would assert at the first forward)."""
    fixed = getattr(backbone, "image_size", None)  # torchvision's ViTs take only the size they were built for
    if isinstance(fixed, int) and not cfg.arch.startswith("timm:"):
        sizes = {size for _, size in cfg.crop_sizes()}
        if sizes != {fixed}:
            raise ConfigError(f"torchvision's {cfg.arch} takes only {fixed}-px images, not the crop sizes "
                              f"{', '.join(map(str, sorted(sizes)))}; use dinokit's vit_tiny/vit_small/vit_base (or "
                              f"timm:<name>), which take every crop size")
        return
    embed = getattr(backbone, "patch_embed", None)
    if not cfg.arch.startswith("timm:") or getattr(embed, "dynamic_img_pad", False):
        return
    from .models.registry import timm_patch_size

    patch = timm_patch_size(backbone)
    if not patch:
        return
    for name, size in cfg.crop_sizes():
        if size % patch:
            raise ConfigError(f"{name} {size} is not divisible by the patch size {patch} of {cfg.arch}")


def _check_backbone_takes_the_crops(cfg: TrainConfig, backbone: nn.Module, bn_ranks: int = 1) -> None:
    """Torchvision's and timm's backbones (dinokit's ViTs are checked by ``TrainConfig.validate``): one image of
    each crop size through the backbone (eval mode, no gradients), so that a crop too small for a CNN's
    downsampling is a :class:`ConfigError` now rather than a traceback at the first step; and every BatchNorm
    must see more than one value per channel in training: a local-crop group of ``local_crops_number`` x batch
    images reaching a 1x1 map with a batch of 1 cannot be normalised (``bn_ranks``: processes whose statistics a
    SyncBatchNorm pools)."""
    from .models.vit import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        return
    positions: dict[str, int] = {}  # BatchNorm name -> values per channel that one image gives it

    def recorder(name: str):
        def record(module, inputs):
            n = int(math.prod(inputs[0].shape[2:]))  # 1 for a BatchNorm1d's [N, C]
            positions[name] = min(positions.get(name, n), n)
        return record

    hooks = [m.register_forward_pre_hook(recorder(name)) for name, m in backbone.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = backbone.training
    backbone.eval()
    try:
        groups = {"global_crop_size": 2, "local_crop_size": cfg.local_crops_number}
        for option, size in cfg.crop_sizes():
            positions.clear()
            try:
                with torch.no_grad():
                    backbone(torch.zeros(1, 3, size, size))
            except (RuntimeError, ValueError, AssertionError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"{cfg.arch} cannot take {option} {size}: {first} (use larger crops)") from None
            images = groups.get(option, 1) * cfg.batch_size_per_gpu * bn_ranks
            small = [(name, n) for name, n in positions.items() if images * n <= 1]
            if small:
                raise ConfigError(
                    f"{cfg.arch}'s BatchNorm {small[0][0]!r} would see one value per channel: the "
                    f"{option.replace('_size', '')}s ({size} px) reach it at 1x1 and a batch of "
                    f"{cfg.batch_size_per_gpu} gives {images} image(s) per step; training BatchNorm needs more "
                    "than one (raise --batch-size-per-gpu, --local-crops-number or the crop size)")
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)


def build_student_teacher(cfg: TrainConfig, bn_ranks: int = 1) -> tuple[MultiCropWrapper, MultiCropWrapper, int]:
    """Student (drop path ``cfg.drop_path_rate``) and teacher (no drop path) built separately, as the reference
    does, then the teacher loaded from the student and frozen. Returns ``(student, teacher, embed_dim)``. A
    backbone that cannot take the crops is a :class:`ConfigError` (``_check_backbone_takes_the_crops``)."""
    try:
        s_backbone = build_backbone(cfg.arch, patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path_rate,
                                    **_backbone_kwargs(cfg))
        t_backbone = build_backbone(cfg.arch, patch_size=cfg.patch_size, drop_path_rate=0.0,
                                    **_backbone_kwargs(cfg))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    _check_crops_fit_patches(cfg, s_backbone)
    _check_backbone_takes_the_crops(cfg, s_backbone, bn_ranks)
    embed_dim = s_backbone.num_features
    head_kw = dict(use_bn=cfg.use_bn_in_head, nlayers=cfg.head_nlayers, hidden_dim=cfg.head_hidden_dim,
                   bottleneck_dim=cfg.head_bottleneck_dim)
    student = MultiCropWrapper(s_backbone, DINOHead(embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer,
                                                    **head_kw))
    teacher = MultiCropWrapper(t_backbone, DINOHead(embed_dim, cfg.out_dim, **head_kw))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, embed_dim


def has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# data


def _same_data_spec(a: Any, b: Any) -> bool:
    """Two ``data_path`` values naming the same data: relative or absolute, ``~``, trailing slashes, with the
    same ``fashion-mnist:`` prefix or none (relative paths are taken from the current directory)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return a == b

    def norm(spec: str) -> tuple[str, str]:
        prefix = "fashion-mnist:" if spec.startswith("fashion-mnist:") else ""
        rest = spec[len(prefix):]
        return prefix, os.path.abspath(os.path.expanduser(rest)) if rest else rest

    return norm(a) == norm(b)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, sample index)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled, rank-sharded, resumable sampler yielding ``(index, sample_seed)``.

    The permutation of epoch ``e`` comes from a generator seeded with ``seed + e`` (so every rank agrees), is
    padded to a multiple of the world size and sharded ``rank::world`` like ``DistributedSampler``; iteration
    can start at any batch (``start_batch``) for mid-epoch resume.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.per_rank = math.ceil(n / world)
        self.batches_per_epoch = self.per_rank // batch_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank:total:self.world][: self.batches_per_epoch * self.batch_size]

    def __iter__(self):
        idx = self.indices(self.epoch)[self.start_batch * self.batch_size:]
        for i in idx:
            yield (i, _sample_seed(self.seed, self.epoch, i))

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class AugmentedDataset(torch.utils.data.Dataset):
    """Applies ``transform`` to ``base[index]`` under RNGs seeded from the sampler's per-sample seed, so the
    crops of a sample do not depend on workers, ranks or where a run was resumed. With ``transform=None`` it
    returns the raw item and its seed (the batched tensor augmentation seeds itself from them)."""

    def __init__(self, base, transform=None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        if self.transform is None:
            item = self.base[index]
            return (item[0] if isinstance(item, tuple) else item), seed
        import random as _random

        def seeded(img):  # re-seeded per attempt: a skipped file must not shift the next image's draws
            torch.manual_seed(seed)
            _random.seed(seed)
            return self.transform(img)

        py_state = _random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                if getattr(self.transform, "decodes_paths", False) and hasattr(self.base, "read"):
                    # the transform opens the file itself (FastMultiCrop: crop boxes from the header, then
                    # JPEG draft decoding at the smallest scale that still covers every crop)
                    return self.base.read(index, seeded)[0]
                if hasattr(self.base, "to_pil"):  # tensor data sets hold uint8 arrays; the PIL chain wants images
                    img = self.base.to_pil(index)
                else:
                    item = self.base[index]
                    img = item[0] if isinstance(item, tuple) else item
                return seeded(img)
            finally:
                _random.setstate(py_state)


def collate_crops(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(crops) for crops in zip(*batch)]


class BatchAugmentCollate:
    """Collate raw uint8 images ``[C, H, W]`` and augment the whole batch at once (``BatchMultiCrop``), seeded
    from the samples' seeds (deterministic, resumable). With ``augment=None`` it returns the uint8 batch and
    the batch seed for augmentation on the training device."""

    def __init__(self, augment=None):
        self.augment = augment

    def __call__(self, batch):
        imgs = torch.stack([b[0] if b[0].ndim == 3 else b[0].unsqueeze(0) for b in batch])
        seed = _sample_seed(int(sum(b[1] for b in batch) % (2**62)), len(batch), 7)
        if self.augment is None:
            return imgs, seed
        g = torch.Generator(device=imgs.device).manual_seed(seed)
        return self.augment(imgs, generator=g)


AUTO_WORKERS = 10  # num_workers -1 (auto): the reference's default per GPU, at most one per CPU


def cpus_per_process() -> int:
    """CPUs this process may use (its affinity mask) shared among the training processes on this node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, local))


def loader_workers(requested: int) -> int:
    """DataLoader workers per training process: ``requested``, or for ``-1`` (the default, "auto") the paper's 10
    at most, and no more than :func:`cpus_per_process` — extra workers would only time-share the CPUs with the
    training step (and PyTorch warns that the loader may freeze). An explicit count is honoured (more workers
    than CPUs can help when reading is I/O-bound). The crops never depend on the count (:class:`AugmentedDataset`
    seeds each sample); for tar shards the batch composition does (resume with the same count)."""
    return min(AUTO_WORKERS, cpus_per_process()) if requested < 0 else requested


def multicrop_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The multi-crop options of ``cfg`` as every augmentation implementation takes them (DINOAugmentation,
    FastMultiCrop, BatchMultiCrop): crop sizes, scales and number, blur probabilities per crop, solarisation of
    global crop 2."""
    return dict(global_crops_scale=cfg.global_crops_scale, local_crops_scale=cfg.local_crops_scale,
                local_crops_number=cfg.local_crops_number, global_crop_size=cfg.global_crop_size,
                local_crop_size=cfg.local_crop_size, blur=tuple(cfg.blur_prob), solarize=(0.0, cfg.solarize_prob, 0.0))


def per_image_multicrop(cfg: TrainConfig):
    """The per-image multi-crop of ``--augment-impl`` (folders and shards): ``fast`` (FastMultiCrop) or the
    reference's PIL chain (DINOAugmentation)."""
    if cfg.augment_impl == "fast":
        from .fast_augment import FastMultiCrop

        return FastMultiCrop(**multicrop_kwargs(cfg))
    from .augmentation import DINOAugmentation

    return DINOAugmentation(**multicrop_kwargs(cfg))


def build_train_data(cfg: TrainConfig, rank: int, world: int):
    """Dataset, sampler, loader and (for the batched path) the on-device augmentation."""
    from .augmentation import BatchMultiCrop
    from .data import build_dataset

    if not cfg.data_path:
        raise ConfigError("no training data: pass --data DIR (a folder of images) or fashion-mnist:<dir>")
    from .shards import build_shard_loader

    if is_shard_spec(cfg.data_path):  # WebDataset tar shards, streamed (see dinokit.shards)
        return build_shard_loader(cfg, rank, world)
    base = build_dataset(cfg.data_path, transform=None, split="train")
    if hasattr(base, "samples") and hasattr(base, "load"):
        base.load(0)  # a folder of only unreadable files: one DataError now, not a worker's traceback later
    if len(base) < cfg.batch_size_per_gpu * world:
        raise ConfigError(f"the data set has {len(base)} images, fewer than one global batch "
                          f"({cfg.batch_size_per_gpu} x {world}); lower --batch-size-per-gpu")
    sampler = EpochSampler(len(base), cfg.batch_size_per_gpu, seed=cfg.seed, rank=rank, world=world)
    device_augment = None
    if cfg.fast_augment:
        batch_aug = BatchMultiCrop(**multicrop_kwargs(cfg))
        dataset = AugmentedDataset(_RawTensorView(base), transform=None)
        if cfg.gpu_augment:
            collate, device_augment = BatchAugmentCollate(None), batch_aug
        else:
            collate = BatchAugmentCollate(batch_aug)
    else:
        dataset = AugmentedDataset(base, transform=per_image_multicrop(cfg))
        collate = collate_crops
    workers = loader_workers(cfg.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size_per_gpu, sampler=sampler, num_workers=workers,
        collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True,
        # its own generator: creating an iterator must not consume the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None)
    return base, sampler, loader, device_augment


class _RawTensorView(torch.utils.data.Dataset):
    """Raw uint8 tensors of a tensor data set (the batched augmentation needs same-size images)."""

    def __init__(self, base):
        if not hasattr(base, "images"):
            raise ConfigError("fast_augment needs a tensor data set of same-size images (e.g. fashion-mnist:DIR); "
                              "folders of images use the per-image multi-crop (--augment-impl)")
        self.images = base.images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


# ---------------------------------------------------------------------------------------------------------
# diagnostics


@torch.no_grad()
def collapse_stats(teacher_output: torch.Tensor, center: torch.Tensor, temp: float,
                   all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Teacher-side collapse diagnostics on one batch: mean per-row entropy of the centred, sharpened targets
    (ln K means uniform collapse), KL of their mean to uniform (0 also means collapse), centre norm, and the
    number of distinct argmax prototypes (1 means one-prototype collapse).

    With ``all_reduce_sum`` (a sum over processes, e.g. of a DDP run) the batch is every process's rows together,
    the global batch that a single process would see: the row sums, the prototype hits and the entropy sum are
    summed over processes in one collective."""
    p = torch.softmax((at_least_fp32(teacher_output) - center) / temp, dim=-1)
    k = p.shape[-1]
    hits = torch.zeros(k, dtype=torch.float64, device=p.device).index_fill_(0, p.argmax(-1), 1.0)
    ent_sum = -(p * torch.log(p.clamp_min(1e-30))).sum()
    tail = torch.stack([ent_sum.double(), ent_sum.new_tensor(p.shape[0]).double()])
    sums = torch.cat([p.sum(0).double(), hits, tail])
    if all_reduce_sum is not None:
        sums = all_reduce_sum(sums)
    p_sum, hits, ent_sum, rows = sums[:k], sums[k:2 * k], sums[2 * k], sums[2 * k + 1]
    mean_p = p_sum / rows
    kl_uniform = (mean_p * (torch.log(mean_p.clamp_min(1e-30)) + math.log(k))).sum()
    return {"teacher_entropy": float(ent_sum / rows), "entropy_max": math.log(k),
            "kl_mean_to_uniform": float(kl_uniform), "center_norm": float(center.norm()),
            "distinct_prototypes": int((hits > 0).sum())}


# ---------------------------------------------------------------------------------------------------------
# the trainer


def _saved_config(ckpt: dict) -> dict:
    """The options a checkpoint was written with (``{}`` for checkpoints without them)."""
    return ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (``json.dumps`` writes ``NaN``, which is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def format_duration(seconds: float) -> str:
    """``"0.4 s"`` under 10 seconds, ``"42 s"`` under a minute (short runs read "0.0 min" otherwise), ``"3.5 min"``
    above: the console's, the report's and the demo's durations."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def count_noun(n: int, noun: str) -> str:
    """``"1 image"``, ``"2 images"``: a count with its noun in agreement (messages, the CLI's summary lines)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


@contextlib.contextmanager
def _training_rng_untouched():
    """Run evaluations inside training (the k-NN monitor, the report) without moving the training's random
    streams (torch, CUDA, numpy, Python): a DataLoader draws its base seed from torch's generator, a model built
    for a report initialises weights. Otherwise a run with them would differ from one without, and a resumed
    run (its checkpoint's RNG state saved before the report) from the uninterrupted one."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@dataclass
class Plan:
    niter_per_ep: int
    epochs: int
    total_iters: int


class Trainer:
    """Holds the run's state; :meth:`fit` trains. Usable from Python::

        cfg = TrainConfig(data_path="imgs/", output_dir="out", arch="vit_tiny", epochs=10).validate()
        Trainer(cfg).fit()
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        self.rank, self.world, self.local_rank = D.init_distributed(cfg.device if cfg.device != "auto"
                                                                    else self.device.type, cfg.dist_url)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.local_rank)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.main = self.rank == 0
        self.out = Path(cfg.output_dir)
        for note in cfg.notes():
            self._warn(note)
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu_supports_bf16():
            self._warn(f"{EMULATED_BF16} (precision auto picks fp32 on this CPU)")
        if cfg.gpu_augment and cfg.fast_augment and self.device.type == "cpu":
            self._warn("gpu_augment on a CPU device: the batched augmentation runs in the training process instead "
                       "of the loader workers")
        if self.main and (cfg.knn_every or cfg.knn_every_minutes):
            from .monitor import knn_data

            knn_data(cfg)  # missing or unlabelled k-NN data is an error now, not after the first epoch

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        import random as _random

        _random.seed(cfg.seed)

        self.dataset, self.sampler, self.loader, self.device_augment = build_train_data(cfg, self.rank, self.world)
        self._check_ranks_agree()
        sync_bn = self.world > 1 and self.device.type == "cuda" and not cfg.fsdp  # SyncBatchNorm pools the ranks
        self.student, self.teacher, self.embed_dim = build_student_teacher(cfg, self.world if sync_bn else 1)
        self.student.to(self.device)
        self.teacher.to(self.device)
        if cfg.grad_checkpointing and hasattr(self.student.backbone, "set_grad_checkpointing"):
            self.student.backbone.set_grad_checkpointing(True)
        elif cfg.grad_checkpointing:
            self._warn(f"grad_checkpointing ignored: {cfg.arch} has no activation checkpointing (dinokit's ViTs and "
                       "timm's models have it)")
        self.student_ddp: nn.Module = self.student
        self.teacher_fwd: nn.Module = self.teacher
        self.fsdp = bool(cfg.fsdp) and self.world > 1
        if self.fsdp:
            self._fully_shard()
        elif self.world > 1:
            if has_batchnorms(self.student):
                if self.device.type == "cuda":
                    self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
                    self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
                else:  # torch's SyncBatchNorm is GPU-only (DDP refuses it on CPU, its kernels are CUDA's)
                    self._log_console("BatchNorm on CPU processes: SyncBatchNorm needs GPUs, so the batch "
                                      "statistics are per process here")
                # DDP refuses a module without trainable parameters: wrap the teacher while its parameters
                # require grad (the reference wraps it before freezing it), then freeze them again.
                for p in self.teacher.parameters():
                    p.requires_grad_(True)
                self.teacher_fwd = nn.parallel.DistributedDataParallel(
                    self.teacher, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
                for p in self.teacher.parameters():
                    p.requires_grad_(False)
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.student_ddp = torch.compile(self.student_ddp)
            self.teacher_fwd = torch.compile(self.teacher_fwd)

        ncrops = 2 + cfg.local_crops_number
        self.dino_loss = DINOLoss(cfg.out_dim, ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                  min(cfg.warmup_teacher_temp_epochs, cfg.epochs), cfg.epochs,
                                  student_temp=cfg.student_temp, center_momentum=cfg.center_momentum,
                                  centering=cfg.centering, sinkhorn_iterations=cfg.sinkhorn_iterations).to(self.device)
        self.koleo_loss = KoLeoLoss() if cfg.koleo_loss_weight > 0 else None
        self.optimizer = build_optimizer(cfg.optimizer, get_params_groups(self.student),
                                         fused=None)  # fused AdamW wherever PyTorch has it (CPU, CUDA)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.global_batch = cfg.batch_size_per_gpu * self.world
        self.base_lr = cfg.lr * self.global_batch / 256.0
        self._provisional_plan(0)

        self.epoch = 0  # next epoch to run
        self.iteration = 0  # iterations done
        self.step_in_epoch = 0
        self.train_seconds = 0.0
        self.skipped_steps = 0
        self.planned_from_budget = False
        # (budget fraction, iteration) of the re-plans still due in a time-budgeted run (see _plan_from_budget)
        self._replans: list[tuple[float, int]] = []
        self._replan_since: tuple[int, float] = (0, 0.0)  # (iteration, train seconds) the re-plans measure from
        self.knn_history: list[dict] = []
        # this epoch's sums of the finite steps' loss and KoLeo term, their count, and the last step's stats
        self._epoch_progress: tuple[float, int, dict, float] = (0.0, 0, {}, 0.0)
        self._log_window: dict[str, float] | None = None  # sums of the steps since the last "train" record
        # the output directory is created and locked only now: bad data or options leave nothing behind
        self._check_output_dir()
        self._resume()
        self._tb_replay: list[dict] = []  # kept records at the checkpoint's step, written again after the purge
        if self.main:  # also a fresh start over the log of a run that saved no checkpoint
            self._set_aside_log_records_after_the_checkpoint()
        self._tb = None
        # a resumed run's config.yaml is replaced only once this invocation has saved a checkpoint: a resume
        # that fails at once (other options, a NaN at the first step) leaves the file of the run it resumed
        self._config_pending = self.iteration > 0 or self.epoch > 0
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self._config_pending:
                self._write_config()
            self._init_tensorboard()

    # -- set-up -------------------------------------------------------------------------------------------
    def _fully_shard(self) -> None:
        """FSDP2: each ViT block, then the whole wrapper, of the student *and* of the teacher becomes a
        ``fully_shard`` unit on the same 1-D mesh, so both hold matching local shards: the EMA runs shard by
        shard, the teacher is all-gathered only for its forward (``reshard_after_forward``), gradients are
        reduce-scattered and averaged over the ranks (what DDP's all-reduce computes)."""
        from torch.distributed.fsdp import fully_shard

        if has_batchnorms(self.student):
            raise ConfigError("fsdp does not support BatchNorm (CNN backbones, --use-bn-in-head): use DDP "
                              "(the default) for those")
        if self.cfg.knn_every or self.cfg.knn_every_minutes:
            raise ConfigError("the online k-NN monitor runs on rank 0 only and is not available with fsdp; "
                              "evaluate checkpoints with dinokit knn instead")
        for model, teacher in ((self.student, False), (self.teacher, True)):
            for blk in getattr(model.backbone, "blocks", None) or []:
                fully_shard(blk, reshard_after_forward=True)
            # the teacher never runs backward: free its gathered root parameters right after the forward
            fully_shard(model, reshard_after_forward=True if teacher else None)

    def _clip(self, model: nn.Module, clip: float):
        return D.clip_sharded_gradients(model, clip) if self.fsdp else clip_gradients(model, clip)

    def _min_max(self, values: list[int]) -> tuple[list[int], list[int]]:
        """The element-wise minimum and maximum of integers over the ranks."""
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        lo = torch.tensor(values, dtype=torch.int64, device=dev)
        hi = lo.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        return lo.tolist(), hi.tolist()

    def _check_ranks_agree(self) -> None:
        """Before any model is built: the ranks must train the same thing, with the same options (but the data
        path: nodes may mount the same data elsewhere) and the same data (number and names of the files relative
        to the data folder). Otherwise DDP silently mixes runs, or with other batch counts the ranks meet in
        different collectives and gloo/NCCL abort mid-epoch without a word."""
        if self.world <= 1 or not D.is_dist():
            return
        import hashlib

        def digest(text: str) -> int:
            return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")

        options = {k: v for k, v in config_to_dict(self.cfg).items()
                   if k not in ("local_rank", "dist_url", "data_path")}
        samples = getattr(self.dataset, "samples", None)
        root = getattr(self.dataset, "root", None)
        names = ""
        if samples is not None and root is not None:  # a prefix cut, not relpath: ~30x faster on 1M files
            prefix = os.path.join(str(root), "")
            names = "\n".join(p[len(prefix):] if p.startswith(prefix) else p for p, _ in samples)
        checks = [digest(json.dumps(options, sort_keys=True, default=str)), len(self.dataset), digest(names)]
        lo, hi = self._min_max(checks)
        differ = []
        if lo[0] != hi[0]:
            everyone: list = [None] * self.world
            torch.distributed.all_gather_object(everyone, options)
            keys = [k for k in options if len({repr(o.get(k)) for o in everyone}) > 1]
            shown = "; ".join(f"{k} ({', '.join(repr(o.get(k)) for o in everyone)} by rank)" for k in keys[:3])
            differ.append(f"options: {shown or 'their sets'} (every process must be given the same)")
        if lo[1] != hi[1]:
            differ.append(f"the number of training images ({lo[1]}..{hi[1]})")
        elif lo[2] != hi[2]:
            differ.append("the training image files (every node must see the same data)")
        if differ:
            raise ConfigError(f"the {self.world} processes of this job disagree on {'; and '.join(differ)}")

    def _check_same_resume_point(self, ckpt: dict | None) -> None:
        """Every rank reads the checkpoint itself; before any loads it, they must have found the same one (an
        output_dir on a file system shared by all nodes): a rank without one would skip the collectives of a
        sharded load, and DDP would silently mix states."""
        if self.world <= 1 or not D.is_dist():
            return
        # as _resume reads it (an older checkpoint without "iteration": its epochs' worth)
        it = (int(ckpt.get("iteration", int(ckpt.get("epoch", 0)) * self.plan.niter_per_ep)) if ckpt is not None
              else -1)
        (lo,), (hi,) = self._min_max([it])
        if lo != hi:
            def name(i):
                return "no checkpoint" if i < 0 else f"iteration {i}"

            raise CheckpointError(f"the processes of this job found different checkpoints in {self.out} ({name(lo)} "
                                  f"and {name(hi)}): every node must see the same output directory (a shared file "
                                  "system)")

    def _check_output_dir(self) -> None:
        if not self.main:
            return
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"output directory {self.out} is a file, not a folder")
        refuse_dangling_link(self.out, f"output directory {self.out}", "--output-dir")
        for name in ("checkpoint.pth", "log.jsonl", "config.yaml"):  # every save would fail (after an epoch's work)
            if (self.out / name).is_dir():
                raise ConfigError(f"{self.out / name} is a folder, where the run writes its {name}: move it away")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe_write(self.out)
            # one run per output directory (before removing temp files: another run's may be a live write)
            self._unlock = weakref.finalize(self, lock_output_dir(self.out))
            for p in remove_stale_temp_files(self.out):  # left by a run killed while writing a checkpoint
                self._log_console(f"removed {p.name}, an incomplete checkpoint write of a killed run")
        except OSError as e:
            raise ConfigError(f"output directory {self.out} is not writable: {e.strerror or e}") from None

    #: a time-budgeted run's schedules until its plan is made: this many iterations at least, so that the timed
    #: iterations sit at the very start of the schedules (as in the planned run), whatever --epochs says
    PROVISIONAL_ITERS = 100_000

    def _provisional_plan(self, iteration: int) -> None:
        """The plan from ``--epochs``; with a time budget, until the budget's plan is made after the timed
        iterations, one at least :attr:`PROVISIONAL_ITERS` beyond ``iteration``. (It used to be ``--epochs``: with
        few iterations in those epochs the whole lr/wd/momentum schedule ran inside the timing iterations, and a
        run resumed before its plan, or resumed with a budget added, ended at ``--epochs`` with the budget
        unused.)"""
        bpe = self.sampler.batches_per_epoch
        epochs = self.cfg.epochs
        if self.cfg.time_budget_minutes > 0:
            epochs = max(epochs, math.ceil((iteration + self.PROVISIONAL_ITERS) / bpe))
        self.plan = Plan(bpe, epochs, epochs * bpe)
        self._build_schedules()

    def _build_schedules(self) -> None:
        cfg, plan = self.cfg, self.plan
        warm = cfg.warmup_epochs
        if warm * plan.niter_per_ep > plan.total_iters:
            warm = 0.1 * plan.total_iters / plan.niter_per_ep  # short runs: warm up over the first 10%
        one = dict(epochs=1, niter_per_ep=plan.total_iters)
        self.lr_schedule = cosine_scheduler(self.base_lr, cfg.min_lr, warmup_epochs=warm * plan.niter_per_ep
                                            / plan.total_iters, **one)
        self.wd_schedule = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, **one)
        self.momentum_schedule = cosine_scheduler(cfg.momentum_teacher, cfg.momentum_teacher_end, **one)

    def teacher_temp_at(self, epoch: int, iteration: int) -> float:
        cfg = self.cfg
        if not self.planned_from_budget:
            return self.dino_loss.teacher_temp(epoch)
        warm_iters = cfg.warmup_teacher_temp_epochs * self.plan.niter_per_ep
        if iteration >= warm_iters or warm_iters == 0:
            return cfg.teacher_temp
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * iteration / max(
            warm_iters - 1, 1)

    def _init_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            return
        # a resumed run redoes the iterations after its checkpoint: TensorBoard hides the earlier events from the
        # checkpoint's step on (purge_step) and gets that step's kept records again, so it shows what log.jsonl holds
        folder = self.out / "tensorboard"
        earlier = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        self._tb = SummaryWriter(log_dir=str(folder), purge_step=self.iteration if earlier else None)
        for record in self._tb_replay:
            self._tb_write(record)
        self._tb_replay = []

    def _tb_write(self, record: dict[str, Any] | None) -> None:
        """Write a record's numbers to TensorBoard (``None``: flush). TensorBoard is a convenience beside log.jsonl:
        a write the file system refuses (a full disk) turns it off with one warning; the run goes on."""
        if self._tb is None:
            return
        try:
            if record is None:
                self._tb.flush()
                return
            kind = record.get("type", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "iteration"):
                    self._tb.add_scalar(f"{kind}/{k}", v, record.get("iteration", 0))
        except OSError as e:
            self._tb = None
            self._warn(f"TensorBoard logging stopped: cannot write {self.out / 'tensorboard'} ({e.strerror or e}); "
                       f"log.jsonl goes on")

    def _set_aside_log_records_after_the_checkpoint(self) -> None:
        """``log.jsonl`` as of the checkpoint this run resumed from: the records of iterations it will redo (a run
        killed or stopped on a non-finite loss after its last checkpoint), of the epoch it will close again, and
        of online k-NN results the checkpoint does not hold move to ``log.superseded.jsonl`` (nothing is deleted),
        so the log, the report and the demo's curves describe one run without repeats."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        knn_kept = {(h.get("epoch"), h.get("iteration")) for h in self.knn_history}

        def current(rec: dict) -> bool:
            it, kind = rec.get("iteration"), rec.get("type", "train")
            if not isinstance(it, int):
                return True
            if kind == "epoch":
                return isinstance(rec.get("epoch"), int) and rec["epoch"] < self.epoch
            if kind == "knn":
                return (rec.get("epoch"), it) in knn_kept or it < self.iteration
            return it <= self.iteration

        try:
            keep, old = [], []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None  # a line cut by a kill mid-write: set aside
                if isinstance(rec, dict) and current(rec):
                    keep.append(line)
                    if rec.get("iteration") == self.iteration:
                        self._tb_replay.append(rec)
                else:
                    old.append(line)
            if not old:
                return
            with open(self.out / "log.superseded.jsonl", "a") as f:
                f.write("".join(f"{line}\n" for line in old))
            write_text_atomic(path, "".join(f"{line}\n" for line in keep))
        except OSError as e:
            raise DinokitError(f"could not rewrite {path} ({e.strerror or e}); the checkpoint is intact") from None
        what = "after the checkpoint (iterations to redo)" if self.iteration else "of a run that saved no checkpoint"
        self._log_console(f"{count_noun(len(old), 'log record')} {what} moved to log.superseded.jsonl")

    # -- checkpoints --------------------------------------------------------------------------------------
    def _model_states(self) -> tuple[dict, dict, dict]:
        """Student, teacher and optimiser state dicts; under FSDP the full (unsharded) ones, gathered on rank 0
        (a collective: every rank must call it), with the optimiser state keyed by parameter name."""
        if not self.fsdp:
            return self.student.state_dict(), self.teacher.state_dict(), self.optimizer.state_dict()
        import torch.distributed.checkpoint.state_dict as dcp

        opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (dcp.get_model_state_dict(self.student, options=opts),
                dcp.get_model_state_dict(self.teacher, options=opts),
                dcp.get_optimizer_state_dict(self.student, self.optimizer, options=opts))

    def _load_optimizer(self, state: dict) -> None:
        """Optimiser state from a plain (integer-keyed) or FSDP (name-keyed) checkpoint, into either mode."""
        by_name = any(isinstance(k, str) for k in state.get("state", {})) or any(
            isinstance(k, str) for g in state.get("param_groups", []) for k in g.get("params", []))
        if not self.fsdp and not by_name:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:  # integer ids number the parameters in the order of the optimiser's groups
            names = {id(p): n for n, p in self.student.named_parameters()}
            order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
            state = {"state": {order[int(k)]: v for k, v in state["state"].items()},
                     "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                      for g in state["param_groups"]]}
        set_optimizer_state_dict(self.student, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    def state_dict(self) -> dict[str, Any]:
        student, teacher, optimizer = self._model_states()
        return {
            "student": student,
            "teacher": teacher,
            "optimizer": optimizer,
            "fp16_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "dino_loss": self.dino_loss.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "step_in_epoch": self.step_in_epoch,
            "plan": {"niter_per_ep": self.plan.niter_per_ep, "epochs": self.plan.epochs,
                     "total_iters": self.plan.total_iters, "from_budget": self.planned_from_budget,
                     "replans": [list(r) for r in self._replans],
                     "replan_since": list(self._replan_since)},
            "train_seconds": self.train_seconds,
            "skipped_steps": self.skipped_steps,
            "knn_history": self.knn_history,
            "epoch_progress": {"loss": self._epoch_progress[0], "n": self._epoch_progress[1],
                               "last": self._epoch_progress[2], "koleo": self._epoch_progress[3],
                               # the steps since the last "train" record: a resume logs the same windows
                               "log_window": self._log_window,
                               # the epoch record's collapse diagnostics, for a resume with no step left in it
                               "collapse": self._collapse_diagnostics() if self.step_in_epoch else None},
            "rng": rng_state(),
            "loader_workers": self.loader.num_workers,
            "world": self.world,
            "config": config_to_dict(self.cfg),
            "dinokit_version": _version(),
        }

    #: options that do not change the training maths (where and how it runs, what is logged or evaluated):
    #: resuming with other values is routine; changes to any other option are named in a warning
    RESUME_FREE_OPTIONS = frozenset({
        "output_dir", "saveckp_freq", "save_every_steps", "keep_last", "num_workers", "device", "precision",
        "use_fp16", "compile", "grad_checkpointing", "fsdp", "loss_chunk_pairs", "nan_policy", "log_every",
        "knn_every", "knn_every_minutes", "knn_train", "knn_val", "knn_subset", "report", "dist_url", "local_rank",
        "fast_augment", "gpu_augment", "augment_impl"})

    def _check_resumable(self, ckpt: dict, path: Path) -> None:
        """Refuse a resume that cannot continue the run: another optimiser, or another number of iterations per
        epoch, which would shift every schedule and the epoch counter."""
        saved = _saved_config(ckpt)
        if saved.get("optimizer", self.cfg.optimizer) != self.cfg.optimizer:
            raise CheckpointError(f"cannot resume from {path} with --optimizer {self.cfg.optimizer}: the run used "
                                  f"{saved['optimizer']} (its state does not carry over). Use --optimizer "
                                  f"{saved['optimizer']} or another --output-dir.")
        plan = ckpt.get("plan") or {}
        if plan.get("niter_per_ep") not in (None, self.plan.niter_per_ep):
            raise CheckpointError(
                f"cannot resume from {path}: the run had {plan['niter_per_ep']} iterations per epoch, this "
                f"configuration gives {self.plan.niter_per_ep} (global batch {self.global_batch}, "
                f"{len(self.dataset)} images): the schedules and the epoch count would not continue. Use the same "
                f"batch size, number of processes and data as the run, or another --output-dir.")

    def _changed_options(self, ckpt: dict) -> list[str]:
        """``"name old -> new"`` for the options (beyond :attr:`RESUME_FREE_OPTIONS`) that differ from the run's."""
        saved = _saved_config(ckpt)
        return [f"{k} {saved[k]!r} -> {v!r}" for k, v in config_to_dict(self.cfg).items()
                if k not in self.RESUME_FREE_OPTIONS and k in saved and saved[k] != v
                and not (k == "data_path" and _same_data_spec(saved[k], v))]

    def _warn_changed_options(self, ckpt: dict, path: Path) -> None:
        """After a successful resume: name the options (beyond :attr:`RESUME_FREE_OPTIONS`) that differ."""
        changed = self._changed_options(ckpt)
        world = ckpt.get("world")
        if isinstance(world, int) and world != self.world:  # the same global batch can be split differently
            changed.append(f"processes {world} -> {self.world}")
        if changed:
            budget = " (a time-budgeted run keeps its plan)" if (ckpt.get("plan") or {}).get("from_budget") else ""
            self._warn(f"resuming {path} with options that differ from the run's: {'; '.join(changed)}{budget}")

    def _resume(self) -> None:
        ckpt, path = find_resume_checkpoint(self.out)
        self._check_same_resume_point(ckpt)
        if ckpt is None:
            return
        self._check_resumable(ckpt, path)
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                for model, key in ((self.student, "student"), (self.teacher, "teacher")):
                    set_model_state_dict(model, ckpt[key], options=StateDictOptions(full_state_dict=True))
            else:
                self.student.load_state_dict(ckpt["student"])
                self.teacher.load_state_dict(ckpt["teacher"])
            self._load_optimizer(ckpt["optimizer"])
            self.dino_loss.load_state_dict(ckpt["dino_loss"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            student = ckpt.get("student") if isinstance(ckpt.get("student"), dict) else {}
            first = _state_mismatch(self.student.state_dict(), student) or first
            changed = self._changed_options(ckpt)
            which = f"; options that differ from that run's: {'; '.join(changed)}" if changed else ""
            raise CheckpointError(f"cannot resume from {path}: it does not match this configuration ({first}{which}). "
                                  f"Use another --output-dir or the same options as that run.") from None
        if self.scaler is not None and ckpt.get("fp16_scaler"):
            self.scaler.load_state_dict(ckpt["fp16_scaler"])
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt.get("iteration", self.epoch * self.plan.niter_per_ep))
        self.step_in_epoch = int(ckpt.get("step_in_epoch", 0))
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self.knn_history = list(ckpt.get("knn_history", []))
        progress = ckpt.get("epoch_progress")
        if progress:
            last = dict(progress["last"])  # a checkpoint older than the KoLeo sum: the last step's value n times
            self._epoch_progress = (float(progress["loss"]), int(progress["n"]), last,
                                    float(progress.get("koleo", last.get("koleo", 0.0) * int(progress["n"]))))
            self._resumed_collapse = progress.get("collapse")
            self._log_window = dict(progress["log_window"]) if progress.get("log_window") else None
        plan = ckpt.get("plan")
        if plan and plan.get("from_budget"):
            self.plan = Plan(plan["niter_per_ep"], plan["epochs"], plan["total_iters"])
            self.planned_from_budget = True
            self._build_schedules()
            # the re-plans still due, and the speed baseline they measure from (a resumed run re-planned never)
            self._replans = [(float(f), int(i)) for f, i in plan.get("replans", [])]
            self._replan_since = tuple(plan.get("replan_since", (self.iteration, self.train_seconds)))
        elif (plan and self.cfg.time_budget_minutes > 0 and _saved_config(ckpt).get("time_budget_minutes")
              and plan.get("total_iters", 0) > self.iteration):
            # stopped before the budget's plan: the same provisional schedules as before the stop
            self.plan = Plan(plan["niter_per_ep"], plan["epochs"], plan["total_iters"])
            self._build_schedules()
        elif self.cfg.time_budget_minutes > 0 and self.train_seconds >= self.cfg.time_budget_minutes * 60:
            # a budget added on resume that the run has already spent: end here (closing the epoch in progress),
            # not after the timed iterations and one more
            self.plan = Plan(self.plan.niter_per_ep, self.epoch + (1 if self.step_in_epoch else 0), self.iteration)
            self.planned_from_budget = True
            self._build_schedules()
            self._log_console(f"time budget {self.cfg.time_budget_minutes:g} min already spent "
                              f"({format_duration(self.train_seconds)} trained): no iteration left")
        elif self.cfg.time_budget_minutes > 0:  # killed before the budget's plan, or a budget added on resume
            self._provisional_plan(self.iteration)
        if self.iteration > self.plan.total_iters:  # e.g. --epochs lowered below where the run is
            raise ConfigError(
                f"cannot resume from {path}: the run is at iteration {self.iteration} (epoch {self.epoch}), past the "
                f"end of this configuration's {self.plan.total_iters} iterations ({self.plan.epochs} epochs of "
                f"{self.plan.niter_per_ep}): nothing to train. Its checkpoint is the run's result; to train on, pass "
                f"--epochs {math.ceil(self.iteration / self.plan.niter_per_ep) + (0 if self.step_in_epoch else 1)} "
                "or more")
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        self._log_console(f"resumed from {path} at epoch {self.epoch}, iteration {self.iteration}")
        self._warn_changed_options(ckpt, path)
        world = ckpt.get("world")
        if isinstance(world, int) and world != self.world and is_shard_spec(self.cfg.data_path) and self.step_in_epoch:
            self._warn(f"{self.world} processes now, {world} when {path} was saved: with tar shards the rest of this "
                       f"epoch is split differently from the uninterrupted run, so until it ends some images come "
                       f"twice and as many not at all (later epochs are whole)")
        saved = ckpt.get("loader_workers")
        if (saved is not None and saved != self.loader.num_workers and is_shard_spec(self.cfg.data_path)
                and self.step_in_epoch):  # at an epoch boundary the next epoch is whole with any count
            if self.cfg.num_workers < 0 and 0 <= saved <= cpus_per_process():
                # --num-workers auto: the count the epoch began with (its batches depend on it), when the CPUs
                # allow it, so the rest of the epoch is exactly the uninterrupted run's
                from .shards import shard_loader

                self._log_console(f"{count_noun(saved, 'loader worker')} as when {path.name} was saved (--num-workers "
                                  f"auto would give {self.loader.num_workers}): the shard epoch resumes exactly")
                self.loader = shard_loader(self.sampler, self.cfg, saved)
            else:
                self._warn(f"{count_noun(self.loader.num_workers, 'loader worker')} now, {saved} when {path} was "
                           f"saved: with tar shards the rest of this epoch is split into batches differently from the "
                           f"uninterrupted run, so until it ends some images come twice and as many not at all "
                           f"(later epochs are whole); --num-workers {saved} resumes exactly")

    def save(self, numbered: bool = False) -> None:
        if not self.main and not self.fsdp:
            return
        state = self.state_dict()  # under FSDP every rank takes part in gathering it
        if not self.main:
            return
        main, copy = self.out / "checkpoint.pth", self.out / f"checkpoint{self.epoch - 1:04d}.pth"
        saved_main = False
        try:
            save_checkpoint(state, main)
            saved_main = True
            if numbered:
                save_checkpoint(state, copy)
        except OSError as e:
            if saved_main:  # the run's state is saved; only its numbered copy is not (a resume does not redo it)
                kept = (f"{main} holds this state (epoch {self.epoch}); its numbered copy {copy.name} is missing: "
                        f"once there is room, cp {shlex.quote(str(main))} {shlex.quote(str(copy))}")
            elif main.exists():
                kept = f"the previous checkpoint {main} is intact"
            else:
                kept = "no checkpoint was written yet"
            raise DinokitError(f"could not write a checkpoint to {self.out} ({e.strerror or e}); training stopped, "
                               f"{kept}") from None
        if numbered:
            try:
                rotate_checkpoints(self.out, self.cfg.keep_last)
            except OSError as e:  # an old copy that cannot be deleted is no reason to stop training
                self._warn(f"could not delete old numbered checkpoints (--keep-last {self.cfg.keep_last}): "
                           f"{e.strerror or e}")
        if self._config_pending:
            self._config_pending = False
            self._write_config()
        if self.cfg.report:
            try:
                from .report import write_report

                with _training_rng_untouched():
                    write_report(self.out)
            except Exception as e:  # a report must never kill training
                warnings.warn(f"dinokit: report not written: {e}", stacklevel=2)

    def _write_config(self) -> None:
        """``OUT/config.yaml``: the options as given (defaults filled in: ``--config OUT/config.yaml`` repeats
        the run), after a comment naming what ``auto`` resolved to; written atomically."""
        from . import __version__

        cfg = self.cfg
        resolved = [f"device {self.device}", f"precision {self.precision}" + (" (auto)" if cfg.precision == "auto"
                                                                               else ""),
                    f"world size {self.world}",
                    f"{count_noun(getattr(self.loader, 'num_workers', 0), 'loader worker')}"
                    + (" (auto)" if cfg.num_workers < 0 else "")]
        text = (f"# dinokit {__version__} train, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: the options as given "
                f"(defaults filled in)\n# resolved: {', '.join(resolved)}\n"
                + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        path = self.out / "config.yaml"
        try:
            write_text_atomic(path, text)
        except OSError as e:
            raise DinokitError(f"could not write {path} ({e.strerror or e})") from None

    # -- logging ------------------------------------------------------------------------------------------
    DATA_BOUND_FRAC = 0.25  # an epoch spending more of its time waiting for data than this gets a hint

    def _hint_if_data_bound(self, wait_frac: float) -> None:
        """Once per run: when the step waits for data more than :attr:`DATA_BOUND_FRAC` of the time, say what
        would feed it faster."""
        if wait_frac <= self.DATA_BOUND_FRAC or getattr(self, "_data_bound_hinted", False):
            return
        self._data_bound_hinted = True
        cfg = self.cfg
        workers, cpus = self.loader.num_workers, cpus_per_process()
        tips = ([f"more --num-workers (now {workers}; {count_noun(cpus, 'CPU')} for this process)"]
                if workers < cpus else [])
        if hasattr(self.dataset, "images") and not cfg.fast_augment:  # tensor data set, per-image PIL chain
            tips.append("--fast-augment (batched augmentation for same-size tensor images)")
        elif not hasattr(self.dataset, "images") and cfg.augment_impl == "reference":
            tips.append("--augment-impl fast (same crop distributions, several times the images/s per worker)")
        advice = f"try {', or '.join(tips)}" if tips else f"every CPU ({cpus}) already runs a loader worker"
        self._warn(f"{100 * wait_frac:.0f}% of the training time was spent waiting for data; the input pipeline "
                   f"is the bottleneck: {advice}")

    def _log_console(self, msg: str) -> None:
        if self.main:
            eprint(f"[dinokit] {msg}")

    def _warn(self, msg: str) -> None:
        """A warning of the run (rank 0 only), as every dinokit warning: ``dinokit: ...``, which the CLI prints as
        one line ``dinokit train: warning: ...``."""
        if self.main:
            warnings.warn(f"dinokit: {msg}", UserWarning, stacklevel=3)

    def _collapse_diagnostics(self, all_processes: bool = False) -> dict[str, Any] | None:
        """:func:`collapse_stats` of the last step's teacher output, or those saved with the checkpoint when this
        process has run no step yet (resumed after the last iteration of an epoch); ``None`` without either.
        ``all_processes`` (every rank must call it then, as at the end of an epoch): over the global batch of a
        multi-process run; otherwise this process's rows (a mid-epoch checkpoint, written by rank 0 alone)."""
        if getattr(self, "_last_teacher_output", None) is not None:
            temp = self._epoch_progress[2].get("teacher_temp", self.cfg.teacher_temp)
            reduce = D.all_reduce_sum if all_processes and self.world > 1 and D.is_dist() else None
            return collapse_stats(self._last_teacher_output, self.dino_loss.center, temp, reduce)
        return getattr(self, "_resumed_collapse", None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        try:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(_json_safe(record)) + "\n")  # NaN/inf as null: JSON, not Python's NaN
        except OSError as e:
            kept = (f"the last checkpoint in {self.out} is intact" if (self.out / "checkpoint.pth").is_file()
                    else "no checkpoint had been written yet")
            raise DinokitError(f"could not write {self.out / 'log.jsonl'} ({e.strerror or e}); training stopped, "
                               f"{kept}") from None
        if self._tb is not None:
            self._tb_write(record)

    # -- the step -----------------------------------------------------------------------------------------
    def _to_device(self, batch):
        if self.device_augment is not None:
            imgs, seed = batch
            imgs = imgs.to(self.device, non_blocking=True)
            g = torch.Generator(device=self.device).manual_seed(seed)
            return self.device_augment(imgs, generator=g)
        return [c.to(self.device, non_blocking=True) for c in batch]

    def train_step(self, crops: list[torch.Tensor]) -> dict[str, Any]:
        it, epoch = self.iteration, self.epoch
        lr = float(self.lr_schedule[min(it, len(self.lr_schedule) - 1)])
        wd = float(self.wd_schedule[min(it, len(self.wd_schedule) - 1)])
        momentum = float(self.momentum_schedule[min(it, len(self.momentum_schedule) - 1)])
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        temp = self.teacher_temp_at(epoch, it)
        center_before = self.dino_loss.center.clone() if self.cfg.nan_policy == "skip" else None
        # free the previous step's gradients before the forward: they are not held alongside the activations
        self.optimizer.zero_grad(set_to_none=True)

        with autocast_context(self.device, self.precision):
            with torch.no_grad():
                teacher_output = self.teacher_fwd(crops[:2])
            if self.koleo_loss is None:
                student_output = self.student_ddp(crops)
            else:
                student_output, features = self.student_ddp(crops, return_backbone=True)
            loss = self.dino_loss(student_output, teacher_output, epoch, chunk_pairs=self.cfg.loss_chunk_pairs,
                                  teacher_temp=temp)
            extra = {}
            if self.koleo_loss is not None:  # DINOv2: summed over the global crops' CLS features
                koleo = sum(self.koleo_loss(f) for f in features[:2 * crops[0].shape[0]].chunk(2))
                loss = loss + self.cfg.koleo_loss_weight * koleo
        # the logged values are the global batch's (the mean over processes, as one process with the whole batch
        # computes it), and all processes agree on whether the step is finite: a step skipped (--nan-policy skip)
        # on one rank alone would leave the others in DDP's gradient all-reduce. One collective, one host sync.
        values = torch.stack([loss.detach(), koleo.detach()]) if self.koleo_loss is not None else loss.detach()[None]
        if self.world > 1 and D.is_dist():
            values = D.all_reduce_sum(values.double()) / self.world  # a NaN/inf on any rank makes the sum one
        values = values.tolist()
        loss_value = values[0]
        if self.koleo_loss is not None:
            extra["koleo"] = values[1]
        if not math.isfinite(loss_value):
            if self.cfg.nan_policy == "skip":
                self.dino_loss.center.copy_(center_before)
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                return {"loss": loss_value, "skipped": True, "lr": lr, "wd": wd, "momentum": momentum,
                        "teacher_temp": temp}
            kept = (f"the last good checkpoint in {self.out} is kept" if (self.out / "checkpoint.pth").exists()
                    else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"loss is {loss_value} at epoch {epoch}, iteration {it + 1}; training stopped, {kept}. Try a lower "
                f"--lr, --precision fp32, a smaller --clip-grad, a higher --freeze-last-layer, or --nan-policy skip")

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                self._clip(self.student, self.cfg.clip_grad)
            cancel_gradients_last_layer(epoch, self.student, self.cfg.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.clip_grad:
                self._clip(self.student, self.cfg.clip_grad)
            cancel_gradients_last_layer(epoch, self.student, self.cfg.freeze_last_layer)
            self.optimizer.step()
        ema_update(self.student, self.teacher, momentum)
        self._last_teacher_output = teacher_output.detach()
        return {"loss": loss_value, "lr": lr, "wd": wd, "momentum": momentum, "teacher_temp": temp, **extra}

    # -- budget planning ----------------------------------------------------------------------------------
    #: fractions of the time budget at which the plan is re-made from the speed measured since the first plan
    REPLAN_AT = (0.1, 0.3, 0.6)

    def _agree(self, *values: float) -> list[float]:
        """The maximum of each value over the ranks: every rank plans from the slowest rank's clock, so all
        of them plan the same number of iterations (a rank that planned fewer would leave the others waiting
        in a collective for ever)."""
        if self.world <= 1 or not D.is_dist():
            return [float(v) for v in values]
        return D.all_reduce_max(list(values), self.device if self.device.type == "cuda" else "cpu")

    def _plan_from_budget(self, sec_per_iter: float, again: bool = False) -> None:
        """Plan every schedule for the iterations that fit in what is left of the budget at ``sec_per_iter``.
        The first plan comes from a few iterations; it is re-made at :attr:`REPLAN_AT` of the budget from the
        speed measured since, so a run whose speed drifts still ends on time. A re-plan changes the schedules'
        length, not their shape: at the moment of the re-plan the lr moves by the few percent the end moved.

        Under torch.distributed the ranks agree first (the maximum of their ``sec_per_iter`` and elapsed
        seconds), and the re-plans are due at *iterations* predicted from the agreed speed, not at each rank's
        clock time, so every rank plans the same schedule at the same iteration."""
        sec_per_iter, elapsed = self._agree(sec_per_iter, self.train_seconds)
        sec_per_iter = max(sec_per_iter, 1e-6)
        budget = self.cfg.time_budget_minutes * 60.0
        remaining = max(budget - elapsed, 0.0)
        total = max(self.iteration + int(remaining / sec_per_iter), self.iteration + 1)
        epochs = math.ceil(total / self.plan.niter_per_ep)
        self.plan = Plan(self.plan.niter_per_ep, epochs, total)
        self.planned_from_budget = True
        self._build_schedules()
        # the re-plans still to come, as iterations: when the agreed clock is predicted to reach each fraction
        fracs = [f for f, _ in self._replans] if again else self.REPLAN_AT
        self._replans = [(f, self.iteration + max(math.ceil((f * budget - elapsed) / sec_per_iter), 1))
                         for f in fracs if f * budget > elapsed]
        self._log_console(f"time budget {self.cfg.time_budget_minutes:g} min: {sec_per_iter * 1000:.0f} ms per "
                          f"iteration -> {total} iterations ({total / self.plan.niter_per_ep:.2f} epochs)"
                          + (f", re-planned at {format_duration(elapsed)}" if again else ""))

    # -- online k-NN -------------------------------------------------------------------------------------
    #: under torch.distributed, how often (iterations) the ranks agree whether a timed k-NN is due
    KNN_CHECK_EVERY = 10

    def _knn_due(self, epoch_end: bool) -> bool:
        """Whether the online k-NN runs now: every ``knn_every`` epochs (at an epoch's end), or once
        ``knn_every_minutes`` of training time have passed since the last one. Under torch.distributed every rank
        must decide the same at the same iteration (they all stop for it, see :meth:`run_knn`): the ranks check
        the clock every :attr:`KNN_CHECK_EVERY` iterations and agree on the slowest rank's training time."""
        cfg = self.cfg
        if not (cfg.knn_train and cfg.knn_val):
            return False
        if epoch_end and cfg.knn_every and self.epoch % cfg.knn_every == 0:
            return True
        if cfg.knn_every_minutes:
            if self.world > 1 and self.iteration % self.KNN_CHECK_EVERY:
                return False
            minutes = self._agree(self.train_seconds)[0] / 60  # the slowest rank's (own clock in one process)
            last = self.knn_history[-1]["train_minutes"] if self.knn_history else 0.0
            return minutes - last >= cfg.knn_every_minutes
        return False

    def run_knn(self, epoch: int | None = None) -> dict[str, Any] | None:
        """Rank 0 evaluates; under torch.distributed every rank calls this at the same iteration and waits for it
        at a barrier, so the pause is nobody's training time. Every rank records the entry (the k-NN clock).
        ``epoch``: the epoch the record is labelled with (default: the one in progress)."""
        from .monitor import online_knn

        minutes = self._agree(self.train_seconds)[0] / 60
        t0 = time.perf_counter()
        result = {"epoch": self.epoch if epoch is None else epoch, "iteration": self.iteration,
                  "train_minutes": minutes, "type": "knn"}
        if self.main:
            with _training_rng_untouched():  # its loaders draw seeds: the training must not see that
                result = {**online_knn(self.teacher.backbone, self.cfg, self.device), **result}
        if self.world > 1:
            D.barrier()
        result["eval_seconds"] = time.perf_counter() - t0
        self.knn_history.append(result)
        if self.main:
            self.log(result)
            self._log_console(f"k-NN top-1 {result['knn_top1']:.2f}% at "
                              f"{format_duration(60 * result['train_minutes'])} of training")
        return result if self.main else None

    # -- main loop ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end of the plan (resumed state included). A first SIGTERM / SIGINT stops it after the
        current iteration with a checkpoint (:class:`Stopped`); the same command resumes."""
        cfg = self.cfg
        if self.main:
            nparams = sum(p.numel() for p in self.student.parameters())
            arch = f"{cfg.arch}/{cfg.patch_size}" if isinstance(getattr(self.teacher.backbone, "patch_size", None),
                                                                 int) else cfg.arch
            self._log_console(f"{arch} ({nparams / 1e6:.2f}M params with head) on "
                              f"{self.device} [{self.precision}], world {self.world}, global batch "
                              f"{self.global_batch}, {count_noun(len(self.dataset), 'image')}, "
                              f"{self.plan.niter_per_ep} it/epoch, "
                              f"{count_noun(self.loader.num_workers, 'loader worker')}")
        try:
            with _StopSignals() as stop:
                return self._fit(stop)
        finally:
            self._shutdown_loader_workers()

    def _shutdown_loader_workers(self) -> None:
        """End the data-loader workers now. They ignore SIGTERM (the training process stops them after its
        checkpoint), so a loader iterator still referenced at interpreter exit — by an error's traceback, e.g. a
        worker's decode error — made multiprocessing's exit hook wait for them forever."""
        batches, self._batches = getattr(self, "_batches", None), None
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:  # multi-process iterators only
            shutdown()
            if getattr(self.loader, "_iterator", None) is batches:  # a persistent loader's: make a new one next time
                self.loader._iterator = None

    CALIBRATION_ITERS = 8  # a time budget is planned from the speed of at most this many first iterations
    STOP_CHECK_EVERY = 10  # at most this many iterations between the ranks' agreements on a stop request
    STOP_CHECK_SECONDS = 5.0  # and about this many seconds: slow iterations agree more often

    @classmethod
    def _next_stop_check(cls, iteration: int, sec_per_iter: float) -> int:
        """The iteration of the next agreement: the next multiple of ``n = STOP_CHECK_SECONDS / sec_per_iter``
        iterations, ``1 <= n <= STOP_CHECK_EVERY``. torchrun's agent, signalled itself, forwards the signal and
        kills its workers 30 s later: the ranks must reach an agreement and write the checkpoint before that."""
        n = max(1, min(cls.STOP_CHECK_EVERY, int(cls.STOP_CHECK_SECONDS / max(sec_per_iter, 1e-9))))
        return (iteration // n + 1) * n

    def _stop_requested(self, stop: _StopSignals) -> bool:
        """Whether to stop after this iteration: the signal of this process, or with several ranks the agreement
        of all, so that every rank stops at the same iteration. The ranks agree at iterations every rank computes
        alike (:meth:`_next_stop_check` from the slowest rank's speed, which the agreement itself carries)."""
        if self.world == 1:
            return stop.signum is not None
        if self.iteration < self._stop_check_at:
            return False
        now = time.perf_counter()
        since_it, since_t = self._stop_check_since
        agreed, sec_per_iter = self._agree(float(stop.signum or 0), (now - since_t) / max(self.iteration - since_it, 1))
        self._stop_check_at = self._next_stop_check(self.iteration, sec_per_iter)
        self._stop_check_since = (self.iteration, now)
        if agreed and stop.signum is None:
            stop.signum = int(agreed)
        return bool(agreed)

    def _fit(self, stop: _StopSignals) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        calib = {"n": 0, "t": 0.0}
        self._stop_check_at, self._stop_check_since = 0, (self.iteration, time.perf_counter())  # world > 1
        need_plan = cfg.time_budget_minutes > 0 and not self.planned_from_budget
        last = {}
        # a run stopped on its last iteration resumes with that epoch still to close (step_in_epoch > 0)
        while self.iteration < self.plan.total_iters or self.step_in_epoch:
            epoch = self.epoch
            self.sampler.set_epoch(epoch, self.step_in_epoch)
            n_this_epoch = min(self.plan.niter_per_ep, self.plan.total_iters - epoch * self.plan.niter_per_ep)
            if n_this_epoch <= 0 and not self.step_in_epoch:  # never an epoch without steps (it looped for ever)
                break
            sums = {"loss": 0.0, "koleo": 0.0, "loss_n": 0, "n": 0, "data_wait": 0.0, "step": 0.0}
            if self.step_in_epoch:  # resumed mid-epoch: the epoch's mean loss goes on from the checkpoint's sums
                sums["loss"], sums["loss_n"], last, sums["koleo"] = self._epoch_progress
            window = self._log_window = self._log_window or dict.fromkeys(sums, 0)  # sums since the last record
            bar = tqdm(total=n_this_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch}", leave=False,
                       disable=not self.main or not stderr_is_tty(), dynamic_ncols=True)
            t_prev = time.perf_counter()
            self._batches = iter(self.loader) if self.step_in_epoch < n_this_epoch else iter(())
            for batch in self._batches:
                t_data = time.perf_counter()
                crops = self._to_device(batch)
                stats = self.train_step(crops)
                t_end = time.perf_counter()
                step_s, wait_s = t_end - t_data, t_data - t_prev
                t_prev = t_end
                self.iteration += 1
                self.step_in_epoch += 1
                self.train_seconds += step_s + wait_s
                for acc in (sums, window):
                    if math.isfinite(stats["loss"]):  # a skipped step (--nan-policy skip) has no loss to average
                        acc["loss"] += stats["loss"]
                        acc["koleo"] += stats.get("koleo", 0.0)
                        acc["loss_n"] += 1
                    acc["n"] += 1
                    acc["data_wait"] += wait_s
                    acc["step"] += step_s
                ips = self.global_batch / max(step_s + wait_s, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{ips:.0f}")
                last = stats
                self._epoch_progress = (sums["loss"], sums["loss_n"], last, sums["koleo"])
                planned = False
                if need_plan:
                    calib["n"] += 1
                    if calib["n"] > 2:  # skip warm-up iterations; the ranks agree on the slowest clock
                        calib["t"] = self._agree(calib["t"] + step_s + wait_s)[0]
                    if calib["n"] >= self.CALIBRATION_ITERS or (calib["n"] > 2 and calib["t"] > 20):
                        self._plan_from_budget(calib["t"] / (calib["n"] - 2))
                        need_plan, planned = False, True
                        self._replan_since = (self.iteration, self.train_seconds)
                elif self._replans and self.iteration >= self._replans[0][1]:
                    # speed since the first plan; _plan_from_budget re-predicts the later re-plans from it
                    self._replans.pop(0)
                    since_it, since_s = self._replan_since
                    self._plan_from_budget((self.train_seconds - since_s) / max(self.iteration - since_it, 1),
                                           again=True)
                    planned = True
                if planned:
                    n_this_epoch = min(self.plan.niter_per_ep, self.plan.total_iters - epoch * self.plan.niter_per_ep)
                    bar.total = n_this_epoch
                if cfg.log_every and self.iteration % cfg.log_every == 0:
                    # means over the steps since the last record (the schedules' values: this step's)
                    self.log({"type": "train", "epoch": epoch, "iteration": self.iteration,
                              **{k: v for k, v in stats.items() if k != "skipped"}, "steps": window["n"],
                              **_means(window, self.global_batch, "koleo" in stats)})
                    window = self._log_window = dict.fromkeys(sums, 0)
                fault_kill("kill_after_iteration", self.iteration)  # DINOKIT_FAULT, tests only
                if cfg.save_every_steps and self.iteration % cfg.save_every_steps == 0:
                    self.save()
                    t_prev = time.perf_counter()  # writing a checkpoint is not data wait
                if self._knn_due(epoch_end=False):
                    self.run_knn()
                    t_prev = time.perf_counter()  # the monitor is neither data wait nor training time
                if self._stop_requested(stop):
                    bar.close()
                    self.save()
                    name = signal.Signals(stop.signum).name
                    # one line (the CLI prints it as "dinokit train: stopped: ..."), not a second console line
                    raise Stopped(f"{name} at iteration {self.iteration}, checkpoint saved in {self.out} (epoch "
                                  f"{epoch}); the same command resumes from it", stop.signum)
                if self.step_in_epoch >= n_this_epoch or self.iteration >= self.plan.total_iters:
                    break
            bar.close()
            if self.step_in_epoch < n_this_epoch and self.iteration < self.plan.total_iters:
                raise DinokitError("the data loader ended early (fewer batches than planned)")
            self.epoch += 1
            self.step_in_epoch = 0
            # loss: the epoch's mean (from the checkpoint's sums when resumed mid-epoch); throughput over this
            # process's steps of the epoch, None when none ran here (stopped on its last iteration)
            record = {"type": "epoch", "epoch": epoch, "iteration": self.iteration,
                      "lr": last.get("lr"), "wd": last.get("wd"),
                      "momentum": last.get("momentum"), "teacher_temp": last.get("teacher_temp"),
                      **_means(sums, self.global_batch, "koleo" in last),
                      "train_minutes": self.train_seconds / 60, "skipped_steps": self.skipped_steps,
                      "skipped_images": _skipped_images(self.dataset)}
            diagnostics = self._collapse_diagnostics(all_processes=True)
            if diagnostics:
                record.update(diagnostics)
                if record["epoch"] >= 1 and not getattr(self, "_collapse_warned", False) and (
                        record["teacher_entropy"] > 0.98 * record["entropy_max"] or record["distinct_prototypes"] <= 1):
                    self._collapse_warned = True  # once per run; every epoch record keeps the diagnostics
                    self._warn("the run looks collapsed (teacher targets uniform or one prototype); try a lower "
                               "--teacher-temp, a higher --momentum-teacher, or a longer --freeze-last-layer")
            if record["data_wait_frac"] is not None:
                self._hint_if_data_bound(record["data_wait_frac"])
            self.log(record)
            lr_s = f"{record['lr']:.2e}" if record["lr"] is not None else "n/a"
            loss_s = f"{record['loss']:.4f}" if record["loss"] is not None else "n/a"
            ips = f"{record['images_per_s']:.0f}" if record["images_per_s"] is not None else "n/a"
            self._log_console(f"epoch {epoch}: loss {loss_s}, {ips} img/s, lr {lr_s}")
            if record["loss"] is None:
                self._warn(f"every step of epoch {epoch} had a non-finite loss and was skipped (--nan-policy skip): "
                           "nothing was learnt; try a lower --lr or --precision fp32")
            if self._knn_due(epoch_end=True):
                self.run_knn(epoch)  # the epoch that just ended
            numbered = bool(cfg.saveckp_freq) and epoch % cfg.saveckp_freq == 0
            self.save(numbered=numbered)
        if self.main and self._tb is not None:
            self._tb_write(None)
        return {"rank": self.rank, "epochs": self.epoch, "iterations": self.iteration,
                "train_minutes": self.train_seconds / 60,
                "images_per_second": self.iteration * self.global_batch / max(self.train_seconds, 1e-9)}


def _means(sums: dict, global_batch: int, koleo: bool) -> dict[str, float | None]:
    """A log record's means over the steps ``sums`` adds up: loss (and the unweighted KoLeo term, which "loss"
    includes weighted) over the finite steps, images/s and the fraction of time spent waiting for data."""
    elapsed = sums["step"] + sums["data_wait"]
    means = {"loss": sums["loss"] / sums["loss_n"] if sums["loss_n"] else None,
             "images_per_s": global_batch * sums["n"] / max(elapsed, 1e-9) if sums["n"] else None,
             "data_wait_frac": sums["data_wait"] / max(elapsed, 1e-9) if sums["n"] else None}
    if koleo:
        means["koleo"] = sums["koleo"] / sums["loss_n"] if sums["loss_n"] else None
    return means


def _state_mismatch(expected: dict, found: dict, limit: int = 3) -> str:
    """The first keys/shapes where a checkpoint's state dict differs from the model's (for error messages)."""
    shapes = [f"{k} {tuple(found[k].shape)} in the checkpoint, {tuple(v.shape)} here" for k, v in expected.items()
              if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)]
    parts = []
    for name, items in (("shape mismatch", shapes), ("missing from the checkpoint", [k for k in expected
                                                                                   if k not in found]),
                        ("not in this model", [k for k in found if k not in expected])):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{name}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def _skipped_images(dataset=None) -> int:
    """Unreadable images skipped by this run's data set (workers included), else by this process."""
    try:
        if hasattr(dataset, "count_skipped"):
            return int(dataset.count_skipped())
        from .data import count_skipped

        return int(count_skipped())
    except Exception:
        return 0


def _version() -> str:
    from . import __version__

    return __version__


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train DINO with ``cfg`` (resuming from ``cfg.output_dir`` when a checkpoint is there)."""
    trainer = None
    try:
        trainer = Trainer(cfg)  # a refusal while it is built (e.g. the ranks disagree) also ends the process group
        return trainer.fit()
    finally:
        D.cleanup()
        # free the models (DDP/FSDP state that may hold gloo work) now, not during interpreter finalisation,
        # where releasing such objects can abort the process after a finished run
        del trainer
        gc.collect()


if os.environ.get("DINOKIT_DETERMINISTIC", "0") not in ("", "0"):
    # deterministic kernels only (an op without one raises); cuBLAS needs a fixed workspace for that
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
