"""Train a DeepSeek-V3-style model on real text: the recipe of [V3] §4.2, scaled down.

- AdamW with β = (0.9, 0.95), weight decay 0.1 (matrices only), gradient clipping 1.0
  and normal(0, 0.006) init ([V3] §4.2);
- the learning rate: ``lr_schedule="cosine"`` (default) warms up linearly, then decays
  along a cosine to a tenth of the peak over the rest of the run; ``"v3"`` has the
  paper's shape ([V3] §4.2), scaled from 14.8T tokens to the run: warmup, constant until
  10T, cosine to a tenth over 4.3T, then constant phases at 2.2e-5 (333B tokens) and
  7.3e-6 (the last 167B), i.e. 1/10 and 1/30 of the peak;
- the MTP weight λ on the paper's shape, 0.3 then 0.1 after 10T of 14.8T tokens (68%);
- the bias update speed γ on the paper's shape, 1e-3 then 0 for the last 500B of 14.8T
  tokens (the last 3.4%); the balancing-bias update runs after every optimizer step;
- bf16 autocast on CUDA, fp32 on CPU; optional ``torch.compile`` on CUDA;
- metrics per log interval appended to ``DIR/metrics.jsonl`` (see :mod:`dsv3lite.plot`);
- atomic checkpoints (:mod:`dsv3lite.checkpoint`) and exact resumption.

Use :func:`train` from Python or ``python -m dsv3lite.train --preset small --steps N --out DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .accounting import count_params
from .checkpoint import CheckpointError, latest_checkpoint, load_training_state, save_checkpoint
from .config import ModelArgs
from .data import DataError, PreparedData, prepare
from .model import Transformer

__all__ = ["TrainConfig", "TrainResult", "train", "lr_at", "mtp_lambda_at", "gamma_at",
           "PRESETS", "pick_device", "main"]



def _tiny_for_training(**overrides: Any) -> ModelArgs:
    # byte-level BPE needs more than 256 ids (256 bytes + end-of-text), so the tiny preset
    # trains with a 512-token vocabulary
    return ModelArgs.tiny(**{"vocab_size": 512, **overrides})


#: Model presets by name: each maps to a function ``(**overrides) -> ModelArgs``;
#: ``"tiny"`` uses a 512-token vocabulary (byte-level BPE needs more than 256 ids).
PRESETS = {"tiny": _tiny_for_training, "small": ModelArgs.small, "h100": ModelArgs.h100,
           "h100_1b": ModelArgs.h100_1b}

# Dense (not 2:4 sparse) BF16 peak FLOP/s per GPU, for MFU: NVIDIA's datasheet numbers.
# Matched against torch.cuda.get_device_name in this order, so the PCIe and NVL variants
# (lower clocks and power) come before the SXM part of the same name.
_BF16_PEAK = (("H100 PCIe", 756e12), ("H800 PCIe", 756e12), ("H100 NVL", 835e12),
              ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
              ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12))


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    Attributes:
        preset: Model preset: "tiny", "small", "h100" or "h100_1b".

        steps: Optimizer steps of the whole run (schedules are scaled to it).

        out: Run folder for metrics.jsonl and checkpoints.

        corpus: "shakespeare", "stdlib" or a folder of .txt files.

        batch_size, seq_len: Sequences per step and their length (<= the model's max_seq_len).

        lr, min_lr_ratio, warmup_steps: Peak learning rate, final/peak ratio, warmup steps.

        lr_schedule: "cosine" (warmup, then cosine to ``min_lr_ratio`` over the rest) or
            "v3" (the paper's phases, see the module docstring; :func:`lr_at`).

        weight_decay, beta1, beta2, grad_clip: AdamW and clipping ([V3] §4.2).

        mtp_lambda, mtp_lambda_late, mtp_switch: λ, its later value, and the run fraction
            at which it switches (10/14.8 in V3).

        gamma, gamma_stop: bias update speed γ and the run fraction after which it is 0.

        log_interval, eval_interval, eval_batches: Logging and validation cadence.

        ckpt_interval: Steps between checkpoints (the last step is always saved).

        stop_after: Stop (and checkpoint) after this many steps of this call, e.g. to
            split a run in two; resume with ``resume=True``.

        seed, device, compile, data_dir, model_overrides: The rest.
    """

    preset: str = "small"
    steps: int = 1000
    out: str = "runs/small"
    corpus: str = "shakespeare"
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_switch: float = 10.0 / 14.8
    gamma: float = 1e-3
    gamma_stop: float = 14.3 / 14.8
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 500
    stop_after: Optional[int] = None
    seed: int = 0
    device: Optional[str] = None
    compile: bool = False
    data_dir: Optional[str] = None
    model_overrides: dict = field(default_factory=dict)

    def model_args(self) -> ModelArgs:
        """The model's hyperparameters: :data:`PRESETS` ``[preset]`` with
        ``model_overrides`` applied.

        Raises:
            ValueError: if ``preset`` is not in :data:`PRESETS`.
        """
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is invalid: choose one of "
                             f"{sorted(PRESETS)}")
        return PRESETS[self.preset](**self.model_overrides)

    def validate(self, args: ModelArgs) -> None:
        """Check the run against the model ``args`` it trains: counts and intervals
        >= 1, ``seq_len <= args.max_seq_len``, ``lr > 0``, a known ``lr_schedule``.

        Raises:
            ValueError: naming the first invalid field and why.
        """
        for name in ("steps", "batch_size", "seq_len", "log_interval", "eval_interval",
                     "eval_batches", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.seq_len > args.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} is invalid: the {self.preset} model's "
                             f"max_seq_len is {args.max_seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} is invalid: must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is invalid: choose one of "
                             f"{', '.join(LR_SCHEDULES)}")


