"""User-facing errors. Anything raised as :class:`DinokitError` is printed by the CLI as one line
``dinokit: error: <message>`` with a non-zero exit code (2 for bad input/options), never a traceback."""

from __future__ import annotations

__all__ = ["DinokitError", "ConfigError", "DataError", "CheckpointError"]


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
