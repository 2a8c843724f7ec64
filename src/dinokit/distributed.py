"""torch.distributed helpers: torchrun-native (RANK/WORLD_SIZE/LOCAL_RANK env), NCCL on GPU, gloo on CPU;
a plain ``dinokit train`` runs as a single process without any process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_dist", "get_rank", "get_world_size", "is_main_process", "barrier",
           "all_reduce_mean", "cleanup"]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str, dist_url: str = "env://") -> tuple[int, int, int]:
    """Initialise the process group when launched by torchrun (or SLURM via submitit); returns
    ``(rank, world_size, local_rank)``. Without the environment it does nothing and returns ``(0, 1, 0)``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
    else:
        return 0, 1, 0
    if world > 1 and not is_dist():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world, rank=rank)
        dist.barrier()
    return rank, world, local_rank


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device | str = "cpu") -> float:
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
