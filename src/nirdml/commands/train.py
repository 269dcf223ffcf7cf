"""``nirdml train``: train a model from a config (default: ProxyAnchor + NIR on offline digits)."""

from __future__ import annotations

import argparse
import dataclasses
import time

HELP = "train an embedding model (default: ProxyAnchor + NIR on the offline digits data)"


def _config_keys() -> str:
    """Every config key with its default, for ``--help``."""
    from nirdml.training.config import Config, available_configs

    lines = ["config keys (override with --set KEY=VALUE; defaults are the released recipe):"]

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                lines.append(f"  {prefix + f.name:<32} {value!r}")

    walk(Config(), "")
    lines.append("")
    lines.append("shipped configs (--config NAME): " + ", ".join(available_configs()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _config_keys()
    parser.add_argument("--config", default="digits",
                        help="a YAML file or the name of a shipped config (default: digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. --set loss.nir.weight=0.01 (repeatable)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/<config>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from checkpoints/last.pt")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.out is None:
        if args.resume:
            from nirdml.errors import ConfigError

            raise ConfigError("--resume needs --out DIR (the folder of the run to continue)")
        args.out = f"runs/{Path(str(args.config)).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = Trainer(cfg, args.out, resume=args.resume)
    final = trainer.fit()
    if trainer.dist.is_main:
        shown = {k: v for k, v in final.items()
                 if k.startswith(("recall@", "map@", "r_precision", "nmi"))}
        print(f"test ({final['dataset']}, selected epoch {final['selected_epoch']} on "
              f"{final['selected_on']}):")
        for k, v in shown.items():
            print(f"  {k:<12} {100 * v:6.2f}")
        print(f"run folder: {args.out}")
    trainer.dist.end_process(0)  # under torchrun every rank exits here (see its docstring)
    return 0
