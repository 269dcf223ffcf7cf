"""The ``nirdml`` command line: one sub-command per module in ``nirdml.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``,
and imports torch and friends only inside ``run`` so that ``nirdml --help`` stays instant.
Errors derived from :class:`nirdml.errors.NirdmlError` are printed as one clear line (exit 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nirdml import __version__
from nirdml.errors import NirdmlError

COMMANDS = ("train", "crossval", "tune", "evaluate", "embed", "analyze", "index", "search",
            "serve", "export", "report", "upgrade-checkpoint")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions/epilogs as written and shows an option's default once: only when
    it has one (not None/False) and the help text does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False
                or default == argparse.SUPPRESS or not action.option_strings
                or (isinstance(default, list) and not default)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nirdml",
        description="Proxy-based deep metric learning with Non-isotropy Regularization.",
    )
    parser.add_argument("--version", action="version", version=f"nirdml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"nirdml.commands.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:  # a command not built yet
            if exc.name != f"nirdml.commands.{name.replace('-', '_')}":
                raise
            continue
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except NirdmlError as exc:
        print(f"nirdml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nirdml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
