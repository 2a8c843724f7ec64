"""Training checkpoints: written atomically (temp file, flush, fsync, rename, fsync dir), loaded with
``torch.load(weights_only=True)`` only, numbered copies rotated, corrupt files reported and skipped.

Fault injection for tests (see docs/reliability.md): ``DINOKIT_FAULT=kill_during_save:N`` SIGKILLs the process
after writing half of its N-th checkpoint temp file; ``DINOKIT_FAULT=kill_after_iteration:K`` SIGKILLs the
trainer right after iteration K (before that iteration's checkpoint, if any); ``term_after_iteration:K`` sends
it SIGTERM there instead (the graceful stop of :meth:`dinokit.trainer.Trainer.fit`).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import re
import signal
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "find_resume_checkpoint", "rng_state", "set_rng_state",
           "rotate_checkpoints", "remove_stale_temp_files", "lock_output_dir", "probe_write", "can_create_in",
           "write_text_atomic"]

_NUMBERED = re.compile(r"^checkpoint(\d+)\.pth$")
_TEMP = re.compile(r"^\.checkpoint\d*\.pth\..+\.tmp$")  # save_checkpoint's mkstemp names
_SAVES = [0]  # checkpoint writes in this process (for DINOKIT_FAULT=kill_during_save:N)


def fault_kill(point: str, n: int) -> None:
    """SIGKILL this process if ``DINOKIT_FAULT`` is ``<point>:<n>`` (test-only fault injection); the same point
    named ``term_...`` instead of ``kill_...`` sends SIGTERM (a graceful stop)."""
    name, _, arg = os.environ.get("DINOKIT_FAULT", "").partition(":")
    if not (arg.strip().isdigit() and int(arg) == n):
        return
    sig = {point: signal.SIGKILL, point.replace("kill_", "term_", 1): signal.SIGTERM}.get(name)
    if sig is not None:
        os.kill(os.getpid(), sig)


class _Writer:
    """Write-through wrapper remembering an ``OSError`` (ENOSPC, EIO) from ``write``: ``torch.save`` may turn it
    into an unrelated ``RuntimeError`` ("unexpected pos"), which would lose the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


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


def process_umask() -> int:
    """This process's umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_like_new_file(path: str | Path) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` would have (0666 less the umask). Files made by
    ``tempfile.mkstemp`` (and safetensors' writer) are 0600, which hides checkpoints and exports from the other
    users of a shared cluster."""
    try:
        os.chmod(path, 0o666 & ~process_umask())
    except OSError:
        pass


