"""One dataclass describes a DeepSeek-V3-style model.

The field names are DeepSeek's own (the official inference code's ``ModelArgs``), so a
reader can hold this file next to the paper and the released ``config_671B.json``.
Impossible combinations are rejected when the object is built, with a message that
names the field, the value and what is allowed ([V3] §2.1-2.2, §4.2; [V3-code]).

Presets:

- :meth:`ModelArgs.tiny` for unit tests (a forward pass in milliseconds on CPU);
- :meth:`ModelArgs.small` for notebook experiments on a laptop CPU (a few M parameters);
- :meth:`ModelArgs.h100` for one H100 (a few hundred M parameters);
- :meth:`ModelArgs.deepseek_v3` the full 671B configuration, for accounting only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = ["ModelArgs", "GROUPED_MM_MULTIPLE"]

GROUPED_MM_MULTIPLE = 8
"""``dim`` and ``moe_inter_dim`` must be multiples of this with ``moe_impl="grouped"``:
``torch._grouped_mm`` needs 16-byte rows, 8 bf16 elements."""


@dataclass
class ModelArgs:
    """Hyperparameters of a DeepSeek-V3-style model.

    Attributes:
        - vocab_size: Vocabulary size.
        - dim: Hidden size d.
        - inter_dim: Intermediate size of the dense SwiGLU FFNs (the first layers).
        - moe_inter_dim: Intermediate size of one (shared or routed) expert.
        - n_layers: Number of transformer blocks in the main model.
        - n_dense_layers: The first ``n_dense_layers`` blocks use a dense FFN, the rest MoE.
        - n_heads: Attention heads n_h.
        - q_lora_rank: Query compression d_c' (0 = no query compression, like V2-Lite).
        - kv_lora_rank: KV compression d_c (the cached latent c^KV).
        - qk_nope_head_dim: Per-head query/key dims without position encoding (d_h).
        - qk_rope_head_dim: Decoupled RoPE dims d_h^R (one k^R shared by all heads).
        - v_head_dim: Per-head value dims.
        - n_routed_experts: Routed experts N_r per MoE layer.
        - n_shared_experts: Shared experts N_s per MoE layer.
        - n_activated_experts: Routed experts chosen per token K_r.
        - n_expert_groups: Groups the routed experts are split into (nodes in V3).
        - n_limited_groups: Groups a token may use (M = 4 nodes in V3).
        - route_scale: Factor on the normalised gates (2.5 in V3).
        - n_mtp_depth: Sequential multi-token-prediction modules D (1 in V3; 0 = none).
        - mtp_lambda: Weight λ of the MTP loss (0.3 early in V3 training, then 0.1).
        - balance_loss_alpha: α of the complementary sequence-wise balance loss (1e-4 in V3).
        - bias_update_speed: γ, the bias update speed of auxiliary-loss-free balancing (1e-3).
        - max_seq_len: Longest sequence the model is built for.
        - original_seq_len: Pre-training context; YaRN is applied only beyond it.
        - rope_theta: RoPE base θ.
        - rope_factor: YaRN scale s (40 in V3).
        - beta_fast: YaRN β (fast rotations boundary).
        - beta_slow: YaRN α (slow rotations boundary).
        - mscale: YaRN attention-scale coefficient (√t = 0.1·mscale·ln s + 1).
        - norm_eps: RMSNorm epsilon.
        - init_std: Standard deviation of the normal initialisation (0.006 in V3).
        - fp8: Run the eligible Linears as block-scaled FP8 GEMMs (§3.3); see dsv3lite.fp8.
        - moe_impl: How the routed experts run: ``"grouped"`` (three grouped GEMMs per
          layer, no host synchronisation) or ``"loop"`` (one matmul per expert, the
          reference). Both compute the same function on the same weights.
    """

    vocab_size: int = 256
    dim: int = 64
    inter_dim: int = 128
    moe_inter_dim: int = 32
    n_layers: int = 2
    n_dense_layers: int = 1
    n_heads: int = 4
    # MLA
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 2
    n_limited_groups: int = 1
    route_scale: float = 2.5
    # training objectives
    n_mtp_depth: int = 1
    mtp_lambda: float = 0.3
    balance_loss_alpha: float = 1e-4
    bias_update_speed: float = 1e-3
    # RoPE and YaRN
    max_seq_len: int = 64
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # numerics
    norm_eps: float = 1e-6
    init_std: float = 0.006
    fp8: bool = False
    moe_impl: str = "grouped"

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """Query/key dims per head in the dot product: d_h + d_h^R (192 in V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_enabled(self) -> bool:
        """YaRN (and its mscale) applies only when context is extended."""
        return self.max_seq_len > self.original_seq_len

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether block ``layer_id`` has an MoE FFN (MTP blocks count after the main ones)."""
        return layer_id >= self.n_dense_layers and self.n_routed_experts > 0

    def replace(self, **changes: Any) -> "ModelArgs":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        def fail(field: str, value: object, allowed: str) -> NoReturn:
            raise ValueError(f"ModelArgs.{field}={value!r} is invalid: {allowed}")

        if self.moe_impl not in ("grouped", "loop"):
            fail("moe_impl", self.moe_impl, "choose 'grouped' or 'loop'")
        positive = ["vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len",
                    "original_seq_len", "n_expert_groups", "n_limited_groups"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, value, "must be a positive integer")
        non_negative = ["q_lora_rank", "n_dense_layers", "n_routed_experts", "n_shared_experts",
                        "n_activated_experts", "n_mtp_depth", "moe_inter_dim"]
        for name in non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, value, "must be a non-negative integer")
        if self.n_dense_layers > self.n_layers:
            fail("n_dense_layers", self.n_dense_layers,
                 f"must be <= n_layers={self.n_layers}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim,
                 "must be even (RoPE rotates pairs of dimensions)")
        for name in ["route_scale", "rope_theta", "norm_eps", "init_std", "rope_factor"]:
            if not getattr(self, name) > 0:
                fail(name, getattr(self, name), "must be > 0")
        for name in ["mtp_lambda", "balance_loss_alpha", "bias_update_speed"]:
            if not getattr(self, name) >= 0:
                fail(name, getattr(self, name), "must be >= 0")
        if self.yarn_enabled and self.rope_factor <= 1:
            fail("rope_factor", self.rope_factor,
                 f"must be > 1 when max_seq_len={self.max_seq_len} exceeds "
                 f"original_seq_len={self.original_seq_len} (YaRN extends the context)")
        has_moe = self.n_layers > self.n_dense_layers or self.n_mtp_depth > 0
        if not has_moe:
            return
        if self.n_routed_experts < 1:
            fail("n_routed_experts", self.n_routed_experts,
                 "must be >= 1 when some layers are MoE (n_dense_layers < n_layers)")
        if self.moe_inter_dim < 1:
            fail("moe_inter_dim", self.moe_inter_dim, "must be >= 1 when some layers are MoE")
        if self.n_routed_experts % self.n_expert_groups:
            fail("n_expert_groups", self.n_expert_groups,
                 f"must divide n_routed_experts={self.n_routed_experts} "
                 "(experts are split evenly into groups)")
        if self.n_limited_groups > self.n_expert_groups:
            fail("n_limited_groups", self.n_limited_groups,
                 f"must be <= n_expert_groups={self.n_expert_groups}")
        kept = self.n_routed_experts // self.n_expert_groups * self.n_limited_groups
        if not 1 <= self.n_activated_experts <= kept:
            fail("n_activated_experts", self.n_activated_experts,
                 f"must be between 1 and the {kept} experts held by the "
                 f"n_limited_groups={self.n_limited_groups} kept groups")
        if self.moe_impl == "grouped":
            # torch._grouped_mm needs every row of its operands to start on a 16-byte
            # boundary: in bf16 (autocast, and on CUDA) a multiple of 8 elements. The FP8
            # kernels zero-pad partial 128-tiles and need no multiple of their own.
            for name in ("dim", "moe_inter_dim"):
                value = getattr(self, name)
                if value % GROUPED_MM_MULTIPLE:
                    fail(name, value, f"must be a multiple of {GROUPED_MM_MULTIPLE} with "
                         "moe_impl='grouped' (torch._grouped_mm needs 16-byte rows in bf16); "
                         "use moe_impl='loop' for other sizes")

    # ---------------------------------------------------------------- presets
    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelArgs":
        """For unit tests: two blocks (one dense, one MoE), 8 experts in 2 groups."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides: Any) -> "ModelArgs":
        """For notebook experiments on a laptop CPU: a few million parameters."""
        base = dict(vocab_size=4096, dim=256, inter_dim=768, moe_inter_dim=128,
                    n_layers=4, n_dense_layers=1, n_heads=4,
                    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32,
                    n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
                    n_expert_groups=4, n_limited_groups=2, max_seq_len=256)
        return cls(**{**base, **overrides})

    @classmethod
    def h100(cls, **overrides: Any) -> "ModelArgs":
        """For one H100 (80 GB): a few hundred million total parameters."""
        base = dict(vocab_size=32768, dim=1024, inter_dim=2816, moe_inter_dim=256,
                    n_layers=12, n_dense_layers=1, n_heads=8,
                    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                    qk_rope_head_dim=32, v_head_dim=64,
                    n_routed_experts=32, n_shared_experts=1, n_activated_experts=4,
                    n_expert_groups=4, n_limited_groups=2, max_seq_len=1024)
        return cls(**{**base, **overrides})

    @classmethod
    def h100_1b(cls, **overrides: Any) -> "ModelArgs":
        """About 1B parameters at d_model 2048, for one 80 GB H100 in BF16 or FP8.

        Counted by :func:`~dsv3lite.count_params`: 0.99B in the main model (0.37B
        activated per token: 4 of 32 routed experts plus one shared), and 0.12B more in
        the MTP module. Weights, gradients and AdamW's two moments in FP32 take
        16 bytes per parameter, about 18 GB; activations come on top and grow with
        batch × sequence length (``benchmarks/train.py`` reports the peak).
        """
        base = dict(vocab_size=32768, dim=2048, inter_dim=5632, moe_inter_dim=512,
                    n_layers=8, n_dense_layers=1, n_heads=16,
                    q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=32, n_shared_experts=1, n_activated_experts=4,
                    n_expert_groups=4, n_limited_groups=2, max_seq_len=2048)
        return cls(**{**base, **overrides})

    @classmethod
    def deepseek_v3(cls, **overrides: Any) -> "ModelArgs":
        """DeepSeek-V3 671B (``config_671B.json``; [V3] §4.2-4.3). Never allocate it."""
        base = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
                    n_layers=61, n_dense_layers=3, n_heads=128,
                    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
                    n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
                    n_mtp_depth=1, max_seq_len=4096 * 40, original_seq_len=4096,
                    rope_theta=10000.0, rope_factor=40.0, beta_fast=32, beta_slow=1,
                    mscale=1.0)
        return cls(**{**base, **overrides})
