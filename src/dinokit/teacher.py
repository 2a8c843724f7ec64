"""The momentum (EMA) teacher (Caron et al. 2021, §3.1: ``theta_t <- lambda theta_t + (1 - lambda) theta_s`` with
lambda following a cosine from 0.996 to 1). Parameters only, no buffers, as in the reference."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["build_teacher", "ema_update"]


def build_teacher(student: nn.Module, teacher: nn.Module | None = None) -> nn.Module:
    """Return a teacher holding the student's weights with ``requires_grad=False`` everywhere.

    ``teacher`` may be a separately built model of the same shape (e.g. without drop path, as the reference
    builds it); otherwise the student is deep-copied.
    """
    if teacher is None:
        teacher = copy.deepcopy(student)
    else:
        teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``theta_t <- m * theta_t + (1 - m) * theta_s`` over ``zip(student.parameters(), teacher.parameters())``
    in one ``foreach`` kernel: ``lerp(theta_t, theta_s, 1 - m) = theta_t + (1 - m)(theta_s - theta_t)``, the
    same value to rounding in one pass over the teacher instead of two."""
    s_params = [p.detach() for p in student.parameters()]
    t_params = [p for p in teacher.parameters()]
    if len(s_params) != len(t_params):
        raise ValueError("student and teacher have different numbers of parameters")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    if momentum == 1.0:
        return
    # a teacher kept in another dtype than the student (e.g. an fp32 teacher of a bf16 student): the student's
    # values in the teacher's dtype (foreach_lerp_ needs one dtype per pair)
    s_params = [s if s.dtype == t.dtype else s.to(t.dtype) for s, t in zip(s_params, t_params)]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
