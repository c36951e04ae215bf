"""Plots of a training run, read from its ``metrics.jsonl``, and of benchmark results.

``plot_run(DIR)`` draws the loss curves (train and validation, main and MTP) and the load
balance (MaxVio per MoE layer, [LF] Eq. 4) against optimizer steps.
``plot_fp8_gemm(RESULTS)`` draws the GEMM throughput that ``benchmarks/fp8.py`` measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["read_metrics", "plot_run", "latest_results", "plot_fp8_gemm"]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (``path`` may be the run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(path: str | Path, label: Optional[str] = None, axes=None):
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


def plot_fp8_gemm(results: str | Path | dict, ax=None):
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
    import numpy as np

    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    rows = results.get("gemm", []) + results.get("wgrad_gemm", [])
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
           title=f"block-scaled FP8 GEMM on {results.get('device', '?')} "
                 f"(torch {results.get('torch', '?')}, triton {results.get('triton', '?')})")
    ax.legend(fontsize="small")
    ax.figure.tight_layout()
    return ax.figure
