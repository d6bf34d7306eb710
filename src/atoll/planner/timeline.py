"""Draw a simulated timeline as a PNG: one compute lane and one WAN lane per site (a Gantt chart)."""

from __future__ import annotations

from pathlib import Path

from atoll.planner.simulate import SimResult

COLORS = {"compute": "#4caf50", "wait": "#ff9800", "exchange": "#2196f3", "down": "#e53935", "heal": "#8e24aa"}


def merged_spans(result: SimResult) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Segments grouped by (lane, kind), with back-to-back segments joined (one bar per busy span)."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for seg in sorted(result.segments, key=lambda s: (s.lane, s.kind, s.start)):
        spans = out.setdefault((seg.lane, seg.kind), [])
        if spans and seg.start <= spans[-1][1] + 1e-9 * max(1.0, seg.end):
            spans[-1] = (spans[-1][0], max(spans[-1][1], seg.end))
        else:
            spans.append((seg.start, seg.end))
    return out


def draw_timeline(result: SimResult, sites: list[str], path: Path, *, title: str = "") -> Path:
    """Write the Gantt chart of `result` to `path` (PNG). Needs matplotlib; runs headless (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lanes = [lane for name in sites for lane in (name, f"{name} WAN")]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(lanes) + 1.4))
    scale, unit = (3600.0, "h") if result.wall_s > 7200 else (60.0, "min") if result.wall_s > 300 else (1.0, "s")
    for (lane, kind), spans in merged_spans(result).items():
        if lane not in lanes:
            continue
        y = len(lanes) - 1 - lanes.index(lane)
        ax.broken_barh(
            [(a / scale, (b - a) / scale) for a, b in spans], (y - 0.35, 0.7), facecolors=COLORS[kind], edgecolor="none"
        )
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(list(reversed(lanes)))
    ax.set_xlabel(f"time ({unit})")
    ax.set_xlim(0, result.wall_s / scale)
    ax.set_title(title or "simulated timeline")
    ax.legend(
        handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18 if len(lanes) < 5 else -0.1),
        ncol=len(COLORS),
        frameon=False,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
