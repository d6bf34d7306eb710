"""The live view of a multi-site run for the launching terminal: one row per site, one per link.

The launcher (`atoll.sync.launch`, for `atoll train --topology` and `atoll lab run`) and a
standalone `atoll site` poll each site's ``metrics.jsonl`` (the ranks themselves draw nothing,
so several sites never scribble over one terminal). Per site: step, loss, tokens/s, compute
utilization, the state of its current exchange, the megabytes it sent over the WAN and an ETA;
per link (a site's uplink in the topology): the rate it carried over the last minute and while
it last exchanged, against its ``uplink_mbps``. What the states mean and how they are derived is
`atoll.report.site_state`'s. A site the launcher restarted or lost says so, in its row and in a
line under the tables; a restarted site that resumes rewrites its metrics from its checkpoint
on, and the view follows.

The view fits an 80-column terminal (wider ones get the same table) and draws only on a
terminal: with stderr sent to a file or a pipe it draws nothing (the launcher's one-line reports
and the summaries after the run say what happened). ``--no-progress`` and ATOLL_NO_PROGRESS turn
it off on a terminal too (the CLI then makes no watch at all).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from atoll.report.site_state import MetricsTail, RunShape, SiteHistory, eta_seconds, exchange_state

REDRAW_SECONDS = 1.0  # the view is redrawn at most this often (files are polled on every refresh)


@dataclass
class _Watched:
    name: str
    run_dir: Path
    total_steps: int
    tail: MetricsTail
    history: SiteHistory
    shape: RunShape | None = None
    mark: str = ""  # what the launcher said last: "restarted 2x", "lost", "done"
    marked_at: float = 0.0
    restarts: str = ""  # its last "restarted Nx", kept when a later mark replaces it


class SiteWatch:
    """Context manager; `refresh()` re-reads the sites' metrics and redraws (at most once a second).

    `sites` maps each site to its run directory, `total_steps` to its number of inner steps
    (a site missing there: read from its run directory's config.yaml once it logs).
    `links` (`set_links`) gives each site's uplink and downlink in Mbit/s. Inert (nothing read,
    nothing drawn) when `console` is not a terminal. Not thread-safe: the launcher's loop calls it.
    """

    def __init__(
        self,
        sites: dict[str, Path],
        *,
        total_steps: dict[str, int],
        console: Console | None = None,
        links: Mapping[str, tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._console = console or Console(stderr=True)
        self._clock = clock
        self._sites = {
            name: _Watched(
                name, run_dir, total_steps.get(name, 0), MetricsTail(run_dir / "metrics.jsonl"), SiteHistory()
            )
            for name, run_dir in sites.items()
        }
        self._links: dict[str, tuple[float, float]] = dict(links or {})
        self._live: Live | None = None
        self._drawn_at = 0.0

    @property
    def enabled(self) -> bool:
        """Whether the view draws: only on a terminal."""
        return self._console.is_terminal

    def set_links(self, links: Mapping[str, tuple[float, float]]) -> None:
        """Each site's (uplink, downlink) in Mbit/s, from the topology's links; sites without one show no link row."""
        self._links = dict(links)

    def __enter__(self) -> SiteWatch:
        if self.enabled:
            self._live = Live(console=self._console, auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
            self._live.start()
            self.refresh(force=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self.refresh(force=True)
            self._live.stop()
            self._live = None

    def mark(self, name: str, state: str) -> None:
        """Show `state` ("restarted 1x", "lost", "done") for the site: in its row until the site
        logs again (a restart) or for good (the others), and in the line under the tables."""
        site = self._sites[name]
        site.mark, site.marked_at = state, self._clock()
        if state.startswith("restarted"):
            site.restarts = state
            site.history.started_at = site.marked_at  # its rates and ETA restart with it

    def refresh(self, *, force: bool = False) -> None:
        """Read what the sites logged since the last call; redraw when a second has passed (or `force`)."""
        if not self.enabled:
            return
        self.poll()
        now = self._clock()
        if self._live is not None and (force or now - self._drawn_at >= REDRAW_SECONDS):
            self._live.update(self.render(now=now), refresh=True)
            self._drawn_at = now

    def poll(self) -> None:
        """Read the records the sites' metrics.jsonl gained (works whether or not the view draws)."""
        for site in self._sites.values():
            rewritten, records = site.tail.poll()
            if rewritten:
                site.history.reset()
            if records and site.shape is None:
                site.shape = RunShape.read(site.run_dir, site.name)
                site.total_steps = site.total_steps or site.shape.total_steps or 0
            for record in records:
                site.history.add(record)

    def render(self, *, now: float) -> RenderableType:
        """The tables as they stand at wall time `now` (unix seconds)."""
        parts: list[RenderableType] = [self._fit(lambda gap: self._site_table(now, gap))]
        links = self._fit(self._link_table) if self._links else None
        if links is not None:
            parts.append(links)
        notes = []
        for s in self._sites.values():
            said = [s.restarts] if s.restarts else []
            if s.mark and s.mark not in ("done", s.restarts):
                said.append(s.mark)
            if said:
                notes.append(f"{s.name} {', '.join(said)}")
        if notes:
            parts.append(Text("; ".join(notes), style="yellow", overflow="fold"))
        return Group(*parts)

    def _fit(self, build: Callable[[int], Table | None]) -> Table | None:
        """The table with two spaces between columns, or one where two would not fit the terminal
        (a 100,000-step run, a 13-character site name...): fields are never cut for spacing."""
        table = build(2)
        unbounded = self._console.options.update_width(10 * self._console.width)  # measure() clamps to the width
        if table is not None and self._console.measure(table, options=unbounded).maximum > self._console.width:
            return build(1)
        return table

    def _site_table(self, now: float, gap: int) -> Table:
        table = _table(gap)
        table.add_column("site", no_wrap=True, overflow="ellipsis", max_width=12)
        for header in ("step", "loss", "tok/s", "util"):
            table.add_column(header, justify="right", no_wrap=True)
        table.add_column("exchange", no_wrap=True, overflow="ellipsis", min_width=13)
        table.add_column("MB sent", justify="right", no_wrap=True)
        table.add_column("ETA", justify="right", no_wrap=True)
        for site in self._sites.values():
            shape = site.shape or RunShape()
            last = site.history.last
            state = self._state(site, now=now, shape=shape)
            eta = eta_seconds(site.history, shape, total_steps=site.total_steps)
            step = int(last["step"]) if last is not None else 0
            total = site.total_steps
            table.add_row(
                Text(site.name, style="bold"),
                f"{step}/{total}" if total else str(step),
                Text(_loss(last), style="cyan"),
                Text(_si(site.history.tokens_per_s()), style="green"),
                _percent(last.get("compute_utilization") if last is not None else None),
                Text(state, style=_STATE_STYLES.get(state.split(" ")[0], "")),
                Text(_megabytes(last.get("wan_bytes_sent") if last is not None else None), style="magenta"),
                _eta(state, eta if total else None),
            )
        return table

    def _state(self, site: _Watched, *, now: float, shape: RunShape) -> str:
        if site.mark == "lost":
            return "lost"
        last = site.history.last
        if site.mark.startswith("restarted") and (last is None or float(last.get("time", 0.0)) < site.marked_at):
            return "restarting"
        if site.mark == "done" or (last is not None and site.total_steps and int(last["step"]) >= site.total_steps):
            return "done"
        return exchange_state(site.history, shape, now=now)

    def _link_table(self, gap: int) -> Table | None:
        rows = [(s, self._links[s.name]) for s in self._sites.values() if s.name in self._links]
        if not rows:
            return None
        table = _table(gap)
        table.add_column("link Mb/s", no_wrap=True, overflow="ellipsis", max_width=12)
        table.add_column("up 60s", justify="right", no_wrap=True)
        table.add_column("in exch", justify="right", no_wrap=True)
        table.add_column("of", justify="right", no_wrap=True)
        table.add_column("use", justify="right", no_wrap=True)
        table.add_column("down 60s", justify="right", no_wrap=True)
        table.add_column("in exch", justify="right", no_wrap=True)
        table.add_column("of", justify="right", no_wrap=True)
        for site, (up, down) in rows:
            rates = site.history.link_rates()
            use = rates.up_exchange / up if rates.up_exchange is not None else None
            table.add_row(
                Text(site.name, style="bold"),
                _rate(rates.up_now),
                _rate(rates.up_exchange),
                _rate(up),
                _percent(use),
                _rate(rates.down_now),
                _rate(rates.down_exchange),
                _rate(down),
            )
        return table


