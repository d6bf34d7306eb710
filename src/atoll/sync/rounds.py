"""The sync engine's data: exchange units, exchanges in flight, and what a transport must do.

Plain data, no logic: `atoll.sync.engine` runs the rounds over them; tests build transports
that follow `Transport` (the real one is `atoll.sync.transport.TorchftTransport`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from atoll.sync.codecs import Encoded
from atoll.sync.envelope import Header
from atoll.sync.outer import OuterOptimizer
from atoll.sync.transport import ByteCounter, Gathered


class Transport(Protocol):
    counter: ByteCounter

    def exchange(self, envelope: torch.Tensor, body: torch.Tensor) -> Gathered | None: ...
    def transfer(self, tensor: torch.Tensor, *, src: int, dst: list[int], rank: int) -> torch.Tensor | None: ...
    def close(self) -> None: ...


Opened = tuple[Header, torch.Tensor] | None  # a peer's contribution, None if refused


@dataclass
class Unit:
    """A group of parameters that is exchanged together, on its own schedule."""

    name: str
    params: list[str]
    offset: int  # inner step inside the round at which it is sent (0 means the end of the round)
    index: int = 0
    keys: list[str] = field(default_factory=list)  # every piece of its parameters (`atoll.sync.lanes`)
    owned: list[str] = field(default_factory=list)  # the pieces this local rank sends (its lane's)
    outer: OuterOptimizer | None = None  # θ of the owned pieces (None when it owns none)
    round: int = 0  # rounds applied (the same on every site holding the run's θ)
    final: bool = False  # a peer finished the run at this θ: no more exchanges, end on θ


@dataclass
class Pending:
    unit: Unit
    apply_at: int
    sent: dict[str, torch.Tensor]  # local parameters at the send (the anchor it set)
    previous_anchor: dict[str, torch.Tensor]  # restored if the exchange fails
    like: list[Encoded]
    sent_step: int = 0
    weight: float = 0.0  # tokens the payload stands for, given back if the exchange fails
    codec_state: dict[str, Any] | None = None  # error feedback before the encode, restored if it fails
    future: Future[Gathered | None] | None = None
    result: Gathered | None = None
    done: bool = False


ExchangeListener = Callable[[str, int, int, str], None]
"""Told of each exchange's state as it changes: (state, step, round, unit). States: ``sending``
(the payload goes out), ``waiting`` (the loop blocks on an exchange still in flight), ``applied``
(round = the unit's round after it), ``failed`` (rolled back). The loop writes them to the
metrics, so that a live view knows what each site is doing between its logged steps."""


def ignore_exchange(state: str, step: int, round: int, unit: str) -> None:
    """The listener of a sync nobody watches."""
