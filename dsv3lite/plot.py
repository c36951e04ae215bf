"""Plots of a training run, read from its ``metrics.jsonl``, and of benchmark results.

``plot_run(DIR)`` draws the loss curves (train and validation, main and MTP) and the load
balance (MaxVio per MoE layer, [LF] Eq. 4) against optimizer steps.
``plot_fp8_gemm(RESULTS)`` draws the GEMM throughput that ``benchmarks/fp8.py`` measured.
``plot_timeline(TIMELINE)`` draws a pipeline schedule like [V3] Fig. 5.
``slider_frames(draw, values, label=...)`` is a slider for pages without a kernel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

# matplotlib (and IPython, for the slider) is imported inside each drawing function, not
# here: `import dsv3lite` loads this module, and pyplot alone adds a few tenths of a
# second to every import of the package, plotting or not. Only these third-party
# imports wait; the package's own imports stay at the top (tests/test_architecture.py).
# So matplotlib's objects (axes, figures) and IPython's HTML are typed Any here: naming
# their classes would need those imports (a TYPE_CHECKING-only import leaves the API
# reference's signatures unresolved). A pipeline Timeline is Any too: plot sits below
# dsv3lite.pipeline in the layers and cannot import it.

__all__ = ["read_metrics", "plot_run", "latest_results", "plot_fp8_gemm", "plot_timeline",
           "slider_frames"]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (``path`` may be the run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(path: str | Path, label: Optional[str] = None,
             axes: Optional[Sequence[Any]] = None) -> Any:
    """Loss and MaxVio curves of one run; pass ``axes`` (two of them) to overlay runs.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    label = label or Path(path).name
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    else:
        fig = axes[0].figure
    loss_ax, vio_ax = axes
    train = [r for r in records if "train" in r]
    val = [r for r in records if "val" in r]
    line, = loss_ax.plot([r["step"] for r in train], [r["train"]["main"] for r in train],
                         alpha=0.6, label=f"{label}: train")
    loss_ax.plot([r["step"] for r in val], [r["val"]["main"] for r in val], "o-",
                 color=line.get_color(), label=f"{label}: validation")
    if any(r["val"].get("mtp") for r in val):
        loss_ax.plot([r["step"] for r in val], [r["val"]["mtp"] for r in val], "--",
                     color=line.get_color(), alpha=0.7, label=f"{label}: validation MTP")
    loss_ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats / token)",
                title="loss")
    loss_ax.legend(fontsize="small")
    n_layers = max((len(r.get("max_vio", [])) for r in train), default=0)
    for i in range(n_layers):
        vio_ax.plot([r["step"] for r in train], [r["max_vio"][i] for r in train],
                    label=f"{label}: MoE layer {i}")
    vio_ax.set(xlabel="optimizer step", ylabel="MaxVio (max load / mean load − 1)",
               title="expert load imbalance")
    if n_layers:
        vio_ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def latest_results(area: str, folder: str | Path = "benchmarks/results") -> Optional[Path]:
    """The newest ``<area>-<gpu>-<yyyymmdd>.json`` a benchmark wrote, or None.

    Args:
        area: The benchmark's name, e.g. ``"fp8"`` for ``benchmarks/fp8.py``.
        folder: Where the results files are.
    """
    files = sorted(Path(folder).glob(f"{area}-*.json"), key=lambda p: p.stem[-8:])
    return files[-1] if files else None


