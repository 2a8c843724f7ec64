"""User-facing errors. Anything raised as :class:`DinokitError` is printed by the CLI as one line
``dinokit: error: <message>`` with a non-zero exit code (2 for bad input/options), never a traceback."""

from __future__ import annotations

import errno

__all__ = ["DinokitError", "ConfigError", "DataError", "CheckpointError", "write_failed", "is_runtime_write_error"]


class DinokitError(Exception):
    """A problem the user can fix (bad path, option, file). ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(DinokitError, ValueError):
    """Unknown/ill-typed option, impossible crop size, bad YAML."""

    exit_code = 2


class DataError(DinokitError):
    """Missing/empty data directory, no readable image."""

    exit_code = 2


class CheckpointError(DinokitError):
    """A file that is not a (safe) checkpoint, or one for another architecture."""

    exit_code = 2


#: write errors of the machine, not of the path the user gave: a full disk or quota, a failing device
_RUNTIME_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


def write_failed(path, e: OSError, bad_input: type[DinokitError] | None = None) -> DinokitError:
    """The error for a result that could not be written to ``path``: exit 1 (a runtime failure, as the docs'
    exit codes say) for a full disk or an I/O error, else ``bad_input`` (default :class:`DataError`, exit 2:
    a folder that refuses files, a path through a file, ...)."""
    return (DinokitError if is_runtime_write_error(e) else (bad_input or DataError))(
        f"cannot write {path}: {e.strerror or e}")


def is_runtime_write_error(e: OSError) -> bool:
    """A full disk or quota, an I/O error (safetensors' errors carry no errno but end "(os error N)")."""
    import re

    code = e.errno
    if code is None and (m := re.search(r"os error (\d+)", str(e))):
        code = int(m.group(1))
    return code in _RUNTIME_WRITE_ERRORS
