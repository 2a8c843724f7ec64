"""Performance properties checked by counting, never by timing: FLOPs, kernel calls, tensor sizes, peak bytes.

The speed figures themselves are in docs/benchmarks.md (benchmarks/run_all.py); these tests pin down the
mechanisms that produce them, and that each keeps the maths unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dinokit.head import DINOHead, WeightNormLinear
from dinokit.loss import DINOLoss
from dinokit.models import build_backbone
from dinokit.optim import build_optimizer, clip_gradients
from dinokit.teacher import build_teacher, ema_update

from .helpers import OpLog

aten = torch.ops.aten


def _cpu_flash_flop_counter() -> FlopCounterMode:
    """The counter of benchmarks/train_step.py: CPU flash attention counted as 2 matmuls forward, 4 backward."""
    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(g, q, k, v, *args, out_shape=None, **kwargs):
        return 2 * sdpa_flop_count(q, k, v)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd})


def _vit():
    torch.manual_seed(0)
    return build_backbone("vit_custom", patch_size=8, embed_dim=48, depth=2, num_heads=3, img_size=32)


def _fwd_bwd(model, x):
    model(x).sum().backward()


# ---------------------------------------------------------------------------------------------------------
# FLOPs


def test_step_flops_equal_the_explicit_attention_count_and_the_formula():
    """The benchmark's model FLOPs: SDPA (CPU flash kernel) counted with the registered formula equals the math
    decomposition (explicit bmm + softmax, as the reference computes it), and the closed form."""
    m = _vit()
    x = torch.randn(2, 3, 32, 32)
    with _cpu_flash_flop_counter() as fc:
        _fwd_bwd(m, x)
    flash = fc.get_total_flops()
    m.zero_grad()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc2:
        _fwd_bwd(m, x)
    assert flash == fc2.get_total_flops()
    # closed form of the forward: per block 24 N D^2 (qkv, proj, MLP) + 4 N^2 D (q k^T, a v); patch embedding
    B, N, D, depth, P = 2, 17, 48, 2, 8
    with _cpu_flash_flop_counter() as fc3, torch.no_grad():
        m.forward_features(x)
    full = B * depth * (24 * N * D * D + 4 * N * N * D) + B * 2 * (N - 1) * D * 3 * P * P
    assert fc3.get_total_flops() == full
    # forward() (the CLS feature) runs the last block for token 0 only: keys/values of all tokens, one query,
    # one attention row, projection and MLP of one token
    with _cpu_flash_flop_counter() as fc4, torch.no_grad():
        m(x)
    last_full = 24 * N * D * D + 4 * N * N * D
    last_cls = 4 * N * D * D + 2 * D * D + 4 * N * D + 2 * D * D + 16 * D * D
    assert fc4.get_total_flops() == full - B * (last_full - last_cls)


def test_cls_forward_equals_the_full_last_block_values_and_gradients():
    torch.manual_seed(0)
    m = build_backbone("vit_custom", patch_size=8, embed_dim=48, depth=3, num_heads=3, img_size=32,
                       drop_path_rate=0.3).double().train()  # float64: equal up to rounding means ~1e-12 here
    x = torch.randn(4, 3, 32, 40, dtype=torch.float64)
    torch.manual_seed(1)
    out = m(x)  # the last block for token 0 only
    out.pow(2).sum().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    torch.manual_seed(1)  # the same drop-path draws
    ref = m.forward_features(x)[:, 0]  # every token through every block, as the reference
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    m.set_grad_checkpointing(True)
    m.zero_grad()
    torch.manual_seed(1)
    m(x).pow(2).sum().backward()
    for a, b in zip(g, [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _reference_block(blk, x):
    """The reference's block, written out: explicit attention from ``qkv[0], qkv[1], qkv[2]`` of the permuted
    projection, and its stochastic depth ``x.div(keep) * floor(keep + U)`` added to the residual."""

    def drop(y):
        p = getattr(blk.drop_path, "drop_prob", 0.0)
        if p == 0.0 or not blk.training:
            return y
        mask = ((1 - p) + torch.rand((y.shape[0],) + (1,) * (y.ndim - 1), dtype=y.dtype)).floor_()
        return y.div(1 - p) * mask

    a = blk.attn
    B, N, C = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
    x = x + drop(a.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
    return x + drop(blk.mlp(blk.norm2(x)))


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.4])
def test_block_equals_the_reference_block_values_gradients_and_drop_path_draws(drop_path_rate):
    torch.manual_seed(0)
    m = build_backbone("vit_custom", patch_size=8, embed_dim=48, depth=2, num_heads=3, img_size=32,
                       drop_path_rate=drop_path_rate).double().train()
    blk = m.blocks[1]
    x = torch.randn(6, 11, 48, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (blk, lambda t: _reference_block(blk, t)):
        torch.manual_seed(3)  # the same stochastic-depth draws
        out = fn(x)
        gx, *gp = torch.autograd.grad(out.pow(2).sum(), [x, *blk.parameters()])
        results.append((out, gx, gp))
    (out, gx, gp), (ref, rgx, rgp) = results
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp, rgp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if drop_path_rate:  # some samples dropped in a branch, some kept: the draws were exercised
        torch.manual_seed(3)
        assert not torch.equal(blk(x), x + blk.mlp(blk.norm2(x + blk.attn(blk.norm1(x)))))


def test_stochastic_depth_is_one_fused_kernel_and_keeps_the_residual_dtype():
    from dinokit.models.vit import DropPath, _add_residual, drop_path

    dp = DropPath(0.25).train()
    x, y = torch.randn(8, 5, 16), torch.randn(8, 5, 16)
    with OpLog() as log:
        out = _add_residual(x, y, dp)
    full = [c[0] for c in log.calls if (8, 5, 16) in c[1]]  # ops over the whole activation (not the [B,1,1] draw)
    assert full == ["addcmul"]
    torch.manual_seed(5)
    out = _add_residual(x, y, dp)
    torch.manual_seed(5)
    torch.testing.assert_close(out, x + drop_path(y, 0.25, True))
    kept = [(out[i] - x[i]).abs().max() > 0 for i in range(8)]
    assert 0 < sum(kept) < 8  # with this seed, both outcomes occur
    for i in range(8):  # dropped: the residual alone; kept: scaled by 1 / (1 - p)
        torch.testing.assert_close(out[i], x[i] + y[i] / 0.75 if kept[i] else x[i])
    # an fp32 stream with a bf16 branch (autocast) stays fp32; an all-bf16 stream stays bf16 (a bf16 model)
    assert _add_residual(x, y.bfloat16(), dp).dtype == torch.float32
    assert _add_residual(x.bfloat16(), y.bfloat16(), dp).dtype == torch.bfloat16
    assert drop_path(y.bfloat16(), 0.25, True).dtype == torch.bfloat16
    assert _add_residual(x, y, dp.eval()).equal(x + y)


def test_split_heads_is_one_copy_each_way_and_its_gradient_is_exact():
    from dinokit.models.vit import Attention, _SplitHeads

    torch.manual_seed(0)
    B, N, H, d = 3, 7, 2, 5
    x = torch.randn(B, N, 3 * H * d, dtype=torch.float64, requires_grad=True)
    q, k, v = _SplitHeads.apply(x, 3, H)
    ref = x.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    for i, t in enumerate((q, k, v)):
        assert t.is_contiguous() and torch.equal(t, ref[i])
    assert torch.autograd.gradcheck(lambda t: _SplitHeads.apply(t, 3, H), (x,))
    assert torch.autograd.gradcheck(lambda t: _SplitHeads.apply(t, 2, H), (x[..., :2 * H * d].detach()
                                                                          .requires_grad_(),))
    gk = torch.autograd.grad(_SplitHeads.apply(x, 3, H)[1].sum(), x)[0]  # only k used: zeros for q and v
    assert gk.reshape(B, N, 3, H, d)[:, :, 1].eq(1).all() and gk.reshape(B, N, 3, H, d)[:, :, [0, 2]].eq(0).all()
    from dinokit.models.vit import _split_heads

    with torch.no_grad():  # no gradients (teacher, extraction): strided views for SDPA, no copy at all
        views = _split_heads(x, 3, H)
    assert all(t.data_ptr() == x.data_ptr() + i * H * d * 8 for i, t in enumerate(views))
    assert all(torch.equal(t, ref[i]) for i, t in enumerate(views))
    # in an attention layer's backward: no select_backward (three full-size zero tensors filled and summed)
    attn = Attention(3 * 8, num_heads=3)
    y = torch.randn(2, 9, 24, requires_grad=True)
    for fn in (attn, attn.forward_cls):
        out = fn(y)
        with OpLog() as log:
            out.sum().backward()
        assert log.count("select_backward") == 0 and log.count("zeros") == 0 and log.count("stack") == 1


def test_patch_embedding_under_cpu_autocast_is_one_gemm_equal_to_the_convolution():
    from dinokit.models.vit import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(patch_size=8, embed_dim=32)
    x = torch.randn(3, 3, 24, 40)
    ref = pe.proj(x).flatten(2).transpose(1, 2)  # fp32 convolution
    gref = torch.autograd.grad(ref.square().sum(), list(pe.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
        out = pe(x)
    assert log.count("convolution") == 0 and log.count("addmm") == 1 and out.dtype == torch.bfloat16
    assert out.shape == ref.shape == (3, 15, 32)
    assert (out.float() - ref).norm() < 1e-2 * ref.norm()  # bf16 inputs and weights, fp32 accumulation
    g = torch.autograd.grad(out.float().square().sum(), list(pe.parameters()))
    for a, b in zip(g, gref):
        assert a.shape == b.shape and (a - b).norm() < 2e-2 * b.norm()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same bf16 sums as the convolution under autocast
        conv = pe.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.float(), conv.float(), rtol=2e-2, atol=2e-2)
    with OpLog() as log:  # fp32: the convolution itself
        assert pe(x).equal(ref)
    assert log.count("convolution") == 1


# ---------------------------------------------------------------------------------------------------------
# attention


def test_bf16_cpu_attention_skips_the_flash_kernel_keeps_fp32_logits_and_agrees():
    m = _vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_features(x)  # fp32: SDPA
    with OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.forward_features(x)  # with gradients: the explicit path
    assert log.count("_scaled_dot_product_flash_attention_for_cpu") == 0
    softmaxes = [c for c in log.calls if c[0] == "_softmax"]
    assert len(softmaxes) == 2 and all(c[2] == [torch.float32] for c in softmaxes)  # one per block, fp32
    assert (out.detach().float() - ref).norm() / ref.norm() < 2e-2  # bf16 matmuls
    with OpLog() as log2, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_nograd = m.forward_features(x)  # no gradients (teacher, extraction): the same explicit maths
    assert log2.count("_scaled_dot_product_flash_attention_for_cpu") == 0
    assert [c[2] for c in log2.calls if c[0] == "_softmax"] == [[torch.float32]] * 2
    assert out_nograd.equal(out.detach())  # the very same values as with gradients
    for dtype in (None, torch.float16):  # fp32, and fp16 without gradients: SDPA
        with OpLog() as log3, torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                              enabled=dtype is not None):
            m.forward_features(x)
        assert log3.count("_scaled_dot_product_flash_attention_for_cpu") == 2 and log3.count("_softmax") == 0


def test_lowp_probs_in_chunks_equal_one_product_and_the_fp32_softmax(monkeypatch):
    """The probabilities of the bf16 CPU attention are computed over chunks of (image, head) slices (the fp32
    logits of a chunk stay in cache for the softmax): chunking changes no value."""
    from dinokit.models import vit as V

    torch.manual_seed(0)
    q, k = (torch.randn(3, 4, 37, 16) * 2).bfloat16(), (torch.randn(3, 4, 37, 16) * 2).bfloat16()
    exact = torch.matmul(q.double() * 0.25, k.double().transpose(-2, -1)).softmax(-1)
    monkeypatch.setattr(V, "_PROBS_CHUNK_BYTES", 1 << 30)
    whole = V._lowp_probs(q, k, 0.25)  # one product over the batch
    assert whole.dtype == torch.bfloat16 and whole.shape == (3, 4, 37, 37)
    # fp32 logits and softmax: within bf16 rounding of the exact probabilities (bf16 logits would not be)
    assert ((whole.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()
    for chunk_bytes in (1, 4 * 37 * 37 * 5):  # one slice per chunk, 5 per chunk (uneven)
        monkeypatch.setattr(V, "_PROBS_CHUNK_BYTES", chunk_bytes)
        assert V._lowp_probs(q, k, 0.25).equal(whole)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)  # a strided view, as the teacher's split gives
    assert V._lowp_probs(qs, k, 0.25).equal(whole)
    with OpLog() as log:  # 12 slices of 37 x 37 fp32 logits in chunks of 5: three products
        monkeypatch.setattr(V, "_PROBS_CHUNK_BYTES", 4 * 37 * 37 * 5)
        V._lowp_probs(q, k, 0.25)
    assert log.count("bmm") == 3

    # without gradients the output is computed chunk by chunk too (no [B, H, N, M] tensor at once): same values
    v = torch.randn(3, 4, 37, 16).bfloat16()
    full = torch.matmul(whole, v)
    for chunk_bytes in (1, 4 * 37 * 37 * 5, 1 << 30):
        monkeypatch.setattr(V, "_PROBS_CHUNK_BYTES", chunk_bytes)
        assert V._lowp_attention_nograd(q, k, v, 0.25).equal(full)
    with OpLog() as log:
        monkeypatch.setattr(V, "_PROBS_CHUNK_BYTES", 4 * 37 * 37 * 5)
        V._lowp_attention_nograd(q, k, v, 0.25)
    assert log.count("bmm") == 6 and log.count("empty") <= 8  # 3 chunks x (logits, output)


def test_bf16_logit_products_go_to_onednn_only_when_their_operands_are_bf16_values(monkeypatch):
    """fp32 products of upcast bf16 ``q`` (times a power-of-two scale) and ``k``: ``fp32_precision = "bf16"``
    lets PyTorch send them to oneDNN, which may round operands to bf16 — exact for such operands. Any other
    case (fp16 inputs, a scale that is not a power of two) keeps PyTorch's default; the setting is restored."""
    from dinokit.models import vit as V

    flag = torch.backends.mkldnn.matmul
    before = flag.fp32_precision
    q = torch.randn(2, 3, 5, 16).bfloat16()
    with V._fp32_products_of_bf16_values(q, 0.25):
        assert flag.fp32_precision == "bf16"
    assert flag.fp32_precision == before
    for args in ((q.half(), 0.25), (q, 0.3)):
        with V._fp32_products_of_bf16_values(*args):
            assert flag.fp32_precision == before
    k = torch.randn(2, 3, 5, 16).bfloat16()
    exact = torch.matmul(q.double() * 0.25, k.double().transpose(-2, -1))
    with V._fp32_products_of_bf16_values(q, 0.25):
        s = torch.matmul(q.float() * 0.25, k.float().transpose(-2, -1))
    assert s.dtype == torch.float32 and (s.double() - exact).abs().max() < 1e-5  # fp32 accuracy, not bf16's
    with pytest.raises(RuntimeError), V._fp32_products_of_bf16_values(q, 0.25):
        raise RuntimeError
    assert flag.fp32_precision == before


