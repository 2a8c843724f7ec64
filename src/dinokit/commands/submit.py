"""``dinokit submit``: run ``dinokit train`` on SLURM through submitit, requeued on preemption / time-out."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import ConfigError, DinokitError

HELP = "submit dinokit train to SLURM with submitit (auto-requeue and auto-resume)"
DESCRIPTION = """Submit a multi-node, multi-GPU DINO pretraining job to SLURM through submitit: one task per GPU,
torch.distributed set up from SLURM's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), requeued
on preemption or time-out and resumed from OUTPUT_DIR/checkpoint.pth. Options after `--` are `dinokit train`'s.

examples:
  dinokit submit --nodes 2 --gpus-per-node 8 --partition learnfair --timeout-min 2800 --output-dir /ckpt/dino \\
      -- --data /datasets/imagenet/train --arch vit_small --epochs 100 --batch-size-per-gpu 64 --save-every-steps 1000
  dinokit submit --dry-run --nodes 2 --gpus-per-node 8 --partition P --output-dir OUT -- --data DIR   # print sbatch
  dinokit submit --cluster local --gpus-per-node 0 --output-dir OUT --wait -- --data DIR ...          # this machine

Logs, one .out and one .err per task: OUTPUT_DIR/submitit/<job id>/<job id>_<task>_log.out|err on SLURM,
OUTPUT_DIR/submitit/<job id>_<task>_log.out|err with --cluster local. With --wait, a failed job's error line and
log are printed. OUTPUT_DIR must be on a file system every node sees. Needs submitit: pip install 'dinokit[slurm]'."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR",
                        help="training output (checkpoints, logs; passed to dinokit train) and submitit logs")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    parser.add_argument("--gpus-per-node", "--ngpus", dest="gpus_per_node", type=int, default=8,
                        help="GPUs per node (default: 8)")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="processes per node (default: one per GPU, at least 1)")
    parser.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per process (default: 10)")
    parser.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: 40 per task)")
    parser.add_argument("--timeout-min", "--timeout", dest="timeout_min", type=int, default=2800,
                        help="time limit of each job in minutes (default: 2800)")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--constraint", default=None, help="SLURM constraint, e.g. volta32gb")
    parser.add_argument("--comment", default=None, help="SLURM comment")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--qos", default=None, help="SLURM quality of service")
    parser.add_argument("--exclude", default=None, help="SLURM nodes to exclude")
    parser.add_argument("--job-name", default="dinokit", help="job name (default: dinokit)")
    parser.add_argument("--signal-delay-s", type=int, default=120,
                        help="seconds before the time limit at which SLURM signals the job to requeue (default: 120)")
    parser.add_argument("--max-requeues", type=int, default=30,
                        help="time-outs after which the job is not requeued again (default: 30)")
    parser.add_argument("--setup", action="append", default=[], metavar="CMD",
                        help="shell line run before the job (repeatable), e.g. 'source ~/venv/bin/activate'")
    parser.add_argument("--cluster", default="auto", choices=("auto", "slurm", "local"),
                        help="auto (SLURM when srun exists), slurm, or local (submitit's local executor)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end and print its result")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_OPTIONS",
                        help="dinokit train options")


