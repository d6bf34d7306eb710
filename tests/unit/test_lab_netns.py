"""The netns lab's pure parts: site layout from a topology, tbf parameters, argument checks."""

from __future__ import annotations

import pytest

from atoll.config.topology import LinkSpec, SiteSpec, Topology
from atoll.errors import AtollError
from atoll.lab.netns import IFACE_PREFIX, Lab, SiteLink, _rid_of_interface, _rid_of_namespace, _tbf_args, site_links


def test_site_links_follow_the_topology() -> None:
    # model_construct: the device catalog is not needed for the network part.
    topo = Topology.model_construct(
        name="t",
        sites=[SiteSpec.model_construct(name="bj", devices=[]), SiteSpec.model_construct(name="sh", devices=[])],
        links=[
            LinkSpec(site="sh", uplink_mbps=40, downlink_mbps=20, latency_ms=15),
            LinkSpec(site="bj", uplink_mbps=100),
        ],
    )
    assert site_links(topo) == [SiteLink("bj", 100, 100, 0.0), SiteLink("sh", 40, 20, 15)]


def test_tbf_args_scale_burst_and_queue_with_the_rate() -> None:
    slow, fast = _tbf_args(4), _tbf_args(1000)
    assert slow[:3] == ["tbf", "rate", "4000000bit"] and fast[2] == "1000000000bit"
    burst = lambda args: int(args[args.index("burst") + 1])  # noqa: E731
    limit = lambda args: int(args[args.index("limit") + 1])  # noqa: E731
    assert burst(slow) == 32 * 1024 and burst(fast) == 1_250_000  # 10 ms of traffic, at least 32 KiB
    assert limit(slow) >= 2 * burst(slow) and limit(fast) == 12_500_000  # ~100 ms queue


def test_names_carry_the_run_id_and_fit_ifnamsiz() -> None:
    assert _rid_of_namespace("atoll-ab12c-site-beijing") == "ab12c"
    assert _rid_of_interface(f"{IFACE_PREFIX}ab12cw252") == "ab12c"
    assert len(f"{IFACE_PREFIX}ab12cs252") <= 15


@pytest.mark.parametrize(
    ("links", "run_id", "match"),
    [
        ([], "abcde", "no sites"),
        ([SiteLink("a", 1, 1), SiteLink("a", 1, 1)], "abcde", "unique"),
        ([SiteLink("a", 1, 1)], "ABC", "run_id"),
        ([SiteLink(f"s{i}", 1, 1) for i in range(254)], "abcde", "at most 253"),
    ],
)
def test_lab_rejects_bad_input_before_building(links: list[SiteLink], run_id: str, match: str) -> None:
    with pytest.raises(AtollError, match=match):
        Lab(links, run_id=run_id)


def test_lab_available_says_why_not_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from atoll.lab import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.lab_available() == (False, "needs root (network namespaces and tc); running as uid 1000")


def test_lab_available_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from atoll.lab import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else f"/usr/sbin/{tool}")
    ok, reason = netns.lab_available()
    assert not ok and "tc not found" in reason and "iproute2" in reason


def test_lab_check_prints_the_fallback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from atoll.lab import commands, netns

    monkeypatch.setattr(netns, "lab_available", lambda: (False, "needs root"))
    assert commands._cmd_check(argparse.Namespace(), []) == 1
    out = capsys.readouterr().out
    assert "not available: needs root" in out and "emulation" in out
    with pytest.raises(AtollError, match="no arguments"):
        commands._cmd_clean(argparse.Namespace(all=False), ["x"])
