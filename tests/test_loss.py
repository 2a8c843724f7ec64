import math

import numpy as np
import pytest
import torch

from dinokit import DINOLoss
from dinokit.loss import teacher_temp_schedule


def reference_loss_numpy(student, teacher, center, ncrops, tau_s, tau_t):
    """Independent float64 loop over crop pairs, rows and classes."""
    s = student.astype(np.float64)
    t = teacher.astype(np.float64)
    B = t.shape[0] // 2
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    total, terms = 0.0, 0
    for i in range(2):
        p = softmax((t[i * B:(i + 1) * B] - center) / tau_t)
        for v in range(ncrops):
            if v == i:
                continue
            logits = s[v * B:(v + 1) * B] / tau_s
            logq = logits - logits.max(-1, keepdims=True)
            logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
            total += np.mean(np.sum(-p * logq, axis=-1))
            terms += 1
    return total / terms


@pytest.mark.parametrize("ncrops", [2, 4, 10])
@pytest.mark.parametrize("chunk", [False, True])
def test_loss_equals_independent_computation(ncrops, chunk):
    K, B = 32, 3
    g = torch.Generator().manual_seed(ncrops)
    student = torch.randn(ncrops * B, K, generator=g)
    teacher = torch.randn(2 * B, K, generator=g)
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.04, 0, 10)
    center0 = torch.randn(1, K, generator=g) * 0.1
    loss_fn.center.copy_(center0)
    loss = loss_fn(student, teacher, epoch=0, chunk_pairs=chunk)
    expected = reference_loss_numpy(student.numpy(), teacher.numpy(), center0.numpy(), ncrops, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # centre updated after the loss, with momentum 0.9 and the teacher batch mean
    expected_center = 0.9 * center0 + 0.1 * teacher.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_first_step_uses_zero_center_and_pairs_skip_same_crop():
    K, B = 8, 2
    loss_fn = DINOLoss(K, 2, 0.04, 0.04, 0, 1)
    assert torch.equal(loss_fn.center, torch.zeros(1, K))
    t = torch.randn(2 * B, K)
    # student identical to teacher for the paired crop would not be paired with itself
    s = torch.cat([t[B:], t[:B]])  # student crop 0 = teacher crop 1 and vice versa
    loss = loss_fn(s, t, 0)
    expected = reference_loss_numpy(s.numpy(), t.numpy(), np.zeros((1, K)), 2, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_uniform_collapse_gives_ln_k():
    K = 4096
    loss_fn = DINOLoss(K, 10, 0.04, 0.04, 0, 1)
    loss = loss_fn(torch.zeros(10 * 4, K), torch.zeros(2 * 4, K), 0)
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)  # 8.3178, the plateau of collapsed runs


def test_teacher_temperature_schedule_matches_reference_values():
    sched = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(sched) == 100
    assert sched[0] == pytest.approx(0.04)
    assert sched[1] == pytest.approx(0.04 + 0.03 / 29)
    assert sched[29] == pytest.approx(0.07)
    assert np.all(sched[29:] == pytest.approx(0.07))
    with pytest.raises(ValueError):
        teacher_temp_schedule(0.04, 0.07, 30, 10)


def test_per_epoch_temperature_is_used():
    K = 16
    loss_fn = DINOLoss(K, 2, 0.04, 0.07, 30, 100)
    s, t = torch.randn(4, K), torch.randn(4, K)
    l29 = loss_fn(s, t, epoch=29).item()
    loss_fn.center.zero_()
    expected = reference_loss_numpy(s.numpy(), t.numpy(), np.zeros((1, K)), 2, 0.1, 0.07)
    assert l29 == pytest.approx(expected, rel=1e-5)


def test_gradient_flows_to_student_only():
    K = 16
    loss_fn = DINOLoss(K, 4, 0.04, 0.04, 0, 1)
    s = torch.randn(8, K, requires_grad=True)
    t = torch.randn(4, K, requires_grad=True)
    loss_fn(s, t, 0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_shape_mismatch_is_a_clear_error():
    loss_fn = DINOLoss(8, 4, 0.04, 0.04, 0, 1)
    with pytest.raises(ValueError, match="expected teacher"):
        loss_fn(torch.randn(6, 8), torch.randn(4, 8), 0)
