"""``dinokit copydetect``: Copydays-style copy detection mAP with CLS + GeM descriptors and optional PCA
whitening. Protocol: :mod:`dinokit.eval.copydetect` (reference §4.6)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError, DataError
from ._common import (
    add_model_arguments,
    add_whiten_dim_argument,
    check_output_file,
    check_whiten_dim,
    format_table,
    load_model,
    model_info,
    pct,
    resolve_device,
    write_json,
)

HELP = "copy detection (Copydays mAP) with CLS+GeM descriptors and PCA whitening"
DESCRIPTION = """Copy detection with frozen features (DINO paper, Table 6).

examples:
  dinokit copydetect --weights dino_vitb8.pth --root data/copydays --whiten data/yfcc_20k --distractors-dir
      data/yfcc_10k --imsize 320
  dinokit copydetect --weights run/checkpoint.pth --root data/mycopies --whiten --distractors 500

ROOT holds original/ (the database originals) and one folder per query block (Copydays: strong/,
jpegqual/<q>/, crops/<pct>/; any names work), optionally distractors/ and whitening/. A query matches the
original with its file name (in strong/, or when no original has its name: the originals sharing its first 4
characters). Each image is
resized to IMSIZE x IMSIZE (bicubic); descriptor = CLS + GeM(p=4) of the last block's patch tokens; search keeps
the top 20 results (--topk); mAP (Holidays AP) is printed per block and overall (all blocks except original).
Metrics are printed in percent and written as fractions to the JSON file (--output)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, batch_size=None)
    parser.add_argument("--root", "--data-path", dest="root", required=True, metavar="DIR",
                        help="copy-detection folder: original/ + query-block folders")
    parser.add_argument("--imsize", type=int, default=320, help="square input size (default: 320)")
    parser.add_argument("--descriptor", choices=["cls", "gem", "cls+gem"], default="cls+gem",
                        help="default cls+gem, as the reference")
    parser.add_argument("--whiten", nargs="?", const="", default=None, metavar="DIR",
                        help="learn PCA whitening on the images of DIR (default DIR: ROOT/whitening)")
    parser.add_argument("--whiten-mode", choices=["reference", "centered"], default="reference",
                        help="reference: uncentred second-moment matrix, mean subtracted before projection (the "
                             "DINO script); centered: textbook PCA whitening")
    add_whiten_dim_argument(parser)
    parser.add_argument("--distractors", type=int, default=None, metavar="N",
                        help="add the first N images of the distractor folder to the database (default: all of "
                             "them when the folder exists; 0 = none)")
    parser.add_argument("--distractors-dir", default=None, metavar="DIR", help="default: ROOT/distractors")
    parser.add_argument("--topk", type=int, default=20,
                        help="results scored per query, as the reference's 20; 0 = the whole ranking")
    parser.add_argument("--blocks", nargs="+", default=None, metavar="NAME",
                        help="only these query blocks (e.g. strong jpegqual/50)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="JSON result file (default: ./copydetect_results.json)")


def run(args: argparse.Namespace) -> int:
    from ..eval.copydetect import evaluate_copy_detection

    root = Path(args.root)
    if not root.is_dir():
        raise DataError(f"copy-detection root {root} does not exist")
    if args.imsize < 1 or args.batch_size < 1 or args.topk < 0:
        raise ConfigError("--imsize and --batch-size must be positive, --topk >= 0")
    if args.distractors is not None and args.distractors < 0:
        raise ConfigError("--distractors must be >= 0")
    check_whiten_dim(args)
    output = check_output_file(args.output or "copydetect_results.json", "--output", files={"--weights": args.weights},
                               roots={"--root": root, "--whiten": args.whiten,
                                      "--distractors-dir": args.distractors_dir})
    whiten_dir = None
    if args.whiten is not None:
        whiten_dir = Path(args.whiten) if args.whiten else root / "whitening"
        if not whiten_dir.is_dir():
            raise DataError(f"whitening folder {whiten_dir} does not exist")
    model = load_model(args, need_patches=args.descriptor != "cls")
    res = evaluate_copy_detection(model, root, imsize=args.imsize, descriptor=args.descriptor, whiten_dir=whiten_dir,
                                  whiten_mode=args.whiten_mode, whiten_dim=args.whiten_dim,
                                  distractors_dir=args.distractors_dir, n_distractors=args.distractors,
                                  topk=args.topk or None, blocks=args.blocks, batch_size=args.batch_size,
                                  device=resolve_device(args.device), num_workers=args.num_workers,
                                  progress=not args.no_progress)
    rows = [[name, pct(b["mAP"]), str(b["n_queries"])] for name, b in res["blocks"].items()]
    rows.append(["overall (without original)", pct(res["overall"]["mAP"]), str(res["overall"]["n_queries"])])
    wh = "no whitening" if res["whitening"] is None else f"whitening: {args.whiten_mode}"
    print(format_table([f"block ({res['n_database']} db images, {res['n_distractors']} distractors, {wh})",
                        "mAP", "queries"], rows, left_first=True))
    res["model"] = model_info(args, model)
    out = write_json(output, res)
    print(f"results written to {out}")
    return 0
