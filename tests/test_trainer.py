import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from dinokit.cli import build_parser
from dinokit.commands.train import config_from_args
from dinokit.config import TrainConfig
from dinokit.errors import CheckpointError, ConfigError, DinokitError
from dinokit.trainer import NonFiniteLossError, Trainer

from .helpers import TINY_VIT, fit_until_interrupted, make_fashion_like, make_image_folder


def cfg_for(argv):
    return config_from_args(build_parser("train").parse_args(["train", *argv]))


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "imgs", n_per_class=6)


def tiny(folder, out, *extra):
    return cfg_for(["--data", str(folder), "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4",
                    "--epochs", "2", "--warmup-epochs", "1", "--saveckp-freq", "1", "--log-every", "1", *extra])


def test_end_to_end_folder_training_writes_logs_config_and_checkpoints(folder, tmp_path):
    out = tmp_path / "out"
    summary = Trainer(tiny(folder, out)).fit()
    assert summary["epochs"] == 2 and summary["iterations"] == 6  # 12 images / batch 4 = 3 it/epoch
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
        assert {"lr", "wd", "momentum", "teacher_temp", "teacher_entropy", "center_norm"} <= set(r)
    assert (out / "config.yaml").exists()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 6
    assert {"student", "teacher", "optimizer", "dino_loss", "rng", "config"} <= set(ckpt)
    assert any(k.startswith("backbone.blocks.0") for k in ckpt["teacher"])
    assert ckpt["dino_loss"]["center"].shape == (1, 64)
    assert (out / "checkpoint0000.pth").exists() and (out / "checkpoint0001.pth").exists()


def _state(out):
    return torch.load(out / "checkpoint.pth", weights_only=True)


def _assert_same(a, b):
    for key in ("student", "teacher"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k]))


def test_resume_is_exact(folder, tmp_path):
    full = tmp_path / "full"
    Trainer(tiny(folder, full, "--epochs", "3")).fit()
    # interrupted run: crash during iteration 5 (mid-epoch 1), then start again with the same command
    part = tmp_path / "part"
    fit_until_interrupted(Trainer(tiny(folder, part, "--epochs", "3", "--save-every-steps", "1")), 4)
    assert _state(part)["iteration"] == 4 and _state(part)["step_in_epoch"] == 1
    resumed = Trainer(tiny(folder, part, "--epochs", "3", "--save-every-steps", "1"))
    assert resumed.iteration == 4 and resumed.epoch == 1
    resumed.fit()
    _assert_same(_state(full), _state(part))


def test_reference_mechanics_in_one_step(folder, tmp_path):
    t = Trainer(tiny(folder, tmp_path / "o", "--freeze-last-layer", "1", "--clip-grad", "0"))
    batch = next(iter(t.loader))
    v0 = t.student.head.last_layer.weight_v.detach().clone()
    w0 = t.student.backbone.blocks[0].attn.qkv.weight.detach().clone()
    teacher0 = [p.clone() for p in t.teacher.parameters()]
    stats = t.train_step(t._to_device(batch))
    t.iteration += 1
    assert stats["lr"] == 0.0  # the warm-up starts at exactly 0
    assert t.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert t.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.04)
    # lr 0: AdamW steps but nothing moves; the frozen last layer has no optimiser state at all
    assert torch.equal(t.student.backbone.blocks[0].attn.qkv.weight, w0)
    assert torch.equal(t.student.head.last_layer.weight_v, v0)
    assert len(t.optimizer.state.get(t.student.head.last_layer.weight_v, {})) == 0
    # teacher = m * teacher + (1 - m) * student (identical here since the student did not move)
    for a, b in zip(teacher0, t.teacher.parameters()):
        torch.testing.assert_close(a, b)
    # second step: lr > 0, the backbone moves, the teacher follows with momentum 0.996-ish
    stats2 = t.train_step(t._to_device(batch))
    assert stats2["lr"] > 0
    assert not torch.equal(t.student.backbone.blocks[0].attn.qkv.weight, w0)
    assert stats2["momentum"] == pytest.approx(t.momentum_schedule[1])


def test_teacher_sees_only_global_crops_and_no_drop_path(folder, tmp_path):
    t = Trainer(tiny(folder, tmp_path / "o", "--drop-path-rate", "0.2"))
    assert all(not hasattr(b.drop_path, "drop_prob") for b in t.teacher.backbone.blocks)
    assert any(getattr(b.drop_path, "drop_prob", 0) > 0 for b in t.student.backbone.blocks)
    seen = []
    t.teacher.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
    t.train_step(t._to_device(next(iter(t.loader))))
    assert seen == [32]


def test_non_finite_loss_stops_with_message_and_skip_policy(folder, tmp_path):
    out = tmp_path / "nan"
    t = Trainer(tiny(folder, out, "--lr", "1e30", "--warmup-epochs", "0", "--clip-grad", "0"))
    with torch.no_grad():
        t.student.head.mlp[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 0, iteration 1; training stopped, no checkpoint had been "
                                                 "written yet"):
        t.fit()
    t.save()
    with pytest.raises(NonFiniteLossError, match=f"the last good checkpoint in {out} is kept"):
        t.train_step(t._to_device(next(iter(t.loader))))
    t2 = Trainer(tiny(folder, tmp_path / "skip", "--nan-policy", "skip", "--epochs", "1"))
    with torch.no_grad():
        t2.student.head.mlp[0].weight.fill_(float("nan"))
    center = t2.dino_loss.center.clone()
    with pytest.warns(UserWarning, match="every step of epoch 0 had a non-finite loss and was skipped"):
        t2.fit()
    assert t2.skipped_steps == 3
    assert torch.equal(t2.dino_loss.center, center)
    epoch = [json.loads(x) for x in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "epoch"]
    assert epoch[0]["loss"] is None  # skipped steps are not averaged in as 0


