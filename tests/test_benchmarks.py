"""The benchmark tools that back claims in docs/benchmarks.md run and report consistent numbers (never timings)."""

from __future__ import annotations

import json
import os
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


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_stable_benchmark_entry_points_check_their_arguments_in_one_line(tmp_path):
    """--rounds 0 printed "img_per_s": NaN (not JSON), --impl "," divided by zero, a corrupt photo, --steps 0
    and a bad size ended in tracebacks."""
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (80, 60), (40 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 64)
    for args, message in ((["--rounds", "0"], "--rounds and --threads take positive integers"),
                          (["--impl", ","], "--impl names no implementation")):
        r = _bench("augment.py", "--images", str(tmp_path), *args, "--json")
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _bench("augment.py", "--images", str(tmp_path), "--impl", "fast", "--rounds", "1", "--json")
    assert r.returncode == 0 and "left out 1 unreadable image(s)" in r.stderr, r.stderr
    record = json.loads(r.stdout)
    assert record["images"] == 2 and record["image_dir"] == str(tmp_path) and record["peak_rss_mib"] > 0
    step = ["--arch", "vit_tiny", "--batch-size", "2", "--global-crop-size", "32", "--local-crop-size", "16",
            "--out-dim", "256", "--no-ceiling", "--json"]
    for args, message in ((["--steps", "0"], "--steps takes a positive integer"),
                          (["--batch-size", "0"], "train_step.py: error: batch_size_per_gpu must be positive")):
        r = _bench("train_step.py", *step, *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
