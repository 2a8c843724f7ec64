"""``dinokit train``: DINO pretraining. Every option of the reference ``main_dino.py`` exists under the same name
written with dashes (underscores accepted too); ``--config`` reads YAML, ``--set key=value`` overrides it."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import get_args, get_origin

from ..config import ALIASES, TrainConfig, apply_overrides, builtin_configs, load_yaml, parse_set_items, resolve_config

HELP = "pretrain a ViT (or CNN) with DINO on a folder of unlabelled images"
DESCRIPTION = """Pretrain with DINO (self-distillation with no labels).

examples:
  dinokit train --data ~/images --output-dir runs/exp1 --arch vit_small --epochs 100
  dinokit train --config vit_small_100ep --set epochs=300 teacher_temp=0.07
  torchrun --nproc_per_node=4 -m dinokit train --data ~/images --output-dir runs/ddp

Training resumes automatically from OUTPUT_DIR/checkpoint.pth. Stability: if the loss becomes NaN, try
--precision fp32, a lower --lr, --clip-grad 0.3-1.0; if it stays at ln(out_dim), lower --teacher-temp and raise
--momentum-teacher. Precedence: defaults < --config < flags < --set."""

_ALIASES: dict[str, list[str]] = {}  # field -> its other flags (--data, --batch-size), the keys of config.ALIASES
for _alias, _name in ALIASES.items():
    _ALIASES.setdefault(_name, []).append(f"--{_alias.replace('_', '-')}")


def _default_str(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE_OR_NAME", action=_OnceNonEmpty,
                        help="YAML file of options (keys as in --help, underscores or dashes; aliases such as data "
                        "and batch_size too), or a built-in recipe by name: " + ", ".join(builtin_configs()))
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override options after --config, e.g. --set epochs=300 teacher_temp=0.07; repeatable "
                        "(--set a=1 --set b=2 sets both; for the same option the last value wins)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        typ = hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        names += _ALIASES.get(f.name, [])
        help_text = f"{f.metadata.get('help', '')} (default: {_default_str(default)})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))  # text, not a format
        origin = get_origin(typ)
        if origin is tuple:
            kw.update(nargs=len(get_args(typ)), type=float, metavar="X")
        elif typ is bool or (origin is not None and bool in get_args(typ)):
            kw.update(type=_bool_flag, nargs="?", const=True, metavar="BOOL")
        elif typ in (int, float):
            kw.update(type=typ)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(*names, **kw)


def _bool_flag(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {s!r} (use true/false, on/off, 1/0)")


class _OnceNonEmpty(argparse.Action):
    """A file option given once (a second --config replaced the first silently) and not empty (--config= ran the
    defaults)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): one file; "
                         "put further options in --set or flags")
        if not str(values).strip():
            parser.error(f"{option_string} is empty: give a YAML file or a recipe name")
        setattr(namespace, self.dest, values)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    if args.config:
        cfg = apply_overrides(cfg, load_yaml(resolve_config(args.config)))
        cfg = cfg.absorb_use_fp16()  # a reference-style use_fp16 in the file: a later --precision overrides it
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = apply_overrides(cfg, flags)
    cfg = apply_overrides(cfg, parse_set_items(args.set))
    return cfg.validate()


def run(args: argparse.Namespace) -> int:
    from ..trainer import count_noun, format_duration, train

    cfg = config_from_args(args)
    summary = train(cfg)
    if summary["rank"] != 0:
        return 0
    print(f"done: {count_noun(summary['epochs'], 'epoch')}, {count_noun(summary['iterations'], 'iteration')}, "
          f"{format_duration(60 * summary['train_minutes'])}, {summary['images_per_second']:.1f} img/s; checkpoint: "
          f"{Path(cfg.output_dir) / 'checkpoint.pth'}")
    return 0
