"""The sections of a run report, each an HTML fragment built from a `RunData`.

`atoll.report.page` puts them together into one page; the charts come from `atoll.report.svg`,
the numbers from `atoll.report.measures`, the timeline from `atoll.report.timeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atoll.report.measures import (
    agreement,
    bottleneck,
    link_measures,
    link_rate_series,
    site_measures,
    sync_settings,
)
from atoll.report.rundata import RunData, SiteRun
from atoll.report.svg import PALETTE, Series, esc, gantt, line_chart, no_data, time_unit
from atoll.report.timeline import busy_shares, site_timeline


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def num(v: float | None, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def table(head: Sequence[str], rows: Sequence[Sequence[object]], *, cls: str = "") -> str:
    """An HTML table; cells are escaped text."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def run_span(run: RunData) -> float:
    """Seconds from the run's first record to its last."""
    ends = [s.records[-1]["time"] for s in run.sites if s.records]
    return max(ends) - run.start_time if ends else 0.0


def site_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _xy(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if x in r and y in r]
    return [float(a) for a, _ in pts], [float(b) for _, b in pts]


def _val_points(site: SiteRun) -> list[dict[str, Any]]:
    """Validation records with the tokens seen at their step (from the step record before them)."""
    out, tokens = [], None
    for r in site.records:
        if "tokens_seen" in r:
            tokens = r["tokens_seen"]
        if "val_loss" in r and tokens is not None:
            out.append({**r, "tokens_seen": tokens})
    return out


def loss_series(
    run: RunData, *, against: str, unit: float = 1.0, prefix: str = "", color: str | None = None
) -> list[Series]:
    """Train (line) and validation (dashed, points) loss of every site, against `tokens_seen`
    or wall-clock (`time`, in `unit` seconds since the run's start)."""
    out = []
    t0 = run.start_time
    for i, site in enumerate(run.sites):
        c = color or site_color(i)
        name = f"{prefix}{site.name}"
        if against == "tokens":
            xs, ys = _xy(site.steps, "tokens_seen", "loss")
            vx, vy = _xy(_val_points(site), "tokens_seen", "val_loss")
        else:
            xs, ys = _xy(site.steps, "time", "loss")
            vx, vy = _xy(site.vals, "time", "val_loss")
            xs, vx = [(x - t0) / unit for x in xs], [(x - t0) / unit for x in vx]
        out.append(Series(f"{name} train", xs, ys, c))
        out.append(Series(f"{name} validation", vx, vy, c, dashed=True, markers=True))
    return out


def header(run: RunData) -> str:
    ms = site_measures(run)
    span = run_span(run)
    unit, per = time_unit(span)
    vals = [m.val_loss for m in ms if m.val_loss is not None]
    facts = [
        ("run", str(run.path)),
        ("kind", run.kind),
        ("sites", ", ".join(s.name for s in run.sites)),
        ("model", f"{run.model.num_params():,} parameters" if run.model else "n/a (no model.json)"),
        ("steps", ", ".join(f"{m.name}: {m.steps}" for m in ms)),
        ("tokens", ", ".join(f"{m.name}: {m.tokens:,}" for m in ms)),
        ("wall-clock", f"{span / per:.3g} {unit}"),
        ("final validation loss", f"{vals[-1]:.4f}" if vals else "n/a"),
        ("topology", run.topology.name if run.topology else "n/a"),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in run.notes)
    return f'<dl class="facts">{dl}</dl>{notes}'


def loss_section(run: RunData) -> str:
    unit, per = time_unit(run_span(run))
    return (
        '<div class="row">'
        + "".join(
            [
                line_chart(
                    loss_series(run, against="tokens"),
                    title="Loss against tokens",
                    x_label="tokens seen (site)",
                    y_label="loss",
                ),
                line_chart(
                    loss_series(run, against="time", unit=per),
                    title="Loss against wall-clock",
                    x_label=f"wall-clock since the run's start ({unit})",
                    y_label="loss",
                ),
            ]
        )
        + "</div>"
    )


