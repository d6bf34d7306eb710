"""The WAN lab: one network namespace per site, a `wan` namespace, tbf-shaped veth links.

    with Lab(topology) as lab:
        proc = lab.popen("beijing", [sys.executable, "-m", "atoll.train", ...])
        ...

Layout, for site i (0-based, in topology order):

    [atoll-<rid>-site-<name>]                   [atoll-<rid>-wan]
    atoll<rid>s<i> 10.213.<i+1>.2/24  --veth--  atoll<rid>w<i> 10.213.<i+1>.1/24
    default via 10.213.<i+1>.1; tbf = uplink    tbf = downlink; ip_forward=1 (wan only)

The veths are created directly inside the namespaces (never in the root namespace) and the wan
namespace has no default route, so traffic can reach only addresses inside this lab. Latency is
not shaped here (this kernel has no netem): the transport's `WanModel` adds it (`Lab.latency_ms`
says what it is). Nothing in the root namespace is changed.

Ownership: before creating anything, the lab writes `/run/atoll-lab/<rid>.json` naming its owner
process. `clean_leftovers` removes the namespaces and interfaces whose owner is gone (crashed
runs), and leaves those of a live lab alone unless asked. Every name starts with `atoll`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from atoll.errors import AtollError

if TYPE_CHECKING:
    from atoll.config.topology import Topology

log = logging.getLogger(__name__)

NETNS_PREFIX = "atoll-"  # namespaces: atoll-<rid>-wan, atoll-<rid>-site-<name>, atoll-<rid>-probe
IFACE_PREFIX = "atoll"  # interfaces: atoll<rid>s<i> (site side), atoll<rid>w<i> (wan side)
SUBNET = "10.213.0.0/16"
STATE_DIR = Path("/run/atoll-lab")
MAX_SITES = 253  # 10.213.1.0/24 .. 10.213.253.0/24
_RID_LEN = 5  # IFACE_PREFIX + rid + "s" + 3 digits = 14 <= IFNAMSIZ - 1
_RID = re.compile(f"[0-9a-z]{{{_RID_LEN}}}")
_CMD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SiteLink:
    """A site and its WAN link; None rates leave that direction unshaped."""

    name: str
    uplink_mbps: float | None
    downlink_mbps: float | None
    latency_ms: float = 0.0


def site_links(topology: Topology) -> list[SiteLink]:
    """The topology's sites with their links, in topology order (a site without a link is unshaped)."""
    out = []
    for site in topology.sites:
        link = topology.link(site.name)
        if link is None:
            out.append(SiteLink(site.name, None, None, 0.0))
        else:
            out.append(SiteLink(site.name, link.uplink_mbps, link.down_mbps, link.latency_ms))
    return out


@dataclass(frozen=True)
class LabSite:
    """Where one site lives inside a built lab."""

    name: str
    index: int
    namespace: str
    interface: str  # site-side veth end (GLOO_SOCKET_IFNAME inside the namespace)
    wan_interface: str
    address: str  # 10.213.<index+1>.2
    gateway: str  # 10.213.<index+1>.1
    link: SiteLink


# ---------------------------------------------------------------- commands


