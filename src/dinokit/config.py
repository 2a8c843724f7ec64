"""Training configuration: one dataclass holding every option of the reference ``main_dino.py`` (same names)
plus dinokit's own, YAML files, ``--set key=value`` overrides that reject unknown keys, and validation.

Precedence: dataclass defaults < ``--config`` YAML < explicit command-line flags < ``--set`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

__all__ = ["TrainConfig", "ALIASES", "load_yaml", "builtin_configs", "resolve_config", "apply_overrides",
           "parse_set_items", "config_to_dict"]

#: other names of options (as the command line's --data / --batch-size), usable as YAML keys and --set keys too
ALIASES = {"data": "data_path", "batch_size": "batch_size_per_gpu"}


def _f(default, help: str, choices: tuple | None = None, **kw):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------------------
    arch: str = _f("vit_small", "Backbone: vit_tiny | vit_small | vit_base | vit_custom (set embed_dim, depth, "
                   "num_heads) | a torchvision model name (resnet50, ...) | timm:<name>.")
    patch_size: int = _f(16, "ViT patch size. Smaller patches (8) give better features at ~4x the cost; the "
                         "reference advises fp32 rather than fp16 below 16.")
    embed_dim: int = _f(192, "vit_custom only: token width.")
    depth: int = _f(12, "vit_custom only: number of blocks.")
    num_heads: int = _f(3, "vit_custom only: attention heads.")
    drop_path_rate: float = _f(0.1, "Stochastic depth of the student (the teacher has none).")
    out_dim: int = _f(65536, "K, the head's output dimension (prototypes). Large K (65536) helps on ImageNet; "
                      "small data sets want a few thousand.")
    norm_last_layer: bool = _f(True, "Freeze the weight-norm gain of the head's last layer at 1. True is more "
                               "stable (use it for ViT-B and CNNs); False can give better features for ViT-S.")
    use_bn_in_head: bool = _f(False, "BatchNorm after the head's hidden layers (the reference's ResNet option).")
    head_hidden_dim: int = _f(2048, "Hidden width of the head MLP.")
    head_bottleneck_dim: int = _f(256, "Bottleneck width before the L2-normalised last layer.")
    head_nlayers: int = _f(3, "Linear layers in the head MLP.")
    # --- teacher and loss ------------------------------------------------------------------------------
    momentum_teacher: float = _f(0.996, "Starting EMA momentum of the teacher, raised to momentum_teacher_end by a "
                                 "cosine. Higher (0.9995) for small batches such as 256; lower (0.99-0.98) for "
                                 "very short runs.")
    momentum_teacher_end: float = _f(1.0, "Final EMA momentum (the reference uses 1).")
    warmup_teacher_temp: float = _f(0.04, "Teacher temperature at epoch 0. Lower if training does not start.")
    teacher_temp: float = _f(0.04, "Teacher temperature after warm-up. Above 0.07 is unstable; 0.04 is safe.")
    warmup_teacher_temp_epochs: int = _f(0, "Epochs of linear teacher-temperature warm-up (30 in the boosted "
                                         "recipe).")
    student_temp: float = _f(0.1, "Student temperature (the reference hard-codes 0.1).")
    center_momentum: float = _f(0.9, "Momentum of the centre of teacher outputs (reference 0.9).")
    centering: str = _f("centering", "How the teacher's targets are balanced: centering (the paper: a running "
                        "centre subtracted before the softmax) | sinkhorn_knopp (DINOv2: Sinkhorn-Knopp "
                        "normalisation of each batch, every prototype used equally).",
                        choices=("centering", "sinkhorn_knopp"))
    sinkhorn_iterations: int = _f(3, "Sinkhorn-Knopp iterations (centering: sinkhorn_knopp; DINOv2 uses 3).")
    koleo_loss_weight: float = _f(0.0, "Weight of the KoLeo regulariser on the student's CLS features of each "
                                  "global crop (DINOv2 uses 0.1); 0 = off, the paper's DINO.")
    # --- optimisation ----------------------------------------------------------------------------------
    optimizer: str = _f("adamw", "adamw (ViT default) | sgd (ResNet recipe) | lars.",
                        choices=("adamw", "sgd", "lars"))
    lr: float = _f(0.0005, "Peak learning rate for a global batch of 256; scaled linearly by the real global "
                   "batch. Lower it first if the loss turns NaN.")
    min_lr: float = _f(1e-6, "Final learning rate of the cosine (not scaled).")
    warmup_epochs: float = _f(10, "Linear learning-rate warm-up from 0 (epochs; may be fractional). A run "
                                  "shorter than its warm-up warms up over its first 10% instead.")
    weight_decay: float = _f(0.04, "Starting weight decay (cosine to weight_decay_end).")
    weight_decay_end: float = _f(0.4, "Final weight decay.")
    clip_grad: float = _f(3.0, "Per-parameter gradient-norm ceiling; 0 disables. 0.3-1.0 helps large ViTs "
                          "stay stable.")
    freeze_last_layer: int = _f(1, "Epochs during which the head's last layer is not updated; 1 stabilises the "
                                "start, more if the loss does not fall.")
    batch_size_per_gpu: int = _f(64, "Images per process (each image gives 2 + local_crops_number crops).")
    epochs: int = _f(100, "Training epochs (with time_budget_minutes > 0, planned from the budget instead).")
    # --- augmentation ----------------------------------------------------------------------------------
    global_crops_scale: tuple[float, float] = _f((0.4, 1.0), "Area range of the 2 global crops. (0.14, 1) "
                                                 "without multi-crop.")
    local_crops_number: int = _f(8, "Number of small local crops; 0 disables multi-crop.")
    local_crops_scale: tuple[float, float] = _f((0.05, 0.4), "Area range of the local crops.")
    global_crop_size: int = _f(224, "Global crop side in pixels (must be divisible by the patch size).")
    local_crop_size: int = _f(96, "Local crop side in pixels (<= global_crop_size, divisible by the patch).")
    fast_augment: bool = _f(False, "Augment whole uint8 batches with tensor ops (same distribution, far faster "
                            "for small images; used for tensor data sets such as Fashion-MNIST).")
    gpu_augment: bool = _f(False, "With fast_augment: run the batched augmentation on the training device.")
    augment_impl: str = _f("fast", "Per-image multi-crop for folders of photos and shards: fast "
                           "(dinokit.fast_augment: the reference's parameter distributions, tested; JPEG draft "
                           "decoding, OpenCV uint8 colour ops; about 3.7x the reference's images/s per worker, 8.5x on "
                           "2000x1500 photos) | reference (the reference's PIL chain, torchvision transforms); see "
                           "docs/benchmarks.md.", choices=("fast", "reference"))
    blur_prob: tuple[float, float, float] = _f((1.0, 0.1, 0.5), "Gaussian-blur probability for global 1, "
                                               "global 2, locals (reference 1.0 / 0.1 / 0.5).")
    solarize_prob: float = _f(0.2, "Solarisation probability of global crop 2 (reference 0.2).")
    # --- data and run ----------------------------------------------------------------------------------
    data_path: str = _f("", "Training images: a folder tree (class sub-folders optional; labels ignored), "
                        "fashion-mnist:<dir-with-idx-files>, or tar shards 'DIR/{000000..000099}.tar' "
                        "(see dinokit shard).")
    output_dir: str = _f(".", "Where log.jsonl, config.yaml and checkpoints go; training resumes from "
                         "output_dir/checkpoint.pth automatically.")
    saveckp_freq: int = _f(20, "Keep an extra checkpointNNNN.pth every N epochs (0: never).")
    save_every_steps: int = _f(0, "Also checkpoint every N iterations (mid-epoch resume); 0: end of epoch only.")
    keep_last: int = _f(0, "Keep only the K newest numbered checkpoints (0: keep all).")
    seed: int = _f(0, "Random seed (torch, numpy, python and every augmentation stream).")
    num_workers: int = _f(-1, "DataLoader worker processes per training process; -1 (auto): the reference's 10, "
                          "at most one per CPU available to the process. The crops do not depend on it; for tar "
                          "shards the batch order does (resume with the same value).")
    device: str = _f("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N.")
    precision: str = _f("auto", "auto (bf16 autocast where the hardware has native bf16: GPUs, CPUs with "
                        "AVX512-BF16 or AMX; else fp32) | fp32 | bf16 | fp16 (GPU, with a gradient scaler). "
                        "Use fp32 first if the loss becomes NaN. fp32 on AMD "
                        "x86 CPUs runs the linear layers through oneDNN (about 2x MKL there; "
                        "DINOKIT_ONEDNN_LINEAR=0/1 forces it off/on).",
                        choices=("auto", "fp32", "bf16", "fp16"))
    use_fp16: bool | None = _f(None, "Reference flag: true = precision fp16, false = precision fp32. Together with "
                               "a precision other than auto it must agree with it (else an error).")
    compile: bool = _f(False, "torch.compile the student and teacher (same maths; with drop path the compiled "
                               "random draws differ from eager ones, so a run is not bitwise the eager run).")
    grad_checkpointing: bool = _f(False, "Activation checkpointing in the student ViT (less memory, ~27% more time "
                                         "per step).")
    fsdp: bool = _f(False, "Shard the student and teacher with FSDP2 (fully_shard per ViT block) instead of DDP "
                    "when world > 1: parameters, gradients and optimiser state split over the ranks. No BatchNorm.")
    loss_chunk_pairs: bool = _f(True, "Evaluate the loss crop by crop with a hand-written backward: the same values "
                                "(to rounding), ~2.5x less peak memory in the loss and faster; false = plain "
                                "autograd over all crop pairs.")
    time_budget_minutes: float = _f(0.0, "If > 0, plan the run (and all schedules) to end after this many "
                                    "minutes of training: timed on the first iterations, re-planned at 10, 30 "
                                    "and 60 percent of the budget from the measured speed (all ranks agree on "
                                    "the slowest).")
    nan_policy: str = _f("stop", "On a non-finite loss: stop (keep the last good checkpoint) | skip the step.",
                         choices=("stop", "skip"))
    log_every: int = _f(20, "Log a JSON line every N iterations (loss, images/s, data wait: means over those "
                        "steps; plus one per epoch); 0: only the per-epoch lines.")
    knn_every: int = _f(0, "Online k-NN monitor every N epochs (0: off); needs knn_train/knn_val.")
    knn_every_minutes: float = _f(0.0, "Online k-NN monitor every M minutes of training (0: off).")
    knn_train: str = _f("", "Labelled data for the online k-NN bank (folder with class sub-folders or "
                        "fashion-mnist:<dir>).")
    knn_val: str = _f("", "Labelled data the online k-NN classifies.")
    knn_subset: int = _f(10000, "Use at most this many images from each of knn_train / knn_val online.")
    report: bool = _f(False, "Write OUT/report.html at each checkpoint.")
    dist_url: str = _f("env://", "init_method for torch.distributed (torchrun sets the environment).")
    local_rank: int = _f(0, "Ignored (kept for the old launcher); torchrun sets LOCAL_RANK.")

    # ---------------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        def bad(msg: str):
            raise ConfigError(msg)

        from .models.registry import _REGISTRY, list_backbones

        arch = self.arch.replace("deit", "vit", 1) if isinstance(self.arch, str) else self.arch
        if isinstance(arch, str) and not (arch in _REGISTRY or (arch.startswith("timm:") and arch[5:])
                                          or arch in list_backbones()):  # torchvision's names: imported only now
            close = difflib.get_close_matches(arch, list_backbones(), n=3)
            bad(f"unknown architecture {self.arch!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                         "; see dinokit train --help (arch)"))
        types = _field_types()
        for f in fields(self):  # a config built in Python: flags, YAML and --set values are already typed
            value, typ = getattr(self, f.name), types[f.name]
            try:  # numpy numbers become Python's (config.yaml's writer refuses numpy scalars)
                setattr(self, f.name, _as_type(value, typ))
            except TypeError:
                kind = (f"{len(get_args(typ))} numbers" if get_origin(typ) is tuple
                        else _KIND.get(typ, str(typ).replace("typing.", "")))
                bad(f"{f.name} must be {kind}, got {value!r}")

        for f in fields(self):  # the choices argparse enforces on flags, also for YAML and --set values
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        for f in fields(self):  # NaN slips through comparisons such as `x < 0`; no float option gives inf a meaning
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple)
                                                                           else (value,))):
                bad(f"{f.name} must be {'finite numbers' if isinstance(value, tuple) else 'a finite number'}, got "
                    f"{value}")

        def at_least(name: str, lo: float, note: str = ""):
            v = getattr(self, name)
            if not v >= lo:  # also refuses NaN
                bad(f"{name} must be >= {lo}{note}, got {v}")

        if not self.output_dir.strip():
            bad("output_dir is empty: name the folder for log.jsonl and checkpoints (e.g. --output-dir runs/dino)")
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "head_hidden_dim", "head_bottleneck_dim",
                     "head_nlayers"):
            at_least(name, 1)
        if self.arch == "vit_custom" and self.embed_dim % self.num_heads:
            bad(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}) for vit_custom")
        if not 0 <= self.drop_path_rate < 1:
            bad(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        for name in ("lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "freeze_last_layer",
                     "warmup_teacher_temp_epochs", "time_budget_minutes", "knn_every", "knn_every_minutes"):
            at_least(name, 0)
        at_least("knn_subset", 0, " (0: every image)")
        if not 0 <= self.solarize_prob <= 1 or not all(0 <= p <= 1 for p in self.blur_prob):
            bad(f"blur_prob and solarize_prob must be probabilities in [0, 1], got {tuple(self.blur_prob)} and "
                f"{self.solarize_prob}")
        if not 0 <= self.seed < 2**32:
            bad(f"seed must be in [0, 2**32 - 1] (numpy's range), got {self.seed}")
        if self.batch_size_per_gpu <= 0:
            bad(f"batch_size_per_gpu must be positive, got {self.batch_size_per_gpu}")
        if self.epochs <= 0:
            bad(f"epochs must be positive, got {self.epochs}")
        if self.local_crops_number < 0:
            bad(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi <= 1):
                bad(f"{name} must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
        if self.global_crop_size <= 0 or self.local_crop_size <= 0:
            bad("crop sizes must be positive")
        if self.local_crops_number > 0 and self.local_crop_size > self.global_crop_size:
            bad(f"local_crop_size ({self.local_crop_size}) is larger than global_crop_size "
                f"({self.global_crop_size})")
        if self.arch.startswith(("vit", "deit")):
            for name, size in self.crop_sizes():
                if size % self.patch_size:
                    bad(f"{name} {size} is not divisible by patch_size {self.patch_size}")
        if self.warmup_teacher_temp_epochs > self.epochs and self.time_budget_minutes <= 0:
            bad(f"warmup_teacher_temp_epochs ({self.warmup_teacher_temp_epochs}) exceeds epochs ({self.epochs})")
        if self.out_dim <= 0:
            bad("out_dim must be positive")
        at_least("clip_grad", 0, " (0: no clipping)")
        for name in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be > 0 (a temperature), got {getattr(self, name)}")
        at_least("sinkhorn_iterations", 1)
        at_least("koleo_loss_weight", 0, " (0: off)")
        if self.koleo_loss_weight > 0 and self.batch_size_per_gpu < 2:
            bad("koleo_loss_weight > 0 needs batch_size_per_gpu >= 2 (each feature needs a nearest neighbour)")
        if self.num_workers < -1:
            bad("num_workers must be >= 0, or -1 (auto)")
        for name in ("keep_last", "save_every_steps", "saveckp_freq", "log_every"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        return self.absorb_use_fp16()

    def absorb_use_fp16(self) -> TrainConfig:
        """The reference's ``use_fp16`` as ``precision`` (fp16 / fp32), then ``None``: config.yaml says it once,
        and a later layer (a flag, ``--set``) may set another precision. Both given in one layer and contradicting:
        :class:`ConfigError`."""
        if self.use_fp16 is not None:
            implied = "fp16" if self.use_fp16 else "fp32"
            if self.precision not in ("auto", implied):
                raise ConfigError(f"use_fp16 {str(self.use_fp16).lower()} (the reference's flag: precision "
                                  f"{implied}) conflicts with precision {self.precision}: drop one of the two")
            self.precision, self.use_fp16 = implied, None
        return self

    def crop_sizes(self) -> list[tuple[str, int]]:
        """``(option, size)`` of the crops the run feeds the backbone: the global crops, and the local ones when
        there are any."""
        sizes = [("global_crop_size", self.global_crop_size)]
        if self.local_crops_number > 0:
            sizes.append(("local_crop_size", self.local_crop_size))
        return sizes

    def notes(self) -> list[str]:
        """Warnings about options that are valid but ignored or risky in this combination (the trainer prints
        each once): e.g. ``embed_dim`` for an architecture other than vit_custom."""
        default = {f.name: f.default for f in fields(self)}
        out = []
        changed = [n for n in ("embed_dim", "depth", "num_heads") if getattr(self, n) != default[n]]
        if changed and self.arch != "vit_custom":
            out.append(f"{'/'.join(changed)} (vit_custom only) ignored: {self.arch} has its own")
        if self.patch_size != default["patch_size"] and not self.arch.startswith(("vit", "deit", "timm:")):
            out.append(f"patch_size ignored: {self.arch} has no patches")
        if self.gpu_augment and not self.fast_augment:
            out.append("gpu_augment ignored: it applies to fast_augment's batched augmentation only")
        if self.sinkhorn_iterations != default["sinkhorn_iterations"] and self.centering != "sinkhorn_knopp":
            out.append(f"sinkhorn_iterations ignored: centering is {self.centering}")
        if self.keep_last and not self.saveckp_freq:
            out.append("keep_last ignored: saveckp_freq 0 writes no numbered checkpoints")
        if self.momentum_teacher_end < self.momentum_teacher:
            out.append(f"momentum_teacher_end {self.momentum_teacher_end} is below momentum_teacher "
                       f"{self.momentum_teacher}: the teacher's EMA momentum will decrease")
        if self.freeze_last_layer > self.epochs > 0 and self.time_budget_minutes <= 0:
            out.append(f"freeze_last_layer {self.freeze_last_layer} > epochs {self.epochs}: the head's last layer "
                       "is never trained")
        if self.teacher_temp > 0.07:
            out.append(f"teacher_temp {self.teacher_temp} is above 0.07, which the paper found unstable")
        return out


@functools.cache
def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


_KIND = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


def _optional_inner(typ: Any) -> Any:
    """``X`` of a field typed ``X | None``; ``None`` for any other type (tuples included)."""
    if get_origin(typ) in (None, tuple) or type(None) not in get_args(typ):
        return None
    (inner,) = [t for t in get_args(typ) if t is not type(None)]
    return inner


def _as_type(value: Any, typ: Any) -> Any:
    """``value`` as a field of type ``typ`` holds it (any integer, numpy's too, is an int; any real number a
    float; a list of the right length a tuple; a bool is not a number), or ``TypeError``."""
    import numbers

    import numpy as np

    origin = get_origin(typ)
    if origin is tuple:
        inner = get_args(typ)
        if not isinstance(value, (tuple, list)) or len(value) != len(inner):
            raise TypeError(value)
        return tuple(_as_type(v, t) for v, t in zip(value, inner))
    if (inner := _optional_inner(typ)) is not None:
        return None if value is None else _as_type(value, inner)
    if isinstance(value, bool) and typ is not bool:
        raise TypeError(value)
    if typ is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if typ is str and isinstance(value, str):
        return str(value)  # numpy's str_ too: config.yaml's writer refuses it
    if typ is float and isinstance(value, numbers.Real):
        return float(value)
    if typ is int and isinstance(value, numbers.Integral):
        return int(value)
    if typ is bool and isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(value)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to the field's type, or raise ConfigError."""
    origin = get_origin(typ)
    optional = _optional_inner(typ) is not None
    if value is None and not optional:  # YAML null / ~, or --set key=null: str(None) would be the text "None"
        kind = f"{len(get_args(typ))} numbers" if origin is tuple else _KIND.get(typ, "a value")
        raise ConfigError(f"option {name!r}: null is not a valid value (expected {kind})")
    try:
        if origin is tuple:
            inner = get_args(typ)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            if not isinstance(value, (list, tuple)) or len(value) != len(inner):
                raise ValueError(f"expected {len(inner)} values")
            return tuple(_coerce(name, v, t) for v, t in zip(value, inner))
        if optional:  # Optional[X]
            if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
                return None
            return _coerce(name, value, _optional_inner(typ))
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected a boolean (true/false, on/off, 1/0)")
        if typ is int:
            return _to_int(value)
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError("expected a number")
            try:
                return float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        if typ is str:
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if not isinstance(value, str):  # YAML read `0755`, `yes`, `12:30`, `1.10` as 493, True, 750, 1.1
                raise ValueError("expected text: quote it in YAML, e.g. '0755'")
            return value
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):  # from an element of a tuple: already names the option and the value
            raise
        raise ConfigError(f"option {name!r}: invalid value {value!r} ({e})") from None
    return value


