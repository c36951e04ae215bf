"""Text generation with the latent KV cache, and speculative decoding with the MTP module.

Plain decoding ([V3] §2.1.1; [V3-code] ``MLA.forward``): the prompt is run once (prefill), filling
the :class:`~dsv3lite.mla.LatentKVCache`; afterwards each forward pass feeds one token
and attends over the cached latents (absorbed MLA by default). Temperature 0 is greedy.

Speculative decoding ([V3] §2.2 "MTP in Inference", §5.4.3). The depth-1 MTP
module was trained to predict the token *two* places ahead, so it can draft a token for
free: after the main model produced h_{n-1} and the next token t_n, the MTP module
combines them, h'_{n-1} = M [RMSNorm(h_{n-1}); RMSNorm(Emb(t_n))] (Eq. 21), and its head
guesses d ≈ t_{n+1}. The main model then *verifies* by running [t_n, d] in one cached
forward pass. Its prediction at t_n's position is the real t_{n+1}; if it equals d, the
prediction at d's position is a second token from the same pass. V3 reports 85-90%
acceptance and 1.8x tokens per second ([V3] §5.4.3).

Two caches:

- the main model's cache. A rejected draft leaves its latent at position n+1; nothing
  reads beyond the current length (causal mask), and the next pass writes position
  n+1 again, so "rolling back" costs nothing;
- the MTP block's own one-layer cache over the MTP sequence, whose position i holds
  (h_i, t_{i+1}). It is fed *only committed entries*: position i is written once the
  main model's h_i came from a verified prefix and t_{i+1} is final. Just before each
  draft it catches up on the one or two positions the last pass verified, reusing their
  hidden states (no extra main-model work), so it never needs a rollback.

Sampling (temperature > 0). The draft is the MTP module's most likely token. The main
model samples t_{n+1} from its own distribution p (with temperature and top-k) at t_n's
position; the draft is accepted iff that sample equals d, and only then is t_{n+2}
sampled at d's position (where the model conditioned on d = t_{n+1}). Every token is
therefore drawn from the main model's exact conditional distribution; this is speculative
sampling (Leviathan et al., 2023) with a one-point draft distribution, whose acceptance
probability min(1, p(d)/1) = p(d) is exactly "the sample equals the draft". Each token
uses one call to the random generator, so a seeded speculative run reproduces the seeded
plain run token for token (up to float rounding between the two passes' shapes).

Simplifications: batch size 1; only MTP depth 1 drafts (V3 has D = 1). The prompt plus
``max_new_tokens`` must fit ``max_seq_len``: :func:`generate` raises a ValueError rather
than stopping early at the limit.

CLI: ``python -m dsv3lite.generate --ckpt RUN_DIR --prompt "..." [--speculative]
[--compare]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn, Optional, Sequence, cast

import torch

from .checkpoint import latest_checkpoint, load_model
from .data import EOT, load_tokenizer
from .mla import ATTN_IMPLS, AttnImpl, LatentKVCache
from .model import Transformer
from .mtp import MTPModule

__all__ = ["GenerationResult", "generate", "main"]


@dataclass
class GenerationResult:
    """What one call of :func:`generate` produced.

    Attributes:
        tokens: The new tokens (the prompt excluded), at most ``max_new_tokens``.

        n_forward_passes: Forward passes of the main model, the prefill included.

        drafted: Draft tokens proposed by the MTP module (0 for plain decoding).

        accepted: Drafts the main model confirmed. Without an early stop at ``eos_id``,
            ``len(tokens) == n_forward_passes + accepted``.

        seconds: Wall-clock time of the whole call.

        draft_log: (position, token) of every draft, position counted from the
            prompt's first token, for inspection and tests.
    """

    tokens: list[int]
    n_forward_passes: int
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    draft_log: list[tuple[int, int]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> Optional[float]:
        """accepted / drafted, or None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of wall-clock time."""
        if not self.tokens:
            return 0.0
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def _prompt_list(prompt_ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids has shape {tuple(prompt_ids.shape)}: expected "
                             "(seq_len,) or (1, seq_len); generation handles batch size 1")
        prompt_ids = prompt_ids.tolist()
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty: generation needs at least one prompt token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids contains {bad[0]}: token ids must be in "
                         f"[0, vocab_size={vocab_size})")
    return ids


def _check_arguments(model: Transformer, n_prompt: int, max_new_tokens: int,
                     temperature: float, top_k: Optional[int], speculative: bool,
                     attn_impl: str) -> None:
    max_len = model.args.max_seq_len
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an "
                         "integer >= 0")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} is invalid: must be a finite number "
                         ">= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be None or an integer >= 1")
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r} is invalid: must be one of {ATTN_IMPLS}")
    if n_prompt > max_len:
        raise ValueError(f"the prompt has {n_prompt} tokens: longer than the model's "
                         f"max_seq_len={max_len}")
    if n_prompt + max_new_tokens > max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: the prompt's "
                         f"{n_prompt} tokens plus the new ones must fit max_seq_len={max_len}"
                         f" (at most {max_len - n_prompt} new tokens)")
    if speculative and len(model.mtp) == 0:
        raise ValueError("speculative=True is invalid for this model: it has no MTP "
                         "module to draft with (n_mtp_depth=0 or drop_mtp() was called)")


def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int],
          generator: Optional[torch.Generator]) -> int:
    """One token from (vocab,) logits: argmax at temperature 0, else a top-k sample."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Drafter:
    """The depth-1 MTP module with its own cache over committed MTP positions.

    MTP position i combines the main model's h_i with Emb(t_{i+1}) and predicts t_{i+2}.
    ``pending`` holds main-model hidden states from verified positions not yet fed to
    the MTP block; :meth:`draft` feeds them all and guesses the token after the
    sequence's last one.
    """

    def __init__(self, model: Transformer, max_len: int, attn_impl: AttnImpl):
        weight = model.embed.weight
        self.model = model
        self.module = cast(MTPModule, model.mtp[0])  # an nn.ModuleList of MTPModules
        self.cache = LatentKVCache(model.args, 1, max_len, n_layers=1,
                                   device=weight.device, dtype=weight.dtype)
        self.attn_impl = attn_impl
        self.next_pos = 0  # MTP positions 0 .. next_pos-1 are cached
        self.pending: list[torch.Tensor] = []  # (1, t, dim) chunks of h for next_pos ..

    def add(self, hidden: torch.Tensor) -> None:
        """Queue verified main-model hidden states (1, t, dim) for the next positions."""
        self.pending.append(hidden)

    def draft(self, seq: list[int]) -> int:
        """The MTP module's most likely token at position ``len(seq)``."""
        h = torch.cat(self.pending, dim=1)  # (1, n, dim): positions start .. len(seq)-2
        start, n = self.next_pos, h.shape[1]
        assert start + n == len(seq) - 1, "MTP positions out of step with the sequence"
        model = self.model
        nxt = torch.tensor([seq[start + 1:start + 1 + n]], device=h.device)  # t_{i+1}
        out, _ = self.module(h, model.embed(nxt), model.rope_cos[start:start + n],
                             model.rope_sin[start:start + n], cache=self.cache,
                             start_pos=start, attn_impl=self.attn_impl)
        self.next_pos, self.pending = start + n, []
        return int(model.head(self.module.norm(out[0, -1])).argmax())


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: Sequence[int] | torch.Tensor,
             max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None, *,
             speculative: bool = False, attn_impl: AttnImpl = "absorbed",
             generator: Optional[torch.Generator] = None,
             eos_id: Optional[int] = None) -> GenerationResult:
    """Continue one prompt, plainly or with MTP speculative decoding.

    Args:
        model: The model (set to eval mode for the call, restored afterwards).

        prompt_ids: The prompt, a list of ids, a (T,) or a (1, T) tensor. Batch size 1.

        max_new_tokens: Tokens to generate. The prompt plus these must fit
            ``args.max_seq_len``, otherwise a ValueError is raised before any work.

        temperature: Softmax temperature; 0 means greedy (argmax).

        top_k: Sample only among the ``top_k`` most likely tokens (None = all).

        speculative: Draft with the MTP module and verify two tokens per pass.

        attn_impl: ``"absorbed"`` (default) or ``"naive"`` cached attention.

        generator: Random generator for reproducible sampling.

        eos_id: Stop after producing this token (it is included in ``tokens``).

    Returns:
        A :class:`GenerationResult`; greedy speculative output equals greedy plain output.

    Raises:
        ValueError: For an argument out of range (see the checks' messages).
    """
    prompt = _prompt_list(prompt_ids, model.args.vocab_size)
    _check_arguments(model, len(prompt), max_new_tokens, temperature, top_k, speculative,
                     attn_impl)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompt, max_new_tokens, temperature, top_k, speculative,
                       attn_impl, generator, eos_id)
    finally:
        model.train(was_training)