def test_fast_batched_augmentation_on_fashion_mnist_files(tmp_path):
    data = make_fashion_like(tmp_path / "fm")
    out = tmp_path / "out"
    cfg = cfg_for(["--data", f"fashion-mnist:{data}", "--output-dir", str(out), *TINY_VIT, "--global-crop-size",
                   "24", "--local-crop-size", "8", "--batch-size-per-gpu", "16", "--epochs", "1", "--fast-augment"])
    summary = Trainer(cfg).fit()
    assert summary["iterations"] == 4
    assert (out / "checkpoint.pth").exists()


def test_time_budget_plans_the_schedule(folder, tmp_path):
    out = tmp_path / "b"
    t = Trainer(tiny(folder, out, "--time-budget-minutes", "0.03", "--epochs", "1000"))
    t.fit()
    assert t.planned_from_budget
    assert t.iteration == t.plan.total_iters < 1000 * 3
    assert len(t.lr_schedule) == t.plan.total_iters
    assert t.lr_schedule[-1] == pytest.approx(t.cfg.min_lr, rel=0.5, abs=1e-6)


def test_time_budget_is_planned_even_when_the_epochs_option_gives_fewer_iterations_than_the_timing(folder, tmp_path):
    """--epochs 1 at 3 iterations per epoch ended the run after 3 iterations, before the budget was planned from
    the speed of the first 8: the budget was silently ignored."""
    t = Trainer(tiny(folder, tmp_path / "b", "--time-budget-minutes", "0.03", "--epochs", "1"))
    assert t.plan.total_iters >= Trainer.CALIBRATION_ITERS
    t.fit()
    assert t.planned_from_budget and t.iteration == t.plan.total_iters > 3


def test_config_yaml_names_what_auto_resolved_and_survives_a_failed_resume(folder, tmp_path):
    """config.yaml recorded ``precision: auto`` without saying what ran, and a resume that failed at its first
    step (new options, NaN) replaced it, so the run directory described a run that never trained."""
    from dinokit.config import load_yaml

    out = tmp_path / "c"
    t = Trainer(tiny(folder, out, "--epochs", "1", "--precision", "auto"))
    text = (out / "config.yaml").read_text()
    assert text.startswith("# dinokit ") and "# resolved: device cpu, precision fp32 (auto), world size 1, " \
        "0 loader workers" in text
    assert load_yaml(out / "config.yaml") == {k: (list(v) if isinstance(v, tuple) else v)
                                              for k, v in dataclasses.asdict(t.cfg).items()}
    t.fit()
    before = (out / "config.yaml").read_bytes()
    bad = Trainer(tiny(folder, out, "--epochs", "2", "--lr", "1e30", "--clip-grad", "0", "--warmup-epochs", "0"))
    assert (out / "config.yaml").read_bytes() == before  # not yet: nothing saved by this invocation
    with torch.no_grad():
        bad.student.head.mlp[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError):
        bad.fit()
    assert (out / "config.yaml").read_bytes() == before
    Trainer(tiny(folder, out, "--epochs", "2", "--precision", "auto")).fit()  # a resume that trains: its options
    assert load_yaml(out / "config.yaml")["epochs"] == 2 and not list(out.glob(".config.yaml*"))


def _train_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("type") == "train"]


def test_the_timed_iterations_of_a_budget_sit_at_the_start_of_the_schedules(folder, tmp_path):
    """With --epochs 1 (3 iterations) the provisional schedules were --epochs long: lr, weight decay and teacher
    momentum ran their whole cosine inside the 8 timed iterations, then jumped back when the budget's plan came.
    Now they rise (wd, momentum) monotonically over the whole run, from their start values."""
    out = tmp_path / "b"
    t = Trainer(tiny(folder, out, "--time-budget-minutes", "0.03", "--epochs", "1", "--warmup-epochs", "0"))
    t.fit()
    rec = _train_records(out)
    assert t.planned_from_budget and len(rec) == t.iteration > Trainer.CALIBRATION_ITERS
    wd, momentum = [r["wd"] for r in rec], [r["momentum"] for r in rec]
    calib = Trainer.CALIBRATION_ITERS
    # the timed iterations: at the start values (they used to reach 0.386 and 0.9998), rising slowly
    assert all(b >= a for a, b in zip(wd[:calib], wd[1:calib])) and max(wd[:calib]) < 0.04 + 0.36 * 0.01
    assert max(momentum[:calib]) < 0.996 + 0.004 * 0.01
    assert wd[-1] > 0.4 - 0.36 * 0.1 and momentum[-1] > 0.9995  # the budget's plan ends the schedules