def _train_argv(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The validated train options after ``--``, with absolute paths, and the paths not found here."""
    argv = list(args.train_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if any(a.split("=")[0] in ("--output-dir", "--output_dir") for a in argv):
        raise ConfigError("give --output-dir to dinokit submit (before --), not to the train options")
    # validate the training options now rather than in the queue
    from ..cli import build_parser
    from .train import config_from_args

    try:
        cfg = config_from_args(build_parser("train").parse_args(["train", *argv, "--output-dir", args.output_dir]))
    except SystemExit as e:  # argparse already printed the problem
        raise ConfigError("invalid train options after --") from e
    if not cfg.data_path:
        raise ConfigError("no training data: add -- --data DIR ... (the train options)")
    return _absolute_paths(argv)


_PATH_OPTIONS = ("--data", "--data-path", "--data_path", "--config", "--knn-train", "--knn_train", "--knn-val",
                 "--knn_val")


def _absolute_paths(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv, missing)``: the train options with local paths made absolute (the job may start in another
    working directory; data specs such as ``fashion-mnist:DIR`` keep their prefix), and those paths that do not
    exist here, as ``"OPTION VALUE"`` (shard brace patterns aside)."""
    out, missing, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in _PATH_OPTIONS and (eq or i + 1 < len(argv)):
            value = value if eq else argv[i + 1]
            absolute = _absolute(name, value, missing)
            out += [f"{name}={absolute}"] if eq else [name, absolute]
            i += 0 if eq else 1
        else:
            out.append(a)
        i += 1
    return out, missing


def _absolute(option: str, value: str, missing: list[str]) -> str:
    if value.strip().lower().replace("_", "-") in ("fashion-mnist", "fashionmnist"):  # found where the job runs
        return value
    head, sep, rest = value.partition(":")
    if sep and len(head) > 1 and "/" not in head and not Path(value).exists():  # a spec: fashion-mnist:DIR
        return f"{head}:{_absolute(option, rest, missing)}" if rest else value
    path = Path(value).expanduser()
    if option == "--config" and not path.exists():
        from ..config import resolve_config

        try:
            resolve_config(value)  # a built-in recipe by name: found where the job runs
            return value
        except ConfigError:
            pass
    if not ("{" in value and value.endswith(".tar")) and not path.exists():
        missing.append(f"{option} {path.absolute()}")
    return str(path.absolute())


def _report_missing(missing: list[str], local: bool) -> None:
    """Paths of the train options that do not exist here: an error for a job on this machine, else a warning
    (a cluster's compute nodes may see file systems the submitting machine does not)."""
    if missing and local:
        raise ConfigError(f"{'; '.join(missing)}: not found (checked before submitting)")
    if missing:
        import warnings

        warnings.warn(f"dinokit: {'; '.join(missing)}: not found on this machine; the compute nodes must see "
                      "it at that path", stacklevel=2)


def run(args: argparse.Namespace) -> int:
    from ..submitit_launcher import SubmitSettings, require_submitit, sbatch_script, submit_training

    require_submitit()
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        raise ConfigError("--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0")
    argv, missing = _train_argv(args)
    out = Path(args.output_dir).expanduser().absolute()
    s = SubmitSettings(output_dir=str(out), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                       timeout_min=args.timeout_min, partition=args.partition, constraint=args.constraint,
                       comment=args.comment, account=args.account, qos=args.qos, exclude=args.exclude,
                       job_name=args.job_name, signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues,
                       setup=args.setup, cluster=args.cluster)
    if not args.dry_run:
        _report_missing(missing, local=args.cluster == "local")
    if args.dry_run:
        print(sbatch_script(s), end="")
        print(f"# job: dinokit train {' '.join(argv)} --output-dir {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    job = submit_training(argv, s)
    world = s.nodes * s.ntasks
    print(f"submitted job {job.job_id}: {s.nodes} node(s) x {s.ntasks} task(s) = world {world}; "
          f"output {out}; logs {_log_folder(job, s.folder)}/{job.job_id}_<task>_log.out|err")
    if not any(a.split("=")[0] in ("--save-every-steps", "--save_every_steps") for a in argv):
        print("hint: add --save-every-steps N to the train options so a requeue redoes at most N steps")
    if args.wait:
        try:
            results = job.results()  # one summary per task; rank 0's is the run's
        except Exception as e:
            raise DinokitError(_job_failure(job, e, s.folder)) from None
        result = next((r for r in results if r.get("rank") == 0), results[0])
        from ..trainer import count_noun

        print(f"job {job.job_id} done: {count_noun(result['epochs'], 'epoch')}, "
              f"{count_noun(result['iterations'], 'iteration')}, "
              f"{result['train_minutes']:.1f} min")
    return 0


_TASK = re.compile(r"\(task[=:] ?(\d+)\)")
_CLI_ERROR = re.compile(r"^dinokit [\w-]+: error: (.*\S)")


def _error_line(text: str) -> str | None:
    """The line of a job's output that says why it failed: dinokit's own ``dinokit train: error: ...`` line
    (its message), else the exception line of the last Python traceback (``module.Error: message``)."""
    lines = text.splitlines()
    for line in reversed(lines):
        m = _CLI_ERROR.match(line.strip())
        if m:
            return m.group(1)
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if starts:
        for line in lines[starts[-1] + 1:]:  # the frames are indented; the exception line is not
            if line.strip() and not line[0].isspace():
                return line.strip()
    return None


def _log_folder(job, folder: Path) -> Path:
    """Where submitit writes the job's logs: ``folder/<job id>`` on SLURM, ``folder`` for the local executor."""
    try:
        return Path(job.paths.folder)
    except Exception:  # not a submitit job (tests)
        return folder


def _task_log(job, task: int) -> Path | None:
    """The stderr log of one task of a submitit job (``OUTPUT_DIR/submitit/<job id>_<task>_log.err``)."""
    try:
        return Path(job.task(task).paths.stderr)
    except Exception:  # not a submitit job (tests), or a task id it does not know
        return None


def _job_failure(job, err: Exception, folder: Path) -> str:
    """One line for a job that failed: the job's own error line, found in submitit's exception (the failed
    task's traceback for ``FailedJobError``, the error stream for ``UncompletedJobError``) or else in the task's
    stderr log, and that log's path. submitit's message ends with the log paths, never with the error."""
    text = str(err)
    m = _TASK.search(text)
    log = _task_log(job, int(m.group(1)) if m else 0)
    line = _error_line(text)
    if line is None and log is not None:
        try:
            line = _error_line(log.read_text(errors="replace"))
        except OSError:
            pass
    if line is None:  # neither a traceback nor an error line: the first line of submitit's message
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    where = f"log: {log}" if log is not None and log.exists() else f"logs in {folder}"
    return f"job {job.job_id} failed: {line} ({where})"
