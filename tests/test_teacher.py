import torch

from dinokit import build_teacher, ema_update


def test_ema_equals_formula_and_skips_buffers():
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher = build_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(5.0)
    t_before = [p.clone() for p in teacher.parameters()]
    s = [p.detach().clone() for p in student.parameters()]
    ema_update(student, teacher, 0.996)
    for tb, sp, ta in zip(t_before, s, teacher.parameters()):
        torch.testing.assert_close(ta, 0.996 * tb + 0.004 * sp)
    assert torch.all(teacher[1].running_mean == 0)  # buffers are not averaged


def test_momentum_one_keeps_teacher():
    student = torch.nn.Linear(3, 3)
    teacher = build_teacher(student)
    with torch.no_grad():
        student.weight.add_(1)
    before = teacher.weight.clone()
    ema_update(student, teacher, 1.0)
    assert torch.equal(teacher.weight, before)


def test_ema_update_with_a_teacher_in_another_dtype():
    """An fp32 teacher of a bf16 student: the update uses the student's values in the teacher's dtype (the
    foreach kernel refused mixed dtypes with an unclear message)."""
    import copy

    from dinokit.teacher import ema_update

    torch.manual_seed(0)
    student = torch.nn.Linear(4, 3).bfloat16()
    teacher = copy.deepcopy(student).float()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    expected = [0.9 * t + 0.1 * s.float() for s, t in zip(student.parameters(), teacher.parameters())]
    ema_update(student, teacher, 0.9)
    for t, e in zip(teacher.parameters(), expected):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.detach(), e.detach(), rtol=1e-6, atol=1e-6)


def test_momentum_outside_zero_one_is_refused():
    import pytest

    student = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        ema_update(student, build_teacher(student), 1.5)
