"""Helpers for the fault-injection tests (tests/test_reliability.py, tests/test_soak.py): run ``dinokit train`` in a
subprocess (optionally with a ``DINOKIT_FAULT`` hook, see dinokit.checkpoint), compare final training states
bitwise, read per-iteration losses from log.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .helpers import TINY_VIT

#: Subprocesses use one thread (same reductions as the in-process tests) and deterministic kernels.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DINOKIT_DETERMINISTIC": "1"}


def train_args(data: Path, out: Path, *extra: str, epochs: int = 3, batch: int = 4) -> list[str]:
    """``dinokit train`` options for a tiny ViT; later options override earlier ones (argparse)."""
    return ["--data", str(data), "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", str(batch),
            "--epochs", str(epochs), "--warmup-epochs", "1", "--saveckp-freq", "1", "--log-every", "1", *extra]


def cli_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DINOKIT_FAULT"}
    env.update(SUBPROCESS_ENV)
    if fault:
        env["DINOKIT_FAULT"] = fault
    return env


def run_cli(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m dinokit train ARGS``; returncode -9 means the fault hook SIGKILLed it."""
    return subprocess.run([sys.executable, "-m", "dinokit", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(fault))


def load_state(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def _equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise equality of everything that determines the rest of a run: student, teacher, optimiser (moments,
    step counts, hyper-parameters), fp16 scaler, DINO centre, epoch/iteration/position and every RNG."""
    for key in ("student", "teacher", "optimizer", "fp16_scaler", "dino_loss", "epoch", "iteration",
                "step_in_epoch", "plan", "skipped_steps", "rng"):
        _equal(a[key], b[key], key)


def iteration_losses(out: Path) -> dict[int, float]:
    """Per-iteration losses from ``out/log.jsonl``. A run killed and resumed redoes the iterations after its last
    checkpoint, so an iteration may be logged more than once: every repeat must carry exactly the same loss."""
    losses: dict[int, float] = {}
    for line in (Path(out) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") != "train":
            continue
        it, loss = int(rec["iteration"]), float(rec["loss"])
        if it in losses:
            assert losses[it] == loss or (loss != loss and losses[it] != losses[it]), (
                f"iteration {it} was redone after a resume with a different loss: {losses[it]!r} then {loss!r}")
        losses[it] = loss
    return losses


def epoch_records(out: Path) -> dict[int, tuple]:
    """Per-epoch (mean loss, lr, wd, momentum, teacher temperature, skipped steps) from ``out/log.jsonl``; an epoch
    logged twice (killed after its record, before its checkpoint) must repeat the same values."""
    keys = ("loss", "lr", "wd", "momentum", "teacher_temp", "skipped_steps")
    epochs: dict[int, tuple] = {}
    for line in (Path(out) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "epoch":
            values = tuple(rec.get(k) for k in keys)
            assert epochs.setdefault(rec["epoch"], values) == values, f"epoch {rec['epoch']} logged differently"
    return epochs


def temp_files(out: Path) -> list[Path]:
    """Checkpoint temp files (``.checkpoint*.pth.*.tmp``) in ``out``."""
    return sorted(Path(out).glob(".checkpoint*.tmp"))
