import argparse
import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from dinokit.cli import build_parser
from dinokit.commands.train import config_from_args
from dinokit.config import TrainConfig, apply_overrides, parse_set_items
from dinokit.errors import ConfigError


def parse(argv):
    return config_from_args(build_parser("train").parse_args(["train", *argv]))


def test_defaults_match_reference():
    c = TrainConfig()
    assert (c.arch, c.patch_size, c.out_dim, c.norm_last_layer, c.momentum_teacher) == ("vit_small", 16, 65536,
                                                                                        True, 0.996)
    assert (c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert (c.weight_decay, c.weight_decay_end, c.clip_grad, c.batch_size_per_gpu, c.epochs) == (0.04, 0.4, 3.0,
                                                                                                 64, 100)
    assert (c.freeze_last_layer, c.lr, c.warmup_epochs, c.min_lr, c.optimizer) == (1, 0.0005, 10, 1e-6, "adamw")
    assert (c.drop_path_rate, c.global_crops_scale, c.local_crops_number, c.local_crops_scale) == (
        0.1, (0.4, 1.0), 8, (0.05, 0.4))
    assert (c.saveckp_freq, c.seed, c.global_crop_size, c.local_crop_size) == (20, 0, 224, 96)
    assert c.num_workers == -1  # auto: the reference's 10, at most one per CPU (tests/test_trainer.py)


def test_dash_and_underscore_spellings_and_precedence(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 7\nteacher_temp: 0.05\nlocal-crops-number: 4\n")
    cfg = parse(["--config", str(yml), "--batch-size-per-gpu", "8", "--out_dim", "128", "--epochs", "9",
                 "--set", "teacher_temp=0.06", "global_crops_scale=0.3,1", "--norm-last-layer", "false",
                 "--local-crops-number", "0"])
    assert cfg.epochs == 9 and cfg.teacher_temp == 0.06 and cfg.batch_size_per_gpu == 8 and cfg.out_dim == 128
    assert cfg.global_crops_scale == (0.3, 1.0) and cfg.norm_last_layer is False and cfg.local_crops_number == 0
    assert parse(["--use_fp16", "false"]).precision == "fp32"


@pytest.mark.parametrize("argv,match", [
    (["--set", "nonexistent=1"], "unknown option 'nonexistent'"),
    (["--set", "epochs=abc"], "epochs"),
    (["--set", "teacher_tmp=0.05"], "did you mean teacher_temp"),
    (["--global-crop-size", "100", "--patch-size", "16"], "not divisible"),
    (["--local-crop-size", "256"], "larger than global"),
    (["--batch-size-per-gpu", "0"], "must be positive"),
    (["--set", "batch_size_per_gpu=-3"], "must be positive"),
    (["--set", "global_crops_scale=0.5,0.2"], "global_crops_scale"),
    (["--set", "centering=sinkhorn"], "centering must be one of centering, sinkhorn_knopp; got 'sinkhorn'"),
    (["--set", "optimizer=foo"], "optimizer must be one of adamw, sgd, lars"),
    (["--sinkhorn-iterations", "0"], "sinkhorn_iterations must be >= 1"),
    (["--koleo-loss-weight", "-0.1"], "koleo_loss_weight must be >= 0"),
    (["--koleo-loss-weight", "0.1", "--batch-size-per-gpu", "1"], "needs batch_size_per_gpu >= 2"),
    # used to crash later with a traceback (ZeroDivisionError, AssertionError, linspace / numpy seed ValueError)
    (["--patch-size", "0"], "patch_size must be >= 1, got 0"),
    (["--patch-size", "-8"], "patch_size must be >= 1, got -8"),
    (["--num-heads", "0"], "num_heads must be >= 1, got 0"),
    (["--arch", "vit_custom", "--embed-dim", "33", "--num-heads", "2"],
     r"embed_dim \(33\) must be divisible by num_heads \(2\) for vit_custom"),
    (["--warmup-epochs", "-2"], "warmup_epochs must be >= 0, got -2"),
    (["--warmup-teacher-temp-epochs", "-1"], "warmup_teacher_temp_epochs must be >= 0, got -1"),
    (["--seed", "-1"], r"seed must be in \[0, 2\*\*32 - 1\]"),
    (["--set", "seed=99999999999"], r"seed must be in \[0, 2\*\*32 - 1\]"),
    # used to be accepted and trained with
    (["--lr", "-1"], "lr must be >= 0, got -1"),
    (["--min-lr", "-1"], "min_lr must be >= 0, got -1"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0, got -1"),
    (["--set", "weight_decay_end=-0.1"], "weight_decay_end must be >= 0, got -0.1"),
    (["--drop-path-rate", "2"], r"drop_path_rate must be in \[0, 1\), got 2"),
    (["--drop-path-rate", "1"], r"drop_path_rate must be in \[0, 1\), got 1"),
    (["--set", "drop_path_rate=nan"], "drop_path_rate must be a finite number, got nan"),
    (["--depth", "0"], "depth must be >= 1, got 0"),
    (["--head-hidden-dim", "0"], "head_hidden_dim must be >= 1, got 0"),
    (["--head-bottleneck-dim", "0"], "head_bottleneck_dim must be >= 1, got 0"),
    (["--set", "head_nlayers=0"], "head_nlayers must be >= 1, got 0"),
    (["--knn-subset", "-5"], "knn_subset must be >= 0 .*got -5"),
    (["--time-budget-minutes", "-1"], "time_budget_minutes must be >= 0, got -1"),
    (["--knn-every", "-1"], "knn_every must be >= 0, got -1"),
    (["--set", "knn_every_minutes=-1"], "knn_every_minutes must be >= 0, got -1"),
    (["--set", "freeze_last_layer=-1"], "freeze_last_layer must be >= 0, got -1"),
    (["--set", "center_momentum=1.5"], r"center_momentum must be in \[0, 1\]"),
    (["--set", "solarize_prob=2"], "solarize_prob must be probabilities"),
    (["--set", "blur_prob=1,0.1,-0.5"], "blur_prob and solarize_prob must be probabilities"),
    (["--set", "lr=nan"], "lr must be a finite number, got nan"),
    (["--set", "output_dir="], "output_dir is empty"),
    (["--output-dir", " "], "output_dir is empty"),
])
def test_bad_options_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse(argv)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        parse(["--config", str(bad)])
    with pytest.raises(ConfigError, match="not found"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    unknown = tmp_path / "u.yaml"
    unknown.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="did you mean epochs"):
        parse(["--config", str(unknown)])


def test_apply_overrides_types():
    cfg = apply_overrides(TrainConfig(), parse_set_items(["lr=1e-3", "compile=true", "epochs=3"]))
    assert cfg.lr == 1e-3 and cfg.compile is True and cfg.epochs == 3
    with pytest.raises(ConfigError):
        apply_overrides(TrainConfig(), {"epochs": 2.5})


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dinokit", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = _cli("train", "--no-such-option")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "dinokit train: error: unrecognized arguments: --no-such-option"  # the subcommand named, as for other errors
    r = _cli("train", "--epochs", "x")
    assert r.returncode == 2 and "invalid int value" in r.stderr
    r = _cli("train", "--data", str(tmp_path), "--set", "nope=1")
    assert r.returncode == 2 and "unknown option 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_train_help_lists_every_option():
    r = _cli("train", "--help")
    assert r.returncode == 0
    for opt in ("--batch-size-per-gpu", "--out-dim", "--local-crops-number", "--saveckp-freq", "--norm-last-layer",
                "--use-bn-in-head", "--global-crop-size", "--local-crop-size", "--device", "--precision",
                "--num-workers", "--clip-grad", "--freeze-last-layer", "--momentum-teacher", "--time-budget-minutes"):
        assert opt in r.stdout
    assert "unstable" in r.stdout  # stability advice is part of the help


def test_shipped_configs_load_and_validate():
    from pathlib import Path

    from dinokit.config import load_yaml

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = apply_overrides(TrainConfig(), load_yaml(path)).validate()
        assert cfg.epochs > 0, path


def test_builtin_recipes_are_the_checkouts_configs_and_load_by_name(tmp_path, monkeypatch):
    """The recipes ship inside the package (``dinokit/configs``; the checkout's ``configs/`` is a link to it), so
    ``--config NAME`` works after a plain ``pip install``, from any folder."""
    from pathlib import Path

    from dinokit.config import builtin_configs, load_yaml, resolve_config

    root = Path(__file__).parent.parent
    builtin = builtin_configs()
    assert set(builtin) == {p.stem for p in (root / "configs").glob("*.yaml")} >= {"fashion_mnist_demo",
                                                                                    "vit_small_100ep"}
    assert (root / "configs").resolve() == builtin["vit_small_100ep"].parent
    monkeypatch.chdir(tmp_path)  # not the checkout: no configs/ folder here
    for spelling in ("vit_small_100ep", "vit_small_100ep.yaml"):
        assert resolve_config(spelling) == builtin["vit_small_100ep"]
    by_name = parse(["--config", "fashion_mnist_demo", "--epochs", "3"])
    by_path = apply_overrides(TrainConfig(), {**load_yaml(builtin["fashion_mnist_demo"]), "epochs": 3})
    assert by_name == by_path and by_name.arch == "vit_custom" and by_name.patch_size == 7
    (tmp_path / "vit_small_100ep").write_text("epochs: 5\n")  # an existing file wins over the built-in name
    assert resolve_config("vit_small_100ep") == Path("vit_small_100ep")
    assert parse(["--config", "vit_small_100ep"]).epochs == 5


def test_unknown_config_names_the_builtin_recipes(tmp_path, monkeypatch):
    from dinokit.config import resolve_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file not found: nope \(built-in recipes, usable by name: "
                       r".*vit_small_100ep"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match=r"not found: configs/vit_base_16.yaml.*--config vit_base_16$"):
        resolve_config("configs/vit_base_16.yaml")  # README's checkout path, used elsewhere: the name is offered
    with pytest.raises(ConfigError, match="not found: sub/vit_base_16"):
        resolve_config("sub/vit_base_16")  # a path is a path: never silently the built-in
    r = _cli("train", "--config", "nope", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out"),
             cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "built-in recipes" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_wheel_ships_the_builtin_recipes(tmp_path):
    import zipfile
    from pathlib import Path

    from dinokit.config import builtin_configs

    root = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("dinokit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"dinokit/configs/{n}.yaml" for n in builtin_configs()} <= names


def test_every_commands_help_renders_its_text_literally():
    """A help text with a bare ``%`` ("~30% slower") used to render argparse's internal dict in place of the
    rest of the line; every command's ``--help`` is formatted here and checked for such leftovers."""
    from dinokit.cli import COMMANDS

    helps = {}
    for name in COMMANDS:
        for action in build_parser(name)._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps.update({cmd: " ".join(p.format_help().split()) for cmd, p in action.choices.items()})
    assert len(helps) >= 5 and "train" in helps
    for cmd, text in helps.items():
        assert "option_strings" not in text and "%(" not in text, cmd
    assert "(less memory, ~27% more time per step)" in helps["train"]


def test_version():
    from dinokit import __version__

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dinokit {__version__}"


def test_a_config_that_is_a_folder_or_binary_is_named(tmp_path):
    from dinokit.config import load_yaml

    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_yaml(tmp_path)
    (tmp_path / "ck.pth").write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"ck.pth is not text \(a YAML file of option: value was expected\)"):
        load_yaml(tmp_path / "ck.pth")
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_check_positive_refuses_nan():
    from dinokit.commands._common import check_positive

    with pytest.raises(ConfigError, match="--temperature must be > 0, got nan"):
        check_positive("--temperature", float("nan"))


def test_boundary_values_the_reference_accepts_still_validate():
    cfg = parse(["--freeze-last-layer", "0", "--clip-grad", "0", "--drop-path-rate", "0", "--lr", "0",
                 "--min-lr", "0", "--weight-decay", "0", "--warmup-epochs", "0", "--knn-subset", "0",
                 "--local-crops-number", "0", "--seed", str(2**32 - 1), "--arch", "vit_custom", "--embed-dim", "32",
                 "--num-heads", "2", "--depth", "1", "--momentum-teacher", "1", "--set", "center_momentum=0"])
    assert cfg.freeze_last_layer == 0 and cfg.clip_grad == 0 and cfg.seed == 2**32 - 1
    assert parse(["--arch", "resnet18", "--embed-dim", "33", "--num-heads", "2"]).embed_dim == 33  # vit_custom only


def test_invalid_numbers_are_one_line_exit_2_on_the_cli(tmp_path):
    r = _cli("train", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--patch-size", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["dinokit train: error: patch_size must be >= 1, got 0"]


def test_repeated_set_accumulates_and_the_last_value_wins(tmp_path):
    """A second --set used to replace the first one's items (argparse's store action)."""
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 7\n")
    cfg = parse(["--config", str(yml), "--set", "epochs=1", "--set", "out_dim=30"])
    assert (cfg.epochs, cfg.out_dim) == (1, 30)
    cfg = parse(["--set", "epochs=1", "out_dim=30", "--set", "epochs=3"])
    assert (cfg.epochs, cfg.out_dim) == (3, 30)
    # another spelling of the same option: still the last one given
    assert parse(["--set", "batch_size=3", "batch-size-per-gpu=5", "--set", "batch-size=7"]).batch_size_per_gpu == 7
    assert parse(["--set", "batch_size=3", "--set", "batch_size_per_gpu=5"]).batch_size_per_gpu == 5


@pytest.mark.parametrize("text,match", [
    ("output_dir: null", "option 'output_dir': null is not a valid value (expected a string)"),
    ("data_path: ~", "option 'data_path': null is not a valid value (expected a string)"),
    ("data:", "option 'data_path': null is not a valid value"),
    ("epochs: null", "option 'epochs': null is not a valid value (expected an integer)"),
    ("lr: null", "option 'lr': null is not a valid value (expected a number)"),
    ("compile: null", "option 'compile': null is not a valid value (expected a boolean)"),
    ("global_crops_scale: null", "option 'global_crops_scale': null is not a valid value (expected 2 numbers)"),
    ("global_crops_scale: [null, 1]", "option 'global_crops_scale': null is not a valid value (expected a number)"),
])
def test_yaml_null_is_refused_for_options_that_are_not_optional(tmp_path, text, match):
    """A null used to become the text "None" (training into ./None/, or 'image directory None does not exist')."""
    yml = tmp_path / "c.yaml"
    yml.write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        parse(["--config", str(yml)])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="null is not a valid value"):
        parse(["--set", "output_dir=null"])


def test_null_still_clears_an_optional_option_and_tuples_still_parse(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("use_fp16: null\nglobal_crops_scale: [0.3, 1]\nblur_prob: 1 0.2 0.5\n")
    cfg = parse(["--config", str(yml)])
    assert cfg.use_fp16 is None and cfg.global_crops_scale == (0.3, 1.0) and cfg.blur_prob == (1.0, 0.2, 0.5)
    assert parse(["--set", "use_fp16=none"]).use_fp16 is None


@pytest.mark.parametrize("argv,match", [
    (["--student-temp", "inf"], "student_temp must be a finite number, got inf"),
    (["--set", "teacher_temp=.nan"], "teacher_temp must be a finite number, got nan"),
    (["--warmup-teacher-temp", "nan"], "warmup_teacher_temp must be a finite number, got nan"),
    (["--clip-grad", "nan"], "clip_grad must be a finite number, got nan"),
    (["--clip-grad", "inf"], "clip_grad must be a finite number, got inf"),
    (["--koleo-loss-weight", "nan"], "koleo_loss_weight must be a finite number, got nan"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--min-lr", "nan"], "min_lr must be a finite number, got nan"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number, got inf"),
    (["--weight-decay-end", "nan"], "weight_decay_end must be a finite number, got nan"),
    (["--momentum-teacher", "nan"], "momentum_teacher must be a finite number, got nan"),
    (["--momentum-teacher-end", "nan"], "momentum_teacher_end must be a finite number, got nan"),
    (["--center-momentum", "nan"], "center_momentum must be a finite number, got nan"),
    (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number, got inf"),
    (["--drop-path-rate=-inf"], "drop_path_rate must be a finite number, got -inf"),
    (["--solarize-prob", "nan"], "solarize_prob must be a finite number, got nan"),
    (["--time-budget-minutes", "inf"], "time_budget_minutes must be a finite number, got inf"),
    (["--time-budget-minutes", "nan"], "time_budget_minutes must be a finite number, got nan"),
    (["--knn-every-minutes", "nan"], "knn_every_minutes must be a finite number, got nan"),
    (["--set", "global_crops_scale=nan,1"], r"global_crops_scale must be finite numbers, got \(nan, 1.0\)"),
    (["--local-crops-scale", "0.05", "inf"], r"local_crops_scale must be finite numbers, got \(0.05, inf\)"),
    (["--set", "blur_prob=1,nan,0.5"], r"blur_prob must be finite numbers, got \(1.0, nan, 0.5\)"),
    # the messages that named no option or value
    (["--student-temp", "0"], r"student_temp must be > 0 \(a temperature\), got 0"),
    (["--set", "teacher_temp=-0.04"], r"teacher_temp must be > 0 \(a temperature\), got -0.04"),
    (["--momentum-teacher-end", "1.5"], r"momentum_teacher_end must be in \[0, 1\], got 1.5"),
    (["--clip-grad", "-1"], r"clip_grad must be >= 0 \(0: no clipping\), got -1"),
])
def test_non_finite_floats_are_refused(argv, match):
    """NaN passed every `x <= 0` check (a constant loss with an infinite student temperature, clipping or KoLeo
    silently off with NaN); no float option gives inf a meaning."""
    with pytest.raises(ConfigError, match=match) as e:
        parse(argv)
    assert "\n" not in str(e.value)


def test_every_float_option_refuses_nan():
    import dataclasses
    import typing

    hints = typing.get_type_hints(TrainConfig)
    floats = [f.name for f in dataclasses.fields(TrainConfig) if hints[f.name] is float]
    assert {"lr", "teacher_temp", "clip_grad", "koleo_loss_weight", "time_budget_minutes"} <= set(floats)
    for name in floats:
        with pytest.raises(ConfigError, match=f"^{name} must be a finite number, got nan$"):
            parse(["--set", f"{name}=.nan"])


@pytest.mark.parametrize("value,expected", [("1e1", 10), ("2.0", 2), ("1.5e3", 1500), ("3", 3), ("1_000", 1000)])
def test_integral_numbers_in_scientific_or_float_notation_are_integers(value, expected):
    assert parse(["--set", f"epochs={value}"]).epochs == expected


def test_integral_floats_in_yaml_are_integers(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 2.0\nout_dim: 1.0e+3\n")
    cfg = parse(["--config", str(yml)])
    assert (cfg.epochs, cfg.out_dim) == (2, 1000) and isinstance(cfg.epochs, int)


@pytest.mark.parametrize("text", ["epochs: 2.5", "epochs: three", "epochs: .inf", "epochs: .nan", "epochs: [1]",
                                  "epochs: true"])
def test_integer_options_refuse_non_integers_from_yaml(tmp_path, text):
    yml = tmp_path / "c.yaml"
    yml.write_text(text + "\n")
    with pytest.raises(ConfigError, match=r"^option 'epochs': invalid value .* \(expected an integer\)$"):
        parse(["--config", str(yml)])


@pytest.mark.parametrize("value", ["1.5e0", "2.5", "three", "1e400", "nan"])
def test_integer_options_refuse_non_integers_from_set(value):
    """--set epochs=1.5e0 used to train 1 epoch (int(float(...)) truncated)."""
    with pytest.raises(ConfigError, match=r"^option 'epochs': invalid value .* \(expected an integer\)$"):
        parse(["--set", f"epochs={value}"])


def test_float_options_name_a_bad_value_plainly():
    with pytest.raises(ConfigError, match=r"^option 'lr': invalid value 'abc' \(expected a number\)$"):
        parse(["--set", "lr=abc"])


def test_use_fp16_and_an_explicit_precision_must_agree(tmp_path):
    """--use-fp16 false --precision bf16 used to run in fp32 silently (the legacy flag won)."""
    with pytest.raises(ConfigError, match=r"use_fp16 false \(the reference's flag: precision fp32\) conflicts with "
                                          "precision bf16: drop one of the two"):
        parse(["--use-fp16", "false", "--precision", "bf16"])
    with pytest.raises(ConfigError, match="use_fp16 true .* conflicts with precision fp32"):
        parse(["--use-fp16", "--precision", "fp32"])
    yml = tmp_path / "c.yaml"
    yml.write_text("use_fp16: true\n")  # a layer of its own: the later flag wins (defaults < YAML < flags < --set)
    assert parse(["--config", str(yml), "--precision", "bf16"]).precision == "bf16"
    assert parse(["--config", str(yml), "--set", "precision=fp32"]).precision == "fp32"
    assert parse(["--config", str(yml)]).precision == "fp16"
    yml.write_text("use_fp16: true\nprecision: bf16\n")
    with pytest.raises(ConfigError, match="conflicts with precision bf16"):  # one layer, two contradicting
        parse(["--config", str(yml)])
    # agreeing, or precision left at auto: the reference flag decides
    assert parse(["--use-fp16", "true", "--precision", "fp16"]).precision == "fp16"
    assert parse(["--use-fp16", "false", "--precision", "fp32"]).precision == "fp32"
    assert parse(["--use-fp16", "true"]).precision == "fp16"
    assert parse(["--use-fp16", "false", "--precision", "auto"]).precision == "fp32"
    cfg = parse(["--use-fp16", "true"])
    assert cfg.validate().precision == "fp16"  # validating again (the trainer does) is no conflict
    assert parse(["--precision", "bf16"]).precision == "bf16"


def test_log_every_zero_is_documented_as_per_epoch_lines_only():
    assert parse(["--log-every", "0"]).log_every == 0
    r = _cli("train", "--help")
    assert "0: only the per-epoch lines" in " ".join(r.stdout.split())


@pytest.mark.parametrize("key", ["batch_size", "batch-size"])
def test_every_cli_alias_is_a_yaml_key_and_a_set_key(tmp_path, key):
    """data: worked in YAML but batch_size: / batch-size: (the --batch-size alias) was an unknown option."""
    from dinokit.commands.train import _ALIASES
    from dinokit.config import ALIASES

    yml = tmp_path / "c.yaml"
    yml.write_text(f"{key}: 5\ndata: /some/images\n")
    cfg = parse(["--config", str(yml)])
    assert cfg.batch_size_per_gpu == 5 and cfg.data_path == "/some/images"
    assert parse(["--set", f"{key}=6", "data=/x"]).batch_size_per_gpu == 6
    assert parse(["--batch-size", "7"]).batch_size_per_gpu == 7
    # the flags' aliases and the YAML/--set aliases are one table
    flags = {flag for names in _ALIASES.values() for flag in names}
    assert flags == {f"--{a.replace('_', '-')}" for a in ALIASES} >= {"--data", "--batch-size"}
    for alias, name in ALIASES.items():
        for spelling in (alias, alias.replace("_", "-")):
            assert getattr(parse(["--set", f"{spelling}=8"]), name) in (8, "8")
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        parse(["--set", "batch_siz=8"])


def test_notes_name_options_that_are_ignored_or_risky_in_their_combination():
    assert TrainConfig().notes() == []
    cases = {
        "embed_dim/num_heads (vit_custom only) ignored: vit_tiny has its own":
            dict(arch="vit_tiny", embed_dim=96, num_heads=4),
        "patch_size ignored: resnet18 has no patches": dict(arch="resnet18", patch_size=8),
        "gpu_augment ignored: it applies to fast_augment's batched augmentation only": dict(gpu_augment=True),
        "sinkhorn_iterations ignored: centering is centering": dict(sinkhorn_iterations=5),
        "keep_last ignored: saveckp_freq 0 writes no numbered checkpoints": dict(keep_last=2, saveckp_freq=0),
        "momentum_teacher_end 0.99 is below momentum_teacher 0.996: the teacher's EMA momentum will decrease":
            dict(momentum_teacher_end=0.99),
        "teacher_temp 0.2 is above 0.07, which the paper found unstable": dict(teacher_temp=0.2),
        "freeze_last_layer 5 > epochs 2: the head's last layer is never trained": dict(freeze_last_layer=5, epochs=2),
    }
    for note, kw in cases.items():
        assert TrainConfig(**kw).notes() == [note]
    for kw in (dict(arch="vit_custom", embed_dim=96, num_heads=4), dict(arch="timm:vit_tiny_patch16_224",
               patch_size=8), dict(gpu_augment=True, fast_augment=True),
               dict(centering="sinkhorn_knopp", sinkhorn_iterations=5), dict(keep_last=2), dict(teacher_temp=0.07),
               dict(epochs=1), dict(freeze_last_layer=5, epochs=2, time_budget_minutes=1)):
        assert TrainConfig(**kw).notes() == [], kw


def test_a_config_built_in_python_is_type_checked():
    """TrainConfig(epochs="ten") reached the trainer and failed as "'<=' not supported between 'str' and 'int'"."""
    for kwargs, msg in (({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
                        ({"lr": True}, "lr must be a number, got True"),
                        ({"global_crops_scale": (0.4, "a")}, r"global_crops_scale must be 2 numbers, got \(0.4, 'a'\)"),
                        ({"norm_last_layer": "yes"}, "norm_last_layer must be")):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(output_dir="out", **kwargs).validate()
    TrainConfig(output_dir="out", lr=1, global_crops_scale=[0.3, 1]).validate()  # an int is a number; lists do


def test_numpy_numbers_in_a_python_config_become_python_numbers():
    """np.int64(3) was refused ("epochs must be an integer, got np.int64(3)") and np.float64 passed, then broke
    config.yaml's writer."""
    import numpy as np
    import yaml

    cfg = TrainConfig(output_dir="out", epochs=np.int64(3), lr=np.float64(1e-3),
                      global_crops_scale=[np.float32(0.5), 1], norm_last_layer=np.bool_(False)).validate()
    assert type(cfg.epochs) is int and type(cfg.lr) is float and cfg.global_crops_scale == (0.5, 1.0)
    assert cfg.norm_last_layer is False
    yaml.safe_dump(dataclasses.asdict(cfg))


def test_text_options_keep_what_was_written_and_numbers_are_read_as_written(tmp_path):
    """--set output_dir=0755 trained into ./493 (YAML 1.1 octal), =yes into ./True, =12:30 into ./750;
    --set epochs=010 was 8. A YAML value that YAML reads as a number or boolean is refused for a text option."""
    assert parse(["--set", "output_dir=0755", "data=yes", "knn_train=C: /x"]).output_dir == "0755"
    cfg = parse(["--set", "data=12:30", "epochs=010", "lr=1e-3", "blur_prob=[0.3,0.4,0.6]"])
    assert cfg.data_path == "12:30" and cfg.epochs == 10 and cfg.lr == 1e-3 and cfg.blur_prob == (0.3, 0.4, 0.6)
    yml = tmp_path / "c.yaml"
    yml.write_text("arch: yes\n")
    with pytest.raises(ConfigError, match=r"option 'arch': invalid value True \(expected text: quote it in YAML"):
        parse(["--config", str(yml)])
    yml.write_text("output_dir: '0755'\n")
    assert parse(["--config", str(yml)]).output_dir == "0755"


def test_yaml_duplicates_config_twice_unknown_arch_and_encodings_are_one_line(tmp_path, capsys):
    """A key given twice (or two spellings of one option) kept the last silently; a second --config replaced the
    first; --config= ran the defaults; an unknown arch printed two warnings before its error; a Latin-1 file was
    'not text' and a NUL byte gave a two-line message."""
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 3\nlr: 0.1\nepochs: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: option 'epochs' is given twice \(line 3\)"):
        parse(["--config", str(yml)])
    yml.write_text("batch_size: 8\nbatch_size_per_gpu: 16\n")
    with pytest.raises(ConfigError, match="'batch_size' and 'batch_size_per_gpu' both set the option "
                                          "batch_size_per_gpu: keep one"):
        parse(["--config", str(yml)])
    for argv, msg in ((["--config", str(yml), "--config", "vit_small_100ep"], "--config given twice"),
                      (["--config="], "--config is empty")):
        with pytest.raises(SystemExit):
            build_parser("train").parse_args(["train", *argv])
        assert msg in capsys.readouterr().err
    with pytest.raises(ConfigError, match="^unknown architecture 'vit_smal'; did you mean vit_small"):
        parse(["--arch", "vit_smal", "--embed-dim", "64"])
    yml.write_bytes("data: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        parse(["--config", str(yml)])
    yml.write_bytes(b"epochs: 3\x00\n")
    with pytest.raises(ConfigError) as e:
        parse(["--config", str(yml)])
    assert "\n" not in str(e.value)


def test_a_replayed_use_fp16_config_takes_another_precision_and_paths_are_accepted(tmp_path):
    """use_fp16 false stayed in config.yaml beside precision fp32, so --config OUT/config.yaml --precision bf16
    was refused; TrainConfig(data_path=Path(...)) was refused."""
    from pathlib import Path

    from dinokit.config import config_to_dict

    cfg = parse(["--use-fp16", "false"])
    assert cfg.precision == "fp32" and cfg.use_fp16 is None
    yml = tmp_path / "config.yaml"
    yml.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert parse(["--config", str(yml), "--precision", "bf16"]).precision == "bf16"
    assert TrainConfig(data_path=Path("imgs"), output_dir=Path("out")).validate().data_path == "imgs"


def test_yaml_merge_keys_and_set_quoting(tmp_path):
    """Merge keys (<<: *defaults) stopped working with the duplicate-key check and a list as a key was a
    traceback; --set "precision= bf16" kept the space, --set output_dir="'0755'" kept the quotes."""
    import numpy as np

    yml = tmp_path / "c.yaml"
    yml.write_text("base: &b {epochs: 5}\n")
    with pytest.raises(ConfigError, match="unknown option 'base'"):
        parse(["--config", str(yml)])
    yml.write_text("<<: {epochs: 5, lr: 0.1}\n")
    assert parse(["--config", str(yml)]).epochs == 5
    yml.write_text("[1, 2]: 3\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        parse(["--config", str(yml)])
    cfg = parse(["--set", "precision= bf16", "output_dir='0755'", "data=~/imgs"])
    assert (cfg.precision, cfg.output_dir, cfg.data_path) == ("bf16", "0755", "~/imgs")
    assert type(TrainConfig(output_dir="o", arch=np.array(["vit_tiny"])[0]).validate().arch) is str


def test_an_unknown_key_with_the_words_of_an_option_in_another_order_gets_it_suggested():
    with pytest.raises(ConfigError, match=r"unknown option 'lr_min'; did you mean min_lr"):
        parse(["--set", "lr_min=1e-6"])
    with pytest.raises(ConfigError, match=r"unknown option 'crop-size-global'; did you mean global_crop_size"):
        parse(["--set", "crop-size-global=32"])