def test_bf16_attention_without_gradients_keeps_sdpa_for_very_long_sequences(monkeypatch):
    """One (image, head) slice of fp32 logits above ``_EXPLICIT_MAX_SLICE_BYTES`` (3601 tokens: 52 MB): SDPA's
    flash kernel, O(N) memory and as fast there."""
    from dinokit.models import vit as V

    m = _vit()  # 32 px, patch 8: 17 tokens
    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(V, "_EXPLICIT_MAX_SLICE_BYTES", 4 * 17 * 17 - 1)
    with OpLog() as log, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m.forward_features(x)
    assert log.count("_scaled_dot_product_flash_attention_for_cpu") == 2 and log.count("_softmax") == 0


def test_bf16_attention_gradients_agree_with_fp32():
    m = _vit()
    x = torch.randn(2, 3, 32, 32)
    w = torch.randn(2, 48)  # a weighted sum: the plain sum of a LayerNorm's output has zero gradient (rounding only)
    (m(x) * w).sum().backward()
    g32 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    (y.float() * w).sum().backward()
    for a, b in zip(g32, [p.grad for p in m.parameters()]):
        assert (a - b).norm() <= 5e-2 * a.norm() + 1e-6


# ---------------------------------------------------------------------------------------------------------
# head


def test_head_normalises_once_and_scales_the_output_for_small_batches():
    head = DINOHead(16, 4096, hidden_dim=32, bottleneck_dim=64)
    x = torch.randn(10, 16)  # 10 rows < 64 inputs of the last layer
    with OpLog() as log:
        out = head(x)
    assert log.count("linalg_vector_norm") == 2  # the bottleneck's F.normalize and ||v|| once
    assert (4096, 64) not in [s for c in log.calls for s in c[1]]  # v * g / ||v|| never materialised
    ll = head.last_layer
    expected = F.linear(F.normalize(head.mlp(x), dim=-1), ll.weight_v * (ll.weight_g / ll.weight_v.norm(dim=1,
                                                                                                        keepdim=True)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    big = torch.randn(100, 64)  # more rows than inputs: the weight is normalised (fewer elements)
    with OpLog() as log2:
        ll(big)
    assert (4096, 64) in [s for c in log2.calls for s in c[1]]


def test_weight_norm_gradients_equal_the_weight_form():
    torch.manual_seed(0)
    a = WeightNormLinear(8, 50)
    with torch.no_grad():
        a.weight_g.uniform_(0.5, 2)
    x = torch.randn(3, 8)
    a(x).pow(2).sum().backward()
    gv, gg = a.weight_v.grad.clone(), a.weight_g.grad.clone()
    a.zero_grad()
    F.linear(x, a.weight).pow(2).sum().backward()
    torch.testing.assert_close(gv, a.weight_v.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gg, a.weight_g.grad, rtol=1e-4, atol=1e-6)


def _autograd_scaled_output(x, v, g):
    """The output-scaling form through autograd's generic ops (what the hand-written backward replaces)."""
    return F.linear(x, v) * (g / torch.linalg.vector_norm(v, dim=1, keepdim=True)).squeeze(1)


@pytest.mark.parametrize("train_gain", [False, True])
def test_weight_norm_hand_written_backward_equals_autograd_float64(train_gain):
    torch.manual_seed(0)
    a = WeightNormLinear(12, 70).double()
    with torch.no_grad():
        a.weight_g.uniform_(0.5, 2)
    a.weight_g.requires_grad_(train_gain)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)  # 10 rows < 12 inputs, 3-d input
    dy = torch.randn(2, 5, 70, dtype=torch.float64)
    out = a(x)
    out.backward(dy)
    v = a.weight_v.detach().clone().requires_grad_()
    g = a.weight_g.detach().clone().requires_grad_(train_gain)
    x2 = x.detach().clone().requires_grad_()
    ref = _autograd_scaled_output(x2, v, g)
    ref.backward(dy)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.weight_v.grad, v.grad, rtol=1e-10, atol=1e-12)
    if train_gain:
        torch.testing.assert_close(a.weight_g.grad, g.grad, rtol=1e-10, atol=1e-12)
    else:
        assert a.weight_g.grad is None
    # and the Function itself passes gradcheck (finite differences) in x, v and g
    from dinokit.head import _ScaledOutputWeightNorm

    args = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(6, 4, dtype=torch.float64, requires_grad=True),
            torch.rand(6, 1, dtype=torch.float64).add_(0.5).requires_grad_())
    assert torch.autograd.gradcheck(lambda x_, v_, g_: _ScaledOutputWeightNorm.apply(x_, v_, g_, None), args)


