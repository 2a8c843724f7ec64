"""The DINO loss with centering and sharpening (Caron et al. 2021, §3.1, Eq. 1-2 and Algorithm 1).

For teacher logits ``t`` (2 global crops) and student logits ``s`` (all V crops):

    P_t = softmax((t - c) / tau_t),  log P_s = log_softmax(s / tau_s)
    L   = mean over the 2 (V - 1) pairs (i, v), v != i, of  mean_b  sum_k -P_t^i[b, k] log P_s^v[b, k]

then the centre moves, after the loss value is computed: ``c <- m c + (1 - m) mean(t)``, the mean taken over
all teacher rows of all processes. ``tau_t`` follows a per-epoch linear warm-up. This equals the reference
``main_dino.DINOLoss`` to floating-point rounding; ``chunk_pairs`` evaluates the same sum crop by crop with a
hand-written backward that keeps nothing per crop (peak memory of the loss about 2 instead of 5 ``[V B, K]``
float32 tensors: for a large ``out_dim``).

Two options from DINOv2 (Oquab et al. 2023, §4), off by default: ``centering="sinkhorn_knopp"`` replaces the
running centre by a few Sinkhorn-Knopp normalisations of the teacher's ``exp(t / tau_t)`` over the batch (targets
that use every prototype equally on average, from the first step); :class:`KoLeoLoss`, the Kozachenko-Leonenko
differential-entropy estimator on the student's CLS features, spreads the features of a batch apart.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import is_dist
from .dtypes import at_least_fp32, at_least_fp32_dtype

__all__ = ["DINOLoss", "KoLeoLoss", "sinkhorn_knopp", "teacher_temp_schedule", "CENTERINGS"]

CENTERINGS = ("centering", "sinkhorn_knopp")


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linspace(warmup, final, n_warm) then final (reference semantics)."""
    if warmup_teacher_temp_epochs > nepochs:
        raise ValueError(f"warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs}) exceeds epochs ({nepochs})")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


