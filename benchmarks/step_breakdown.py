"""Where one training step's time goes, by kind of kernel, and the speed-up that is possible at all.

    python benchmarks/step_breakdown.py --impl dinokit,reference --precision bf16 [train_step.py's shape options]
        [--steps 5] [--json]

For each candidate (built exactly as ``train_step.py`` builds it): the median of ``--steps`` unprofiled steps,
then two steps under ``torch.profiler`` with each ATen op's *self* time sorted into

* ``gemm``: the linear layers' matrix products (``mm``, ``addmm``, ``_linear_pointwise``), forward and backward;
* ``attention``: the attention products (``bmm``, the CPU flash-attention kernels forward and backward);
* ``math``: the element-wise kernels any implementation of the same maths needs at least once — GELU, LayerNorm,
  softmax (forward and backward), the optimiser's update and the teacher's EMA;
* ``other``: everything else (dtype casts, copies, residual additions, reductions, framework overhead).

The verdict line divides the *reference's* unprofiled step by a candidate's ``gemm + attention`` time (its
matrix products, already at the libraries' speed): the ratio the candidate would reach if everything else took
no time at all. A target above that bound cannot be met by changing the element-wise code; ``floor`` adds the
``math`` kernels (what remains if every cast, copy and addition were fused away) for a tighter, still optimistic,
bound. Profiled times include the profiler's overhead on small ops; shares, not absolute times, carry over.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import interleaved, machine_info, median  # noqa: E402
from train_step import IMPLS, build, make_crops, parse_args  # noqa: E402

KINDS = {
    "gemm": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"),
    "attention": ("aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "math": ("aten::gelu", "aten::gelu_backward", "aten::native_layer_norm", "aten::native_layer_norm_backward",
             "aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
             "aten::_log_softmax_backward_data", "aten::_fused_adamw_", "aten::lerp_"),
}


def kind_of(op: str) -> str:
    for kind, ops in KINDS.items():
        if op in ops:
            return kind
    return "other"


def profile_kinds(step, crops, precision: str, n: int = 2) -> dict:
    """Self time per step of each kind of kernel over ``n`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step(crops, precision)
    per_kind = dict.fromkeys((*KINDS, "other"), 0.0)
    for e in prof.key_averages():
        per_kind[kind_of(e.key)] += e.self_cpu_time_total / 1e6 / n
    return {"profiled_step_s": sum(per_kind.values()), **{f"{k}_s": v for k, v in per_kind.items()}}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    device = torch.device(a.device)
    impls = [s.strip() for s in a.impl.split(",") if s.strip()]
    if any(i not in IMPLS for i in impls) or a.precision not in ("fp32", "bf16"):
        raise SystemExit(f"--impl takes {', '.join(IMPLS)}; --precision one of fp32, bf16")
    crops = make_crops(a, device)
    steps = {impl: build(impl, a, device) for impl in impls}  # each enters its own autocast
    for step in steps.values():
        for _ in range(a.warmup):
            step(crops, a.precision)
    # unprofiled steps interleaved round-robin with a rotating order (load hits all candidates alike)
    times = interleaved({impl: functools.partial(steps[impl], crops, a.precision) for impl in impls}, a.steps)
    rows = {impl: {"step_s": median(times[impl]), **profile_kinds(steps[impl], crops, a.precision)}
            for impl in impls}
    ref = rows.get("reference")
    for r in rows.values():
        if ref is not None:
            r["bound_vs_reference"] = ref["step_s"] / (r["gemm_s"] + r["attention_s"])
            r["floor_bound_vs_reference"] = ref["step_s"] / (r["gemm_s"] + r["attention_s"] + r["math_s"])
            r["measured_vs_reference"] = ref["step_s"] / r["step_s"]
    out = {"precision": a.precision, "arch": a.arch, "patch_size": a.patch_size, "batch_size": a.batch_size,
           "crops": f"2x{a.global_crop_size} + {a.local_crops_number}x{a.local_crop_size}", "out_dim": a.out_dim,
           "candidates": rows, "machine": machine_info()}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{a.arch}/{a.patch_size} {a.precision}, batch {a.batch_size}, {out['crops']}, K {a.out_dim}")
    print("per step, seconds (profiled self time by kind; step = median of unprofiled steps)")
    head = f"{'':10s} {'step':>7s} {'gemm':>7s} {'attn':>7s} {'math':>7s} {'other':>7s}"
    if ref is not None:
        head += f" {'vs ref':>7s} {'bound':>7s} {'floor':>7s}"
    print(head)
    for impl, r in rows.items():
        line = (f"{impl:10s} {r['step_s']:7.3f} {r['gemm_s']:7.3f} {r['attention_s']:7.3f} {r['math_s']:7.3f} "
                f"{r['other_s']:7.3f}")
        if ref is not None:
            line += (f" {r['measured_vs_reference']:6.2f}x {r['bound_vs_reference']:6.2f}x "
                     f"{r['floor_bound_vs_reference']:6.2f}x")
        print(line)
    if ref is not None:
        print("bound: the reference's step / (gemm + attention); floor: / (gemm + attention + math)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
