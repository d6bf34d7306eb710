"""Outer synchronization across sites: DiLoCo and its streaming and delayed variants, and cross-site DDP.

Called by the trainer on every rank of every site. The model's parameters are cut into
*exchange units* (the whole model for `diloco` and `delayed`, layer fragments for `streaming`).
Inside a unit each parameter is *owned* by one local rank (whole parameters, balanced by size),
and only its owner sends it across the WAN, to the same local rank of the other sites: no byte
crosses the WAN twice, and every codec sees real tensors (low-rank needs matrices).

A unit is sent every H inner steps (at its offset inside the round) and applied `delay` steps
later, the exchange running in a background thread meanwhile (`diloco`: 0; `delayed`: one
round; `streaming`: tau steps). With global parameters θ (identical everywhere), the anchor a
(the local parameters when the unit was last sent) and the local parameters x:

    send:   Δ = a − x,  a ← x                          (encoded with error feedback)
    apply:  Δ̄ = Σ w_s Δ_s / Σ w_s  (w: tokens since the site's last send)
            θ ← OuterSGD(θ, grad=Δ̄);  x ← θ + (x − a);  a ← θ

With delay 0 this is DiLoCo (x ← θ); with a delay, the local progress made while the exchange
was in flight is kept on top of the new θ. `finish` flushes what is in flight and, for units
whose last send was before the end, runs one more blocking exchange, so every site ends with the
same parameters.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from atoll.config.schema import SyncSection
from atoll.errors import AtollError
from atoll.sync.codecs import Codec, Encoded, ErrorFeedback, codec_from_config, pack_payload, unpack_payload
from atoll.sync.fragments import StreamingSchedule, assign_owners, split_fragments
from atoll.sync.outer import OuterOptimizer, weighted_average
from atoll.sync.site_env import SiteEnv
from atoll.sync.transport import ByteCounter

log = logging.getLogger(__name__)


class Transport(Protocol):
    counter: ByteCounter

    def exchange(self, payload: torch.Tensor, *, weight: float) -> list[tuple[torch.Tensor, float]] | None: ...
    def close(self) -> None: ...


@dataclass
class Unit:
    """A group of parameters that is exchanged together, on its own schedule."""

    name: str
    params: list[str]
    offset: int  # inner step inside the round at which it is sent (0 means the end of the round)
    owned: list[str] = field(default_factory=list)  # the parameters this local rank sends
    outer: OuterOptimizer | None = None  # θ of the owned parameters (None when it owns none)


@dataclass
class Pending:
    unit: Unit
    apply_at: int
    sent: dict[str, torch.Tensor]  # local parameters at the send (the anchor it set)
    previous_anchor: dict[str, torch.Tensor]  # restored if the exchange fails
    like: list[Encoded]
    sent_step: int = 0
    weight: float = 0.0  # tokens the payload stands for, given back if the exchange fails
    future: Future[list[tuple[torch.Tensor, float]] | None] | None = None
    result: list[tuple[torch.Tensor, float]] | None = None
    done: bool = False


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
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self.H = inner_steps
        self.params: dict[str, nn.Parameter] = dict(_unwrap(model).named_parameters())
        names = list(self.params)
        self.owner = assign_owners({n: p.numel() for n, p in self.params.items()}, num_ranks=local_world_size)
        if cfg.strategy == "streaming":
            frags = split_fragments(names, num_fragments=min(cfg.fragments, _num_layers(names)))
            offsets = StreamingSchedule(len(frags), self.H).offsets
            self.units = [Unit(f"fragment{i}", f, offset=offsets[i]) for i, f in enumerate(frags)]
            self.delay = cfg.overlap_steps
        else:
            self.units = [Unit("model", names, offset=0)]
            self.delay = self.H if cfg.strategy == "delayed" else 0
        nesterov = cfg.nesterov and cfg.outer_momentum > 0
        for unit in self.units:
            unit.owned = [n for n in unit.params if self.owner[n] == local_rank]
            if unit.owned:
                unit.outer = OuterOptimizer(
                    [self.params[n] for n in unit.owned],
                    lr=cfg.outer_lr,
                    momentum=cfg.outer_momentum,
                    nesterov=nesterov,
                )
        self.anchor = {n: self.params[n].detach().float().clone() for u in self.units for n in u.owned}
        codec = codec_from_config(cfg)
        self.codec: Codec | ErrorFeedback = ErrorFeedback(codec) if cfg.error_feedback else codec
        self.tokens_since = {u.name: 0 for u in self.units}
        self.pending: deque[Pending] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"atoll-wan-{site_name}")
        self.wait_seconds = 0.0
        self.rejected = 0
        self.rounds_applied = 0
        self.applied_log: list[tuple[int, int]] = []  # (step applied, step sent), for tests and reports
        self._staged: dict[str, torch.Tensor] = {}  # new values of owned tensors, before the site gathers them

    # ------------------------------------------------------------------ schedule

    def due(self, unit: Unit, step: int) -> bool:
        return step > 0 and (step - unit.offset) % self.H == 0 and step >= max(unit.offset, 1)

    def after_step(self, step: int, *, tokens: int) -> None:
        """Call after inner optimizer step `step` (1-based) with the tokens the site used in it."""
        if self.cfg.strategy == "ddp":
            return
        for unit in self.units:
            self.tokens_since[unit.name] += tokens
        while self.pending and self.pending[0].apply_at <= step:
            self._apply(self.pending.popleft(), step)
        for unit in self.units:
            if self.due(unit, step):
                self._send(unit, step)
                if self.delay == 0:
                    self._apply(self.pending.pop(), step)

    def finish(self, step: int) -> None:
        """Flush exchanges in flight, then make every site's parameters identical. Collective."""
        if self.cfg.strategy != "ddp":
            while self.pending:
                self._apply(self.pending.popleft(), step)
            for unit in self.units:
                if not self.due(unit, step):
                    self._send(unit, step)
                    self._apply(self.pending.pop(), step)
        self._executor.shutdown(wait=True)

    @property
    def lockstep(self) -> bool:
        """Cross-site ddp: every site applies the same averaged gradient at every step."""
        return self.cfg.strategy == "ddp"

    @torch.no_grad()
    def reset_to_global(self) -> bool:
        """A diverged site takes θ, the parameters the sites last agreed on (the training loop's
        rollback where there are peers). Exchanges in flight then carry only the progress made
        from θ. Collective over the site; False for `ddp`, which keeps no θ."""
        if self.cfg.strategy == "ddp":
            return False
        for unit in self.units:
            theta = {n: unit.outer.params[i].detach().float() for i, n in enumerate(unit.owned)}  # type: ignore[union-attr]
            for n, value in theta.items():
                self._staged[n] = value.clone()
                self.anchor[n] = value.clone()
            for pending in self.pending:
                if pending.unit is unit:
                    pending.sent.update({n: value.clone() for n, value in theta.items()})
            self._gather_into_params(unit)
        return True

    # ------------------------------------------------------------------ exchange

    def _encode(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> list[Encoded]:
        return [self.codec.encode(tensors[n], key=n) for n in unit.owned]

    def _send(self, unit: Unit, step: int) -> None:
        current = {n: self.params[n].detach().float().clone() for n in unit.owned}
        delta = {n: self.anchor[n] - current[n] for n in unit.owned}
        encoded = self._encode(unit, delta)
        payload = pack_payload(encoded) if encoded else torch.empty(0, dtype=torch.uint8)
        weight = float(self.tokens_since[unit.name])
        previous = {n: self.anchor[n] for n in unit.owned}
        for n in unit.owned:
            self.anchor[n] = current[n]
        self.tokens_since[unit.name] = 0
        pending = Pending(
            unit,
            apply_at=step + self.delay,
            sent=current,
            previous_anchor=previous,
            like=encoded,
            sent_step=step,
            weight=weight,
        )
        if self.delay == 0:
            t0 = time.perf_counter()
            pending.result = self.transport.exchange(payload, weight=weight)
            pending.done = True
            self.wait_seconds += time.perf_counter() - t0
        else:
            pending.future = self._executor.submit(self.transport.exchange, payload, weight=weight)
        self.pending.append(pending)

    def _apply(self, pending: Pending, step: int) -> None:
        if not pending.done:
            assert pending.future is not None
            t0 = time.perf_counter()
            pending.result = pending.future.result()
            pending.done = True
            self.wait_seconds += time.perf_counter() - t0
        unit = pending.unit
        results = pending.result
        if results is None:
            # The exchange failed: nothing of this round was shared. Keep the local progress and
            # restore the anchor and the token count so that the next exchange carries it.
            for n in unit.owned:
                self.anchor[n] = pending.previous_anchor[n]
            self.tokens_since[unit.name] += int(pending.weight)
            return
        deltas, weights = [], []
        for payload, weight in results:
            decoded = self._decode(unit, payload, pending.like)
            if decoded is None:
                self.rejected += 1
                continue
            deltas.append(decoded)
            weights.append(weight)
        if deltas and sum(weights) > 0 and unit.outer is not None:
            unit.outer.step(weighted_average(deltas, weights))
        for i, n in enumerate(unit.owned):
            theta = unit.outer.params[i]  # type: ignore[union-attr]
            local_now = self.params[n].detach().float()
            progress = local_now - pending.sent[n]
            # A site whose own parameters diverged (its update was rejected) restarts from θ.
            finite = bool(torch.isfinite(progress).all())
            self._staged[n] = theta + progress if finite else theta.detach().clone()
            self.anchor[n] = theta.detach().clone()
        self._gather_into_params(unit)
        self.rounds_applied += 1
        self.applied_log.append((step, pending.sent_step))

    def _decode(self, unit: Unit, payload: torch.Tensor, like: list[Encoded]) -> list[torch.Tensor] | None:
        """A peer's tensors for this rank's parameters of `unit`, or None if they must be rejected."""
        try:
            tensors = [self.codec.decode(enc).float() for enc in unpack_payload(payload, like=like)]
        except AtollError as exc:  # a malformed update is rejected, never applied
            log.warning("rejected a malformed update (%s)", exc)
            return None
        for n, t in zip(unit.owned, tensors):
            if t.shape != self.params[n].shape or not torch.isfinite(t).all():
                log.warning("rejected an update for %s: wrong shape or not finite", n)
                return None
        return tensors

    # ------------------------------------------------------------------ intra-site reassembly

    def _gather_into_params(self, unit: Unit) -> None:
        """Every rank of the site gets the new values of the whole unit from their owners."""
        self._gather_owned(unit, {n: self.params[n] for n in unit.params})

    @torch.no_grad()
    def _gather_owned(self, unit: Unit, targets: dict[str, torch.Tensor]) -> None:
        """Copy the staged values of this rank's tensors into `targets` (parameters or their
        gradients) on every rank of the site: each rank contributes what it owns, one all-gather."""
        staged = self._staged
        if self.local_world_size == 1 or not dist.is_initialized():
            for n in unit.owned:
                if n in staged:
                    targets[n].copy_(staged.pop(n))
            return
        counts = [0] * self.local_world_size
        for n in unit.params:
            counts[self.owner[n]] += targets[n].numel()
        width = max(counts)
        mine = torch.zeros(width, dtype=torch.float32)
        offset = 0
        for n in unit.owned:
            value = staged.pop(n) if n in staged else targets[n].detach().float()
            mine[offset : offset + value.numel()] = value.reshape(-1).cpu()
            offset += value.numel()
        gathered = [torch.empty(width, dtype=torch.float32) for _ in range(self.local_world_size)]
        dist.all_gather(gathered, mine)
        offsets = [0] * self.local_world_size
        for n in unit.params:
            r, t = self.owner[n], targets[n]
            t.copy_(gathered[r][offsets[r] : offsets[r] + t.numel()].view_as(t).to(t.device, t.dtype))
            offsets[r] += t.numel()

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
        (the caller then skips the step, as torchft's should_commit demands).
        """
        unit = self.units[0]
        for p in self.params.values():
            if p.grad is None:  # a parameter the loss did not reach still takes the average
                p.grad = torch.zeros_like(p)
        grads = {n: self.params[n].grad.detach().float() for n in unit.owned}  # type: ignore[union-attr]
        encoded = self._encode(unit, grads)
        payload = pack_payload(encoded) if encoded else torch.empty(0, dtype=torch.uint8)
        t0 = time.perf_counter()
        results = self.transport.exchange(payload, weight=float(tokens))
        self.wait_seconds += time.perf_counter() - t0
        if results is None:
            return False
        decoded = [(self._decode(unit, p, encoded), w) for p, w in results]
        valid = [(d, w) for d, w in decoded if d is not None]
        self.rejected += len(decoded) - len(valid)
        if not valid:  # every update rejected, this site's own included: skip the step
            return False
        if unit.owned:
            average = weighted_average([d for d, _ in valid], [w for _, w in valid])
            for n, g in zip(unit.owned, average):
                self._staged[n] = g
        self._gather_owned(unit, {n: self.params[n].grad for n in unit.params})  # type: ignore[misc]
        return True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of the sync state. Waits for exchanges in flight (their results are kept)."""
        pending = []
        for p in self.pending:
            if not p.done:
                assert p.future is not None
                p.result = p.future.result()
                p.done = True
            pending.append(
                {
                    "unit": p.unit.name,
                    "apply_at": p.apply_at,
                    "sent": p.sent,
                    "previous_anchor": p.previous_anchor,
                    "result": p.result,
                    "like": p.like,
                    "sent_step": p.sent_step,
                    "weight": p.weight,
                }
            )
        return {
            "outer": {u.name: u.outer.state_dict() for u in self.units if u.outer is not None},
            "anchor": self.anchor,
            "codec": self.codec.state_dict(),
            "tokens_since": dict(self.tokens_since),
            "pending": pending,
            "counter": self.transport.counter.as_dict(),
            "wait_seconds": self.wait_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for unit in self.units:
            if unit.outer is not None:
                unit.outer.load_state_dict(state["outer"][unit.name])
        self.anchor = {n: t.clone() for n, t in state["anchor"].items()}
        self.codec.load_state_dict(state["codec"])
        self.tokens_since = dict(state["tokens_since"])
        units = {u.name: u for u in self.units}
        self.pending = deque()
        for p in state["pending"]:
            self.pending.append(
                Pending(
                    units[p["unit"]],
                    p["apply_at"],
                    p["sent"],
                    p["previous_anchor"],
                    p["like"],
                    sent_step=p["sent_step"],
                    weight=p.get("weight", 0.0),
                    result=p["result"],
                    done=True,
                )
            )
        c = self.transport.counter
        saved = state["counter"]
        c.sent, c.received, c.exchanges, c.seconds, c.failed = (
            int(saved["wan_bytes_sent"]),
            int(saved["wan_bytes_received"]),
            int(saved["wan_exchanges"]),
            float(saved["wan_seconds"]),
            int(saved["wan_failed"]),
        )
        self.wait_seconds = float(state["wait_seconds"])

    def metrics(self) -> dict[str, Any]:
        """This rank's counters and a fingerprint of the synchronized parameters (to compare sites)."""
        return {
            **self.transport.counter.as_dict(),
            "sync_wait_seconds": self.wait_seconds,
            "sync_rejected": self.rejected,
            "params_checksum": checksum(self.params.values()),
        }

    def final_metrics(self) -> dict[str, Any]:
        """After `finish`: the metrics and which rounds were applied when ([step applied, step sent])."""
        return {**self.metrics(), "sync_applied": self.applied_log}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.transport.close()


def sync_for_site(
    model: nn.Module, cfg: SyncSection, site_env: SiteEnv, *, local_rank: int, local_world_size: int
) -> CrossSiteSync:
    """The cross-site sync of one rank of a site that a multi-site launcher started.

    `site_env` names the topology, the Lighthouse, this site's address in the lab and how the
    WAN is modelled; MASTER_ADDR/MASTER_PORT name the site's own store (torchft's replica-group
    store). `model` holds the parameters to synchronize (the trainable ones, under their base
    names). Pre-training and fine-tuning both build their sync here.
    """
    from atoll.config.topology import load_topology
    from atoll.sync.transport import TorchftTransport, WanModel, chunk_bytes_for

    topology = load_topology(site_env.topology)
    site = site_env.site_info(local_rank=local_rank, local_world_size=local_world_size)
    transport = TorchftTransport(
        site,
        lighthouse_addr=site_env.lighthouse,
        store_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        store_port=int(os.environ["MASTER_PORT"]),
        hostname=site_env.address,
        wan=WanModel(topology, mode=site_env.wan_mode),
        timeout_seconds=cfg.timeout_seconds,
        min_sites=cfg.min_sites or site.num_sites,
        chunk_bytes=cfg.chunk_kib * 1024 if cfg.chunk_kib else chunk_bytes_for(topology),
    )
    return CrossSiteSync(
        model,
        cfg,
        transport=transport,
        site_name=site.name,
        local_rank=site.local_rank,
        local_world_size=site.local_world_size,
        inner_steps=cfg.inner_steps_for(site.name),
    )


def _num_layers(names: list[str]) -> int:
    return len({n.split(".")[1] for n in names if n.startswith("layers.")}) or 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def checksum(params: Iterable[torch.Tensor]) -> float:
    """A cheap fingerprint of parameters (sum of float64 sums), to compare sites."""
    with torch.no_grad():
        return math.fsum(float(p.detach().double().sum()) for p in params)


def param_checksum(model: nn.Module) -> float:
    """`checksum` of a model's parameters (DDP-wrapped or not)."""
    return checksum(_unwrap(model).parameters())
