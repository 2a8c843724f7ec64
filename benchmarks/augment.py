"""Multi-crop augmentation throughput per process on real photographs, side by side.

    python benchmarks/augment.py [--images DIR | --upscale 4] [--impl reference,dinokit,fast,lightly] [--json]

Each implementation turns a JPEG file into the 2 global (224 px) + 8 local (96 px) normalised crops, decoding
included, on one thread (what one data-loader worker does):

* ``reference``: ``benchmarks/reference_dino.py``'s re-creation of ``main_dino.DataAugmentationDINO`` (torchvision
  v1 transforms on PIL, PIL Gaussian blur and solarisation) after ImageFolder's ``pil_loader``;
* ``dinokit``: :class:`dinokit.augmentation.DINOAugmentation` (the same chain with torchvision v2) after
  :func:`dinokit.data.load_image`;
* ``fast``: :class:`dinokit.fast_augment.FastMultiCrop` given the path (JPEG draft decoding allowed);
* ``lightly``: ``lightly.transforms.DINOTransform(n_local_views=8)`` after ``pil_loader`` (skipped if missing).

Without ``--images``, skimage's sample photographs (astronaut, chelsea, coffee, rocket, hubble_deep_field,
immunohistochemistry, retina, stereo_motorcycle, camera) are re-encoded as ~500x375 JPEGs (quality 90) into
``$TMPDIR/dinokit-bench-photos`` (needs ``pip install scikit-image``; it is not a dinokit dependency).
Candidates are interleaved: every round passes over all photos once per implementation, the order rotating each
round; images/s is the median over rounds, the verdict is the ratio to ``reference``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, median, peak_rss_mib, run_main, spread  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "camera")
IMPLS = ("reference", "dinokit", "fast", "lightly")


def sample_photos(dest: Path, upscale: int = 1) -> list[Path]:
    """skimage's bundled photographs as ~500x375 JPEGs (landscape, or 375x500 portrait), made once; with
    ``upscale`` N, N times that size (bicubic; 4: 2000x1500, a phone camera's order of size)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = [dest / f"{n}.jpg" for n in PHOTOS]
    if all(p.is_file() for p in out):
        return out
    try:
        import skimage.data as data
    except ImportError as err:
        raise SystemExit("benchmarks/augment.py needs --images DIR or scikit-image (pip install scikit-image) for "
                         "its sample photographs") from err
    from PIL import Image

    for name, path in zip(PHOTOS, out):
        a = getattr(data, name)()
        if isinstance(a, tuple):
            a = a[0]
        im = Image.fromarray(a).convert("RGB")
        W, H = (500 * upscale, 375 * upscale) if im.width >= im.height else (375 * upscale, 500 * upscale)
        s = max(W / im.width, H / im.height)
        im = im.resize((max(W, round(im.width * s)), max(H, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - W) // 2, (im.height - H) // 2
        im.crop((left, top, left + W, top + H)).save(path, quality=90)
    return out


def build(impl: str, local_crops_number: int = 8):
    if impl == "reference":
        from reference_dino import DataAugmentationDINO, pil_loader

        aug = DataAugmentationDINO(local_crops_number=local_crops_number)
        return lambda path: aug(pil_loader(path))
    if impl == "dinokit":
        from dinokit.augmentation import DINOAugmentation
        from dinokit.data import load_image

        aug = DINOAugmentation(local_crops_number=local_crops_number)
        return lambda path: aug(load_image(path))
    if impl == "fast":
        from dinokit.fast_augment import FastMultiCrop

        aug = FastMultiCrop(local_crops_number=local_crops_number)
        return lambda path: aug(path)
    if impl == "lightly":
        import warnings

        from lightly.transforms import DINOTransform

        from reference_dino import pil_loader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aug = DINOTransform(n_local_views=local_crops_number)
        return lambda path: aug(pil_loader(path))
    raise SystemExit(f"unknown --impl {impl!r}; choose from {', '.join(IMPLS)}")


def available(impl: str) -> bool:
    if impl != "lightly":
        return True
    try:
        import lightly.transforms  # noqa: F401
    except Exception:
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=None, help="folder of images (default: skimage sample photos)")
    ap.add_argument("--impl", default=",".join(IMPLS), help="comma list of " + ", ".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--local-crops-number", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: one data-loader worker)")
    ap.add_argument("--upscale", type=int, default=1, help="sample photos N times larger (4: 2000x1500 JPEGs, where "
                    "JPEG draft decoding pays); not with --images")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    if a.upscale < 1 or (a.upscale != 1 and a.images is not None):
        raise SystemExit("--upscale takes a positive integer and applies to the sample photos only (not --images)")
    if a.rounds < 1 or a.threads < 1 or a.local_crops_number < 0:
        raise SystemExit("--rounds and --threads take positive integers, --local-crops-number one >= 0")
    if a.images is None:
        name = "dinokit-bench-photos" + ("" if a.upscale == 1 else f"-x{a.upscale}")
        files = sample_photos(Path(tempfile.gettempdir()) / name, a.upscale)
    else:
        exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
        files = sorted(p for p in a.images.rglob("*") if p.suffix.lower() in exts)
        if not files:
            raise SystemExit(f"no images under {a.images}")
        from dinokit.data import load_image
        from dinokit.errors import DataError

        unreadable = []
        for f in files:
            try:
                load_image(f)
            except DataError:
                unreadable.append(f)
        if unreadable:
            print(f"augment.py: warning: left out {len(unreadable)} unreadable image(s), e.g. {unreadable[0]}",
                  file=sys.stderr)
            files = [f for f in files if f not in unreadable]
        if not files:
            raise SystemExit(f"no readable images under {a.images}")
    impls = [i.strip() for i in a.impl.split(",") if i.strip()]
    if not impls:
        raise SystemExit(f"--impl names no implementation; choose from {', '.join(IMPLS)}")
    skipped = [i for i in impls if not available(i)]
    impls = [i for i in impls if i not in skipped]
    fns = {i: build(i, a.local_crops_number) for i in impls}
    torch.manual_seed(0)
    for fn in fns.values():  # warm-up (imports, first-call set-up)
        for f in files[:2]:
            fn(f)
    rates: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(a.rounds):
        k = r % len(impls)
        for i in impls[k:] + impls[:k]:
            t0 = time.perf_counter()
            for f in files:
                fns[i](f)
            rates[i].append(len(files) / (time.perf_counter() - t0))
    res = [{"impl": i, "img_per_s": median(v), "iqr_rel": spread(v), "rounds": len(v)} for i, v in rates.items()]
    by = {r["impl"]: r for r in res}
    ratios = {f"{i} vs reference": by[i]["img_per_s"] / by["reference"]["img_per_s"]
              for i in impls if i != "reference" and "reference" in by}
    if "fast" in by and "lightly" in by:
        ratios["fast vs lightly"] = by["fast"]["img_per_s"] / by["lightly"]["img_per_s"]
    record = {"img_per_s": res[0]["img_per_s"], "impl": res[0]["impl"], "results": res, "ratios": ratios,
              "images": len(files), "image_dir": str(a.images if a.images is not None else files[0].parent),
              "peak_rss_mib": peak_rss_mib(), "threads": a.threads,
              "local_crops_number": a.local_crops_number, "skipped": skipped,
              "command": " ".join(["python", "benchmarks/augment.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine_info()}
    if a.json:
        print(json.dumps(record))
        return 0
    print(f"{len(files)} photos from {files[0].parent}, {a.threads} thread(s), 2 x 224 + {a.local_crops_number} x 96:")
    for r in res:
        print(f"  {r['impl']:9s} {r['img_per_s']:7.1f} images/s  (IQR/median {r['iqr_rel']:.2f})")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    for s in skipped:
        print(f"  skipped: {s} (not installed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, "augment.py"))