def _run(argv: Sequence[str], *, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ip/tc command; a failure is an AtollError naming the command and its stderr."""
    try:
        return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise AtollError(f"lab: {what}: `{argv[0]}` not found (install the iproute2 package)") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().replace("\n", "; ")
        raise AtollError(f"lab: {what} failed: `{' '.join(argv)}` exited {exc.returncode}: {detail}") from exc
    except subprocess.TimeoutExpired as exc:
        raise AtollError(f"lab: {what} timed out after {_CMD_TIMEOUT_S:.0f} s: `{' '.join(argv)}`") from exc


def _list_namespaces() -> list[str]:
    proc = _run(["ip", "netns", "list"], what="listing namespaces")
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _list_root_interfaces() -> list[str]:
    proc = _run(["ip", "-o", "link", "show"], what="listing interfaces")
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)  # "5: name@peer: <FLAGS> ..."
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _namespace_pids(namespace: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", namespace], what=f"listing processes in {namespace}", check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _kill_namespace_processes(namespace: str) -> None:
    for pid in _namespace_pids(namespace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tbf_args(mbps: float) -> list[str]:
    """tbf parameters for `mbps`: a burst of ~10 ms of traffic (>= 32 KiB) and a ~100 ms queue."""
    rate_bps = int(mbps * 1e6)
    burst = max(32 * 1024, rate_bps // 8 // 100)
    limit = max(2 * burst, rate_bps // 8 // 10)
    return ["tbf", "rate", f"{rate_bps}bit", "burst", str(burst), "limit", str(limit)]


# ---------------------------------------------------------------- ownership records


def _process_start(pid: int) -> str | None:
    """The start time of `pid` (field 22 of /proc/pid/stat), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _record_path(rid: str) -> Path:
    return STATE_DIR / f"{rid}.json"


def _write_record(rid: str, namespaces: list[str]) -> None:
    STATE_DIR.mkdir(mode=0o755, exist_ok=True)
    pid = os.getpid()
    _record_path(rid).write_text(json.dumps({"pid": pid, "start": _process_start(pid), "namespaces": namespaces}))


def _owner_alive(rid: str) -> bool:
    try:
        record = json.loads(_record_path(rid).read_text())
    except (OSError, ValueError):
        return False
    start = _process_start(int(record.get("pid", -1)))
    return start is not None and start == record.get("start")


def _rid_of_namespace(name: str) -> str:
    return name[len(NETNS_PREFIX) :].split("-", 1)[0]


def _rid_of_interface(name: str) -> str:
    return name[len(IFACE_PREFIX) : len(IFACE_PREFIX) + _RID_LEN]


def _new_rid() -> str:
    taken = {_rid_of_namespace(n) for n in _list_namespaces() if n.startswith(NETNS_PREFIX)}
    while True:
        rid = secrets.token_hex(4)[:_RID_LEN]
        if rid not in taken and not _record_path(rid).exists():
            return rid


# ---------------------------------------------------------------- availability and cleanup


def lab_available() -> tuple[bool, str]:
    """Whether the netns lab can be built here: (True, "...") or (False, the reason).

    Checks root, `ip` and `tc` on PATH, and that a namespace with a tbf qdisc can be created (it
    is deleted again). Never raises; the caller falls back to emulation when False.
    """
    if os.geteuid() != 0:
        return False, f"needs root (network namespaces and tc); running as uid {os.geteuid()}"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return False, f"{' and '.join(missing)} not found (install the iproute2 package)"
    try:
        rid = _new_rid()
        probe = f"{NETNS_PREFIX}{rid}-probe"
        _write_record(rid, [probe])
        try:
            _run(["ip", "netns", "add", probe], what="creating a namespace")
            _run(["ip", "-n", probe, "link", "set", "lo", "up"], what="bringing up loopback")
            _run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", *_tbf_args(10)], what="adding a tbf qdisc")
        finally:
            if probe in _list_namespaces():
                _run(["ip", "netns", "del", probe], what="deleting the probe namespace")
            _record_path(rid).unlink(missing_ok=True)
    except (AtollError, OSError) as exc:
        return False, str(exc)
    return True, "root, ip and tc present, namespaces and tbf work"


def clean_leftovers(*, include_live: bool = False) -> list[str]:
    """Remove the atoll lab namespaces and interfaces of crashed runs; return what was removed.

    A lab whose owner process is still alive is kept unless `include_live`. Processes still inside
    a removed namespace are killed. Also deletes stale ownership records. Blocks for a few ip
    commands; raises AtollError if something cannot be removed (e.g. not root).
    """
    if shutil.which("ip") is None:
        return []  # without iproute2 no lab can have been built
    removed: list[str] = []
    failures: list[str] = []
    for name in _list_namespaces():
        if not name.startswith(NETNS_PREFIX):
            continue
        if not include_live and _owner_alive(_rid_of_namespace(name)):
            log.info("keeping %s: its lab is still running (--all removes it too)", name)
            continue
        try:
            _kill_namespace_processes(name)
            _run(["ip", "netns", "del", name], what=f"deleting namespace {name}")
            removed.append(f"namespace {name}")
        except (AtollError, PermissionError) as exc:
            failures.append(str(exc))
    for name in _list_root_interfaces():
        if not name.startswith(IFACE_PREFIX) or (not include_live and _owner_alive(_rid_of_interface(name))):
            continue
        try:
            _run(["ip", "link", "del", name], what=f"deleting interface {name}")
            removed.append(f"interface {name}")
        except AtollError as exc:
            failures.append(str(exc))
    if STATE_DIR.is_dir():
        for record in STATE_DIR.glob("*.json"):
            if include_live or not _owner_alive(record.stem):
                record.unlink(missing_ok=True)
                removed.append(f"record {record}")
    if failures:
        done = f" (removed: {', '.join(removed)})" if removed else ""
        raise AtollError("; ".join(failures) + done + "; atoll lab clean needs root")
    return removed


# ---------------------------------------------------------------- the lab


class Lab:
    """A built WAN lab. Construction builds it (blocks ~0.1 s per site); `close` tears it down.

    Use it as a context manager. While it is up (in the main thread) SIGINT and SIGTERM tear it
    down and then go on to the previous handlers; an atexit hook covers a normal interpreter exit.
    Processes started with `popen` are killed by `close`, as is anything else left inside its
    namespaces. Raises AtollError when a step fails (whatever was built is removed first).
    """

    def __init__(self, topology: Topology | Sequence[SiteLink], *, run_id: str | None = None) -> None:
        links = list(topology) if isinstance(topology, Sequence) else site_links(topology)
        if not links:
            raise AtollError("lab: the topology has no sites")
        if len(links) > MAX_SITES:
            raise AtollError(f"lab: at most {MAX_SITES} sites fit in {SUBNET} (got {len(links)})")
        names = [link.name for link in links]
        if len(set(names)) != len(names):
            raise AtollError(f"lab: site names must be unique: {', '.join(names)}")
        if run_id is not None and not _RID.fullmatch(run_id):
            raise AtollError(f"lab: run_id must be {_RID_LEN} lowercase letters or digits (got {run_id!r})")
        if run_id is not None and (
            _record_path(run_id).exists() or any(_rid_of_namespace(n) == run_id for n in _list_namespaces())
        ):
            raise AtollError(f"lab: run_id {run_id!r} is in use by another lab; leave run_id out to get a fresh one")
        self.run_id = run_id or _new_rid()
        self.wan_namespace = f"{NETNS_PREFIX}{self.run_id}-wan"
        self.sites: dict[str, LabSite] = {}
        for i, link in enumerate(links):
            self.sites[link.name] = LabSite(
                name=link.name,
                index=i,
                namespace=f"{NETNS_PREFIX}{self.run_id}-site-{link.name}",
                interface=f"{IFACE_PREFIX}{self.run_id}s{i}",
                wan_interface=f"{IFACE_PREFIX}{self.run_id}w{i}",
                address=f"10.213.{i + 1}.2",
                gateway=f"10.213.{i + 1}.1",
                link=link,
            )
        self._owner_pid = os.getpid()
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []  # namespaces this lab may have created
        self._closed = False
        self._closing = False
        self._pending_signals: list[int] = []
        self._previous_handlers: dict[int, Any] = {}
        self._install_handlers()
        atexit.register(self._atexit_close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        log.info("lab %s up: %s", self.run_id, ", ".join(f"{s.name}={s.address}" for s in self.sites.values()))

    # -- building

    def _build(self) -> None:
        all_ns = [self.wan_namespace, *(s.namespace for s in self.sites.values())]
        try:
            _write_record(self.run_id, all_ns)
        except OSError as exc:
            raise AtollError(f"lab: cannot write the ownership record in {STATE_DIR}: {exc}") from exc
        for ns in all_ns:
            self._created.append(ns)  # before creating it: a signal right after must not leak it
            try:
                _run(["ip", "netns", "add", ns], what=f"creating namespace {ns}")
            except AtollError:
                self._created.pop()  # not ours: never delete a namespace this lab did not create
                raise
            _run(["ip", "-n", ns, "link", "set", "lo", "up"], what=f"bringing up loopback in {ns}")
        wan = self.wan_namespace
        for s in self.sites.values():
            _run(
                [
                    "ip",
                    "-n",
                    wan,
                    "link",
                    "add",
                    s.wan_interface,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    s.interface,
                    "netns",
                    s.namespace,
                ],
                what=f"creating the veth of site {s.name}",
            )
            _run(
                ["ip", "-n", s.namespace, "addr", "add", f"{s.address}/24", "dev", s.interface],
                what=f"addressing site {s.name}",
            )
            _run(
                ["ip", "-n", wan, "addr", "add", f"{s.gateway}/24", "dev", s.wan_interface],
                what=f"addressing the wan end of {s.name}",
            )
            _run(["ip", "-n", s.namespace, "link", "set", s.interface, "up"], what=f"bringing up {s.interface}")
            _run(["ip", "-n", wan, "link", "set", s.wan_interface, "up"], what=f"bringing up {s.wan_interface}")
            _run(["ip", "-n", s.namespace, "route", "add", "default", "via", s.gateway], what=f"routing site {s.name}")
            if s.link.uplink_mbps is not None:
                _run(
                    [
                        "tc",
                        "-n",
                        s.namespace,
                        "qdisc",
                        "add",
                        "dev",
                        s.interface,
                        "root",
                        *_tbf_args(s.link.uplink_mbps),
                    ],
                    what=f"shaping the uplink of {s.name}",
                )
            if s.link.downlink_mbps is not None:
                _run(
                    ["tc", "-n", wan, "qdisc", "add", "dev", s.wan_interface, "root", *_tbf_args(s.link.downlink_mbps)],
                    what=f"shaping the downlink of {s.name}",
                )
        # /proc/sys/net is per namespace: a process inside `wan` switches forwarding on there only.
        _run(
            ["ip", "netns", "exec", wan, sys.executable, "-c", "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"],
            what="enabling forwarding in the wan namespace",
        )

    # -- queries

    def _site(self, name: str) -> LabSite:
        try:
            return self.sites[name]
        except KeyError:
            raise AtollError(f"lab: no site {name!r}; sites: {', '.join(self.sites)}") from None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mode(self) -> str:
        return "netns"

    def site_address(self, name: str) -> str:
        """The site's address (10.213.<i+1>.2), reachable from every other site of this lab."""
        return self._site(name).address

    def namespace(self, name: str) -> str:
        """The site's namespace name (for `ip netns exec`)."""
        return self._site(name).namespace

    def interface(self, name: str) -> str:
        """The site's veth inside its namespace (e.g. for GLOO_SOCKET_IFNAME)."""
        return self._site(name).interface

    def latency_ms(self, name: str) -> float:
        """The site's one-way latency to the WAN core; the transport adds it (no netem here)."""
        return self._site(name).link.latency_ms

    def site_env(self, name: str) -> dict[str, str]:
        """Environment a process of the site gets from `popen`: its address, interface and link."""
        s = self._site(name)
        return {
            "ATOLL_LAB_MODE": "netns",
            "ATOLL_LAB_SITE": s.name,
            "ATOLL_LAB_ADDRESS": s.address,
            "ATOLL_LAB_LATENCY_MS": repr(s.link.latency_ms),
            "GLOO_SOCKET_IFNAME": s.interface,
        }

    def interface_bytes(self, name: str) -> tuple[int, int]:
        """(bytes sent, bytes received) on the site's veth as the kernel counts them (headers included)."""
        s = self._site(name)
        proc = _run(
            ["ip", "-n", s.namespace, "-s", "-j", "link", "show", "dev", s.interface],
            what=f"reading counters of {s.name}",
        )
        stats = json.loads(proc.stdout)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    # -- processes

    def popen(
        self, site: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside the site's namespace; returns at once. `close` kills it.

        The child's environment is `env` (default: this process's) plus `site_env(site)`. Other
        keyword arguments go to `subprocess.Popen`. Raises AtollError if the lab is closed.
        """
        if self._closed or self._closing:
            raise AtollError(f"lab {self.run_id} is closed; build a new Lab to start processes")
        s = self._site(site)
        child_env = dict(os.environ if env is None else env)
        child_env.update(self.site_env(site))
        proc = subprocess.Popen(["ip", "netns", "exec", s.namespace, *argv], env=child_env, **kw)
        self._procs.append(proc)
        return proc

    # -- teardown

    def close(self, *, timeout_seconds: float = 5.0) -> None:
        """Tear the lab down: stop its processes (SIGTERM, SIGKILL after `timeout_seconds`), delete
        its namespaces (which removes the veths), restore signal handlers. Idempotent.

        Signals that arrive meanwhile are held and delivered after teardown. Raises AtollError if
        a namespace could not be deleted (after trying all of them).
        """
        if self._closed or self._closing or os.getpid() != self._owner_pid:
            return
        self._closing = True
        failures: list[str] = []
        try:
            self._stop_processes(timeout_seconds)
            try:
                existing = set(_list_namespaces())
            except AtollError:
                existing = set(self._created)
            for ns in reversed(self._created):
                if ns not in existing:
                    continue
                try:
                    _kill_namespace_processes(ns)
                    _run(["ip", "netns", "del", ns], what=f"deleting namespace {ns}")
                except AtollError as exc:
                    failures.append(str(exc))
            if not failures:
                _record_path(self.run_id).unlink(missing_ok=True)
        finally:
            self._closed = True
            self._closing = False
            self._restore_handlers()
            atexit.unregister(self._atexit_close)
            log.info("lab %s torn down", self.run_id)
            pending, self._pending_signals = self._pending_signals[:1], []
        if failures:
            raise AtollError("; ".join(failures) + " (run `atoll lab clean`)")
        for signum in pending:
            _deliver(signum, self._previous_handlers.get(signum, signal.SIG_DFL), None)

    def _stop_processes(self, timeout_seconds: float) -> None:
        alive = [p for p in self._procs if p.poll() is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + timeout_seconds
        for p in alive:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _atexit_close(self) -> None:
        try:
            self.close(timeout_seconds=2.0)
        except AtollError as exc:
            log.warning("%s", exc)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.debug("lab %s built outside the main thread: no signal handlers, atexit only", self.run_id)
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous_handlers.items():
            # Leave a handler installed after ours in place; ours then just passes signals on.
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._closing:
            self._pending_signals.append(signum)
            return
        if not self._closed and os.getpid() == self._owner_pid:
            log.warning("lab %s: %s received, tearing down", self.run_id, signal.Signals(signum).name)
            try:
                self.close(timeout_seconds=2.0)
            except AtollError as exc:
                log.warning("%s", exc)
        _deliver(signum, self._previous_handlers.get(signum, signal.SIG_DFL), frame)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "up"
        return f"Lab({self.run_id}, {state}, sites={list(self.sites)})"


def _deliver(signum: int, handler: Any, frame: FrameType | None) -> None:
    """Pass a signal on to `handler` as if ours had never been installed."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_IGN:
        return
    else:  # SIG_DFL (or None: set outside Python): die by the signal, as the default would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
