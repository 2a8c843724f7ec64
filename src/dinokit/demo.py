"""The Fashion-MNIST demo's evaluation (``make demo``, second half): ``python -m dinokit.demo --run-dir runs/demo``.

After ``dinokit train --config fashion_mnist_demo`` it

* loads ``RUN/checkpoint.pth`` (``weights_only=True``) and the run's ``config.yaml``;
* extracts the **teacher backbone** features of the 60k train and 10k test images (eval mode, fp32, no
  augmentation: the image at the training resolution, normalised like the training crops): the CLS token after
  the final norm, the average of the last block's patch tokens after the final norm, and their concatenation;
* runs the reference's weighted k-NN (k = 20, T = 0.07, cosine similarity of L2-normalised features, the
  60k train set as the bank, the 10k test set classified) for each feature, for the same architecture at its
  random initialisation (the run's seed, built exactly as the trainer builds it), and for raw pixels;
* writes ``RUN/results.json``, prints a summary table, and writes the run report when ``dinokit.report`` exists.

``knn_top1`` is the **concatenation** feature (see :data:`HEADLINE_FEATURE`): CLS and average-pooled patch tokens,
each L2-normalised, concatenated, L2-normalised again (equal weight for the two halves). Why this one, decided
before the final runs: it is the whole last-layer representation of the ViT (the reference's ``eval_linear.py``
uses CLS + average-pooled patches for ViT-B for the same reason), with 16 patch tokens per image the CLS token
alone is a small part of it, and on a held-out split of the *training* set (never the test set) it was the best
or tied-best of the three in every ablation run (docs/small_data.md). CLS and average-pooled numbers are reported
next to it.

``knn_top1_raw_pixels``: the same k-NN on the pixels scaled to [0, 1] and L2-normalised (784 values): 84.59%, the
84.6% of the issue. ``knn_top1_raw_pixels_standardized`` (pixels minus the data set's mean, divided by its std,
then L2-normalised: 85.69%) is reported as well, since "normalised pixels" can mean either.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import DinokitError

__all__ = ["HEADLINE_FEATURE", "FEATURES", "evaluate_run", "extract_token_features", "feature_views",
           "knn_features", "raw_pixel_features", "load_teacher_backbone", "random_init_backbone", "knn_curve",
           "training_stats", "format_summary", "main"]

#: The feature ``knn_top1`` reports (fixed in advance; see the module docstring).
HEADLINE_FEATURE = "concat"
FEATURES = ("cls", "avgpool", "concat")
#: Fashion-MNIST training-set pixel statistics (for the standardised raw-pixel baseline).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


# ------------------------------------------------------------------------------------------------- models

def _config_from_run(run_dir: Path, ckpt: dict | None = None):
    from .config import TrainConfig, apply_overrides, load_yaml

    raw = None
    if ckpt is not None and isinstance(ckpt.get("config"), dict):
        raw = ckpt["config"]
    elif (run_dir / "config.yaml").is_file():
        raw = load_yaml(run_dir / "config.yaml")
    if raw is None:
        raise FileNotFoundError(f"no config in {run_dir} (config.yaml) nor in its checkpoint")
    known = {f for f in TrainConfig.__dataclass_fields__}
    return apply_overrides(TrainConfig(), {k: v for k, v in raw.items() if k in known})


def load_teacher_backbone(run_dir: str | Path, key: str = "teacher"):
    """``(backbone, cfg, checkpoint)``: the ``key`` (teacher/student) backbone of ``RUN/checkpoint.pth``, loaded
    with ``weights_only=True`` into the architecture of the run's config, in eval mode. When that file is
    missing or unusable (truncated, foreign), the newest intact ``checkpointNNNN.pth``, as a resume would take,
    with a warning naming both; the checkpoint's file name is in ``checkpoint["_path"]``."""
    import warnings

    from .checkpoint import checkpoint_candidates
    from .errors import CheckpointError, ConfigError
    from .trainer import build_student_teacher
    from .weights import safe_load

    run_dir = Path(run_dir)
    candidates = checkpoint_candidates(run_dir)
    if not candidates:
        raise FileNotFoundError(f"{run_dir / 'checkpoint.pth'} not found: train first (dinokit train ... "
                                f"--output-dir {run_dir})")
    first_error = None
    for path in candidates:
        try:
            ckpt = safe_load(path)  # a corrupt or foreign file: one CheckpointError naming it
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
                raise CheckpointError(f"{path} is not a dinokit training checkpoint (no {key!r} network)")
            break
        except CheckpointError as e:
            first_error = first_error or e
    else:
        raise first_error
    if first_error is not None:
        warnings.warn(f"dinokit: {first_error}; evaluating {path.name}, the newest intact checkpoint", stacklevel=2)
    ckpt["_path"] = path.name
    cfg = _config_from_run(run_dir, ckpt)
    student, teacher, _ = build_student_teacher(cfg)
    backbone = teacher.backbone if key == "teacher" else student.backbone
    if not hasattr(backbone, "get_intermediate_layers"):
        raise ConfigError(f"the demo's evaluation (CLS and patch-token features) needs a ViT run; {run_dir} trained "
                          f"{cfg.arch}: use dinokit knn --weights {path} instead")
    state = {k[len("backbone."):]: v for k, v in ckpt[key].items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the run's config ({str(e).splitlines()[0]})") from None
    return backbone.eval(), cfg, ckpt


def random_init_backbone(cfg):
    """The backbone at initialisation, as the trainer builds it for ``cfg.seed`` (``torch.manual_seed(seed)`` then
    :func:`dinokit.trainer.build_student_teacher`; the teacher starts as a copy of the student)."""
    from .trainer import build_student_teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        _, teacher, _ = build_student_teacher(cfg)
    return teacher.backbone.eval()


# ------------------------------------------------------------------------------------------------ features

def _normalisation(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from .augmentation import IMAGENET_MEAN, IMAGENET_STD

    mean = tuple(getattr(cfg, "norm_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(cfg, "norm_std", None) or IMAGENET_STD)
    return mean, std


def eval_batch(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 ``[B, H, W]`` or ``[B, C, H, W]`` -> float ``[B, 3, size, size]``: scaled to [0, 1], resized (bicubic,
    antialiased, clamped) when ``size`` differs, grey replicated to RGB, normalised with ``mean``/``std`` (what
    the training crops get from :class:`dinokit.augmentation.BatchMultiCrop`, without the augmentation)."""
    x = images
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = x.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_token_features(backbone, images: torch.Tensor, size: int, mean, std, batch_size: int = 1000
                           ) -> dict[str, torch.Tensor]:
    """CLS token and average-pooled patch tokens of the last block (both after the final norm), fp32, for all
    ``images`` (uint8). Returns ``{"cls": [N, D], "avgpool": [N, D]}`` (not normalised)."""
    was_training = backbone.training
    backbone.eval()
    cls, avg = [], []
    try:
        for start in range(0, len(images), batch_size):
            x = eval_batch(images[start:start + batch_size], size, mean, std)
            tokens = backbone.get_intermediate_layers(x, 1)[-1].float()
            cls.append(tokens[:, 0])
            avg.append(tokens[:, 1:].mean(dim=1))
    finally:
        backbone.train(was_training)
    return {"cls": torch.cat(cls), "avgpool": torch.cat(avg)}


def feature_views(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three L2-normalised features: ``cls``, ``avgpool`` and ``concat`` (each half L2-normalised, then
    concatenated and L2-normalised again, i.e. both halves weigh the same in the cosine similarity)."""
    from .eval.knn import concat_features

    return {"cls": F.normalize(f["cls"].float(), dim=1), "avgpool": F.normalize(f["avgpool"].float(), dim=1),
            "concat": concat_features(f["cls"], f["avgpool"])}


def raw_pixel_features(images: torch.Tensor, standardize: bool = False) -> torch.Tensor:
    """Pixels scaled to [0, 1] (optionally standardised with the Fashion-MNIST mean/std), flattened, L2-normalised."""
    x = images.reshape(len(images), -1).float().div(255.0)
    if standardize:
        x = (x - FMNIST_MEAN) / FMNIST_STD
    return F.normalize(x, dim=1)


def knn_features(train: dict[str, torch.Tensor], train_y: torch.Tensor, test: dict[str, torch.Tensor],
                 test_y: torch.Tensor, k: int = 20, T: float = 0.07) -> dict[str, dict[str, float]]:
    """Weighted k-NN (:func:`dinokit.eval.knn.knn_classifier`) for every feature in ``train``/``test`` (already
    L2-normalised). Returns ``{name: {"top1": %, "top5": %}}``."""
    from .eval.knn import knn_classifier

    out = {}
    for name in train:
        top1, top5 = knn_classifier(train[name], train_y, test[name], test_y, k, T)
        out[name] = {"top1": float(top1), "top5": float(top5)}
    return out


def _eval_backbone(backbone, train_x, train_y, test_x, test_y, size, mean, std, k, T, batch_size):
    t0 = time.perf_counter()
    ftr = feature_views(extract_token_features(backbone, train_x, size, mean, std, batch_size))
    fte = feature_views(extract_token_features(backbone, test_x, size, mean, std, batch_size))
    t1 = time.perf_counter()
    res = knn_features(ftr, train_y, fte, test_y, k, T)
    return res, t1 - t0, time.perf_counter() - t1


# ----------------------------------------------------------------------------------------------- the log

def knn_curve(run_dir: str | Path) -> list[dict[str, float]]:
    """The online k-NN monitor's records of ``RUN/log.jsonl``: ``[{train_minutes, epoch, iteration, knn_top1}]``
    (on the monitor's subsets, CLS feature)."""
    out = []
    from .report import read_log

    for r in read_log(run_dir):
        if r.get("type") == "knn" and "knn_top1" in r:
            out.append({"train_minutes": round(float(r.get("train_minutes", math.nan)), 3),
                        "epoch": r.get("epoch"), "iteration": r.get("iteration"),
                        "knn_top1": float(r["knn_top1"]), "n_train": r.get("knn_n_train"),
                        "n_val": r.get("knn_n_val")})
    return out


def training_stats(run_dir: str | Path, ckpt: dict, cfg) -> dict[str, Any]:
    """Training minutes, images/s, epochs (fractional: iterations / iterations per epoch), iterations and the
    data-wait fraction (time-weighted over the epochs' log records), from the checkpoint and the log."""
    from .report import read_log

    records = read_log(run_dir)
    epochs_rec = [r for r in records if r.get("type") == "epoch"]
    seconds = float(ckpt.get("train_seconds", 0.0))
    iterations = int(ckpt.get("iteration", 0))
    plan = ckpt.get("plan") or {}
    niter = int(plan.get("niter_per_ep") or 0)
    world = int(ckpt.get("world") or 1)  # recorded by checkpoints since 2026-11-29; the demo runs one process
    global_batch = cfg.batch_size_per_gpu * world
    wait, total, prev = 0.0, 0.0, 0.0
    for r in epochs_rec:
        m = float(r.get("train_minutes") if r.get("train_minutes") is not None else prev)
        dt = max(m - prev, 0.0)
        prev = m
        wait += dt * float(r.get("data_wait_frac") or 0.0)  # None: no step of that epoch ran after a resume
        total += dt
    # the last measured epoch loss: a resumed epoch with no step of its own logs images_per_s 0 and a loss of 0
    losses = [r.get("loss") for r in epochs_rec if r.get("images_per_s") != 0]
    losses = [float(v) for v in losses if isinstance(v, (int, float)) and not isinstance(v, bool)]
    final_loss = losses[-1] if losses else math.nan
    return {
        "train_minutes": seconds / 60.0,
        "iterations": iterations,
        "epochs": iterations / niter if niter else float(len(epochs_rec)),
        "epochs_completed": int(ckpt.get("epoch", len(epochs_rec))),
        "images_seen": iterations * global_batch,
        "images_per_second": iterations * global_batch / seconds if seconds > 0 else math.nan,
        "data_wait_fraction": wait / total if total > 0 else math.nan,
        "final_loss": final_loss,
    }


# ------------------------------------------------------------------------------------------------- driver

def _load_data(spec: str):
    from .data import build_dataset

    train = build_dataset(spec, split="train")
    test = build_dataset(spec, split="test")
    for name, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "images") or not getattr(ds, "has_labels", False):
            raise ValueError(f"the demo evaluation needs a labelled tensor data set (fashion-mnist:DIR); "
                             f"{spec} {name} is not")
    return train.images, train.labels, test.images, test.labels


def evaluate_run(run_dir: str | Path, data: str, k: int = 20, T: float = 0.07, batch_size: int = 1000,
                 random_init: bool = True, raw_pixels: bool = True, write: bool = True,
                 val_split: int = 0) -> dict[str, Any]:
    """Evaluate a finished run (see the module docstring) and write ``RUN/results.json``.

    ``val_split > 0`` (recipe development only): classify the *last* ``val_split`` training images with the
    others as the bank, instead of test with train; the test set is then not touched."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    backbone, cfg, ckpt = load_teacher_backbone(run_dir)
    train_x, train_y, test_x, test_y = _load_data(data)
    if val_split:
        test_x, test_y = train_x[-val_split:], train_y[-val_split:]
        train_x, train_y = train_x[:-val_split], train_y[:-val_split]
    if k > len(train_y):
        import warnings

        warnings.warn(f"dinokit: --k {k} above the {len(train_y)} train images: the vote uses all of them",
                      stacklevel=2)
    size = cfg.global_crop_size
    mean, std = _normalisation(cfg)
    args = (train_x, train_y, test_x, test_y, size, mean, std, k, T, batch_size)
    trained, extract_s, knn_s = _eval_backbone(backbone, *args)
    res: dict[str, Any] = {
        "knn_top1": trained[HEADLINE_FEATURE]["top1"],
        "knn_feature": HEADLINE_FEATURE,
        "knn_feature_description": "teacher backbone, last block: CLS token and mean of the patch tokens (both "
                                   "after the final norm), each L2-normalised, concatenated, L2-normalised",
        "knn_top5": trained[HEADLINE_FEATURE]["top5"],
    }
    for name in FEATURES:
        res[f"knn_top1_{name}"] = trained[name]["top1"]
    res["knn"] = trained
    if random_init:
        rand, _, _ = _eval_backbone(random_init_backbone(cfg), *args)
        res["knn_top1_random_init"] = rand[HEADLINE_FEATURE]["top1"]
        for name in FEATURES:
            res[f"knn_top1_random_init_{name}"] = rand[name]["top1"]
        res["knn_random_init"] = rand
    if raw_pixels:
        res["knn_top1_raw_pixels"] = knn_features({"px": raw_pixel_features(train_x)}, train_y,
                                                  {"px": raw_pixel_features(test_x)}, test_y, k, T)["px"]["top1"]
        res["knn_top1_raw_pixels_standardized"] = knn_features(
            {"px": raw_pixel_features(train_x, True)}, train_y, {"px": raw_pixel_features(test_x, True)}, test_y,
            k, T)["px"]["top1"]
    res.update(training_stats(run_dir, ckpt, cfg))
    res["knn_curve"] = knn_curve(run_dir)
    res["knn_protocol"] = {"k": k, "k_used": min(k, len(train_y)), "T": T, "n_train": len(train_y),
                           "n_test": len(test_y),
                           "split": f"train[:-{val_split}] -> train[-{val_split}:]" if val_split else
                           f"train ({_thousands(len(train_y))}) -> test ({_thousands(len(test_y))})",
                           "image_size": size, "precision": "fp32",
                           "checkpoint_key": "teacher", "checkpoint": ckpt["_path"]}
    res["eval_seconds"] = {"features": extract_s, "knn": knn_s, "total": time.perf_counter() - t_start}
    res["config"] = {k_: getattr(cfg, k_) for k_ in (
        "arch", "patch_size", "embed_dim", "depth", "num_heads", "out_dim", "batch_size_per_gpu",
        "global_crop_size", "local_crop_size", "local_crops_number", "precision", "seed", "time_budget_minutes")}
    res["config"]["params_backbone_M"] = sum(p.numel() for p in backbone.parameters()) / 1e6
    res["machine"] = {"cpu_count": _cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if write:
        from .commands._common import write_json

        write_json(run_dir / "results.json", res)
    return res


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def _thousands(n: int) -> str:
    """``60000`` -> ``"60k"``; other counts as they are."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def format_summary(res: dict[str, Any]) -> str:
    """The console table: k-NN top-1 per feature for the trained teacher and the random init, raw pixels, and
    the training figures."""
    proto = res["knn_protocol"]
    labels = {"cls": "CLS token", "avgpool": "average-pooled patch tokens", "concat": "CLS + avg-pooled (concatenated)"}
    raw = (("knn_top1_raw_pixels", "raw pixels (L2-normalised)"),
           ("knn_top1_raw_pixels_standardized", "raw pixels (standardised, L2-norm.)"))
    w = max(len(t) for t in ["features", *labels.values(), *(t for _, t in raw)]) + 2  # every label fits

    def pct(v, width):
        return f"{v:>{width - 1}.2f}%" if v is not None else f"{'-':>{width}}"

    lines = ["", f"DINO on Fashion-MNIST: weighted k-NN (k={proto['k']}, T={proto['T']:g}), {proto['split']}",
             f"{'features':<{w}}{'trained':>10}{'random init':>13}"]
    for name in FEATURES:
        mark = "  <- knn_top1" if name == res["knn_feature"] else ""
        lines.append(f"{labels[name]:<{w}}{pct(res['knn_top1_' + name], 10)}"
                     f"{pct(res.get(f'knn_top1_random_init_{name}'), 13)}{mark}")
    for key, label in raw:
        if key in res:  # a property of the pixels: no random-init column
            lines.append(f"{label:<{w}}{pct(res[key], 10)}{pct(None, 13)}")
    from .trainer import format_duration

    def number(v, fmt: str, scale: float = 1.0) -> str:  # n/a for a figure the run's files do not give
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return format(scale * v, fmt) if ok else "n/a"

    wait = number(res.get("data_wait_fraction"), ".1f", 100)
    lines.append(f"training: {format_duration(60 * res['train_minutes'])}, {res['epochs']:.2f} epochs "
                 f"({res['iterations']} iterations), {number(res.get('images_per_second'), '.0f')} images/s, "
                 f"data wait {wait}{'' if wait == 'n/a' else '%'}")
    if res.get("knn_curve"):
        pts = ", ".join(f"{format_duration(60 * p['train_minutes'])} {p['knn_top1']:.1f}%" for p in res["knn_curve"])
        lines.append(f"online k-NN (CLS, subset): {pts}")
    if "knn_top1_raw_pixels" in res:
        diff = res["knn_top1"] - res["knn_top1_raw_pixels"]
        where = "above" if diff > 0 else "below"
        lines.append(f"=> DINO features ({res['knn_feature']}): {abs(diff):.2f} points {where} raw pixels")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dinokit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="the training output directory (checkpoint.pth)")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist:DIR (default: the installed copy)")
    p.add_argument("--k", type=int, default=20,
                   help="neighbours that vote in the weighted k-NN, from the train-set bank (default: 20)")
    p.add_argument("--T", type=float, default=0.07,
                   help="temperature of the k-NN vote: each neighbour weighs exp(cosine similarity / T) "
                        "(default: 0.07)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="images per forward pass when extracting the features: a memory and speed setting "
                        "(default: 1000)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-initialisation baseline")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML run report")
    p.add_argument("--val-split", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for opt, value, ok, what in (("--k", args.k, args.k >= 1, ">= 1"), ("--T", args.T, args.T > 0, "> 0"),
                                 ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1")):
        if not ok or not math.isfinite(value):
            p.error(f"{opt} must be {what}, got {value:g}")
    from .cli import one_line_warnings

    try:
        with one_line_warnings("dinokit.demo"):
            res = evaluate_run(args.run_dir, args.data, k=args.k, T=args.T, batch_size=args.batch_size,
                               random_init=not args.no_random_init, val_split=args.val_split)
    except DinokitError as e:  # bad data, a corrupt or foreign checkpoint, a run that is not a ViT
        print(f"dinokit.demo: error: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, ValueError) as e:
        print(f"dinokit.demo: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(res))
    print(f"results: {Path(args.run_dir) / 'results.json'}")
    if not args.no_report:
        try:
            from .report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            try:
                path = write_report(args.run_dir)
                print(f"report: {path or Path(args.run_dir) / 'report.html'}")
            except Exception as e:  # the numbers above stand without the report
                print(f"report not written: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
