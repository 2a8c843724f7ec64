"""Per-iteration cosine schedules (Caron et al. 2021, §3 "Implementation details"): learning rate with linear
warm-up, weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1.
Identical to the reference ``utils.cosine_scheduler``."""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler"]


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: float = 0, start_warmup_value: float = 0) -> np.ndarray:
    """Per-iteration values: ``linspace(start, base, warmup_iters)`` (both ends included) then
    ``final + (base - final) / 2 * (1 + cos(pi * i / T))`` for ``i = 0 .. T-1``; length ``epochs * niter_per_ep``.

    ``warmup_epochs`` may be fractional (e.g. 10% of a short run); it is rounded to whole iterations.
    """
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    total = int(epochs * niter_per_ep)
    if epochs < 0 or niter_per_ep < 0 or warmup_epochs < 0:
        raise ValueError(f"epochs, niter_per_ep and warmup_epochs must be >= 0, got {epochs}, {niter_per_ep} and "
                         f"{warmup_epochs}")
    if warmup_iters > total:
        raise ValueError(f"warm-up ({warmup_iters} iterations) is longer than training ({total} iterations)")
    warmup = np.array([])
    if warmup_iters > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == total
    return schedule
