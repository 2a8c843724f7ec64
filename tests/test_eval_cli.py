"""End to end: ``dinokit knn | linear | features | attention | export`` on a tiny generated ImageFolder with a
tiny saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dinokit.cli import main
from dinokit.head import DINOHead
from dinokit.models import build_backbone
from dinokit.wrapper import MultiCropWrapper

from .helpers import make_fashion_like, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--image-size", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    train = make_image_folder(tmp / "train", n_per_class=4, classes=("a", "b", "c"), size=(40, 36), seed=0)
    val = make_image_folder(tmp / "val", n_per_class=2, classes=("a", "b", "c"), size=(36, 40), seed=1)

    def wrapper():
        backbone = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
        return MultiCropWrapper(backbone, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))

    student, teacher = wrapper(), wrapper()
    ckpt = tmp / "checkpoint.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 1,
                "config": {"arch": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                           "global_crop_size": 32}}, ckpt)
    return tmp, train, val, ckpt, teacher.backbone.eval()


def test_knn_cli(setup, capsys):
    tmp, train, val, ckpt, _ = setup
    out = tmp / "knn.json"
    rc = main(["knn", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val), "--k", "1", "5",
               "--num-workers", "0", "--batch-size", "5", *COMMON, "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "top-1" in text and "12 train / 6 val images, 3 classes" in text
    res = json.loads(out.read_text())
    assert set(res["knn"]) == {"1", "5"} and res["units"] == "percent" and res["num_classes"] == 3
    # three colour classes (helpers.make_image_folder): even a random tiny ViT separates them
    assert res["knn"]["1"]["top1"] == pytest.approx(100.0)
    assert res["knn"]["5"]["top5"] == pytest.approx(100.0)  # 3 classes: top-5 covers all
    assert res["model"]["arch"] == "vit_custom" and res["feature_dim"] == 32


def test_knn_cli_warns_in_one_line_about_a_validation_class_the_train_set_lacks(setup, tmp_path):
    """A validation class missing from the train set cannot be predicted: the command says so in one line
    (``dinokit knn: warning: ...``, not Python's ``file:line: UserWarning`` with a source line) and goes on."""
    _, train, _, ckpt, _ = setup
    val = make_image_folder(tmp_path / "val", n_per_class=2, classes=("a", "zebra"), size=(36, 40), seed=1)
    r = subprocess.run([sys.executable, "-m", "dinokit", "knn", "--weights", str(ckpt), "--train-data", str(train),
                        "--val-data", str(val), "--k", "1", "--num-workers", "0", *COMMON],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ("dinokit knn: warning: 1 validation class(es) not in the train set (zebra): their 2 images can never "
            "be predicted and count as errors\n") in r.stderr
    assert "UserWarning" not in r.stderr and "aligned_labels(" not in r.stderr
    assert "4 val images, 4 classes" in r.stdout


def test_linear_cli(setup, capsys):
    tmp, train, val, ckpt, _ = setup
    out = tmp / "linear.json"
    rc = main(["linear", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val),
               "--n-last-blocks", "2", "--epochs", "5", "--lr", "1", "10", "--batch-size", "4",
               "--num-workers", "0", *COMMON, "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "cached-features" in text and "best:" in text
    res = json.loads(out.read_text())["linear"]
    assert res["feature_dim"] == 64 and res["num_labels"] == 3 and [r["lr"] for r in res["results"]] == [1, 10]
    assert res["best"]["best"]["top1"] > 50.0  # chance: 33 %
    # the reference's augmented protocol (ViT-B style features: CLS interleaved with the mean patch token)
    rc = main(["linear", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val),
               "--n-last-blocks", "1", "--avgpool-patchtokens", "--augment", "--epochs", "1", "--batch-size", "6",
               "--num-workers", "0", *COMMON, "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["linear"]
    assert res["mode"] == "augment" and res["feature_dim"] == 64 and len(res["results"][0]["history"]) == 1
    torch.manual_seed(12345)  # another state of the global RNG: the crops drawn without loader workers are seeded
    assert main(["linear", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val),
                 "--n-last-blocks", "1", "--avgpool-patchtokens", "--augment", "--epochs", "1", "--batch-size", "6",
                 "--num-workers", "0", *COMMON, "--output", str(out)]) == 0
    again = json.loads(out.read_text())["linear"]
    assert again["results"][0]["history"] == res["results"][0]["history"]


def test_features_cli(setup, capsys):
    from dinokit.augmentation import eval_transform
    from dinokit.data import ImageFolderDataset

    tmp, train, _, ckpt, backbone = setup
    out = tmp / "feats.safetensors"
    rc = main(["features", "--weights", str(ckpt), "--data", str(train), "--out", str(out), "--patch-tokens",
               "--num-workers", "0", *COMMON])
    assert rc == 0 and "features 12x32" in capsys.readouterr().out
    t = load_file(str(out))
    assert t["features"].shape == (12, 32) and t["patch_tokens"].shape == (12, 16, 32)
    assert t["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    ds = ImageFolderDataset(train, transform=eval_transform(32))
    assert json.loads(meta["paths"]) == [os.path.relpath(p, train) for p, _ in ds.samples]
    assert json.loads(meta["classes"]) == ["a", "b", "c"] and json.loads(meta["model"])["num_heads"] == 2
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        assert torch.allclose(t["features"], backbone(x), atol=1e-5)
    rc = main(["features", "--weights", str(ckpt), "--data", str(train), "--out", str(out), "--n-last-blocks", "2",
               "--num-workers", "0", *COMMON])
    assert rc == 0 and load_file(str(out))["features"].shape == (12, 64)


def test_bf16_precision_of_the_feature_evaluations(setup, capsys, monkeypatch):
    """--precision bf16 (knn, linear, features): the backbone's forward under bf16 autocast, features returned in
    fp32, close to the fp32 ones but not equal; recorded in the outputs. fp32 stays the default."""
    from dinokit.eval import knn as K

    tmp, train, val, ckpt, _ = setup
    entered = []
    real = K.eval_autocast
    monkeypatch.setattr(K, "eval_autocast", lambda p, d: entered.append(p) or real(p, d))
    f32, b16 = tmp / "f32.safetensors", tmp / "b16.safetensors"
    for out, extra in ((f32, []), (b16, ["--precision", "bf16"])):
        assert main(["features", "--weights", str(ckpt), "--data", str(train), "--out", str(out),
                     "--num-workers", "0", *COMMON, *extra]) == 0
    a, b = load_file(str(f32))["features"], load_file(str(b16))["features"]
    assert b.dtype == torch.float32 and not torch.equal(a, b) and (a - b).norm() < 3e-2 * a.norm()
    with safe_open(str(b16), "pt") as f:
        assert f.metadata()["precision"] == "bf16"
    assert entered.count("bf16") == 1 and entered.count("fp32") == 1  # one batch each
    knn_out = tmp / "knn16.json"
    assert main(["knn", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val), "--k", "1",
                 "--num-workers", "0", *COMMON, "--precision", "bf16", "--output", str(knn_out)]) == 0
    res = json.loads(knn_out.read_text())
    assert res["precision"] == "bf16" and res["knn"]["1"]["top1"] == pytest.approx(100.0)
    lin_out = tmp / "lin16.json"
    entered.clear()
    assert main(["linear", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val),
                 "--augment", "--epochs", "1", "--batch-size", "6", "--num-workers", "0", *COMMON,
                 "--precision", "bf16", "--output", str(lin_out)]) == 0
    assert json.loads(lin_out.read_text())["linear"]["precision"] == "bf16"
    assert set(entered) == {"bf16"} and len(entered) == 1 + 2  # val features (one batch), 2 training batches
    capsys.readouterr()
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        K.eval_autocast("fp16", "cpu")


def test_attention_cli(setup, capsys):
    tmp, train, _, ckpt, _ = setup
    wide = tmp / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(wide)
    out = tmp / "attn"
    rc = main(["attention", "--weights", str(ckpt), "--image", str(train / "a" / "img000.png"), "--image", str(wide),
               "--out", str(out), "--threshold", "0.6", "--image-size", "24", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert np.load(out / "wide-attn.npy").shape == (2, 3, 5)  # 24 x 40 px, patch 8
    assert Image.open(out / "wide-overlay-mean.png").size == (40, 24)
    assert (out / "img000-mask-th0.6-head1.png").exists() and (out / "img000-attn-head0.png").exists()


def test_attention_cli_keeps_every_image_whose_names_collide(setup, tmp_path, capsys):
    """a/x.png, b/x.png and x_1.png: the second x took x_1, which the third then overwrote."""
    _, _, _, ckpt, _ = setup
    rng = np.random.default_rng(0)
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "x_1.png"]
    for i, p in enumerate(paths):
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24 + 8 * i, 24, 3), dtype=np.uint8)).save(p)
    out = tmp_path / "attn"
    argv = ["attention", "--weights", str(ckpt), "--out", str(out), "--image-size", "24", "--device", "cpu"]
    assert main([*argv, *(a for p in paths for a in ("--image", str(p)))]) == 0, capsys.readouterr().err
    shapes = {f.name: np.load(f).shape for f in out.glob("*-attn.npy")}
    assert shapes == {"x-attn.npy": (2, 3, 3), "x_1-attn.npy": (2, 4, 3), "x_1_1-attn.npy": (2, 5, 3)}