def _to_int(value: Any) -> int:
    """An integer, also written as an integral float or in scientific notation (2.0, 1e3, '1.5e3'); anything
    fractional, non-finite or not a number raises ValueError("expected an integer")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            value = float(value)
        except ValueError:
            raise ValueError("expected an integer") from None
    if not value.is_integer():  # also inf and nan
        raise ValueError("expected an integer")
    return int(value)


def _option_name(key: str) -> str | None:
    """The field a YAML / ``--set`` key names (dashes or underscores, or an alias such as ``data``), else None."""
    name = key.strip().replace("-", "_")
    name = ALIASES.get(name, name)
    return name if name in _field_types() else None


def _unknown(key: str) -> ConfigError:
    names = [f.name for f in fields(TrainConfig)] + list(ALIASES)
    norm = key.replace("-", "_")
    # the same words in another order (lr_min for min_lr) first, then spellings difflib finds close
    close = [n for n in names if sorted(n.split("_")) == sorted(norm.split("_")) and n != norm]
    close += [n for n in difflib.get_close_matches(norm, names, n=3) if n not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
    return ConfigError(f"unknown option {key!r}{hint}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy of ``cfg`` with ``overrides`` applied (keys with dashes or underscores, or an alias of
    :data:`ALIASES`; a later key for the same option wins); unknown keys and ill-typed values raise
    :class:`ConfigError`."""
    types = _field_types()
    updates = {}
    for key, value in overrides.items():
        name = _option_name(str(key))
        if name is None:
            raise _unknown(str(key))
        updates[name] = _coerce(name, value, types[name])
    return dataclasses.replace(cfg, **updates)


