"""The GRPO trainer: a supervised warm-up, then sample, score, advantages, update.

1. **Warm-up.** A small dsv3lite model learns the task's format and some answers from
   supervised examples (loss on the completion only), until its greedy accuracy on the
   held-out set reaches ``warmup_target``. RL needs groups whose rewards differ: a model
   that is always wrong, or always right, gives every completion of a group the same
   reward, hence zero advantage and zero gradient. The warm-up model is saved in
   ``DIR/warmup`` and is also the frozen reference π_ref of the KL term.
2. **GRPO steps** ([Math] §4.1, Alg. 1 without the reward-model retraining): sample G
   completions for each of ``prompts_per_step`` prompts, score them with the rule-based
   rewards, turn rewards into group-relative advantages, record the sampling policy's
   log-probs (π_θold), then run μ updates of :func:`~dsv3lite.grpo.grpo_loss`. With
   β = 0 there is no KL term, so the frozen reference is neither kept nor run (as in
   [TRL], which does not load it then).

The balancing bias stays frozen during RL: the update runs with γ = 0 (it only resets the
expert counts and reports MaxVio), as V3 does for the last 500B tokens of pre-training
([V3] §4.2). RL batches are small and skewed towards one task, so a bias that chased
their load would reshape the routing learned on the broad data; and routing that
changes between sampling and the update would make π_θold and π_θ differ for a reason
that has nothing to do with the policy gradient.

A control, ``shuffle_rewards``: the batch's rewards are permuted at random across all
its completions (and groups) before the advantages, so that a completion's advantage no
longer says anything about that completion. Whatever such a run learns does not come
from the reward.

Metrics go to ``DIR/metrics.jsonl`` every step: the batch's mean ``reward``, ``accuracy``
and ``format`` (the true ones, also under ``shuffle_rewards``), the share of
``zero_variance_groups`` (of the rewards the advantages use), ``kl`` (the k3 estimate of KL(π_θold ‖ π_ref) per token, only
when β > 0), ``clip_fraction`` (at the last of the μ updates: at the first, ρ ≡ 1),
``completion_length``, ``loss`` (the mean over the μ updates), ``max_vio`` and
``seconds``; every ``eval_interval`` steps also ``heldout_accuracy``. Checkpoints are atomic
(:mod:`dsv3lite.checkpoint`) and hold the optimizer and random states, so ``resume``
continues exactly where a run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..checkpoint import latest_checkpoint, load_model, load_training_state, save_checkpoint
from ..config import ModelArgs
from ..model import Transformer
from .objective import (LOSS_TYPES, SCALES, _clip_range, clip_fraction, group_advantages,
                        grpo_loss, kl_k3)
from .rollout import sample, sequence_logprobs
from .task import AdditionTask

__all__ = ["GRPOConfig", "GRPOResult", "TASKS", "evaluate", "warmup", "train_grpo"]

#: The tasks a :class:`GRPOConfig` can name (``task``), each mapped to its class.
TASKS = {"addition": AdditionTask}


@dataclass
class GRPOConfig:
    """Everything that defines a GRPO run (saved in every checkpoint).

    Attributes:
        task, digits: The verifiable task and its size.

        out: Run folder (metrics.jsonl, warmup/, checkpoints).

        steps: GRPO steps (one sampling round each).

        prompts_per_step, group_size: Prompts per step and G completions per prompt.

        mu: Updates per sampling round (μ; 1 makes ρ ≡ 1 in value, [Math] §4.2).

        lr: AdamW learning rate of the RL phase.

        beta, epsilon, epsilon_high: KL coefficient and clip range [1 − ε, 1 + ε_high]
            (ε_high = ε when None).

        loss_type, scale_rewards: See :func:`grpo_loss` and :func:`group_advantages`.

        temperature: Sampling temperature of the rollouts (the policy is the tempered
            softmax).

        shuffle_rewards: A control: permute the rewards across the batch before the
            advantages (module docstring).

        warmup_steps, warmup_lr, warmup_batch_size, warmup_target: The supervised
            warm-up: at most ``warmup_steps`` steps, stopped once the greedy held-out
            accuracy reaches ``warmup_target`` (checked every ``warmup_eval_interval``).

        eval_interval, eval_size: Held-out greedy accuracy every this many steps.

        ckpt_interval: Steps between checkpoints (the last step is always saved).

        stop_after: Stop (and checkpoint) after this many GRPO steps of this call.

        init_from: Start from this warm-up model (a run folder's ``warmup`` or any
            checkpoint) instead of warming up; runs with several seeds share one.

        seed, model_overrides: Seed of everything; changes to the model preset.
    """

    task: str = "addition"
    digits: int = 2
    out: str = "runs/grpo"
    steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 8
    mu: int = 1
    lr: float = 3e-4
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    temperature: float = 1.0
    shuffle_rewards: bool = False
    warmup_steps: int = 600
    warmup_lr: float = 3e-3
    warmup_batch_size: int = 64
    warmup_target: float = 0.3
    warmup_eval_interval: int = 10
    eval_interval: int = 10
    eval_size: int = 256
    ckpt_interval: int = 20
    stop_after: Optional[int] = None
    init_from: Optional[str] = None
    seed: int = 0
    model_overrides: dict = field(default_factory=dict)

    def make_task(self) -> AdditionTask:
        """A new instance of the task ``task`` names (:data:`TASKS`), of size ``digits``.

        Raises:
            ValueError: if ``task`` is not in :data:`TASKS`.
        """
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is invalid: choose one of {sorted(TASKS)}")
        return TASKS[self.task](digits=self.digits)

    def model_args(self) -> ModelArgs:
        """The tiny preset (MLA, 8 routed experts, MTP) widened to 96, with the task's
        vocabulary and length, and a larger init (0.02) that a short run learns from."""
        task = self.make_task()
        base = dict(vocab_size=task.tokenizer.vocab_size, dim=96, init_std=0.02,
                    max_seq_len=task.prompt_len + task.max_completion_len)
        return ModelArgs.tiny(**{**base, **self.model_overrides})

    def validate(self) -> None:
        """Check every field (the task, counts >= 1, ``group_size >= 2``, the loss and
        scaling names, positive rates and temperature, the clip range).

        Raises:
            ValueError: naming the first invalid field and why.
        """
        self.make_task()
        for name in ("steps", "prompts_per_step", "mu", "warmup_batch_size", "eval_interval",
                     "eval_size", "ckpt_interval", "warmup_eval_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size < 2:
            raise ValueError(f"group_size={self.group_size!r} is invalid: must be an "
                             "integer >= 2 (a group of one has no baseline)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} is invalid: must be >= 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is invalid: choose one of "
                             f"{', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards={self.scale_rewards!r} is invalid: choose one "
                             f"of {', '.join(SCALES)}")
        for name in ("lr", "warmup_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be > 0")
        if not self.beta >= 0:
            raise ValueError(f"beta={self.beta} is invalid: must be >= 0")
        _clip_range(self.epsilon, self.epsilon_high)
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} is invalid: GRPO samples, "
                             "so it must be > 0")


@dataclass
class GRPOResult:
    """What :func:`train_grpo` returns."""

    model: Transformer
    out: Path
    warmup_accuracy: float
    final_accuracy: float
    records: list[dict]
    seconds: float


@torch.no_grad()
def evaluate(model: Transformer, task: AdditionTask, n: int = 256) -> float:
    """Greedy accuracy on the first ``n`` held-out problems (one batched decode)."""
    problems = task.test_set(n)
    tok = task.tokenizer
    roll = sample(model, task.prompt_ids(problems), task.max_completion_len, temperature=0,
                  stop_id=tok.EOS, pad_id=tok.PAD)
    _, acc, _ = task.rewards(roll.completion_lists(), problems)
    return float(acc.mean())


def warmup(model: Transformer, task: AdditionTask, cfg: GRPOConfig, rng: random.Random,
           log: Optional[Callable[[dict], None]] = None) -> tuple[float, int]:
    """Supervised warm-up until ``cfg.warmup_target`` held-out accuracy.

    Returns:
        (held-out accuracy reached, steps taken).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    accuracy, step = evaluate(model, task, cfg.eval_size), 0
    while step < cfg.warmup_steps and accuracy < cfg.warmup_target:
        tokens, targets = _sft_batch(task, cfg.warmup_batch_size, rng)
        out = model(tokens, targets)
        loss = out.loss.total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balance_biases(out.expert_counts)  # pre-training keeps its γ
        step += 1
        if step % cfg.warmup_eval_interval == 0 or step == cfg.warmup_steps:
            accuracy = evaluate(model, task, cfg.eval_size)
            if log is not None:
                log({"phase": "warmup", "step": step, "loss": float(loss.detach()),
                     "heldout_accuracy": accuracy})
    return accuracy, step


