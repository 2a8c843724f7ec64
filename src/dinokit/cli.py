"""``dinokit`` command line: ``dinokit <command> [options]``; ``dinokit <command> --help`` documents each.

Each command lives in ``dinokit/commands/<name>.py`` exposing ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Commands are imported lazily so ``dinokit --help`` is fast. User errors
(:class:`dinokit.errors.DinokitError`) print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from .console import eprint
from .errors import DinokitError

# command name -> module under dinokit.commands (a missing module is simply not offered)
COMMANDS: dict[str, str] = {
    "train": "train",
    "knn": "knn",
    "linear": "linear",
    "features": "features",
    "attention": "attention",
    "attention-video": "attention_video",
    "export": "export",
    "report": "report",
    "shard": "shard",
    "submit": "submit",
    "davis": "davis",
    "retrieval": "retrieval",
    "copydetect": "copydetect",
}


def _load(name: str):
    try:
        return importlib.import_module(f"dinokit.commands.{COMMANDS[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"dinokit.commands.{COMMANDS[name]}":
            return None
        raise


class _Parser(argparse.ArgumentParser):
    """argparse whose errors exit with code 2 and one line (no usage dump clutter beyond argparse's own)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="dinokit", description="DINO self-supervised ViT pretraining and evaluation.")
    parser.add_argument("--version", action="version", version=f"dinokit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        mod = _load(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


@contextlib.contextmanager
def one_line_warnings(prog: str):
    """dinokit's own warnings (messages starting ``dinokit: ``) as one line ``<prog>: warning: ...``
    instead of Python's ``file:line: UserWarning: ...`` plus a source line; other libraries' warnings unchanged.
    Only the formatting changes (``warnings.formatwarning``), so warnings stay filterable and recordable."""
    original = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        text = str(message)
        if text.startswith("dinokit: "):
            return f"{prog}: warning: {text[len('dinokit: '):]}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = original


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command other than ``train`` (which stops itself with a checkpoint): raised like Ctrl-C's
    KeyboardInterrupt, so what the command cleans up on an interruption (partial shards, staged outputs,
    temporary files) is cleaned up on ``kill`` too; the process then exits 143."""


@contextlib.contextmanager
def _sigterm_interrupts(enabled: bool):
    import signal

    def handle(signum, frame):
        raise Terminated()

    old = None
    try:  # only Python's default handling is taken over: a launcher's or host program's handler is theirs
        if enabled and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            old = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (the CLI called from a thread): leave the signal alone
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _message(e: BaseException) -> str:
    """The error's own message. An exception raised in a DataLoader worker is re-raised in the main process
    with "Caught X in DataLoader worker process N" and the worker's traceback as its text: keep the last line,
    the original message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        name = type(e).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
                 "Socket Timeout")


def _peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is what a process of a multi-process job sees when another process ended (its collective's
    partner went away): torch.distributed's own error types, or the RuntimeError a gloo/NCCL transport raises."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return False
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_FAILURE)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # a path the console's encoding cannot show must not end the command
        try:  # after its work ("wrote ..." to an ASCII or Latin-1 terminal raised UnicodeEncodeError)
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # None, closed, or not a text stream (pytest's capture)
            pass
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would name the top-level "dinokit"; the subcommand's parser names itself
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        sub = subs[0].choices.get(getattr(args, "command", None)) if subs else None
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with one_line_warnings(f"dinokit {args.command}"), _sigterm_interrupts(args.command != "train"):
            return int(args._run(args) or 0)
    except DinokitError as e:
        if not (getattr(e, "label", "") == "stopped" and os.environ.get("RANK", "0") != "0"):  # every rank stops
            eprint(f"dinokit {args.command}: {getattr(e, 'label', 'error')}: {_message(e)}")
        return e.exit_code
    except Terminated:
        eprint(f"dinokit {args.command}: terminated (SIGTERM)")
        return 143
    except KeyboardInterrupt:
        eprint(f"dinokit {args.command}: interrupted")
        return 130
    except OSError as e:  # the file system refused (permissions, a folder where a file goes, a full disk, ...)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        eprint(f"dinokit {args.command}: error: {e.strerror or e}{where}")
        return 1
    except Exception as e:
        if not _peer_failed(e):
            raise
        # e.g. rank 0 refused the output folder and exited: the others only see their collective fail
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        eprint(f"dinokit {args.command}: error: another process of this job stopped (its own message says why); "
               f"rank {os.environ.get('RANK', '?')} stopped too ({first[:200]})")
        return 2


if __name__ == "__main__":
    sys.exit(main())
