"""Soak test (``make soak``; not in the default run): train for DINOKIT_SOAK_MINUTES (default 3) on generated data
while SIGKILLing the run at random moments (and, every few lives, half-way through a checkpoint write), restarting
it each time with the same command (alternating 0, 1 and 2 data-loader workers), and check that

* after every kill the checkpoint on disk loads (atomic writes),
* the final state is bitwise the uninterrupted run's (student, teacher, optimiser, centre, RNGs, position),
* the per-iteration loss curve in log.jsonl equals the uninterrupted one (iterations redone after a kill
  repeat exactly the same loss).

Run: ``DINOKIT_SOAK=1 DINOKIT_SOAK_MINUTES=3 .venv/bin/python -m pytest -m soak tests/test_soak.py -s``.
The result of a run is recorded in docs/reliability.md."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .fault_injection import (
    assert_same_training_state,
    cli_env,
    epoch_records,
    iteration_losses,
    load_state,
    temp_files,
    train_args,
)
from .helpers import make_image_folder

MINUTES = float(os.environ.get("DINOKIT_SOAK_MINUTES", "3"))

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("DINOKIT_SOAK") != "1", reason="soak test: run with make soak "
                       "(DINOKIT_SOAK=1)"),
]


def _start(args, fault, log):
    return subprocess.Popen([sys.executable, "-m", "dinokit", "train", *args], env=cli_env(fault),
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def _run(args) -> float:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dinokit", "train", *args], env=cli_env(), capture_output=True,
                       text=True, timeout=max(900, MINUTES * 120))
    assert r.returncode == 0, r.stderr[-3000:]
    return time.monotonic() - t0


def _train_records(out: Path) -> int:
    try:
        return (out / "log.jsonl").read_text().count('"type": "train"')
    except FileNotFoundError:
        return 0


@pytest.mark.timeout(int(MINUTES * 60 * 4) + 900)
def test_soak_random_sigkills_and_restarts_reproduce_the_uninterrupted_run(tmp_path):
    t_start = time.monotonic()
    budget = MINUTES * 60
    data = make_image_folder(tmp_path / "imgs", n_per_class=24, size=(48, 40))  # 48 images
    (data / "b" / "zz_empty.jpg").write_bytes(b"")  # an unreadable file in the mix (skipped, deterministically)
    base = ["--batch-size-per-gpu", "8", "--save-every-steps", "2", "--keep-last", "2", "--seed", "3"]

    # calibrate: start-up cost and seconds per epoch (6 iterations) on this machine
    wall = _run(train_args(data, tmp_path / "calib", *base, epochs=2))
    epoch_s = json.loads((tmp_path / "calib" / "log.jsonl").read_text().splitlines()[-1])["train_minutes"] * 30
    startup = max(wall - 2 * epoch_s, 1.0)
    # budget ~ reference (R) + killed run (R + lives x start-up); a life trains U(0, 2R/lives) s before its kill
    target_lives = max(6, round(5 * MINUTES))
    remaining = budget - (time.monotonic() - t_start)
    train_s = max((remaining - target_lives * startup) / 2.2, 3 * epoch_s)
    epochs = max(3, round(train_s / max(epoch_s, 1e-3)))
    window = 2 * epochs * epoch_s / target_lives

    ref = tmp_path / "reference"
    ref_wall = _run(train_args(data, ref, *base, epochs=epochs))

    out = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("DINOKIT_SOAK_SEED", "0")))
    lives, kinds, kills_mid_write = 0, {"during start-up": 0, "while training": 0, "mid-write (hook)": 0}, 0
    deadline = time.monotonic() + max(budget * 3, 600)
    while True:
        assert time.monotonic() < deadline, f"no completion after {lives} lives"
        lives += 1
        args = train_args(data, out, *base, "--num-workers", str(lives % 3), epochs=epochs)
        kind = ("mid-write (hook)" if lives % 4 == 0 else "during start-up" if lives % 5 == 0 else "while training")
        fault = f"kill_during_save:{rng.randint(1, 4)}" if kind == "mid-write (hook)" else None
        seen = _train_records(out)
        t0 = time.monotonic()
        kill_at = t0 + rng.uniform(0.1, startup) if kind == "during start-up" else None
        with open(tmp_path / f"life{lives}.err", "w") as log:
            p = _start(args, fault, log)
            while p.poll() is None:
                now = time.monotonic()
                if _train_records(out) > seen:  # it is training
                    if kind == "during start-up":
                        kill_at = now  # the estimate was long: kill at the first iteration instead
                    elif kill_at is None:
                        kill_at = now + rng.uniform(0, window)  # at a random moment of its training
                if kill_at is not None and now >= kill_at:
                    os.killpg(p.pid, signal.SIGKILL)  # the trainer and its data-loader workers (own session)
                    break
                time.sleep(0.01)
            p.wait()
        if os.environ.get("DINOKIT_SOAK_VERBOSE"):
            at = load_state(out)["iteration"] if (out / "checkpoint.pth").exists() else None
            print(f"life {lives}: workers {lives % 3}, {kind}, rc {p.returncode}, checkpoint at {at}")
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, (p.returncode, (tmp_path / f"life{lives}.err").read_text()[-3000:])
        kinds[kind] += 1
        kills_mid_write += bool(temp_files(out))
        if (out / "checkpoint.pth").exists():
            load_state(out)  # whatever the moment of the kill, the checkpoint on disk loads

    assert not temp_files(out)
    assert_same_training_state(load_state(ref), load_state(out))
    ref_losses, losses = iteration_losses(ref), iteration_losses(out)
    assert losses == ref_losses and len(losses) == load_state(ref)["iteration"]
    assert epoch_records(out) == epoch_records(ref)
    summary = {"minutes": round((time.monotonic() - t_start) / 60, 2), "epochs": epochs, "iterations": len(losses),
               "reference_wall_s": round(ref_wall, 1), "lives": lives, "kills": kinds,
               "kills_leaving_a_temp_file": kills_mid_write,
               "iterations_redone": _train_records(out) - len(losses), "final_loss": losses[max(losses)]}
    print("\nsoak:", json.dumps(summary))
