import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinokit.cli import build_parser
from dinokit.commands.train import config_from_args
from dinokit.config import TrainConfig, apply_overrides, load_yaml
from dinokit.demo import evaluate_run, format_summary, main, raw_pixel_features
from dinokit.eval.knn import knn_classifier
from dinokit.trainer import Trainer

from .helpers import make_fashion_like

DEMO_YAML = Path(__file__).parent.parent / "configs" / "fashion_mnist_demo.yaml"


def test_demo_config_loads_and_validates():
    cfg = apply_overrides(TrainConfig(), load_yaml(DEMO_YAML)).validate()
    assert cfg.fast_augment and cfg.time_budget_minutes == 10
    assert cfg.global_crop_size % cfg.patch_size == 0 and cfg.local_crop_size % cfg.patch_size == 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    data = make_fashion_like(tmp / "fm", n_train=96, n_test=48)
    out = tmp / "run"
    cfg = config_from_args(build_parser("train").parse_args(
        ["train", "--config", str(DEMO_YAML), "--data", f"fashion-mnist:{data}", "--output-dir", str(out),
         "--set", "time_budget_minutes=0", "epochs=2", "batch_size_per_gpu=32", "embed_dim=32", "depth=1",
         "out_dim=64", "head_hidden_dim=32", "head_bottleneck_dim=16", "precision=fp32",
         f"knn_train=fashion-mnist:{data}", f"knn_val=fashion-mnist:{data}", "knn_every=1", "log_every=1"]))
    Trainer(cfg).fit()
    return out, data


