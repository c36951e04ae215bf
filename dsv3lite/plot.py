"""Plots of a training run, read from its ``metrics.jsonl``.

``plot_run(DIR)`` draws the loss curves (train and validation, main and MTP) and the load
balance (MaxVio per MoE layer, [LF] Eq. 4) against optimizer steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["read_metrics", "plot_run"]


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
