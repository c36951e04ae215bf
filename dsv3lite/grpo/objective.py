"""The GRPO objective: group-relative advantages and the clipped, KL-penalised loss.

DeepSeekMath's GRPO ([Math] §4.1.1, Eq. 3) samples G outputs o_1..o_G for each question
q from the old policy and maximises, per token,

    min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε) Â_i) − β D_KL[π_θ ‖ π_ref]

with ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_θold(o_{i,t} | q, o_{i,<t}). There is no
value model: the baseline is the mean reward of the G outputs of the *same* question,
Â_i = (r_i − mean(r)) / std(r) for every token of o_i (outcome supervision, §4.1.2).
The KL term is estimated per token with π_ref/π_θ − log(π_ref/π_θ) − 1 (Eq. 4, Schulman's
"k3"). It is never negative. Its value is an unbiased estimate of KL(π_θ ‖ π_ref) only
for tokens sampled from π_θ itself, i.e. at the first (with μ = 1 the only) update of a
batch. Used as a loss term, its expected gradient is the gradient of the *other*
direction, KL(π_ref ‖ π_θ): E_{o~π_θ}[∇(π_ref/π_θ − log(π_ref/π_θ) − 1)]
= Σ_o (π_θ − π_ref) ∇log π_θ = −Σ_o π_ref ∇log π_θ (arXiv 2506.09477).

How the per-token terms become one number is where implementations differ. We follow
TRL's ``GRPOTrainer`` definitions for token-level importance sampling without gradient
accumulation ([TRL] ``grpo_trainer.py``, ``_compute_loss``):

- ``"grpo"``: each sequence's mean over its tokens, then the mean over sequences
  (DeepSeekMath's ``1/G Σ_i 1/|o_i| Σ_t``); it weights a token of a short answer more;
- ``"dr_grpo"``: the sum over all tokens / (B × max_completion_length) (Dr. GRPO);
- ``"dapo"`` and ``"bnpo"``: the sum / the number of completion tokens in the batch.
  They are identical here, where one call sees the whole batch. In TRL they differ when
  a batch is split, across accumulated micro-batches or across processes: ``"bnpo"``
  divides by the local micro-batch's token count, ``"dapo"`` by the whole batch's.

``"dr_grpo"`` and ``"dapo"`` differ by a constant factor only within one batch: DAPO's
denominator, the batch's token count, changes from batch to batch, Dr. GRPO's does not.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SCALES", "LOSS_TYPES", "group_advantages", "kl_k3", "grpo_loss",
           "clip_fraction"]

#: How :func:`group_advantages` scales ``r - group mean``: by the group's std, the
#: whole batch's std, or not at all (Dr. GRPO).
SCALES = ("group", "batch", "none")
#: How :func:`grpo_loss` reduces the per-token terms to one number (TRL's names; see
#: the module docstring for each).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
STD_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group"
                     ) -> torch.Tensor:
    """Group-relative advantages, one per completion.

    Args:
        rewards: (B,) rewards; each group's ``group_size`` completions are consecutive.

        group_size: G, completions per prompt.

        scale: ``"group"``: divide by (the group's std + 1e-4), Bessel-corrected;
            ``"batch"``: by (the whole batch's std + 1e-4); ``"none"``: only subtract the
            group mean (Dr. GRPO).

    Returns:
        (B,) advantages A = r − group mean, scaled as asked.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is invalid: choose one of {', '.join(SCALES)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}: expected (B,)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size={group_size!r} is invalid: must be an integer >= 2 "
                         "(a group of one has no baseline)")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries: not a multiple of "
                         f"group_size={group_size}")
    rewards = rewards.float()
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).flatten()  # Bessel
    else:
        std = rewards.std()
    return centred / (std + STD_EPS)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate π_ref/π − log(π_ref/π) − 1 ([Math] Eq. 4); >= 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def _check_shapes(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, ref_logprobs: Optional[torch.Tensor]) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}: expected (B, T)")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask),
                    ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected "
                             f"{tuple(logprobs.shape)} like logprobs")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}: expected "
                         f"({logprobs.shape[0]},), one per sequence")


def _clip_range(epsilon: float, epsilon_high: Optional[float]) -> float:
    """Validate ε and ε_high; returns ε_high (= ε when None)."""
    if not epsilon >= 0:  # also rejects NaN
        raise ValueError(f"epsilon={epsilon} is invalid: must be >= 0")
    if epsilon_high is None:
        return epsilon
    if isinstance(epsilon_high, bool) or not isinstance(epsilon_high, (int, float)) \
            or not epsilon_high >= 0:
        raise ValueError(f"epsilon_high={epsilon_high!r} is invalid: must be a number >= 0 "
                         f"(the clip's upper end is 1 + epsilon_high), or None to use "
                         f"epsilon={epsilon}")
    return float(epsilon_high)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, ref_logprobs: Optional[torch.Tensor] = None,
              beta: float = 0.0, epsilon: float = 0.2, epsilon_high: Optional[float] = None,
              loss_type: str = "grpo", max_completion_length: Optional[int] = None
              ) -> torch.Tensor:
    """The GRPO loss to minimise (the negative of [Math] Eq. 3's objective).

    Args:
        logprobs: (B, T) log π_θ of each completion token (with gradient).

        old_logprobs: (B, T) log π_θold of the same tokens (the sampling policy).

        advantages: (B,) one advantage per sequence (:func:`group_advantages`).

        mask: (B, T) 1 for completion tokens, 0 for padding.

        ref_logprobs: (B, T) log π_ref, needed when ``beta > 0``.

        beta: KL coefficient β.

        epsilon, epsilon_high: Clip range [1 − ε, 1 + ε_high]; ε_high = ε unless given
            (None). Both must be >= 0.

        loss_type: ``"grpo"``, ``"dr_grpo"``, ``"dapo"`` or ``"bnpo"`` (module docstring).

        max_completion_length: The denominator's length for ``"dr_grpo"`` (default T).

    Returns:
        A scalar tensor.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is invalid: choose one of "
                         f"{', '.join(LOSS_TYPES)}")
    _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs)
    if beta < 0:
        raise ValueError(f"beta={beta} is invalid: must be >= 0")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is None: beta > 0 needs the reference policy's "
                         "log-probs")
    eps_high = _clip_range(epsilon, epsilon_high)
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)                      # ρ, (B, T)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)                # (B, 1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv)
    per_token = -surrogate
    if beta > 0 and ref_logprobs is not None:  # (None with beta > 0 was refused above)
        per_token = per_token + beta * kl_k3(logprobs, ref_logprobs)
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sequence.mean()
    if loss_type == "dr_grpo":
        length = logprobs.shape[1] if max_completion_length is None else max_completion_length
        if length < 1:
            raise ValueError(f"max_completion_length={length} is invalid: must be >= 1")
        return (per_token * mask).sum() / (logprobs.shape[0] * length)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)       # dapo, bnpo


@torch.no_grad()
def clip_fraction(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                  advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2,
                  epsilon_high: Optional[float] = None) -> float:
    """Share of completion tokens whose clipped term is the active one (no gradient)."""
    eps_high = _clip_range(epsilon, epsilon_high)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    mask = mask.bool()
    return float((clipped & mask).sum()) / max(1, int(mask.sum()))
