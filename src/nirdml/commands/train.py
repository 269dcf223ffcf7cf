"""``nirdml train``: train a model from a config (default: ProxyAnchor + NIR on offline digits)."""

from __future__ import annotations

import argparse
import dataclasses
import time

HELP = "train an embedding model (default: ProxyAnchor + NIR on the offline digits data)"


def _config_keys() -> str:
    """Every config key with its value in the run ``nirdml train`` does by default, for
    ``--help``."""
    from nirdml.training.config import available_configs, load_config

    lines = ["config keys (override with --set KEY=VALUE), with their values in the default "
             "run (--config digits):"]

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                lines.append(f"  {prefix + f.name:<32} {value!r}")

    walk(load_config("digits"), "")
    lines.append("")
    lines.append("shipped configs (--config NAME): " + ", ".join(available_configs()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _config_keys()
    parser.add_argument("--config", default=None,
                        help="a YAML file or the name of a shipped config (default: digits; "
                             "with --resume: the run's own config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. --set loss.nir.weight=0.01 (repeatable)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/<config>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from checkpoints/last.pt, with its own "
                             "config (--set may only change where data lives, loading, logging, "
                             "the device, or add epochs)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    state = None
    if args.resume:
        from nirdml.errors import ConfigError

        if args.out is None:
            raise ConfigError("--resume needs --out DIR (the folder of the run to continue)")
        if args.config is None:  # the run's own config, read from its checkpoint
            from nirdml.training.checkpoint import TRAINER_KEYS, load_checkpoint
            from nirdml.training.config import Config

            last = Path(args.out) / "checkpoints" / "last.pt"
            if not last.is_file():
                raise ConfigError(f"--resume: no checkpoint in {str(last.parent)!r}")
            state = load_checkpoint(last, require=TRAINER_KEYS)
            cfg = Config.from_dict(state["config"]).with_overrides(args.overrides)
    if state is None:
        cfg = load_config(args.config or "digits", args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.out is None:
        name = Path(str(args.config or "digits")).stem
        args.out = f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = Trainer(cfg, args.out, resume=args.resume, resume_state=state)
    final = trainer.fit()
    if trainer.dist.is_main:
        from nirdml.evaluation import headline
        shown = headline(final)
        print(f"test ({final['dataset']}, selected epoch {final['selected_epoch']} on "
              f"{final['selected_on']}):")
        for k, v in shown.items():
            print(f"  {k:<12} {100 * v:6.2f}")
        print(f"run folder: {args.out}")
    trainer.dist.end_process(0)  # under torchrun every rank exits here (see its docstring)
    return 0
