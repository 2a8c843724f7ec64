"""Fault injection (issue 6): SIGKILL mid-epoch and during a checkpoint write, corrupt and malicious checkpoints,
--keep-last, unwritable output dir, disk full, non-finite loss, bad images, bad options, and a property test of
the data pipeline. Every test here fails without the behaviour it names; see docs/reliability.md."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shlex
import signal
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import dinokit.checkpoint
import dinokit.loss
from dinokit.cli import build_parser, main
from dinokit.commands.train import config_from_args
from dinokit.errors import ConfigError, DataError, DinokitError
from dinokit.trainer import Trainer

from .fault_injection import (
    assert_same_training_state,
    epoch_records,
    iteration_losses,
    load_state,
    run_cli,
    temp_files,
    train_args,
)
from .helpers import TINY_VIT, fit_until_interrupted, make_image_folder

# ---------------------------------------------------------------------------------------------------------
# shared set-up: 12 images, batch 4 -> 3 iterations per epoch, 3 epochs = 9 iterations


def cfg_for(argv):
    return config_from_args(build_parser("train").parse_args(["train", *argv]))


def cli_main(argv, capsys) -> tuple[int, str]:
    """The real ``dinokit train`` entry point, in-process (fast): exit code and what it wrote on stderr."""
    capsys.readouterr()
    try:
        rc = main(["train", *argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("reliability") / "imgs", n_per_class=6)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run every interrupted one must match bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(cfg_for(train_args(data, out, "--save-every-steps", "2"))).fit()
    return out


class _RunsCode:
    """Unpickling this object runs ``touch MARKER`` (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_malicious_checkpoint(path: Path, marker: Path, fmt: str = "torch") -> None:
    payload = {"student": _RunsCode(marker), "epoch": 0}
    if fmt == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    # the file really is malicious: an unrestricted load runs the command
    if fmt == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists(), "test set-up: the payload should run under an unrestricted load"
    marker.unlink()


# ---------------------------------------------------------------------------------------------------------
# kill and resume


def test_sigkill_mid_epoch_then_same_command_ends_bitwise_identical_with_any_worker_count(data, reference, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, "--save-every-steps", "2")
    # SIGKILL right after iteration 5 (mid-epoch 1), before it is checkpointed: its work is lost and redone
    r = run_cli(args, fault="kill_after_iteration:5")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ck = load_state(out)
    assert (ck["epoch"], ck["iteration"], ck["step_in_epoch"]) == (1, 4, 1)
    # restart with the same command, now with 2 data-loader workers (per-sample seeds: same crops); the record of
    # iteration 5 logged before the kill is set aside when the run resumes, and written again when redone
    _resume_and_match(args, out, reference, from_iteration=4)
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    its = [r["iteration"] for r in logged if r["type"] == "train"]
    assert its == sorted(set(its)) == list(range(1, 10))  # one record per iteration
    assert [r["epoch"] for r in logged if r["type"] == "epoch"] == [0, 1, 2]
    aside = [json.loads(x) for x in (out / "log.superseded.jsonl").read_text().splitlines()]
    assert [(r["type"], r["iteration"]) for r in aside] == [("train", 5)]
    assert aside[0]["loss"] == iteration_losses(out)[5]  # the redone iteration computed the same loss


def _resume_and_match(args: list[str], out: Path, reference: Path, from_iteration: int) -> None:
    """Run the same command again, with 2 data-loader workers (per-sample seeds: the same crops): it resumes at
    ``from_iteration`` and ends bitwise as the uninterrupted ``reference`` — state, per-iteration losses and the
    per-epoch means, although an epoch was split over two processes."""
    r = run_cli([*args, "--num-workers", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and f"iteration {from_iteration}" in r.stderr
    assert_same_training_state(load_state(reference), load_state(out))
    assert iteration_losses(out) == iteration_losses(reference)
    assert len(iteration_losses(out)) == 9
    assert epoch_records(out) == epoch_records(reference)


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(data, reference, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, "--save-every-steps", "3")
    # writes: iteration 3 (last of epoch 0) -> #1; end of epoch 0 -> #2 checkpoint.pth, killed after half of its
    # temp file is on disk (then #3 would have been checkpoint0000.pth)
    r = run_cli(args, fault="kill_during_save:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    (tmp,) = temp_files(out)
    assert tmp.stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 - it really is half a checkpoint
        torch.load(tmp, weights_only=True)
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint.pth"]
    ck = load_state(out)  # the previous checkpoint, intact: all of epoch 0 done, its end not yet recorded
    assert (ck["epoch"], ck["iteration"], ck["step_in_epoch"]) == (0, 3, 3)
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tmp.name in r.stderr and not temp_files(out)  # the stray temp file is reported and removed
    assert_same_training_state(load_state(reference), load_state(out))
    assert epoch_records(out) == epoch_records(reference)  # epoch 0 was logged twice, identically


def test_unusable_checkpoints_are_named_and_the_newest_intact_one_is_used_keep_last(data, reference, tmp_path):
    out = tmp_path / "run"
    argv = train_args(data, out, "--save-every-steps", "2", "--keep-last", "2")
    fit_until_interrupted(Trainer(cfg_for(argv)), 7)  # a crash in epoch 2
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint.pth", "checkpoint0000.pth",
                                                         "checkpoint0001.pth"]
    # newest: truncated; next: a pickle that would run code; oldest: intact (iteration 3)
    main_ckpt = out / "checkpoint.pth"
    main_ckpt.write_bytes(main_ckpt.read_bytes()[: main_ckpt.stat().st_size // 2])
    marker = tmp_path / "MARKER"
    write_malicious_checkpoint(out / "checkpoint0001.pth", marker)
    with pytest.warns(UserWarning) as rec:
        resumed = Trainer(cfg_for(argv))
    messages = " | ".join(str(w.message) for w in rec)
    assert str(main_ckpt) in messages and str(out / "checkpoint0001.pth") in messages
    assert "could run code" in messages
    assert not marker.exists()
    assert (resumed.epoch, resumed.iteration) == (1, 3)
    resumed.fit()
    assert_same_training_state(load_state(reference), load_state(out))
    # --keep-last 2: only the two newest numbered checkpoints remain (checkpoint0000 was rotated away)
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint.pth", "checkpoint0001.pth",
                                                                   "checkpoint0002.pth"]
    assert load_state(out / "checkpoint0001.pth")["iteration"] == 6


@pytest.mark.parametrize("fmt", ["torch", "raw-pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_by_name_and_nothing_runs(data, tmp_path, capsys, fmt):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "MARKER"
    evil = out / "checkpoint.pth"
    write_malicious_checkpoint(evil, marker, fmt)
    before = evil.read_bytes()
    rc, err = cli_main(train_args(data, out), capsys)
    assert rc == 2
    assert not marker.exists()  # the payload never ran
    last = err.strip().splitlines()[-1]
    assert str(evil) in last and "move" in last and "Traceback" not in err
    assert "could run code" in err  # the warning says why it was refused
    assert evil.read_bytes() == before  # the user's file is not overwritten
    assert not (out / "log.jsonl").exists()  # stopped before training


def test_a_checkpoint_of_another_architecture_lists_the_first_differing_keys_and_shapes(data, reference, tmp_path,
                                                                                       capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((reference / "checkpoint.pth").read_bytes())
    rc, err = cli_main([*train_args(data, out), "--embed-dim", "48"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "cannot resume from" in err
    assert "backbone.cls_token (1, 1, 32) in the checkpoint, (1, 1, 48) here" in err
    rc, err = cli_main([*train_args(data, out), "--depth", "3"], capsys)
    assert rc == 2 and "missing from the checkpoint: backbone.blocks.2." in err


# ---------------------------------------------------------------------------------------------------------
# unwritable output dir, disk full


@pytest.mark.parametrize("case", ["inside-a-file", "is-a-file", "read-only"])
def test_unwritable_output_dir_is_one_line_exit_2_before_training(data, tmp_path, capsys, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = {"inside-a-file": blocker / "out", "is-a-file": blocker, "read-only": tmp_path / "ro"}[case]
    if case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions (the other cases cover this)")
        out.mkdir()
        out.chmod(0o500)
    rc, err = cli_main(train_args(data, out), capsys)
    assert rc == 2
    assert err.strip().splitlines() == [err.strip()]  # exactly one line
    expected = "is a file, not a folder" if case == "is-a-file" else "not writable"
    assert expected in err and str(out) in err and "Traceback" not in err


class _DiskFull:
    """A checkpoint file on a disk with ``room`` bytes left: the write that overflows raises ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        b = bytes(b)
        if len(b) > self.room:
            self.f.write(b[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_at_save_stops_saying_the_previous_checkpoint_is_intact(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = Trainer(cfg_for(train_args(data, out, "--save-every-steps", "1", "--epochs", "1")))
    ckpt_fds, saves = set(), []
    real_mkstemp, real_fdopen = dinokit.checkpoint.tempfile.mkstemp, dinokit.checkpoint.os.fdopen

    def mkstemp(*a, **k):
        fd, name = real_mkstemp(*a, **k)
        ckpt_fds.add(fd)
        return fd, name

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        if fd not in ckpt_fds:
            return f
        ckpt_fds.discard(fd)
        saves.append(fd)
        return _DiskFull(f, room=20_000) if len(saves) == 3 else f  # the disk fills during the 3rd write

    monkeypatch.setattr(dinokit.checkpoint.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(dinokit.checkpoint.os, "fdopen", fdopen)
    with pytest.raises(DinokitError) as e:
        t.fit()
    msg = str(e.value)
    assert "No space left on device" in msg and f"previous checkpoint {out / 'checkpoint.pth'} is intact" in msg
    assert t.iteration == 3 and load_state(out)["iteration"] == 2  # it is intact
    assert not temp_files(out)  # the partial temp file was removed


# ---------------------------------------------------------------------------------------------------------
# non-finite loss


def _poison_loss(monkeypatch, calls: set[int]):
    """Make the DINO loss non-finite on the given (0-based) calls."""
    real = dinokit.loss.DINOLoss.forward
    n = [0]

    def forward(self, *a, **k):
        loss = real(self, *a, **k)
        n[0] += 1
        return loss * float("nan") if n[0] - 1 in calls else loss

    monkeypatch.setattr(dinokit.loss.DINOLoss, "forward", forward)


def test_non_finite_loss_stops_naming_epoch_and_iteration_with_hint_last_checkpoint_kept(data, tmp_path, capsys,
                                                                                        monkeypatch):
    out = tmp_path / "nan"
    _poison_loss(monkeypatch, {4})  # the 5th iteration: epoch 1; the log numbers it 5 (iterations done after it)
    rc, err = cli_main(train_args(data, out, "--save-every-steps", "1", "--epochs", "2"), capsys)
    assert rc == 3 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "epoch 1, iteration 5" in last and str(out) in last
    for hint in ("--lr", "fp32", "--clip-grad", "--nan-policy skip"):
        assert hint in last
    ck = load_state(out)
    assert ck["iteration"] == 4  # the last good checkpoint
    for key in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in ck[key].values() if v.is_floating_point())
    assert torch.isfinite(ck["dino_loss"]["center"]).all()


def test_nan_policy_skip_counts_skipped_steps_in_the_log(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "skip"
    _poison_loss(monkeypatch, {1, 4})
    rc, err = cli_main(train_args(data, out, "--nan-policy", "skip", "--epochs", "2"), capsys)
    assert rc == 0, err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["type"] == "epoch"] == [1, 2]
    nan_iters = [r["iteration"] for r in records if r["type"] == "train" and r["loss"] is None]  # NaN -> null
    assert nan_iters == [2, 5]
    ck = load_state(out)
    assert ck["skipped_steps"] == 2 and ck["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in ck["student"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------------
# bad data


def _add_bad_files(folder: Path) -> list[Path]:
    """A zero-byte .jpg, a text file named .png and a truncated JPEG, in ``folder/b``, listed after its images."""
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / "b").mkdir(parents=True, exist_ok=True)
    bad = [folder / "b" / "zz_empty.jpg", folder / "b" / "zz_text.png", folder / "b" / "zz_truncated.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_text("this is not an image\n")
    bad[2].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    return bad


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_bad_images_are_skipped_with_warnings_naming_them_and_counted_in_the_log(tmp_path, impl):
    folder = make_image_folder(tmp_path / "imgs", n_per_class=6)
    bad = _add_bad_files(folder)  # listed last: only the data-loader workers meet them
    out = tmp_path / "out"
    # 15 files, batch 5: one epoch reads every file; the skips happen in 2 worker processes (with `fast`, in
    # FastMultiCrop, which opens the files itself)
    r = run_cli(train_args(folder, out, "--epochs", "1", "--batch-size-per-gpu", "5", "--num-workers", "2",
                           "--augment-impl", impl))
    assert r.returncode == 0, r.stderr[-3000:]
    for p in bad:
        assert f"skipping unreadable image {p}" in r.stderr
    epoch = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert epoch["type"] == "epoch" and epoch["skipped_images"] == 3
    assert load_state(out)["iteration"] == 3


def test_a_folder_of_only_unreadable_files_is_one_clear_error_before_training(tmp_path, capsys):
    folder = tmp_path / "imgs"
    _add_bad_files(folder)
    out = tmp_path / "out"
    rc, err = cli_main(train_args(folder, out, "--num-workers", "2", "--batch-size-per-gpu", "1"), capsys)
    assert rc == 2
    assert "Traceback" not in err  # not re-raised from a worker with its traceback
    last = err.strip().splitlines()[-1]
    assert "none of the 3 image files" in last and str(folder) in last
    assert not (out / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("argv,expect", [
    (["--no-such-option", "1"], "unrecognized arguments"),
    (["--epochs", "three"], "invalid int value"),
    (["--lr", "fast"], "invalid float value"),
    (["--set", "epochs=abc"], "'epochs'"),
    (["--precision", "fp64"], "invalid choice"),
    (["--global-crop-size", "100", "--patch-size", "16"], "not divisible by patch_size"),
    (["--local-crop-size", "40"], "larger than global_crop_size"),
    (["--batch-size-per-gpu", "0"], "must be positive"),
    (["--batch-size-per-gpu", "-4"], "must be positive"),
    (["--set", "no_such_key=1"], "unknown option 'no_such_key'"),
    (["--set", "epoch=3"], "did you mean epochs"),
    (["--keep-last", "-1"], "keep_last must be >= 0"),
    (["--save-every-steps", "-5"], "save_every_steps must be >= 0"),
    ("yaml", "YAML syntax error"),
])
def test_bad_options_are_one_line_exit_2_no_traceback(data, tmp_path, capsys, argv, expect):
    if argv == "yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("epochs: 3\nlr: [0.1, 0.2\n")
        argv = ["--config", str(bad)]
    # argv goes last: it overrides the tiny-ViT defaults (global crop 32)
    rc, err = cli_main([*train_args(data, tmp_path / "out"), *argv], capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was started


# ---------------------------------------------------------------------------------------------------------
# property: random files through data set + augmentation + loader


def _image_file(kind: str, w: int, h: int, seed: int, cut: float) -> tuple[bytes, str]:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if kind == "junk":
        return rng.integers(0, 256, int(cut * 300), dtype=np.uint8).tobytes(), ".jpg"
    mode, fmt, ext = kind.split("/")
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.normal(0, 100, (h, w)).astype(np.float32))
    else:
        img = rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    raw = buf.getvalue()
    if cut < 1.0:  # truncated file
        raw = raw[: int(len(raw) * cut)]
    return raw, ext


_KINDS = ["RGB/PNG/.png", "L/PNG/.png", "LA/PNG/.png", "P/PNG/.png", "RGBA/PNG/.png", "1/PNG/.png",
          "I;16/PNG/.png", "I/TIFF/.tif", "F/TIFF/.tiff", "CMYK/JPEG/.jpg", "L/JPEG/.jpeg", "RGB/JPEG/.jpg",
          "RGB/BMP/.bmp", "P/GIF/.gif", "RGBA/WEBP/.webp", "CMYK/TIFF/.tif", "junk"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(1, 48), st.integers(1, 48),
                                st.integers(0, 2**31), st.sampled_from([1.0, 1.0, 0.5, 0.05, 0.0])),
                      min_size=1, max_size=4),
       batch=st.integers(1, 3), impl=st.sampled_from(["fast", "reference"]))
def test_property_random_files_through_dataset_augmentation_and_loader(files, batch, impl):
    from dinokit.augmentation import DINOAugmentation
    from dinokit.data import ImageFolderDataset
    from dinokit.fast_augment import FastMultiCrop
    from dinokit.trainer import AugmentedDataset, EpochSampler, collate_crops

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, spec in enumerate(files):
            raw, ext = _image_file(*spec)
            (Path(d) / f"f{i}{ext}").write_bytes(raw)
        aug = (FastMultiCrop if impl == "fast" else DINOAugmentation)(global_crop_size=16, local_crop_size=8,
                                                                      local_crops_number=1)
        try:
            base = ImageFolderDataset(d)
            sampler = EpochSampler(len(base), min(batch, len(base)), seed=files[0][3] % 1000)
            loader = torch.utils.data.DataLoader(AugmentedDataset(base, aug), batch_size=sampler.batch_size,
                                                 sampler=sampler, collate_fn=collate_crops, drop_last=True)
            batches = list(loader)
        except DataError as e:  # the one documented error: no file at all is readable
            assert "could be read" in str(e)
            return
        assert len(batches) == len(base) // sampler.batch_size
        for crops in batches:
            assert [tuple(c.shape) for c in crops] == [(sampler.batch_size, 3, 16, 16)] * 2 + [
                (sampler.batch_size, 3, 8, 8)]
            assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_one_run_per_output_directory(tmp_path, capsys):
    """A second run on an output directory another process is training into stops with one clear error that
    names the holder, and leaves the first run's files alone; the lock dies with its process (no stale lock)."""
    import subprocess
    import sys
    import textwrap

    from dinokit.checkpoint import LOCK_NAME, lock_output_dir

    out = tmp_path / "out"
    out.mkdir()
    temp = out / ".checkpoint.pth.abc123.tmp"  # as if the first run were writing a checkpoint right now
    temp.write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from dinokit.checkpoint import lock_output_dir
        lock_output_dir({str(out)!r})
        print("locked", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another dinokit run \(pid {holder.pid} on .*\)"):
            lock_output_dir(out)
        folder = make_image_folder(tmp_path / "imgs", n_per_class=4)
        assert main(["train", "--data", str(folder), "--output-dir", str(out), *TINY_VIT, "--epochs", "1",
                     "--batch-size-per-gpu", "4"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another dinokit run (pid {holder.pid} on" in err and "Traceback" not in err
        assert temp.exists() and not (out / "checkpoint.pth").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    release = lock_output_dir(out)  # the holder was SIGKILLed: its lock went with it
    again = lock_output_dir(out)  # the same process may lock its directory again (shared, counted)
    assert (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
    release()
    release()  # idempotent
    again()
    assert str((out / LOCK_NAME).resolve()) not in dinokit.checkpoint._HELD  # released: the file is closed


def test_sigterm_stops_after_the_iteration_with_a_checkpoint_and_the_same_command_resumes_bitwise(
        data, reference, tmp_path):
    """Pre-emption (SIGTERM from a scheduler, ``docker stop``, ``kill``): the current iteration ends, a checkpoint
    is written, the process exits with 143 and one line; the same command then ends exactly as an uninterrupted
    run — no work lost, unlike SIGKILL (which redoes the iterations since the last checkpoint)."""
    out = tmp_path / "run"
    args = train_args(data, out, "--save-every-steps", "2")
    r = run_cli(args, fault="term_after_iteration:5")  # not a multiple of 2: no periodic checkpoint there
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert "dinokit train: stopped: SIGTERM at iteration 5, checkpoint saved in " in r.stderr
    assert r.stderr.count("SIGTERM") == 1  # one line, not a console line and the CLI's
    assert "Traceback" not in r.stderr
    ck = load_state(out)
    assert (ck["epoch"], ck["iteration"], ck["step_in_epoch"]) == (1, 5, 2)
    _resume_and_match(args, out, reference, from_iteration=5)


def test_sigterm_to_the_whole_process_group_with_loader_workers(data, tmp_path):
    """A scheduler signals every process of the job, the data-loader workers too: they leave it to the trainer,
    which still finishes its iteration and writes the checkpoint."""
    import subprocess
    import sys
    import time

    from .fault_injection import cli_env

    out = tmp_path / "run"
    args = train_args(data, out, "--num-workers", "2", epochs=200)
    p = subprocess.Popen([sys.executable, "-m", "dinokit", "train", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=cli_env(), start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(iteration_losses(out) if (out / "log.jsonl").exists() else {}) < 3:
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped: SIGTERM at iteration" in err and "Traceback" not in err
    assert load_state(out)["iteration"] == max(iteration_losses(out)) >= 3


def test_a_second_sigint_interrupts_at_once():
    from dinokit.trainer import _StopSignals

    # Python's default SIGINT handling, whatever the launcher left: a test run started as a background job of a
    # non-interactive shell (`cmd &`) inherits SIGINT *ignored*, which _StopSignals rightly leaves alone
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _second_sigint(_StopSignals)
    finally:
        signal.signal(signal.SIGINT, launched_with)
    # an ignored SIGINT stays ignored (a background job must not be stopped by the terminal's Ctrl-C)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, launched_with)


def _second_sigint(_StopSignals):
    before = signal.getsignal(signal.SIGINT)
    with _StopSignals() as stop:
        # raise_signal runs the Python handler before it returns (os.kill to itself may not, when the signal
        # is delivered to another thread)
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first only asks
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored
    # a handler someone else installed (submitit's SIGTERM bypass in SLURM jobs) is left alone
    theirs = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        mine = signal.getsignal(signal.SIGTERM)
        with _StopSignals():
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, theirs)


def test_ranks_agree_on_a_stop_every_ten_iterations_or_every_few_seconds():
    """With several ranks a stop request (on any of them) is agreed at iterations all ranks compute alike: the
    agreement carries the slowest rank's seconds per iteration, and the next one comes after 10 iterations or
    about STOP_CHECK_SECONDS, whichever is first, so every rank writes its part of the checkpoint after the same
    iteration, in time."""
    from dinokit.trainer import Trainer, _StopSignals

    t = Trainer.__new__(Trainer)
    t.world, agreed, answer = 2, [], [0.0, 0.01]  # nobody signalled yet; the slowest rank: 10 ms per iteration
    t._agree = lambda *v: (agreed.append(v) or list(answer))
    t._stop_check_at, t._stop_check_since = 0, (0, time.perf_counter())
    stop = _StopSignals()
    t.iteration = 1
    assert not t._stop_requested(stop) and len(agreed) == 1 and agreed[0][0] == 0.0  # the first, at once
    assert t._stop_check_at == 10
    for t.iteration in range(2, 10):
        assert not t._stop_requested(stop)
    assert len(agreed) == 1  # no collective between the agreement points
    answer[:] = [0.0, 2.0]  # slow iterations: 2 s each -> every 2 iterations
    t.iteration = 10
    assert not t._stop_requested(stop) and t._stop_check_at == 12
    answer[:] = [float(signal.SIGTERM), 2.0]  # another rank was signalled
    t.iteration = 11
    assert not t._stop_requested(stop) and len(agreed) == 2
    t.iteration = 12
    assert t._stop_requested(stop) and stop.signum == signal.SIGTERM and len(agreed) == 3
    t.world, stop.signum, t.iteration = 1, None, 3  # one process: its own signal, at once, no collective
    assert not t._stop_requested(stop)
    stop.signum = signal.SIGINT
    assert t._stop_requested(stop) and len(agreed) == 3


def test_sigterm_on_an_epochs_last_iteration_then_resume(data, reference, tmp_path):
    """Stopped on the last iteration of epoch 0, the resumed process runs no step of that epoch: its record keeps
    the epoch's mean loss (from the checkpoint) and logs no throughput (null, not a measured 0 img/s)."""
    out = tmp_path / "run"
    args = train_args(data, out, "--save-every-steps", "2")
    r = run_cli(args, fault="term_after_iteration:3")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    _resume_and_match(args, out, reference, from_iteration=3)
    first = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "epoch"][0]
    assert first["epoch"] == 0 and first["images_per_s"] is None and first["data_wait_frac"] is None
    assert first["loss"] is not None
    # the collapse diagnostics of its last step come with the checkpoint (they were left out)
    assert _collapse_fields(out)[0] == _collapse_fields(reference)[0]


_COLLAPSE = ("teacher_entropy", "entropy_max", "kl_mean_to_uniform", "center_norm", "distinct_prototypes")


def _collapse_fields(out: Path) -> dict[int, tuple]:
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {r["epoch"]: tuple(r.get(k) for k in _COLLAPSE) for r in records if r["type"] == "epoch"}


def test_sigterm_on_the_runs_last_iteration_then_resume_closes_the_last_epoch(data, reference, tmp_path):
    """Stopped on iteration 9 of 9, the run never finished: every resume printed 'done' without the last epoch's
    record or its numbered checkpoint."""
    out = tmp_path / "run"
    args = train_args(data, out, "--save-every-steps", "2")
    r = run_cli(args, fault="term_after_iteration:9")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert not (out / "checkpoint0002.pth").exists() and 2 not in epoch_records(out)
    _resume_and_match(args, out, reference, from_iteration=9)
    assert (out / "checkpoint0002.pth").exists()
    assert _collapse_fields(out) == _collapse_fields(reference) and None not in _collapse_fields(out)[2]
    r = run_cli(args)  # and then it is finished: nothing more to run or log
    assert r.returncode == 0 and "done: 3 epochs, 9 iterations" in r.stdout, r.stderr[-3000:]
    assert len(iteration_losses(out)) == 9 and len(_collapse_fields(out)) == 3


def test_a_checkpoint_that_is_not_one_says_what_it_is(tmp_path):
    """``echo garbage > checkpoint.pth`` is not "refused because unpickling it could run code": it is text."""
    from dinokit.checkpoint import load_checkpoint
    from dinokit.errors import CheckpointError

    (tmp_path / "checkpoint.pth").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"checkpoint.pth is not a dinokit training checkpoint: it is a text "
                                              r"file$"):
        load_checkpoint(tmp_path / "checkpoint.pth")
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="it is empty"):
        load_checkpoint(tmp_path / "checkpoint.pth")


_WORKER_ERROR_SCRIPT = """
import sys
import dinokit.trainer
from dinokit.cli import main
from dinokit.errors import DataError

real = dinokit.trainer.AugmentedDataset.__getitem__


def failing(self, item):  # the sampler yields (index, sample seed)
    if (item[0] if isinstance(item, tuple) else item) == 5:
        raise DataError("cannot decode image item 5 (injected)")
    return real(self, item)


dinokit.trainer.AugmentedDataset.__getitem__ = failing
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_error_in_a_loader_worker_ends_the_run_instead_of_hanging(data, tmp_path, workers):
    """Workers ignore SIGTERM (the trainer stops them after its checkpoint); a worker's error left the loader
    iterator referenced by the traceback at interpreter exit, where multiprocessing's exit hook SIGTERMs and joins
    its children: the process printed its error and then waited forever (under torchrun the job stalled)."""
    import subprocess
    import sys

    from .fault_injection import cli_env

    args = train_args(data, tmp_path / "run", "--num-workers", workers)
    try:
        r = subprocess.run([sys.executable, "-c", _WORKER_ERROR_SCRIPT, *args], capture_output=True, text=True,
                           timeout=120, env=cli_env())
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not exit after its loader worker's error")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "cannot decode image item 5 (injected)" in r.stderr and "Traceback" not in r.stderr
