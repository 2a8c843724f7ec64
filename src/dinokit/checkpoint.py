"""Training checkpoints: written atomically (temp file, flush, fsync, rename, fsync dir), loaded with
``torch.load(weights_only=True)`` only, numbered copies rotated, corrupt files reported and skipped."""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "find_resume_checkpoint", "rng_state", "set_rng_state",
           "rotate_checkpoints"]

_NUMBERED = re.compile(r"^checkpoint(\d+)\.pth$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a crash at any byte leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a dinokit training checkpoint with ``weights_only=True`` (no code can run), or raise
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated zip, unpickling refused, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(obj, dict) or "student" not in obj:
        raise CheckpointError(f"{path} is not a dinokit training checkpoint (no 'student' entry)")
    return obj


def find_resume_checkpoint(output_dir: str | Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest loadable checkpoint in ``output_dir``: ``checkpoint.pth`` first, then numbered ones, newest
    first. Corrupt files are reported (warning naming the file) and skipped."""
    out = Path(output_dir)
    candidates = []
    main = out / "checkpoint.pth"
    if main.exists():
        candidates.append(main)
    numbered = sorted((p for p in out.glob("checkpoint*.pth") if _NUMBERED.match(p.name)),
                      key=lambda p: int(_NUMBERED.match(p.name).group(1)), reverse=True)
    candidates += numbered
    for cand in candidates:
        try:
            return load_checkpoint(cand), cand
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}", stacklevel=2)
    return None, None


def rotate_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest ``checkpointNNNN.pth`` files; returns the deleted paths."""
    if keep_last <= 0:
        return []
    out = Path(output_dir)
    numbered = sorted((p for p in out.glob("checkpoint*.pth") if _NUMBERED.match(p.name)),
                      key=lambda p: int(_NUMBERED.match(p.name).group(1)))
    doomed = numbered[:-keep_last]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def rng_state() -> dict[str, Any]:
    """Every RNG the run uses, in a form ``weights_only`` loading accepts (tensors, ints, tuples)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
