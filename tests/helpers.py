"""Small generated data for tests (no downloads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

TINY_VIT = ["--arch", "vit_custom", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--patch-size", "8",
            "--global-crop-size", "32", "--local-crop-size", "16", "--local-crops-number", "2", "--out-dim", "64",
            "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--num-workers", "0", "--precision", "fp32",
            "--device", "cpu"]


def make_image_folder(root: Path, n_per_class: int = 6, classes=("a", "b"), size=(40, 36), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.zeros((size[1], size[0], 3), np.uint8)
            base[..., ci % 3] = 200
            noise = rng.integers(0, 55, size=base.shape, dtype=np.uint8)
            Image.fromarray(base + noise).save(d / f"img{i:03d}.png")
    return root


def make_fashion_like(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """IDX files shaped like Fashion-MNIST (28x28 uint8, 10 classes) with class-dependent patterns."""
    from dinokit.data import save_idx

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        imgs = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, lab in enumerate(labels):
            imgs[i, 2 * lab: 2 * lab + 8, 4:24] = 230
        save_idx(root / f"{split}-images-idx3-ubyte.gz", imgs)
        save_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


class OpLog(TorchDispatchMode):
    """Records every ATen call: (overload packet name, output shapes, output dtypes)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((func.overloadpacket.__name__, [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)],
                           [o.dtype for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)


def reference_module():
    """``benchmarks/reference_dino.py``: the reference's modules and training step re-created (student, teacher,
    loss, clipping, optimiser and EMA as ``main_dino`` does them), loaded as a module; skips when absent."""
    import pytest

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_dino.py"
    if not path.exists():
        pytest.skip("benchmarks/reference_dino.py (re-created reference modules) not present")
    spec = importlib.util.spec_from_file_location("reference_dino_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fit_until_interrupted(trainer, iteration: int) -> None:
    """``trainer.fit()`` with a KeyboardInterrupt raised when ``iteration`` steps are done (a crash before the next
    step: what was not checkpointed is lost)."""
    import pytest

    real_step = trainer.train_step

    def step(crops):
        if trainer.iteration == iteration:
            raise KeyboardInterrupt
        return real_step(crops)

    trainer.train_step = step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
