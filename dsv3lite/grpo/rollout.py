"""Rollouts: G completions per prompt, sampled together with the latent KV cache.

GRPO samples a group of G completions for every prompt from the current ("old")
policy. :func:`sample` decodes a whole batch at once: one prefill of the (equal-length)
prompts fills a :class:`~dsv3lite.mla.LatentKVCache` of batch size N, then each step
feeds one token per sequence and attends over the cached latents (absorbed MLA, as
:mod:`dsv3lite.generate` does for one sequence). A sequence that has produced the stop
token is finished: its later positions hold ``pad_id`` and are masked out.

:func:`sequence_logprobs` recomputes the log-probabilities of the completion tokens with
one full forward pass, with gradient: that is the π_θ of the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union, overload

import torch
import torch.nn.functional as F

from ..model import Transformer

__all__ = ["Rollout", "sample", "sequence_logprobs"]


@dataclass
class Rollout:
    """A batch of sampled completions.

    Attributes:
        tokens: (N, P + T) prompts followed by completions (``pad_id`` after a stop).

        completions: (N, T) the completion part of ``tokens``.

        mask: (N, T) True for generated tokens, the stop token included.

        logprobs: (N, T) log-probability of each sampled token under the distribution
            it was drawn from: the tempered softmax, renormalised over the ``top_k``
            most likely tokens when ``top_k`` truncates it (0 where ``mask`` is False).
            Without truncation this is :func:`sequence_logprobs` at the same
            temperature; greedy decoding (temperature 0) records the untempered softmax.

        prompt_len: P.
    """

    tokens: torch.Tensor
    completions: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_len: int

    def completion_lists(self) -> list[list[int]]:
        """Each completion's tokens up to and including its stop token."""
        return [c[m].tolist() for c, m in zip(self.completions, self.mask)]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) generated tokens per sequence."""
        return self.mask.sum(dim=1)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return F.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)


@torch.no_grad()
def sample(model: Transformer, prompts: torch.Tensor, max_new_tokens: int, *,
           temperature: float = 1.0, top_k: Optional[int] = None,
           stop_id: Optional[int] = None, pad_id: int = 0,
           generator: Optional[torch.Generator] = None) -> Rollout:
    """Decode a batch of prompts together, each until its stop token or the length limit.

    Args:
        model: The policy (set to eval mode for the call, restored afterwards).

        prompts: (N, P) token ids, all prompts of the same length P.

        max_new_tokens: Most tokens per completion; P + this must fit ``max_seq_len``.

        temperature: Softmax temperature (0 = greedy).

        top_k: Sample among the ``top_k`` most likely tokens only (None = all); the
            recorded log-probs are then those of the truncated distribution.

        stop_id: A sequence is finished after producing it (None: never).

        pad_id: Written after a sequence has finished.

        generator: Random generator for reproducible sampling.

    Returns:
        A :class:`Rollout`. Greedy decoding gives, row by row, the tokens that
        :func:`dsv3lite.generate.generate` gives one prompt at a time.
    """
    if prompts.dim() != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts has shape {tuple(prompts.shape)}: expected (N, P) with "
                         "P >= 1 (every prompt of one length)")
    n, p = prompts.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1")
    if p + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: {p} prompt tokens plus "
                         f"the new ones must fit max_seq_len={model.args.max_seq_len}")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer >= 1, or None "
                         "(no truncation)")
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(n, max_len=p + max_new_tokens)
        logits = model(prompts, cache=cache).logits[:, -1]             # (N, V)
        done = torch.zeros(n, dtype=torch.bool, device=prompts.device)
        tokens, logps, masks = [], [], []
        for step in range(max_new_tokens):
            logp = _log_probs(logits, temperature)                     # (N, V)
            if temperature == 0:
                nxt = logp.argmax(dim=-1)
            else:
                scores = logp
                if top_k is not None and top_k < scores.shape[-1]:
                    kth = scores.topk(top_k, dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                    logp = scores.log_softmax(dim=-1)  # what is sampled: the top k only
                probs = scores.softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            masks.append(~done)
            logps.append(torch.where(done, 0.0, logp.gather(1, nxt[:, None]).squeeze(1)))
            tokens.append(nxt)
            if stop_id is not None:
                done = done | (nxt == stop_id)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache=cache, start_pos=p + step).logits[:, -1]
        width = max_new_tokens - len(tokens)  # finished early: pad the rest
        completions = torch.stack(tokens, dim=1)
        mask = torch.stack(masks, dim=1)
        logprobs = torch.stack(logps, dim=1)
        if width:
            completions = F.pad(completions, (0, width), value=pad_id)
            mask = F.pad(mask, (0, width), value=False)
            logprobs = F.pad(logprobs, (0, width), value=0.0)
    finally:
        model.train(was_training)
    return Rollout(torch.cat([prompts, completions], dim=1), completions, mask, logprobs, p)


@overload
def sequence_logprobs(model: Transformer, tokens: torch.Tensor, prompt_len: int,
                      temperature: float = ..., *, with_counts: Literal[False] = ...
                      ) -> torch.Tensor: ...


@overload
def sequence_logprobs(model: Transformer, tokens: torch.Tensor, prompt_len: int,
                      temperature: float = ..., *, with_counts: Literal[True]
                      ) -> tuple[torch.Tensor, torch.Tensor]: ...


def sequence_logprobs(model: Transformer, tokens: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0, *, with_counts: bool = False
                      ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(N, T) log π(completion token | everything before it), from one forward pass.

    Args:
        model: The policy; runs in whatever mode it is in, with gradient if enabled.

        tokens: (N, P + T) prompts and completions (a :class:`Rollout`'s ``tokens``).

        prompt_len: P.

        temperature: The sampling temperature (the policy is the tempered softmax).

        with_counts: Also return the pass's expert counts
            (:attr:`~dsv3lite.model.ModelOutput.expert_counts`), for the bias update.

    Returns:
        The (N, T) log-probabilities, or ``(logprobs, expert_counts)`` with ``with_counts``.
    """
    if not 1 <= prompt_len < tokens.shape[1]:
        raise ValueError(f"prompt_len={prompt_len} is invalid: tokens has "
                         f"{tokens.shape[1]} columns, so 1 <= prompt_len < {tokens.shape[1]}")
    out = model(tokens[:, :-1])
    logits = out.logits[:, prompt_len - 1:]                                # (N, T, V)
    targets = tokens[:, prompt_len:]
    logprobs = _log_probs(logits, temperature if temperature > 0 else 1.0) \
        .gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logprobs, out.expert_counts) if with_counts else logprobs
