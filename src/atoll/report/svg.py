"""Plots as inline SVG, written in Python: a report opens offline and needs no plotting library.

Two kinds: `line_chart` (series of points against a shared x axis, with a legend and a readout
that the page's script fills on hover) and `gantt` (one lane per site, rows of bars and
instants). A chart with no data is not drawn: the caller gets a one-line note instead, so every
``<figure class="plot">`` on a page has data (the browser test checks that).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from atoll.report.timeline import KINDS, ROWS, Segment

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f")
"""Site colours, in site order; the same site has the same colour in every chart of a run."""

SEGMENT_COLORS = {
    "compute": "#4c9be8",
    "wait": "#f5a623",
    "exchange": "#9b59b6",
    "heal": "#16a085",
    "eval": "#2ecc71",
    "checkpoint": "#7f8c8d",
    "failure": "#e74c3c",
    "membership": "#34495e",
}

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 16, 12, 40


@dataclass
class Series:
    """One line of a chart; `markers` draws its points (for sparse series such as validation)."""

    label: str
    xs: list[float]
    ys: list[float]
    color: str
    dashed: bool = False
    markers: bool = False
    points: list[tuple[float, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.points = [(x, y) for x, y in zip(self.xs, self.ys) if _finite(x) and _finite(y)]


def _finite(v: float | None) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def time_unit(span_seconds: float) -> tuple[str, float]:
    """The unit a wall-clock axis reads best in: (name, seconds per unit)."""
    if span_seconds < 180:
        return "s", 1.0
    if span_seconds < 3 * 3600:
        return "min", 60.0
    return "h", 3600.0


def nice_ticks(lo: float, hi: float, *, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (_finite(lo) and _finite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def fmt(v: float) -> str:
    """A number for an axis or a readout: short, with SI suffixes for big ones."""
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a == 0:
        return "0"
    return f"{v:.4g}"


def no_data(title: str, why: str) -> str:
    """What stands where a chart has nothing to draw."""
    return f'<p class="na"><b>{esc(title)}</b>: n/a ({esc(why)})</p>'


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 260,
    y_zero: bool = False,
    y_max: float | None = None,
    why_empty: str = "no records hold it",
) -> str:
    """A line chart as a ``<figure class="plot">``, or `no_data` when no series has a point."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return no_data(title, why_empty)
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(0.0, min(ys)) if y_zero else min(ys)), max(ys)
    if y_max is not None:
        y1 = max(y1, y_max)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 0.5), y1 + (abs(y1) * 0.1 or 0.5)
    pad = (y1 - y0) * 0.05
    y0, y1 = (y0 if y_zero and y0 == 0 else y0 - pad), y1 + pad
    pw, ph = width - MARGIN_LEFT - MARGIN_RIGHT, height - MARGIN_TOP - MARGIN_BOTTOM

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return MARGIN_TOP + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'data-x0="{x0}" data-x1="{x1}" data-px0="{MARGIN_LEFT}" data-px1="{MARGIN_LEFT + pw}" '
        f'role="img" aria-label="{esc(title)}">'
    ]
    parts += _axes(x0, x1, y0, y1, px, py, width=width, height=height, x_label=x_label, y_label=y_label)
    for i, s in enumerate(drawn):
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        dash = ' stroke-dasharray="5,3"' if s.dashed else ""
        xy = json.dumps([[round(x, 6), round(y, 6)] for x, y in s.points], separators=(",", ":"))
        parts.append(
            f'<g class="series" data-index="{i}" data-label="{esc(s.label)}" data-points="{len(s.points)}" '
            f"data-xy='{esc(xy)}'>"
        )
        if len(s.points) > 1:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="1.6"{dash}/>')
        if s.markers or len(s.points) == 1:
            for x, y in s.points:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{s.color}">'
                    f"<title>{esc(s.label)}: {fmt(y)} at {fmt(x)}</title></circle>"
                )
        parts.append("</g>")
    parts.append(
        f'<line class="cursor" x1="0" x2="0" y1="{MARGIN_TOP}" y2="{MARGIN_TOP + ph}" '
        'stroke="#999" visibility="hidden"/>'
    )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key" data-index="{i}"><i style="background:{s.color}"></i>{esc(s.label)}</span>'
        for i, s in enumerate(drawn)
    )
    return (
        f'<figure class="plot" data-kind="line" data-series="{len(drawn)}"><figcaption>{esc(title)}</figcaption>'
        f'{"".join(parts)}<div class="legend">{legend}</div><div class="readout"></div></figure>'
    )