def timeline_section(run: RunData) -> str:
    t0 = run.start_time
    span = run_span(run)
    lanes = [(s.name, site_timeline(s, t0=t0)) for s in run.sites]
    chart = gantt(lanes, title="Per-site timeline (hover a bar for details)", span_seconds=span)
    rows = []
    for site, segs in lanes:
        shares = busy_shares(segs)
        exch = [s for s in segs if s.kind == "exchange"]
        fails = [s for s in segs if s.kind in ("failure", "membership")]
        rows.append(
            [
                site,
                *(
                    f"{shares.get(k, 0.0):.3g} s ({pct(shares.get(k, 0.0) / span if span else None)})"
                    for k in ("compute", "wait", "eval", "checkpoint")
                ),
                len(exch),
                f"{sum(s.seconds for s in exch):.3g} s",
                len(fails),
            ]
        )
    head = ["site", "compute", "waiting", "evaluation", "checkpoints", "exchanges", "in flight", "failures/events"]
    return chart + "<h4>Where the time goes</h4>" + table(head, rows, cls="num")


def wan_section(run: RunData) -> str:
    links = link_measures(run)
    if not any(lk.bytes_sent or lk.bytes_received for lk in links):
        return no_data("WAN", "a single site, or no exchange crossed the WAN")
    t0 = run.start_time
    unit, per = time_unit(run_span(run))
    cumulative, rates = [], []
    for i, site in enumerate(run.sites):
        c = site_color(i)
        xs, sent = _xy(site.steps, "time", "wan_bytes_sent")
        _, received = _xy(site.steps, "time", "wan_bytes_received")
        xs = [(x - t0) / per for x in xs]
        cumulative.append(Series(f"{site.name} sent", xs, [b / 1e6 for b in sent], c))
        cumulative.append(Series(f"{site.name} received", xs, [b / 1e6 for b in received], c, dashed=True))
        pts = link_rate_series(site)
        rx = [(t - t0) / per for t, _, _ in pts]
        rates.append(Series(f"{site.name} uplink", rx, [u for _, u, _ in pts], c, markers=True))
        link = run.topology.link(site.name) if run.topology is not None else None
        if link is not None and rx:
            rates.append(
                Series(
                    f"{site.name} uplink rate {link.uplink_mbps:g} Mbit/s",
                    [0.0, max(rx)],
                    [link.uplink_mbps] * 2,
                    c,
                    dashed=True,
                )
            )
    x_label = f"wall-clock since the run's start ({unit})"
    charts = (
        '<div class="row">'
        + line_chart(
            cumulative, title="WAN bytes per site (cumulative, MB)", x_label=x_label, y_label="MB", y_zero=True
        )
        + line_chart(
            rates,
            title="Uplink throughput while exchanging (Mbit/s; dashed: the link's rate)",
            x_label=x_label,
            y_label="Mbit/s",
            y_zero=True,
            why_empty="no interval with WAN seconds",
        )
        + "</div>"
    )
    rows = [
        [
            lk.site,
            num(lk.up_mbps, "g"),
            num(lk.down_mbps, "g"),
            num(lk.latency_ms, "g"),
            f"{lk.bytes_sent / 1e6:.4g}",
            f"{lk.bytes_received / 1e6:.4g}",
            lk.exchanges,
            f"{lk.busy_seconds:.3g}",
            pct(lk.share_while_busy),
            pct(lk.share_of_run),
        ]
        for lk in links
    ]
    head = [
        "link (site)",
        "up Mbit/s",
        "down Mbit/s",
        "latency ms",
        "MB sent",
        "MB received",
        "exchanges",
        "WAN s",
        "share while exchanging",
        "share of the run",
    ]
    slow = bottleneck(links)
    note = ""
    if slow is not None and len(links) > 1:
        note = (
            f'<p class="note">Every exchange is an all-gather over all sites: it waits on the slowest link, '
            f"<b>{esc(slow.site)}</b> ({num(slow.up_mbps, 'g')} Mbit/s up).</p>"
        )
    return charts + table(head, rows, cls="num") + note


