"""``dinokit export``: a training checkpoint's backbone as a clean ``.safetensors`` file (see
:mod:`dinokit.export`)."""

from __future__ import annotations

import argparse

HELP = "export the backbone of a checkpoint to a backbone-only .safetensors file (timm-compatible keys)"
DESCRIPTION = """Export a backbone to .safetensors: no DINO head, no module./backbone./_orig_mod. prefixes,
the reference's key names (those of the official backbone releases and of timm's VisionTransformer), and the
architecture in the file's metadata (so `--weights backbone.safetensors` needs no --arch later).

examples:
  dinokit export --checkpoint run/checkpoint.pth --out vits16.safetensors
  dinokit export --checkpoint dino_vitbase16_full_checkpoint.pth --checkpoint-key student \\
      --out b16.safetensors

Loading the export in timm (no download; ViT-S/B with patch 16/8, ViT-Ti/16):
  timm.create_model("vit_small_patch16_224.dino", pretrained=True, num_classes=0,
                    pretrained_cfg_overlay=dict(file="vits16.safetensors"))"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="dinokit/official checkpoint, backbone state dict or safetensors file")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    parser.add_argument("--checkpoint-key", "--checkpoint_key", dest="checkpoint_key", default="teacher",
                        choices=["teacher", "student"],
                        help="network of a full checkpoint (default: teacher)")
    parser.add_argument("--arch", default=None, help="architecture; default: inferred")
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch size; default: inferred")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads of a custom-width ViT whose file does not record them (a bare state "
                             "dict); default: recorded, or the standard count for the width")


def run(args: argparse.Namespace) -> int:
    from ..export import export_backbone
    from ._common import check_output_file

    check_output_file(args.out, "--out")
    info = export_backbone(args.checkpoint, args.out, checkpoint_key=args.checkpoint_key, arch=args.arch,
                           patch_size=args.patch_size, num_heads=args.num_heads)
    arch = info["arch"] + (f"/{info['patch_size']}" if info.get("patch_size") else "")
    print(f"wrote {info['path']}: {arch}, {info['n_tensors']} tensors, "
          f"{info['n_params'] / 1e6:.2f}M parameters")
    if info.get("timm_name"):
        size = f"img_size={info['img_size']}, " if str(info.get("img_size") or 224) != "224" else ""
        print(f"timm: timm.create_model({info['timm_name']!r}, pretrained=True, num_classes=0, {size}"
              f"pretrained_cfg_overlay=dict(file={info['path']!r}))")
    return 0
