"""One full DINO training step, side by side: dinokit vs the reference's implementation vs lightly + timm.

    python benchmarks/train_step.py --arch vit_small --patch-size 16 --batch-size 8 --global-crop-size 224 \\
        --local-crop-size 96 --local-crops-number 8 --out-dim 65536 --precision bf16 [--impl dinokit] [--json]

A step is everything one iteration does: teacher on the 2 global crops, student on all crops, DINO loss (centre
update), backward, gradient clipping, optimiser, teacher EMA, the loss read back to the host.

* ``--impl dinokit``: :meth:`dinokit.trainer.Trainer.train_step` itself (a Trainer built on a throw-away folder).
* ``--impl reference``: ``benchmarks/reference_dino.py``, the reference step's implementation choices re-created
  from the spec (explicit softmax attention, legacy ``weight_norm``, per-pair ``log_softmax``, Python-loop clipping
  with a host sync per parameter, non-foreach AdamW, Python-loop EMA).
* ``--impl lightly``: lightly's DINO pieces (``DINOProjectionHead``, ``DINOLoss``, ``update_momentum``,
  ``cosine_schedule``, ``MaskedVisionTransformerTIMM`` around a timm ViT) in the step of lightly's own ViT
  benchmark (``benchmarks/imagenet/vitb16/dino.py``: no gradient clipping). Skipped if lightly is missing.

``--impl`` and ``--precision`` take comma lists; all candidates then run in the same process, interleaved
round-robin with a rotating order (and interleaved with the matmul-ceiling probe), so load from other processes
hits all of them alike. Process-wide settings then apply to every candidate (dinokit's Trainer tunes glibc's
allocator for the whole process), which understates dinokit's lead; ``benchmarks/run_all.py`` therefore runs each
candidate in its own process, alternating processes round by round. Verdicts are ratios of medians.

FLOPs are "model FLOPs": counted once per configuration with ``torch.utils.flop_counter.FlopCounterMode`` on the
reference's step (forward and backward of student and teacher, explicit attention), and the same number divides
every candidate's time (dinokit computes ~7% fewer: its last block runs for the CLS token only; tests/test_perf.py
checks that dinokit's count with CPU flash attention counted as 2 + 4 matmuls equals the explicit count).
Peak RSS is the process's (``ru_maxrss``): compare it between single-candidate runs (``benchmarks/run_all.py`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import current_rss_mib, machine_info, median, peak_rss_mib, run_main, spread  # noqa: E402
from matmul import block_shapes, gemm_libraries  # noqa: E402

ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
IMPLS = ("dinokit", "reference", "lightly")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_crops(a, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(a.batch_size, 3, a.global_crop_size, a.global_crop_size, generator=g) for _ in range(2)]
    crops += [torch.randn(a.batch_size, 3, a.local_crop_size, a.local_crop_size, generator=g)
              for _ in range(a.local_crops_number)]
    return [c.to(device) for c in crops]


# ---------------------------------------------------------------------------------------------------------
# the three implementations: each returns ``step(crops, precision) -> loss``


class DinokitStep:
    def __init__(self, a, device):
        from PIL import Image

        from dinokit.config import TrainConfig
        from dinokit.trainer import Trainer

        self._tmp = tempfile.TemporaryDirectory(prefix="dinokit-bench-")
        root = Path(self._tmp.name)
        (root / "imgs").mkdir()
        for i in range(a.batch_size):
            Image.new("RGB", (8, 8), (i % 255, 0, 0)).save(root / "imgs" / f"{i}.png")
        cfg = TrainConfig(data_path=str(root / "imgs"), output_dir=str(root / "out"), arch=a.arch,
                          patch_size=a.patch_size, batch_size_per_gpu=a.batch_size,
                          global_crop_size=a.global_crop_size, local_crop_size=a.local_crop_size,
                          local_crops_number=a.local_crops_number, out_dim=a.out_dim, precision="fp32",
                          num_workers=0, device=str(device), epochs=2, compile=a.compile,
                          grad_checkpointing=a.grad_checkpointing, loss_chunk_pairs=a.loss_chunk_pairs,
                          log_every=0)
        with contextlib.redirect_stderr(sys.stdout if a.verbose else open("/dev/null", "w")):  # noqa: SIM115
            self.trainer = Trainer(cfg)
        self.trainer._tb = None
        self.trainer.epoch, self.trainer.iteration = 1, 1  # past the last-layer freeze: every parameter steps

    def __call__(self, crops, precision):
        self.trainer.precision = precision
        return self.trainer.train_step(crops)["loss"]

    def flop_model(self):
        return self.trainer


class ReferenceStep:
    def __init__(self, a, device):
        from reference_dino import ReferenceDINO

        self.ref = ReferenceDINO(arch=a.arch, patch_size=a.patch_size, out_dim=a.out_dim,
                                 ncrops=2 + a.local_crops_number, global_crop_size=a.global_crop_size,
                                 device=str(device))

    def __call__(self, crops, precision):
        self.ref.precision = precision
        return self.ref.step(crops, epoch=1)


class LightlyStep:
    def __init__(self, a, device):
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import get_weight_decay_parameters, update_momentum
        from lightly.utils.scheduler import cosine_schedule
        from timm.models.vision_transformer import VisionTransformer

        dim, depth, heads = ARCHS[a.arch]

        def vit(dpr):
            return VisionTransformer(img_size=a.global_crop_size, patch_size=a.patch_size, embed_dim=dim,
                                     depth=depth, num_heads=heads, num_classes=0, dynamic_img_size=True,
                                     drop_path_rate=dpr)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.backbone = MaskedVisionTransformerTIMM(vit=vit(0.0)).to(device)
            self.head = DINOProjectionHead(input_dim=dim, output_dim=a.out_dim).to(device)
            self.student_backbone = MaskedVisionTransformerTIMM(vit=vit(0.1)).to(device)
            self.student_head = DINOProjectionHead(input_dim=dim, output_dim=a.out_dim, freeze_last_layer=1).to(device)
        self.criterion = DINOLoss(output_dim=a.out_dim, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                  warmup_teacher_temp_epochs=0).to(device)
        params, params_no_wd = get_weight_decay_parameters([self.student_backbone, self.student_head])
        self.optimizer = torch.optim.AdamW([{"name": "dino", "params": params, "weight_decay": 0.04},
                                            {"name": "dino_no_weight_decay", "params": params_no_wd,
                                             "weight_decay": 0.0}], lr=1e-4)
        self.update_momentum, self.cosine_schedule = update_momentum, cosine_schedule
        self.device, self.step_i = device, 0

    def __call__(self, views, precision):
        # lightly benchmarks/imagenet/vitb16/dino.py: training_step + on_before_optimizer_step
        momentum = self.cosine_schedule(step=self.step_i, max_steps=1000, start_value=0.996, end_value=1.0)
        self.update_momentum(self.student_backbone, self.backbone, m=momentum)
        self.update_momentum(self.student_head, self.head, m=momentum)
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        with autocast(self.device, precision):
            with torch.no_grad():
                teacher_projections = self.head(self.backbone(global_views).flatten(start_dim=1))
            student_projections = torch.cat([self.student_head(self.student_backbone(v).flatten(start_dim=1))
                                             for v in (global_views, local_views)])
            loss = self.criterion(teacher_out=teacher_projections.chunk(2),
                                  student_out=student_projections.chunk(len(views)), epoch=1, teacher_temp=0.04)
        loss.backward()
        self.student_head.cancel_last_layer_gradients(1)
        wd = self.cosine_schedule(step=self.step_i, max_steps=1000, start_value=0.04, end_value=0.4)
        self.optimizer.param_groups[0]["weight_decay"] = wd
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step_i += 1
        return loss.item()


def build(impl: str, a, device):
    return {"dinokit": DinokitStep, "reference": ReferenceStep, "lightly": LightlyStep}[impl](a, device)


def lightly_available() -> bool:
    try:
        import lightly  # noqa: F401
        import timm  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# FLOPs


def flop_counter():
    """FlopCounterMode that also counts PyTorch's CPU flash-attention kernels (SDPA on CPU), which torch's
    table leaves at zero: forward 2 matmuls, backward 4 (model FLOPs, equal to an explicit-softmax attention's)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        # 4 matmuls (dV, dP, dQ, dK) = twice the forward; torch's formula also counts the flash kernel's
        # recomputation of q k^T, which is not model FLOPs (the explicit-softmax reference does not do it).
        return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_step_flops(step, crops, precision="fp32") -> int:
    with flop_counter() as fc:
        step(crops, precision)
    return int(fc.get_total_flops())


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small", choices=sorted(ARCHS))
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--global-crop-size", type=int, default=224)
    ap.add_argument("--local-crop-size", type=int, default=96)
    ap.add_argument("--local-crops-number", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16, or a comma list (interleaved)")
    ap.add_argument("--impl", default="dinokit", help="dinokit | reference | lightly, or a comma list (interleaved)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per candidate")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="dinokit: torch.compile student and teacher")
    ap.add_argument("--grad-checkpointing", action="store_true", help="dinokit: activation checkpointing")
    ap.add_argument("--loss-chunk-pairs", action="store_true", help="dinokit: crop-by-crop loss")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the interleaved matmul-ceiling probe")
    ap.add_argument("--gflop-per-step", type=float, default=None, help="model GFLOP of one step (skips counting)")
    ap.add_argument("--flops-only", action="store_true", help="count the step's FLOPs, print them and exit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.threads < 0:
        raise SystemExit("--steps takes a positive integer, --warmup and --threads integers >= 0")
    if a.gflop_per_step is not None and not a.gflop_per_step > 0:
        raise SystemExit(f"--gflop-per-step must be > 0, got {a.gflop_per_step}")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise SystemExit(f"unknown --device {a.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    impls = [s.strip() for s in a.impl.split(",") if s.strip()]
    precisions = [s.strip() for s in a.precision.split(",") if s.strip()]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown --impl {i!r}; choose from {', '.join(IMPLS)}")
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise SystemExit(f"unknown --precision {p!r}; choose fp32 or bf16")
    skipped = []
    if "lightly" in impls and not lightly_available():
        impls.remove("lightly")
        skipped.append("lightly (not installed: pip install lightly)")
    if not impls:
        print(json.dumps({"skipped": skipped}) if a.json else f"nothing to run: {skipped}")
        return 0

    torch.manual_seed(0)
    rss0 = current_rss_mib()
    crops = make_crops(a, device)
    steps = {i: build(i, a, device) for i in impls}
    dim = ARCHS[a.arch][0]
    g_tokens = 2 * a.batch_size * (1 + (a.global_crop_size // a.patch_size) ** 2)

    # model FLOPs of one step: the reference's computation (dinokit skips the discarded patch tokens of the last
    # block), counted in fp32 here or, when the reference is not a candidate, in a child process (clean RSS).
    count_impl = "reference"
    if a.gflop_per_step is not None:
        flops, count_impl = a.gflop_per_step * 1e9, "given"
    elif "reference" in steps:
        flops = count_step_flops(steps["reference"], crops)
    else:
        import subprocess

        args = list(sys.argv[1:] if argv is None else argv)
        for opt in ("--impl", "--precision"):
            while opt in args:
                i = args.index(opt)
                del args[i:i + 2]
        child = subprocess.run([sys.executable, __file__, *[x for x in args if x != "--json"], "--impl", "reference",
                                "--flops-only", "--json"], capture_output=True, text=True, check=True)
        flops = json.loads(child.stdout.strip().splitlines()[-1])["gflop_per_step"] * 1e9
    if a.flops_only:
        print(json.dumps({"gflop_per_step": flops / 1e9, "flops_counted_on": count_impl}) if a.json else
              f"{flops / 1e9:.2f} GFLOP per step (counted on {count_impl})")
        return 0

    cands = {}
    for impl in impls:
        for prec in precisions:
            cands[f"{impl}/{prec}"] = (lambda s=steps[impl], p=prec: s(crops, p))
    for _ in range(a.warmup):
        for fn in cands.values():
            fn()
    probes = {}
    libs = gemm_libraries()  # F.linear (MKL in fp32) and, where present, oneDNN's matmul
    if not a.no_ceiling:
        for prec in precisions:
            dt = torch.float32 if prec == "fp32" else torch.bfloat16
            mats = [(torch.randn(m, k, device=device).to(dt), torch.randn(n, k, device=device).to(dt), 2.0 * m * k * n)
                    for (m, k, n) in block_shapes(dim, g_tokens).values()]
            for x, w, _ in mats:
                for fn in libs.values():
                    fn(x, w)
            probes[prec] = mats

    results = {n: [] for n in cands}
    ceilings = {p: [] for p in probes}
    names = list(cands)
    for r in range(a.steps):
        k = r % len(names)  # rotate the order every round: ABC, BCA, CAB, ...
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            cands[n]()
            results[n].append(time.perf_counter() - t0)
        for prec, mats in probes.items():  # the ceiling, probed under the same load as the steps
            best = 0.0
            for x, w, f in mats:
                inner = max(1, int(3e9 // f))
                for fn in libs.values():  # the best library
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn(x, w)
                    best = max(best, f * inner / (time.perf_counter() - t0) / 1e9)
            ceilings[prec].append(best)

    peak = peak_rss_mib()
    out = []
    for name, ts in results.items():
        impl, prec = name.split("/")
        s = median(ts)
        ceil = median(ceilings[prec]) if ceilings.get(prec) else None
        ach = flops / s / 1e9
        out.append({"impl": impl, "precision": prec, "img_per_s": a.batch_size / s, "step_s": s,
                    "img_per_s_best": a.batch_size / min(ts), "step_s_min": min(ts), "step_s_all": ts,
                    "step_iqr_rel": spread(ts), "gflop_per_step": flops / 1e9, "achieved_gflops": ach,
                    "ceiling_gflops": ceil, "frac_of_ceiling": ach / ceil if ceil else None, "n_steps": len(ts)})
    by = {(o["impl"], o["precision"]): o for o in out}
    ratios = {}
    for o in out:
        ref_same = by.get(("reference", o["precision"]))
        ref_fp32 = by.get(("reference", "fp32"))
        name = f"{o['impl']}/{o['precision']}"
        if ref_same and o["impl"] != "reference":
            ratios[f"{name} vs reference/{o['precision']}"] = o["img_per_s"] / ref_same["img_per_s"]
        if ref_fp32 and o["precision"] != "fp32":
            ratios[f"{name} vs reference/fp32"] = o["img_per_s"] / ref_fp32["img_per_s"]
        lt = by.get(("lightly", o["precision"]))
        if lt and o["impl"] == "dinokit":
            ratios[f"dinokit/{o['precision']} vs lightly/{o['precision']}"] = o["img_per_s"] / lt["img_per_s"]

    first = out[0]
    record = {**{k: first[k] for k in ("impl", "precision", "img_per_s", "img_per_s_best", "gflop_per_step",
                                       "achieved_gflops", "ceiling_gflops", "frac_of_ceiling", "step_iqr_rel")},
              "peak_rss_mib": peak, "rss_before_models_mib": rss0, "peak_rss_delta_mib": peak - rss0,
              "config": {k: getattr(a, k) for k in ("arch", "patch_size", "batch_size", "global_crop_size",
                                                    "local_crop_size", "local_crops_number", "out_dim", "compile",
                                                    "grad_checkpointing", "loss_chunk_pairs", "steps", "warmup")},
              "flops_counted_on": count_impl,
              "results": out, "ratios": ratios, "skipped": skipped,
              "command": " ".join(["python", "benchmarks/train_step.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine_info()}
    if a.json:
        print(json.dumps(record, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))
        return 0
    print(f"{a.arch}/{a.patch_size} batch {a.batch_size}, 2x{a.global_crop_size} + {a.local_crops_number}x"
          f"{a.local_crop_size}, K={a.out_dim}: {flops / 1e9:.1f} GFLOP per step (counted on {count_impl})")
    for o in out:
        fr = f"{o['frac_of_ceiling']:.0%} of {o['ceiling_gflops']:.0f}" if o["ceiling_gflops"] else "n/a"
        print(f"  {o['impl']:9s} {o['precision']}: {o['img_per_s']:7.2f} img/s  {o['achieved_gflops']:6.1f} GFLOP/s "
              f"({fr})  step IQR/median {o['step_iqr_rel']:.2f}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    print(f"  peak RSS {peak:.0f} MiB (process; {peak - rss0:.0f} MiB above the pre-model baseline)")
    for s in skipped:
        print(f"  skipped: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, "train_step.py"))
