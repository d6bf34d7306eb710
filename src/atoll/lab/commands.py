"""`atoll lab ...`: the WAN lab's verbs (registered by `atoll.cli` through COMMAND_MODULES).

    atoll lab check          # can the real (netns) lab be built here? if not, why
    atoll lab clean [--all]  # remove namespaces/interfaces left by crashed lab runs
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from atoll.errors import AtollError


def _cmd_check(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.lab.netns import lab_available

    if extra:
        raise AtollError(f"atoll lab check takes no arguments (got {' '.join(extra)})")
    ok, reason = lab_available()
    console = Console(highlight=False, soft_wrap=True)
    if ok:
        console.print(f"netns lab: available ({reason}); bandwidth is shaped by the kernel, latency in the transport")
        return 0
    console.print(f"netns lab: not available: {reason}")
    console.print("lab runs fall back to emulation in the transport (delay = bytes / bandwidth + latency)")
    return 1


def _cmd_clean(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.lab.netns import clean_leftovers

    if extra:
        raise AtollError(f"atoll lab clean takes no arguments (got {' '.join(extra)})")
    removed = clean_leftovers(include_live=args.all)
    console = Console(highlight=False, soft_wrap=True)
    for item in removed:
        console.print(f"removed {item}")
    if not removed:
        console.print("nothing to clean: no leftover atoll lab namespaces or interfaces")
    return 0


def register(sub: Any) -> None:
    """Add `atoll lab` and its sub-verbs to the CLI's sub-parsers `sub`."""
    lab = sub.add_parser("lab", help="the WAN lab: sites in network namespaces joined by shaped links")
    verbs = lab.add_subparsers(dest="lab_verb", metavar="LAB_VERB", required=True)

    p = verbs.add_parser("check", help="say whether the netns lab can be built here (root, iproute2) and why not")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_check, allow_overrides=False)

    p = verbs.add_parser("clean", help="remove namespaces and interfaces left behind by crashed lab runs")
    p.add_argument("--all", action="store_true", help="also tear down labs whose owning process is still running")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_clean, allow_overrides=False)