def test_export_cli_then_knn_on_export(setup, capsys):
    tmp, train, val, ckpt, _ = setup
    out = tmp / "backbone.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "vit_custom/8" in capsys.readouterr().out
    rc = main(["knn", "--weights", str(out), "--train-data", str(train), "--val-data", str(val), "--k", "3",
               "--num-workers", "0", *COMMON])
    assert rc == 0 and "top-1" in capsys.readouterr().out


def test_knn_and_features_on_fashion_mnist_spec(setup, capsys):
    tmp, _, _, ckpt, _ = setup
    fm = make_fashion_like(tmp / "fmnist", n_train=40, n_test=20)
    rc = main(["knn", "--weights", str(ckpt), "--train-data", f"fashion-mnist:{fm}", "--val-data",
               f"fashion-mnist:{fm}", "--k", "5", "--num-workers", "0", "--batch-size", "20", *COMMON])
    assert rc == 0 and "40 train / 20 val images" in capsys.readouterr().out
    out = tmp / "fm.safetensors"
    rc = main(["features", "--weights", str(ckpt), "--data", f"fashion-mnist:{fm}", "--split", "test",
               "--out", str(out), "--num-workers", "0", *COMMON])
    assert rc == 0 and load_file(str(out))["features"].shape == (20, 32)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["split"] == "test" and "paths" not in meta and len(json.loads(meta["classes"])) == 10


