"""A discrete-event simulator that plays a plan over time, step by step and byte by byte.

Sites compute inner steps (with jitter and stragglers), meet at exchanges, and move bytes over
their WAN links; a link carrying several transfers at once splits its bandwidth equally between
them (processor sharing), so overlapping fragment exchanges and a healing site's download slow
each other down. Every strategy is one rule: an exchange *triggers* when every participating
site has finished step t, and a site may not start the step after its *deadline* step until the
exchange is complete:

    ddp        trigger every step, deadline the same step
    diloco     trigger every H steps, deadline the same step
    delayed    trigger every H steps, deadline H steps later (one-round delay)
    streaming  fragment f triggers every H steps at offset f·H/F, deadline tau steps later

Failures: in ddp every site stops, waits for the recovery and redoes the steps since the last
checkpoint. In the other strategies the failed site drops out of the quorum, restarts after the
recovery time, downloads the training state from a peer (sharing links with the exchanges),
and rejoins at the next round; the tokens of its unfinished round are lost.

With no jitter and no failures it reproduces the analytic model (`atoll.planner.wan`); a test
holds it to that.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Literal

from atoll.planner.wan import Strategy
from atoll.sync.link_model import WanLink

Kind = Literal["compute", "wait", "exchange", "down", "heal"]


@dataclass(frozen=True)
class SimSite:
    name: str
    step_s: float
    tokens_per_step: int
    devices: int
    link: WanLink | None = None
    failure_rate_per_s: float = 0.0


@dataclass(frozen=True)
class SimSync:
    strategy: Strategy
    inner_steps: int
    payload_bytes: float
    """Bytes each site sends per full exchange (all fragments together)."""
    latency_s: float = 0.0
    """Latency added to every exchange after its last byte (ring hops)."""
    fragments: int = 1
    overlap_steps: int = 0


@dataclass(frozen=True)
class Disturbances:
    jitter: float = 0.0
    """Coefficient of variation of a step's time (normal, clipped to at least half the mean)."""
    straggler_prob: float = 0.0
    """Probability that a step is a straggler, taking `straggler_factor` times as long."""
    straggler_factor: float = 3.0
    failures: bool = False
    """Draw failures from each site's failure rate (exponential inter-arrival times)."""
    fail_at: tuple[tuple[str, float], ...] = ()
    """Deterministic failures: (site, time in seconds)."""
    recovery_s: float = 600.0
    checkpoint_steps: int = 100
    """ddp: steps between checkpoints (a failure redoes the steps since the last one)."""
    heal_bytes: float = 0.0
    """Bytes a returning site downloads from a peer (0: no healing transfer)."""
    seed: int = 0


@dataclass(frozen=True)
class Segment:
    lane: str
    kind: Kind
    start: float
    end: float


@dataclass
class SimResult:
    wall_s: float
    steps: int
    tokens: float
    """Tokens whose work was kept (lost rounds and redone steps excluded)."""
    busy_s: dict[str, float]
    segments: list[Segment] = field(default_factory=list)
    failures: int = 0

    def utilization(self, sites: list[SimSite]) -> float:
        """Device-weighted fraction of the wall time spent computing kept work."""
        total = sum(s.devices for s in sites) * self.wall_s
        return sum(self.busy_s[s.name] * s.devices for s in sites) / total if total else 0.0


@dataclass
class _Exchange:
    trigger: int
    deadline: int
    fraction: float
    participants: set[str]
    arrived: set[str] = field(default_factory=set)
    started: bool = False
    done: bool = False
    pending_flows: int = 0
    start_time: float = 0.0


@dataclass
class _Flow:
    remaining: float
    links: tuple[tuple[str, str], ...]
    """(site, 'up' | 'down') resources it crosses."""
    owner: object
    lane: str
    start: float
    rate: float = 0.0


@dataclass
class _SiteState:
    step: int = 0
    state: str = "idle"
    since: float = 0.0
    epoch: int = 0
    alive: bool = True
    last_commit_step: int = 0
    waiting_on: int | None = None
    rejoin_at: int | None = None


