"""Shared helpers of the benchmark scripts: machine/version description, peak RSS, interleaved timing."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return [f for f in line.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "amx", "avx512f"))]
    except OSError:
        pass
    return []


def _native_bf16() -> bool:
    try:
        from dinokit.trainer import cpu_supports_bf16
        return cpu_supports_bf16()
    except Exception:
        return False


def machine_info() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cpu_flags": " ".join(cpu_flags()),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "native_bf16": _native_bf16(),  # what precision auto decides by (oneDNN's check is true when it emulates)
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("torchvision", "timm", "PIL", "numpy", "lightly"):
        try:
            m = __import__(mod)
            info[mod if mod != "PIL" else "pillow"] = getattr(m, "__version__", "?")
        except Exception:
            info[mod if mod != "PIL" else "pillow"] = None
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=5).stdout.strip() or None
    except Exception:
        info["git"] = None
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def current_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, reps: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time every candidate ``reps`` times per round, rotating the order every round (ABC, BCA, CAB, ...), so
    that load from other processes falls on all candidates alike. Returns seconds per call, per candidate."""
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = candidates[name]
            for _ in range(reps):
                if sync:
                    sync()
                t0 = time.perf_counter()
                fn()
                if sync:
                    sync()
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> float:
    """Relative inter-quartile range (noise indicator): (q3 - q1) / median."""
    if len(xs) < 4:
        return float("nan") if not xs else (max(xs) - min(xs)) / max(statistics.median(xs), 1e-12)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / max(q[1], 1e-12)


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_demo.yaml"
FASHION_MNIST = "fashion-mnist:/usr/share/datasets/fashion-mnist"


def demo_config(sets: list[str], base: str | Path = DEMO_CONFIG, **fixed):
    """The demo's ``TrainConfig``: ``base`` (YAML), then ``fixed`` (the harness's own settings: data, output
    dir, ...), then the user's ``--set key=value`` items, validated (benchmarks/demo_speed.py, demo_sweep.py)."""
    from dinokit.config import TrainConfig, apply_overrides, load_yaml, parse_set_items

    cfg = apply_overrides(TrainConfig(), load_yaml(base))
    cfg = apply_overrides(cfg, {"data_path": FASHION_MNIST, **fixed})
    return apply_overrides(cfg, parse_set_items(sets)).validate()


def run_main(main: Callable[[], int], name: str) -> int:
    """``main()`` with dinokit's one-line errors: a :class:`dinokit.errors.DinokitError` (a bad size, a corrupt
    image, ...) prints ``<name>: error: <message>`` and exits 2 instead of a traceback."""
    from dinokit.errors import DinokitError

    try:
        return main()
    except DinokitError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
