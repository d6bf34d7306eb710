"""`atoll lighthouse` and `atoll site`: a run across data centers (registered through atoll.cli).

    atoll lighthouse [--bind HOST:PORT] [--advertise HOST] (--topology T | --min-sites N)
                     [--secret-file PATH]
    atoll site CONFIG.yaml --topology T --site NAME [--lighthouse HOST:PORT] [--advertise ADDR]
               [--nproc N] [--store-port PORT] [--secret-file PATH] [--wan none|emulated|netns]
               [--finetune] [--resume] [--stop-after STEP] [--section.key=value ...]

One `atoll lighthouse` runs anywhere every site can reach; each data center runs one `atoll site`
(or, across the site's nodes, ``torchrun ... -m atoll.cli site ...``). `atoll train --topology`,
`atoll finetune --topology` and `atoll lab run` start exactly these commands as processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from atoll.errors import AtollError

log = logging.getLogger("atoll.deploy")

PREPARED_FLAG = "--prepared"  # a launcher checked the config and wrote the run directory already


# ---------------------------------------------------------------- atoll lighthouse


def _cmd_lighthouse(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.sync.lighthouse import advertised_url, ensure_secret_file, ready_line, split_host_port
    from atoll.sync.transport import start_lighthouse

    split_host_port(args.bind, what="--bind")
    min_sites = args.min_sites
    if min_sites is None:
        if args.topology is None:
            raise AtollError("atoll lighthouse needs --topology T (a quorum of all its sites) or --min-sites N")
        from atoll.config.topology import load_topology

        min_sites = len(load_topology(args.topology).sites)
    if min_sites < 1:
        raise AtollError(f"--min-sites must be at least 1 (got {min_sites})")
    created = ensure_secret_file(args.secret_file) if args.secret_file is not None else None
    os.environ.setdefault("RUST_LOG", "info" if args.verbose else "warn")  # torchft logs every quorum at info
    try:
        server: Any = start_lighthouse(bind=args.bind, min_sites=min_sites)
    except (RuntimeError, OSError) as exc:
        raise AtollError(f"the lighthouse cannot listen on {args.bind} ({exc}): choose another --bind") from None
    url = advertised_url(server.address(), bind=args.bind, advertise=args.advertise)
    print(ready_line(url, min_sites=min_sites), flush=True)
    host_port = url.split("://", 1)[1]
    print(f"each data center joins with: atoll site CONFIG --topology T --site NAME --lighthouse {host_port}")
    if args.secret_file is not None:
        state = "written (a fresh one)" if created else "kept (it was there)"
        print(
            f"run secret {args.secret_file.resolve()}: {state}, mode 0600; copy it to every data center "
            "and pass --secret-file PATH to atoll site (the lighthouse itself does not check it)"
        )
    print("serving until Ctrl-C or SIGTERM", flush=True)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("lighthouse stopped", flush=True)
    return 0


# ---------------------------------------------------------------- atoll site


def _cmd_site(args: argparse.Namespace, extra: list[str]) -> int:
    from atoll.config.topology import load_topology
    from atoll.console import want_progress
    from atoll.deploy.site import become_rank, place_site, run_site_ranks, site_environ, site_watch, under_torchrun
    from atoll.parallel.launch import exit_status

    torchrun = under_torchrun(os.environ)
    if torchrun and args.nproc not in (None, 1):
        raise AtollError("under torchrun each `atoll site` is one rank: drop --nproc (torchrun's --nproc-per-node)")
    topology = load_topology(args.topology)
    spec = next((s for s in topology.sites if s.name == args.site), None)
    declared = spec.ranks if spec is not None else None
    if not torchrun and args.nproc is not None and declared is not None and args.nproc != declared:
        raise AtollError(
            f"--nproc {args.nproc} but site {args.site} has ranks: {declared} in {args.topology}: "
            "drop --nproc or make them agree"
        )
    args.nproc = 1 if torchrun else (args.nproc if args.nproc is not None else declared or 1)
    if spec is not None:  # the topology's parallel settings for this site, before the command line's
        extra = [*spec.parallel_overrides(), *extra]
    placement = place_site(
        topology,
        topology_path=args.topology,
        site=args.site,
        lighthouse=args.lighthouse,
        advertise=args.advertise,
        wan_mode=args.wan,
        nproc=args.nproc,
        store_port=args.store_port,
        environ=os.environ,
    )
    base = _with_secret(dict(os.environ), args.secret_file)
    module = args.worker or ("atoll.finetune" if args.finetune else "atoll.train")
    run_dir = None
    if not args.prepared and not torchrun:
        run_dir = _prepare_site(args, extra, topology)
    if run_dir is not None or args.prepared:
        base["ATOLL_LAUNCHED"] = "1"  # ranks neither prepare nor report: this process did and will
    # A standalone site (not under a launcher) draws its own live view; its ranks then draw none.
    watch = site_watch(placement, run_dir) if run_dir is not None and want_progress(args) else None
    module_args = [str(args.config), *extra, *_worker_flags(args)]
    if watch is not None and "--no-progress" not in module_args:
        module_args.append("--no-progress")
    env = site_environ(placement, base, torchrun=torchrun)
    if torchrun:
        become_rank(module=module, module_args=module_args, env=env)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stop the ranks, as Ctrl-C does
    failure = run_site_ranks(placement, module=module, module_args=module_args, env=env, watch=watch)
    if failure is not None:
        print(f"atoll site {placement.name}: {failure}; the site's other ranks were stopped", file=sys.stderr)
        return exit_status(failure.returncode)
    if run_dir is not None and "ATOLL_LAUNCHED" not in os.environ:  # else the launcher reports
        from atoll.train.commands import print_summary_from_disk

        print_summary_from_disk(run_dir)
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _with_secret(env: dict[str, str], secret_file: Path | None) -> dict[str, str]:
    """`env` with the run's secret where the ranks read it; AtollError when there is none."""
    from atoll.sync.auth import SECRET_ENV, SECRET_FILE_ENV, load_secret, read_secret_file

    if secret_file is not None:
        read_secret_file(secret_file)
        env.pop(SECRET_ENV, None)  # the file named on the command line wins
        env[SECRET_FILE_ENV] = str(secret_file.resolve())
    if load_secret(env) is None:
        raise AtollError(
            "atoll site needs the run's secret: --secret-file PATH (the file `atoll lighthouse --secret-file` "
            f"wrote, copied to this machine), or {SECRET_ENV} / {SECRET_FILE_ENV}"
        )
    return env