def test_weight_norm_hand_written_backward_equals_autograd_under_autocast():
    torch.manual_seed(1)
    a = WeightNormLinear(64, 3000)
    x = F.normalize(torch.randn(20, 64), dim=-1).requires_grad_()
    dy = torch.randn(20, 3000) * 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = a(x)
    out.backward(dy)
    v = a.weight_v.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _autograd_scaled_output(x2, v, a.weight_g.detach())
    ref.backward(dy)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same ops in the same dtypes
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.weight_v.grad, v.grad, rtol=1e-3, atol=1e-7)  # one rounding differs (fp32 sum)


def test_weight_norm_backward_allocates_less_than_autograd():
    torch.manual_seed(2)
    a = WeightNormLinear(256, 20000)
    x = torch.randn(40, 256, requires_grad=True)
    dy = torch.randn(40, 20000)
    weight_bytes = 20000 * 256 * 4

    def ours():
        a(x).backward(dy)

    v = a.weight_v.detach().clone().requires_grad_()

    def generic():
        _autograd_scaled_output(x, v, a.weight_g.detach()).backward(dy)

    ours_peak, generic_peak = _peak_bytes(ours), _peak_bytes(generic)
    # ours: the gradient (fp32) + the product (fp32 here); autograd: also the norm backward's two temporaries
    assert ours_peak <= 1.3 * weight_bytes < 1.8 * weight_bytes <= generic_peak, (ours_peak, generic_peak)


