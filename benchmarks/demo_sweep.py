"""Experiment driver for the Fashion-MNIST demo recipe (docs/small_data.md).

Each run: ``dinokit train --config BASE --set ...`` in a subprocess for a time budget, then the demo's k-NN
evaluation of the teacher. Recipe choices are made on a validation split of the *training* set (the last 10k
training images classified with the first 50k as the bank; ``--val-split``), never on the test set; ``--test``
evaluates on train -> test instead (final runs only). One JSON line per run is appended to ``--log``.

    python benchmarks/demo_sweep.py --name base --minutes 3
    python benchmarks/demo_sweep.py --name lr3e-3 --minutes 3 --set lr=0.003 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import FASHION_MNIST as DATA  # noqa: E402
from _common import demo_config  # noqa: E402


def train_images(base: str, sets: list[str], out: str, images: int, seed: int) -> None:
    """Train for exactly ``images`` images (rounded down to whole batches), every schedule planned for that many
    iterations as the time budget would plan them: an *iteration-matched* run, independent of the machine's
    load. Writes OUT/sweep_train.json with the wall and CPU seconds of ``fit``."""
    import math
    import resource

    sys.path.insert(0, str(ROOT / "src"))
    from dinokit.trainer import Plan, Trainer

    cfg = demo_config(sets, base, data_path=DATA, output_dir=out, seed=seed, time_budget_minutes=0, epochs=1000)
    tr = Trainer(cfg)
    total = max(images // tr.global_batch, 1)
    tr.plan = Plan(tr.plan.niter_per_ep, math.ceil(total / tr.plan.niter_per_ep), total)
    tr.planned_from_budget = True
    tr._build_schedules()
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    summary = tr.fit()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - w0
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    info = {**summary, "fit_wall_s": wall, "fit_cpu_s": cpu, "threads": __import__("torch").get_num_threads(),
            "images": total * tr.global_batch}
    Path(out, "sweep_train.json").write_text(json.dumps(info))


def run_one(name: str, base: str, sets: list[str], minutes: float, seed: int, out_root: Path, val_split: int,
            test: bool, keep: bool, images: int = 0) -> dict:
    out = out_root / f"{name}-s{seed}"
    if out.exists():
        shutil.rmtree(out)
    if images:
        cmd = [sys.executable, __file__, "--name", "_train", "--base", base, "--train-images", str(images),
               "--out", str(out), "--seeds", str(seed), "--set", *sets]
    else:
        cmd = [str(ROOT / ".venv/bin/dinokit"), "train", "--config", base, "--data", DATA, "--output-dir",
               str(out), "--set", f"time_budget_minutes={minutes}", f"seed={seed}", *sets]
    env = dict(os.environ)  # no OMP_WAIT_POLICY=PASSIVE: it idles ~30% of the cores of this small model's step
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    rec: dict = {"name": name, "seed": seed, "minutes": minutes, "images_planned": images, "set": sets,
                 "base": base, "date": time.strftime("%Y-%m-%d %H:%M"), "wall_train_s": round(wall, 1)}
    if proc.returncode != 0:
        rec["error"] = (proc.stderr or proc.stdout)[-2000:]
        return rec
    sys.path.insert(0, str(ROOT / "src"))
    from dinokit.demo import evaluate_run

    res = evaluate_run(out, DATA, random_init=False, raw_pixels=False, write=test, val_split=0 if test else
                       val_split)
    rec.update({k: res[k] for k in ("knn_top1", "knn_top1_cls", "knn_top1_avgpool", "knn_top1_concat",
                                    "train_minutes", "images_per_second", "epochs", "iterations",
                                    "data_wait_fraction", "final_loss")})
    rec["split"] = res["knn_protocol"]["split"]
    if (out / "sweep_train.json").is_file():
        info = json.loads((out / "sweep_train.json").read_text())
        rec["fit_cpu_s"], rec["fit_wall_s"] = info["fit_cpu_s"], info["fit_wall_s"]
        # throughput if the process had its threads' cores to itself (CPU seconds / threads): load-independent
        rec["cpu_images_per_second"] = info["images"] / max(info["fit_cpu_s"] / info["threads"], 1e-9)
    rec["curve"] = res["knn_curve"]
    rec["load1"] = os.getloadavg()[0]
    if not keep:
        for p in out.glob("checkpoint*.pth"):
            p.unlink()
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--base", default="configs/fashion_mnist_demo.yaml")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides of the base config")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--val-split", type=int, default=10000)
    p.add_argument("--test", action="store_true", help="evaluate train -> test (final runs only)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--log", default="runs/sweep/results.jsonl")
    p.add_argument("--images", type=int, default=0, help="iteration-matched: train on exactly this many images "
                   "(schedules planned for them) instead of a time budget")
    p.add_argument("--train-images", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.name == "_train":
        train_images(args.base, args.set, args.out, args.train_images, args.seeds[0])
        return 0
    out_root = ROOT / args.out
    out_root.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        rec = run_one(args.name, args.base, args.set, args.minutes, seed, out_root, args.val_split, args.test,
                      args.keep, args.images)
        with open(ROOT / args.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if "error" in rec:
            print(f"{args.name} seed {seed}: FAILED\n{rec['error']}", flush=True)
            continue
        print(f"{args.name} s{seed}: concat {rec['knn_top1_concat']:.2f} cls {rec['knn_top1_cls']:.2f} "
              f"avg {rec['knn_top1_avgpool']:.2f} | {rec['images_per_second']:.0f} img/s, {rec['epochs']:.2f} ep, "
              f"cpu-based {rec.get('cpu_images_per_second', float('nan')):.0f} img/s, "
              f"wait {100 * rec['data_wait_fraction']:.1f}%, loss {rec['final_loss']:.3f} [{rec['split']}]",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
