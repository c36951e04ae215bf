"""Parameter and KV-cache accounting from the args alone: nothing is allocated.

This is how the book counts DeepSeek-V3's 671B total and ~37B activated parameters
([V3] §4.2) and its 576 cached numbers per token per layer ([V2] Table 1).
A test checks these formulas against a real (tiny) model's tensors.

"Activated" counts what one token touches: everything except the routed experts it was
not sent to. Following the report's convention, the MTP modules are counted apart from
the main model (671B main + 14B MTP = 685B released).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelArgs

__all__ = ["ParamCount", "count_params", "kv_cache_elements_per_token"]


@dataclass
class ParamCount:
    """Total and activated parameters, per component.

    Attributes:
        components: name -> (total, activated) for the main model.
        mtp: (total, activated) of the MTP modules, excluding the shared embedding and head.
    """

    components: dict[str, tuple[int, int]] = field(default_factory=dict)
    mtp: tuple[int, int] = (0, 0)

    @property
    def total(self) -> int:
        """Main-model parameters (no MTP)."""
        return sum(t for t, _ in self.components.values())

    @property
    def activated(self) -> int:
        """Main-model parameters one token uses."""
        return sum(a for _, a in self.components.values())

    @property
    def total_with_mtp(self) -> int:
        """Main-model plus MTP-module parameters (685B for V3: what was released)."""
        return self.total + self.mtp[0]

    def rows(self) -> list[tuple[str, int, int]]:
        """(component, total, activated) rows, then the totals, for a table."""
        rows = [(name, t, a) for name, (t, a) in self.components.items()]
        rows.append(("main model", self.total, self.activated))
        rows.append(("MTP modules", *self.mtp))
        return rows


def _mla_params(a: ModelArgs) -> int:
    if a.q_lora_rank:
        q = a.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.n_heads * a.qk_head_dim
    else:
        q = a.dim * a.n_heads * a.qk_head_dim
    kv = (a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
          + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim))
    return q + kv + a.n_heads * a.v_head_dim * a.dim


def _block_parts(a: ModelArgs, layer_id: int) -> dict[str, tuple[int, int]]:
    """(total, activated) of one block's pieces."""
    norms = 2 * a.dim
    parts = {"attention (MLA)": (_mla_params(a), _mla_params(a)), "norms": (norms, norms)}
    if a.is_moe_layer(layer_id):
        expert = 3 * a.dim * a.moe_inter_dim
        shared = 3 * a.dim * a.n_shared_experts * a.moe_inter_dim
        router = a.n_routed_experts * a.dim
        parts["routed experts"] = (a.n_routed_experts * expert, a.n_activated_experts * expert)
        parts["shared experts"] = (shared, shared)
        parts["routers"] = (router, router)
    else:
        dense = 3 * a.dim * a.inter_dim
        parts["dense FFN"] = (dense, dense)
    return parts


def count_params(args: ModelArgs) -> ParamCount:
    """Count parameters of ``Transformer(args)`` without building it.

    Routing biases are buffers, not parameters, and are not counted.
    """
    count = ParamCount()
    emb = args.vocab_size * args.dim
    comps: dict[str, list[int]] = {"embedding": [emb, emb]}

    def add(parts: dict[str, tuple[int, int]], into: dict[str, list[int]]) -> None:
        for name, (t, a) in parts.items():
            into.setdefault(name, [0, 0])
            into[name][0] += t
            into[name][1] += a

    for layer_id in range(args.n_layers):
        add(_block_parts(args, layer_id), comps)
    add({"final norm": (args.dim, args.dim), "output head": (emb, emb)}, comps)
    count.components = {name: (t, a) for name, (t, a) in comps.items()}
    mtp_total = mtp_active = 0
    for depth in range(1, args.n_mtp_depth + 1):
        own = 2 * args.dim + 2 * args.dim * args.dim + args.dim  # hnorm, enorm, eh_proj, norm
        parts = _block_parts(args, args.n_layers + depth - 1)
        mtp_total += own + sum(t for t, _ in parts.values())
        mtp_active += own + sum(a for _, a in parts.values())
    count.mtp = (mtp_total, mtp_active)
    return count


def kv_cache_elements_per_token(args: ModelArgs, per_layer: bool = False) -> int:
    """Cached numbers per token: (kv_lora_rank + qk_rope_head_dim) per layer (576 in V3)."""
    per = args.kv_lora_rank + args.qk_rope_head_dim
    return per if per_layer else per * args.n_layers
