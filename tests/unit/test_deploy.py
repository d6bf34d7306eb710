"""The deployment commands' pure parts: addresses, the lighthouse's ready line, the secret file,
where a site sits in a run, and how a dead process is described."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from atoll.config.topology import LighthouseSpec, LinkSpec, SiteSpec, Topology
from atoll.deploy.site import default_advertise, place_site, site_environ
from atoll.errors import AtollError
from atoll.parallel.launch import describe_exit, exit_status
from atoll.sync.lighthouse import (
    advertised_url,
    ensure_secret_file,
    lighthouse_url,
    parse_ready_line,
    ready_line,
    split_host_port,
)


def topology(*, address: str | None = None, sites: tuple[str, ...] = ("east", "west")) -> Topology:
    # model_construct: the device catalog is not needed to place a site.
    return Topology.model_construct(
        name="t",
        sites=[SiteSpec.model_construct(name=s, devices=[]) for s in sites],
        links=[LinkSpec(site=s, uplink_mbps=10) for s in sites],
        lighthouse=LighthouseSpec(address=address),
    )


def test_addresses_take_every_form_a_user_writes() -> None:
    assert split_host_port("10.0.0.5:29410", what="x") == ("10.0.0.5", 29410)
    assert split_host_port("http://lh.example:80/", what="x") == ("lh.example", 80)
    assert split_host_port("[::1]:7", what="x") == ("::1", 7)
    assert lighthouse_url("10.0.0.5:29410") == "http://10.0.0.5:29410"
    assert lighthouse_url("::1:29410") == "http://[::1]:29410"
    assert lighthouse_url("http://a:1") == "http://a:1"
    for bad in ("10.0.0.5", "host:port", "h:99999"):
        with pytest.raises(AtollError, match="HOST:PORT"):
            split_host_port(bad, what="--lighthouse")


def test_the_lighthouse_advertises_its_real_port_on_the_host_sites_dial() -> None:
    # torchft reports its machine's host name and the port it got; the bind host or --advertise wins.
    assert advertised_url("http://vm:41234", bind="127.0.0.1:0", advertise=None) == "http://127.0.0.1:41234"
    assert advertised_url("http://vm:41234", bind="0.0.0.0:0", advertise="lh.dc1") == "http://lh.dc1:41234"
    wildcard = advertised_url("http://vm:41234", bind="[::]:29410", advertise=None)
    assert wildcard.endswith(":41234") and "[::]" not in wildcard and "0.0.0.0" not in wildcard


def test_the_ready_line_round_trips_and_other_lines_are_not_taken_for_it() -> None:
    line = ready_line("http://10.0.0.5:29410", min_sites=2)
    assert parse_ready_line(line) == "http://10.0.0.5:29410" and "2 sites" in line
    assert parse_ready_line("serving until Ctrl-C") is None


def test_the_secret_file_is_written_once_private_and_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "dc1" / "run.secret"
    assert ensure_secret_file(path) is True
    first = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600 and len(first.strip()) >= 32
    assert ensure_secret_file(path) is False and path.read_text() == first
    path.write_text("short")
    with pytest.raises(AtollError, match="at least 16"):
        ensure_secret_file(path)


def test_a_site_is_placed_by_its_name_with_the_lighthouse_of_the_flag_or_the_topology(tmp_path: Path) -> None:
    topo_path = tmp_path / "t.yaml"
    common = {"topology_path": topo_path, "advertise": None, "wan_mode": "none", "nproc": 2, "store_port": 0}
    placed = place_site(topology(address="10.0.0.5:29410"), site="west", lighthouse=None, environ={}, **common)
    assert (placed.env.index, placed.env.num_sites, placed.env.lighthouse) == (1, 2, "http://10.0.0.5:29410")
    flag = place_site(topology(address="10.0.0.5:29410"), site="east", lighthouse="127.0.0.1:7", environ={}, **common)
    assert flag.env.lighthouse == "http://127.0.0.1:7" and flag.env.address == "127.0.0.1"
    with pytest.raises(AtollError, match="--site 'north' is not a site .* east, west"):
        place_site(topology(), site="north", lighthouse="127.0.0.1:7", environ={}, **common)
    with pytest.raises(AtollError, match="pass --lighthouse HOST:PORT"):
        place_site(topology(), site="east", lighthouse=None, environ={}, **common)
    with pytest.raises(AtollError, match="one site"):
        place_site(topology(sites=("east",)), site="east", lighthouse="127.0.0.1:7", environ={}, **common)


def test_the_advertised_address_follows_the_lab_then_loopback_then_the_host_name() -> None:
    assert default_advertise("http://127.0.0.1:7", {"ATOLL_LAB_ADDRESS": "10.213.2.2"}) == "10.213.2.2"
    assert default_advertise("http://127.0.0.1:7", {}) == "127.0.0.1"
    assert default_advertise("http://localhost:7", {}) == "127.0.0.1"
    assert default_advertise("http://10.0.0.5:7", {}) not in ("127.0.0.1", "10.0.0.5")


def test_the_ranks_get_the_sites_store_unless_torchrun_owns_it(tmp_path: Path) -> None:
    placed = place_site(
        topology(),
        topology_path=tmp_path / "t.yaml",
        site="west",
        lighthouse="10.0.0.5:29410",
        advertise="10.0.1.9",
        wan_mode="none",
        nproc=1,
        store_port=29500,
        environ={},
    )
    env = site_environ(placed, {"MASTER_ADDR": "node0", "MASTER_PORT": "1"}, torchrun=False)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.1.9", "29500")  # the other sites dial it
    assert env["ATOLL_SITE"] == "west" and env["TORCHFT_LIGHTHOUSE"] == "http://10.0.0.5:29410"
    under = site_environ(placed, {"MASTER_ADDR": "node0", "MASTER_PORT": "1"}, torchrun=True)
    assert (under["MASTER_ADDR"], under["MASTER_PORT"]) == ("node0", "1")


def test_exits_read_as_a_shell_reports_them() -> None:
    assert exit_status(-signal.SIGKILL) == 137 and exit_status(3) == 3
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(1) == "exited with status 1"
