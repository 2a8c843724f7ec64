"""torch.distributed helpers: torchrun-native (RANK/WORLD_SIZE/LOCAL_RANK env), NCCL on GPU, gloo on CPU;
a plain ``dinokit train`` runs as a single process without any process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .dtypes import at_least_fp32

__all__ = ["init_distributed", "is_dist", "get_rank", "get_world_size", "is_main_process", "barrier",
           "all_reduce_mean", "all_reduce_sum", "clip_sharded_gradients", "cleanup"]


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
        store = _elastic_attempt_store(world) if dist_url == "env://" else None
        if store is not None:
            dist.init_process_group(backend=backend, store=store, world_size=world, rank=rank)
        else:
            dist.init_process_group(backend=backend, init_method=dist_url, world_size=world, rank=rank)
        dist.barrier()
    return rank, world, local_rank


def _elastic_attempt_store(world: int):
    """Under torchrun the workers share the agent's TCPStore (the rendezvous store), and that store outlives a
    restart (``--max-restarts``): the process group's keys of the failed attempt (each rank's gloo/NCCL address)
    are still there, so a restarted worker may connect to a dead peer ("Connection refused", or a hang). torch
    2.14 does not namespace them; this prefixes them with the restart count. ``None`` outside torchrun's
    shared-store mode (then ``env://`` is used as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"dinokit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@torch.no_grad()
def clip_sharded_gradients(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """Per-parameter gradient clipping (the reference rule ``g *= clip / (||g|| + 1e-6)`` where ``||g|| > clip``,
    as :func:`dinokit.optim.clip_gradients`) for FSDP2 parameters, whose gradients are ``DTensor`` shards: the
    squared norms of the local shards are summed over the ranks with one all-reduce, then every rank scales its
    shards. Returns the per-parameter norms."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    sq = torch.stack([at_least_fp32(x).pow(2).sum() for x in local])
    if is_dist():
        dist.all_reduce(sq)
    norms = sq.sqrt()
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, [c.to(x.dtype) for c, x in zip(coefs.unbind(), local)])
    return norms


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device | str = "cpu") -> float:
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks, as a new tensor (``t`` itself in a single process)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_reduce_max(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """The element-wise maximum of ``values`` over all ranks (the values themselves in a single process)."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
