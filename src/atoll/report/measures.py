"""Numbers a run report shows, derived from a `RunData`: per site and per link.

Pure Python; each function returns plain values (None where the run cannot tell), and the page
decides how to show them ("n/a").
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from atoll.report.rundata import RunData, SiteRun


@dataclass
class SiteMeasures:
    """One site's totals at its last step record."""

    name: str
    steps: int
    tokens: int
    wall_seconds: float
    compute_seconds: float
    wait_seconds: float
    utilization: float | None
    tokens_per_s: float | None
    """Tokens over the site's wall-clock (what the run achieved, waits included)."""
    median_step_seconds: float | None
    val_loss: float | None
    mfu: float | None
    """Model FLOP/s over the wall-clock, divided by the site's peak (None: no topology or model)."""
    mfu_compute: float | None
    """The same over compute time only: what the chips reach when they are not waiting."""
    peak_flops: float | None
    peak_note: str


def _last_step(site: SiteRun) -> dict[str, Any]:
    steps = site.steps
    return steps[-1] if steps else {}


def site_peak_flops(run: RunData, site: str) -> tuple[float | None, str]:
    """The site's peak FLOP/s from the topology's devices and the hardware catalog, and how it
    was found (an emulated slowdown divides the chip's peak: it stands for a slower chip)."""
    if run.topology is None:
        return None, "n/a: no topology names the devices"
    names = [s.name for s in run.topology.sites]
    if site not in names:
        return None, f"n/a: the topology has no site {site!r}"
    from atoll.errors import AtollError
    from atoll.hardware.registry import get_device

    total, parts = 0.0, []
    for group in run.topology.site(site).devices:
        try:
            spec = get_device(group.kind)
        except AtollError:
            return None, f"n/a: {group.kind} is not in the hardware catalog"
        total += group.count * spec.peak_flops / group.slowdown
        slow = f" / slowdown {group.slowdown:g}" if group.slowdown != 1.0 else ""
        parts.append(f"{group.count} x {spec.name} {spec.peak_tflops:g} TFLOP/s{slow}")
    return total, "; ".join(parts)


def flops_per_token(run: RunData) -> float | None:
    """Training FLOPs per token of the run's model (the planner's count: 6N + attention)."""
    if run.model is None:
        return None
    from atoll.planner.cost import training_flops_per_token

    seq_len = int((run.config.get("data") or {}).get("seq_len") or run.model.max_seq_len)
    return training_flops_per_token(run.model, seq_len=seq_len)


def site_measures(run: RunData) -> list[SiteMeasures]:
    """Per-site totals, in the run's site order."""
    fpt = flops_per_token(run)
    out = []
    for site in run.sites:
        last = _last_step(site)
        wall = float(last.get("wall_seconds", 0.0))
        compute = float(last.get("compute_seconds", 0.0))
        tokens = int(last.get("tokens_seen", 0))
        peak, note = site_peak_flops(run, site.name)
        mfu = mfu_c = None
        if fpt is not None and peak and tokens:
            mfu = tokens * fpt / wall / peak if wall > 0 else None
            mfu_c = tokens * fpt / compute / peak if compute > 0 else None
        elif fpt is None:
            note = "n/a: no model.json"
        seconds = [float(r["step_seconds"]) for r in site.steps]
        vals = site.vals
        out.append(
            SiteMeasures(
                name=site.name,
                steps=int(last.get("step", 0)),
                tokens=tokens,
                wall_seconds=wall,
                compute_seconds=compute,
                wait_seconds=float(last.get("sync_wait_seconds", 0.0)),
                utilization=last.get("compute_utilization"),
                tokens_per_s=tokens / wall if wall > 0 else None,
                median_step_seconds=statistics.median(seconds) if seconds else None,
                val_loss=vals[-1]["val_loss"] if vals else None,
                mfu=mfu,
                mfu_compute=mfu_c,
                peak_flops=peak,
                peak_note=note,
            )
        )
    return out


@dataclass
class LinkMeasures:
    """A site's uplink (what it sends) and downlink (what it receives) over the run."""

    site: str
    up_mbps: float | None
    down_mbps: float | None
    latency_ms: float | None
    bytes_sent: int
    bytes_received: int
    exchanges: int
    busy_seconds: float
    wall_seconds: float

    @property
    def share_while_busy(self) -> float | None:
        """Uplink bits per busy second over its rate: how full the link was during exchanges."""
        if not self.up_mbps or self.busy_seconds <= 0:
            return None
        return self.bytes_sent * 8 / self.busy_seconds / (self.up_mbps * 1e6)

    @property
    def share_of_run(self) -> float | None:
        """Uplink bits over the whole run's wall-clock, over the rate."""
        if not self.up_mbps or self.wall_seconds <= 0:
            return None
        return self.bytes_sent * 8 / self.wall_seconds / (self.up_mbps * 1e6)