LR_SCHEDULES = ("cosine", "v3")
# [V3] §4.2, in tokens (T = 1e12) of the 14.8T run: constant until 10T, cosine over 4.3T,
# 2.2e-5 for 333B, 7.3e-6 for the last 167B (peak 2.2e-4).
V3_LR_PHASES = (10.0 / 14.8, 14.3 / 14.8, 14.633 / 14.8)
V3_LR_LATE = (2.2e-5 / 2.2e-4, 7.3e-6 / 2.2e-4)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Both schedules start with ``warmup_steps`` of linear warmup. ``"cosine"`` then decays
    to ``lr * min_lr_ratio`` over the rest of the run. ``"v3"`` follows [V3] §4.2 scaled to
    the run: ``lr`` until 10/14.8 of the steps, a cosine to ``lr * min_lr_ratio`` until
    14.3/14.8, then ``lr`` × 1/10 until 14.633/14.8 and ``lr`` × 7.3e-6/2.2e-4 (≈ 1/30) to
    the end.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "v3":
        constant_end, cosine_end, late_switch = (p * cfg.steps for p in V3_LR_PHASES)
        if step < constant_end:
            return cfg.lr
        if step < cosine_end:
            progress = (step - constant_end) / max(1.0, cosine_end - constant_end)
            return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr * (V3_LR_LATE[0] if step < late_switch else V3_LR_LATE[1])
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def mtp_lambda_at(step: int, cfg: TrainConfig) -> float:
    """λ: ``mtp_lambda`` for the first ``mtp_switch`` of the run, then ``mtp_lambda_late``."""
    return cfg.mtp_lambda if step < cfg.mtp_switch * cfg.steps else cfg.mtp_lambda_late


def gamma_at(step: int, cfg: TrainConfig) -> float:
    """γ: ``gamma`` until ``gamma_stop`` of the run, then 0 (the biases freeze)."""
    return cfg.gamma if step < cfg.gamma_stop * cfg.steps else 0.0


