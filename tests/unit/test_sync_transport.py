"""The transport's pure parts: the byte counter and the WAN model."""

from __future__ import annotations

import pytest

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.sync.transport import MIN_CHUNK_BYTES, ByteCounter, WanModel, chunk_bytes_for


def topology(*links: tuple[str, float, float]) -> Topology:
    """Sites named by `links`: (name, uplink Mbit/s, latency ms)."""
    return Topology.model_validate(
        {
            "name": "t",
            "sites": [{"name": n, "devices": [{"kind": "cpu", "count": 1}]} for n, _, _ in links],
            "links": [{"site": n, "uplink_mbps": mbps, "latency_ms": ms} for n, mbps, ms in links],
        }
    )


def test_byte_counter_adds_up_exchanges() -> None:
    c = ByteCounter()
    c.add(sent=100, received=200, seconds=0.5)
    c.add(sent=1, received=2, seconds=0.25)
    c.add(sent=10, received=0, seconds=0.0, exchanges=0)  # a heal transfer: bytes, not an exchange
    c.failed += 1
    assert c.as_dict() == {
        "wan_bytes_sent": 111,
        "wan_bytes_received": 202,
        "wan_exchanges": 2,
        "wan_seconds": 0.75,
        "wan_failed": 1,
    }


def test_emulated_wan_costs_bytes_over_the_slowest_link_plus_the_longest_path() -> None:
    wan = WanModel(topology(("a", 2.0, 5.0), ("b", 8.0, 20.0), ("c", 4.0, 1.0)), mode="emulated")
    # Each site sends its payload to the two others over its uplink: 2 x 1000 bytes at 2 Mbit/s
    # on the slowest; the ring all-gather's S-1 = 2 hops each cost the longest path, b-a (25 ms).
    assert wan.extra_seconds(1000, num_sites=3) == pytest.approx(8 * 1000 * 2 / 2e6 + 2 * 0.025)
    assert wan.extra_seconds(1000, num_sites=1) == 0.0


def test_netns_wan_adds_latency_only_and_none_adds_nothing() -> None:
    topo = topology(("a", 2.0, 5.0), ("b", 8.0, 20.0))
    assert WanModel(topo, mode="netns").extra_seconds(10**9, num_sites=2) == pytest.approx(0.025)
    assert WanModel(topo, mode="none").extra_seconds(10**9, num_sites=2) == 0.0
    assert WanModel(None, mode="none").extra_seconds(10**9, num_sites=2) == 0.0


def test_wan_model_refuses_unknown_modes_and_missing_links() -> None:
    with pytest.raises(AtollError, match="unknown WAN mode"):
        WanModel(topology(("a", 1.0, 0.0), ("b", 1.0, 0.0)), mode="satellite")
    one_site = Topology.model_validate(
        {"name": "t", "sites": [{"name": "a", "devices": [{"kind": "cpu", "count": 1}]}]}
    )
    with pytest.raises(AtollError, match="needs a topology with links"):
        WanModel(one_site, mode="emulated")


def test_all_gather_chunks_cover_the_bandwidth_delay_product_of_the_links() -> None:
    # 1 Gbit/s, farthest pair 40 + 10 ms one way: 125e6 B/s x 0.1 s round trip = 12.5 MB
    assert chunk_bytes_for(topology(("a", 1000.0, 40.0), ("b", 100.0, 10.0), ("c", 1000.0, 5.0))) == 12_500_000
    # a slow, near link: the product is tiny, the floor holds
    assert chunk_bytes_for(topology(("a", 4.08, 15.0), ("b", 4.08, 15.0))) == MIN_CHUNK_BYTES
    assert chunk_bytes_for(None) == MIN_CHUNK_BYTES
    assert chunk_bytes_for(topology(("a", 1000.0, 40.0), ("b", 1000.0, 40.0)), minimum=2**30) == 2**30


def test_the_emulation_and_the_planner_share_one_link_model() -> None:
    from atoll.planner.wan import WAN_GOODPUT, link_from_mbps
    from atoll.sync.link_model import WanLink, allgather_latency, allgather_seconds

    sites = (("a", 2.0, 5.0), ("b", 8.0, 20.0), ("c", 4.0, 1.0))
    nominal = [WanLink.from_mbps(n, up_mbps=mbps, down_mbps=mbps, latency_ms=ms) for n, mbps, ms in sites]
    wan = WanModel(topology(*sites), mode="emulated")
    assert wan.extra_seconds(10**6, num_sites=3) == pytest.approx(allgather_seconds(10**6, nominal))
    assert WanModel(topology(*sites), mode="netns").extra_seconds(10**6, num_sites=3) == allgather_latency(nominal)
    # The planner uses the same function on links at the goodput TCP achieves.
    planned = [link_from_mbps(n, up_mbps=mbps, down_mbps=mbps, latency_ms=ms) for n, mbps, ms in sites]
    assert planned[0].up_bytes_per_s == pytest.approx(WAN_GOODPUT * nominal[0].up_bytes_per_s)
    assert allgather_latency(planned) == allgather_latency(nominal)


def test_a_failed_quorum_is_forgotten_so_the_next_exchange_asks_the_lighthouse_again() -> None:
    from concurrent.futures import Future

    from torchft.manager import Manager

    from atoll.sync.transport import forget_failed_quorum

    manager = object.__new__(Manager)  # torchft's own start_quorum, on a manager that never started
    failed: Future[None] = Future()
    failed.set_exception(RuntimeError('status: Cancelled, message: "Timeout expired"'))
    manager._quorum_future = failed
    with pytest.raises(RuntimeError, match="Timeout expired"):
        Manager.start_quorum(manager)  # torchft re-raises the old failure, on every later call too
    assert forget_failed_quorum(manager) and manager._quorum_future is None
    with pytest.raises(AttributeError):  # past the old failure, on to a new quorum this bare manager cannot start
        Manager.start_quorum(manager)
    done: Future[None] = Future()
    done.set_result(None)
    manager._quorum_future = done
    assert not forget_failed_quorum(manager) and manager._quorum_future is done
