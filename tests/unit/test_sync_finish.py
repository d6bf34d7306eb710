"""The last agreement waits for a site that dropped out (atoll.sync.finish): the two halves of a
partition meet again before the run ends, and a site that never returns costs one timeout."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from atoll.config.schema import SyncSection
from atoll.sync import finish
from atoll.sync.envelope import KIND_CHECK
from atoll.sync.transport import ByteCounter, Gathered
from tests.unit.test_sync_engine import make_sync, small_model

EMPTY = torch.empty(0, dtype=torch.uint8)


class Partition:
    """This site's transport in a partition: its checks gather only itself until `back_at` (the
    call at which the peer's envelope is there too, None: never)."""

    def __init__(self, peer_envelope: torch.Tensor | None, back_at: int | None) -> None:
        self.peer, self.back_at, self.calls = peer_envelope, back_at, 0
        self.counter = ByteCounter()

    def exchange(self, envelope: torch.Tensor, body: torch.Tensor) -> Gathered:
        self.calls += 1
        items = [(envelope, body)]
        if self.back_at is not None and self.calls >= self.back_at:
            assert self.peer is not None
            items.append((self.peer, EMPTY))
        return Gathered(0, items)

    def close(self) -> None:
        pass


def finishing_site(back_at: int | None, timeout: float) -> tuple[object, Partition]:
    cfg = SyncSection(strategy="diloco", inner_steps=2, min_sites=1, timeout_seconds=timeout)
    peer = make_sync(small_model(), hub=None, site=1, cfg=cfg, inner_steps=2)  # type: ignore[arg-type]
    peer_envelope = peer.sealer.seal(
        peer._header(peer.units[0], body=EMPTY, weight=0.0, step=4, kind=KIND_CHECK), EMPTY
    )
    sync = make_sync(small_model(), hub=None, site=0, cfg=cfg, inner_steps=2)  # type: ignore[arg-type]
    transport = Partition(peer_envelope, back_at)
    sync.transport = transport
    sync.membership.current = {"s0", "s1"}  # both took part in the last round before the cut
    return sync, transport


def test_a_finishing_site_waits_for_a_dropped_site_and_ends_when_it_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finish, "RETRY_SECONDS", 0.01)
    sync, transport = finishing_site(back_at=4, timeout=60.0)
    sync._check(sync.units[0], 4)  # type: ignore[attr-defined]
    assert transport.calls == 4  # alone three times, then the peer was back
    assert not sync.membership.dropped  # type: ignore[attr-defined]
    assert [e["event"] for e in sync.membership.events] == ["dropped", "rejoined"]  # type: ignore[attr-defined]


def test_a_site_that_never_returns_costs_one_timeout_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(finish, "RETRY_SECONDS", 0.05)
    sync, transport = finishing_site(back_at=None, timeout=0.5)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="atoll.sync.finish"):
        sync._check(sync.units[0], 4)  # type: ignore[attr-defined]
    assert 0.5 <= time.monotonic() - t0 < 5.0 and transport.calls > 2
    assert "waiting up to 0.5 s for s1" in caplog.text and "ends without ['s1']" in caplog.text


class Silent(Partition):
    """A transport whose every check times out (the run's other sites have finished)."""

    def exchange(self, envelope: torch.Tensor, body: torch.Tensor) -> Gathered | None:  # type: ignore[override]
        self.calls += 1
        return None


def test_a_final_check_that_fails_after_refusals_names_the_secret() -> None:
    from atoll.errors import AtollError, RunFailure

    sync, _ = finishing_site(back_at=None, timeout=1.0)
    sync.transport = Silent(None, None)  # type: ignore[attr-defined]
    with pytest.raises(RunFailure, match="could not confirm at the end"):
        sync._check(sync.units[0], 4)  # type: ignore[attr-defined]
    # A late joiner with the wrong secret: its one exchange with the run's sites refused both.
    sync.membership.secret.observe([True, False], own=0, site="s0")  # type: ignore[attr-defined]
    with pytest.raises(AtollError, match="join secret is not the run's") as info:
        sync._check(sync.units[0], 4)  # type: ignore[attr-defined]
    assert not isinstance(info.value, RunFailure)
