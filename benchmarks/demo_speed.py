"""Throughput of the Fashion-MNIST demo's training step, data included (docs/benchmarks.md, docs/small_data.md).

Builds the demo's ``Trainer`` from ``configs/fashion_mnist_demo.yaml`` (plus ``--set`` overrides), runs 5 warm-up
steps, then times ``--steps`` steps split into data (loader + augmentation) and step (forward, loss, backward,
optimiser, EMA), and counts the step's model FLOPs with ``benchmarks/train_step.py``'s ``FlopCounterMode``.

    python benchmarks/demo_speed.py
    python benchmarks/demo_speed.py --set precision=fp32
    python benchmarks/demo_speed.py --set local_crops_number=6 batch_size_per_gpu=256
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import FASHION_MNIST, demo_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides of the demo config")
    p.add_argument("--data", default=FASHION_MNIST)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    from dinokit.trainer import Trainer
    from train_step import flop_counter

    with tempfile.TemporaryDirectory() as out:
        cfg = demo_config(a.set, data_path=a.data, output_dir=out, time_budget_minutes=0, epochs=1,
                          knn_every_minutes=0)
        tr = Trainer(cfg)
        batches = iter(tr.loader)
        for _ in range(5):
            tr.train_step(tr._to_device(next(batches)))
        with flop_counter() as fc:
            tr.train_step(tr._to_device(next(batches)))
        gflop_img = fc.get_total_flops() / cfg.batch_size_per_gpu / 1e9
        data_s = step_s = 0.0
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(a.steps):
            t0 = time.perf_counter()
            crops = tr._to_device(next(batches))
            t1 = time.perf_counter()
            tr.train_step(crops)
            t2 = time.perf_counter()
            data_s, step_s = data_s + t1 - t0, step_s + t2 - t1
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - w0
    ips = cfg.batch_size_per_gpu * a.steps / (data_s + step_s)
    res = {"set": a.set, "precision": tr.precision, "batch": cfg.batch_size_per_gpu, "img_per_s": ips,
           "data_wait_fraction": data_s / (data_s + step_s), "gflop_per_image": gflop_img,
           "achieved_gflops": ips * gflop_img,
           "cores_busy": (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall}
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{' '.join(a.set) or 'demo config'}: {ips:.0f} img/s [{tr.precision}], data wait "
              f"{100 * res['data_wait_fraction']:.1f}%, {gflop_img:.3f} GFLOP/image -> {res['achieved_gflops']:.0f} "
              f"GFLOP/s, {res['cores_busy']:.2f} cores busy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
