"""``dinokit retrieval``: revisited Oxford/Paris mAP (Easy/Medium/Hard, mP@1/5/10) or place-recognition
Recall@1/5/10 of a frozen backbone. Protocol: :mod:`dinokit.eval.retrieval` (reference §4.7)."""

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

HELP = "image retrieval (revisited Oxford/Paris mAP) or place recognition (Recall@k) with frozen features"
DESCRIPTION = """Image retrieval with frozen features (DINO paper, Table 5).

examples:
  dinokit retrieval --weights dino_vits16.pth --dataset roxford5k --root data/roxford5k --imsize 224
  dinokit retrieval --weights dino_vits16.pth --dataset rparis6k --root data/rparis6k --imsize 512 --multiscale
  dinokit retrieval --weights run/checkpoint.pth --dataset folder --root data/places --whiten data/places/train

Revisited datasets (roxford5k, rparis6k): ROOT/gnd_<dataset>.json or .pkl (revisitop's file; read with a
restricted unpickler) and ROOT/jpg/<name>.jpg. Reports mAP and mP@1/5/10 for the Easy, Medium and Hard
protocols. As in the reference, queries are not cropped to their boxes unless --query-crop.
Place recognition (folder): ROOT/queries/, ROOT/database/ and ROOT/positives.json (query file -> list of
database files) or ROOT/ground_truth.csv (query,db1[,db2...]); reports Recall@1/5/10 and mAP.
Metrics are printed in percent and written as fractions to the JSON file (--output)."""


# ------------------------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, batch_size=None)
    parser.add_argument("--dataset", required=True, choices=["roxford5k", "rparis6k", "folder"],
                        help="revisited Oxford/Paris, or a query/database folder for place recognition")
    parser.add_argument("--root", "--data-path", dest="root", required=True, metavar="DIR", help="dataset folder")
    parser.add_argument("--imsize", type=int, default=224,
                        help="thumbnail size: longer side <= imsize, aspect kept (default: 224, the reference's "
                             "for ROxford; 512 with --multiscale for RParis)")
    parser.add_argument("--multiscale", action="store_true",
                        help="average descriptors at scales 1, 1/sqrt(2), 1/2 (reference utils.multi_scale)")
    parser.add_argument("--descriptor", choices=["cls", "gem", "cls+gem"], default="cls",
                        help="CLS token (reference), GeM(p=4) of the patch tokens, or both (default: cls)")
    parser.add_argument("--whiten", nargs="?", const="", default=None, metavar="DIR",
                        help="learn PCA whitening on the images of DIR (default DIR: ROOT/whitening); off by "
                             "default, as in the reference")
    parser.add_argument("--whiten-mode", choices=["reference", "centered"], default="reference",
                        help="reference: uncentred second moment as DINO's copy-detection script; centered: "
                             "textbook PCA whitening")
    add_whiten_dim_argument(parser)
    parser.add_argument("--query-crop", action="store_true",
                        help="crop queries to their ground-truth boxes (standard revisitop; the DINO reference "
                             "does not)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="JSON result file (default: ./retrieval_<dataset>.json)")


def run(args: argparse.Namespace) -> int:
    from ..eval.retrieval import evaluate_place_recognition, evaluate_revisited

    root = Path(args.root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist")
    if args.imsize < 1:
        raise ConfigError("--imsize must be positive")
    check_whiten_dim(args)
    output = check_output_file(args.output or f"retrieval_{args.dataset}.json", "--output",
                               files={"--weights": args.weights}, roots={"--root": root, "--whiten": args.whiten})
    whiten_dir = None
    if args.whiten is not None:
        whiten_dir = Path(args.whiten) if args.whiten else root / "whitening"
        if not whiten_dir.is_dir():
            raise DataError(f"whitening folder {whiten_dir} does not exist")
    model = load_model(args, need_patches=args.descriptor != "cls")
    device = resolve_device(args.device)
    common = dict(imsize=args.imsize, multiscale=args.multiscale, descriptor=args.descriptor, whiten_dir=whiten_dir,
                  whiten_mode=args.whiten_mode, whiten_dim=args.whiten_dim, device=device,
                  num_workers=args.num_workers, progress=not args.no_progress)
    if args.dataset == "folder":
        res = evaluate_place_recognition(model, root, **common)
        rows = [["Recall@" + k, pct(v)] for k, v in res["recall@k"].items()] + [["mAP", pct(res["mAP"])]]
        table = format_table([f"place recognition ({res['n_scored_queries']} queries, {res['n_database']} db)",
                              "%"], rows, left_first=True)
    else:
        res = evaluate_revisited(model, root, args.dataset, query_crop=args.query_crop, **common)
        ks = list(res["mP@k"]["medium"])
        rows = [[name.capitalize(), pct(res["mAP"][name]), *(pct(res["mP@k"][name][k]) for k in ks)]
                for name in ("easy", "medium", "hard")]
        table = format_table([f"{args.dataset} ({res['n_queries']} queries, {res['n_database']} db)", "mAP",
                              *(f"mP@{k}" for k in ks)], rows, left_first=True)
    print(table)
    res["model"] = model_info(args, model)
    out = write_json(output, res)
    print(f"results written to {out}")
    return 0