def parse_set_items(items: list[str]) -> dict[str, Any]:
    """``["epochs=300", "global_crops_scale=0.3,1"]`` -> dict; values are parsed as YAML scalars/lists."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        name = _option_name(key)
        typ = _field_types().get(name) if name else None
        base = _optional_inner(typ) or typ
        if base is str or (base in (int, float) and _plain_number(raw)):
            # as written (YAML 1.1 turns 0755 into 493, 010 into 8, yes into True), but null is null and a quoted
            # value is the text inside the quotes
            text = raw.strip()
            quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
            value = (None if base is str and text == "null" else yaml.safe_load(text) if base is str and quoted
                     else text)
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
        for seen in [k for k in out if k == key or (name is not None and _option_name(k) == name)]:
            del out[seen]  # the later item for the same option wins, whatever its spelling
        out[key] = value
    return out


def _plain_number(text: str) -> bool:
    """Digits with an optional sign, point and exponent (what int()/float() read as the user means it)."""
    import re

    return re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text) is not None


def builtin_configs() -> dict[str, Path]:
    """The recipes shipped inside the package (``dinokit/configs/*.yaml``), by name: usable anywhere as
    ``--config NAME`` (the checkout's ``configs/`` folder is the same files)."""
    folder = Path(__file__).resolve().parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config(value: str | Path) -> Path:
    """The YAML file ``--config VALUE`` names: an existing path first, else a built-in recipe by name
    (``vit_small_100ep``, with or without ``.yaml``). A value that is neither is a :class:`ConfigError` naming
    the built-in recipes."""
    p = Path(value).expanduser()
    if p.exists():
        return p
    text = str(value)
    builtin = builtin_configs()
    name = text[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else text
    if "/" not in text and "\\" not in text and name in builtin:
        return builtin[name]
    names = ", ".join(builtin) or "none"
    hint = ""
    if p.name and Path(p.name).stem in builtin:
        hint = f"; the built-in {Path(p.name).stem!r} is used by name: --config {Path(p.name).stem}"
    raise ConfigError(f"config file not found: {value} (built-in recipes, usable by name: {names}){hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # merge keys (<<: *defaults) first, as SafeLoader does
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key: PyYAML's own error
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"option {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as e:  # a key given twice
        raise ConfigError(f"{p}: {e}") from None
    except UnicodeDecodeError as e:
        if b"\0" in p.read_bytes()[:4096]:  # a checkpoint or an image given by mistake
            raise ConfigError(f"config file {p} is not text (a YAML file of option: value was expected)") from None
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]  # ReaderError: no .problem
        raise ConfigError(f"YAML syntax error in {p}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value")
    named: dict[str, str] = {}
    for key in data:  # two spellings of one option (batch_size and batch_size_per_gpu): which did the user mean?
        name = _option_name(str(key))
        if name is not None and name in named:
            raise ConfigError(f"{p}: {named[name]!r} and {key!r} both set the option {name}: keep one")
        if name is not None:
            named[name] = str(key)
    return data


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
