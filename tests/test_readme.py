"""README's Python API block runs as written (its undefined inputs supplied, the training call replaced by a
check of the configuration it builds)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import dinokit

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_block() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_block_runs(tmp_path, monkeypatch):
    code = _python_api_block()
    assert "import dinokit" in code and "dinokit.train(cfg)" in code
    calls = []

    def fake_train(cfg):
        calls.append(cfg.validate())
        return {"epochs": cfg.epochs}

    monkeypatch.setattr(dinokit, "train", fake_train, raising=False)
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    ns = {"train_f": torch.randn(50, 8, generator=g), "train_y": torch.arange(50) % 5,
          "test_f": torch.randn(10, 8, generator=g), "test_y": torch.arange(10) % 5}
    exec(compile(code, str(README), "exec"), ns)
    assert ns["student"](torch.randn(2, 3, 224, 224)).shape == (2, 65536)
    assert len(calls) == 1 and calls[0].arch == "vit_small" and ns["summary"] == {"epochs": 100}
    assert 0 <= ns["top1"] <= 100


def test_submodules_and_the_training_entry_points_are_reachable_from_a_plain_import():
    assert dinokit.trainer.train is dinokit.train and dinokit.Trainer is dinokit.trainer.Trainer
    assert dinokit.TrainConfig is dinokit.config.TrainConfig
    try:
        dinokit.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no attribute 'no_such_thing'" in str(e)
    else:
        raise AssertionError("expected AttributeError")