def plot_fp8_gemm(results: str | Path | dict[str, Any], ax: Any = None) -> Any:
    """TFLOPS of every GEMM shape in a ``benchmarks/fp8.py`` results file.

    One group of bars per (M, N, K): our Triton ``fp8_gemm``, the cuBLAS blockwise peer
    ``F.scaled_mm`` (where it ran) and a bf16 matmul of the same shape.

    Args:
        results: The JSON file (or its parsed dict).
        ax: A matplotlib axis to draw on (default: a new figure).

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    data: dict[str, Any] = (results if isinstance(results, dict)
                            else json.loads(Path(results).read_text()))
    rows = data.get("gemm", []) + data.get("wgrad_gemm", [])
    if not rows:
        raise ValueError("results has no 'gemm' rows: is it a benchmarks/fp8.py file?")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 4))
    x = np.arange(len(rows))
    series = [("fp8_triton_tflops", "dsv3lite fp8_gemm (Triton)"),
              ("scaled_mm_tflops", "F.scaled_mm blockwise (cuBLAS)"),
              ("bf16_matmul_tflops", "bf16 matmul")]
    for i, (key, label) in enumerate(series):
        values = [r.get(key) or 0.0 for r in rows]
        ax.bar(x + (i - 1) * 0.27, values, width=0.27, label=label)
    names = [f"{r['M']}×{r['N']}×{r['K']}" + (" Wgrad" if r.get("b_tiles") == "1x128" else "")
             for r in rows]
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize="small")
    ax.set(ylabel="TFLOP/s", xlabel="GEMM shape M×N×K",
           title=f"block-scaled FP8 GEMM on {data.get('device', '?')} "
                 f"(torch {data.get('torch', '?')}, triton {data.get('triton', '?')})")
    ax.legend(fontsize="small")
    ax.figure.tight_layout()
    return ax.figure


# Direction 0 in blues, direction 1 in oranges; lighter = forward, darker = backward.
_PIPE_COLORS = {("F", 0): "#9ecae1", ("B", 0): "#3182bd", ("F", 1): "#fdd0a2",
                ("B", 1): "#e6550d", ("W", 0): "#c7e9c0", ("W", 1): "#c7e9c0"}


def plot_timeline(timeline: Any, ax: Any = None, title: Optional[str] = None,
                  labels: bool = True) -> Any:
    """Draw a pipeline timeline like [V3] Fig. 5: ranks as rows, time to the right.

    Each op is a box numbered with its micro-batch: forwards light, backwards dark, in
    blue for direction 0 and orange for direction 1; a split backward (input gradient
    only) is hatched, a deferred weight gradient W is green; an overlapped F&B pair is
    one box with a thick black edge, its forward drawn in the top half and its backward
    in the bottom half.

    Args:
        - timeline: A :class:`dsv3lite.pipeline.Timeline` (from ``simulate`` or from an
          executor result's ``timeline()``).
        - ax: A matplotlib axes to draw on (a new figure if None).
        - title: Axes title (default: the schedule, ranks and micro-batches).
        - labels: Write the micro-batch numbers in the boxes.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    schedule = timeline.schedule
    n = schedule.n_ranks
    if ax is None:
        fig, ax = plt.subplots(figsize=(12, 0.45 * n + 1.2))
    else:
        fig = ax.figure
    span = max(timeline.makespan, 1e-12)

    def box(x0, x1, y0, height, part):
        color = _PIPE_COLORS[(part.kind, part.direction)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, height, facecolor=color,
                               edgecolor="white", linewidth=0.6,
                               hatch="//" if part.kind == "B" and part.split else None))
        if labels and (x1 - x0) / span > 0.012:
            dark = part.kind == "B"
            ax.text((x0 + x1) / 2, y0 + height / 2, str(part.microbatch), ha="center",
                    va="center", fontsize=7, color="white" if dark else "black",
                    bbox=dict(facecolor=color, edgecolor="none", pad=0.6))

    for e in timeline.events:
        y = n - 1 - e.rank
        if e.op.kind == "FB":
            box(e.start, e.end, y + 0.5, 0.45, e.op.forward)
            box(e.start, e.end, y + 0.05, 0.45, e.op.backward)
            ax.add_patch(Rectangle((e.start, y + 0.05), e.end - e.start, 0.9, fill=False,
                                   edgecolor="black", linewidth=1.2))
        else:
            box(e.start, e.end, y + 0.05, 0.9, e.op)
    ax.set_xlim(0, span)
    ax.set_ylim(0, n)
    ax.set_yticks([n - 1 - r + 0.5 for r in range(n)], [f"rank {r}" for r in range(n)])
    ax.set_xlabel("time")
    ax.set_title(title or f"{schedule.name}: {n} ranks, {schedule.n_microbatches} "
                 f"micro-batches, makespan {timeline.makespan:.4g}")
    handles = [Patch(facecolor=_PIPE_COLORS[("F", 0)], label="F (direction 0)"),
               Patch(facecolor=_PIPE_COLORS[("B", 0)], label="B (direction 0)"),
               Patch(facecolor="white", edgecolor="grey", hatch="//",
                     label="B, input gradient only"),
               Patch(facecolor=_PIPE_COLORS[("W", 0)], label="W (weights)"),
               Patch(facecolor="white", edgecolor="black", linewidth=1.2,
                     label="overlapped F&B pair")]
    if any(e.op.direction == 1 or (e.op.kind == "FB" and e.op.backward.direction == 1)
           for e in timeline.events):
        handles[2:2] = [Patch(facecolor=_PIPE_COLORS[("F", 1)], label="F (direction 1)"),
                        Patch(facecolor=_PIPE_COLORS[("B", 1)], label="B (direction 1)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)
    fig.tight_layout()
    return fig


def slider_frames(draw: Callable[[float, Any], object], values: Iterable[float], *, label: str,
                  figsize: tuple[float, float] = (6.5, 3.6), interval: int = 700) -> Any:
    """A slider that works without a kernel: one precomputed frame per value.

    The ipywidgets sliders of the chapters need a running kernel; a rendered page has
    none. This draws ``draw(value, ax)`` for every value in advance and returns
    matplotlib's JavaScript animation (frames embedded as PNGs, a frame slider and play
    buttons, no network), which a static page can show.

    Args:
        draw: ``draw(value, ax)`` plots one value on ``ax``.
        values: The slider positions, in order (at least one).
        label: Name of the value, shown in each frame's title.
        figsize, interval: Figure size and milliseconds between frames when playing.

    Returns:
        An ``IPython.display.HTML`` object (display it, or let it be a cell's value).
    """
    import matplotlib.pyplot as plt
    from IPython.display import HTML
    from matplotlib.animation import FuncAnimation

    values = list(values)
    if not values:
        raise ValueError("values is empty: give at least one slider position")
    fig, ax = plt.subplots(figsize=figsize)

    def frame(i):
        ax.clear()
        draw(values[i], ax)
        ax.set_title(f"{label} = {values[i]:.3g}  ({i + 1} of {len(values)})",
                     fontsize="medium")
        fig.tight_layout()  # keep the axis labels clear of the player's controls

    animation = FuncAnimation(fig, frame, frames=len(values), interval=interval)
    html = animation.to_jshtml(default_mode="once")
    plt.close(fig)
    # matplotlib's player takes its button icons from a CDN stylesheet: drop the link and
    # draw the buttons with plain characters, so that the page needs no network.
    html = re.sub(r'<link rel="stylesheet"\s+href="https?://[^"]*font-awesome[^"]*">', "", html)
    for icon, text in _PLAYER_ICONS.items():
        html = html.replace(f'<i class="{icon}"></i>', text)
    return HTML(html)


_PLAYER_ICONS = {"fa fa-minus": "&minus;", "fa fa-plus": "+", "fa fa-fast-backward": "|&lt;",
                 "fa fa-step-backward": "&lt;", "fa fa-play fa-flip-horizontal": "&#x25C0;",
                 "fa fa-pause": "||", "fa fa-play": "&#x25B6;", "fa fa-step-forward": "&gt;",
                 "fa fa-fast-forward": "&gt;|"}