def test_a_budgeted_run_resumed_before_its_plan_still_trains_for_the_budget(folder, tmp_path):
    """Killed during the timed iterations, the run resumed with the provisional --epochs plan (8 iterations) and
    ended there with the budget unused; a budget added when resuming a finished run was ignored the same way."""
    out = tmp_path / "k"
    args = ["--data", str(folder), "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4", "--epochs", "2",
            "--time-budget-minutes", "0.04", "--save-every-steps", "1"]
    r = _run_cli(*args, env={**os.environ, "DINOKIT_FAULT": "kill_after_iteration:5", "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 4  # killed before saving 5
    r = _run_cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert "time budget 0.04 min" in r.stderr and ck["plan"]["from_budget"]
    assert ck["iteration"] == ck["plan"]["total_iters"] > 2 * 3
    done = tmp_path / "d"
    t = Trainer(tiny(folder, done, "--epochs", "1"))
    t.fit()
    assert t.iteration == 3
    t = Trainer(tiny(folder, done, "--epochs", "1", "--time-budget-minutes", "0.03"))
    t.fit()
    assert t.planned_from_budget and t.iteration == t.plan.total_iters > 3 + Trainer.CALIBRATION_ITERS


def _run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dinokit", "train", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_train_then_resume_and_clear_errors(folder, tmp_path):
    out = tmp_path / "cli"
    args = ["--data", str(folder), "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4"]
    r = _run_cli(*args, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "done: 1 epoch," in r.stdout
    r = _run_cli(*args, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2

    r = _run_cli("--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "x"), *TINY_VIT)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run_cli("--data", str(empty), "--output-dir", str(tmp_path / "y"), *TINY_VIT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _run_cli("--data", str(folder), "--output-dir", str(tmp_path / "z"), *TINY_VIT, "--batch-size-per-gpu", "999")
    assert r.returncode == 2 and "fewer than one global batch" in r.stderr


def test_resume_with_other_architecture_is_a_clear_error(folder, tmp_path):
    out = tmp_path / "o"
    Trainer(tiny(folder, out, "--epochs", "1")).fit()
    r = _run_cli("--data", str(folder), "--output-dir", str(out), *TINY_VIT, "--embed-dim", "48",
                 "--batch-size-per-gpu", "4", "--epochs", "2")
    assert r.returncode == 2 and "cannot resume" in r.stderr and "Traceback" not in r.stderr


def test_two_process_gloo_training(folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dinokit", "train", "--data", str(folder), "--output-dir", str(out), *TINY_VIT,
           "--batch-size-per-gpu", "2", "--epochs", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 3  # 12 images / (2 ranks x 2) = 3 iterations
    assert "world 2" in r.stderr
    assert r.stdout.count("done:") == 1  # only rank 0 reports


@pytest.mark.parametrize("extra", [
    ["--local-crops-number", "0", "--optimizer", "lars"],  # no multi-crop: the 96-px local default is unused
    ["--arch", "resnet18", "--optimizer", "sgd", "--use-bn-in-head"],  # CNN with the default drop_path_rate 0.1
])
def test_no_multicrop_and_cnn_backbones_train(folder, tmp_path, extra, capsys):
    no_multicrop = "0" in extra
    cfg = cfg_for(["--data", str(folder), "--output-dir", str(tmp_path / "o"), *TINY_VIT, "--batch-size-per-gpu",
                   "4", "--epochs", "1", "--local-crop-size", "96" if no_multicrop else "16", *extra])
    t = Trainer(cfg)
    summary = t.fit()
    assert summary["iterations"] == 3
    assert t.dino_loss.ncrops == (2 if no_multicrop else 4)
    # the start line names a ViT with its patch size, a CNN without one
    assert ("[dinokit] resnet18 (" if "resnet18" in extra else "[dinokit] vit_custom/8 (") in capsys.readouterr().err


def test_one_device_resolver_for_training_and_evaluation():
    from dinokit.commands import _common
    from dinokit.errors import ConfigError
    from dinokit.trainer import resolve_device

    assert _common.resolve_device is resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_time_budget_is_replanned_when_the_speed_drifts(folder, tmp_path, monkeypatch):
    """The first plan comes from the first iterations; when the steps then get 4x slower the trainer re-plans
    at 10/30/60% of the budget and still ends near it, with every schedule planned for the final length."""
    import time as _time

    t = Trainer(tiny(folder, tmp_path / "r", "--time-budget-minutes", "0.05", "--epochs", "100000"))
    real_step, plans = t.train_step, []
    real_plan = t._plan_from_budget

    def slow_later(crops):
        _time.sleep(0.01 if t.iteration < 12 else 0.04)
        return real_step(crops)

    def record_plan(sec_per_iter, again=False):
        plans.append((t.iteration, again))
        real_plan(sec_per_iter, again)

    monkeypatch.setattr(t, "train_step", slow_later)
    monkeypatch.setattr(t, "_plan_from_budget", record_plan)
    t.fit()
    # planned after 8 iterations, re-planned later at the 30% and 60% marks (and at 10% unless the first 8
    # iterations already took that long on a loaded machine)
    assert plans[0] == (8, False) and plans[0][0] < plans[1][0]
    assert len(plans) in (3, 4) and all(again for _, again in plans[1:])
    assert t.iteration == t.plan.total_iters == len(t.lr_schedule) == len(t.momentum_schedule)
    # without re-planning the 10 ms/iteration plan would have run ~4x over the 3 s budget
    assert t.train_seconds < 2 * 3.0


def test_sinkhorn_knopp_and_koleo_train(folder, tmp_path):
    out = tmp_path / "o"
    cfg = tiny(folder, out, "--precision", "fp32", "--set", "centering=sinkhorn_knopp", "koleo_loss_weight=0.1",
               "drop_path_rate=0")
    t = Trainer(cfg)
    assert t.dino_loss.centering == "sinkhorn_knopp" and t.koleo_loss is not None
    batch = t._to_device(next(iter(t.loader)))
    # expected: the DINO term (Sinkhorn-Knopp targets: the centre plays no part) plus 0.1 x KoLeo summed over
    # the two global crops' student CLS features (rows 0-3 and 4-7 at batch 4)
    with torch.no_grad():
        teacher = t.teacher(batch[:2])
        student, feats = t.student(batch, return_backbone=True)
        assert torch.equal(student, t.student(batch))
        dino = t.dino_loss(student, teacher, 0, teacher_temp=t.teacher_temp_at(0, 0))
        koleo = t.koleo_loss(feats[:4]) + t.koleo_loss(feats[4:8])
    stats = t.train_step(batch)
    assert stats["koleo"] == pytest.approx(koleo.item(), rel=1e-5)
    assert stats["loss"] == pytest.approx(dino.item() + 0.1 * koleo.item(), rel=1e-5)
    t.fit()
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert epochs and all(math.isfinite(r["loss"]) and math.isfinite(r["koleo"]) for r in epochs)
    with pytest.raises(Exception, match="koleo_loss_weight"):
        tiny(folder, out, "--set", "koleo_loss_weight=-1")


def test_a_data_bound_run_gets_one_hint_naming_what_would_help(folder, tmp_path, capsys, monkeypatch):
    import time

    from dinokit.augmentation import DINOAugmentation

    call = DINOAugmentation.__call__

    def slow(self, img):  # an input pipeline far slower than the tiny model's step
        time.sleep(0.05)
        return call(self, img)

    monkeypatch.setattr(DINOAugmentation, "__call__", slow)
    tr = Trainer(tiny(folder, tmp_path / "out", "--num-workers", "0", "--augment-impl", "reference"))
    with pytest.warns(UserWarning) as record:
        tr.fit()
    hints = [str(w.message) for w in record if "waiting for data" in str(w.message)]
    assert len(hints) == 1  # once per run, not once per epoch
    assert hints[0].startswith("dinokit: ") and "--num-workers (now 0;" in hints[0]
    assert "--augment-impl fast" in hints[0]
    epochs = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()
              if '"epoch"' in line and json.loads(line)["type"] == "epoch"]
    assert all(r["data_wait_frac"] > Trainer.DATA_BOUND_FRAC for r in epochs)
    tr._data_bound_hinted = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr._hint_if_data_bound(0.1)  # below the threshold: quiet
    # every CPU already runs a worker and the augmentation is the fast one: nothing to try, and it says so
    from types import SimpleNamespace

    from dinokit import trainer as T

    monkeypatch.setattr(T, "cpus_per_process", lambda: 2)
    tr.loader, tr.cfg.augment_impl, tr._data_bound_hinted = SimpleNamespace(num_workers=2), "fast", False
    with pytest.warns(UserWarning, match="the input pipeline is the bottleneck: every CPU \\(2\\) already runs a "
                                         "loader worker") as record:
        tr._hint_if_data_bound(0.5)
    assert "try" not in str(record[0].message)


def test_loader_workers_auto_is_the_papers_10_at_most_one_per_cpu(folder, tmp_path, capsys, monkeypatch):
    """The default (-1, auto): the reference's 10 workers per process, but not more than the CPUs this process may
    use — on a 2-CPU machine 10 workers only time-share the CPUs and PyTorch warns the loader may freeze. An
    explicit count is honoured. The crops do not depend on the count, so auto changes nothing but speed."""
    import warnings

    from dinokit import trainer as T

    assert TrainConfig().num_workers == -1
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (T.cpus_per_process(), T.loader_workers(-1), T.loader_workers(10), T.loader_workers(0)) == (2, 2, 10, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this node share the CPUs
    assert (T.cpus_per_process(), T.loader_workers(-1)) == (1, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert T.cpus_per_process() == 1  # never 0
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert T.loader_workers(-1) == 10  # a GPU node: the reference's count
    monkeypatch.delattr(T.os, "sched_getaffinity", raising=False)  # not Linux: os.cpu_count()
    monkeypatch.setattr(T.os, "cpu_count", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert T.cpus_per_process() == 3

    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "excessive worker creation" UserWarning from the DataLoader
        tr = Trainer(tiny(folder, tmp_path / "out", "--num-workers", "-1"))  # TINY_VIT's 0 overridden
    assert tr.loader.num_workers == 2 and tr.cfg.num_workers == -1
    with pytest.raises(ConfigError, match="num_workers"):
        tiny(folder, tmp_path / "o2", "--num-workers", "-2")


def test_resume_refuses_what_cannot_continue_and_names_changed_options(folder, tmp_path, monkeypatch):
    """Another number of iterations per epoch (batch size, processes, data) would shift the schedules and the
    epoch counter (a user saw 19 one-iteration epochs); another optimiser has other state (KeyError at the
    first step). Both are refused before anything is written; other changed options are named."""
    out = tmp_path / "run"
    Trainer(tiny(folder, out, "--epochs", "1")).fit()
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"the run had 3 iterations per epoch, this configuration gives 6 "
                                              r"\(global batch 2, 12 images\)"):
        Trainer(tiny(folder, out, "--epochs", "2", "--batch-size-per-gpu", "2"))
    with pytest.raises(CheckpointError, match="with --optimizer sgd: the run used adamw"):
        Trainer(tiny(folder, out, "--epochs", "2", "--optimizer", "sgd"))
    assert (out / "config.yaml").read_text() == config_before
    monkeypatch.chdir(folder.parent)  # the same data, named relatively with a trailing slash: not a change
    with pytest.warns(UserWarning, match=r"with options that differ from the run's: lr 0\.0005 -> 0\.001; epochs 1 "
                                         r"-> 2$"):
        t = Trainer(tiny(folder, out, "--epochs", "2", "--lr", "0.001", "--num-workers", "0", "--log-every", "5",
                         "--data", f"{folder.name}/"))
    assert t.iteration == 3


def test_the_same_data_named_differently_is_the_same_data_path(tmp_path, monkeypatch):
    from dinokit.trainer import _same_data_spec

    monkeypatch.chdir(tmp_path)
    assert _same_data_spec(str(tmp_path / "imgs"), "imgs/") and _same_data_spec("./imgs", "imgs")
    assert _same_data_spec(f"fashion-mnist:{tmp_path}/fm", "fashion-mnist:fm")
    assert not _same_data_spec("fashion-mnist:fm", "fm") and not _same_data_spec("imgs", "imgs2")
    assert _same_data_spec("", "") and not _same_data_spec("", "imgs")


def test_the_knn_monitor_and_the_report_leave_the_training_unchanged(folder, tmp_path):
    """Their loaders draw seeds from torch's generator and a report builds a model: run under
    _training_rng_untouched they no longer change the training (a user saw epoch-1 loss 3.7802 vs 3.6879)."""
    def weights(out, *extra):
        t = Trainer(tiny(folder, out, "--epochs", "2", *extra))
        t.fit()
        return t.student.state_dict(), t

    plain, _ = weights(tmp_path / "plain")
    monitored, t = weights(tmp_path / "mon", "--knn-every", "1", "--knn-train", str(folder), "--knn-val",
                           str(folder), "--report", "true")
    for k in plain:
        assert torch.equal(plain[k], monitored[k]), k
    knn = [r for r in t.knn_history]
    assert [r["epoch"] for r in knn] == [0, 1]  # labelled with the epoch that just ended
    assert (tmp_path / "mon" / "report.html").exists()


def test_knn_monitor_data_is_checked_before_training(folder, tmp_path):
    from dinokit.errors import DataError

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list(folder.rglob("*.png"))[:3]:
        (flat / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ConfigError, match="needs both knn_train and knn_val"):
        Trainer(tiny(folder, tmp_path / "a", "--knn-every", "1", "--knn-train", str(folder)))
    with pytest.raises(DataError, match="knn_val .* has images without a class"):
        Trainer(tiny(folder, tmp_path / "b", "--knn-every", "1", "--knn-train", str(folder), "--knn-val",
                     str(flat)))
    with pytest.raises(DataError, match="does not exist"):
        Trainer(tiny(folder, tmp_path / "c", "--knn-every", "1", "--knn-train", str(tmp_path / "nope"),
                     "--knn-val", str(folder)))


def test_a_start_that_fails_on_its_data_leaves_no_output_directory(folder, tmp_path):
    from dinokit.errors import DataError

    out = tmp_path / "new" / "run"
    with pytest.raises(DataError, match="does not exist"):
        Trainer(tiny(tmp_path / "no-such-data", out))
    assert not (tmp_path / "new").exists()  # no folder, no .dinokit.lock left behind


def test_knn_monitor_evaluates_folders_as_dinokit_knn_does(folder, tmp_path):
    """Image folders: resize to 256/224 of the crop size, centre crop (the reference's protocol, as `dinokit knn`
    at the run's global crop size); same-size tensor data sets keep the straight resize."""
    from torchvision.transforms import v2 as T

    from dinokit.monitor import knn_data

    cfg = tiny(folder, tmp_path / "o", "--knn-every", "1", "--knn-train", str(folder), "--knn-val", str(folder))
    (train, _), (val, _) = knn_data(cfg)
    for ds in (train, val):
        base = getattr(ds, "dataset", ds)
        steps = base.transform.transforms
        assert any(isinstance(t, T.CenterCrop) for t in steps)
        assert ds[0][0].shape == (3, 32, 32)


def test_counts_in_messages_agree_in_number(folder, tmp_path, capsys):
    from dinokit.trainer import count_noun

    assert (count_noun(1, "image"), count_noun(0, "loader worker"), count_noun(2, "CPU")) == (
        "1 image", "0 loader workers", "2 CPUs")
    Trainer(tiny(folder, tmp_path / "o", "--epochs", "1")).fit()
    start = capsys.readouterr().err.splitlines()[0]
    assert "12 images, 3 it/epoch, 0 loader workers" in start


def test_writing_a_periodic_checkpoint_is_not_counted_as_data_wait(folder, tmp_path, monkeypatch):
    """The iteration after a --save-every-steps checkpoint logged the write as data-loading time (62-79% data
    wait, and a wrong 'the input pipeline is the bottleneck' hint)."""
    real_save = Trainer.save

    def slow_save(self, *a, **k):
        time.sleep(1.5)
        return real_save(self, *a, **k)

    monkeypatch.setattr(Trainer, "save", slow_save)
    out = tmp_path / "out"
    Trainer(tiny(folder, out, "--epochs", "1", "--save-every-steps", "1", "--num-workers", "0")).fit()
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert len(train) == 3
    for r in train[1:]:  # each after a (1.5 s) checkpoint write
        wait_s = r["data_wait_frac"] * 4 / r["images_per_s"]  # batch 4
        assert wait_s < 0.75, r


def test_short_durations_in_messages_are_seconds():
    from dinokit.trainer import format_duration

    assert format_duration(0.22) == "0.2 s" and format_duration(2.4) == "2.4 s" and format_duration(59.4) == "59 s"
    assert format_duration(90) == "1.5 min"


def test_the_collapse_warning_is_given_once_per_run(folder, tmp_path):
    """It repeated on every epoch that qualified (107 lines after a resumed budgeted run)."""
    cfg = tiny(folder, tmp_path / "c", "--epochs", "4", "--teacher-temp", "0.5", "--warmup-teacher-temp", "0.5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg).fit()
    collapsed = [w for w in caught if "looks collapsed" in str(w.message)]
    records = [json.loads(x) for x in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    flagged = [r for r in records if r["type"] == "epoch" and r["epoch"] >= 1
               and (r["teacher_entropy"] > 0.98 * r["entropy_max"] or r["distinct_prototypes"] <= 1)]
    assert len(flagged) >= 2 and len(collapsed) == 1


def test_the_trainer_warns_about_ignored_options(folder, tmp_path):
    with pytest.warns(UserWarning, match="keep_last ignored: saveckp_freq 0 writes no numbered checkpoints"):
        Trainer(tiny(folder, tmp_path / "k", "--keep-last", "2", "--saveckp-freq", "0"))


def test_resuming_with_another_number_of_processes_names_it(folder, tmp_path):
    """The same iterations per epoch can come from another split (2 x 4 -> 1 x 8): allowed, but the data order
    changes, so the warning names the processes (it named only a changed batch size)."""
    out = tmp_path / "run"
    Trainer(tiny(folder, out, "--epochs", "1")).fit()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["world"] == 1
    ckpt["world"] = 2
    torch.save(ckpt, out / "checkpoint.pth")
    with pytest.warns(UserWarning, match=r"options that differ from the run's: epochs 1 -> 2; processes 2 -> 1$"):
        Trainer(tiny(folder, out, "--epochs", "2"))


@pytest.mark.parametrize("machine, avx512_bf16, amx, onednn, expected", [
    ("x86_64", False, False, True, "fp32"),   # AVX-512 without BF16: oneDNN says yes (emulation), autocast is slower
    ("x86_64", True, False, True, "bf16"),    # AVX512-BF16 (Zen 4/5, Cooper Lake)
    ("x86_64", False, True, True, "bf16"),    # AMX (Sapphire Rapids and later)
    ("AMD64", False, False, True, "fp32"),
    ("aarch64", False, False, True, "bf16"),  # elsewhere oneDNN's check (ARM: the BF16 extension)
    ("aarch64", False, False, False, "fp32"),
])
def test_auto_precision_takes_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, machine, avx512_bf16, amx,
                                                                     onednn, expected):
    import platform

    from dinokit import trainer as tr
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert tr.resolve_precision("auto", torch.device("cpu")) == expected
    assert tr.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for explicitly: kept
    assert tr.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_auto_precision_on_this_machine_agrees_with_its_cpu_flags():
    import platform

    from dinokit.trainer import resolve_precision
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 check")
    flags = ""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    native = " avx512_bf16" in flags or " amx_tile" in flags
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


@pytest.mark.parametrize("native", [False, True])
def test_explicit_bf16_on_a_cpu_that_emulates_it_is_named(folder, tmp_path, monkeypatch, native):
    from dinokit import trainer as tr
    monkeypatch.setattr(tr, "cpu_supports_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = Trainer(tiny(folder, tmp_path / "out", "--precision", "bf16"))
    assert t.precision == "bf16"  # kept: the user asked for it
    emulated = [str(w.message) for w in record if "without native bf16" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
    if not native:
        assert "precision auto picks fp32" in emulated[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        auto = Trainer(tiny(folder, tmp_path / "out2", "--precision", "auto"))
    assert auto.precision == ("bf16" if native else "fp32")
    assert not [w for w in record if "without native bf16" in str(w.message)]


def test_an_output_directory_that_is_a_file_is_named_as_such(folder, tmp_path):
    from dinokit.errors import ConfigError

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=f"output directory {tmp_path / 'f'} is a file, not a folder"):
        Trainer(tiny(folder, tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "x"


def test_records_after_the_checkpoint_are_set_aside_on_resume_and_the_log_is_json(folder, tmp_path):
    """A run stopped on a NaN after its last checkpoint left its records (lr 2.8e10 ...) in log.jsonl and
    TensorBoard, and the resumed run logged those iterations again: two records per iteration, a spike in the
    report's curves. With --nan-policy skip the log held ``NaN``, which is not JSON."""
    out = tmp_path / "r"
    Trainer(tiny(folder, out, "--epochs", "1")).fit()  # 3 iterations, checkpoint at 3
    bad = Trainer(tiny(folder, out, "--epochs", "3", "--lr", "1e30", "--clip-grad", "0", "--warmup-epochs", "0",
                       "--nan-policy", "skip"))
    with torch.no_grad():
        bad.student.head.mlp[0].weight.fill_(float("nan"))
    fit_until_interrupted(bad, 5)  # stopped after 2 skipped iterations, before any checkpoint
    lines = (out / "log.jsonl").read_text().splitlines()

    def strict(line):
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    recs = [strict(x) for x in lines]
    assert [r["iteration"] for r in recs if r["type"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in recs if r["type"] == "train"][3:] == [None, None]  # skipped: NaN -> null
    t = Trainer(tiny(folder, out, "--epochs", "2"))
    recs = [strict(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs if r["type"] == "train"] == [1, 2, 3]
    aside = [strict(x) for x in (out / "log.superseded.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in aside] == [4, 5]
    t.fit()
    recs = [strict(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs if r["type"] == "train"] == list(range(1, 7))
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [0, 1]
    assert all(r["lr"] < 1 for r in recs if r["type"] == "train")
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert sorted(lr) == list(range(1, 7)) and max(lr.values()) < 1  # the 1e30 steps purged


def _tb_scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_a_restart_before_any_checkpoint_and_records_at_the_checkpoint_step_leave_one_run(folder, tmp_path):
    """A run killed before its first checkpoint left its records, and the fresh restart appended its own (two
    records for iterations 1, 2; a NaN run's lr 1e28 in the report); a k-NN record set aside at the checkpoint's own
    step stayed in TensorBoard (purged only from the step after)."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "k"
    first = Trainer(tiny(folder, out, "--epochs", "2"))
    fit_until_interrupted(first, 2)  # killed after 2 iterations, before the epoch's checkpoint
    first._tb.flush()
    assert not (out / "checkpoint.pth").exists() and len((out / "log.jsonl").read_text().splitlines()) == 2
    Trainer(tiny(folder, out, "--epochs", "1")).fit()
    recs = _train_records(out)
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    assert len((out / "log.superseded.jsonl").read_text().splitlines()) == 2
    lr = _tb_scalars(out, "train/lr")
    assert [s for s, _ in lr] == [1, 2, 3] and [v for _, v in lr] == pytest.approx([r["lr"] for r in recs])
    # a k-NN record of a killed run at the checkpoint's step (3), absent from the checkpoint's history
    from torch.utils.tensorboard import SummaryWriter

    knn = {"type": "knn", "epoch": 1, "iteration": 3, "knn_top1": 12.5, "train_minutes": 0.01}
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(knn) + "\n")
    w = SummaryWriter(str(out / "tensorboard"))
    w.add_scalar("knn/knn_top1", 12.5, 3)
    w.close()
    Trainer(tiny(folder, out, "--epochs", "2")).fit()
    assert _tb_scalars(out, "knn/knn_top1") == []  # as in log.jsonl
    assert [r["iteration"] for r in _train_records(out)] == list(range(1, 7))
    assert [s for s, _ in _tb_scalars(out, "train/loss")] == list(range(1, 7))  # step 3 purged and written again


def test_train_records_are_means_over_the_steps_since_the_last_record(folder, tmp_path):
    """With --log-every N the "train" record carried the last step's loss, KoLeo term and images/s; it is the mean
    over the N steps (the schedules' values are the step's), and the epoch record's KoLeo term the epoch's mean."""
    common = ("--precision", "fp32", "--num-workers", "0", "--set", "koleo_loss_weight=0.1")
    Trainer(tiny(folder, tmp_path / "every", *common)).fit()
    Trainer(tiny(folder, tmp_path / "third", *common, "--log-every", "2")).fit()
    steps = _train_records(tmp_path / "every")
    windows = _train_records(tmp_path / "third")
    assert [r["iteration"] for r in windows] == [2, 4, 6] and all(r["steps"] == 2 for r in windows)
    for r, pair in zip(windows, (steps[0:2], steps[2:4], steps[4:6])):
        assert r["loss"] == pytest.approx(sum(s["loss"] for s in pair) / 2, rel=1e-6)
        assert r["koleo"] == pytest.approx(sum(s["koleo"] for s in pair) / 2, rel=1e-6)
        assert r["lr"] == pair[1]["lr"] and r["teacher_temp"] == pair[1]["teacher_temp"]
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
    epochs = [json.loads(x) for x in (tmp_path / "third" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    for r, three in zip(epochs, (steps[0:3], steps[3:6])):
        assert r["koleo"] == pytest.approx(sum(s["koleo"] for s in three) / 3, rel=1e-6)
        assert r["loss"] == pytest.approx(sum(s["loss"] for s in three) / 3, rel=1e-6)


def test_a_budget_added_on_resume_that_is_already_spent_trains_nothing(folder, tmp_path, capsys):
    """It ran the 8 timed iterations and one more before planning the 0 seconds left."""
    out = tmp_path / "out"
    Trainer(tiny(folder, out, "--epochs", "1")).fit()
    summary = Trainer(tiny(folder, out, "--epochs", "1", "--time-budget-minutes", "1e-6")).fit()
    assert summary["iterations"] == 3 and _state(out)["iteration"] == 3
    assert "time budget 1e-06 min already spent" in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_blur_and_solarize_options_reach_both_augmentation_chains(folder, tmp_path, impl):
    """--blur-prob / --solarize-prob were ignored with --augment-impl reference (its chains were hard-coded)."""
    from dinokit.augmentation import RandomGaussianBlur, RandomSolarize
    from dinokit.trainer import build_train_data

    cfg = tiny(folder, tmp_path / "out", "--augment-impl", impl, "--set", "blur_prob=[0.3,0.4,0.6]",
               "solarize_prob=0.7")
    aug = build_train_data(cfg, 0, 1)[2].dataset.transform
    assert aug.blur == (0.3, 0.4, 0.6) and aug.solarize == (0.0, 0.7, 0.0)
    if impl == "reference":
        chains = [aug.global1, aug.global2, aug.local]
        assert [[t.p for t in c.transforms if isinstance(t, RandomGaussianBlur)] for c in chains] == [[0.3], [0.4],
                                                                                                       [0.6]]
        assert [[t.p for t in c.transforms if isinstance(t, RandomSolarize)] for c in chains] == [[], [0.7], []]


def test_a_resume_past_the_end_of_fewer_epochs_is_refused_not_looped(folder, tmp_path):
    """Resumed mid-epoch 2 with --epochs 2, the run closed epoch 2 with 4 of its steps and saved an inconsistent
    position; resumed again with --epochs 3 it then looped for ever over empty epochs (numbered checkpoints every
    20, SIGTERM unheard)."""
    out = tmp_path / "out"
    fit_until_interrupted(Trainer(tiny(folder, out, "--epochs", "3", "--save-every-steps", "1")), 7)
    before = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(ConfigError, match=r"at iteration 7 \(epoch 2\), past the end of this configuration's 6 "
                                          r"iterations \(2 epochs of 3\).* pass --epochs 3 or more"):
        Trainer(tiny(folder, out, "--epochs", "2"))
    assert (out / "checkpoint.pth").read_bytes() == before
    summary = Trainer(tiny(folder, out, "--epochs", "3")).fit()
    assert summary["iterations"] == 9 and _state(out)["epoch"] == 3


def test_a_budgeted_run_resumed_after_its_plan_keeps_re_planning(folder, tmp_path):
    """The re-plans still due (and the speed baseline) were not in the checkpoint: a resumed run kept its first
    8-iteration estimate and missed the budget by a third. A run stopped before its plan resumes with the same
    provisional schedules (they were rebuilt from the resume point: other weight decay values)."""
    out = tmp_path / "out"
    t = Trainer(tiny(folder, out, "--time-budget-minutes", "0.2", "--epochs", "1", "--save-every-steps", "1"))
    fit_until_interrupted(t, Trainer.CALIBRATION_ITERS + 2)
    saved = _state(out)["plan"]
    assert saved["from_budget"] and saved["replans"] and len(saved["replan_since"]) == 2
    r = Trainer(tiny(folder, out, "--time-budget-minutes", "0.2", "--epochs", "1"))
    assert r._replans == [tuple(x) for x in saved["replans"]] and list(r._replan_since) == saved["replan_since"]
    early = tmp_path / "early"
    t = Trainer(tiny(folder, early, "--time-budget-minutes", "0.2", "--epochs", "1", "--save-every-steps", "1"))
    provisional = (t.plan, t.wd_schedule.copy())
    fit_until_interrupted(t, 4)
    r = Trainer(tiny(folder, early, "--time-budget-minutes", "0.2", "--epochs", "1"))
    assert r.plan == provisional[0] and (r.wd_schedule == provisional[1]).all()


def test_a_resume_that_cannot_load_names_the_options_that_differ(folder, tmp_path):
    """--norm-last-layer false on a run made with true was torch's "loaded state dict contains a parameter group
    that doesn't match the size of optimizer's group", naming no option."""
    out = tmp_path / "out"
    Trainer(tiny(folder, out, "--epochs", "1")).fit()
    with pytest.raises(CheckpointError, match=r"options that differ from that run's: norm_last_layer True -> False"):
        Trainer(tiny(folder, out, "--epochs", "2", "--set", "norm_last_layer=false"))


def test_losing_the_console_does_not_stop_training(folder, tmp_path):
    """stderr piped into a `head -1` that ended (BrokenPipeError at the next console line) stopped the run with no
    checkpoint of the finished epoch and no message; a closed stderr (2>&-) crashed before the first step."""
    import shlex

    common = ["--data", str(folder), *TINY_VIT, "--batch-size-per-gpu", "4", "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = shlex.join([sys.executable, "-m", "dinokit", "train", "--output-dir", str(tmp_path / "closed"), *common])
    r = subprocess.run(["bash", "-c", cmd + " 2>&-"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:]
    assert _state(tmp_path / "closed")["epoch"] == 2
    proc = subprocess.Popen([sys.executable, "-m", "dinokit", "train", "--output-dir", str(tmp_path / "pipe"),
                             *common], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    proc.stderr.readline()
    proc.stderr.close()  # the reader is gone: every later console line meets a broken pipe
    assert proc.wait(timeout=300) == 0
    assert _state(tmp_path / "pipe")["epoch"] == 2


def test_a_tensorboard_write_that_fails_turns_tensorboard_off_not_the_run(folder, tmp_path, monkeypatch):
    """A full disk under OUT/tensorboard stopped training with "error: No space left on device", naming no file;
    a log.jsonl write failing before any checkpoint said "the last checkpoint ... is intact"."""
    pytest.importorskip("torch.utils.tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "out"
    t = Trainer(tiny(folder, out, "--epochs", "1"))
    with pytest.warns(UserWarning, match=r"TensorBoard logging stopped: cannot write .*tensorboard \(No space left "
                                         r"on device\); log.jsonl goes on") as record:
        assert t.fit()["iterations"] == 3
    assert sum("TensorBoard" in str(w.message) for w in record) == 1
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    t = Trainer(tiny(folder, fresh, "--epochs", "1"))
    (fresh / "log.jsonl").mkdir()  # any write error of the log
    with pytest.raises(DinokitError, match="could not write .*log.jsonl .*no checkpoint had been written yet"):
        t.fit()


def test_a_numbered_copy_lost_to_a_full_disk_is_named_and_a_folder_in_the_way_refused_at_start(folder, tmp_path,
                                                                                               monkeypatch):
    """The message said "the previous checkpoint ... is intact" of the file just written, and nothing said that
    checkpoint0000.pth would never be written; checkpoint.pth being a folder wasted an epoch before failing."""
    import dinokit.trainer as T

    real = T.save_checkpoint

    def full(state, path):
        if path.name != "checkpoint.pth":
            raise OSError(28, "No space left on device")
        real(state, path)

    monkeypatch.setattr(T, "save_checkpoint", full)
    out = tmp_path / "out"
    with pytest.raises(DinokitError, match=r"checkpoint.pth holds this state \(epoch 1\); its numbered copy "
                                           r"checkpoint0000.pth is missing: once there is room, cp .*checkpoint.pth "
                                           r".*checkpoint0000.pth"):
        Trainer(tiny(folder, out)).fit()
    assert _state(out)["epoch"] == 1
    monkeypatch.undo()
    other = tmp_path / "other"
    (other / "checkpoint.pth").mkdir(parents=True)
    with pytest.raises(ConfigError, match="checkpoint.pth is a folder, where the run writes its checkpoint.pth"):
        Trainer(tiny(folder, other))


def test_a_missing_knn_folder_names_its_option(folder, tmp_path):
    """"image directory /nonexistent does not exist" read as a --data problem."""
    from dinokit.errors import DataError

    with pytest.raises(DataError, match="^--knn-val: image directory .*nowhere does not exist"):
        Trainer(tiny(folder, tmp_path / "out", "--knn-every", "1", "--knn-train", str(folder), "--knn-val",
                     str(tmp_path / "nowhere"))).fit()


def test_a_resumed_run_logs_the_same_windows_as_an_uninterrupted_one(folder, tmp_path):
    """The window of a --log-every record was not in the checkpoint: after a resume the first record averaged
    only the steps since the restart (steps 2 instead of 3, another loss)."""
    common = ("--precision", "fp32", "--num-workers", "0", "--log-every", "3", "--save-every-steps", "1")
    Trainer(tiny(folder, tmp_path / "whole", *common)).fit()
    fit_until_interrupted(Trainer(tiny(folder, tmp_path / "cut", *common)), 5)
    Trainer(tiny(folder, tmp_path / "cut", *common)).fit()
    whole, cut = _train_records(tmp_path / "whole"), _train_records(tmp_path / "cut")
    assert [(r["iteration"], r["steps"], r["loss"]) for r in cut] == [
        (r["iteration"], r["steps"], r["loss"]) for r in whole] and [r["steps"] for r in cut] == [3, 3]


def test_old_numbered_checkpoints_that_cannot_be_deleted_are_a_warning(folder, tmp_path, monkeypatch):
    """A failed --keep-last rotation ended the run as if the checkpoint had not been written."""
    import dinokit.trainer as T

    def refuse(out, keep_last):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(T, "rotate_checkpoints", refuse)
    with pytest.warns(UserWarning, match=r"could not delete old numbered checkpoints \(--keep-last 1\): Permission"):
        assert Trainer(tiny(folder, tmp_path / "out", "--keep-last", "1")).fit()["epochs"] == 2