# ---------------------------------------------------------------------------------------------------------
# loss


def _peak_bytes(fn) -> int:
    """Peak of the bytes allocated by ``fn`` on the CPU, from the profiler's allocation records (each op's own
    net allocation and every free, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def test_loss_log_softmax_once_per_crop_not_per_pair():
    V, B, K = 10, 4, 256
    loss = DINOLoss(K, V, 0.04, 0.04, 0, 10)
    s, t = torch.randn(V * B, K, requires_grad=True), torch.randn(2 * B, K)
    with OpLog() as log:
        loss(s, t, 0, chunk_pairs=False)
    assert log.count("_log_softmax") == V  # the reference recomputes it for every pair: 2 (V - 1) = 18


def test_loss_chunk_pairs_same_loss_and_gradients_lower_peak_memory():
    V, B, K = 10, 8, 16384
    torch.manual_seed(0)
    s0, t, center = torch.randn(V * B, K), torch.randn(2 * B, K), 0.1 * torch.randn(1, K)
    res, peaks = {}, {}
    for chunk in (False, True):
        loss = DINOLoss(K, V, 0.04, 0.04, 0, 10)
        loss.center.copy_(center)
        x = s0.clone().requires_grad_()

        def run(loss=loss, x=x, chunk=chunk):
            value = loss(x, t, 0, chunk_pairs=chunk)
            value.backward()
            res[chunk] = (value.detach(), x.grad, loss.center.clone())

        peaks[chunk] = _peak_bytes(run)
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res[True][1], res[False][1], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(res[True][2], res[False][2])
    one = V * B * K * 4  # one [V B, K] float32 tensor
    assert peaks[True] <= 1.2 * one  # the gradient (+ one crop's temporaries)
    assert peaks[False] >= 3 * one and peaks[True] < 0.5 * peaks[False]


def test_chunked_loss_backward_under_bf16_student_output():
    V, B, K = 4, 3, 64
    torch.manual_seed(0)
    s = torch.randn(V * B, K).bfloat16().requires_grad_()
    t = torch.randn(2 * B, K)
    g = {}
    for chunk in (False, True):
        s.grad = None
        DINOLoss(K, V, 0.04, 0.04, 0, 10)(s, t, 0, chunk_pairs=chunk).backward()
        g[chunk] = s.grad.float()
    assert s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(g[True], g[False], rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# optimiser, clipping, EMA


def test_adamw_is_fused_on_cpu_and_matches_the_per_parameter_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(3))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = build_optimizer("adamw", [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}])
    assert opt.defaults["fused"] is True
    loop = torch.optim.AdamW([{"params": ref[:1]}, {"params": ref[1:], "weight_decay": 0.0}], lr=0.0, foreach=False)
    for o in (opt, loop):
        for g in o.param_groups:
            g["lr"] = 1e-2
        o.param_groups[0]["weight_decay"] = 0.04
    for _ in range(3):
        for p, r in zip(params, ref):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        loop.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_cpu_clipping_multiplies_only_the_gradients_above_the_ceiling():
    ps = [torch.nn.Parameter(torch.zeros(10)) for _ in range(4)]
    for p, scale in zip(ps, (0.1, 5.0, 0.5, 10.0)):
        p.grad = torch.full((10,), scale)
    expected = []
    for p in ps:
        n = p.grad.norm()
        c = 3.0 / (n + 1e-6)
        expected.append(p.grad * c if c < 1 else p.grad.clone())
    with OpLog() as log:
        clip_gradients(ps, 3.0)
    assert log.count("mul_") == 2  # the two gradients with norm > 3
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad, e)


def test_ema_is_one_foreach_kernel_and_equals_the_formula():
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    with OpLog() as log:
        ema_update(student, teacher, 0.99)
    assert log.count("_foreach_lerp_") == 1 and log.count("_foreach_mul_") == 0 and log.count("_foreach_add_") == 0
    for b, s, t in zip(before, student.parameters(), teacher.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s.detach())


def test_allocator_tuning_is_optional_and_harmless(monkeypatch):
    from dinokit.trainer import tune_cpu_allocator

    monkeypatch.setenv("DINOKIT_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False
    monkeypatch.delenv("DINOKIT_MALLOC_TUNING")
    assert tune_cpu_allocator() in (True, False)  # glibc: True
    x = torch.randn(1000, 1000)
    assert torch.isfinite(x @ x).all()
