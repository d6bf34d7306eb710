"""The cross-site transport: torchft for quorum and the managed process group, plus byte counts and the WAN model.

One `TorchftTransport` per rank. Local rank r of every site forms, through torchft, a process
group with rank r of the other sites (each site is one torchft replica group, and the site's
own TCPStore is its replica-group store). `exchange` all-gathers one envelope and one byte
payload per site (the engine seals and opens them, `atoll.sync.envelope`) and returns them all;
`transfer` sends one buffer point to point (a heal). Both count the bytes they hand to the
network, and add what the emulated WAN would cost (bandwidth and latency without root, latency
only when the kernel shapes bandwidth in the lab), as `atoll.sync.link_model` predicts it, the
model the planner uses too.

The all-gather is pipelined: the payload goes as chunks of `chunk_bytes`, all posted at once. One
all-gather of a whole 2-5 MB payload moved only 0.6-0.7 of a shaped link's rate in the lab
(likely because both directions fill their FIFO queues at once and each direction's
acknowledgements wait behind the other's data), chunks of 256 KiB 0.85-0.89, about as much as
gloo's ring all-reduce of the same bytes (docs/decisions.md). A chunk is never smaller than the
link's bandwidth-delay product, so a real long-haul link stays full.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import torch
from torch._C._distributed_c10d import AllgatherOptions

from atoll.config.topology import Topology
from atoll.errors import AtollError
from atoll.sync.link_model import WanLink, allgather_latency, allgather_seconds

log = logging.getLogger(__name__)

WAN_MODES = ("emulated", "netns", "none")
_LENGTH = struct.Struct("<Q")  # body length, in front of each envelope in the first all-gather
MIN_CHUNK_BYTES = 256 * 1024


@dataclass
class ByteCounter:
    """Bytes this rank handed to the WAN and took from it, and the time its exchanges took."""

    sent: int = 0
    received: int = 0
    exchanges: int = 0
    seconds: float = 0.0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, sent: int, received: int, seconds: float, exchanges: int = 1) -> None:
        with self._lock:
            self.sent += sent
            self.received += received
            self.exchanges += exchanges
            self.seconds += seconds

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {
                "wan_bytes_sent": self.sent,
                "wan_bytes_received": self.received,
                "wan_exchanges": self.exchanges,
                "wan_seconds": self.seconds,
                "wan_failed": self.failed,
            }


class WanModel:
    """What an exchange costs on the topology's links, beyond what this machine's network takes.

    `emulated`: the whole cost of the all-gather on the links at their nominal rates
    (`link_model.allgather_seconds`: S-1 payloads over the slowest link, plus S-1 latency hops).
    `netns`: the kernel's tbf already limits bandwidth, so only the latency is added. `none`: nothing.
    """

    def __init__(self, topology: Topology | None, *, mode: str) -> None:
        if mode not in WAN_MODES:
            raise AtollError(f"unknown WAN mode {mode!r}: use one of {', '.join(WAN_MODES)}")
        if mode != "none" and (topology is None or not topology.links):
            raise AtollError("the WAN model needs a topology with links (sites' uplink_mbps)")
        self.topology = topology
        self.mode = mode

    def extra_seconds(self, payload_bytes: int, *, num_sites: int) -> float:
        """Seconds an all-gather of `payload_bytes` per site should take on the modelled WAN."""
        if self.mode == "none" or num_sites < 2:
            return 0.0
        links = self._links(num_sites)
        if self.mode == "netns":
            return allgather_latency(links)
        return allgather_seconds(payload_bytes, links)

    def _links(self, num_sites: int) -> list[WanLink]:
        assert self.topology is not None
        links = []
        for site in self.topology.sites[:num_sites]:
            spec = self.topology.link(site.name)
            assert spec is not None  # the topology validates that links cover every site or none
            links.append(
                WanLink.from_mbps(
                    site.name, up_mbps=spec.uplink_mbps, down_mbps=spec.down_mbps, latency_ms=spec.latency_ms
                )
            )
        return links


@dataclass(frozen=True)
class SiteInfo:
    """Where this rank sits in the network."""

    name: str
    index: int
    num_sites: int
    local_rank: int
    local_world_size: int


def chunk_bytes_for(topology: Topology | None, *, minimum: int = MIN_CHUNK_BYTES) -> int:
    """Chunk size of the pipelined all-gather: the largest bandwidth-delay product of the
    topology's links (uplink rate x round trip between the two farthest sites), at least `minimum`."""
    if topology is None or not topology.links:
        return minimum
    links = [link for link in (topology.link(s.name) for s in topology.sites) if link is not None]
    if len(links) < 2:
        return minimum
    rtt = 2.0 * sum(sorted(link.latency_ms for link in links)[-2:]) / 1000.0
    bdp = max(link.uplink_mbps for link in links) * 1e6 / 8 * rtt
    return max(minimum, int(bdp))


