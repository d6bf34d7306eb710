"""`atoll lab ...`: the WAN lab's verbs (registered through atoll.cli).

atoll lab run --topology T CONFIG.yaml [--restart-sites N] [--section.key=value ...]   # sites in namespaces
atoll lab check          # can the real (netns) lab be built here? if not, why
atoll lab clean [--all]  # remove namespaces/interfaces left by crashed lab runs
"""

from __future__ import annotations

import argparse
from pathlib import Path
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


def _cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    """Build the lab from the topology, run `atoll lighthouse` and each `atoll site` inside it, tear it down."""
    import logging

    from atoll.config import RunConfig, load_config
    from atoll.config.topology import load_topology
    from atoll.lab.netns import Lab, lab_available
    from atoll.train.commands import train_sites

    log = logging.getLogger("atoll.lab")
    cfg = load_config(RunConfig, args.config, extra)
    topology = load_topology(args.topology)
    ok, reason = lab_available()
    if not ok:
        log.warning("netns lab not available (%s): emulating the WAN in the transport instead", reason)
        return train_sites(cfg, args, extra, wan_mode="emulated")
    with Lab(topology) as lab:
        log.info("lab %s: %s", lab.run_id, ", ".join(f"{name} {lab.site_address(name)}" for name in lab.sites))
        code = train_sites(cfg, args, extra, host=lab, wan_mode="netns")
        for name in lab.sites:
            tx, rx = lab.interface_bytes(name)
            log.info(
                "site %s: veth counted %.1f MB out, %.1f MB in (headers and retransmissions included)",
                name,
                tx / 1e6,
                rx / 1e6,
            )
        return code


LAB_RESTARTS = 3  # the lab is where sites get killed on purpose: restart them by default


def register(sub: Any) -> None:
    """Add `atoll lab` and its sub-verbs to the CLI's sub-parsers `sub`."""
    from atoll.train.commands import add_restart_flag

    lab = sub.add_parser("lab", help="the WAN lab: sites in network namespaces joined by shaped links")
    verbs = lab.add_subparsers(dest="lab_verb", metavar="LAB_VERB", required=True)

    p = verbs.add_parser(
        "run", help="train on every site of a topology, each in its own namespace behind a shaped link"
    )
    p.add_argument("config", type=Path, help="run config YAML (see examples/configs/)")
    p.add_argument("--topology", type=Path, required=True, help="topology YAML (see examples/topologies/)")
    p.add_argument("--ranks-per-site", type=int, default=1, help="local ranks per site")
    add_restart_flag(p, default=LAB_RESTARTS)
    p.add_argument("--resume", action="store_true", help="continue every site from its latest checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="checkpoint and stop after STEP")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument(
        "--worker",
        default=None,
        metavar="MODULE",
        help="run this module on every rank instead of atoll.train (e.g. bench.torchft_peer)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_run, allow_overrides=True, wan="netns")

    p = verbs.add_parser("check", help="say whether the netns lab can be built here (root, iproute2) and why not")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_check, allow_overrides=False)

    p = verbs.add_parser("clean", help="remove namespaces and interfaces left behind by crashed lab runs")
    p.add_argument("--all", action="store_true", help="also tear down labs whose owning process is still running")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_clean, allow_overrides=False)
