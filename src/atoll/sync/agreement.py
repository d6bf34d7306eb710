"""Who holds the run's θ, decided the same way on every site from one exchange's envelopes.

Pure functions over `atoll.sync.envelope.Header`s: no tensors, no process group. Every site of
an exchange sees the same authenticated envelopes in the same (quorum) order, so every site
reaches the same plan without another message:

- the *reference* is the (round, digest) that the run holds: the highest round among the
  envelopes (rounds only advance by applying an exchange, so a site behind restarted or missed
  rounds), and among the sites at that round the digest most of them hold (a tie goes to the
  site first in the quorum's order);
- sites that hold the reference are *in sync*: only their updates are averaged (an update
  computed from another θ would pull the run back to it);
- every other site *heals*: the first in-sync site sends it θ and the outer momentum, it checks
  them against the reference digest, and from then on holds the run's θ.

`Membership` keeps, across exchanges, which sites took part, so that a site's loss and its return
are stated in the metrics (when, and how many rounds it missed), and whether this site's own secret
can be the run's (`SecretCheck`: a site with the wrong one stops instead of staying in every quorum).
A site whose contribution was refused counts toward no plan: an exchange with fewer authenticated
sites than `sync.min_sites` is not applied.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

from atoll.errors import AtollError
from atoll.sync.auth import SECRET_ENV, SECRET_FILE_ENV
from atoll.sync.envelope import KIND_CHECK, Header

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """What one exchange means for every site taking part (indices into the quorum's order)."""

    reference_round: int
    reference_digest: bytes
    in_sync: list[int]
    heal: list[int]
    source: int  # the in-sync site that sends θ to the sites that heal
    finished: bool  # an in-sync site has finished the run (a CHECK envelope): apply no more updates

    def must_heal(self, index: int) -> bool:
        return index in self.heal


def plan_exchange(headers: list[Header | None], *, min_sites: int = 1) -> Plan | None:
    """The plan of an exchange from its envelopes in quorum order (None for a refused one).

    Returns None when there is nothing to agree on: fewer than `min_sites` envelopes authenticate
    (torchft's quorum counts every site that joined it, one with the wrong secret too; a round
    is only as good as the sites that could take part in it).
    """
    present = [(i, h) for i, h in enumerate(headers) if h is not None]
    if not present or len(present) < min_sites:
        return None
    top = max(h.round for _, h in present)
    at_top = [(i, h) for i, h in present if h.round == top]
    counts = Counter(h.digest for _, h in at_top)
    best = max(counts.values())
    digest = next(h.digest for _, h in at_top if counts[h.digest] == best)  # first in quorum order wins a tie
    in_sync = [i for i, h in present if h.round == top and h.digest == digest]
    heal = [i for i, _ in present if i not in in_sync]
    finished = any(headers[i].kind == KIND_CHECK for i in in_sync)  # type: ignore[union-attr]
    return Plan(top, digest, in_sync, heal, source=in_sync[0], finished=finished)


WRONG_SECRET_EXCHANGES = 2  # exchanges in a row in which no peer authenticates, before a site gives up


@dataclass
class SecretCheck:
    """Whether this site's join secret is the run's, judged from the exchanges it took part in.

    A tag that does not check is symmetric: two sites with different secrets each refuse the
    other, and no message could say which secret is the run's without the secret itself. What
    breaks the symmetry is history: a site that ever authenticated a peer shares its secret with
    someone in the run and never gives up; a site that has authenticated nobody, while every peer
    of `WRONG_SECRET_EXCHANGES` exchanges in a row was refused, is the odd one out (the run's
    sites authenticate each other) and stops with the fix, instead of staying in every quorum.
    Only refusals of contributions that claim one of the run's sites (`members`, the topology's)
    count: an impostor claiming another name that reaches the quorum before the honest peers is
    an outsider, and says nothing about this site's secret.
    """

    trusted: bool = False  # a peer's contribution authenticated once: the secret is shared
    refused_in_a_row: int = 0

    members: frozenset[str] | None = None  # the run's sites; None: every claim counts

    def observe(
        self, authenticated: list[bool], *, own: int, site: str, claims: list[str | None] | None = None
    ) -> None:
        """Record one exchange of site `site`: which contributions (quorum order) authenticated,
        `own` its own, and the site each refused one claims (`claims`). Raises `AtollError` when
        the site's secret is evidently not the run's."""
        claims = claims or [None] * len(authenticated)

        def counts(i: int, ok: bool) -> bool:
            return ok or self.members is None or claims[i] in self.members  # an outsider's refusal: no evidence

        peers = [ok for i, ok in enumerate(authenticated) if i != own and counts(i, ok)]
        if not peers:  # alone in the quorum: says nothing either way
            return
        if any(peers):
            self.trusted, self.refused_in_a_row = True, 0
            return
        self.refused_in_a_row += 1
        if self.refused_in_a_row >= WRONG_SECRET_EXCHANGES:
            self.check_at_end(site)

    def check_at_end(self, site: str) -> None:
        """Raise the wrong-secret `AtollError` if peers were refused and none ever authenticated.
        At the run's end one refused exchange is enough: the run's sites may have finished before
        a second one (a late joiner with the wrong secret), and then the secret, not the final
        agreement that could not complete, is what to fix."""
        if self.trusted or not self.refused_in_a_row:
            return
        raise AtollError(
            f"site {site}: no other site's contribution authenticated with this site's join secret in "
            f"{self.refused_in_a_row} exchange(s) in a row, and none ever did: this site's join secret is not the "
            f"run's (or its peers are not this run's sites); set {SECRET_ENV} or {SECRET_FILE_ENV} "
            "(or --secret-file) to the run's secret"
        )


@dataclass
class Membership:
    """Which sites took part in this rank's exchanges, and the events when that changed."""

    current: set[str] = field(default_factory=set)
    secret: SecretCheck = field(default_factory=SecretCheck)
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its open "dropped" event
    events: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, sites: list[str], *, step: int, round: int) -> list[dict[str, Any]]:
        """Record the sites of a completed exchange at `step` (this site's) and the run's `round`;
        returns the new events: a site that took part before and is missing is "dropped", one
        that was dropped and is back "rejoined" with the rounds it missed."""
        new: list[dict[str, Any]] = []
        now = time.time()
        for site in sorted(self.current - set(sites)):
            event = {"event": "dropped", "site": site, "step": step, "round": round, "time": now}
            self.dropped[site] = event
            new.append(event)
        for site in sorted(set(sites) - self.current):
            if site in self.dropped:
                missed = round - self.dropped.pop(site)["round"]
                event = {"event": "rejoined", "site": site, "step": step, "round": round, "time": now}
                new.append({**event, "rounds_missed": missed})
        self.current = set(sites)
        self.events.extend(new)
        return new

    def vet(self, opened: list[T], *, own: int, site: str, claims: list[str | None] | None = None) -> list[T]:
        """`opened` (one exchange's contributions in quorum order, None where refused; `claims`:
        the site each refused one claims), after `SecretCheck.observe` found this site's secret
        plausible; raises `AtollError` if not."""
        self.secret.observe([o is not None for o in opened], own=own, site=site, claims=claims)
        return opened

    def summary(self, *, round: int) -> list[dict[str, Any]]:
        """Every event so far; a site still away shows the rounds it has missed until `round`."""
        out = []
        for event in self.events:
            copy = dict(event)
            if event is self.dropped.get(event["site"]):
                copy["rounds_missed"] = round - event["round"]
            out.append(copy)
        return out
