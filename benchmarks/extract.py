"""Feature extraction throughput (the k-NN / linear-probe front end), side by side.

    python benchmarks/extract.py [--arch vit_small] [--patch-size 16] [--batch-size 32] [--image-size 224]
                                 [--precision fp32,bf16] [--impl dinokit,reference,timm] [--json]

Images/s of a backbone forward in eval mode without gradients (the CLS feature), interleaved round-robin:
dinokit's ViT, the reference's ViT as re-created in ``benchmarks/reference_dino.py`` (explicit softmax attention),
and timm's ``VisionTransformer`` (what lightly wraps). bf16 runs under CPU autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import interleaved, machine_info, median, peak_rss_mib, spread  # noqa: E402

ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def build(impl: str, arch: str, patch: int, size: int) -> torch.nn.Module:
    dim, depth, heads = ARCHS[arch]
    if impl == "dinokit":
        from dinokit.models import build_backbone

        m = build_backbone(arch, patch_size=patch, img_size=size)
    elif impl == "reference":
        from reference_dino import build_vit

        m = build_vit(arch, patch, size, 0.0)
    elif impl == "timm":
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                              num_classes=0, dynamic_img_size=True)
    else:
        raise SystemExit(f"unknown --impl {impl!r}")
    return m.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small", choices=sorted(ARCHS))
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--impl", default="dinokit,reference,timm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    impls = [s for s in a.impl.split(",") if s]
    precs = [s for s in a.precision.split(",") if s]
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
    models = {i: build(i, a.arch, a.patch_size, a.image_size) for i in impls}

    def run(m, p):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if p == "bf16" else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            m(x)

    cands = {f"{i}/{p}": (lambda m=models[i], p=p: run(m, p)) for i in impls for p in precs}
    for f in cands.values():
        f()
    times = interleaved(cands, rounds=a.rounds)
    res = [{"impl": k.split("/")[0], "precision": k.split("/")[1], "img_per_s": a.batch_size / median(v),
            "iqr_rel": spread(v)} for k, v in times.items()]
    by = {(r["impl"], r["precision"]): r for r in res}
    ratios = {}
    for r in res:
        ref = by.get(("reference", r["precision"]))
        if ref and r["impl"] != "reference":
            ratios[f"{r['impl']}/{r['precision']} vs reference/{r['precision']}"] = r["img_per_s"] / ref["img_per_s"]
    record = {"img_per_s": res[0]["img_per_s"], "results": res, "ratios": ratios, "peak_rss_mib": peak_rss_mib(),
              "config": {"arch": a.arch, "patch_size": a.patch_size, "batch_size": a.batch_size,
                         "image_size": a.image_size},
              "command": " ".join(["python", "benchmarks/extract.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine_info()}
    if a.json:
        print(json.dumps(record))
        return 0
    for r in res:
        print(f"  {r['impl']:9s} {r['precision']}: {r['img_per_s']:7.1f} images/s (IQR/median {r['iqr_rel']:.2f})")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