def _prepare_site(args: argparse.Namespace, extra: list[str], topology: Any) -> Path | None:
    """Check the config against the topology and write this site's run directory (pre-training).

    Returns the site's run directory; None for fine-tuning, whose ranks prepare the stage
    themselves (the first site writes it).
    """
    from atoll.config import RunConfig, load_config
    from atoll.config.topology import check_sites

    if args.finetune:
        from atoll.finetune.config import FinetuneConfig

        ft = load_config(FinetuneConfig, args.config, extra)
        check_sites(topology, sync=ft.sync, parallel=ft.parallel, topology_path=args.topology)
        return None
    from atoll.train.setup import prepare_run, site_config

    cfg = load_config(RunConfig, args.config, extra)
    check_sites(topology, sync=cfg.sync, parallel=cfg.parallel, topology_path=args.topology)
    site_cfg = site_config(cfg, args.site)
    prepare_run(site_cfg, resume=args.resume)
    return site_cfg.run.path


def _worker_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    if args.resume:
        flags.append("--resume")
    if args.stop_after is not None:
        flags += ["--stop-after", str(args.stop_after)]
    if args.no_progress:
        flags.append("--no-progress")
    if args.verbose:
        flags.append("--verbose")
    return flags


def register(sub: Any) -> None:
    """Add `atoll lighthouse` and `atoll site` to the CLI's sub-parsers `sub`."""
    from atoll.sync.lighthouse import DEFAULT_PORT

    p = sub.add_parser("lighthouse", help="serve a multi-site run's membership (torchft Lighthouse); sites join it")
    p.add_argument(
        "--bind", default=f"0.0.0.0:{DEFAULT_PORT}", help=f"HOST:PORT to listen on (default 0.0.0.0:{DEFAULT_PORT})"
    )
    p.add_argument("--advertise", default=None, metavar="HOST", help="the host name or address sites dial")
    p.add_argument("--topology", type=Path, default=None, help="the run's topology: a quorum needs all its sites")
    p.add_argument(
        "--min-sites", type=int, default=None, metavar="N", help="sites a quorum needs (default: all of --topology's)"
    )
    p.add_argument(
        "--secret-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="the run's secret: written fresh (mode 0600) when PATH does not exist; copy it to every site",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_lighthouse, allow_overrides=False)

    p = sub.add_parser("site", help="run one data center's part of a multi-site run (N ranks, or one under torchrun)")
    p.add_argument("config", type=Path, help="run config YAML (the same on every site)")
    p.add_argument("--topology", type=Path, required=True, help="the run's topology YAML (the same on every site)")
    p.add_argument("--site", required=True, metavar="NAME", help="which of the topology's sites this is")
    p.add_argument(
        "--lighthouse", default=None, metavar="HOST:PORT", help="the run's lighthouse (default: lighthouse.address)"
    )
    p.add_argument(
        "--advertise",
        default=None,
        metavar="ADDR",
        help="the address the other sites reach this one at (default: this host's name; 127.0.0.1 on loopback)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks to start on this machine (default: the site's `ranks` in the topology, else 1; not under torchrun)",
    )
    p.add_argument(
        "--store-port", type=int, default=0, metavar="PORT", help="the site's store port, open to the other sites"
    )
    p.add_argument(
        "--secret-file", type=Path, default=None, metavar="PATH", help="the run's secret (else ATOLL_RUN_SECRET[_FILE])"
    )
    p.add_argument(
        "--wan",
        choices=["none", "emulated", "netns"],
        default="none",
        help="a real WAN (none); emulate the topology's links in the transport; or add their latency (lab)",
    )
    p.add_argument("--finetune", action="store_true", help="CONFIG is a fine-tuning config (atoll finetune's)")
    p.add_argument("--resume", action="store_true", help="continue from this site's latest complete checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="checkpoint and stop after STEP")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also: ATOLL_NO_PROGRESS=1)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a baseline's module, e.g. bench.torchft_peer
    p.add_argument(PREPARED_FLAG, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_site, allow_overrides=True)
