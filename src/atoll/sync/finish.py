"""The sync engine's last agreement (`CrossSiteSync.finish`): every site shows θ's digest, one
that differs heals, and a site that dropped out is waited for before the run ends.

Why wait: with `sync.min_sites` below the number of sites, a partition (a cut link) leaves each
half training alone. If one half finishes while the other is still cut off, no quorum ever holds
both again and they end with different parameters (the chaos benchmark's cut during an exchange,
2026-12-07). A finishing site whose last exchanges missed a site that took part before therefore
repeats its check for up to one exchange timeout (`sync.timeout_seconds`: how long this run lets a
silent peer be silent): a site on its way back (a healed link, a restarted site catching up) then
meets it in one quorum, and the agreement plan (`atoll.sync.agreement.plan_exchange`: the highest
round, then the majority digest, then the first site in quorum order) makes one half heal from the
other. A site that never comes back costs the survivors that one timeout, once, at the end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from atoll.errors import RunFailure
from atoll.sync.envelope import KIND_CHECK
from atoll.sync.rounds import Unit

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # between two checks while a dropped site is awaited


def final_check(sync: Any, unit: Unit, step: int, *, attempts: int = 3) -> None:
    """`CrossSiteSync._check` (a lane of every site calls it for each unit at the end). Raises
    `RunFailure` if `attempts` checks fail to complete or this site cannot heal."""
    empty = torch.empty(0, dtype=torch.uint8)
    wait_s = sync.cfg.timeout_seconds
    deadline = time.monotonic() + wait_s
    failures, waited = 0, False
    while failures < attempts:
        header = sync._header(unit, body=empty, weight=0.0, step=step, kind=KIND_CHECK)
        gathered = sync._executor.submit(sync.transport.exchange, sync.sealer.seal(header, empty), empty).result()
        opened = sync._open(gathered) if gathered is not None else []
        plan = sync._plan(unit, gathered, opened, step) if gathered is not None else None
        if gathered is None or plan is None:
            failures += 1
            continue
        if plan.heal and not sync._heal(unit, plan, opened, gathered.rank):
            break
        away = sorted(sync.membership.dropped)
        if not away or time.monotonic() >= deadline:
            if away:
                log.warning("site %s: ends without %s (not back within %g s)", sync.site_name, away, wait_s)
            return
        if not waited:
            log.info(
                "site %s: waiting up to %g s for %s, dropped earlier, before the final agreement",
                sync.site_name,
                wait_s,
                ", ".join(away),
            )
            waited = True
        time.sleep(RETRY_SECONDS)
    sync.membership.secret.check_at_end(sync.site_name)  # a wrong secret is the cause to name, if it is one
    raise RunFailure(
        f"site {sync.site_name}: could not confirm at the end that every site holds the same parameters "
        f"({unit.name}, round {unit.round}); do not use this site's weights: resume the run to heal it"
    )