def _replace_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to ``.NAME.tmp`` beside ``path``, then rename it onto ``path``: a crash leaves the previous
    file whole, and a hard link to ``path`` keeps its old content; a failed write (a full disk) leaves no
    temporary file behind. ``OSError`` is the caller's to report."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        chmod_like_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`_replace_atomically`)."""
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically, readable as a plain new file is (safetensors makes
    0600 files); its I/O errors (``SafetensorError``, e.g. a full disk) raise as ``OSError``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise OSError(str(e).strip().splitlines()[0]) from None

    _replace_atomically(path, write)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a crash at any byte leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    _SAVES[0] += 1
    try:
        with os.fdopen(fd, "wb") as f:
            if os.environ.get("DINOKIT_FAULT", "").startswith("kill_during_save:"):
                buf = io.BytesIO()
                torch.save(state, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                fault_kill("kill_during_save", _SAVES[0])
                f.write(buf.getvalue()[len(buf.getvalue()) // 2:])
            else:
                w = _Writer(f)
                try:
                    torch.save(state, w)
                except RuntimeError:
                    if w.error is not None:
                        raise w.error from None
                    raise
            f.flush()
            os.fsync(f.fileno())
        chmod_like_new_file(tmp)
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
    from .weights import _other_format

    kind = _other_format(path)  # what a file that cannot be a checkpoint is, before the unpickler says "operand"
    if kind:
        raise CheckpointError(f"{path} is not a dinokit training checkpoint: it is {kind}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as e:  # weights_only refused a global: loading it could run code
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                    type(e).__name__)
        raise CheckpointError(f"refusing checkpoint {path}: it holds objects other than tensors and plain "
                              f"containers, and unpickling it could run code ({what})") from None
    except Exception as e:  # truncated zip, bad magic number, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: truncated or corrupt ({first})") from None
    if not isinstance(obj, dict) or "student" not in obj:
        raise CheckpointError(f"{path} is not a dinokit training checkpoint (no 'student' entry)")
    return obj


def checkpoint_candidates(output_dir: str | Path) -> list[Path]:
    """The checkpoints of a run, in the order a resume tries them: ``checkpoint.pth``, then the numbered
    ``checkpointNNNN.pth``, newest first."""
    out = Path(output_dir)
    main = [out / "checkpoint.pth"] if (out / "checkpoint.pth").exists() else []
    return main + sorted((p for p in out.glob("checkpoint*.pth") if _NUMBERED.match(p.name)),
                         key=lambda p: int(_NUMBERED.match(p.name).group(1)), reverse=True)


def find_resume_checkpoint(output_dir: str | Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest loadable checkpoint in ``output_dir``: ``checkpoint.pth`` first, then numbered ones, newest
    first. Unusable files (truncated, corrupt, refused as unsafe) are reported (warning naming the file) and
    skipped. If there are checkpoints but none is usable, :class:`CheckpointError` names them: starting afresh
    would overwrite a file the user may still want, so they must move it away first."""
    out = Path(output_dir)
    errors = []
    for cand in checkpoint_candidates(out):
        try:
            return load_checkpoint(cand), cand
        except CheckpointError as e:
            warnings.warn(f"dinokit: skipping unusable checkpoint: {e}", stacklevel=2)
            errors.append(str(e))
    if errors:
        more = f" (and {len(errors) - 1} more unusable, see the warnings)" if len(errors) > 1 else ""
        raise CheckpointError(f"no usable checkpoint in {out}: {errors[0]}{more}. Not starting afresh over it: "
                              f"move {'them' if more else 'it'} away or use another --output-dir")
    return None, None


LOCK_NAME = ".dinokit.lock"
_HELD: dict[str, list] = {}  # lock path -> [open lock file, holders in this process]


def refuse_dangling_link(folder: str | Path, what: str, advice: str) -> None:
    """:class:`ConfigError` for an output folder that is a symbolic link to nowhere (``mkdir`` says only "File
    exists"): ``what`` names it (``output directory OUT``, ``--out OUT``), ``advice`` what to give instead."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(f"{what} is a symbolic link to {os.readlink(folder)}, which does not exist: create its "
                          f"target or give another {advice}")


def probe_write(folder: str | Path) -> None:
    """Create and remove a temporary file in ``folder``; raises the ``OSError`` of a folder that refuses new files.
    Trying is the only reliable test: permission bits say nothing for root or for file systems such as /proc. The
    file has its own name, so runs probing the same folder at once do not remove each other's."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".dinokit-write-test-")
    os.close(fd)
    os.unlink(name)


def can_create_in(folder: str | Path) -> bool:
    """Whether a new file can be created in ``folder`` (:func:`probe_write`)."""
    try:
        probe_write(folder)
    except OSError:
        return False
    return True


def lock_output_dir(output_dir: str | Path) -> Callable[[], None]:
    """Take ``output_dir``'s run lock and return the function that releases it.

    Two runs writing one output directory would overwrite each other's checkpoints and logs (and the second would
    delete the first's checkpoint being written, as a killed run's leftover). The lock is a POSIX record lock
    (``lockf``) on ``OUTPUT/.dinokit.lock``, which holds the holder's pid, host and start time: the kernel drops it
    when the process ends however it ends (no stale lock after a crash or ``SIGKILL``), forked data-loader
    workers do not inherit it, and network file systems with lock support honour it. Within one process the
    lock is shared (several ``Trainer`` objects on one directory, as tests and notebooks make). Raises
    :class:`ConfigError` naming the other run when another process holds it; where the file system refuses
    locks, or ``fcntl`` does not exist (Windows), the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return lambda: None
    path = Path(output_dir).resolve() / LOCK_NAME
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        f = open(path, "a+")  # noqa: SIM115 - held open while the run lives
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # no lock support here: go on unlocked
                return lambda: None
            raise ConfigError(f"output directory {output_dir} is in use by another dinokit run "
                              f"({holder or 'holder unknown'}): wait for it to end or stop it, or use another "
                              f"--output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        _HELD[key] = [f, 1]
    released = [False]

    def release() -> None:
        if released[0]:
            return
        released[0] = True
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                entry[0].close()  # closing the file drops the lock

    return release


def remove_stale_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete temp files left by a checkpoint write that was killed (they are never loaded)."""
    out = Path(output_dir)
    stale = [p for p in out.glob(".checkpoint*.tmp") if _TEMP.match(p.name)] if out.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
