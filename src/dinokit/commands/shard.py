"""``dinokit shard``: write a folder of images as WebDataset tar shards for streaming training."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..console import eprint, stderr_is_tty
from ..errors import ConfigError

HELP = "write a folder of images as WebDataset tar shards (for --data 'SHARDS/{000000..NNNNNN}.tar')"
DESCRIPTION = """Write the images of a folder (class sub-folders optional) into uncompressed tar shards in the
WebDataset layout: <key>.jpg|png (original JPEG/PNG bytes; other formats re-encoded as PNG) and <key>.json
({"path", "label", "class"}; label/class only with class sub-folders), plus OUT/index.json listing every shard
and its sample count (the trainer reads the total from it). Unreadable images are skipped with a warning.

examples:
  dinokit shard --data ~/imagenet/train --out shards/in1k --maxcount 1000
  dinokit train --data 'shards/in1k/{000000..001281}.tar' --output-dir runs/in1k ...
  dinokit train --data shards/in1k --output-dir runs/in1k ...      # a directory with index.json: all shards

Images are written in a seeded random order (--no-shuffle keeps the folder order): streaming training shuffles
the shard order every epoch and samples within a buffer, which does not undo a class-sorted layout."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", "--data-path", dest="data", required=True, metavar="DIR",
                        help="folder of images (class sub-folders optional)")
    parser.add_argument("--out", "--output-dir", dest="out", required=True, metavar="DIR",
                        help="where NNNNNN.tar and index.json are written")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--maxsize-mb", type=float, default=1024.0,
                        help="start a new shard before one exceeds this size in MB (default: 1024)")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                        help="write the images in a seeded random order (default: on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the write order (default: 0)")


def run(args: argparse.Namespace) -> int:
    from ..shards import INDEX_NAME, write_shards
    from ._common import check_output_dir

    if args.maxcount <= 0 or args.maxsize_mb <= 0:
        raise ConfigError("--maxcount and --maxsize-mb must be positive")
    out = check_output_dir(args.out, "--out")
    if out.exists() and any(out.glob("*.tar")):
        raise ConfigError(f"{out} already holds .tar files; use an empty --out directory")
    if (out / INDEX_NAME).exists():  # a file of the user's (dinokit's index comes with its .tar files)
        raise ConfigError(f"{out / INDEX_NAME} exists and would be replaced by the shards' index; use an empty --out "
                          "directory")
    data = Path(args.data).expanduser()
    if data.is_dir() and (out.resolve() == data.resolve() or data.resolve() in out.resolve().parents):
        raise ConfigError(f"--out {out} is inside --data {data}: the shards would become part of the images they "
                          "were made from (a class folder of their own next time); give a folder outside it")
    t0 = time.perf_counter()
    tty = stderr_is_tty()

    def progress(done: int, total: int) -> None:
        if tty and (done % 200 == 0 or done == total):
            eprint(f"\r{done}/{total} images", end="" if done < total else "\n")

    index = write_shards(args.data, out, maxcount=args.maxcount, maxsize=int(args.maxsize_mb * 2**20),
                         shuffle=args.shuffle, seed=args.seed, progress=progress)
    n = len(index["shards"])
    last = index["shards"][-1]["name"].removesuffix(".tar")
    print(f"wrote {index['total']} images in {n} shards to {out} ({time.perf_counter() - t0:.1f} s; "
          f"{index.get('skipped', 0)} unreadable skipped); index: {out / INDEX_NAME}")
    print(f"train with: --data '{out}/{{000000..{last}}}.tar'")
    return 0