def _sft_batch(task: AdditionTask, n: int, rng: random.Random
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) with the loss on the answer and the end token only."""
    tok = task.tokenizer
    width = task.prompt_len + task.max_completion_len
    rows = [task.sft_example(a, b) for a, b in task.problems("train", n, rng)]
    data = torch.full((n, width), tok.PAD)
    for i, row in enumerate(rows):
        data[i, :len(row)] = torch.tensor(row)
    tokens, targets = data[:, :-1], data[:, 1:].clone()
    targets[:, :task.prompt_len - 1] = -100                      # no loss on the prompt
    lengths = torch.tensor([len(r) for r in rows])
    after = torch.arange(width - 1)[None, :] >= (lengths[:, None] - 1)
    targets[after] = -100                                        # nor after the end token
    return tokens, targets


def train_grpo(cfg: GRPOConfig, *, resume: bool = False, progress: bool = True) -> GRPOResult:
    """Warm up (unless resuming), then run GRPO steps; see the module docstring."""
    cfg.validate()
    task, tok = cfg.make_task(), cfg.make_task().tokenizer
    out = Path(cfg.out)
    metrics = out / "metrics.jsonl"
    start_time = time.perf_counter()
    records: list[dict] = []

    def log(record: dict) -> None:
        records.append(record)
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    if resume:
        ckpt = latest_checkpoint(out)
        model, state = load_model(ckpt)
        saved = load_training_state(ckpt)
        start = state["step"]
        warm_acc = state["warmup_accuracy"]
        reference = load_model(out / "warmup")[0] if cfg.beta > 0 else None
        rng = random.Random()
        rng.setstate(saved["python_rng"])
        generator = torch.Generator().manual_seed(0)
        generator.set_state(saved["sampling_rng"])
        optimizer = _optimizer(model, cfg)
        optimizer.load_state_dict(saved["optimizer"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        metrics.write_text("")
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        if cfg.init_from:
            model, _ = load_model(cfg.init_from)
            if model.args != cfg.model_args():
                raise ValueError(f"init_from={cfg.init_from!r} is invalid: its model "
                                 "differs from this config's (task, digits, overrides)")
            warm_acc, warm_steps = evaluate(model, task, cfg.eval_size), 0
        else:
            model = Transformer(cfg.model_args()).train()
            warm_acc, warm_steps = warmup(model, task, cfg, rng, log)
        log({"phase": "warmup_done", "step": warm_steps, "heldout_accuracy": warm_acc})
        save_checkpoint(out / "warmup", model, 0, state={"warmup_accuracy": warm_acc,
                                                         "warmup_steps": warm_steps})
        reference = None
        if cfg.beta > 0:  # the frozen π_ref of the KL term
            reference = Transformer(model.args)
            reference.load_state_dict(model.state_dict())
        start = 0
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = _optimizer(model, cfg)
    model.train()
    if reference is not None:
        reference.eval().requires_grad_(False)
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    G = cfg.group_size
    accuracy = warm_acc
    bar = tqdm(range(start, end), desc="GRPO", disable=not progress, leave=False)
    for step in bar:
        problems = [p for p in task.problems("train", cfg.prompts_per_step, rng)
                    for _ in range(G)]                                  # groups consecutive
        roll = sample(model, task.prompt_ids(problems), task.max_completion_len,
                      temperature=cfg.temperature, stop_id=tok.EOS, pad_id=tok.PAD,
                      generator=generator)
        rewards, acc, fmt = task.rewards(roll.completion_lists(), problems)
        scored = rewards
        if cfg.shuffle_rewards:  # the control; its own generator, so resume stays exact
            shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            scored = rewards[torch.randperm(len(rewards), generator=shuffle)]
        advantages = group_advantages(scored, G, cfg.scale_rewards)
        mask = roll.mask
        ref = None
        with torch.no_grad():
            # the policy's passes route tokens too: their counts give the step's MaxVio
            old, counts = sequence_logprobs(model, roll.tokens, roll.prompt_len,
                                            cfg.temperature, with_counts=True)
            if reference is not None:
                ref = sequence_logprobs(reference, roll.tokens, roll.prompt_len,
                                        cfg.temperature)
        losses = []
        for _ in range(cfg.mu):
            new, new_counts = sequence_logprobs(model, roll.tokens, roll.prompt_len,
                                                cfg.temperature, with_counts=True)
            counts = counts + new_counts
            loss = grpo_loss(new, old, advantages, mask, ref_logprobs=ref, beta=cfg.beta,
                             epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                             loss_type=cfg.loss_type,
                             max_completion_length=task.max_completion_len)
            clipped = clip_fraction(new, old, advantages, mask, cfg.epsilon, cfg.epsilon_high)
            losses.append(float(loss.detach()))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        max_vio = model.update_balance_biases(counts, gamma=0.0)  # bias frozen during RL
        spread = scored.view(-1, G).std(dim=1)
        record = {"phase": "grpo", "step": step + 1, "reward": float(rewards.mean()),
                  "accuracy": float(acc.mean()), "format": float(fmt.mean()),
                  "zero_variance_groups": float((spread == 0).float().mean())}
        if ref is not None:
            record["kl"] = float((kl_k3(old, ref) * mask).sum() / mask.sum())
        record.update({"clip_fraction": clipped,
                       "completion_length": float(roll.lengths.float().mean()),
                       "loss": sum(losses) / len(losses), "max_vio": max_vio,
                       "seconds": time.perf_counter() - start_time})
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
            accuracy = evaluate(model, task, cfg.eval_size)
            record["heldout_accuracy"] = accuracy
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['accuracy']:.2f}")
        if (step + 1) % cfg.ckpt_interval == 0 or step + 1 == end:
            save_checkpoint(out, model, step + 1,
                            state={"warmup_accuracy": warm_acc,
                                   "config": dataclasses.asdict(cfg)},
                            training_state={"optimizer": optimizer.state_dict(),
                                            "python_rng": rng.getstate(),
                                            "sampling_rng": generator.get_state()})
    bar.close()
    if end == cfg.steps and (not records or "heldout_accuracy" not in records[-1]):
        accuracy = evaluate(model, task, cfg.eval_size)
    return GRPOResult(model, out, warm_acc, accuracy, records, time.perf_counter() - start_time)


def _optimizer(model: Transformer, cfg: GRPOConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                             weight_decay=0.0)
