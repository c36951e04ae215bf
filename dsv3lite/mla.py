"""Multi-head Latent Attention (MLA), [V3] §2.1.1 Eqs. 1-11.

Keys and values are rebuilt from one small latent per token, c^KV = W^DKV h (Eq. 1),
plus one decoupled RoPE key k^R = RoPE(W^KR h) shared by every head (Eq. 3). Only
those two are cached: ``kv_lora_rank + qk_rope_head_dim`` numbers per token per layer
(576 in V3, against 32,768 for standard MHA; [V2] Table 1).

Three ways to compute the same attention:

- training / prefill (``cache=None``): up-project the latents to per-head keys and
  values and run ordinary causal attention (qk dim ``qk_head_dim``, v dim ``v_head_dim``);
- decode ``"naive"``: keep the latent cache, up-project all cached latents every step;
- decode ``"absorbed"``: fold W^UK into the query and W^UV into the output, so attention
  runs directly on the cached latents, like MQA with one 576-d key and one 512-d value
  ([V2] App. C; [V3-code] ``MLA.forward``). Exact, by associativity: (q W^UK)·c = q·(W^UK c).

Layer names follow the official inference code: ``wq`` or ``wq_a``/``q_norm``/``wq_b``,
``wkv_a`` (W^DKV and W^KR fused), ``kv_norm``, ``wkv_b`` (W^UK and W^UV interleaved
per head), ``wo``.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .fp8 import linear_class
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale

__all__ = ["MLA", "LatentKVCache", "AttnImpl", "causal_attention"]

#: How decoding attends over the latent cache: ``"naive"`` up-projects every cached latent
#: to per-head keys and values each step, ``"absorbed"`` folds W^UK and W^UV into the
#: query and output and attends on the latents directly (the same function).
AttnImpl = Literal["naive", "absorbed"]
ATTN_IMPLS = ("naive", "absorbed")


class LatentKVCache:
    """The decode cache of MLA: per layer, the normalised latent c^KV and the rotated k^R.

    Nothing else is stored: no per-head keys or values.

    Args:
        args: Model dimensions.
        batch_size: Sequences decoded together.
        max_len: Longest sequence the cache can hold (at most ``args.max_seq_len``).
        n_layers: Attention layers that share this cache object.
        device, dtype: Where and how the cache lives.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: Optional[int] = None,
                 n_layers: Optional[int] = None, device: Optional[torch.device | str] = None,
                 dtype: torch.dtype = torch.float32):
        max_len = args.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= args.max_seq_len:
            raise ValueError(f"max_len={max_len} is invalid: must be between 1 and "
                             f"args.max_seq_len={args.max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
        n_layers = args.n_layers if n_layers is None else n_layers
        self.max_len = max_len
        self.batch_size = batch_size
        # (B, T_max, kv_lora_rank) and (B, T_max, qk_rope_head_dim) per layer
        self.kv = [torch.zeros(batch_size, max_len, args.kv_lora_rank, device=device, dtype=dtype)
                   for _ in range(n_layers)]
        self.pe = [torch.zeros(batch_size, max_len, args.qk_rope_head_dim, device=device,
                               dtype=dtype) for _ in range(n_layers)]

    @property
    def n_layers(self) -> int:
        """Attention layers the cache holds latents for."""
        return len(self.kv)

    def elements_per_token_per_layer(self) -> int:
        """Numbers stored per token per layer, read off the tensors themselves."""
        total = sum(t.numel() for t in self.kv + self.pe)
        return total // (self.n_layers * self.batch_size * self.max_len)

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.kv + self.pe)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal softmax attention, (B, T, H, d) in and (B, T, H, d_v) out.

    MLA's value heads (128 in V3) are narrower than its query/key heads (192). On CUDA
    the values are zero-padded to the query width so that the fused FlashAttention
    kernel, which wants one head size, can run; the padded output columns are zeros
    and are cut off, so the result is the same function.
    """
    d_v = v.shape[-1]
    if q.is_cuda and d_v < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - d_v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                       v.transpose(1, 2), is_causal=True, scale=scale)
    return o.transpose(1, 2)[..., :d_v]


class MLA(nn.Module):
    """Multi-head latent attention with decoupled RoPE.

    Args:
        args: Model dimensions (``q_lora_rank == 0`` disables query compression).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = softmax_scale(args)
        Linear = linear_class(args.fp8)  # the GEMM backend: FP8Linear with fp8=True (§3.3.1)
        if self.q_lora_rank == 0:
            self.wq = Linear(args.dim, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank,
                            self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = Linear(self.n_heads * self.v_head_dim, args.dim, bias=False)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries split into (q_nope, q_pe), each (B, T, H, ·); q_pe rotated."""
        if self.q_lora_rank == 0:
            q = self.wq(x)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)))  # Eqs. 6-8
        q = q.unflatten(-1, (self.n_heads, self.qk_head_dim))
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached quantities: kv_norm(c^KV) (B, T, d_c) and RoPE(k^R) (B, T, d_h^R)."""
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # one k^R for all heads
        return self.kv_norm(kv), k_pe

    def up_project(self, kv: torch.Tensor, k_pe: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys (B, T, H, qk_head_dim) and values (B, T, H, v_head_dim), Eqs. 2-5."""
        kv = self.wkv_b(kv).unflatten(-1, (self.n_heads, self.qk_nope_head_dim + self.v_head_dim))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)
        return torch.cat([k_nope, k_pe], dim=-1), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[LatentKVCache] = None, layer_id: int = 0, start_pos: int = 0,
                attn_impl: AttnImpl = "absorbed") -> torch.Tensor:
        """Attention output for x.

        Args:
            - x: (B, T, dim) hidden states.
            - cos, sin: RoPE tables for positions ``start_pos .. start_pos + T``.
            - cache: None for training / prefill without a cache; otherwise the latent cache,
              into which this call writes positions ``start_pos .. start_pos + T``.
            - layer_id: Which layer of ``cache`` this module owns.
            - start_pos: Position of x's first token.
            - attn_impl: ``"naive"`` or ``"absorbed"`` (used only with a cache).

        Returns:
            (B, T, dim).
        """
        B, T, _ = x.shape
        q_nope, q_pe = self.queries(x, cos, sin)
        kv, k_pe = self.latents(x, cos, sin)
        if cache is None:  # training / prefill: ordinary causal attention, Eq. 10
            k, v = self.up_project(kv, k_pe)
            q = torch.cat([q_nope, q_pe], dim=-1)
            o = causal_attention(q, k, v, self.softmax_scale)
            return self.wo(o.flatten(2))
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r} is invalid: must be one of {ATTN_IMPLS}")
        end = start_pos + T
        if end > cache.max_len or B > cache.batch_size:
            raise ValueError(f"cache of batch {cache.batch_size} x length {cache.max_len} cannot "
                             f"hold batch {B} at positions {start_pos}..{end}")
        cache.kv[layer_id][:B, start_pos:end] = kv.to(cache.kv[layer_id].dtype)
        cache.pe[layer_id][:B, start_pos:end] = k_pe.to(cache.pe[layer_id].dtype)
        kv_all = cache.kv[layer_id][:B, :end].to(x.dtype)  # (B, S, d_c)
        pe_all = cache.pe[layer_id][:B, :end].to(x.dtype)  # (B, S, d_h^R)
        # query t (absolute position start_pos + t) sees keys 0 .. start_pos + t
        visible = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start_pos)
        if attn_impl == "naive":
            k, v = self.up_project(kv_all, pe_all)
            q = torch.cat([q_nope, q_pe], dim=-1)
            scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale
            scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))
            probs = scores.float().softmax(dim=-1).to(x.dtype)
            o = torch.einsum("bsht,bthd->bshd", probs, v)
        else:
            w = self.wkv_b.weight.unflatten(0, (self.n_heads, -1))  # (H, nope + v, d_c)
            w_uk, w_uv = w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # absorb W^UK
            scores = (torch.einsum("bshc,btc->bsht", q_latent, kv_all)
                      + torch.einsum("bshr,btr->bsht", q_pe, pe_all)) * self.softmax_scale
            scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))
            probs = scores.float().softmax(dim=-1).to(x.dtype)
            o_latent = torch.einsum("bsht,btc->bshc", probs, kv_all)
            o = torch.einsum("bshc,hdc->bshd", o_latent, w_uv)  # absorb W^UV
        return self.wo(o.flatten(2))
