"""The DINO loss with centering and sharpening (Caron et al. 2021, §3.1, Eq. 1-2 and Algorithm 1).

For teacher logits ``t`` (2 global crops) and student logits ``s`` (all V crops):

    P_t = softmax((t - c) / tau_t),  log P_s = log_softmax(s / tau_s)
    L   = mean over the 2 (V - 1) pairs (i, v), v != i, of  mean_b  sum_k -P_t^i[b, k] log P_s^v[b, k]

then the centre moves, after the loss value is computed: ``c <- m c + (1 - m) mean(t)``, the mean taken over
all teacher rows of all processes. ``tau_t`` follows a per-epoch linear warm-up. This equals the reference
``main_dino.DINOLoss`` to floating-point rounding; ``chunk_pairs`` evaluates the same sum crop by crop with a
hand-written backward that keeps nothing per crop (peak memory of the loss about 2 instead of 5 ``[V B, K]``
float32 tensors: for a large ``out_dim``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOLoss", "teacher_temp_schedule"]


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linspace(warmup, final, n_warm) then final (reference semantics)."""
    if warmup_teacher_temp_epochs > nepochs:
        raise ValueError(f"warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs}) exceeds epochs ({nepochs})")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``mean over pairs (i, v != i) of mean_b sum_k -q_i log softmax(s_v / tau)``, one student crop at a time.

    Nothing per crop is kept for backward: the gradient is written crop by crop from a recomputed softmax,
    ``d/ds_v = (c_v softmax(s_v / tau) - sum_{i != v} q_i) / (tau B n_terms)`` with ``c_v = sum_{i != v} sum_k
    q_ik`` (the number of paired teacher crops, up to the rounding of the teacher's softmax). Peak memory is the
    student output, the teacher targets, the gradient and one crop's temporaries, instead of several ``[V B, K]``
    float32 copies (``s / tau``, its log-softmax, their gradients)."""

    @staticmethod
    def forward(ctx, student_output, teacher_probs, ncrops: int, student_temp: float):
        B = teacher_probs.shape[0] // 2
        q = teacher_probs.view(2, B, -1)
        total = torch.zeros((), dtype=torch.float32, device=student_output.device)
        n_terms = 0
        for v in range(ncrops):
            log_p = F.log_softmax(student_output[v * B:(v + 1) * B].float().div(student_temp), dim=-1)
            for iq in range(2):
                if iq != v:
                    total = total + torch.sum(-q[iq] * log_p, dim=-1).mean()
                    n_terms += 1
        ctx.save_for_backward(student_output, teacher_probs)
        ctx.ncrops, ctx.student_temp, ctx.n_terms = ncrops, student_temp, n_terms
        return total / n_terms

    @staticmethod
    def backward(ctx, grad_out):
        student_output, teacher_probs = ctx.saved_tensors
        B = teacher_probs.shape[0] // 2
        q = teacher_probs.view(2, B, -1)
        qsum = q.sum(dim=-1, keepdim=True)  # [2, B, 1], 1 up to rounding
        scale = grad_out.float() / (ctx.student_temp * B * ctx.n_terms)
        grad = torch.empty_like(student_output)
        for v in range(ctx.ncrops):
            p = F.softmax(student_output[v * B:(v + 1) * B].float().div(ctx.student_temp), dim=-1)
            pair = [iq for iq in range(2) if iq != v]
            target = q[pair[0]] if len(pair) == 1 else q[0] + q[1]
            count = qsum[pair[0]] if len(pair) == 1 else qsum[0] + qsum[1]
            grad[v * B:(v + 1) * B] = p.mul_(count).sub_(target).mul_(scale)
        return grad, None, None, None


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher targets and student predictions over crop pairs.

    Args (reference names): ``out_dim`` K; ``ncrops`` V = 2 + local crops; ``warmup_teacher_temp``,
    ``teacher_temp``, ``warmup_teacher_temp_epochs``, ``nepochs`` define the per-epoch teacher temperature;
    ``student_temp`` tau_s (0.1); ``center_momentum`` m (0.9).

    ``forward(student_output [V*B, K], teacher_output [2*B, K], epoch)`` returns the scalar loss and then
    updates the ``center`` buffer (all-reduced when torch.distributed is initialised).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        if ncrops < 2:
            raise ValueError("DINO needs at least the 2 global crops (ncrops >= 2)")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.last_teacher_entropy: torch.Tensor | None = None

    def teacher_temp(self, epoch: int) -> float:
        sched = self.teacher_temp_schedule
        return float(sched[min(epoch, len(sched) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                chunk_pairs: bool = False, teacher_temp: float | None = None) -> torch.Tensor:
        """``teacher_temp`` overrides the per-epoch schedule (used by time-budgeted runs, which plan the
        warm-up per iteration); ``chunk_pairs`` trades speed for a lower peak memory."""
        temp = self.teacher_temp(epoch) if teacher_temp is None else teacher_temp
        n_teacher = teacher_output.shape[0] // 2
        if teacher_output.shape[0] != 2 * n_teacher or student_output.shape[0] != self.ncrops * n_teacher:
            raise ValueError(f"expected teacher [2B, K] and student [{self.ncrops}B, K]; got "
                             f"{tuple(teacher_output.shape)} and {tuple(student_output.shape)}")
        teacher_out = F.softmax((teacher_output.detach().float() - self.center) / temp, dim=-1)
        if chunk_pairs:
            loss = _ChunkedCrossEntropy.apply(student_output, teacher_out, self.ncrops, self.student_temp)
            self.update_center(teacher_output)
            return loss
        teacher_chunks = teacher_out.chunk(2)
        student_chunks = student_output.float().div(self.student_temp).chunk(self.ncrops)

        total = student_output.new_zeros((), dtype=torch.float32)
        n_terms = 0
        log_qs = [F.log_softmax(s, dim=-1) for s in student_chunks]
        for iq, q in enumerate(teacher_chunks):
            for v, log_q in enumerate(log_qs):
                if v == iq:
                    continue
                total = total + torch.sum(-q * log_q, dim=-1).mean()
                n_terms += 1
        loss = total / n_terms
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """``c <- m c + (1 - m) * sum_ranks(sum_rows t) / (rows * world)`` (reference semantics)."""
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (teacher_output.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
