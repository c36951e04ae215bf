"""Checkpoints that survive a crash: weights as safetensors, args and step as JSON.

Layout of a run folder ``DIR``::

    DIR/latest                 name of the newest complete checkpoint (e.g. "step-000200")
    DIR/step-000200/model.safetensors   every tensor of the state dict (balancing biases too)
    DIR/step-000200/args.json           ModelArgs
    DIR/step-000200/state.json          step, tokens seen, the training config
    DIR/step-000200/optimizer.pt        optimizer and RNG state, for exact resumption
    DIR/step-000200/tokenizer.json      the tokenizer, so the folder is self-contained

A checkpoint is written into a hidden temporary folder, which is renamed into place when
complete; only then is ``latest`` replaced (temp file, then rename). A crash at any
moment leaves the previous checkpoint intact and ``latest`` pointing at it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ModelArgs
from .model import Transformer

__all__ = ["save_checkpoint", "latest_checkpoint", "load_model", "load_training_state",
           "CheckpointError"]


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, model: Transformer, step: int,
                    state: Optional[dict[str, Any]] = None,
                    training_state: Optional[dict[str, Any]] = None,
                    tokenizer_path: Optional[str | Path] = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` into ``run_dir`` atomically and point ``latest`` at it.

    Args:
        run_dir: The run folder.
        model: The model; its full state dict is saved (parameters and buffers).
        step: Optimizer steps done.
        state: JSON-able facts (tokens seen, the training config, ...).
        training_state: Anything torch can pickle (optimizer, RNG states) for resumption.
        tokenizer_path: A tokenizer.json to copy in.
        keep: How many checkpoints to keep (older ones are deleted after the switch).

    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(model.args), indent=2))
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
    if training_state is not None:
        torch.save(training_state, tmp / "optimizer.pt")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    final = run_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(run_dir / "latest", name)
    old = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for ``path``: a run folder (via ``latest``) or a step folder.

    Raises:
        CheckpointError: When there is no complete checkpoint there.
    """
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "args.json").is_file():
        return path
    pointer = path / "latest"
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {path} (expected {pointer} or "
                              f"{path / 'model.safetensors'})")
    ckpt = path / pointer.read_text().strip()
    if not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{pointer} names {ckpt.name}, which is missing or incomplete")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """Rebuild the model saved at ``path`` (a run folder or a step folder).

    Returns:
        (model in eval mode on ``device``, the checkpoint's state.json as a dict).
    """
    ckpt = latest_checkpoint(path)
    args = ModelArgs(**json.loads((ckpt / "args.json").read_text()))
    model = Transformer(args)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    state = json.loads((ckpt / "state.json").read_text())
    return model.to(device).eval(), state


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The optimizer and RNG state saved beside the weights (for ``--resume``)."""
    ckpt = latest_checkpoint(path)
    file = ckpt / "optimizer.pt"
    if not file.is_file():
        raise CheckpointError(f"{ckpt} has no optimizer.pt: it cannot be resumed exactly")
    return torch.load(file, map_location="cpu", weights_only=False)