def pick_device(requested: Optional[str] = None) -> torch.device:
    """The requested device, else the GPU when there is one, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_flops(device: torch.device, name: Optional[str] = None) -> Optional[float]:
    """Dense BF16 peak FLOP/s of a CUDA ``device`` (datasheet), or None.

    None on a CPU and for a GPU not in the table: MFU is then not reported rather than
    measured against a guess. ``name`` overrides the detected device name (for tests).
    """
    if device.type != "cuda":
        return None
    name = name if name is not None else torch.cuda.get_device_name(device)
    return next((v for k, v in _BF16_PEAK if k in name), None)


def flops_per_token(args: ModelArgs, seq_len: int, mtp: bool = False) -> float:
    """Training FLOPs per token: 6 × activated non-embedding parameters plus attention.

    A GEMM with N parameters costs 2N FLOPs per token forward and 4N backward (the
    gradients of its input and of its weight), hence 6N; the output head counts, the
    embedding lookup does not. Attention scores and weighted sums cost
    (qk_head_dim + v_head_dim)·H·T per token per layer forward with a causal mask (half of
    2·(...)·T), times 3 for forward + backward.

    Args:
        args: The model's hyperparameters.

        seq_len: Tokens per sequence T (attention grows with it).

        mtp: Also count the ``args.n_mtp_depth`` MTP modules ([V3] §2.2), which training
            runs on every token: per depth its block's activated parameters, its
            projection ``eh_proj`` and norms (``count_params(args).mtp``), a second pass
            through the shared output head, and its block's attention. The default
            (False) counts the main model only, as chapter 8 does before adding the MTP
            part itself.

    Returns:
        FLOPs per training token (forward + backward).
    """
    count = count_params(args)
    n = count.activated - count.components["embedding"][1]
    attn_layer = 3 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len
    total = 6 * n + args.n_layers * attn_layer
    if mtp and args.n_mtp_depth:
        head = count.components["output head"][1]
        total += 6 * (count.mtp[1] + args.n_mtp_depth * head) + args.n_mtp_depth * attn_layer
    return total


@dataclass
class TrainResult:
    """What a run returns: the final step, the last validation losses, and the folders.

    ``expert_counts`` is the (n_moe_layers, n_routed_experts) load of the last training
    step (tokens per expert, on the CPU; None when the call ran no step).
    """

    step: int
    val: dict
    out: Path
    data: PreparedData
    model: Transformer
    expert_counts: Optional[torch.Tensor] = None


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "batch_generator": gen.get_state(),
             "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["batch_generator"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]
             ) -> dict[str, float]:
    """Mean loss parts over fixed validation batches (eval mode, no balance loss)."""
    was_training = model.training
    model.eval()
    sums = {"main": 0.0, "mtp": 0.0}
    for x, y in batches:
        with autocast():
            loss = model(x.to(device), y.to(device),
                         return_logits=device.type != "cuda").loss
        sums["main"] += loss.main.item()
        sums["mtp"] += loss.mtp.item()
    model.train(was_training)
    return {k: v / len(batches) for k, v in sums.items()}


def _optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda  # one kernel for all parameters on a GPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          model: Optional[Transformer] = None) -> TrainResult:
    """Run (or continue) a training run described by ``cfg``.

    Args:
        cfg: The run. With ``resume=True`` the model, optimizer, RNG and step come from the
            latest checkpoint in ``cfg.out``, and the run continues to ``cfg.steps``.

        resume: Continue from ``cfg.out``'s latest checkpoint.

        progress: Show a tqdm progress bar.

        model: Train this model instead of building ``cfg.preset`` (for experiments that
            modify a model, e.g. swap its attention); its ``args`` are used. It is
            trained in place.

    Returns:
        :class:`TrainResult`.
    """
    args = model.args if model is not None else cfg.model_args()
    cfg.validate(args)
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    data = prepare(cfg.corpus, args.vocab_size,
                   Path(cfg.data_dir) if cfg.data_dir else None, verbose=progress)
    train_stream, val_stream = data.stream("train"), data.stream("val")

    torch.manual_seed(cfg.seed)
    model = (model if model is not None else Transformer(args)).to(device).train()
    optimizer = _optimizer(model, cfg)
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = 0
    tokens_seen = 0
    if resume:
        ckpt = latest_checkpoint(out)
        state = load_training_state(ckpt)
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], batch_gen)
        saved = json.loads((ckpt / "state.json").read_text())
        start, tokens_seen = saved["step"], saved["tokens"]
    out.mkdir(parents=True, exist_ok=True)

    val_gen = torch.Generator().manual_seed(1234)  # the same validation windows every time
    val_batches = [val_stream.batch(cfg.batch_size, cfg.seq_len, val_gen)
                   for _ in range(cfg.eval_batches)]
    use_cuda = device.type == "cuda"

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda)

    step_fn = torch.compile(model) if (cfg.compile and use_cuda) else model
    peak = _peak_flops(device)
    fpt = flops_per_token(args, cfg.seq_len, mtp=True)  # the MTP loss runs every step
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    metrics_file = out / "metrics.jsonl"
    if start == 0 and not resume:
        metrics_file.write_text("")
        val = evaluate(model, val_batches, device, autocast)
        _append(metrics_file, {"step": 0, "tokens": 0, "val": val})
    val = {}
    window = {"main": 0.0, "mtp": 0.0, "balance": 0.0, "total": 0.0, "n": 0}
    t_window, tok_window = time.perf_counter(), 0
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress,
               desc=f"train {cfg.preset}", unit="step", dynamic_ncols=True)
    for step in bar:
        lr, lam, gamma = lr_at(step, cfg), mtp_lambda_at(step, cfg), gamma_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = train_stream.batch(cfg.batch_size, cfg.seq_len, batch_gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            # On CUDA the loss runs chunked through the head (no full logits tensor);
            # on a CPU the reference path keeps seeded runs exactly as they were.
            out_step = step_fn(x, y, mtp_lambda=lam, return_logits=not use_cuda)
        loss, counts = out_step.loss, out_step.expert_counts
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        # after the optimizer step; nothing is read back to the host until a log step
        max_vio = model.update_balance_biases(counts, gamma, sync=False)
        tokens_seen += x.numel()
        tok_window += x.numel()
        for k in ("main", "mtp", "balance", "total"):
            window[k] = window[k] + getattr(loss, k).detach().float()
        window["n"] += 1
        done = step + 1
        eval_now = done % cfg.eval_interval == 0 or done == end
        if done % cfg.log_interval == 0 or eval_now:  # validation steps are always logged
            if use_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t_window
            record = {"step": done, "tokens": tokens_seen, "lr": lr, "mtp_lambda": lam,
                      "gamma": gamma,
                      "train": {k: float(window[k]) / window["n"] for k in
                                ("main", "mtp", "balance", "total")},
                      "tokens_per_s": tok_window / seconds,
                      "max_vio": [float(v) for v in max_vio]}
            if peak:
                record["mfu"] = tok_window / seconds * fpt / peak
            if eval_now:
                val = evaluate(model, val_batches, device, autocast)
                record["val"] = val
            _append(metrics_file, record)
            bar.set_postfix(loss=f"{record['train']['main']:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            window = dict.fromkeys(window, 0.0)
            window["n"] = 0
            t_window, tok_window = time.perf_counter(), 0
        if done % cfg.ckpt_interval == 0 or done == end:
            save_checkpoint(out, model, done,
                            state={"tokens": tokens_seen, "config": dataclasses.asdict(cfg)},
                            training_state={"optimizer": optimizer.state_dict(),
                                            "rng": _rng_state(batch_gen)},
                            tokenizer_path=data.tokenizer_path)
    bar.close()
    last_counts = counts.cpu() if end > start else None
    return TrainResult(step=end, val=val, out=out, data=data, model=model,
                       expert_counts=last_counts)


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dsv3lite.train``: train a preset on a corpus; see ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m dsv3lite.train",
                                     description="Train a dsv3lite model on text.")
    defaults = TrainConfig()
    parser.add_argument("--preset", default=defaults.preset, help="tiny, small, h100 or h100_1b")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    parser.add_argument("--corpus", default=defaults.corpus,
                        help="shakespeare, stdlib, or a folder of .txt files")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--lr-schedule", default=defaults.lr_schedule,
                        help="cosine (default) or v3 (the paper's phases, scaled to --steps)")
    parser.add_argument("--log-interval", type=int, default=defaults.log_interval)
    parser.add_argument("--eval-interval", type=int, default=defaults.eval_interval)
    parser.add_argument("--ckpt-interval", type=int, default=defaults.ckpt_interval)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps (resume later with --resume)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    parser.add_argument("--resume", metavar="DIR", default=None,
                        help="continue the run in DIR from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    try:
        if ns.resume:
            ckpt = latest_checkpoint(ns.resume)
            saved = json.loads((ckpt / "state.json").read_text())["config"]
            saved.update(out=str(ns.resume), steps=ns.steps if ns.steps != defaults.steps
                         else saved["steps"], stop_after=ns.stop_after)
            cfg = TrainConfig(**saved)
        else:
            cfg = TrainConfig(preset=ns.preset, steps=ns.steps,
                              out=ns.out or f"runs/{ns.preset}", corpus=ns.corpus,
                              batch_size=ns.batch_size, seq_len=ns.seq_len, lr=ns.lr,
                              warmup_steps=ns.warmup_steps, lr_schedule=ns.lr_schedule,
                              log_interval=ns.log_interval,
                              eval_interval=ns.eval_interval, ckpt_interval=ns.ckpt_interval,
                              stop_after=ns.stop_after, seed=ns.seed, device=ns.device,
                              compile=ns.compile)
        result = train(cfg, resume=bool(ns.resume), progress=not ns.no_progress)
    except (ValueError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    val = result.val.get("main")
    print(f"done: step {result.step}, validation loss {val:.4f}" if val is not None
          else f"done: step {result.step}")
    print(f"checkpoint: {latest_checkpoint(result.out)}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
