"""How spread out a run's teacher features are on the Fashion-MNIST test images (docs/small_data.md, table D).

For the CLS token and the average-pooled patch tokens (each L2-normalised, as the k-NN uses them): the effective
rank (exp of the entropy of the normalised singular values of the centred features), the mean cosine of random
pairs of test images, the mean cosine of each test image to its nearest other test image, and how often that
nearest neighbour has the same class. One JSON line per run directory.

    python benchmarks/feature_spread.py runs/demo [runs/other ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import FASHION_MNIST  # noqa: E402


def spread(z: torch.Tensor, y: torch.Tensor, pairs: int = 20000) -> dict[str, float]:
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum()
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(len(z), (pairs,), generator=g), torch.randint(len(z), (pairs,), generator=g)
    sim = z @ z.T
    sim.fill_diagonal_(-2.0)
    nn_cos, nn_idx = sim.max(1)
    return {"effective_rank": round(float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum())), 1), "dim": z.shape[1],
            "mean_pair_cos": round(float((z[i] * z[j]).sum(1).mean()), 3),
            "mean_nn_cos": round(float(nn_cos.mean()), 3),
            "nn_same_class_pct": round(float((y[nn_idx] == y).float().mean()) * 100, 2)}


def main() -> int:
    from dinokit.demo import _load_data, _normalisation, extract_token_features, feature_views, load_teacher_backbone

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories holding checkpoint.pth")
    ap.add_argument("--data", default=FASHION_MNIST)
    args = ap.parse_args()
    _, _, x, y = _load_data(args.data)
    for run in args.runs:
        backbone, cfg, _ = load_teacher_backbone(run)
        mean, std = _normalisation(cfg)
        views = feature_views(extract_token_features(backbone, x, cfg.global_crop_size, mean, std))
        print(json.dumps({"run": run, **{name: spread(views[name], y) for name in ("cls", "avgpool")}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
