"""``dinokit report RUN_DIR``: write RUN_DIR/report.html (curves, attention maps, feature projection, config)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ._common import check_positive

HELP = "write a self-contained HTML report of a training run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the training output directory (holds log.jsonl, checkpoint.pth)")
    parser.add_argument("--images", type=int, default=8,
                        help="test images in the attention grid (default: 8; 0: no attention grid)")
    parser.add_argument("--points", type=int, default=1000, help="test images in the projection (default: 1000)")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="images for the attention grid and the projection (a folder, fashion-mnist[:DIR]; "
                             "default: the run's k-NN validation data, else its training data)")


def run(args: argparse.Namespace) -> int:
    from ..report import write_report

    if args.images < 0:
        raise ConfigError(f"--images must be >= 0, got {args.images}")
    check_positive("--points", args.points)
    if args.data:  # asked for explicitly: a missing folder is an error, not a note in the page
        from pathlib import Path

        from ..errors import DataError

        where = args.data.split(":", 1)[1] if args.data.startswith("fashion-mnist:") else args.data
        if where and "{" not in where and not Path(where).expanduser().exists():
            raise DataError(f"--data {args.data}: {where} does not exist")
    path = write_report(args.run_dir, n_images=args.images, projection_points=args.points, data=args.data)
    print(f"report: {path}")
    return 0
