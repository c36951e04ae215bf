"""A verifiable task for RL on a laptop: addition, with rule-based rewards.

R1-Zero is trained with two rule-based rewards only: an **accuracy** reward that checks
the final answer, and a **format** reward that checks the output's form; no neural
reward model, to avoid reward hacking ([R1] §2.2.2). This task is the smallest thing
with the same shape: the prompt is ``" 7+45="`` (numbers right-aligned to a fixed
width, so that every prompt has the same length), the completion must be the sum's
digits written least significant first (``"25"`` for 52: the order of column addition,
so that each digit needs only its own column and the carry from the column just written;
most-significant-first needs the carries before it can write the first digit) followed
by the end token, and

- ``format_reward`` is 1 when the completion is 1 to ``digits + 1`` digits and ended
  with the end token (it stopped by itself), else 0;
- ``accuracy_reward`` is 1 when, in addition, the number is the right sum.

The reward is ``accuracy + format_weight · format`` (``format_weight = 0.1``: our
choice; [R1] gives no weights). The problems are generated from a seed, and the
held-out problems (every pair whose index falls in the held-out share of a fixed
shuffle of all pairs) are never used for training. The tokenizer is one token per
character plus ``<pad>`` and ``<eos>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, Union

import torch

__all__ = ["CharTokenizer", "AdditionTask"]


class CharTokenizer:
    """One id per character of ``chars``; id 0 is ``<pad>`` and id 1 ``<eos>``."""

    PAD, EOS = 0, 1

    def __init__(self, chars: str = "0123456789+= ") -> None:
        self.chars = chars
        self._ids = {c: i + 2 for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        """Ids in use: one per character plus ``<pad>`` and ``<eos>``."""
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        """One id per character of ``text`` (no ``<eos>`` added).

        Raises:
            ValueError: if ``text`` has a character outside the tokenizer's.
        """
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"text={text!r} is invalid: character {exc.args[0]!r} is not "
                             f"in the tokenizer's {self.chars!r}") from None

    def decode(self, ids: Union[torch.Tensor, Sequence[int]], stop_at_eos: bool = True) -> str:
        """Characters of ``ids``; stops at ``<eos>`` and drops ``<pad>``."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.EOS and stop_at_eos:
                break
            if i >= 2:
                out.append(self.chars[i - 2])
        return "".join(out)


@dataclass(frozen=True)
class AdditionTask:
    """``a+b=`` with a, b in [0, 10^digits).

    Attributes:
        digits: Digits of each operand (the answer has up to ``digits + 1``).
        held_out: Share of all (a, b) pairs kept for evaluation only.
        format_weight: Weight of the format reward in the total.
        split_seed: Seed of the fixed shuffle that splits the pairs.
    """

    digits: int = 2
    held_out: float = 0.2
    format_weight: float = 0.1
    split_seed: int = 1234

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 4:
            raise ValueError(f"digits={self.digits} is invalid: must be between 1 and 4")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out={self.held_out} is invalid: must be in (0, 1)")

    @property
    def tokenizer(self) -> CharTokenizer:
        """The task's tokenizer: digits, ``+``, ``=`` and space (a new, equal one each
        time)."""
        return CharTokenizer()

    @property
    def prompt_len(self) -> int:
        """Characters (= tokens) of every prompt: two padded operands, ``+`` and ``=``."""
        return 2 * self.digits + 2

    @property
    def max_completion_len(self) -> int:
        """Digits of the largest sum plus the end token."""
        return self.digits + 2

    def _pairs(self, split: str) -> list[tuple[int, int]]:
        n = 10 ** self.digits
        pairs = [(a, b) for a in range(n) for b in range(n)]
        random.Random(self.split_seed).shuffle(pairs)
        cut = int(len(pairs) * self.held_out)
        if split == "test":
            return pairs[:cut]
        if split == "train":
            return pairs[cut:]
        raise ValueError(f"split={split!r} is invalid: choose 'train' or 'test'")

    def problems(self, split: str, n: int, rng: random.Random) -> list[tuple[int, int]]:
        """``n`` pairs drawn with replacement from ``split`` using ``rng``."""
        pairs = self._pairs(split)
        return [pairs[rng.randrange(len(pairs))] for _ in range(n)]

    def test_set(self, n: int = 256) -> list[tuple[int, int]]:
        """The first ``n`` held-out pairs (a fixed evaluation set)."""
        return self._pairs("test")[:n]

    def prompt(self, a: int, b: int) -> str:
        """The prompt for ``a + b``, operands right-aligned to ``digits``, e.g.
        ``' 7+42='`` for two digits."""
        d = self.digits
        return f"{a:>{d}}+{b:>{d}}="

    def prompt_ids(self, problems: list[tuple[int, int]]) -> torch.Tensor:
        """(N, prompt_len) token ids."""
        tok = self.tokenizer
        return torch.tensor([tok.encode(self.prompt(a, b)) for a, b in problems])

    def answer(self, a: int, b: int) -> str:
        """The sum's digits, least significant first: the order of column addition, in
        which each digit depends only on the digits already written and one carry."""
        return str(a + b)[::-1]

    def sft_example(self, a: int, b: int) -> list[int]:
        """Prompt, answer and the end token, for the supervised warm-up."""
        tok = self.tokenizer
        return tok.encode(self.prompt(a, b) + self.answer(a, b)) + [tok.EOS]

    # ------------------------------------------------------------------- rewards
    def format_reward(self, completion: list[int]) -> float:
        """1.0 if the completion is 1..digits+1 digits and then the end token."""
        tok = self.tokenizer
        if tok.EOS not in completion:
            return 0.0
        text = tok.decode(completion[:completion.index(tok.EOS)], stop_at_eos=False)
        body = completion[:completion.index(tok.EOS)]
        ok = (1 <= len(text) <= self.digits + 1 and text.isdigit()
              and len(body) == len(text))  # no <pad> inside
        return 1.0 if ok else 0.0

    def accuracy_reward(self, completion: list[int], a: int, b: int) -> float:
        """1.0 if well formed and the digits are those of a + b (reversed)."""
        if not self.format_reward(completion):
            return 0.0
        return 1.0 if self.tokenizer.decode(completion) == self.answer(a, b) else 0.0

    def rewards(self, completions: list[list[int]], problems: list[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, accuracy, format) rewards, each (N,), for completions of ``problems``."""
        if len(completions) != len(problems):
            raise ValueError(f"completions has {len(completions)} entries: expected one per "
                             f"problem ({len(problems)})")
        fmt = torch.tensor([self.format_reward(c) for c in completions])
        acc = torch.tensor([self.accuracy_reward(c, a, b)
                            for c, (a, b) in zip(completions, problems)])
        return acc + self.format_weight * fmt, acc, fmt
