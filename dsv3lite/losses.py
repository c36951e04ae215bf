"""Cross-entropy through the output head without materialising all the logits.

A language model's last GEMM is the largest activation of the step: ``(tokens, vocab)``
logits, 129,280 wide in V3. ``F.cross_entropy(head(h).float(), targets)`` keeps the logits
for backward and makes an FP32 copy of them on top: at 8,192 tokens and V3's vocabulary
that is 2 GiB in BF16 plus 4 GiB in FP32, for one number.

:func:`linear_cross_entropy` fuses the head with the loss and runs over the tokens in
chunks. The forward keeps only two FP32 numbers per token (the log-sum-exp and the target
logit); the backward recomputes each chunk's logits from ``h`` and the head weight and
turns them straight into gradients (softmax − one-hot), so at most one chunk of logits
exists at any time. The price is one extra head GEMM in the backward (the forward's,
recomputed): about a third more FLOPs for the head, a few percent of a step.

It computes the same function as the reference ``F.cross_entropy(F.linear(h, w).float(),
targets, ignore_index=-100)`` and is tested against it; the sums run in another order,
so the results agree to rounding, not bit for bit. That is why the trainer uses it only on
CUDA, where the memory matters, and keeps the reference path on a CPU, where chapters pin
numbers from seeded runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "reference_cross_entropy"]

IGNORE_INDEX = -100
"""Targets equal to this are ignored (PyTorch's convention)."""
DEFAULT_CHUNK = 1024
"""Tokens per chunk: 1,024 x 129,280 FP32 logits are 0.5 GiB."""


def reference_cross_entropy(h: torch.Tensor, weight: torch.Tensor,
                            targets: torch.Tensor) -> torch.Tensor:
    """The plain computation: full logits, an FP32 copy, then ``F.cross_entropy``."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(h.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            n = hc.shape[0]
            valid = targets != IGNORE_INDEX
            safe = targets.clamp(min=0)
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
            picked = torch.empty(n, dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                logits = (hc[s:s + chunk] @ wc.t()).float()
                lse[s:s + chunk] = logits.logsumexp(-1)
                picked[s:s + chunk] = logits.gather(1, safe[s:s + chunk, None]).squeeze(1)
            n_valid = valid.sum()
            loss = ((lse - picked) * valid).sum() / n_valid
        ctx.save_for_backward(hc, wc, safe, valid, lse, n_valid)
        ctx.chunk, ctx.h_dtype, ctx.w_dtype = chunk, h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None, None, None]:
        hc, wc, safe, valid, lse, n_valid = ctx.saved_tensors
        chunk, n = ctx.chunk, hc.shape[0]
        # d loss / d logit = (softmax - one_hot) * grad / n_valid on valid rows, 0 elsewhere
        row_scale = valid.float() * (grad_loss.float() / n_valid)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hc) if need_h else None
        dw = torch.zeros(wc.shape, dtype=torch.float32, device=wc.device) if need_w else None
        with torch.autocast(hc.device.type, enabled=False):
            for s in range(0, n, chunk):
                h_c = hc[s:s + chunk]
                g = ((h_c @ wc.t()).float() - lse[s:s + chunk, None]).exp()
                g.scatter_add_(1, safe[s:s + chunk, None],
                               -torch.ones_like(g[:, :1]))
                g = (g * row_scale[s:s + chunk, None]).to(hc.dtype)
                if dh is not None:  # need_h
                    dh[s:s + chunk] = g @ wc
                if dw is not None:  # need_w
                    dw += (g.t() @ h_c).float()
        dh = dh.to(ctx.h_dtype) if dh is not None else None
        dw = dw.to(ctx.w_dtype) if dw is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of ``F.linear(h, weight)`` against ``targets``, in chunks.

    Args:
        - h: (..., d) final hidden states (after the last norm).
        - weight: (vocab, d) output-head weight.
        - targets: (...) token ids matching h's leading dims; ``IGNORE_INDEX`` (-100) is
          skipped. The mean runs over the other targets (NaN if there are none, like
          ``F.cross_entropy``).
        - chunk_size: Tokens whose logits exist at one time (forward and backward).

    Returns:
        A scalar FP32 loss. Under autocast the GEMMs run in the autocast dtype; the
        log-sum-exp and the gradients' softmax are FP32.
    """
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"targets has shape {tuple(targets.shape)}: expected h's leading "
                         f"dims {tuple(h.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: expected (vocab, "
                         f"{h.shape[-1]}) to match h's last dim")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be a positive int")
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                     chunk_size, _compute_dtype(h, weight))
