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


# -- DINOv2 options: Sinkhorn-Knopp targets and the KoLeo regulariser ------------------------------------------

def sinkhorn_numpy(t, temp, iters):
    """Independent float64 Sinkhorn-Knopp as DINOv2 writes it: Q = exp(t / temp)^T / total, then rows / row sum / K
    and columns / column sum / N, `iters` times, finally Q * N transposed back."""
    q = np.exp(t.astype(np.float64) / temp).T
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T


@pytest.mark.parametrize("iters", [1, 3])
def test_sinkhorn_knopp_equals_independent_computation(iters):
    from dinokit.loss import sinkhorn_knopp

    g = torch.Generator().manual_seed(iters)
    t = torch.randn(12, 16, generator=g)
    got = sinkhorn_knopp(t, 0.5, iters)
    torch.testing.assert_close(got.double(), torch.from_numpy(sinkhorn_numpy(t.numpy(), 0.5, iters)),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(12))  # one distribution per sample


def test_sinkhorn_knopp_balances_prototypes_and_does_not_overflow():
    from dinokit.loss import sinkhorn_knopp

    # every sample prefers prototype 0: softmax targets collapse onto it, Sinkhorn-Knopp spreads them
    t = torch.zeros(64, 8)
    t[:, 0] = 1.0
    t += 0.01 * torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(t, 0.04, 50)
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 64 / 8), rtol=1e-3, atol=1e-3)
    # logits far beyond exp's range at a sharp temperature (the plain form gives 0 / 0 there): finite, normalised
    big = torch.randn(10, 6, generator=torch.Generator().manual_seed(1)) * 50
    q = sinkhorn_knopp(big, 0.02, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(10))


def test_dino_loss_with_sinkhorn_knopp_targets():
    from dinokit.loss import sinkhorn_knopp

    K, B, ncrops = 16, 4, 4
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(ncrops * B, K, generator=g), torch.randn(2 * B, K, generator=g)
    for chunk in (False, True):
        loss_fn = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1, centering="sinkhorn_knopp", sinkhorn_iterations=3)
        loss_fn.center.fill_(5.0)  # not used by Sinkhorn-Knopp targets
        q = sinkhorn_numpy(t.numpy(), 0.04, 3)
        logp = torch.log_softmax(s.double() / 0.1, dim=-1).numpy()
        terms = [np.mean(np.sum(-q[i * B:(i + 1) * B] * logp[v * B:(v + 1) * B], axis=-1))
                 for i in range(2) for v in range(ncrops) if v != i]
        assert loss_fn(s, t, 0, chunk_pairs=chunk).item() == pytest.approx(np.mean(terms), rel=1e-5)
        torch.testing.assert_close(loss_fn.center, 0.9 * torch.full((1, K), 5.0) + 0.1 * t.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(K, ncrops, 0.04, 0.04, 0, 1, centering="sinkhorn")
    assert torch.allclose(sinkhorn_knopp(t, 0.04, 3), torch.from_numpy(q).float(), atol=1e-6)


def _sinkhorn_rank(rank, world, init, t, out):
    import torch.distributed as dist

    from dinokit.loss import sinkhorn_knopp

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        half = t.shape[0] // world
        torch.save(sinkhorn_knopp(t[rank * half:(rank + 1) * half], 0.1, 3), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_knopp_over_two_processes_equals_one_process(tmp_path):
    from dinokit.loss import sinkhorn_knopp

    t = torch.randn(8, 5, generator=torch.Generator().manual_seed(4))
    torch.multiprocessing.spawn(_sinkhorn_rank, args=(2, f"file://{tmp_path}/store", t, str(tmp_path)), nprocs=2)
    both = torch.cat([torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)])
    torch.testing.assert_close(both, sinkhorn_knopp(t, 0.1, 3))


def test_koleo_equals_independent_computation():
    from dinokit.loss import KoLeoLoss

    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(5))
    xn = x.double().numpy()
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    d = np.linalg.norm(xn[:, None] - xn[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected = -np.mean(np.log(d.min(axis=1) + 1e-8))
    assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="2 rows"):
        KoLeoLoss()(x[:1])


def test_koleo_gradient_spreads_a_clump():
    from dinokit.loss import KoLeoLoss

    x = (torch.randn(16, 4, generator=torch.Generator().manual_seed(6)) * 0.05 + torch.tensor([1.0, 0, 0, 0]))
    x.requires_grad_(True)

    def nearest(x):
        xn = torch.nn.functional.normalize(x.detach(), dim=-1)
        d = torch.cdist(xn, xn) + torch.eye(len(xn)) * 9
        return d.min(dim=1).values.mean().item()

    before = nearest(x)
    opt = torch.optim.SGD([x], lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        KoLeoLoss()(x).backward()
        opt.step()
    assert nearest(x) > 1.5 * before


@pytest.mark.parametrize("chunk_pairs", [False, True])
def test_loss_computes_in_at_least_float32_and_keeps_float64(chunk_pairs):
    """bf16 outputs are upcast to float32; float64 ones stay float64 (``.float()`` used to round a float64 run's
    loss, centre and clipping norms to float32: 3.5e-8 off the reference in the float64 equivalence test)."""
    from dinokit.optim import clip_gradients

    K, B = 16, 3
    f32, f64 = torch.float32, torch.float64
    for dtype, want in ((torch.bfloat16, f32), (f32, f32), (f64, f64)):
        loss_fn = DINOLoss(K, 4, 0.04, 0.04, 0, 1).to(want)
        s = torch.randn(4 * B, K, dtype=dtype, requires_grad=True)
        t = torch.randn(2 * B, K, dtype=dtype)
        loss = loss_fn(s, t, epoch=0, chunk_pairs=chunk_pairs)
        assert loss.dtype == want and loss_fn.center.dtype == want
        loss.backward()
        assert s.grad.dtype == dtype
        assert clip_gradients([s], 1e-3).dtype == want


def test_sinkhorn_centering_needs_at_least_one_iteration():
    """0 iterations left the teacher targets unnormalised: an infinite loss (the config refused 0, the library
    did not)."""
    with pytest.raises(ValueError, match="sinkhorn_iterations must be >= 1, got 0"):
        DINOLoss(6, 2, 0.04, 0.04, 0, 1, centering="sinkhorn_knopp", sinkhorn_iterations=0)
    DINOLoss(6, 2, 0.04, 0.04, 0, 1, sinkhorn_iterations=0)  # not used by plain centering


def test_an_empty_batch_is_refused_before_the_centre_is_touched():
    """B = 0 passed the shape check (0 == 2 * 0) and the centre update divided by zero rows: NaN for good."""
    from dinokit.loss import DINOLoss

    loss = DINOLoss(7, 4, 0.04, 0.04, 0, 10)
    before = loss.center.clone()
    with pytest.raises(ValueError, match="at least one image"):
        loss(torch.randn(0, 7), torch.randn(0, 7), 0)
    assert torch.equal(loss.center, before)
    assert torch.isfinite(loss(torch.randn(8, 7), torch.randn(4, 7), 0))


def test_misuse_is_named():
    """An output of another width was torch's "size of tensor a (51) must match ..."; epoch -1 read the schedule's
    last value through negative indexing."""
    loss = DINOLoss(50, 4, 0.04, 0.07, 2, 5)
    with pytest.raises(ValueError, match=r"out_dim K = 50 .*\(4, 51\)"):
        loss(torch.randn(8, 51), torch.randn(4, 51), 0)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        loss.teacher_temp(-1)