def _decode(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float,
            top_k: Optional[int], speculative: bool, attn_impl: AttnImpl,
            generator: Optional[torch.Generator], eos_id: Optional[int]) -> GenerationResult:
    start_time = time.perf_counter()
    device = model.embed.weight.device
    result = GenerationResult(tokens=[], n_forward_passes=0)
    if max_new_tokens == 0:
        return result
    total = len(prompt) + max_new_tokens
    cache = model.new_cache(1, max_len=total)
    drafter = _Drafter(model, total, attn_impl) if speculative else None
    seq = list(prompt)  # invariant: the main cache holds positions 0 .. len(seq)-2

    def run(tokens: list[int], start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the main model: (1, n, vocab) logits, (1, n, dim) hidden states."""
        result.n_forward_passes += 1
        out = model(torch.tensor([tokens], device=device), cache=cache,
                    start_pos=start_pos, attn_impl=attn_impl)
        return out.logits, out.hidden

    def emit(token: int) -> bool:
        """Append a token; True when generation must stop."""
        seq.append(token)
        result.tokens.append(token)
        return token == eos_id or len(result.tokens) == max_new_tokens

    logits, hidden = run(prompt, 0)  # prefill
    if drafter is not None:
        drafter.add(hidden)  # h_0 .. h_{P-1}
    done = emit(_pick(logits[0, -1], temperature, top_k, generator))
    while not done:
        pos = len(seq) - 1  # position of the last token, not yet in the main cache
        if drafter is None or max_new_tokens - len(result.tokens) < 2:
            logits, _ = run([seq[-1]], pos)
            done = emit(_pick(logits[0, 0], temperature, top_k, generator))
            continue
        draft = drafter.draft(seq)
        result.drafted += 1
        result.draft_log.append((pos + 1, draft))
        logits, hidden = run([seq[-1], draft], pos)  # verify: positions pos, pos + 1
        token = _pick(logits[0, 0], temperature, top_k, generator)
        if token != draft:  # rejected: the draft's latent at pos + 1 is stale, unread
            drafter.add(hidden[:, :1])
            done = emit(token)
            continue
        result.accepted += 1
        drafter.add(hidden)  # both positions are verified now
        done = emit(token) or emit(_pick(logits[0, 1], temperature, top_k, generator))
    result.seconds = time.perf_counter() - start_time
    return result


# ---------------------------------------------------------------------------- CLI
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dsv3lite.generate",
                description="Continue a prompt with a dsv3lite checkpoint.")
    p.add_argument("--ckpt", required=True, help="run folder or step folder")
    p.add_argument("--prompt", required=True, help="text to continue ('' = start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 100, or as many as fit max_seq_len")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculative", action="store_true", help="draft with the MTP module")
    p.add_argument("--compare", action="store_true",
                   help="run plain and speculative greedy decoding and compare them")
    p.add_argument("--attn-impl", default="absorbed", choices=ATTN_IMPLS)
    p.add_argument("--device", default="cpu")
    return p


def _stats(name: str, r: GenerationResult) -> str:
    rate = "n/a" if r.acceptance_rate is None else \
        f"{r.acceptance_rate:.0%} ({r.accepted}/{r.drafted})"
    return (f"{name:<12} {len(r.tokens)} tokens, {r.n_forward_passes} forward passes, "
            f"acceptance {rate}, {r.tokens_per_second:.1f} tokens/s")


def _run_cli(argv: Optional[list[str]]) -> int:
    a = _parser().parse_args(argv)
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise ValueError(f"--device={a.device!r} is invalid: use e.g. cpu, cuda, cuda:1, "
                         "mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={a.device!r} is invalid: CUDA is not available here")
    ckpt = latest_checkpoint(a.ckpt)
    tokenizer = load_tokenizer(ckpt)
    model, _ = load_model(ckpt, device)
    eot = tokenizer.token_to_id(EOT)
    prompt = tokenizer.encode(a.prompt).ids or ([eot] if eot is not None else [])
    n = a.max_new_tokens
    if n is None:
        n = max(0, min(100, model.args.max_seq_len - len(prompt)))
    generator = None
    if a.seed is not None:
        generator = torch.Generator(device).manual_seed(a.seed)
    if a.compare:
        plain = generate(model, prompt, n, 0.0, eos_id=eot, attn_impl=a.attn_impl)
        spec = generate(model, prompt, n, 0.0, speculative=True, eos_id=eot,
                        attn_impl=a.attn_impl)
        print(tokenizer.decode(prompt + spec.tokens))
        print(_stats("plain", plain))
        print(_stats("speculative", spec))
        print(f"{'identical':<12} {'yes' if plain.tokens == spec.tokens else 'NO'}")
        return 0
    r = generate(model, prompt, n, a.temperature, a.top_k, speculative=a.speculative,
                 attn_impl=a.attn_impl, generator=generator, eos_id=eot)
    print(tokenizer.decode(prompt + r.tokens))
    print(_stats("speculative" if a.speculative else "plain", r), file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: prints the completion; errors are one ``error:`` line, exit code 2."""
    try:
        return _run_cli(argv)
    except (_UsageError, ValueError, OSError, RuntimeError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