class Gathered(NamedTuple):
    """One exchange as the engine reads it: every site's (envelope, body) in quorum order, and
    this rank's position in that order (its rank in the cross-site group)."""

    rank: int
    items: list[tuple[torch.Tensor, torch.Tensor]]


class TorchftTransport:
    """Quorum through a torchft Lighthouse, exchange through torchft's reconfigurable gloo group.

    Blocking. A failed exchange (a site lost mid-way, a timeout) is not raised: it is counted
    and `exchange` returns None, so the caller leaves its model unchanged for that round.
    """

    def __init__(
        self,
        site: SiteInfo,
        *,
        lighthouse_addr: str,
        store_addr: str,
        store_port: int,
        hostname: str,
        wan: WanModel,
        timeout_seconds: float,
        min_sites: int,
        chunk_bytes: int = MIN_CHUNK_BYTES,
    ) -> None:
        from torchft import Manager
        from torchft.process_group import ProcessGroupGloo

        self.site = site
        self.wan = wan
        self.counter = ByteCounter()
        if chunk_bytes < 1:
            raise AtollError(f"the all-gather chunk must be at least 1 byte (got {chunk_bytes})")
        self.chunk_bytes = chunk_bytes
        timeout = timedelta(seconds=timeout_seconds)
        self._pg = ProcessGroupGloo(timeout=timeout)
        self._manager = Manager(
            pg=self._pg,
            load_state_dict=None,
            state_dict=None,
            min_replica_size=min_sites,
            use_async_quorum=False,
            timeout=timeout,
            quorum_timeout=timeout,
            connect_timeout=timedelta(seconds=max(60.0, timeout_seconds / 10)),
            rank=site.local_rank,
            world_size=site.local_world_size,
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=lighthouse_addr,
            replica_id=site.name,
            hostname=hostname,
            init_sync=False,
        )

    def exchange(self, envelope: torch.Tensor, body: torch.Tensor) -> Gathered | None:
        """All-gather every site's `envelope` (uint8, the same size everywhere) and `body` (uint8,
        any length) through a fresh quorum. Blocking; returns None if the exchange failed.

        Two all-gathers: the envelopes with each body's length, then the bodies padded to the
        longest (skipped when every body is empty, e.g. the final agreement check). Counts the
        bytes it hands to the network, and waits what the modelled WAN adds.
        """
        t0 = time.perf_counter()
        head = torch.cat([torch.frombuffer(bytearray(_LENGTH.pack(body.numel())), dtype=torch.uint8), envelope])
        try:
            # atoll numbers rounds itself (the envelopes carry them): torchft's step stays 0 so that
            # every site in the quorum takes part, a restarted one included (it heals through atoll).
            self._manager.load_state_dict({"step": 0, "batches_committed": self._manager.batches_committed()})
            self._manager.start_quorum(allow_heal=False)
            n = self._manager.num_participants()
            rank = self._manager.participating_rank()
            heads = self._allgather(head, n)
            lengths = [_LENGTH.unpack(bytes(h[: _LENGTH.size].tolist()))[0] for h in heads]
            width = max(lengths)
            bodies = [torch.empty(0, dtype=torch.uint8)] * n
            if width > 0:
                padded = torch.zeros(width, dtype=torch.uint8)
                padded[: body.numel()] = body.reshape(-1).cpu()
                bodies = self._allgather(padded, n)
            committed = self._manager.should_commit()
        # torchft asserts when its process group was not (re)configured, e.g. a quorum that formed
        # while a peer was leaving: that too is a failed round, not a crash.
        except (RuntimeError, TimeoutError, ConnectionError, OSError, AssertionError) as exc:  # uncommitted
            self._manager.report_error(exc)
            forget_failed_quorum(self._manager)
            report_failed_commit(self._manager)
            log.warning("site %s: exchange failed (%s); this round is not applied", self.site.name, exc)
            self.counter.failed += 1
            return None
        if not committed or rank is None:
            self.counter.failed += 1
            return None
        wire = head.numel() + width
        self._wait_for_wan(wire, n, t0)
        self.counter.add(sent=wire * (n - 1), received=wire * (n - 1), seconds=time.perf_counter() - t0)
        return Gathered(rank, [(h[_LENGTH.size :], b) for h, b in zip(heads, bodies, strict=True)])

    def transfer(self, tensor: torch.Tensor, *, src: int, dst: list[int], rank: int) -> torch.Tensor | None:
        """Point to point inside the last exchange's group: rank `src` sends `tensor` (uint8) to
        each rank in `dst`; a receiver passes a buffer of the size it expects and gets it filled.
        Blocking; returns None if it failed (a receiver then keeps what it had)."""
        t0 = time.perf_counter()
        try:
            if rank == src:
                for d in dst:
                    self._pg.send([tensor], d, 0).wait()
            elif rank in dst:
                self._pg.recv([tensor], src, 0).wait()
        except (RuntimeError, TimeoutError, ConnectionError, OSError, AssertionError) as exc:
            self._manager.report_error(exc)
            report_failed_commit(self._manager)
            log.warning("site %s: heal transfer failed (%s)", self.site.name, exc)
            return None
        moved = tensor.numel() * (len(dst) if rank == src else 1)
        self._wait_for_wan(tensor.numel(), 2, t0)
        sent, received = (moved, 0) if rank == src else (0, moved)
        self.counter.add(sent=sent, received=received, seconds=time.perf_counter() - t0, exchanges=0)
        return tensor

    def _allgather(self, buf: torch.Tensor, n: int) -> list[torch.Tensor]:
        outputs = [torch.empty_like(buf) for _ in range(n)]
        step = self.chunk_bytes
        works = [
            self._pg.allgather([[o[lo : lo + step] for o in outputs]], [buf[lo : lo + step]], AllgatherOptions())
            for lo in range(0, buf.numel(), step)
        ]  # all posted before any is waited on: the chunks follow each other on the link
        for work in works:
            work.wait()
        return outputs

    def _wait_for_wan(self, num_bytes: int, num_sites: int, t0: float) -> None:
        extra = self.wan.extra_seconds(num_bytes, num_sites=num_sites)
        if self.wan.mode == "emulated":
            time.sleep(max(0.0, extra - (time.perf_counter() - t0)))
        elif extra > 0:
            time.sleep(extra)

    def close(self) -> None:
        self._manager.shutdown(wait=False)


