"""Outer synchronization across sites: DiLoCo and its streaming and delayed variants, and cross-site DDP.

Called by the trainer on every rank of every site. The model's parameters are cut into
*exchange units* (the whole model for `diloco` and `delayed`, layer fragments for `streaming`).
Inside a unit each *piece* (a whole parameter, or a block of one that a rank holds) is exchanged
by one *lane* (local rank g, talking to lane g of the other sites; `atoll.sync.lanes`), whatever
the site's layout (`atoll.sync.placement`: DDP replicas, FSDP2 or TP shards, pipeline stages):
no byte crosses the WAN twice, and every codec sees real tensors (low-rank needs matrices).

A unit is sent at the end of each round (`streaming`: every H inner steps, at its offset inside
the round; `diloco` and `delayed`: when the site's pacer says so, `atoll.sync.pacing`: after H
steps, a wall-clock budget, or the steps a measured balance gives the site) and applied `delay`
steps (`delayed`: one round)
later, the exchange running in a background thread meanwhile (`diloco`: 0; `delayed`: one
round; `streaming`: tau steps). With global parameters θ (identical everywhere), the anchor a
(the local parameters when the unit was last sent) and the local parameters x:

    send:   Δ = a − x,  a ← x                          (encoded with error feedback)
    apply:  Δ̄ = Σ w_s Δ_s / Σ w_s  (w: tokens since the site's last send)
            θ ← OuterSGD(θ, grad=Δ̄);  x ← θ + (x − a);  a ← θ

With delay 0 this is DiLoCo (x ← θ); with a delay, the local progress made while the exchange
was in flight is kept on top of the new θ. `finish` flushes what is in flight and, for units
whose last send was before the end, runs one more blocking exchange, then compares θ's digest
across sites (a header-only exchange; a site that dropped out is waited for, `atoll.sync.finish`),
so every site ends with the same parameters, or fails.

Every payload travels in an authenticated envelope (`atoll.sync.envelope`) carrying the sender's
round and the SHA-256 of its θ; a contribution whose tag does not check is refused (logged with
the address it claims). From the envelopes every site reaches the same plan (`atoll.sync.agreement`):
only the sites holding the run's θ are averaged; a site behind or in the minority heals from one
of them (`atoll.sync.heal`) in the same exchange and joins the next round. A failed exchange
rolls back all it touched (anchor, token count, codec residuals), so no update counts twice.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from atoll.config.schema import SyncSection
from atoll.errors import AtollError
from atoll.sync.agreement import Membership, Plan, plan_exchange
from atoll.sync.codecs import Codec, Encoded, ErrorFeedback, codec_from_config, pack_payload, unpack_payload
from atoll.sync.digest import theta_digest
from atoll.sync.envelope import FLAG_MOMENTUM, KIND_UPDATE, Header, Refused, Sealer
from atoll.sync.finish import final_check
from atoll.sync.fragments import StreamingSchedule, count_layers, split_fragments
from atoll.sync.heal import MOMENTUM_DTYPE, run_heal
from atoll.sync.lanes import LanePlan, Lanes, broadcast_state
from atoll.sync.outer import OuterOptimizer, weighted_average
from atoll.sync.pacing import Pacer
from atoll.sync.placement import SiteView, local_tensor
from atoll.sync.rounds import ExchangeListener, Opened, Pending, Transport, Unit, ignore_exchange
from atoll.sync.state import final_sync_metrics, load_sync_state, sync_metrics, sync_state
from atoll.sync.tensors import unwrap
from atoll.sync.transport import Gathered

log = logging.getLogger(__name__)

_NO_DIGEST = bytes(32)
_NEXT_ROUND = 2**62  # a paced delayed round lands when the next round ends, whatever its step


class CrossSiteSync:
    """The cross-site half of a training step; one per rank. Not thread-safe (main thread only)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: SyncSection,
        *,
        transport: Transport,
        site_name: str,
        local_rank: int,
        local_world_size: int,
        inner_steps: int,
        secret: bytes,
        address: str = "127.0.0.1",
        pacer: Pacer | None = None,
        lanes: LanePlan | None = None,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.site_name = site_name
        self.address = address
        self.sealer = Sealer(secret)
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self.H = inner_steps
        self.params: dict[str, nn.Parameter] = dict(unwrap(model).named_parameters())  # what this rank holds
        plan = lanes or LanePlan()
        self.view = SiteView.gather(list(self.params.items()), num_ranks=local_world_size)
        self.lanes = Lanes(self.view, mode=plan.mode, num_lanes=plan.num_lanes or local_world_size, rank=local_rank)
        self.idle_ranks = self.lanes.num_lanes < local_world_size  # ranks past the lanes exchange nothing
        names = self.view.names
        if cfg.strategy == "streaming":
            frags = split_fragments(names, num_fragments=min(cfg.fragments, count_layers(names)))
            offsets = StreamingSchedule(len(frags), self.H).offsets
            self.units = [Unit(f"fragment{i}", f, offset=offsets[i], index=i) for i, f in enumerate(frags)]
            self.delay = cfg.overlap_steps
        else:
            self.units = [Unit("model", names, offset=0)]
            self.delay = self.H if cfg.strategy == "delayed" else 0
        # Streaming's fragments keep their step schedule; diloco and delayed end rounds by the pacer.
        self.pacer = pacer if pacer is not None else Pacer("fixed", site_name, inner_steps, rounds=0)
        if cfg.strategy == "streaming" and self.pacer.paced:
            raise AtollError("streaming rounds follow inner_steps: a paced round needs diloco or delayed")
        self.last_sent: dict[str, int] = {}
        self._step_end = time.perf_counter()
        nesterov = cfg.nesterov and cfg.outer_momentum > 0
        for unit in self.units:
            unit.keys = self.lanes.keys(unit.params)
            unit.owned = self.lanes.owned(unit.params)
        initial = self._read([k for u in self.units for k in u.keys])
        for unit in self.units:
            if unit.owned:
                unit.outer = OuterOptimizer(
                    [initial[k] for k in unit.owned],
                    lr=cfg.outer_lr,
                    momentum=cfg.outer_momentum,
                    nesterov=nesterov,
                )
        self.anchor = {k: initial[k] for u in self.units for k in u.owned}
        codec = codec_from_config(cfg)
        self.codec: Codec | ErrorFeedback = ErrorFeedback(codec) if cfg.error_feedback else codec
        self.tokens_since = {u.name: 0 for u in self.units}
        self.pending: deque[Pending] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"atoll-wan-{site_name}")
        self.wait_seconds = 0.0
        # refused: contributions whose authentication failed (counted in rejected too); heals: times this
        # rank took θ from a peer; disagreements: exchanges where a site at the run's round held another θ
        self.rejected = self.refused = self.heals = self.heals_served = self.heal_bytes = self.disagreements = 0
        self.heal_seconds = 0.0
        self.listener: ExchangeListener = ignore_exchange  # the loop's: exchange states into the metrics
        self.membership = Membership()
        self.rounds_applied = 0
        self.applied_log: list[tuple[int, int]] = []  # (step applied, step sent), for tests and reports
        self._staged: dict[str, torch.Tensor] = {}  # new values of owned pieces, before the site gets them
        self._pace = 0  # the pace code of this round's envelopes (taken on every rank: it is collective)
        self._observed: list[tuple[str, int]] | None = None  # the sites' paces of the exchange being applied
        self._jump: int | None = None  # a heal brought θ from sites further on: the step they are at

    # ------------------------------------------------------------------ schedule

    def due(self, unit: Unit, step: int) -> bool:
        return step > 0 and (step - unit.offset) % self.H == 0 and step >= max(unit.offset, 1)

    def after_step(self, step: int, *, tokens: int, seconds: float | None = None) -> None:
        """Call after inner optimizer step `step` (1-based) with the tokens the site used in it and
        the seconds it took (default: the time since the previous call returned). Collective over
        the site when the pacer measures."""
        if self.cfg.strategy == "ddp":
            return
        now = time.perf_counter()
        for unit in self.units:
            self.tokens_since[unit.name] += tokens
        while self.pending and self.pending[0].apply_at <= step:
            self._apply(self.pending.popleft(), step)
        if self.cfg.strategy == "streaming":
            over = [u for u in self.units if self.due(u, step)]
        else:
            self.pacer.step_done(seconds if seconds is not None else now - self._step_end)
            over = self.units if self.pacer.round_over() else []
        for unit in over:
            if unit.final:
                continue
            while self.delay and self.pending:  # delayed: the previous round lands before this one leaves
                self._apply(self.pending.popleft(), step)
            self._send(unit, step)
            if self.delay == 0:
                self._apply(self.pending.pop(), step)
        self._step_end = time.perf_counter()

    def take_jump(self) -> int | None:
        """The step the site's peers are at, once, after this site healed forward from them (a
        restart from an old checkpoint, or a site away for rounds); None otherwise. The loop moves
        its step there, so the site runs the run's remaining steps with the others instead of
        the rounds it missed, alone, at the end. Steps-bound runs only (a paced run ends on rounds)."""
        jump, self._jump = self._jump, None
        return jump

    @property
    def paced(self) -> bool:
        """Whether rounds end by measurement: the loop then ends the run on rounds, not steps."""
        return self.pacer.paced

    def run_over(self) -> bool:
        """A paced run: every round has been sent."""
        return self.pacer.paced and self.pacer.run_over()

    def schedule_step(self, step: int) -> float:
        """The step the learning-rate schedule sees: `step`, or for a paced run its place on the
        nominal axis of rounds x H (`Pacer.schedule_step`)."""
        return self.pacer.schedule_step() if self.pacer.paced else float(step)

    def finish(self, step: int) -> None:
        """Flush exchanges in flight, make every site's parameters identical, and check that they
        are (θ's digest, through the quorum). Collective. Raises `AtollError` when the sites'
        agreement cannot be confirmed."""
        if self.cfg.strategy != "ddp":
            while self.pending:
                self._apply(self.pending.popleft(), step)
            for unit in self.units:
                if self.last_sent.get(unit.name) != step and not unit.final:
                    self._send(unit, step)
                    self._apply(self.pending.pop(), step)
            for unit in self.units:
                if not unit.final and self.lanes.is_lane:
                    self._check(unit, step)
                self._stage_theta(unit)  # a site that learned the end from a peer drops its later steps
                self._write(unit)
        self._executor.shutdown(wait=True)

    @property
    def lockstep(self) -> bool:
        """Cross-site ddp: every site applies the same averaged gradient at every step."""
        return self.cfg.strategy == "ddp"

    @torch.no_grad()
    def reset_to_global(self) -> bool:
        """A diverged site takes θ, the parameters the sites last agreed on (the loop's rollback
        with peers); exchanges in flight then carry only the progress made from θ. Collective
        over the site; False for `ddp`, which keeps no θ."""
        if self.cfg.strategy == "ddp":
            return False
        for unit in self.units:
            self._stage_theta(unit)
            for pending in (p for p in self.pending if p.unit is unit):
                pending.sent.update({n: self.anchor[n].clone() for n in unit.owned})
            self._write(unit)
        return True

    # ------------------------------------------------------------------ exchange

    def _encode(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> list[Encoded]:
        return [self.codec.encode(tensors[n], key=n) for n in unit.owned]

    def _header(self, unit: Unit, *, body: torch.Tensor, weight: float, step: int, kind: int = KIND_UPDATE) -> Header:
        outer = unit.outer
        has_momentum = outer is not None and outer.momentum() is not None
        return Header(
            site=self.site_name,
            address=self.address,
            unit=unit.index,
            round=unit.round,
            weight=weight,
            body_bytes=body.numel(),
            digest=theta_digest(outer.params if outer is not None else []),
            kind=kind,
            flags=FLAG_MOMENTUM if has_momentum else 0,
            pace=self._pace,
            step=step,
        )

    def _send(self, unit: Unit, step: int) -> None:
        current = self._read(unit.keys)  # this rank's pieces, assembled from their holders (collective)
        self._pace = self.pacer.pace()  # collective over the site when the pacer measures
        if not self.lanes.is_lane:  # an idle rank only lends its blocks to the lanes
            self.last_sent[unit.name] = step
            if unit.index == 0 and self.cfg.strategy != "streaming":
                self.pacer.round_sent()
            apply_at = step + self.delay if not self.pacer.paced else _NEXT_ROUND
            self.pending.append(Pending(unit, apply_at, {}, {}, [], sent_step=step, done=True))
            return
        delta = {n: self.anchor[n] - current[n] for n in unit.owned}
        codec_state = self.codec.snapshot(unit.owned) if isinstance(self.codec, ErrorFeedback) else None
        encoded = self._encode(unit, delta)
        payload = pack_payload(encoded) if encoded else torch.empty(0, dtype=torch.uint8)
        weight = float(self.tokens_since[unit.name])
        envelope = self.sealer.seal(self._header(unit, body=payload, weight=weight, step=step), payload)
        previous = {n: self.anchor[n] for n in unit.owned}
        for n in unit.owned:
            self.anchor[n] = current[n]
        self.tokens_since[unit.name] = 0
        if unit.index == 0 and self.cfg.strategy != "streaming":
            self.pacer.round_sent()
        self.last_sent[unit.name] = step
        pending = Pending(
            unit,
            apply_at=step + self.delay if not self.pacer.paced else _NEXT_ROUND,
            sent=current,
            previous_anchor=previous,
            like=encoded,
            sent_step=step,
            weight=weight,
            codec_state=codec_state,
        )
        if self.delay == 0:
            self.listener("sending", step, unit.round + 1, unit.name)
            t0 = time.perf_counter()
            pending.result = self.transport.exchange(envelope, payload)
            pending.done = True
            self.wait_seconds += time.perf_counter() - t0
        else:
            self.listener("sending", step, unit.round + 1, unit.name)
            pending.future = self._executor.submit(self.transport.exchange, envelope, payload)
        self.pending.append(pending)

    def _roll_back(self, pending: Pending) -> None:
        """Nothing of this round was shared: keep the local progress and restore the anchor, the
        token count and the codec's residuals, so that the next exchange carries it, once."""
        self.listener("failed", pending.sent_step, pending.unit.round + 1, pending.unit.name)
        for n in pending.unit.owned:
            self.anchor[n] = pending.previous_anchor[n]
        self.tokens_since[pending.unit.name] += int(pending.weight)
        if pending.codec_state is not None and isinstance(self.codec, ErrorFeedback):
            self.codec.restore(pending.codec_state)

    def _open(self, gathered: Gathered) -> list[Opened]:
        """Every site's contribution, or None for those whose envelope does not authenticate."""
        out: list[Opened] = []
        claims: list[str | None] = []
        for i, (envelope, body) in enumerate(gathered.items):
            try:
                out.append(self.sealer.open(envelope, body))
                claims.append(None)
            except Refused as exc:
                log.warning("site %s: quorum member %d: %s", self.site_name, i, exc)
                out.append(None)
                claims.append(exc.claimed_site)
                if i != gathered.rank:
                    self.refused += 1
                    self.rejected += 1
        # A wrong secret stops here.
        return self.membership.vet(out, own=gathered.rank, site=self.site_name, claims=claims)

    def _plan(self, unit: Unit, gathered: Gathered, opened: list[Opened], step: int) -> Plan | None:
        """The exchange's plan, or None when it cannot be used (this site's own contribution is
        missing or the sites exchanged different units: the round then fails everywhere alike)."""
        headers = [o[0] if o is not None else None for o in opened]
        plan = plan_exchange(headers, min_sites=self.cfg.min_sites or 1)  # refused sites do not count
        if plan is None or headers[gathered.rank] is None:
            return None
        if any(h is not None and h.unit != unit.index for h in headers):
            log.warning("site %s: sites exchanged different units at step %d; round not applied", self.site_name, step)
            return None
        self._observed = [(h.site, h.pace) for h in headers if h is not None and h.kind == KIND_UPDATE]
        self.pacer.observe(self._observed)
        for event in self.membership.observe(
            [h.site for h in headers if h is not None], step=step, round=plan.reference_round
        ):
            log.warning("site %s: %s", self.site_name, event)
        at_round = [i for i in plan.heal if headers[i].round == plan.reference_round]  # type: ignore[union-attr]
        if at_round:
            self.disagreements += 1
            names = ", ".join(headers[i].site for i in at_round)  # type: ignore[union-attr]
            log.warning("site %s: %s held another θ at round %d; healing", self.site_name, names, plan.reference_round)
        return plan

    def _apply(self, pending: Pending, step: int) -> None:
        """Apply one exchange's result (or roll it back); collective over the site: every rank
        takes part in the reads and writes that bring the lanes' pieces to their holders."""
        # The parameters moved on since the send only if steps ran in between.
        current = pending.sent if pending.sent_step == step else self._read(pending.unit.keys)
        self._observed = None
        if self.lanes.is_lane:
            self._apply_lane(pending, step, current)
        self._write(pending.unit)
        self._share_state(pending.unit)

    def _apply_lane(self, pending: Pending, step: int, current: dict[str, torch.Tensor]) -> None:
        if not pending.done:
            assert pending.future is not None
            if not pending.future.done():
                self.listener("waiting", step, pending.unit.round + 1, pending.unit.name)
            t0 = time.perf_counter()
            pending.result = pending.future.result()
            pending.done = True
            self.wait_seconds += time.perf_counter() - t0
        unit = pending.unit
        gathered = pending.result
        opened = self._open(gathered) if gathered is not None else []
        plan = self._plan(unit, gathered, opened, step) if gathered is not None else None
        if gathered is None or plan is None:
            self._roll_back(pending)
            return
        healed = False
        if plan.heal:
            healed = self._heal(unit, plan, opened, gathered.rank)
            if gathered.rank in plan.heal and not healed:
                self._roll_back(pending)  # still behind: the next exchange heals it
                return
            if gathered.rank in plan.heal and not self.pacer.paced:
                # Forward to where the source is: its step at the send, plus the steps this site ran since its own.
                source_step = opened[plan.source][0].step  # type: ignore[index]
                self._jump = max(self._jump or 0, source_step + step - pending.sent_step)
        deltas, weights = [], []
        for i in plan.in_sync:
            header, payload = opened[i]  # type: ignore[misc]
            if header.kind != KIND_UPDATE:
                continue
            decoded = self._decode(unit, payload, pending.like)
            if decoded is None:
                self.rejected += 1
                continue
            deltas.append(decoded)
            weights.append(header.weight)
        stepped = not plan.finished and bool(deltas) and sum(weights) > 0
        if stepped and unit.outer is not None:
            unit.outer.step(weighted_average(deltas, weights))
        unit.round = plan.reference_round + int(stepped)
        unit.final = plan.finished
        for i, n in enumerate(unit.owned):
            theta = unit.outer.params[i]  # type: ignore[union-attr]
            progress = current[n] - pending.sent[n]
            # A site whose own parameters diverged (its update was rejected) or that healed restarts from θ.
            keep = not healed and bool(torch.isfinite(progress).all())
            self._staged[n] = theta + progress if keep else theta.detach().clone()
            self.anchor[n] = theta.detach().clone()
        self.rounds_applied += 1
        self.applied_log.append((step, pending.sent_step))
        self.listener("applied", step, unit.round, unit.name)

    def _heal(self, unit: Unit, plan: Plan, opened: list[Opened], rank: int) -> bool:
        """Run this rank's part of the plan's heal (`atoll.sync.heal.run_heal`); True unless this
        rank had to heal and could not."""
        source = opened[plan.source][0]  # type: ignore[index]
        if unit.outer is not None and source.has_momentum:
            unit.outer.round_momentum(MOMENTUM_DTYPE)  # on every site: the healed copy is then bitwise the same
        if rank != plan.source and rank not in plan.heal:
            return True
        numel = self.lanes.numel(unit.owned)
        done = run_heal(
            plan,
            rank=rank,
            outer=unit.outer,
            sealer=self.sealer,
            unit=unit.index,
            numel=numel,
            with_momentum=source.has_momentum,
            transfer=lambda *a, **k: self._executor.submit(self.transport.transfer, *a, **k).result(),
        )
        self.heal_bytes += done.num_bytes
        self.heal_seconds += done.seconds
        if rank == plan.source:
            self.heals_served += int(done.ok)
            return True
        if not done.ok:
            log.error("site %s: the heal from %s failed or did not match its digest", self.site_name, source.site)
            return False
        if unit.outer is not None:
            unit.outer.reset_to(done.theta)
            unit.outer.set_momentum(done.momentum)
        if isinstance(self.codec, ErrorFeedback):
            self.codec.reset(unit.owned)  # what it had not sent belongs to the θ it gave up
        log.warning(
            "site %s: healed %s from site %s: round %d -> %d, %d bytes in %.2f s",
            *(self.site_name, unit.name, source.site, opened[rank][0].round, plan.reference_round),  # type: ignore[index]
            *(done.num_bytes, done.seconds),
        )
        unit.round = plan.reference_round
        self.heals += 1
        return True

    def _check(self, unit: Unit, step: int) -> None:
        """The final agreement, waiting for a dropped site (`atoll.sync.finish`)."""
        final_check(self, unit, step)

    def _stage_theta(self, unit: Unit) -> None:
        for i, n in enumerate(unit.owned):
            self._staged[n] = unit.outer.params[i].detach().clone()  # type: ignore[union-attr]
            self.anchor[n] = self._staged[n].clone()

    def _decode(self, unit: Unit, payload: torch.Tensor, like: list[Encoded]) -> list[torch.Tensor] | None:
        """A peer's tensors for this rank's parameters of `unit`, or None if they must be rejected."""
        try:
            tensors = [self.codec.decode(enc).float() for enc in unpack_payload(payload, like=like)]
        except AtollError as exc:  # a malformed update is rejected, never applied
            log.warning("rejected a malformed update (%s)", exc)
            return None
        for n, t in zip(unit.owned, tensors):
            if tuple(t.shape) != self.lanes.shape(n) or not torch.isfinite(t).all():
                log.warning("rejected an update for %s: wrong shape or not finite", n)
                return None
        return tensors

    # ------------------------------------------------------------------ inside the site

    def local_blocks(self, *, grads: bool = False) -> dict[str, torch.Tensor]:
        """This rank's blocks of its parameters (or of their gradients), by canonical name."""
        if grads:
            return {n: local_tensor(p.grad) for n, p in self.params.items() if p.grad is not None}
        return {n: local_tensor(p) for n, p in self.params.items()}

    def _read(self, keys: list[str], *, grads: bool = False) -> dict[str, torch.Tensor]:
        """This rank's pieces among `keys`, float32 in host memory (collective over the site)."""
        return self.lanes.read(keys, self.local_blocks(grads=grads))

    def _write(self, unit: Unit, *, grads: bool = False) -> None:
        """Every holder gets the staged new values of the unit's pieces (collective over the site)."""
        self.lanes.write(unit.keys, self._staged, self.local_blocks(grads=grads))

    def _share_state(self, unit: Unit) -> None:
        """Ranks past the lanes learn the unit's round, whether the run ended (they decide what
        `finish` still exchanges) and the sites' paces (a balanced pacer re-plans from them): from
        rank 0, a lane. Collective when there are any."""
        if self.idle_ranks:
            state = (unit.round, unit.final, self._observed, self._jump)
            unit.round, unit.final, paces, self._jump = broadcast_state(state)
            if not self.lanes.is_lane and paces is not None:
                self.pacer.observe(paces)

    # ------------------------------------------------------------------ cross-site DDP

    def commit_gradients(self, *, tokens: int) -> bool:
        """Call after backward, before the inner optimizer step; False means: skip that step.

        `ddp` averages the gradients across sites here; the other strategies leave the inner
        step to the site and return True.
        """
        if self.cfg.strategy != "ddp":
            return True
        return self.reduce_gradients(tokens=tokens)

    @torch.no_grad()
    def reduce_gradients(self, *, tokens: int) -> bool:
        """`ddp` strategy: average the site-averaged gradients across sites (token-weighted).

        Call after backward, before the optimizer step. Returns False if the exchange failed
        (the caller then skips the step, as torchft's should_commit demands). Collective over the site.
        """
        unit = self.units[0]
        for p in self.params.values():
            if p.grad is None:  # a parameter the loss did not reach still takes the average
                p.grad = torch.zeros_like(p)
        grads = self._read(unit.keys, grads=True)
        ok = self.lanes.is_lane and self._reduce_on_lane(unit, grads, tokens=tokens)
        self._write(unit, grads=True)
        if self.idle_ranks:
            (ok,) = broadcast_state((ok,))
        return ok

    def _reduce_on_lane(self, unit: Unit, grads: dict[str, torch.Tensor], *, tokens: int) -> bool:
        codec_state = self.codec.snapshot(unit.owned) if isinstance(self.codec, ErrorFeedback) else None
        encoded = self._encode(unit, grads)
        payload = pack_payload(encoded) if encoded else torch.empty(0, dtype=torch.uint8)
        # Gradients change every step: the envelope authenticates them but carries no θ digest.
        header = Header(self.site_name, self.address, 0, unit.round, float(tokens), payload.numel(), _NO_DIGEST)
        t0 = time.perf_counter()
        gathered = self.transport.exchange(self.sealer.seal(header, payload), payload)
        self.wait_seconds += time.perf_counter() - t0
        opened = self._open(gathered) if gathered is not None else []
        decoded = [(self._decode(unit, o[1], encoded), o[0].weight) for o in opened if o is not None]
        valid = [(d, w) for d, w in decoded if d is not None]
        self.rejected += len(decoded) - len(valid)
        if not valid:  # the exchange failed or every update was rejected, this site's own included
            if codec_state is not None and isinstance(self.codec, ErrorFeedback):
                self.codec.restore(codec_state)  # the step is skipped: its gradient is not carried over
            return False
        unit.round += 1
        if unit.owned:
            average = weighted_average([d for d, _ in valid], [w for _, w in valid])
            for n, g in zip(unit.owned, average):
                self._staged[n] = g
        return True

    # ------------------------------------------------------------------ checkpoints and metrics (atoll.sync.state)

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of the sync state. Waits for exchanges in flight (their results are kept)."""
        return sync_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (a checkpoint from before rounds were numbered too)."""
        load_sync_state(self, state)

    def metrics(self) -> dict[str, Any]:
        """This rank's counters and a fingerprint of the synchronized parameters (to compare sites).
        Collective over the site when its ranks hold parts of the model."""
        return sync_metrics(self)

    def final_metrics(self) -> dict[str, Any]:
        """After `finish`: the metrics, which rounds were applied when ([step applied, step sent]),
        the sites that dropped out or came back, and the SHA-256 of the parameters (hex, on the
        site's rank 0: over full tensors in canonical order, whatever the layout). Collective."""
        return final_sync_metrics(self)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.transport.close()
