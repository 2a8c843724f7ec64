"""A/B of the ViT backbone between two git revisions, interleaved in one process.

    python benchmarks/ab_backbone.py --base HEAD~1 [--arch vit_small] [--precision bf16] [--rounds 8] [--no-grad]
        [--json]

The student's share of a DINO step (2 global + 8 local crops through ``models/vit.py`` with drop path, then a
backward), or with ``--no-grad`` the forward without gradients in eval mode (the teacher's and feature
extraction's path), for the working tree's ViT and for revision BASE's (``git archive BASE src/dinokit``, imported
as a second package, so ``vit.py`` runs with that revision's ``linear.py``), both built from the same weights,
alternating round by round with a rotating order, so that load from other processes hits both alike. The verdict
is the ratio of the medians (``speedup`` > 1: the working tree is faster). Use it to decide whether a change to
the model's code is kept; the full-step verdicts against the reference are ``train_step.py``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import interleaved, median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (global crops, global size, local crops, local size) of the train_step configurations in run_all.py
SHAPES = {"vit_tiny": (64, 96, 256, 48), "vit_small": (16, 224, 64, 96), "vit_base": (16, 224, 64, 96)}


def load_revision(rev: str, tmp: Path):
    """``models/vit.py`` of ``rev`` with the rest of that revision's package (``vit.py`` imports ``.linear``
    since 2026-11-29): ``git archive`` of ``src/dinokit`` as the package ``dinokit_base`` in ``tmp``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/dinokit"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "src" / "dinokit").rename(tmp / "dinokit_base")
    sys.path.insert(0, str(tmp))
    try:
        return importlib.import_module("dinokit_base.models.vit")
    finally:
        sys.path.remove(str(tmp))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    ap.add_argument("--arch", default="vit_small", choices=sorted(SHAPES))
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--drop-path-rate", type=float, default=0.1)
    ap.add_argument("--no-grad", action="store_true",
                    help="the forward without gradients in eval mode (the teacher's and feature extraction's path)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from dinokit.models import vit as vit_new

    with tempfile.TemporaryDirectory() as tmp:
        vit_old = load_revision(a.base, Path(tmp))
        models = {}
        for name, mod in (("base", vit_old), ("work", vit_new)):
            torch.manual_seed(0)
            models[name] = getattr(mod, a.arch)(patch_size=a.patch_size, drop_path_rate=a.drop_path_rate).train()
        models["work"].load_state_dict(models["base"].state_dict())
    ng, gs, nl, ls = SHAPES[a.arch]
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(ng, 3, gs, gs, generator=g), torch.randn(nl, 3, ls, ls, generator=g)]

    if a.no_grad:
        for m in models.values():
            m.eval()

    def step(m):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16" else contextlib.nullcontext()
        if a.no_grad:
            with ctx, torch.no_grad():
                for c in crops:
                    m(c)
            return
        with ctx:
            out = torch.cat([m(c) for c in crops])
        out.float().square().sum().backward()
        m.zero_grad(set_to_none=True)

    for m in models.values():  # warm-up
        step(m)
    times = interleaved({name: functools.partial(step, m) for name, m in models.items()}, a.rounds)
    med = {n: median(v) for n, v in times.items()}
    rec = {"arch": a.arch, "patch_size": a.patch_size, "precision": a.precision, "base": a.base,
           "base_s": med["base"], "work_s": med["work"], "speedup": med["base"] / med["work"], "rounds": a.rounds,
           "no_grad": a.no_grad}
    if a.json:
        print(json.dumps(rec))
    else:
        print(f"{a.arch}/{a.patch_size} {a.precision}: {a.base} {med['base']:.4f} s, working tree {med['work']:.4f} s "
              f"-> x{rec['speedup']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
