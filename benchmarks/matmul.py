"""Matmul ceiling of this machine at ViT shapes, fp32 and bf16: ``python benchmarks/matmul.py [--json]``.

The ceiling is the best that either GEMM library PyTorch ships achieves on the ViT block's own matrices (qkv,
proj, fc1, fc2 at the token count of a ViT-S/16 step with batch 8: 2 x 197 + 8 x 37 tokens per image):
``F.linear`` (the op the reference's layers use: MKL's ``sgemm`` in fp32, oneDNN in bf16) and oneDNN's matmul
called directly (``torch.ops.mkldnn._linear_pointwise``, what dinokit's fp32 CPU linears use: on AMD CPUs MKL's
fp32 path is the slower one). A full training step cannot beat it, so ``achieved / ceiling`` is the step's
model-FLOPs utilisation. Each shape and library is timed ``--repeats`` times, interleaved with the others; the
median is reported, the ceiling is the best (shape, library) per dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import interleaved, machine_info, median, spread  # noqa: E402

VIT_DIMS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}


def _onednn_linear(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def gemm_libraries() -> dict:
    """name -> ``fn(x, w) = x @ w.T``: PyTorch's ``F.linear`` and, where PyTorch has oneDNN, its matmul directly."""
    libs = {"F.linear": F.linear}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        libs["oneDNN"] = _onednn_linear
    return libs


def block_shapes(dim: int, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of ``F.linear(x[M, K], w[N, K])`` for the four linears of a ViT block."""
    return {"qkv": (tokens, dim, 3 * dim), "proj": (tokens, dim, dim), "fc1": (tokens, dim, 4 * dim),
            "fc2": (tokens, 4 * dim, dim)}


def measure(dim: int = 384, tokens: int = 8 * (2 * 197 + 8 * 37), dtypes=("fp32", "bf16"), repeats: int = 7,
            min_flop: float = 2e9) -> dict:
    """Median GFLOP/s per shape and dtype, and the ceiling (best shape) per dtype."""
    torch.manual_seed(0)
    shapes = block_shapes(dim, tokens)
    cands, flops = {}, {}
    libs = gemm_libraries()
    for dt_name in dtypes:
        dt = torch.float32 if dt_name == "fp32" else torch.bfloat16
        for name, (m, k, n) in shapes.items():
            x = torch.randn(m, k).to(dt)
            w = torch.randn(n, k).to(dt)
            f = 2.0 * m * k * n
            inner = max(1, int(min_flop // f))
            for lib, fn in libs.items():
                def run(x=x, w=w, inner=inner, fn=fn):
                    for _ in range(inner):
                        fn(x, w)

                run()  # warm-up (oneDNN primitive creation)
                cands[(dt_name, name, lib)] = run
                flops[(dt_name, name, lib)] = f * inner
    keyed = {"/".join(key): fn for key, fn in cands.items()}
    times = interleaved(keyed, rounds=repeats)
    out: dict = {"tokens": tokens, "dim": dim, "shapes": {}, "ceiling_gflops": {}, "ceiling_by_library": {},
                 "noise_iqr": {}}
    for (dt_name, name, lib), f in flops.items():
        key = f"{dt_name}/{name}/{lib}"
        g = round(f / median(times[key]) / 1e9, 1)
        out["shapes"][key] = g
        out["noise_iqr"][key] = round(spread(times[key]), 3)
        out["ceiling_gflops"][dt_name] = max(out["ceiling_gflops"].get(dt_name, 0.0), g)
        by_lib = out["ceiling_by_library"].setdefault(dt_name, {})
        by_lib[lib] = max(by_lib.get(lib, 0.0), g)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small", choices=sorted(VIT_DIMS))
    ap.add_argument("--tokens", type=int, default=8 * (2 * 197 + 8 * 37), help="rows M of the token matrix")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = measure(VIT_DIMS[a.arch], a.tokens, repeats=a.repeats)
    res.update(arch=a.arch, machine=machine_info(), command=" ".join(["python", "benchmarks/matmul.py", *sys.argv[1:]]))
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res["shapes"].items():
            print(f"{k:22s} {v:8.1f} GFLOP/s  (IQR/median {res['noise_iqr'][k]:.2f})")
        for k, v in res["ceiling_gflops"].items():
            print(f"ceiling {k}: {v:.1f} GFLOP/s")
        r = res["ceiling_gflops"]
        if "fp32" in r and "bf16" in r:
            print(f"bf16 / fp32 ceiling: {r['bf16'] / r['fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
