"""dinokit.models.linear: fp32 CPU linears through oneDNN give F.linear's values and gradients."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dinokit.head import DINOHead
from dinokit.models import build_backbone
from dinokit.models import linear as L

from .helpers import OpLog

pytestmark = pytest.mark.skipif(not L._op_available(), reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def small_sizes_take_the_path(monkeypatch, request):
    """The path is on whatever this CPU's default (an Intel CPU's is off), and small test matrices take it (the
    size threshold and the default are tested on their own)."""
    monkeypatch.setattr(L, "_ENABLED", True)
    if "threshold" not in request.node.name:
        monkeypatch.setattr(L, "MIN_DIM", 1)


def _ops(fn) -> list[str]:
    with OpLog() as log:
        fn()
    return [c[0] for c in log.calls]


def _close_to_float64(ours: torch.Tensor, fp32: torch.Tensor, exact: torch.Tensor) -> None:
    """``ours`` is as close to the float64 result as PyTorch's own fp32 result is (up to 4x: another summation
    order), and both are fp32-accurate."""
    err, ref_err = (ours.double() - exact).abs().max().item(), (fp32.double() - exact).abs().max().item()
    assert ours.dtype == torch.float32
    assert err <= 4 * ref_err + 1e-6 * exact.abs().max().item()


@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 33), (2, 1, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_f_linear_to_fp32_accuracy(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(20, 33, requires_grad=True)
    b = torch.randn(20, requires_grad=True) if bias else None
    dy = torch.randn(*shape[:-1], 20)
    assert "_linear_pointwise" in _ops(lambda: L.linear(x, w, b))
    ours = L.linear(x, w, b)
    params = [x, w] + ([b] if bias else [])
    g_ours = torch.autograd.grad(ours, params, dy)
    fp32 = F.linear(x, w, b)
    g_fp32 = torch.autograd.grad(fp32, params, dy)
    p64 = [p.detach().double().requires_grad_() for p in params]
    exact = F.linear(p64[0], p64[1], p64[2] if bias else None)
    g_exact = torch.autograd.grad(exact, p64, dy.double())
    _close_to_float64(ours, fp32, exact)
    for a, f, e in zip(g_ours, g_fp32, g_exact):
        _close_to_float64(a, f, e)


def test_strided_weight_and_input_views():
    """forward_cls's slices: the query rows of the qkv weight and token 0 of the input."""
    torch.manual_seed(1)
    x = torch.randn(4, 9, 24, requires_grad=True)
    w = torch.randn(72, 24, requires_grad=True)
    b = torch.randn(72, requires_grad=True)
    for xs, ws, bs in ((x[:, :1], w[:24], b[:24]), (x, w[24:], b[24:]), (x[:, 2:5], w.t()[:, :24].t(), None)):
        ours = L.linear(xs, ws, bs)
        ref = F.linear(xs, ws, bs)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(ours.square().sum(), [x, w])
        gr = torch.autograd.grad(ref.square().sum(), [x, w])
        for a, r in zip(g, gr):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_only_fp32_cpu_outside_autocast_takes_the_onednn_path():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert "_linear_pointwise" in _ops(lambda: L.linear(x, w))
    assert "_linear_pointwise" in _ops(lambda: L.matmul_nt(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 F.linear (oneDNN's bf16 already)
        ops = _ops(lambda: L.linear(x, w))
    assert "_linear_pointwise" not in ops and "mm" in ops
    for other in (x.double(), x.bfloat16()):
        ops = _ops(lambda t=other: L.linear(t, w.to(t.dtype)))
        assert "_linear_pointwise" not in ops
    assert L.linear(x.double(), w.double()).dtype == torch.float64
    assert L.linear(torch.randn(0, 8), w).shape == (0, 6)


def test_size_threshold_keeps_narrow_layers_on_f_linear():
    """Inner or output size below MIN_DIM (the demo's width-128 blocks measured slower through oneDNN)."""
    for k, n, expected in ((128, 512, False), (512, 128, False), (192, 192, True), (384, 1536, True)):
        ops = _ops(lambda k=k, n=n: L.linear(torch.randn(4, k), torch.randn(n, k)))
        assert ("_linear_pointwise" in ops) == expected, (k, n)
    assert L.MIN_DIM == 192


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    ref = nn.Linear(8, 5)
    ours = L.Linear(8, 5)
    assert isinstance(ours, nn.Linear)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_flop_counter_counts_the_onednn_linear_as_a_matmul():
    x, w = torch.randn(5, 3, 16), torch.randn(12, 16)
    with FlopCounterMode(display=False) as fc:
        L.linear(x, w)
    assert fc.get_total_flops() == 2 * 15 * 16 * 12


def test_vit_and_head_train_the_same_with_and_without_onednn(monkeypatch):
    """A ViT + DINO head forward and backward in fp32: oneDNN on vs off (F.linear), equal to fp32 accuracy."""
    def run():
        torch.manual_seed(0)
        vit = build_backbone("vit_custom", patch_size=8, embed_dim=48, depth=2, num_heads=3, img_size=32)
        head = DINOHead(48, 512, hidden_dim=64, bottleneck_dim=32)
        x = torch.randn(5, 3, 32, 32)
        out = head(vit(x))
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return out.detach(), [p.grad for p in [*vit.parameters(), *head.parameters()] if p.grad is not None]

    out, grads = run()
    monkeypatch.setattr(L, "_ENABLED", False)
    assert "_linear_pointwise" not in _ops(lambda: L.linear(torch.randn(2, 3), torch.randn(4, 3)))
    ref, ref_grads = run()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6


def test_by_default_only_x86_64_amd_cpus_take_the_path(monkeypatch):
    monkeypatch.delenv("DINOKIT_ONEDNN_LINEAR", raising=False)
    assert not L._available("aarch64", "AuthenticAMD") and not L._available("arm64", "")
    assert L._available("x86_64", "AuthenticAMD") and L._available("AMD64", "AuthenticAMD")
    assert not L._available("x86_64", "GenuineIntel") and not L._available("x86_64", "")  # MKL is fast on Intel
    monkeypatch.setenv("DINOKIT_ONEDNN_LINEAR", "1")  # forced on: any x86-64 CPU
    assert L._available("x86_64", "GenuineIntel") and not L._available("aarch64", "GenuineIntel")
    monkeypatch.setenv("DINOKIT_ONEDNN_LINEAR", "0")
    assert not L._available("x86_64", "AuthenticAMD")


def test_cpu_vendor_is_read_from_proc_cpuinfo():
    vendor = L._cpu_vendor()
    try:
        expected = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        expected = ""
    assert vendor == expected


def test_environment_switch_turns_the_path_off_and_on():
    code = "from dinokit.models import linear as L; print(L.onednn_linear_enabled())"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    for switch, expected in (("0", "False"), ("1", str(x86))):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "DINOKIT_ONEDNN_LINEAR": switch})
        assert out.stdout.strip() == expected
