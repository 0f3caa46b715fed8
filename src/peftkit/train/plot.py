"""loss.png: the training loss curve, with numeric eval metrics on a second y axis.

Draws on a bare `matplotlib.figure.Figure` with the Agg canvas, so it never touches pyplot or the global backend.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["plot_metrics"]


def _eval_series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} for every numeric eval value in the records."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for key, value in (r.get("eval") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(key, ([], []))
                steps.append(r["step"])
                values.append(float(value))
    return series


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Write the loss curve (+ eval metrics) of `records` (metrics.jsonl rows) to `path` as a PNG.

    Returns the path, or None (with a warning) when matplotlib is not installed (`pip install peftkit[plot]`).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed, so loss.png is skipped; pip install 'peftkit[plot]'",
                      UserWarning, stacklevel=2)
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    losses = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    ax.plot([s for s, _ in losses], [v for _, v in losses], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    series = _eval_series(records)
    if series:
        ax2 = ax.twinx()
        for key, (steps, values) in series.items():
            ax2.plot(steps, values, marker="o", linestyle="--", label=f"eval {key}")
        ax2.set_ylabel("eval")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