def throughput_section(run: RunData) -> str:
    t0 = run.start_time
    unit, per = time_unit(run_span(run))
    util, tps = [], []
    for i, site in enumerate(run.sites):
        xs, u = _xy(site.steps, "time", "compute_utilization")
        util.append(Series(site.name, [(x - t0) / per for x in xs], u, site_color(i)))
        xs, t = _xy(site.steps, "time", "tokens_per_s")
        tps.append(Series(site.name, [(x - t0) / per for x in xs], t, site_color(i)))
    x_label = f"wall-clock since the run's start ({unit})"
    charts = (
        '<div class="row">'
        + line_chart(
            util,
            title="Compute utilization (compute seconds / wall seconds, cumulative)",
            x_label=x_label,
            y_label="utilization",
            y_zero=True,
            y_max=1.0,
        )
        + line_chart(tps, title="Tokens per second (per logged step)", x_label=x_label, y_label="tokens/s", y_zero=True)
        + "</div>"
    )
    rows = [
        [
            m.name,
            f"{m.tokens:,}",
            num(m.tokens_per_s, ",.0f"),
            num(m.median_step_seconds, ".3g"),
            pct(m.utilization),
            pct(m.mfu),
            pct(m.mfu_compute),
            m.peak_note,
        ]
        for m in site_measures(run)
    ]
    head = [
        "site",
        "tokens",
        "tokens/s (wall)",
        "median step s",
        "utilization",
        "MFU",
        "MFU while computing",
        "peak (hardware catalog)",
    ]
    return charts + table(head, rows, cls="num")


def sync_section(run: RunData) -> str:
    settings = sync_settings(run.config)
    if not run.multi_site:
        settings = {"strategy": "none (one site)"}
    parts = [table(["setting", "value"], [[k, v] for k, v in settings.items()])]
    if not run.multi_site:
        return parts[0]
    agree = agreement(run)
    verdict = {True: "agree", False: "DIFFER", None: "incomplete (a site recorded no final digest)"}[agree.final_agree]
    rows = [[name, (d[:16] + "…") if d else "none"] for name, d in agree.digests.items()]
    parts.append(
        f"<h4>Do the sites agree? Final θ digests: "
        f'<span class="verdict v-{esc(str(agree.final_agree).lower())}">{esc(verdict)}</span></h4>'
    )
    parts.append(table(["site", "final θ digest (SHA-256)"], rows))
    if agree.checked_steps:
        diff = ", ".join(map(str, agree.differing_steps)) or "none"
        parts.append(
            f'<p class="note">Parameter checksums compared at the {len(agree.checked_steps)} step(s) a round was '
            f"applied: they differ at {esc(diff)}.</p>"
        )
    counters = []
    for site in run.sites:
        counters.append(
            [site.name]
            + [
                site.last(k, 0)
                for k in (
                    "sync_round",
                    "wan_failed",
                    "sync_rejected",
                    "sync_refused",
                    "sync_disagreements",
                    "heals",
                    "heals_served",
                )
            ]
            + [f"{float(site.last('heal_bytes', 0)) / 1e6:.3g}"]
        )
    parts.append(
        table(
            ["site", "rounds", "failed", "rejected", "refused", "disagreements", "heals", "heals served", "heal MB"],
            counters,
            cls="num",
        )
    )
    events = [e for s in run.sites[:1] for e in ((s.final or {}).get("sync_site_events") or [])]
    if events:
        parts.append(
            table(
                ["event", "site", "step", "round", "rounds missed"],
                [
                    [e.get("event"), e.get("site"), e.get("step"), e.get("round"), e.get("rounds_missed", "")]
                    for e in events
                ],
            )
        )
    return "".join(parts)


def chain_section(run: RunData) -> str:
    """The lineage (root first) and the evaluation table, where the run has them."""
    parts = []
    if run.lineage:
        rows = [
            [
                r.get("stage"),
                r.get("method"),
                r.get("parent") or "-",
                r.get("steps") or "-",
                f"{r['tokens']:,}" if isinstance(r.get("tokens"), int) else "-",
                f"{r['trainable_params']:,}" if isinstance(r.get("trainable_params"), int) else "-",
                num(r.get("val_loss"), ".4f"),
            ]
            for r in run.lineage
        ]
        parts.append(
            "<h4>Lineage (root first)</h4>"
            + table(["stage", "method", "parent", "steps", "tokens", "trainable", "val loss"], rows)
        )
    if run.eval_results:
        sets = list(run.eval_results["sets"])
        rows = [
            [r["stage"], r.get("method", "")] + [f"{r['ppl'][s]:.2f} ({r['loss'][s]:.3f})" for s in sets]
            for r in run.eval_results["stages"]
        ]
        parts.append(
            "<h4>Evaluation: perplexity (loss) on held-out sets, lower is better</h4>"
            + table(["stage", "method", *sets], rows, cls="num")
        )
    return "".join(parts)


