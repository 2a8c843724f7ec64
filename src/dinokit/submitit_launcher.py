"""``dinokit train`` as a submitit job: SLURM (``sbatch`` + ``srun``, one task per GPU) or submitit's local
executor, the way the reference's ``run_with_submitit.py`` launches ``main_dino.py``.

* Each task turns submitit's ``JobEnvironment`` into torchrun's variables (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` = the first node, ``MASTER_PORT`` derived from the job
  id) with ``submitit.helpers.TorchDistributedEnvironment``, then runs the trainer in-process, so
  :func:`dinokit.distributed.init_distributed` sees exactly what ``torchrun`` would give it.
* Preemption or the time limit: SLURM sends ``SIGUSR2`` ``signal_delay_s`` before the end; submitit calls
  :meth:`TrainJob.checkpoint` on global rank 0, which returns the same job for requeueing (at most
  ``max_requeues`` time-outs; preemptions do not count). The requeued job resumes from
  ``OUTPUT_DIR/checkpoint.pth`` like any ``dinokit train`` run, so at most the steps since the last checkpoint
  are redone: use ``--save-every-steps`` for long epochs.

``submitit`` is an optional dependency: ``pip install 'dinokit[slurm]'``.
"""

from __future__ import annotations

import copy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["TrainJob", "SubmitSettings", "require_submitit", "build_executor", "sbatch_script", "submit_training"]


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("dinokit submit needs submitit: pip install 'dinokit[slurm]' (or pip install "
                          "'submitit>=1.5')") from None
    return submitit


class TrainJob:
    """The callable submitit pickles and runs in every task: ``TrainJob(train_argv)()`` trains with the options
    of ``dinokit train`` (``train_argv``) and returns the trainer's summary; checkpointable (requeue)."""

    def __init__(self, train_argv: list[str]):
        self.train_argv = list(train_argv)

    def __call__(self) -> dict[str, Any]:
        submitit = require_submitit()
        # torchrun's variables from SLURM's (or the local executor's); each task keeps every GPU of its node
        # visible and picks cuda:LOCAL_RANK, as under torchrun
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from .cli import build_parser
        from .commands.train import config_from_args
        from .trainer import train

        cfg = config_from_args(build_parser("train").parse_args(["train", *self.train_argv]))
        return train(cfg)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption / time-out: requeue the same job; the trainer resumes on its own."""
        submitit = require_submitit()
        return submitit.helpers.DelayedSubmission(copy.deepcopy(self))


@dataclass
class SubmitSettings:
    output_dir: str
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU (at least one)
    cpus_per_task: int = 10
    mem_gb: float | None = None  # default: 40 GB per task, as the reference
    timeout_min: int = 2800
    partition: str | None = None
    constraint: str | None = None
    comment: str | None = None
    account: str | None = None
    qos: str | None = None
    exclude: str | None = None
    job_name: str = "dinokit"
    signal_delay_s: int = 120
    max_requeues: int = 30
    setup: list[str] = field(default_factory=list)
    cluster: str = "auto"  # auto | slurm | local

    @property
    def ntasks(self) -> int:
        return self.tasks_per_node if self.tasks_per_node else max(self.gpus_per_node, 1)

    @property
    def folder(self) -> Path:
        return Path(self.output_dir) / "submitit"

    def slurm_parameters(self) -> dict[str, Any]:
        p: dict[str, Any] = dict(job_name=self.job_name, nodes=self.nodes, ntasks_per_node=self.ntasks,
                                 gpus_per_node=self.gpus_per_node or None, cpus_per_task=self.cpus_per_task,
                                 mem=f"{int(self.mem_gb if self.mem_gb else 40 * self.ntasks)}GB",
                                 time=self.timeout_min, signal_delay_s=self.signal_delay_s, partition=self.partition,
                                 constraint=self.constraint, comment=self.comment, account=self.account,
                                 qos=self.qos, exclude=self.exclude, setup=list(self.setup) or None)
        return {k: v for k, v in p.items() if v is not None}


def _resolve_cluster(s: SubmitSettings) -> str:
    if s.cluster in ("slurm", "local"):
        return s.cluster
    if s.cluster != "auto":
        raise ConfigError(f"unknown --cluster {s.cluster!r}: use auto, slurm or local")
    import shutil

    if shutil.which("srun") is None:
        raise ConfigError("no SLURM here (srun not found): use --cluster local to run the job on this machine, "
                          "or --dry-run to see the sbatch script")
    return "slurm"


def build_executor(s: SubmitSettings):
    """A configured ``submitit.SlurmExecutor`` or ``submitit.LocalExecutor`` writing to OUTPUT_DIR/submitit."""
    submitit = require_submitit()
    cluster = _resolve_cluster(s)
    if cluster == "local":
        if s.nodes != 1:
            raise ConfigError("the local executor runs on this machine only: use --nodes 1")
        ex = submitit.LocalExecutor(folder=s.folder, max_num_timeout=s.max_requeues)
        ex.update_parameters(timeout_min=s.timeout_min, tasks_per_node=s.ntasks, gpus_per_node=s.gpus_per_node,
                             nodes=1, signal_delay_s=s.signal_delay_s, setup=list(s.setup))
        return ex
    ex = submitit.SlurmExecutor(folder=s.folder / "%j", max_num_timeout=s.max_requeues)
    ex.update_parameters(**s.slurm_parameters())
    return ex


def sbatch_script(s: SubmitSettings) -> str:
    """The sbatch file submitit would write for these settings (``dinokit submit --dry-run``)."""
    require_submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    folder = s.folder / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **s.slurm_parameters())


def submit_training(train_argv: list[str], s: SubmitSettings, job_class: type = TrainJob):
    """Submit ``dinokit train <train_argv> --output-dir OUTPUT_DIR``; returns the submitit job."""
    executor = build_executor(s)
    return executor.submit(job_class([*train_argv, "--output-dir", str(s.output_dir)]))