def _axes(
    x0: float,
    x1: float,
    y0: float,
    y1: float,
    px: Callable[[float], float],
    py: Callable[[float], float],
    *,
    width: int,
    height: int,
    x_label: str,
    y_label: str,
) -> list[str]:
    bottom, right = height - MARGIN_BOTTOM, width - MARGIN_RIGHT
    out = [
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{right - MARGIN_LEFT}" height="{bottom - MARGIN_TOP}" '
        'fill="#fff" stroke="#ccc"/>'
    ]
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            y = py(t)
            out.append(f'<line x1="{MARGIN_LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{MARGIN_LEFT - 5}" y="{y + 4:.1f}" text-anchor="end" class="tick">{fmt(t)}</text>')
    for t in nice_ticks(x0, x1, count=6):
        if x0 <= t <= x1:
            x = px(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="#888"/>')
            out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" class="tick">{fmt(t)}</text>')
    out.append(
        f'<text x="{(MARGIN_LEFT + right) / 2:.0f}" y="{height - 6}" text-anchor="middle" class="label">'
        f"{esc(x_label)}</text>"
    )
    mid = (MARGIN_TOP + bottom) / 2
    out.append(
        f'<text x="14" y="{mid:.0f}" text-anchor="middle" class="label" transform="rotate(-90 14 {mid:.0f})">'
        f"{esc(y_label)}</text>"
    )
    return out


LANE_ROW_HEIGHT = {"site": 18, "wan": 12, "events": 10}
LANE_LABEL_WIDTH = 90


def gantt(
    lanes: Sequence[tuple[str, list[Segment]]],
    *,
    title: str,
    span_seconds: float,
    width: int = 1120,
) -> str:
    """One lane per site: its main row (compute, wait, evaluation, checkpoint), its WAN row
    (exchanges in flight, heals) and its events (failures, membership) as ticks."""
    if not lanes or not any(segs for _, segs in lanes):
        return no_data(title, "no step records")
    unit, per = time_unit(span_seconds)
    span = max(span_seconds, 1e-9)
    pw = width - LANE_LABEL_WIDTH - MARGIN_RIGHT
    lane_h = sum(LANE_ROW_HEIGHT.values()) + 10
    height = MARGIN_TOP + lane_h * len(lanes) + 30

    def px(t: float) -> float:
        return LANE_LABEL_WIDTH + max(0.0, min(t, span)) / span * pw

    parts = [
        f'<svg class="gantt" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(title)}">'
    ]
    for t in nice_ticks(0.0, span / per, count=10):
        x = px(t * per)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_TOP}" y2="{height - 26}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" text-anchor="middle" class="tick">{fmt(t)}</text>')
    parts.append(
        f'<text x="{width - MARGIN_RIGHT}" y="{height - 1}" text-anchor="end" class="label">'
        f"wall-clock since the run's start ({unit})</text>"
    )
    for i, (site, segments) in enumerate(lanes):
        top = MARGIN_TOP + i * lane_h
        parts.append(f'<g class="lane" data-site="{esc(site)}" data-segments="{len(segments)}">')
        parts.append(f'<text x="4" y="{top + 14}" class="lane-label">{esc(site)}</text>')
        y = top
        for row in ROWS:
            h = LANE_ROW_HEIGHT[row]
            parts.append(f'<text x="{LANE_LABEL_WIDTH - 4}" y="{y + h - 3}" text-anchor="end" class="row">{row}</text>')
            for seg in (s for s in segments if s.row == row):
                parts.append(_segment(seg, px, y=y, h=h))
            y += h
        parts.append("</g>")
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:{SEGMENT_COLORS[k]}"></i>{esc(text)}</span>'
        for k, text in KINDS.items()
    )
    return (
        f'<figure class="plot timeline" data-kind="gantt" data-lanes="{len(lanes)}"><figcaption>{esc(title)}'
        f'</figcaption>{"".join(parts)}<div class="legend">{legend}</div></figure>'
    )


def _segment(seg: Segment, px: Callable[[float], float], *, y: float, h: int) -> str:
    color = SEGMENT_COLORS[seg.kind]
    tip = f"<title>{esc(KINDS[seg.kind])}: {esc(seg.label)} ({seg.start:.3f}-{seg.end:.3f} s)</title>"
    x0, x1 = px(seg.start), px(seg.end)
    if seg.end <= seg.start:  # an instant
        return f'<path class="seg seg-{seg.kind}" d="M{x0:.1f},{y + 1} l4,{h - 2} h-8 z" fill="{color}">{tip}</path>'
    return (
        f'<rect class="seg seg-{seg.kind}" x="{x0:.2f}" y="{y + 1}" width="{max(x1 - x0, 0.6):.2f}" '
        f'height="{h - 2}" fill="{color}">{tip}</rect>'
    )
