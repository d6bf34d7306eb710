"""The real netns lab (root only): shaped rates between sites, addresses, and nothing left behind.

Every process sends only to 10.213.x addresses inside namespaces these tests create.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atoll.errors import AtollError
from atoll.lab.netns import IFACE_PREFIX, NETNS_PREFIX, STATE_DIR, Lab, SiteLink, clean_leftovers, lab_available
from atoll.sync.transport import WanModel
from tests.conftest import REPO, run_atoll

AVAILABLE, REASON = lab_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"needs root, iproute2 and netns for the WAN lab: {REASON}")

RECEIVER = textwrap.dedent(
    """
    import json, socket, sys, time
    host, num_bytes = sys.argv[1], int(sys.argv[2])
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(1)
    srv.settimeout(20)
    print(srv.getsockname()[1], flush=True)
    conn, peer = srv.accept()
    conn.settimeout(20)
    got, t0 = 0, None
    while got < num_bytes:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        if t0 is None:
            t0 = time.monotonic()  # the clock starts at the first byte: connection setup excluded
        got += len(chunk)
    record = {"bytes": got, "seconds": time.monotonic() - t0, "peer": peer[0], "local": conn.getsockname()[0]}
    print(json.dumps(record), flush=True)
    """
)

SENDER = textwrap.dedent(
    """
    import socket, sys
    host, port, num_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.create_connection((host, port), timeout=20)
    block, sent = b"x" * (1 << 16), 0
    while sent < num_bytes:
        n = min(len(block), num_bytes - sent)
        sock.sendall(block[:n])
        sent += n
    sock.close()
    """
)

# Builds a lab, starts a process inside it, says where things are, then exits (argument `exit`)
# or waits to be signalled.
HOLDER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from atoll.lab.netns import Lab, SiteLink
    lab = Lab([SiteLink("a", 10, 10), SiteLink("b", 10, 10)])
    sleeper = lab.popen("a", ["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(json.dumps({"rid": lab.run_id, "sleeper": sleeper.pid}), flush=True)
    if sys.argv[1:] == ["exit"]:
        sys.exit(0)  # no close(): the atexit hook tears the lab down
    time.sleep(60)
    """
)


