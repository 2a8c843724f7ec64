"""The benchmark tools that back claims in docs/benchmarks.md run and report consistent numbers (never timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEP_BREAKDOWN = ROOT / "benchmarks" / "step_breakdown.py"


def _load_step_breakdown():
    sys.path.insert(0, str(STEP_BREAKDOWN.parent))
    try:
        import step_breakdown
    finally:
        sys.path.remove(str(STEP_BREAKDOWN.parent))
    return step_breakdown


def test_step_breakdown_sorts_kernels_into_kinds():
    sb = _load_step_breakdown()
    assert sb.kind_of("aten::addmm") == "gemm" and sb.kind_of("aten::mm") == "gemm"
    assert sb.kind_of("aten::bmm") == "attention"
    assert sb.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert sb.kind_of("aten::gelu_backward") == "math" and sb.kind_of("aten::_fused_adamw_") == "math"
    assert sb.kind_of("aten::copy_") == "other" and sb.kind_of("aten::add") == "other"


@pytest.mark.timeout(300)
def test_step_breakdown_runs_both_candidates_and_its_bounds_are_consistent():
    out = subprocess.run(
        [sys.executable, str(STEP_BREAKDOWN), "--impl", "dinokit,reference", "--precision", "bf16",
         "--arch", "vit_tiny", "--batch-size", "2", "--global-crop-size", "32", "--local-crop-size", "16",
         "--local-crops-number", "2", "--out-dim", "64", "--steps", "1", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res["candidates"]) == {"dinokit", "reference"}
    for r in res["candidates"].values():
        kinds = r["gemm_s"] + r["attention_s"] + r["math_s"] + r["other_s"]
        assert kinds == pytest.approx(r["profiled_step_s"], rel=1e-9)
        assert r["gemm_s"] > 0 and r["step_s"] > 0
        # the bound leaves out more than the floor does
        assert r["bound_vs_reference"] > r["floor_bound_vs_reference"] > 0
    assert res["candidates"]["reference"]["measured_vs_reference"] == 1.0