def _logsumexp(x: torch.Tensor, dim: int, across_ranks: bool) -> torch.Tensor:
    """``log sum exp`` over ``dim``, the sum also over all processes when ``across_ranks``."""
    if not (across_ranks and is_dist()):
        return torch.logsumexp(x, dim=dim, keepdim=True)
    top = x.amax(dim=dim, keepdim=True)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(x - top).sum(dim=dim, keepdim=True)
    dist.all_reduce(total)
    return torch.log(total) + top


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets ``[N, K]`` by Sinkhorn-Knopp (DINOv2's ``sinkhorn_knopp_teacher``).

    ``Q = exp(t / temp)``, as ``[K, N]``, divided by its total; then ``n_iterations`` times: each prototype's row
    divided by its sum and by K, each sample's column divided by its sum and by N; finally ``Q * N`` (each
    sample's column sums to 1), returned as ``[N, K]``. N and the row sums are over all processes. Computed in
    the log domain (every division a subtraction of a ``logsumexp``): the same values, but no ``exp`` overflow
    or underflow at sharp temperatures, where the plain form turns rows of tiny values into 0 / 0.
    """
    log_q = at_least_fp32(teacher_output.detach()).t() / temp  # [K, N]
    k = log_q.shape[0]
    n = torch.tensor(float(log_q.shape[1]), device=log_q.device)
    if is_dist():
        dist.all_reduce(n)
    log_k, log_n = math.log(k), torch.log(n)
    for _ in range(n_iterations):  # the initial division by the total is absorbed by the first row step
        log_q = log_q - _logsumexp(log_q, 1, across_ranks=True) - log_k
        log_q = log_q - _logsumexp(log_q, 0, across_ranks=False) - log_n
    return torch.exp(log_q + log_n).t()


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al. 2019; DINOv2 §4, weight 0.1).

    For the rows ``x_i`` of a batch, L2-normalised: ``-mean_i log(||x_i - x_nn(i)|| + eps)`` with ``nn(i)`` the
    nearest other row (largest cosine similarity). Minimising it pushes each feature away from its nearest
    neighbour, spreading the batch over the sphere. Per process (no gradient through other ranks).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise ValueError("KoLeo needs at least 2 rows (a nearest neighbour)")
        x = F.normalize(at_least_fp32(x), dim=-1, eps=self.eps)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
            nearest = sim.argmax(dim=1)
        dist_nn = F.pairwise_distance(x, x[nearest], eps=self.eps)
        return -torch.log(dist_nn + self.eps).mean()


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
        total = torch.zeros((), dtype=at_least_fp32_dtype(student_output.dtype), device=student_output.device)
        n_terms = 0
        for v in range(ncrops):
            log_p = F.log_softmax(at_least_fp32(student_output[v * B:(v + 1) * B]).div(student_temp), dim=-1)
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
        scale = at_least_fp32(grad_out) / (ctx.student_temp * B * ctx.n_terms)
        grad = torch.empty_like(student_output)
        for v in range(ctx.ncrops):
            p = F.softmax(at_least_fp32(student_output[v * B:(v + 1) * B]).div(ctx.student_temp), dim=-1)
            pair = [iq for iq in range(2) if iq != v]
            target = q[pair[0]] if len(pair) == 1 else q[0] + q[1]
            count = qsum[pair[0]] if len(pair) == 1 else qsum[0] + qsum[1]
            grad[v * B:(v + 1) * B] = p.mul_(count).sub_(target).mul_(scale)
        return grad, None, None, None


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher targets and student predictions over crop pairs.

    Args (reference names): ``out_dim`` K; ``ncrops`` V = 2 + local crops; ``warmup_teacher_temp``,
    ``teacher_temp``, ``warmup_teacher_temp_epochs``, ``nepochs`` define the per-epoch teacher temperature;
    ``student_temp`` tau_s (0.1); ``center_momentum`` m (0.9); ``centering``: ``"centering"`` (the paper) or
    ``"sinkhorn_knopp"`` (DINOv2: targets from :func:`sinkhorn_knopp` with ``sinkhorn_iterations``; the centre is
    still tracked, for the collapse diagnostics, but not used).

    ``forward(student_output [V*B, K], teacher_output [2*B, K], epoch)`` returns the scalar loss and then
    updates the ``center`` buffer (all-reduced when torch.distributed is initialised).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "centering", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, not {centering!r}")
        if centering == "sinkhorn_knopp" and sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
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
        """The schedule's temperature at ``epoch`` (the last value beyond the schedule's end)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        sched = self.teacher_temp_schedule
        return float(sched[min(epoch, len(sched) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                chunk_pairs: bool = False, teacher_temp: float | None = None) -> torch.Tensor:
        """``teacher_temp`` overrides the per-epoch schedule (used by time-budgeted runs, which plan the
        warm-up per iteration); ``chunk_pairs`` trades speed for a lower peak memory."""
        temp = self.teacher_temp(epoch) if teacher_temp is None else teacher_temp
        n_teacher = teacher_output.shape[0] // 2
        if n_teacher == 0:  # the centre update would divide by zero rows and stay NaN for good
            raise ValueError("the DINO loss needs at least one image (teacher [2B, K] with B >= 1); got an empty batch")
        if teacher_output.shape[0] != 2 * n_teacher or student_output.shape[0] != self.ncrops * n_teacher:
            raise ValueError(f"expected teacher [2B, K] and student [{self.ncrops}B, K]; got "
                             f"{tuple(teacher_output.shape)} and {tuple(student_output.shape)}")
        if teacher_output.shape[-1] != self.out_dim or student_output.shape[-1] != self.out_dim:
            raise ValueError(f"this loss has out_dim K = {self.out_dim} (its centre's size); got teacher "
                             f"{tuple(teacher_output.shape)} and student {tuple(student_output.shape)}")
        if self.centering == "sinkhorn_knopp":
            teacher_out = sinkhorn_knopp(teacher_output, temp, self.sinkhorn_iterations)
        else:
            teacher_out = F.softmax((at_least_fp32(teacher_output.detach()) - self.center) / temp, dim=-1)
        if chunk_pairs:
            loss = _ChunkedCrossEntropy.apply(student_output, teacher_out, self.ncrops, self.student_temp)
            self.update_center(teacher_output)
            return loss
        teacher_chunks = teacher_out.chunk(2)
        student_chunks = at_least_fp32(student_output).div(self.student_temp).chunk(self.ncrops)

        total = student_output.new_zeros((), dtype=at_least_fp32_dtype(student_output.dtype))
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
        batch_center = torch.sum(at_least_fp32(teacher_output), dim=0, keepdim=True)
        world = 1
        if is_dist():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (teacher_output.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
