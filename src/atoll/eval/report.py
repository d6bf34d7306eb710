"""Evaluation results: a table for the terminal, a bar chart, and the JSON record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table


def results_table(results: dict[str, Any]) -> Table:
    """Rows: stages; columns: held-out sets (perplexity, loss in brackets)."""
    sets = list(results["sets"])
    table = Table(title="perplexity on held-out sets (loss); lower is better", title_justify="left")
    table.add_column("stage")
    table.add_column("method")
    table.add_column("trainable", justify="right")
    for name in sets:
        table.add_column(name, justify="right")
    for rec in results["stages"]:
        trainable = rec.get("trainable_params")
        cells = [f"{rec['ppl'][s]:.2f} ({rec['loss'][s]:.3f})" for s in sets]
        table.add_row(rec["stage"], rec["method"], f"{trainable:,}" if isinstance(trainable, int) else "-", *cells)
    return table


def markdown_table(results: dict[str, Any]) -> str:
    sets = list(results["sets"])
    lines = [
        "| stage | method | trainable params | " + " | ".join(f"ppl {s}" for s in sets) + " |",
        "|" + "---|" * (3 + len(sets)),
    ]
    for rec in results["stages"]:
        trainable = rec.get("trainable_params")
        cells = " | ".join(f"{rec['ppl'][s]:.2f}" for s in sets)
        lines.append(
            f"| {rec['stage']} | {rec['method']} | {trainable:,} | {cells} |"
            if isinstance(trainable, int)
            else f"| {rec['stage']} | {rec['method']} | - | {cells} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """A grouped bar chart: one group per held-out set, one bar per stage (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"])
    stages = results["stages"]
    width = 0.8 / max(1, len(stages))
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(sets), 4.2))
    for i, rec in enumerate(stages):
        xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(sets))]
        values = [rec["ppl"][s] for s in sets]
        bars = ax.bar(xs, values, width=width, label=f"{rec['stage']} ({rec['method']})")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale; lower is better)")
    ax.set_xlabel("held-out set")
    ax.set_title("Perplexity by stage of the chain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return path