def _rounds_run(steps: Sequence[int]) -> str:
    """The inner steps a site ran per round: the first round's (a plan's split), then the mean of
    the others (re-measured)."""
    if not steps:
        return "n/a"
    if len(steps) == 1:
        return str(steps[0])
    return f"{steps[0]} then {sum(steps[1:]) / len(steps[1:]):.3g}"


def plan_section(run: RunData) -> str:
    """The plan's predictions beside what the run measured."""
    plan = run.plan
    if plan is None:
        return ""
    measured = {m.name: m for m in site_measures(run)}
    sites = {site.name: site for site in run.sites}
    rows = []
    for s in plan.sites:
        m = measured.get(s.name)
        pred = s.predicted
        rounds = sites[s.name].last("sync_rounds") if s.name in sites else None
        steps = [int(r[1]) for r in rounds or []]
        rows.append(
            [
                s.name,
                s.inner_steps,
                _rounds_run(steps),
                num(pred.step_s if pred else None, ".4g"),
                num(m.median_step_seconds if m else None, ".4g"),
                pct(pred.mfu if pred else None),
                pct(m.mfu if m else None),
                pct(plan.predicted.utilization if plan.predicted else None),
                pct(m.utilization if m else None),
            ]
        )
    head = [
        "site",
        "planned H",
        "H run (first round, then mean)",
        "predicted step s",
        "measured median step s",
        "predicted MFU",
        "measured MFU",
        "predicted utilization",
        "measured utilization",
    ]
    efficiency = plan.predicted.efficiency if plan.predicted else None
    predicted = f"; predicted efficiency {pct(efficiency)} of the sites' summed throughput" if efficiency else ""
    return (
        f"<p>Plan for <b>{esc(plan.model)}</b> on {esc(plan.topology)} ({esc(plan.sync.strategy)}, "
        f"H={plan.sync.inner_steps}, codec {esc(plan.sync.codec)}){predicted}</p>" + table(head, rows, cls="num")
    )


def comparison_section(runs: Sequence[RunData]) -> str:
    """Several runs on the same axes, and a summary row each."""
    tokens, hours = [], []
    span = max(run_span(r) for r in runs)
    unit, per = time_unit(span)
    for i, run in enumerate(runs):
        c = site_color(i)
        tokens += loss_series(run, against="tokens", prefix=f"{run.label}/", color=c)
        hours += loss_series(run, against="time", unit=per, prefix=f"{run.label}/", color=c)
    charts = (
        '<div class="row">'
        + line_chart(tokens, title="Loss against tokens, all runs", x_label="tokens seen (site)", y_label="loss")
        + line_chart(
            hours,
            title="Loss against wall-clock, all runs",
            x_label=f"wall-clock since each run's start ({unit})",
            y_label="loss",
        )
        + "</div>"
    )
    rows = []
    for run in runs:
        ms = site_measures(run)
        vals = [m.val_loss for m in ms if m.val_loss is not None]
        sync = sync_settings(run.config) if run.multi_site else {}
        rows.append(
            [
                run.label,
                run.kind,
                len(run.sites),
                sync.get("strategy", "-"),
                sync.get("inner_steps", "-"),
                sync.get("codec", "-"),
                f"{sum(m.tokens for m in ms):,}",
                f"{run_span(run) / per:.3g} {unit}",
                num(vals[-1] if vals else None, ".4f"),
                pct(min((m.utilization for m in ms if m.utilization is not None), default=None)),
            ]
        )
    head = [
        "run",
        "kind",
        "sites",
        "strategy",
        "H",
        "codec",
        "tokens (all sites)",
        "wall-clock",
        "final val loss",
        "lowest utilization",
    ]
    return charts + table(head, rows, cls="num")