def start_lighthouse(*, bind: str, min_sites: int, join_timeout_seconds: float = 30.0) -> object:
    """Start a torchft Lighthouse in this process; `.address()` gives its URL, `.shutdown()` stops it.

    A quorum waits up to `join_timeout_seconds` for every live site (one that heartbeats) to join;
    a site that stopped heartbeating for 10 s is left out at once. With `min_sites` below the
    number of sites, a short join timeout would let sites that reach an exchange a little apart
    each form a quorum alone and never meet.
    """
    from torchft._torchft import LighthouseServer

    return LighthouseServer(
        bind=bind,
        min_replicas=min_sites,
        join_timeout_ms=int(join_timeout_seconds * 1000),
        quorum_tick_ms=50,
        heartbeat_timeout_ms=10000,
    )


def forget_failed_quorum(manager: object) -> bool:
    """Drop a quorum that failed from a torchft `Manager`; True if there was one.

    torchft 0.2.0's `start_quorum` first waits on the previous quorum's future, and a future that
    failed re-raises its exception: one quorum call that timed out (a site's link cut longer than
    the timeout) would fail every later exchange of that site at once, for good, with the same
    error, also after the link is back (the chaos benchmark's `cut-west`). Without the failed
    future the next exchange asks the Lighthouse afresh.
    """
    future = getattr(manager, "_quorum_future", None)
    if future is None or not future.done() or future.exception() is None:
        return False
    manager._quorum_future = None  # type: ignore[attr-defined]
    return True


def report_failed_commit(manager: object) -> None:
    """Make a torchft `Manager`'s next quorum request say that its last exchange failed.

    torchft 0.2.0 records a new quorum's id *before* it configures the process group for it, and
    configures only when the id changes; the Lighthouse changes the id only when the members
    change or one of them reports commit failures. A configure that failed (a peer that came back
    from a cut link and timed out in the store's rendezvous) therefore left the group unconfigured
    for every later quorum of the same sites ("process group not initialized" to the end of the
    chaos benchmark's `cut-west`). torchft counts a failure only in `should_commit`, which a
    failed exchange never reaches; counting it here makes the Lighthouse issue a new id, and every
    member configures its group afresh, under a new store prefix. A committed exchange resets it.
    """
    manager._commit_failures = getattr(manager, "_commit_failures", 0) + 1  # type: ignore[attr-defined]