def lab_traces(rid: str) -> list[str]:
    """Namespaces, root-namespace interfaces and records of lab `rid` that still exist."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    found = [n.split()[0] for n in namespaces.splitlines() if n.startswith(f"{NETNS_PREFIX}{rid}-")]
    found += [w for w in links.split() if w.startswith(f"{IFACE_PREFIX}{rid}")]
    if (STATE_DIR / f"{rid}.json").exists():
        found.append(str(STATE_DIR / f"{rid}.json"))
    return found


def pid_gone(pid: int, *, timeout_seconds: float = 5.0) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as exited)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # a: fast both ways; b: 40 Mbit/s up, 20 Mbit/s down. a->b is limited by b's downlink (the
    # wan-side tbf), b->a by b's uplink (the site-side tbf).
    with Lab([SiteLink("a", 100, 100, 10), SiteLink("b", 40, 20, 25)]) as built:
        yield built
    assert lab_traces(built.run_id) == []


def measure(lab: Lab, src: str, dst: str, num_bytes: int) -> dict[str, object]:
    receiver = lab.popen(
        dst, [sys.executable, "-c", RECEIVER, lab.site_address(dst), str(num_bytes)], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout is not None
    port = int(receiver.stdout.readline())
    sender = lab.popen(src, [sys.executable, "-c", SENDER, lab.site_address(dst), str(port), str(num_bytes)])
    out, _ = receiver.communicate(timeout=30)
    assert sender.wait(timeout=10) == 0
    result: dict[str, object] = json.loads(out)
    assert result["bytes"] == num_bytes
    result["mbps"] = num_bytes * 8 / float(result["seconds"]) / 1e6  # type: ignore[arg-type]
    return result


@pytest.mark.parametrize(
    ("src", "dst", "shaped_mbps"), [("b", "a", 40), ("a", "b", 20)], ids=["uplink-40", "downlink-20"]
)
def test_kernel_shapes_the_rate_between_sites(lab: Lab, src: str, dst: str, shaped_mbps: float) -> None:
    result = measure(lab, src, dst, 3_000_000)
    print(f"{src}->{dst}: {result['mbps']:.1f} Mbit/s measured, {shaped_mbps} shaped")
    assert 0.8 * shaped_mbps <= result["mbps"] <= 1.2 * shaped_mbps  # type: ignore[operator]
    assert result["peer"] == lab.site_address(src) and result["local"] == lab.site_address(dst)


def test_sites_reach_only_lab_addresses(lab: Lab) -> None:
    assert [lab.site_address(s) for s in ("a", "b")] == ["10.213.1.2", "10.213.2.2"]
    assert lab.latency_ms("b") == 25
    for name in ("a", "b"):
        ns = lab.namespace(name)
        addrs = subprocess.run(["ip", "-n", ns, "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        assert sorted(line.split()[3] for line in addrs.splitlines()) == sorted(
            ["127.0.0.1/8", f"{lab.site_address(name)}/24"]
        )
        routes = subprocess.run(["ip", "-n", ns, "-4", "route"], capture_output=True, text=True, check=True).stdout
        assert all("10.213." in line for line in routes.splitlines()), routes
    # The wan namespace routes only the lab's subnets: anything else is unreachable (a lookup, no packet sent).
    lookup = subprocess.run(
        ["ip", "-n", lab.wan_namespace, "route", "get", "192.0.2.1"], capture_output=True, text=True
    )
    assert lookup.returncode != 0 and "unreachable" in lookup.stderr.lower()
    # The root namespace gained nothing.
    root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert "10.213." not in root and IFACE_PREFIX + lab.run_id not in root
    tx, rx = lab.interface_bytes("a")
    assert tx > 0 and rx > 0


def test_close_kills_processes_and_removes_everything() -> None:
    lab = Lab([SiteLink("a", 10, 10), SiteLink("b", 10, None)])
    sleeper = lab.popen("b", ["sleep", "60"])
    assert lab_traces(lab.run_id)
    lab.close()
    lab.close()  # idempotent
    assert sleeper.poll() is not None
    assert lab_traces(lab.run_id) == []


def test_two_labs_coexist_and_an_exception_tears_down() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Lab([SiteLink("a", 10, 10)]) as first, Lab([SiteLink("a", 10, 10)]) as second:
            assert first.run_id != second.run_id
            assert first.site_address("a") == second.site_address("a")  # same address, separate namespaces
            raise RuntimeError("boom")
    assert lab_traces(first.run_id) == [] and lab_traces(second.run_id) == []


@pytest.fixture
def holder(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    """A child process that holds a lab: (process, the lab's run id, pid of a process inside it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    argv = [sys.executable, "-c", HOLDER, *getattr(request, "param", [])]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise AssertionError(child.communicate(timeout=10)[1])
    info = json.loads(line)
    try:
        yield child, str(info["rid"]), int(info["sleeper"])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for name in lab_traces(str(info["rid"])):  # only if the test failed: remove exactly this lab
            if not name.startswith("/"):
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
                for pid in pids:
                    os.kill(int(pid), signal.SIGKILL)
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_owner_tears_its_lab_down(holder: tuple[subprocess.Popen[str], str, int], signum: int) -> None:
    child, rid, sleeper = holder
    assert lab_traces(rid)
    child.send_signal(signum)
    _, err = child.communicate(timeout=20)
    assert child.returncode == -signum, err  # died by the signal once the lab was down (Python does so for SIGINT too)
    assert lab_traces(rid) == []
    assert pid_gone(sleeper)


@pytest.mark.parametrize("holder", [["exit"]], indirect=True)
def test_an_owner_that_exits_without_close_tears_down_at_exit(holder: tuple[subprocess.Popen[str], str, int]) -> None:
    child, rid, sleeper = holder
    _, err = child.communicate(timeout=20)
    assert child.returncode == 0, err
    assert lab_traces(rid) == []
    assert pid_gone(sleeper)


def test_clean_removes_what_a_crashed_run_left(holder: tuple[subprocess.Popen[str], str, int]) -> None:
    child, rid, sleeper = holder
    assert rid not in " ".join(clean_leftovers())  # its owner is alive: kept
    child.kill()  # SIGKILL: no handler runs, the lab is left behind
    child.wait(timeout=10)
    leaked = f"{NETNS_PREFIX}{secrets.token_hex(3)[:5]}-leak"
    subprocess.run(["ip", "netns", "add", leaked], check=True)
    assert lab_traces(rid)
    proc = run_atoll("lab", "clean", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"namespace {leaked}" in proc.stdout and f"namespace {NETNS_PREFIX}{rid}-wan" in proc.stdout
    assert (
        lab_traces(rid) == []
        and leaked not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )
    assert pid_gone(sleeper)  # the process left inside the namespace was killed


def test_check_reports_available() -> None:
    proc = run_atoll("lab", "check", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "netns lab: available" in proc.stdout


def test_a_run_id_in_use_is_refused(lab: Lab) -> None:
    with pytest.raises(AtollError, match="in use"):
        Lab([SiteLink("x", 10, 10)], run_id=lab.run_id)
    assert lab_traces(lab.run_id)  # the running lab was left alone


def test_a_lab_from_a_validated_topology() -> None:
    from atoll.config.topology import Topology

    cpu = [{"kind": "cpu", "count": 1, "per_node": 1}]
    topo = Topology(
        name="t",
        sites=[{"name": "east", "devices": cpu}, {"name": "west", "devices": cpu}],
        links=[
            {"site": "east", "uplink_mbps": 3.4, "latency_ms": 15},
            {"site": "west", "uplink_mbps": 3.4, "downlink_mbps": 2, "latency_ms": 5},
        ],
    )
    with Lab(topo) as lab:
        assert lab.site_address("west") == "10.213.2.2" and lab.latency_ms("east") == 15
        # The kernel shapes the rate; the transport adds both legs' latency (no netem here).
        assert WanModel(topo, mode="netns").extra_seconds(10**6, num_sites=2) == pytest.approx(0.020)
        qdisc = subprocess.run(
            ["tc", "-n", lab.wan_namespace, "qdisc", "show", "dev", lab.sites["west"].wan_interface],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "tbf" in qdisc and "2Mbit" in qdisc, qdisc
    assert lab_traces(lab.run_id) == []
