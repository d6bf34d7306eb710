"""Start a multi-site run on this machine: `atoll lighthouse`, then one `atoll site` per site.

These are the commands a real deployment runs in each data center (`atoll.deploy`), started here
as separate processes: on loopback (the WAN emulated in the transport) or, in the lab, each
inside its own network namespace behind a shaped link. The launcher makes a fresh secret for the
run and hands it to every site in ATOLL_RUN_SECRET (the Lighthouse never sees it).

Then it watches. A site that dies is reported in one line (which site, its exit status or
signal, the last step its metrics.jsonl recorded) and, while it has restarts left
(``--restart-sites N``), started again: from its latest complete checkpoint when it has one,
else from the beginning. The healthy sites are never stopped because another one died. Two
things do end the whole run: a site exiting with status 2 (a user's mistake in the config, which
every site shares, so a restart cannot help) and the Lighthouse dying (no quorum can form).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.parallel.launch import describe_exit, die_with_parent, exit_status, stop_processes
from atoll.report.sites import SiteWatch
from atoll.sync.auth import SECRET_ENV, SECRET_FILE_ENV, new_secret
from atoll.sync.lighthouse import parse_ready_line
from atoll.sync.site_env import DEFAULT_RANKS

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2  # what every atoll command exits with for a user's mistake (atoll.console)
LIGHTHOUSE_START_SECONDS = 120.0  # importing torch on a busy machine is most of it


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


def atoll_argv(*args: str) -> list[str]:
    """The command line of ``atoll ARGS`` with this interpreter (the launched commands)."""
    return [sys.executable, "-m", "atoll.cli", *args]


def start_lighthouse_process(
    host: SiteHost, *, site: str, min_sites: int, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    """Run `atoll lighthouse` inside `site` on a free port; returns the process and its URL once it listens.

    Raises AtollError when it exits or stays silent for `LIGHTHOUSE_START_SECONDS`.
    """
    addr = host.site_address(site)
    proc = host.popen(
        site,
        atoll_argv("lighthouse", "--bind", f"{addr}:0", "--min-sites", str(min_sites)),
        env=env,
        stdout=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    assert proc.stdout is not None
    found: list[str] = []
    ready = threading.Event()
    threading.Thread(target=_read_ready, args=(proc.stdout, found, ready), daemon=True).start()
    ready.wait(LIGHTHOUSE_START_SECONDS)
    if not found:
        stop_processes([proc], grace_seconds=2.0)
        raise AtollError(f"`atoll lighthouse` did not start in site {site} (bind {addr}:0); its errors are above")
    return proc, found[0]


def _read_ready(stream: object, found: list[str], ready: threading.Event) -> None:
    """Read the Lighthouse's stdout: its ready line into `found` (then set `ready`), then the rest
    (so that it never blocks on a full pipe). `ready` is set at the end of the stream too."""
    try:
        for raw in stream:  # type: ignore[attr-defined]
            line = raw.decode(errors="replace").strip()
            url = parse_ready_line(line)
            if url is not None and not found:
                found.append(url)
                ready.set()
            else:
                log.debug("lighthouse: %s", line)
    finally:
        ready.set()


@dataclass
class _Site:
    name: str
    argv: list[str]
    run_dir: Path | None
    proc: subprocess.Popen[bytes]
    restarts: int = 0
    state: str = "running"  # running, finished, lost


def launch_sites(
    child_args: list[str],
    *,
    topology: Topology,
    topology_path: Path,
    ranks_per_site: int,
    wan_mode: str,
    host: SiteHost,
    min_sites: int | None = None,
    site_dirs: Mapping[str, Path] | None = None,
    restarts: int = 0,
    watch: SiteWatch | None = None,
    module: str = "atoll.train",
) -> int:
    """Run every site of `topology` as ``atoll site CHILD_ARGS ...`` (ranks: ``python -m MODULE``); blocks.

    `child_args` are the config, its overrides and the flags every rank gets; the run directory
    must be prepared already (the sites are started with ``--prepared``). `site_dirs` (each
    site's run directory) let the launcher name a dead site's last step and restart it from its
    checkpoint; each site is restarted at most `restarts` times. Returns 0 when every site
    finished, else the exit status of the first site lost (or 2 for a user's mistake).
    """
    base = dict(os.environ)
    base["ATOLL_LAUNCHED"] = "1"
    ranks = {s.name: s.ranks or ranks_per_site for s in topology.sites}  # a site's own `ranks` wins
    base["ATOLL_PROCS_ON_HOST"] = str(sum(ranks.values()))  # share the cores
    base[DEFAULT_RANKS] = str(ranks_per_site)  # so every site knows the others' sizes (the exchange's lanes)
    base.setdefault("RUST_LOG", "warn")  # torchft's Lighthouse and Manager log every quorum at info
    base.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d warns that namespaced peers have no hostname
    base.pop(SECRET_ENV, None)
    base.pop(SECRET_FILE_ENV, None)
    sites: dict[str, _Site] = {}
    lighthouse = None
    try:
        if topology.lighthouse.address is not None:
            lighthouse_addr = topology.lighthouse.address
        else:
            lighthouse, lighthouse_addr = start_lighthouse_process(
                host,
                site=topology.lighthouse.site or topology.sites[0].name,
                min_sites=min_sites or len(topology.sites),
                env=base,
            )
        log.info(
            "lighthouse at %s; sites %s; WAN %s",
            lighthouse_addr,
            ", ".join(f"{name} ({n} rank{'s' if n > 1 else ''})" for name, n in ranks.items()),
            wan_mode,
        )
        site_env = dict(base, **{SECRET_ENV: new_secret()})  # one fresh secret per run, for the sites only
        for site in topology.sites:
            argv = atoll_argv(
                "site",
                *child_args,
                "--topology",
                str(topology_path.resolve()),
                "--site",
                site.name,
                "--lighthouse",
                lighthouse_addr,
                "--advertise",
                host.site_address(site.name),
                "--nproc",
                str(ranks[site.name]),
                "--wan",
                wan_mode,
                "--worker",
                module,
                "--prepared",
            )
            run_dir = site_dirs.get(site.name) if site_dirs is not None else None
            sites[site.name] = _Site(site.name, argv, run_dir, _start(host, site.name, argv, site_env))
        if watch is not None:
            watch.set_links(link_mbps(topology))
        return _watch(sites, host=host, env=site_env, restarts=restarts, lighthouse=lighthouse, watch=watch)
    finally:
        stop_processes([s.proc for s in sites.values()])
        if lighthouse is not None:
            stop_processes([lighthouse])


def _start(host: SiteHost, site: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = host.popen(site, argv, env=env, preexec_fn=die_with_parent)
    log.info("site %s started (pid %d)", site, proc.pid)
    return proc


def _watch(
    sites: dict[str, _Site],
    *,
    host: SiteHost,
    env: dict[str, str],
    restarts: int,
    lighthouse: subprocess.Popen[bytes] | None,
    watch: SiteWatch | None,
) -> int:
    """Wait for every site, reporting and restarting the ones that die. Returns the run's exit status."""
    lost: list[int] = []
    if watch is not None:
        watch.__enter__()
    try:
        while any(s.state == "running" for s in sites.values()):
            if watch is not None:
                watch.refresh()
            if lighthouse is not None and lighthouse.poll() is not None:
                report(f"the lighthouse {describe_exit(lighthouse.returncode)}: no quorum can form; stopping the run")
                return 1
            for site in sites.values():
                code = site.proc.poll() if site.state == "running" else None
                if code is None:
                    continue
                if code == 0:
                    site.state = "finished"
                    log.info("site %s finished", site.name)
                    if watch is not None:
                        watch.mark(site.name, "done")
                    continue
                where = f"site {site.name} {describe_exit(code)} {_last_step_words(site.run_dir)}"
                if code == EXIT_USER_ERROR:
                    report(f"{where}: a mistake in the run's config (its message is above); stopping the run")
                    return EXIT_USER_ERROR
                if site.restarts < restarts:
                    site.restarts += 1
                    argv, start = _restart_argv(site)
                    report(f"{where}; restarting it {start} (restart {site.restarts} of {restarts})")
                    site.argv = argv
                    site.proc = _start(host, site.name, argv, env)
                    if watch is not None:
                        watch.mark(site.name, f"restarted {site.restarts}x")
                    continue
                site.state = "lost"
                lost.append(exit_status(code))
                running = [s.name for s in sites.values() if s.state == "running"]
                report(
                    f"{where}; not restarted (--restart-sites {restarts})"
                    + (f"; the other sites go on ({', '.join(running)})" if running else "")
                )
                if watch is not None:
                    watch.mark(site.name, "lost")
            time.sleep(0.25)
    finally:
        if watch is not None:
            watch.__exit__(None, None, None)
    return lost[0] if lost else 0


def link_mbps(topology: Topology) -> dict[str, tuple[float, float]]:
    """Each site's (uplink, downlink) in Mbit/s, for the live view's link rows (sites without a link: none)."""
    out = {}
    for site in topology.sites:
        link = topology.link(site.name)
        if link is not None:
            out[site.name] = (link.uplink_mbps, link.down_mbps)
    return out


def report(line: str) -> None:
    """One line on stderr, never wrapped: what the launcher says about a site or the Lighthouse."""
    print(f"atoll: {line}", file=sys.stderr, flush=True)


def _last_step_words(run_dir: Path | None) -> str:
    """``at step N`` from the site's metrics.jsonl (the last step it logged), or why not."""
    if run_dir is None:
        return "(its run directory is unknown to the launcher)"
    from atoll.report.metrics import read_metrics

    try:
        steps = [int(r["step"]) for r in read_metrics(run_dir) if "loss" in r]
    except (OSError, ValueError) as exc:
        return f"(its metrics.jsonl is unreadable: {exc})"
    return f"at step {max(steps)}" if steps else "before its first step"


def _restart_argv(site: _Site) -> tuple[list[str], str]:
    """The site's command line for a restart, and where it will start from (in words)."""
    from atoll.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(site.run_dir) if site.run_dir is not None else None
    if ckpt is None:
        argv = [a for a in site.argv if a != "--resume"]
        return argv, "from the beginning (no complete checkpoint yet)"
    argv = site.argv if "--resume" in site.argv else [*site.argv, "--resume"]
    return argv, f"from its checkpoint at step {ckpt.step}"
