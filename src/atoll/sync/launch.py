"""Start a multi-site run on this machine: a Lighthouse, then every site's ranks.

Sites run on loopback (the WAN emulated in the transport) or, in the lab, each inside its own
network namespace behind a shaped link. Each rank gets the environment torchrun would give it for
its *site* (RANK, WORLD_SIZE, MASTER_ADDR/PORT of the site's own store) plus where it sits in the
network (`atoll.sync.site_env.SiteEnv`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.parallel.launch import free_port, stop_processes, wait_all
from atoll.report.sites import SiteWatch
from atoll.sync.auth import SECRET_ENV, load_secret, new_secret
from atoll.sync.site_env import SiteEnv

log = logging.getLogger(__name__)

LIGHTHOUSE_PORT = 29410  # inside a lab namespace that atoll created; nothing else listens there


class SiteHost(Protocol):
    """Where a site's processes run: loopback, or a lab namespace."""

    def site_address(self, site: str) -> str: ...
    def popen(
        self, site: str, argv: list[str], *, env: dict[str, str], **kwargs: object
    ) -> subprocess.Popen[bytes]: ...


class LoopbackHost:
    """Every site on this machine's loopback interface."""

    def site_address(self, site: str) -> str:
        return "127.0.0.1"

    def popen(self, site: str, argv: list[str], *, env: dict[str, str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, **kwargs)  # type: ignore[call-overload,no-any-return]


def start_lighthouse_process(
    host: SiteHost, *, site: str, min_sites: int, env: dict[str, str], loopback: bool
) -> tuple[subprocess.Popen[bytes], str]:
    """Run the Lighthouse as a child inside `site`; returns the process and its address."""
    addr = host.site_address(site)
    port = free_port(addr) if loopback else LIGHTHOUSE_PORT
    proc = host.popen(
        site,
        [sys.executable, "-m", "atoll.sync.lighthouse", "--bind", f"{addr}:{port}", "--min-sites", str(min_sites)],
        env=env,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        proc.kill()
        raise AtollError(f"the torchft Lighthouse did not start in site {site} (bind {addr}:{port})")
    return proc, f"http://{addr}:{port}"


def launch_sites(
    child_args: list[str],
    *,
    topology: Topology,
    topology_path: Path,
    ranks_per_site: int,
    wan_mode: str,
    host: SiteHost,
    min_sites: int | None = None,
    watch: SiteWatch | None = None,
    module: str = "atoll.train",
) -> int:
    """Run every site's ranks of ``python -m MODULE CHILD_ARGS``; blocks; returns an exit code."""
    loopback = isinstance(host, LoopbackHost)
    base = dict(os.environ)
    base["ATOLL_LAUNCHED"] = "1"
    base["ATOLL_PROCS_ON_HOST"] = str(len(topology.sites) * ranks_per_site)  # share the cores
    base.setdefault("RUST_LOG", "warn")  # torchft's Lighthouse and Manager log every quorum at info
    base.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d warns that namespaced peers have no hostname
    if load_secret(base) is None:  # one machine: a fresh join secret for this run's sites
        base[SECRET_ENV] = new_secret()
    lighthouse_site = topology.lighthouse.site or topology.sites[0].name
    procs: list[subprocess.Popen[bytes]] = []
    lighthouse = None
    try:
        if topology.lighthouse.address is not None:
            lighthouse_addr = (
                topology.lighthouse.address
                if "://" in topology.lighthouse.address
                else f"http://{topology.lighthouse.address}"
            )
        else:
            lighthouse, lighthouse_addr = start_lighthouse_process(
                host, site=lighthouse_site, min_sites=min_sites or len(topology.sites), env=base, loopback=loopback
            )
        log.info(
            "lighthouse at %s; %d sites x %d rank(s); WAN %s",
            lighthouse_addr,
            len(topology.sites),
            ranks_per_site,
            wan_mode,
        )
        for index, site in enumerate(topology.sites):
            addr = host.site_address(site.name)
            site_env = dict(
                base,
                MASTER_ADDR=addr,
                MASTER_PORT=str(free_port(addr) if loopback else 29500),
                WORLD_SIZE=str(ranks_per_site),
                LOCAL_WORLD_SIZE=str(ranks_per_site),
                **SiteEnv(
                    site=site.name,
                    index=index,
                    num_sites=len(topology.sites),
                    topology=topology_path.resolve(),
                    lighthouse=lighthouse_addr,
                    address=addr,
                    wan_mode=wan_mode,
                ).to_environ(),
            )
            for rank in range(ranks_per_site):
                env = dict(site_env, RANK=str(rank), LOCAL_RANK=str(rank))
                procs.append(host.popen(site.name, [sys.executable, "-m", module, *child_args], env=env))
        if watch is None:
            return wait_all(procs)
        with watch:
            return wait_all(procs, tick=watch.refresh)
    finally:
        stop_processes(procs)
        if lighthouse is not None:
            stop_processes([lighthouse])