_STATE_STYLES = {
    "sending": "magenta",
    "waiting": "yellow",
    "in": "magenta",  # in flight
    "applied": "green",
    "failed": "red",
    "lost": "bold red",
    "restarting": "yellow",
    "quiet": "yellow",
    "done": "green",
}


def _table(gap: int) -> Table:
    """A borderless table with `gap` spaces between its columns."""
    return Table(box=None, pad_edge=False, padding=(0, gap, 0, 0), header_style="bold", show_edge=False)


def _eta(state: str, seconds: float | None) -> str:
    if state == "done":
        return "done"
    return "-" if state in ("lost", "restarting") else _duration(seconds)


def _loss(record: dict[str, object] | None) -> str:
    value = record.get("loss") if record is not None else None
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}"  # six characters either way


def _si(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def _percent(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) else "-"


def _megabytes(value: object) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    mb = value / 1e6
    if mb < 1000:
        return f"{mb:.1f}"
    return f"{mb:,.0f}" if mb < 100_000 else _si(mb)


def _rate(mbps: float | None) -> str:
    if mbps is None:
        return "-"
    if mbps < 10:
        return f"{mbps:.2f}"
    if mbps < 1000:
        return f"{mbps:.1f}"
    return f"{mbps:,.0f}"


def _duration(seconds: float | None) -> str:
    """``1:02:03``, ``12:34``; ``4d03h`` past 99 hours; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h > 99:
        return f"{h // 24}d{h % 24:02d}h"
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