class Simulator:
    """One simulation run. Use `simulate(...)`; the class keeps the event loop's state."""

    def __init__(self, sites: list[SimSite], sync: SimSync, *, num_steps: int, disturbances: Disturbances) -> None:
        self.sites = {s.name: s for s in sites}
        self.order = [s.name for s in sites]
        self.sync = sync
        self.num_steps = num_steps
        self.dist = disturbances
        self.rng = random.Random(disturbances.seed)
        self.now = 0.0
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.state = {n: _SiteState() for n in self.order}
        self.exchanges: dict[int, list[_Exchange]] = {}
        self.flows: list[_Flow] = []
        self.flow_version = 0
        self.last_flow_update = 0.0
        self.segments: list[Segment] = []
        self.busy = {n: 0.0 for n in self.order}
        self.tokens = 0.0
        self.failures = 0

    # ------------------------------------------------------------ schedule

    def _push(self, t: float, kind: str, data: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def _triggers(self) -> list[tuple[int, int, float]]:
        """(trigger step, deadline step, payload fraction) of every exchange up to num_steps."""
        sync, n = self.sync, self.num_steps
        if len(self.order) == 1:
            return []
        # A run ends with every exchange applied (the sites finish with identical weights), so
        # no deadline lies past the last step; streaming also sends, at the end, each fragment
        # whose last exchange came before it (as atoll's CrossSiteSync.finish does).
        h = sync.inner_steps
        if sync.strategy == "ddp":
            return [(t, t, 1.0) for t in range(1, n + 1)]
        if sync.strategy == "diloco":
            return [(t, t, 1.0) for t in range(h, n + 1, h)]
        if sync.strategy == "delayed":
            return [(t, min(t + h, n), 1.0) for t in range(h, n + 1, h)]
        f = sync.fragments
        spacing = h / f
        out = []
        last: dict[int, int] = {}
        j = 1
        while True:
            t = math.ceil(j * spacing - 1e-9)
            if t > n:
                break
            out.append((t, min(t + sync.overlap_steps, n), 1.0 / f))
            last[j % f] = t
            j += 1
        out += [(n, n, 1.0 / f) for frag in range(f) if last.get(frag) != n]
        return out

    # ------------------------------------------------------------ sites

    def _step_time(self, name: str) -> float:
        base = self.sites[name].step_s
        t = base
        if self.dist.jitter > 0:
            t = max(0.5 * base, self.rng.gauss(base, self.dist.jitter * base))
        if self.dist.straggler_prob > 0 and self.rng.random() < self.dist.straggler_prob:
            t *= self.dist.straggler_factor
        return t

    def _segment(self, lane: str, kind: Kind, start: float, end: float) -> None:
        if end > start:
            self.segments.append(Segment(lane, kind, start, end))

    def _start_step(self, name: str) -> None:
        st = self.state[name]
        if st.step >= self.num_steps:
            st.state = "finished"
            return
        st.state = "compute"
        st.since = self.now
        self._push(self.now + self._step_time(name), "step_end", (name, st.epoch))

    def _on_step_end(self, name: str) -> None:
        st = self.state[name]
        self._segment(name, "compute", st.since, self.now)
        self.busy[name] += self.now - st.since
        st.step += 1
        self.tokens += self.sites[name].tokens_per_step
        for ex in self.exchanges.get(st.step, []):
            if name in ex.participants:
                ex.arrived.add(name)
                self._maybe_start(ex)
        self._continue(name)

    def _continue(self, name: str) -> None:
        """Start the next step unless an exchange whose deadline is this step is still running."""
        st = self.state[name]
        for exs in self.exchanges.values():
            for ex in exs:
                if ex.deadline == st.step and name in ex.participants and not ex.done:
                    st.state = "wait"
                    st.since = self.now
                    st.waiting_on = id(ex)
                    return
        if st.rejoin_at is not None:
            return
        if st.step >= self.num_steps:
            st.state = "finished"
            return
        self._start_step(name)

    # ------------------------------------------------------------ exchanges and flows

    def _maybe_start(self, ex: _Exchange) -> None:
        if ex.started or not ex.participants <= ex.arrived:
            return
        ex.started = True
        ex.start_time = self.now
        names = [n for n in self.order if n in ex.participants]
        if len(names) < 2:
            self._finish_exchange(ex)
            return
        volume = self.sync.payload_bytes * ex.fraction
        self._advance_flows()
        for i, n in enumerate(names):
            nxt = names[(i + 1) % len(names)]
            self.flows.append(_Flow(volume, ((n, "up"), (nxt, "down")), ex, f"{n} WAN", self.now))
        ex.pending_flows = len(names)
        self._reschedule_flows()

    def _capacity(self, site: str, direction: str) -> float:
        link = self.sites[site].link
        if link is None:
            return math.inf
        return link.up_bytes_per_s if direction == "up" else link.down_bytes_per_s

    def _advance_flows(self) -> None:
        dt = self.now - self.last_flow_update
        if dt > 0:
            for fl in self.flows:
                fl.remaining = max(0.0, fl.remaining - fl.rate * dt)
        self.last_flow_update = self.now

    def _reschedule_flows(self) -> None:
        users: dict[tuple[str, str], int] = {}
        for fl in self.flows:
            for res in fl.links:
                users[res] = users.get(res, 0) + 1
        for fl in self.flows:
            fl.rate = min(self._capacity(*res) / users[res] for res in fl.links)
        self.flow_version += 1
        if self.flows:
            t = min(self.now + (fl.remaining / fl.rate if fl.rate > 0 else math.inf) for fl in self.flows)
            self._push(t, "flows", self.flow_version)

    def _on_flows(self, version: int) -> None:
        if version != self.flow_version:
            return
        self._advance_flows()
        finished = [fl for fl in self.flows if fl.remaining <= 1e-6 * max(1.0, self.sync.payload_bytes)]
        self.flows = [fl for fl in self.flows if fl not in finished]
        for fl in finished:
            self._segment(fl.lane, "exchange" if isinstance(fl.owner, _Exchange) else "heal", fl.start, self.now)
            if isinstance(fl.owner, _Exchange):
                fl.owner.pending_flows -= 1
                if fl.owner.pending_flows == 0:
                    self._push(self.now + self.sync.latency_s, "exchange_done", fl.owner)
            else:
                self._push(self.now, "heal_done", fl.owner)
        self._reschedule_flows()

    def _finish_exchange(self, ex: _Exchange) -> None:
        ex.done = True
        for n in self.order:
            st = self.state[n]
            if st.state == "wait" and st.waiting_on == id(ex):
                self._segment(n, "wait", st.since, self.now)
                st.waiting_on = None
                self._continue(n)
            if n in ex.participants:
                st.last_commit_step = max(st.last_commit_step, ex.trigger)
        for n in self.order:
            st = self.state[n]
            if st.rejoin_at is not None and st.rejoin_at == ex.trigger:
                self._segment(n, "wait", st.since, self.now)
                st.rejoin_at = None
                st.step = ex.trigger
                st.last_commit_step = ex.trigger
                self._add_participant(n, after=ex.trigger)
                self._start_step(n)

    # ------------------------------------------------------------ failures

    def _on_fail(self, name: str) -> None:
        st = self.state[name]
        if not st.alive:
            return
        self.failures += 1
        if self.sync.strategy == "ddp" or len(self.order) == 1:
            self._fail_everyone()
            return
        if st.state == "compute":
            self._segment(name, "compute", st.since, self.now)
        elif st.state == "wait":
            self._segment(name, "wait", st.since, self.now)
        # Work since its last committed exchange is lost.
        lost = st.step - st.last_commit_step
        self.tokens -= lost * self.sites[name].tokens_per_step
        st.alive = False
        st.epoch += 1
        st.state = "down"
        st.since = self.now
        for exs in self.exchanges.values():
            for ex in exs:
                if not ex.started and name in ex.participants:
                    ex.participants.discard(name)
                    ex.arrived.discard(name)
                    self._maybe_start(ex)
        self._push(self.now + self.dist.recovery_s, "recovered", name)

    def _fail_everyone(self) -> None:
        # The last checkpoint: a multiple of checkpoint_steps whose sync has completed everywhere.
        ckpt = self.dist.checkpoint_steps
        committed = min(
            self.state[n].last_commit_step if len(self.order) > 1 else self.state[n].step for n in self.order
        )
        back_to = (committed // ckpt) * ckpt if ckpt else 0
        for n in self.order:
            st = self.state[n]
            if st.state in ("compute", "wait"):
                self._segment(n, st.state, st.since, self.now)  # type: ignore[arg-type]
            self.tokens -= (st.step - back_to) * self.sites[n].tokens_per_step
            st.step = back_to
            st.last_commit_step = back_to
            st.epoch += 1
            st.state = "down"
            st.since = self.now
            st.waiting_on = None
        self.flows = []
        self.flow_version += 1
        self.exchanges = {}
        for trig, dead, frac in self._triggers():
            if trig > back_to:
                self.exchanges.setdefault(trig, []).append(_Exchange(trig, dead, frac, set(self.order)))
        self._push(self.now + self.dist.recovery_s, "resume_all", None)

    def _on_resume_all(self) -> None:
        for n in self.order:
            self._segment(n, "down", self.state[n].since, self.now)
            self._start_step(n)

    def _on_recovered(self, name: str) -> None:
        st = self.state[name]
        self._segment(name, "down", st.since, self.now)
        st.since = self.now
        peers = [n for n in self.order if self.state[n].alive and n != name]
        if self.dist.heal_bytes > 0 and peers:
            st.state = "heal"
            self._advance_flows()
            self.flows.append(
                _Flow(self.dist.heal_bytes, ((peers[0], "up"), (name, "down")), name, f"{name} WAN", self.now)
            )
            self._reschedule_flows()
        else:
            self._push(self.now, "heal_done", name)

    def _on_heal_done(self, name: str) -> None:
        st = self.state[name]
        if st.state == "heal":
            self._segment(name, "heal", st.since, self.now)
        st.alive = True
        st.state = "wait"
        st.since = self.now
        # Rejoin after the next exchange that has not started: it brings the newest global state.
        upcoming = sorted(t for t, exs in self.exchanges.items() for ex in exs if not ex.started)
        if not upcoming:
            st.state = "finished"
            return
        st.rejoin_at = upcoming[0]

    def _add_participant(self, name: str, *, after: int) -> None:
        for t, exs in self.exchanges.items():
            if t > after:
                for ex in exs:
                    if not ex.started:
                        ex.participants.add(name)

    # ------------------------------------------------------------ run

    def run(self) -> SimResult:
        for trig, dead, frac in self._triggers():
            self.exchanges.setdefault(trig, []).append(_Exchange(trig, dead, frac, set(self.order)))
        for n in self.order:
            self._start_step(n)
        horizon_guess = self.num_steps * max(s.step_s for s in self.sites.values()) * 100 + 1e6
        for name, t in self.dist.fail_at:
            self._push(t, "fail", name)
        if self.dist.failures:
            for n in self.order:
                rate = self.sites[n].failure_rate_per_s
                t = 0.0
                while rate > 0:
                    t += self.rng.expovariate(rate)
                    if t > horizon_guess:
                        break
                    self._push(t, "fail", n)
        while self.events:
            t, _, kind, data = heapq.heappop(self.events)
            if self._all_done():
                break
            self.now = t
            if kind == "step_end":
                name, epoch = data  # type: ignore[misc]
                if epoch == self.state[name].epoch:
                    self._on_step_end(name)
            elif kind == "flows":
                self._on_flows(data)  # type: ignore[arg-type]
            elif kind == "exchange_done":
                self._finish_exchange(data)  # type: ignore[arg-type]
            elif kind == "fail":
                self._on_fail(data)  # type: ignore[arg-type]
            elif kind == "recovered":
                self._on_recovered(data)  # type: ignore[arg-type]
            elif kind == "heal_done":
                self._on_heal_done(data)  # type: ignore[arg-type]
            elif kind == "resume_all":
                self._on_resume_all()
        return SimResult(
            wall_s=self.now,
            steps=min(s.step for s in self.state.values() if s.alive)
            if any(s.alive for s in self.state.values())
            else 0,
            tokens=self.tokens,
            busy_s=self.busy,
            segments=self.segments,
            failures=self.failures,
        )

    def _all_done(self) -> bool:
        return all(s.state == "finished" for s in self.state.values())


def simulate(
    sites: list[SimSite], sync: SimSync, *, num_steps: int, disturbances: Disturbances = Disturbances()
) -> SimResult:
    """Play `num_steps` inner steps of a plan; returns wall time, kept tokens and a timeline.

    Deterministic for a given `disturbances.seed`. Pure Python; a few rounds take milliseconds.
    """
    return Simulator(sites, sync, num_steps=num_steps, disturbances=disturbances).run()