def test_demo_results_have_every_key_and_true_numbers(tiny_run, capsys):
    out, data = tiny_run
    assert main(["--run-dir", str(out), "--data", f"fashion-mnist:{data}", "--no-report"]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("knn_top1", "knn_top1_random_init", "knn_top1_raw_pixels", "knn_feature", "train_minutes",
                "images_per_second", "epochs", "data_wait_fraction", "knn_curve", "knn_top1_cls",
                "knn_top1_avgpool", "knn_top1_concat"):
        assert key in res, key
    for key in ("knn_top1", "knn_top1_random_init", "knn_top1_raw_pixels"):
        assert 0 <= res[key] <= 100
    assert res["epochs"] == pytest.approx(2) and res["images_per_second"] > 0
    assert len(res["knn_curve"]) == 2  # online k-NN after each epoch
    assert "raw pixels" in capsys.readouterr().out

    # raw-pixel k-NN equals an independent computation
    from dinokit.data import load_fashion_mnist

    xtr, ytr = load_fashion_mnist(data, "train")
    xte, yte = load_fashion_mnist(data, "test")
    ftr = torch.nn.functional.normalize(xtr.reshape(len(xtr), -1).double(), dim=1)
    fte = torch.nn.functional.normalize(xte.reshape(len(xte), -1).double(), dim=1)
    sim = fte @ ftr.T
    s, idx = sim.topk(20, dim=1)
    votes = torch.zeros(len(xte), 10, dtype=torch.float64).scatter_add_(1, ytr[idx], (s / 0.07).exp())
    expected = (votes.argmax(1) == yte).double().mean().item() * 100
    assert res["knn_top1_raw_pixels"] == pytest.approx(expected, abs=1e-6)
    top1, _ = knn_classifier(raw_pixel_features(xtr), ytr, raw_pixel_features(xte), yte, 20, 0.07)
    assert res["knn_top1_raw_pixels"] == pytest.approx(top1)


def test_summary_names_the_feature_and_the_comparison(tiny_run):
    out, data = tiny_run
    res = evaluate_run(out, f"fashion-mnist:{data}", random_init=False, write=False)
    text = format_summary({**res, "knn_top1_random_init": 0.0})
    assert "knn_top1" in text and "raw pixels" in text


def test_knn_command_reproduces_the_demo_numbers(tiny_run, tmp_path, capsys):
    """``dinokit knn --resize-size 28 --features concat`` on the demo's checkpoint gives the demo's knn_top1
    (same features, same protocol); the image size defaults to the trained 28 px."""
    from dinokit.cli import main as cli

    out, data = tiny_run
    res = evaluate_run(out, f"fashion-mnist:{data}", random_init=False, raw_pixels=False, write=False)
    spec = f"fashion-mnist:{data}"
    for feature in ("cls", "avgpool", "concat"):
        path = tmp_path / f"{feature}.json"
        assert cli(["knn", "--weights", str(out / "checkpoint.pth"), "--train-data", spec, "--val-data", spec,
                    "--k", "20", "--resize-size", "28", "--features", feature, "--num-workers", "0",
                    "--no-progress", "--device", "cpu", "--output", str(path)]) == 0
        got = json.loads(path.read_text())
        assert got["image_size"] == 28 and got["features"] == feature
        assert got["knn"]["20"]["top1"] == pytest.approx(res[f"knn_top1_{feature}"], abs=1e-6), feature
    capsys.readouterr()


def _summary_input(random_init: bool) -> dict:
    res = {"knn_protocol": {"k": 20, "T": 0.07, "split": "train (60k) -> test (10k)"}, "knn_feature": "concat",
           "knn_top1": 80.0, "knn_top1_raw_pixels": 84.59, "knn_top1_raw_pixels_standardized": 85.69,
           "train_minutes": 10.0, "epochs": 3.0, "iterations": 100, "images_per_second": 100.0,
           "data_wait_fraction": 0.1}
    for i, name in enumerate(("cls", "avgpool", "concat")):
        res[f"knn_top1_{name}"] = 70.0 + i
        if random_init:
            res[f"knn_top1_random_init_{name}"] = 50.0 + i
    return res


@pytest.mark.parametrize("random_init", [True, False])
def test_summary_table_rows_line_up_with_the_header(random_init):
    lines = format_summary(_summary_input(random_init)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("features"))
    rows = [line for line in lines[header + 1:] if "%" in line and not line.startswith(("training", "=>"))]
    assert len(rows) == 5  # three features, two raw-pixel baselines
    ends = (lines[header].index("trained") + len("trained"), len(lines[header]))
    for row in rows:
        assert row[ends[0] - 1] == "%" and row[ends[0] - 2].isdigit(), row  # the trained column
        assert row[ends[1] - 1] in "%-" and row[ends[1] - 2] in " 0123456789", row  # the random-init column
        assert row[:ends[0] - 10].rstrip() and row[ends[0] - 10] == " ", row  # the label ends before the column


def test_demo_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--k K neighbours that vote in the weighted k-NN" in out and "(default: 20)" in out
    assert "--T T temperature of the k-NN vote" in out and "(default: 0.07)" in out
    assert "--batch-size BATCH_SIZE images per forward pass" in out and "(default: 1000)" in out


@pytest.mark.parametrize("argv, msg", [(["--k", "0"], "--k must be >= 1, got 0"),
                                       (["--T", "0"], "--T must be > 0, got 0"),
                                       (["--T", "nan"], "--T must be > 0, got nan"),
                                       (["--batch-size", "0"], "--batch-size must be >= 1, got 0")])
def test_demo_option_errors_are_one_line(argv, msg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--run-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err


def test_final_loss_skips_a_resumed_epochs_placeholder_record(tmp_path):
    """A run stopped on an epoch's last iteration and resumed logs that epoch with images_per_s 0 and loss 0."""
    from dinokit.demo import training_stats

    records = [{"type": "epoch", "epoch": 0, "iteration": 3, "loss": 2.5, "images_per_s": 100.0},
               {"type": "epoch", "epoch": 1, "iteration": 3, "loss": 0.0, "images_per_s": 0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = apply_overrides(TrainConfig(), {})
    stats = training_stats(tmp_path, {"iteration": 3, "train_seconds": 6.0}, cfg)
    assert stats["final_loss"] == pytest.approx(2.5)


def test_demo_errors_on_bad_data_and_checkpoints_are_one_line(tiny_run, tmp_path, capsys):
    """Bad --data, a truncated or foreign checkpoint and a CNN run ended in tracebacks (only FileNotFoundError
    and ValueError were caught)."""
    import shutil

    out, data = tiny_run
    cases = [
        ([str(out), "fashion-mnist:" + str(tmp_path / "nope")], "does not exist"),
        ([str(out), str(tmp_path / "nope")], "does not exist"),
    ]
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    shutil.copy(out / "config.yaml", truncated)
    (truncated / "checkpoint.pth").write_bytes((out / "checkpoint.pth").read_bytes()[:5000])
    cases.append(([str(truncated), f"fashion-mnist:{data}"], "checkpoint.pth"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weights": torch.zeros(2)}, foreign / "checkpoint.pth")
    cases.append(([str(foreign), f"fashion-mnist:{data}"], "is not a dinokit training checkpoint (no 'teacher'"))
    for (run, spec), msg in cases:
        rc = main(["--run-dir", run, "--data", spec, "--no-report", "--no-random-init"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and msg in err and err.startswith("dinokit.demo: error: "), err


def test_demo_refuses_a_cnn_run_in_one_line(tmp_path, capsys):
    from dinokit.demo import load_teacher_backbone
    from dinokit.errors import ConfigError

    data = make_fashion_like(tmp_path / "fm", n_train=16, n_test=8)
    out = tmp_path / "cnn"
    cfg = config_from_args(build_parser("train").parse_args(
        ["train", "--data", f"fashion-mnist:{data}", "--output-dir", str(out), "--arch", "resnet18",
         "--global-crop-size", "32", "--local-crop-size", "32", "--local-crops-number", "0", "--batch-size", "8",
         "--epochs", "1", "--out-dim", "16", "--num-workers", "0", "--precision", "fp32", "--device", "cpu"]))
    Trainer(cfg).fit()
    with pytest.raises(ConfigError, match="needs a ViT run; .* trained resnet18: use dinokit knn"):
        load_teacher_backbone(out)
    assert main(["--run-dir", str(out), "--data", f"fashion-mnist:{data}", "--no-report"]) == 2
    assert "needs a ViT run" in capsys.readouterr().err


def test_the_summary_names_the_real_split_sizes_and_missing_figures(tiny_run, capsys):
    out, data = tiny_run
    res = evaluate_run(out, f"fashion-mnist:{data}", random_init=False, write=False)
    assert res["knn_protocol"]["split"] == "train (96) -> test (48)"
    text = format_summary({**res, "data_wait_fraction": float("nan"), "images_per_second": float("nan")})
    assert "train (96) -> test (48)" in text and "nan" not in text and "n/a images/s, data wait n/a" in text
    assert "0.0 min" not in text  # a few seconds of training read as seconds
    full = _summary_input(True)
    assert "train (60k) -> test (10k)" in format_summary(full) and "10.0 min" in format_summary(full)
    from dinokit.demo import _thousands

    assert (_thousands(60000), _thousands(10000), _thousands(1500), _thousands(96)) == ("60k", "10k", "1500", "96")


def test_a_k_above_the_train_set_is_named_and_recorded(tiny_run):
    out, data = tiny_run
    with pytest.warns(UserWarning, match="--k 1000 above the 96 train images: the vote uses all of them"):
        res = evaluate_run(out, f"fashion-mnist:{data}", k=1000, random_init=False, raw_pixels=False, write=False)
    assert (res["knn_protocol"]["k"], res["knn_protocol"]["k_used"]) == (1000, 96)


def test_an_unusable_checkpoint_pth_falls_back_to_the_newest_intact_numbered_one(tiny_run, tmp_path):
    """The demo read only RUN/checkpoint.pth; the report and a resume take the newest intact numbered one."""
    import shutil

    out, data = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "log.jsonl"):
        shutil.copy(out / name, run)
    good = (out / "checkpoint.pth").read_bytes()
    (run / "checkpoint0000.pth").write_bytes(good[:4000])  # older and truncated too: not taken
    (run / "checkpoint0001.pth").write_bytes(good)
    (run / "checkpoint.pth").write_bytes(good[:5000])
    # in a process of its own: pytest's warnings plugin records warnings instead of printing them
    r = subprocess.run([sys.executable, "-m", "dinokit.demo", "--run-dir", str(run), "--data", f"fashion-mnist:{data}",
                        "--no-report", "--no-random-init"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = r.stderr
    assert r.returncode == 0 and err.startswith("dinokit.demo: warning: ") and err.count("\n") == 1, err
    assert "checkpoint.pth" in err and "evaluating checkpoint0001.pth, the newest intact checkpoint" in err
    res = json.loads((run / "results.json").read_text())
    assert res["knn_protocol"]["checkpoint"] == "checkpoint0001.pth"
    reference = evaluate_run(out, f"fashion-mnist:{data}", random_init=False, raw_pixels=False, write=False)
    assert res["knn_top1"] == reference["knn_top1"]  # the same weights: the same score
