"""The `atoll` command: builds the top parser, hands each verb to the package that owns it.

Every module in `COMMAND_MODULES` has ``register(sub)``, which adds its verbs to the sub-parsers
with ``set_defaults(func=handler, allow_overrides=bool)``; a handler takes the parsed arguments
and the unparsed rest (``--section.key=value`` config overrides, where the verb allows them) and
returns an exit code. A user's mistake (`AtollError`) is one line on stderr and exit code 2
(`atoll.console.guarded`); anything else is a bug and keeps its traceback.

Nothing imports this module but entry points (the `atoll` script, ``python -m atoll.cli``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from atoll import __version__
from atoll.console import guarded, setup_logging

COMMAND_MODULES: list[str] = [
    "atoll.train.commands",
    "atoll.deploy.commands",
    "atoll.export_commands",
    "atoll.data.commands",
    "atoll.lab.commands",
    "atoll.planner.commands",
    "atoll.finetune.commands",
    "atoll.eval.commands",
    "atoll.serve.commands",
    "atoll.report.commands",
]
"""The modules whose ``register(sub)`` adds the verbs, in the order `atoll --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The `atoll` parser with every verb of `COMMAND_MODULES` registered."""
    parser = argparse.ArgumentParser(
        prog="atoll",
        description="Train one language model across a computing power network.",
        epilog="Config overrides: any --section.key=value after the config file (e.g. --train.steps=100).",
    )
    parser.add_argument("--version", action="version", version=f"atoll {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one `atoll` command line (default: the process's arguments) and exit with its code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allow_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(verbose=getattr(args, "verbose", False))
    sys.exit(guarded(args.func)(args, extra))


if __name__ == "__main__":
    main()
