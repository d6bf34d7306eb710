"""One data center's part of a multi-site run: what `atoll site` does once its arguments are checked.

A site is one torchft replica group. `atoll site` places it in the run (its index in the topology,
the Lighthouse, the address the other sites reach it at), gives its ranks the site's own store
(MASTER_ADDR/MASTER_PORT: rank 0's TCPStore, which torchft also hands to the other sites for the
cross-site process group, so it must be reachable from them) and then either

- starts `nproc` ranks as its children and supervises them (one process, or ``--nproc N``): a
  rank that fails stops the site's other ranks, and the site exits with that rank's status; or
- under torchrun (one `atoll site` per rank, across the site's nodes), becomes the rank itself:
  it replaces its own process with the worker, keeping torchrun's RANK, WORLD_SIZE and store.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from atoll.config.topology import Topology, load_topology
from atoll.errors import AtollError
from atoll.parallel.launch import RankFailure, free_port, start_ranks, wait_ranks
from atoll.report.sites import SiteWatch
from atoll.sync.lighthouse import lighthouse_url
from atoll.sync.site_env import DEFAULT_RANKS, SiteEnv

log = logging.getLogger(__name__)

TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun for every rank it starts
LAB_ADDRESS_ENV = "ATOLL_LAB_ADDRESS"  # set by the lab for processes inside a site's namespace


@dataclass(frozen=True)
class SitePlacement:
    """Where one site sits in a run: everything `atoll site` derives from its flags and the topology."""

    env: SiteEnv
    nproc: int
    store_port: int  # 0: a free one, chosen when the ranks start

    @property
    def name(self) -> str:
        return self.env.site


def place_site(
    topology: Topology,
    *,
    topology_path: Path,
    site: str,
    lighthouse: str | None,
    advertise: str | None,
    wan_mode: str,
    nproc: int,
    store_port: int,
    environ: Mapping[str, str],
) -> SitePlacement:
    """Check `site` against the topology and resolve the Lighthouse and the advertised address.

    `lighthouse` (``HOST:PORT``) wins over the topology's ``lighthouse.address``. Raises AtollError
    naming the flag to add when something is missing or wrong.
    """
    names = [s.name for s in topology.sites]
    if site not in names:
        raise AtollError(f"--site {site!r} is not a site of {topology_path}; its sites: {', '.join(names)}")
    if len(names) < 2:
        raise AtollError(f"topology {topology_path} has one site: train it with `atoll train` (no site needed)")
    if nproc < 1:
        raise AtollError(f"--nproc must be at least 1 (got {nproc})")
    address = lighthouse or topology.lighthouse.address
    if address is None:
        raise AtollError(
            f"no lighthouse for site {site}: pass --lighthouse HOST:PORT (what `atoll lighthouse` printed) "
            f"or set lighthouse.address in {topology_path}"
        )
    url = lighthouse_url(address)
    return SitePlacement(
        env=SiteEnv(
            site=site,
            index=names.index(site),
            num_sites=len(names),
            topology=topology_path.resolve(),
            lighthouse=url,
            address=advertise or default_advertise(url, environ),
            wan_mode=wan_mode,
        ),
        nproc=nproc,
        store_port=store_port,
    )


def default_advertise(lighthouse: str, environ: Mapping[str, str]) -> str:
    """The address the other sites reach this one at, when ``--advertise`` is not given.

    Inside a lab namespace: the namespace's address. With a Lighthouse on loopback (every site on
    this machine): 127.0.0.1. Else this machine's host name, which the other data centers must
    resolve to this machine (pass ``--advertise`` when they cannot).
    """
    if environ.get(LAB_ADDRESS_ENV):
        return environ[LAB_ADDRESS_ENV]
    host = lighthouse.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass
    return socket.gethostname()


def under_torchrun(environ: Mapping[str, str]) -> bool:
    """Whether this process is a rank that torchrun started (it then owns RANK and the store)."""
    return TORCHRUN_ENV in environ


def site_environ(placement: SitePlacement, base: Mapping[str, str], *, torchrun: bool) -> dict[str, str]:
    """The environment of the site's ranks: `base`, the site's place in the run, its store.

    Under torchrun the store is torchrun's (MASTER_ADDR/MASTER_PORT kept as it set them); else it
    is rank 0's TCPStore on a free port (or ``--store-port``), at the advertised address.
    """
    env = dict(base)
    env.update(placement.env.to_environ())
    env.setdefault("ATOLL_PROCS_ON_HOST", str(placement.nproc))  # how many ranks share this host's cores
    env.setdefault("RUST_LOG", "warn")  # torchft's Lighthouse and Manager log every quorum at info
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d warns that namespaced peers have no hostname
    if not torchrun:
        # Sites the topology gives no `ranks` run as many as this one (under torchrun: its WORLD_SIZE).
        env.setdefault(DEFAULT_RANKS, str(placement.nproc))
        env["MASTER_ADDR"] = placement.env.address
        env["MASTER_PORT"] = str(placement.store_port or free_port("0.0.0.0"))
    return env


def site_watch(placement: SitePlacement, run_dir: Path) -> SiteWatch | None:
    """The live view of this one site for a standalone `atoll site` (a launcher draws its own),
    or None when stderr is not a terminal (the view would draw nothing).

    Its total steps come from the run directory's config.yaml, which `atoll site` wrote; its
    link row from the topology's link for the site.
    """
    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    watch = SiteWatch({placement.name: run_dir}, total_steps={}, console=console)
    link = load_topology(placement.env.topology).link(placement.name)
    if link is not None:
        watch.set_links({placement.name: (link.uplink_mbps, link.down_mbps)})
    return watch


def run_site_ranks(
    placement: SitePlacement,
    *,
    module: str,
    module_args: list[str],
    env: dict[str, str],
    watch: SiteWatch | None = None,
) -> RankFailure | None:
    """Start the site's ranks as children and wait for them; blocks.

    Returns None when every rank exited 0, else the first rank that failed (the others are
    stopped). Ranks die with this process, even when it is killed with SIGKILL. `watch` (see
    `site_watch`) is drawn while they run; the ranks should then draw no progress of their own.
    """
    log.info(
        "site %s (%d of %d): %d rank(s), store %s:%s, lighthouse %s, advertised as %s",
        placement.name,
        placement.env.index + 1,
        placement.env.num_sites,
        placement.nproc,
        env["MASTER_ADDR"],
        env["MASTER_PORT"],
        placement.env.lighthouse,
        placement.env.address,
    )
    procs = start_ranks(module_args, nproc=placement.nproc, module=module, env=env)
    if watch is None:
        return wait_ranks(procs)
    with watch:
        failure = wait_ranks(procs, tick=watch.refresh)
        if failure is None:
            watch.mark(placement.name, "done")
        return failure


def become_rank(*, module: str, module_args: list[str], env: dict[str, str]) -> None:
    """Under torchrun: replace this process with the worker (same pid, so torchrun watches it). Never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *module_args], env)