def link_measures(run: RunData) -> list[LinkMeasures]:
    """Per site (each site has one link to the WAN core in a topology), from the last record
    holding WAN counters."""
    out = []
    for site in run.sites:
        last = next((r for r in reversed(site.records) if "wan_bytes_sent" in r), None)
        if last is None:
            continue
        link = run.topology.link(site.name) if run.topology is not None else None
        wall = float(_last_step(site).get("wall_seconds", 0.0))
        out.append(
            LinkMeasures(
                site=site.name,
                up_mbps=link.uplink_mbps if link is not None else None,
                down_mbps=link.down_mbps if link is not None else None,
                latency_ms=link.latency_ms if link is not None else None,
                bytes_sent=int(last.get("wan_bytes_sent", 0)),
                bytes_received=int(last.get("wan_bytes_received", 0)),
                exchanges=int(last.get("wan_exchanges", 0)),
                busy_seconds=float(last.get("wan_seconds", 0.0)),
                wall_seconds=wall,
            )
        )
    return out


def bottleneck(links: list[LinkMeasures]) -> LinkMeasures | None:
    """The slowest link by rate (up or down): every all-gather waits on it."""
    rated = [lk for lk in links if lk.up_mbps]
    if len(rated) < 2:
        return rated[0] if rated else None
    return min(rated, key=lambda lk: min(lk.up_mbps or 0.0, lk.down_mbps or lk.up_mbps or 0.0))


def link_rate_series(site: SiteRun) -> list[tuple[float, float, float]]:
    """(unix time, Mbit/s sent while exchanging, Mbit/s received while exchanging) per record
    interval in which the site exchanged."""
    out = []
    prev: dict[str, Any] = {}
    for rec in site.steps:
        seconds = float(rec.get("wan_seconds", 0.0)) - float(prev.get("wan_seconds", 0.0))
        sent = float(rec.get("wan_bytes_sent", 0)) - float(prev.get("wan_bytes_sent", 0))
        received = float(rec.get("wan_bytes_received", 0)) - float(prev.get("wan_bytes_received", 0))
        if seconds > 0 and (sent > 0 or received > 0):
            out.append((float(rec["time"]), sent * 8 / seconds / 1e6, received * 8 / seconds / 1e6))
        prev = rec
    return out


@dataclass
class Agreement:
    """Whether the sites hold the same parameters."""

    digests: dict[str, str | None]
    """Each site's final θ digest (hex), None where the site recorded none."""
    checked_steps: list[int]
    """Steps at which a round was applied and every site logged a parameter checksum (between
    rounds each site's parameters drift apart by design, so only these are compared)."""
    differing_steps: list[int]
    """Those at which the checksums differed."""

    @property
    def final_agree(self) -> bool | None:
        values = set(self.digests.values())
        if None in values:
            return None
        return len(values) == 1


def agreement(run: RunData) -> Agreement:
    """Final digests, and the parameters' checksums compared at the steps a round was applied."""
    digests = {s.name: (s.final or {}).get("theta_digest") for s in run.sites}
    applied: set[int] = set()
    for site in run.sites:
        applied |= {int(a) for a, _ in (site.final or {}).get("sync_applied") or []}
    by_step: dict[int, dict[str, float]] = {}
    for site in run.sites:
        for rec in site.steps:
            if "params_checksum" in rec and int(rec["step"]) in applied:
                by_step.setdefault(int(rec["step"]), {})[site.name] = float(rec["params_checksum"])
    complete = sorted(s for s, v in by_step.items() if len(v) == len(run.sites))
    differing = [s for s in complete if len(set(by_step[s].values())) > 1]
    return Agreement(digests=digests, checked_steps=complete, differing_steps=differing)


def sync_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The sync settings that matter for the run's strategy (what a reader compares runs by)."""
    sync = config.get("sync") or {}
    strategy = sync.get("strategy", "n/a")
    keys = ["strategy", "inner_steps", "site_inner_steps", "round_seconds", "codec"]
    codec = sync.get("codec")
    if codec in ("int8", "int4"):
        keys.append("block_size")
    elif codec == "topk":
        keys.append("topk_fraction")
    elif codec == "lowrank":
        keys.append("rank")
    if codec not in (None, "none"):
        keys.append("error_feedback")
    if strategy == "streaming":
        keys += ["fragments", "overlap_steps"]
    if strategy != "ddp":
        keys += ["outer_lr", "outer_momentum", "nesterov"]
    keys += ["min_sites", "timeout_seconds"]
    return {k: sync.get(k) for k in keys if k in sync and sync.get(k) not in (None, {}, [])}