@pytest.mark.parametrize("cmd", [
    ["knn", "--train-data", "{train}", "--val-data", "{train}"],
    ["linear", "--train-data", "{train}", "--val-data", "{train}"],
    ["features", "--data", "{train}", "--out", "{tmp}/f.safetensors"],
    ["attention", "--image", "{train}/a/img000.png", "--out", "{tmp}/att"],
])
def test_bad_weights_exit_2_one_line(setup, capsys, cmd):
    tmp, train, _, _, _ = setup
    args = [c.format(train=train, tmp=tmp) for c in cmd]
    (tmp / "notes.txt").write_text("not weights")
    for weights in (tmp / "missing.pth", tmp / "notes.txt"):
        rc = main([*args, "--weights", str(weights), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and str(weights) in err and "Traceback" not in err


def test_missing_inputs_exit_2(setup, capsys):
    tmp, train, _, ckpt, _ = setup
    rc = main(["knn", "--weights", str(ckpt), "--train-data", str(tmp / "nope"), "--val-data", str(train),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and err.count("\n") == 1
    rc = main(["export", "--checkpoint", str(tmp / "missing.pth"), "--out", str(tmp / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pth" in err and err.count("\n") == 1
    rc = main(["attention", "--weights", str(ckpt), "--image", str(tmp / "nope.png"), "--out", str(tmp / "a")])
    assert rc == 2 and "nope.png" in capsys.readouterr().err
    rc = main(["knn", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(train), "--device",
               "cpu", "--image-size", "32", "--resize-size", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "--resize-size 16 is smaller than --image-size 32" in err and err.count("\n") == 1


def test_subprocess_bad_weights_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "dinokit", "knn", "--weights", str(tmp_path / "missing.pth"),
                        "--train-data", str(tmp_path), "--val-data", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "missing.pth" in p.stderr


def test_eval_image_size_defaults_to_the_trained_size(setup, capsys):
    """Without --image-size, knn, features and linear use the size the ViT's position embedding was trained at (32 px
    for this model: a 4 x 4 grid of 8-px patches), not 224."""
    tmp, train, _, ckpt, _ = setup
    base = ["--weights", str(ckpt), "--num-workers", "0", "--device", "cpu", "--no-progress"]
    outs = {}
    for name, size in (("default", []), ("explicit", ["--image-size", "32"])):
        outs[name] = tmp / f"size_{name}.safetensors"
        assert main(["features", *base, "--data", str(train), "--out", str(outs[name]), *size]) == 0
    with safe_open(str(outs["default"]), "pt") as f:
        assert f.metadata()["image_size"] == "32" and f.metadata()["resize_size"] == "36"
    assert torch.equal(load_file(str(outs["default"]))["features"], load_file(str(outs["explicit"]))["features"])
    res = tmp / "knn_size.json"
    assert main(["knn", *base, "--train-data", str(train), "--val-data", str(train), "--k", "1",
                 "--output", str(res)]) == 0
    assert json.loads(res.read_text())["image_size"] == 32
    res = tmp / "linear_size.json"
    assert main(["linear", *base, "--train-data", str(train), "--val-data", str(train), "--epochs", "1",
                 "--n-last-blocks", "1", "--resize-size", "32", "--output", str(res)]) == 0
    assert {k: json.loads(res.read_text())[k] for k in ("image_size", "resize_size")} == {"image_size": 32,
                                                                                       "resize_size": 32}
    capsys.readouterr()
    assert main(["linear", *base, "--train-data", str(train), "--val-data", str(train), "--resize-size", "16"]) == 2
    assert "--resize-size 16 is smaller than --image-size 32" in capsys.readouterr().err


def test_output_paths_are_checked_before_any_work(tmp_path):
    from dinokit.commands._common import check_output_dir, check_output_file
    from dinokit.errors import ConfigError

    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"
    assert check_output_dir(tmp_path / "new-dir") == tmp_path / "new-dir"
    with pytest.raises(ConfigError, match="is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        check_output_file(a_file / "x.json")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(a_file)
    with pytest.raises(ConfigError, match="is not a folder"):
        check_output_dir(a_file / "sub")
    if Path("/proc/self").is_dir():  # Linux's /proc refuses new files, whatever the user (root included)
        with pytest.raises(ConfigError, match="no permission"):
            check_output_file("/proc/x.safetensors")
        with pytest.raises(ConfigError, match="no permission"):
            check_output_dir("/proc/new-folder")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ConfigError, match="no permission"):
                check_output_file(ro / "x.json")
            with pytest.raises(ConfigError, match="no permission"):
                check_output_dir(ro / "d")
        finally:
            ro.chmod(0o700)


def test_file_system_errors_end_in_one_line(tmp_path, capsys, monkeypatch):
    from dinokit import cli

    def boom(args):
        raise IsADirectoryError(21, "Is a directory", str(tmp_path))

    monkeypatch.setattr(cli, "build_parser", lambda only=None: _FakeParser(boom))
    assert cli.main(["knn"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dinokit knn: error: Is a directory: {tmp_path}"


def test_a_stop_is_announced_by_rank_0_only(capsys, monkeypatch):
    """Under torchrun every rank stops at the same iteration with the same message: it was printed once per
    rank. Errors still print on every rank (they may differ)."""
    from dinokit import cli
    from dinokit.trainer import Stopped

    def stop(args):
        raise Stopped("SIGINT at iteration 80, checkpoint saved in out (epoch 1); the same command resumes from it",
                      2)

    monkeypatch.setattr(cli, "build_parser", lambda only=None: _FakeParser(stop))
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["train"]) == 130
        assert ("dinokit train: stopped: SIGINT at iteration 80" in capsys.readouterr().err) == printed
    monkeypatch.setattr(cli, "build_parser", lambda only=None: _FakeParser(
        lambda args: (_ for _ in ()).throw(IsADirectoryError(21, "Is a directory", "x"))))
    assert cli.main(["train"]) == 1 and "error: Is a directory" in capsys.readouterr().err  # rank 1 too


class _FakeParser:
    def __init__(self, run):
        self.run = run

    def parse_known_args(self, argv):
        import argparse

        return argparse.Namespace(_run=self.run, command=argv[0]), []


def _with_unreadable_files(src: Path, dst: Path) -> Path:
    """A copy of ``src`` plus, in class ``a``, a corrupt JPEG and an empty PNG, and in class ``c`` a truncated one."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "a" / "0-corrupt.jpg").write_bytes(os.urandom(300))
    (dst / "a" / "1-empty.png").write_bytes(b"")
    good = sorted((dst / "c").iterdir())[0].read_bytes()
    (dst / "c" / "zz-truncated.png").write_bytes(good[: len(good) // 3])
    return dst


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluations_leave_unreadable_images_out_instead_of_counting_a_substitute(setup, tmp_path, capsys,
                                                                               workers):
    """Training substitutes the next readable image for an unreadable one; evaluations used to do the same, so
    features/k-NN counted a neighbour twice, under the unreadable file's label. Now their rows are left out,
    with one warning, whether the files fail in the main process or in loader workers."""
    tmp, train, val, ckpt, backbone = setup
    bad_train = _with_unreadable_files(train, tmp_path / "train")
    out = tmp_path / "f.safetensors"
    with pytest.warns(UserWarning, match=r"3 unreadable image\(s\) of the input data left out .*12 of 15 used"):
        rc = main(["features", "--weights", str(ckpt), "--data", str(bad_train), "--out", str(out),
                   "--num-workers", str(workers), "--batch-size", "4", *COMMON])
    assert rc == 0 and "(12 images)" in capsys.readouterr().out
    tensors = load_file(out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    paths = json.loads(meta["paths"])
    assert meta["n"] == "12" and len(paths) == 12 and not any("corrupt" in p or "empty" in p or "trunc" in p
                                                               for p in paths)
    # each row is its own file's feature, under its own label
    clean = load_file(_features_of(ckpt, train, tmp_path / "clean.safetensors"))
    torch.testing.assert_close(tensors["features"], clean["features"])
    assert torch.equal(tensors["labels"], clean["labels"])

    res = tmp_path / "knn.json"
    with pytest.warns(UserWarning, match="left out"):
        rc = main(["knn", "--weights", str(ckpt), "--train-data", str(bad_train), "--val-data", str(val), "--k", "1",
                   "--num-workers", str(workers), "--batch-size", "4", *COMMON, "--output", str(res)])
    assert rc == 0 and "12 train / 6 val images" in capsys.readouterr().out
    assert json.loads(res.read_text())["n_train"] == 12


def _features_of(ckpt, data, out):
    assert main(["features", "--weights", str(ckpt), "--data", str(data), "--out", str(out), "--num-workers", "0",
                 *COMMON]) == 0
    return out


@pytest.mark.parametrize(("argv", "message"), [
    (["knn", "--image-size", "30"], "--image-size 30 is not a multiple of the ViT's patch size 8 (e.g. 24 or 32)"),
    (["features", "--image-size", "0"], "--image-size must be > 0, got 0"),
    (["linear", "--image-size", "4"], "--image-size 4 is not a multiple of the ViT's patch size 8 (e.g. 8)"),
    (["knn", "--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
])
def test_impossible_evaluation_options_are_one_line_errors(setup, tmp_path, capsys, argv, message):
    _, train, val, ckpt, _ = setup
    data = {"knn": ["--train-data", str(train), "--val-data", str(val)], "features": ["--data", str(train), "--out",
            str(tmp_path / "f.safetensors")], "linear": ["--train-data", str(train), "--val-data", str(val)]}
    rc = main([argv[0], "--weights", str(ckpt), *data[argv[0]], *argv[1:], "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"dinokit {argv[0]}: error: {message}"


def test_more_last_blocks_or_neighbours_than_exist_are_named_and_recorded_as_used(setup, tmp_path, capsys):
    _, train, val, ckpt, _ = setup
    out = tmp_path / "f.safetensors"
    with pytest.warns(UserWarning, match="--n-last-blocks 5 but the ViT has 2 blocks: using its 2"):
        assert main(["features", "--weights", str(ckpt), "--data", str(train), "--out", str(out),
                     "--n-last-blocks", "5", "--num-workers", "0", *COMMON]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["n_last_blocks"] == "2" and f.get_tensor("features").shape == (12, 64)
    res = tmp_path / "lin.json"
    with pytest.warns(UserWarning, match="--n-last-blocks 4 but the ViT has 2 blocks"):  # linear's default: 4
        assert main(["linear", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val),
                     "--epochs", "1", "--num-workers", "0", *COMMON, "--output", str(res)]) == 0
    lin = json.loads(res.read_text())["linear"]
    assert lin["n_last_blocks"] == 2 and lin["feature_dim"] == 64
    with pytest.warns(UserWarning, match="--k 20 100 above the 12 train images: such a k votes with all of them"):
        assert main(["knn", "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val),
                     "--k", "1", "20", "100", "--num-workers", "0", *COMMON]) == 0
    capsys.readouterr()


def test_an_error_raised_in_a_loader_worker_is_one_line(tmp_path, capsys, monkeypatch):
    """The DataLoader re-raises a worker's exception with the worker's traceback as its message: the CLI
    prints the original message only."""
    from torch.utils.data._utils import ExceptionWrapper

    from dinokit import cli
    from dinokit.errors import DataError

    def run(args):
        try:
            raise DataError("none of the 3 image files under X could be read")
        except DataError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    monkeypatch.setattr(cli, "build_parser", lambda only=None: _FakeParser(run))
    assert cli.main(["knn"]) == 2
    assert capsys.readouterr().err == "dinokit knn: error: none of the 3 image files under X could be read\n"


def test_num_heads_for_a_bare_state_dict_of_a_non_standard_width(setup, tmp_path, capsys):
    """A bare ViT state dict does not record its heads; for a non-standard width the warning names --num-heads,
    and with it the features are the model's own."""
    _, train, _, _, backbone = setup  # width 32, 2 heads
    bare = tmp_path / "bare.pth"
    torch.save(backbone.state_dict(), bare)
    out = tmp_path / "f.safetensors"
    with pytest.warns(UserWarning, match=r"pass --num-heads N"):
        assert main(["features", "--weights", str(bare), "--data", str(train), "--out", str(out),
                     "--num-workers", "0", *COMMON]) == 0
    assert main(["features", "--weights", str(bare), "--data", str(train), "--out", str(out), "--num-heads", "2",
                 "--num-workers", "0", *COMMON]) == 0
    own = load_file(_features_of(setup[3], train, tmp_path / "own.safetensors"))
    torch.testing.assert_close(load_file(out)["features"], own["features"])
    assert main(["features", "--weights", str(bare), "--data", str(train), "--out", str(out), "--num-heads", "0",
                 *COMMON]) == 2
    assert "--num-heads must be > 0" in capsys.readouterr().err


def test_a_diverged_checkpoint_is_an_error_not_a_perfect_score(setup, tmp_path, capsys):
    """A backbone with NaN weights gave k-NN top-1 100% (NaN votes ranked every target first) and linear
    chance level without a word: both now stop in one line."""
    _, train, val, ckpt, _ = setup
    state = torch.load(ckpt, weights_only=True)
    state["teacher"]["backbone.norm.weight"][0] = float("nan")
    bad = tmp_path / "diverged.pth"
    torch.save(state, bad)
    for cmd in (["knn", "--k", "1"], ["linear", "--epochs", "1", "--n-last-blocks", "1"]):
        rc = main([cmd[0], "--weights", str(bad), "--train-data", str(train), "--val-data", str(val), *cmd[1:],
                   "--num-workers", "0", *COMMON])
        err = capsys.readouterr().err
        assert rc == 2 and "features are not finite (NaN or inf) for" in err and "diverged or corrupt" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("cmd", ["knn", "linear"])
def test_knn_and_linear_check_their_output_before_evaluating(setup, tmp_path, capsys, monkeypatch, cmd):
    """They printed their whole table, then failed on --output (a folder); now refused before any work."""
    _, train, val, ckpt, _ = setup
    import importlib

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(importlib.import_module(f"dinokit.commands.{cmd}"), "load_model", no_model)
    rc = main([cmd, "--weights", str(ckpt), "--train-data", str(train), "--val-data", str(val),
               "--output", str(tmp_path), *COMMON])
    out, err = capsys.readouterr()
    assert rc == 2 and "--output" in err and "is a folder" in err and "top-1" not in out, err


def test_features_with_a_paths_side_file_into_a_new_folder(setup, tmp_path, monkeypatch, capsys):
    """A long paths list goes to OUT.paths.json; it was written before OUT's folder was created: the command
    failed after the whole extraction when --out named a new folder."""
    import dinokit.commands.features as features_cmd

    tmp, train, _, ckpt, _ = setup
    monkeypatch.setattr(features_cmd, "_MAX_INLINE_PATHS", 10)
    out = tmp_path / "new" / "feats.safetensors"
    rc = main(["features", "--weights", str(ckpt), "--data", str(train), "--out", str(out), "--num-workers", "0",
               *COMMON])
    assert rc == 0, capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert "paths" not in meta and meta["paths_file"] == "feats.safetensors.paths.json"
    paths = json.loads((out.parent / meta["paths_file"]).read_text())
    assert len(paths) == 12 and paths[0].startswith("a")


def test_eval_bf16_on_a_cpu_that_emulates_it_is_named_once(monkeypatch):
    import warnings

    from dinokit.eval import knn as K
    monkeypatch.setattr(K, "_EMULATED_BF16_WARNED", False)
    monkeypatch.setattr(K, "cpu_supports_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on a CPU without native bf16"):
        with K.eval_autocast("bf16", "cpu"):
            assert torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not once per batch
        with K.eval_autocast("bf16", "cpu"):
            pass
        monkeypatch.setattr(K, "_EMULATED_BF16_WARNED", False)
        monkeypatch.setattr(K, "cpu_supports_bf16", lambda: True)
        with K.eval_autocast("bf16", "cpu"):  # native bf16: quiet
            pass
        with K.eval_autocast("fp32", "cpu"):
            assert not torch.is_autocast_enabled("cpu")


def test_an_output_that_would_replace_an_input_is_refused_before_any_work(setup, tmp_path, capsys):
    """``--output``/``--out`` equal to the weights file, or an image of an input folder, replaced that input
    (the weights by a JSON file, a training image by features); now one line, exit 2, the input unchanged."""
    import shutil

    tmp, train, val, ckpt, _ = setup
    weights = tmp_path / "w.pth"
    shutil.copy(ckpt, weights)
    data = tmp_path / "train"
    shutil.copytree(train, data)
    image = sorted((data / "a").iterdir())[0]
    before = weights.read_bytes(), image.read_bytes()
    common = ["--num-workers", "0", *COMMON]
    cases = [
        (["knn", "--weights", str(weights), "--train-data", str(data), "--val-data", str(val), "--output",
          str(weights), *common], "--output .* is the --weights file"),
        (["linear", "--weights", str(weights), "--train-data", str(data), "--val-data", str(val), "--epochs", "1",
          "--output", str(weights), *common], "--output .* is the --weights file"),
        (["knn", "--weights", str(weights), "--train-data", str(data), "--val-data", str(val), "--output",
          str(image), *common], "--output .* is an image of the --train-data folder"),
        (["features", "--weights", str(weights), "--data", str(data), "--out", str(weights), *common],
         "--out .* is the --weights file"),
        (["features", "--weights", str(weights), "--data", f"{data}", "--out", str(image), *common],
         "--out .* is an image of the --data folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err
        assert (weights.read_bytes(), image.read_bytes()) == before
    # a new file, or an existing non-image file, inside an input folder is fine (results next to the data)
    notes = data / "results.json"
    notes.write_text("{}")
    assert main(["knn", "--weights", str(weights), "--train-data", str(data), "--val-data", str(val), "--k", "1",
                 "--output", str(notes), *common]) == 0
    assert json.loads(notes.read_text())["n_train"] == 12


def test_refuse_overwriting_inputs_follows_links_and_data_specs(tmp_path):
    from dinokit.commands._common import refuse_overwriting_inputs
    from dinokit.errors import ConfigError

    root = tmp_path / "ds"
    (root / "jpg").mkdir(parents=True)
    gnd = root / "gnd_x.json"
    gnd.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(gnd)
    with pytest.raises(ConfigError, match="is a file of the --root data set"):
        refuse_overwriting_inputs(link, "--output", roots={"--root": root})
    with pytest.raises(ConfigError, match="is a file of the --root data set"):
        refuse_overwriting_inputs(root / "jpg" / ".." / "gnd_x.json", "--output", roots={"--root": root})
    img = root / "jpg" / "q.png"
    img.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is an image of the --data folder"):
        refuse_overwriting_inputs(img, "--out", image_folders={"--data": f"fashion-mnist:{root}"})
    refuse_overwriting_inputs(tmp_path / "new.json", "--output", roots={"--root": root})  # a new file: fine
    refuse_overwriting_inputs(gnd, "--output", roots={"--root": None}, files={"--weights": tmp_path / "nope"})


def test_attention_never_writes_over_an_input_image_in_the_output_folder(setup, tmp_path, capsys):
    """``attention --image OUT/a.png OUT/a-img.png --out OUT``: the first image's ``a-img.png`` replaced the
    second input before it was read. Now a prefix that would hit an input is skipped like a duplicate name."""
    import shutil

    tmp, train, _, ckpt, _ = setup
    first, second = sorted((train / "a").iterdir())[:2]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(first, out / "a.png")
    shutil.copy(second, out / "a-img.png")
    before = (out / "a-img.png").read_bytes()
    assert main(["attention", "--weights", str(ckpt), "--image", str(out / "a.png"), str(out / "a-img.png"),
                 "--out", str(out), "--device", "cpu", "--no-progress", "--image-size", "32"]) == 0
    assert (out / "a-img.png").read_bytes() == before
    text = capsys.readouterr().out
    assert f"{out / 'a_1'}-*" in text and (out / "a_1-img.png").is_file()
    assert (out / "a-img-img.png").is_file()  # the second image under its own name


def test_linear_augment_leaves_unreadable_images_out(setup, tmp_path, capsys):
    """``linear --augment`` trained on the next image in an unreadable file's place, under that file's label,
    and counted it in n_train; now its rows are dropped from the batches, with the cached protocol's warning."""
    from dinokit.data import build_dataset
    from dinokit.eval.linear import _FlagUnreadable, train_transform

    tmp, train, val, ckpt, _ = setup
    bad = _with_unreadable_files(train, tmp_path / "train")
    res = tmp_path / "lin.json"
    with pytest.warns(UserWarning, match=r"3 unreadable image\(s\) of the train data left out .*12 of 15 used"):
        rc = main(["linear", "--weights", str(ckpt), "--train-data", str(bad), "--val-data", str(val), "--epochs",
                   "1", "--augment", "--batch-size", "4", "--num-workers", "0", *COMMON, "--output", str(res)])
    assert rc == 0 and json.loads(res.read_text())["linear"]["n_train"] == 12
    assert "12 train / 6 val images" in capsys.readouterr().out
    ds = _FlagUnreadable(build_dataset(str(bad), transform=train_transform(32), unreadable="leave_out"))
    flags = [ds[i][2] for i in range(len(ds))]
    names = [Path(p).name for p, _ in ds.base.samples]
    assert [n for n, ok in zip(names, flags) if not ok] == ["0-corrupt.jpg", "1-empty.png", "zz-truncated.png"]


def test_num_heads_contradicting_the_file_is_refused(setup, tmp_path, capsys):
    """``--num-heads`` is for a bare state dict; given for a file that records another count (a checkpoint's
    config, export metadata, a standard ViT's name) it silently built another model with the same weights."""
    tmp, train, _, ckpt, _ = setup  # 2 heads recorded in the config
    out = tmp_path / "f.safetensors"
    exp = tmp_path / "e.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(exp), "--num-heads", "4"]) == 2
    assert "records 2 attention heads" in capsys.readouterr().err and not exp.exists()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(exp), "--num-heads", "2"]) == 0
    for weights in (ckpt, exp):
        assert main(["features", "--weights", str(weights), "--num-heads", "4", "--data", str(train), "--out",
                     str(out), "--num-workers", "0", *COMMON]) == 2
        err = capsys.readouterr().err
        assert "records 2 attention heads" in err and "--num-heads 4 contradicts it" in err
    small = tmp_path / "small.pth"
    torch.save({"teacher": {}, "config": {"arch": "vit_small"}}, small)
    from dinokit.errors import CheckpointError
    from dinokit.weights import checkpoint_arch_hints, with_num_heads

    hints = checkpoint_arch_hints(torch.load(small, weights_only=True))
    with pytest.raises(CheckpointError, match="records 6 attention heads"):
        with_num_heads(hints, 12, small)
    assert with_num_heads(hints, 6, small)["num_heads"] == 6 and with_num_heads({}, 5, "x") == {"num_heads": 5}


@pytest.mark.parametrize("progress", [True, False])
def test_feature_extraction_starts_its_loader_workers_once(setup, monkeypatch, progress):
    """``tqdm.auto``'s asyncio wrapper called ``iter()`` on the DataLoader in its constructor, and the loop
    called it again: every extraction with workers started two sets of workers, the first of which decoded its
    prefetch batches for nothing (and warned about each unreadable image a second time)."""
    from dinokit.augmentation import eval_transform
    from dinokit.data import build_dataset
    from dinokit.eval.knn import extract_features

    _, train, _, _, backbone = setup
    iterators = []
    original = torch.utils.data.DataLoader.__iter__

    def counting(self):
        iterators.append(self.num_workers)
        return original(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", counting)
    ds = build_dataset(str(train), transform=eval_transform(32))
    feats, labels = extract_features(backbone, ds, batch_size=5, num_workers=1, progress=progress)
    assert iterators == [1] and feats.shape == (12, 32) and labels.tolist() == ds.labels.tolist()


def test_output_protection_covers_hard_links_and_idx_files_but_not_earlier_results(setup, tmp_path, capsys):
    """A hard link to the weights passed the check and write_json wrote through it; Fashion-MNIST's IDX files were
    not protected; and a result file written into a data set's root by an earlier run was refused."""
    import os
    import shutil

    from dinokit.commands._common import refuse_overwriting_inputs, write_json
    from dinokit.errors import ConfigError

    tmp, train, val, ckpt, _ = setup
    weights = tmp_path / "w.pth"
    shutil.copy(ckpt, weights)
    os.link(weights, tmp_path / "out.json")
    before = weights.read_bytes()
    assert main(["knn", "--weights", str(weights), "--train-data", str(train), "--val-data", str(val), "--output",
                 str(tmp_path / "out.json"), "--num-workers", "0", *COMMON]) == 2
    assert "is the --weights file" in capsys.readouterr().err and weights.read_bytes() == before
    write_json(tmp_path / "out.json", {"a": 1})  # atomic: the link's name now holds the JSON, the weights stay
    assert weights.read_bytes() == before and json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
    fm = make_fashion_like(tmp_path / "fm", n_train=8, n_test=4)
    idx = next(fm.glob("*-ubyte.gz"))
    with pytest.raises(ConfigError, match="is a file of the --train-data folder"):
        refuse_overwriting_inputs(idx, "--output", image_folders={"--train-data": f"fashion-mnist:{fm}"})
    root = tmp_path / "places"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("v\n")
    (root / "retrieval_folder.json").write_text("{}")  # an earlier run's result
    (root / "positives.json").write_text("{}")
    refuse_overwriting_inputs(root / "retrieval_folder.json", "--output", roots={"--root": root})
    for name in ("positives.json", "ImageSets/2017/val.txt"):
        with pytest.raises(ConfigError, match="is a file of the --root data set"):
            refuse_overwriting_inputs(root / name, "--output", roots={"--root": root})


def test_features_on_a_full_disk_is_one_line_exit_1_and_the_old_file_stays(setup, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError, which features did not catch (a traceback); features
    were written in place (a failure could cut the previous file) and 0600 (export: 0644)."""
    import stat

    import safetensors.torch as st
    from safetensors import SafetensorError

    tmp, train, _, ckpt, _ = setup
    out = tmp_path / "f.safetensors"
    args = ["features", "--weights", str(ckpt), "--data", str(train), "--out", str(out), "--num-workers", "0",
            *COMMON]
    assert main(args) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    before = out.read_bytes()
    capsys.readouterr()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", full)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: cannot write {out}: Error while serializing" in err, err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_evaluation_progress_survives_a_closed_stderr(setup, monkeypatch):
    """Under 2>&- (sys.stderr is None) tqdm's bar, enabled "on a terminal", wrote to None: AttributeError."""
    import sys as _sys

    from dinokit.augmentation import eval_transform
    from dinokit.data import ImageFolderDataset
    from dinokit.eval.knn import extract_features

    _, train, _, _, backbone = setup
    monkeypatch.setattr(_sys, "stderr", None)
    feats, labels = extract_features(backbone, ImageFolderDataset(train, transform=eval_transform(32)),
                                     batch_size=5, progress=True)
    assert feats.shape == (12, 32) and len(labels) == 12
