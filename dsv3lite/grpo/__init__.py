"""GRPO: reinforcement learning with group-relative advantages ([Math] §4.1; [V3] §5.2.2).

- :mod:`.objective`: :func:`group_advantages` and :func:`grpo_loss` (the clipped ratio,
  the k3 KL estimator, TRL's four normalizations);
- :mod:`.rollout`: batched sampling of G completions per prompt with the latent cache,
  and the completion log-probs with gradient;
- :mod:`.task`: addition with R1-Zero-style accuracy and format rewards;
- :mod:`.trainer`: a supervised warm-up, then GRPO steps, with metrics, atomic
  checkpoints and exact resume.

``python -m dsv3lite.grpo --task addition --steps N --out DIR`` runs it from a shell.
"""

from .objective import LOSS_TYPES, SCALES, clip_fraction, group_advantages, grpo_loss, kl_k3
from .rollout import Rollout, sample, sequence_logprobs
from .task import AdditionTask, CharTokenizer
from .trainer import TASKS, GRPOConfig, GRPOResult, evaluate, train_grpo, warmup

__all__ = ["LOSS_TYPES", "SCALES", "group_advantages", "grpo_loss", "kl_k3", "clip_fraction",
           "Rollout", "sample", "sequence_logprobs", "AdditionTask", "CharTokenizer",
           "TASKS", "GRPOConfig", "GRPOResult", "evaluate", "train_grpo", "warmup"]
