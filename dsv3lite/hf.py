"""Bridge to Hugging Face transformers' ``DeepseekV3ForCausalLM`` (transformers >= 5).

:func:`to_hf` turns a :class:`~dsv3lite.Transformer` into a ``DeepseekV3ForCausalLM``
with the same weights and the same logits; :func:`from_hf` goes back. Only the main
model crosses the bridge: ``DeepseekV3ForCausalLM`` holds no multi-token-prediction
(MTP) module, so ours are left out (transformers can attach MTP layers for
``generate(use_mtp=True)`` only by reading them from a checkpoint on disk; the
exported config says ``num_mtp_layers=0``).

Configuration (``ModelArgs`` field -> ``DeepseekV3Config`` field)::

    vocab_size          -> vocab_size
    dim                 -> hidden_size
    inter_dim           -> intermediate_size
    moe_inter_dim       -> moe_intermediate_size
    n_layers            -> num_hidden_layers
    n_dense_layers      -> first_k_dense_replace
    n_heads             -> num_attention_heads (and num_key_value_heads, the same)
    q_lora_rank         -> q_lora_rank (0 <-> None: no query compression)
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
    n_routed_experts, n_shared_experts -> the same names
    n_activated_experts -> num_experts_per_tok
    n_expert_groups     -> n_group
    n_limited_groups    -> topk_group
    route_scale         -> routed_scaling_factor
    max_seq_len         -> max_position_embeddings
    rope_theta          -> rope_parameters["rope_theta"]
    norm_eps            -> rms_norm_eps
    init_std            -> initializer_range
    (fixed)             -> norm_topk_prob=True, rope_interleave=True, hidden_act="silu",
                           attention_bias=False, tie_word_embeddings=False, num_mtp_layers=0

    YaRN (only when max_seq_len > original_seq_len, as in our rope.py):
    rope_parameters = {"rope_type": "yarn", "rope_theta": rope_theta,
                       "factor": rope_factor, "original_max_position_embeddings": original_seq_len,
                       "beta_fast": beta_fast, "beta_slow": beta_slow,
                       "mscale": mscale, "mscale_all_dim": mscale}
    otherwise {"rope_type": "default", "rope_theta": rope_theta}.

    With mscale == mscale_all_dim HF leaves cos/sin unscaled and multiplies the softmax
    scale by (0.1·mscale·ln s + 1)², exactly our ``softmax_scale``.

Weights (ours -> HF; ``L`` = ``layers.{i}.`` -> ``model.layers.{i}.``)::

    embed.weight                  -> model.embed_tokens.weight
    L attn_norm / ffn_norm        -> L input_layernorm / post_attention_layernorm
    L attn.wq                     -> L self_attn.q_proj          (q_lora_rank == 0)
    L attn.wq_a / q_norm / wq_b   -> L self_attn.q_a_proj / q_a_layernorm / q_b_proj
    L attn.wkv_a / kv_norm        -> L self_attn.kv_a_proj_with_mqa / kv_a_layernorm
    L attn.wkv_b / wo             -> L self_attn.kv_b_proj / o_proj
    L ffn.w1 / w3 / w2 (dense)    -> L mlp.gate_proj / up_proj / down_proj
    L ffn.gate.weight             -> L mlp.gate.weight
    L ffn.gate.balancer.bias      -> L mlp.gate.e_score_correction_bias  (kept in fp32)
    L ffn.experts.w1, .w3 (E, I, dim) -> L mlp.experts.gate_up_proj = cat([w1, w3], 1)  (E, 2·I, dim)
    L ffn.experts.w2 (E, dim, I)      -> L mlp.experts.down_proj                        (E, dim, I)
    L ffn.shared_experts.w1/w3/w2 -> L mlp.shared_experts.gate_proj/up_proj/down_proj
    norm.weight                   -> model.norm.weight
    head.weight                   -> lm_head.weight

No tensor is permuted: both sides rotate the RoPE dims of ``wq_b``/``wkv_a`` as
interleaved pairs (HF writes the rotated pairs out de-interleaved, the same
permutation for queries and keys, which leaves every attention score unchanged).

Known differences of HF's implementation (transformers 5.x) that the mapping respects:

- ``q_a_layernorm`` and ``kv_a_layernorm`` always use eps 1e-6, whatever
  ``rms_norm_eps`` says; our ``q_norm``/``kv_norm`` use ``norm_eps``. The logits agree
  exactly only for ``norm_eps == 1e-6`` (a warning is issued otherwise).
- HF's router scores a group by its top-2 experts unconditionally, so every group needs
  at least 2 experts (even with ``n_group == 1``); :func:`to_hf_config` rejects smaller
  groups. Ours uses min(2, group size).
- HF's router masks dropped groups with -inf, like ours (transformers 4.x masked them
  with 0.0, which could pick a dropped expert once biases push kept scores below 0),
  and adds 1e-20 to the gate denominator (invisible in fp32).
- HF always builds the shared expert MLP (zero-width when ``n_shared_experts == 0``).
- HF applies YaRN whenever ``rope_type == "yarn"``; ours only beyond
  ``original_seq_len``; :func:`from_hf` therefore requires
  ``max_position_embeddings > original_max_position_embeddings`` for YaRN configs.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from typing import Any, Iterator, NoReturn

import torch

from .config import ModelArgs
from .model import Transformer
from .versions import TRANSFORMERS_FLOOR, check_transformers

try:  # transformers is an optional dependency (``pip install dsv3lite[hf]``)
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(f"dsv3lite.hf needs transformers>={TRANSFORMERS_FLOOR} "
                      "(pip install 'dsv3lite[hf]')") from exc
check_transformers(transformers.__version__)

__all__ = ["to_hf_config", "from_hf_config", "to_hf", "from_hf", "FIELD_MAP"]

#: ModelArgs field -> DeepseekV3Config field, for the fields copied one to one
#: (rope_theta and the YaRN fields live in ``rope_parameters``).
FIELD_MAP: dict[str, str] = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
}

_HF_LATENT_NORM_EPS = 1e-6  # HF's q_a_layernorm / kv_a_layernorm ignore rms_norm_eps


# --------------------------------------------------------------------------- config
def to_hf_config(args: ModelArgs) -> DeepseekV3Config:
    """The ``DeepseekV3Config`` describing the main model of ``args``.

    Args:
        - args: Our hyperparameters. The MTP and training-only fields (``n_mtp_depth``,
          ``mtp_lambda``, ``balance_loss_alpha``, ``bias_update_speed``) have no HF
          counterpart and are dropped.

    Returns:
        A config with sigmoid routing, normalised top-K gates, interleaved RoPE, no
        attention bias, untied embeddings, ``num_mtp_layers=0`` and YaRN rope parameters
        exactly when ``args.max_seq_len > args.original_seq_len``.

    Raises:
        - ValueError: If HF's DeepSeek-V3 cannot express ``args`` (groups of fewer than 2
          routed experts; YaRN with a zero ``beta_fast``/``beta_slow``).
    """
    has_moe = args.n_routed_experts > 0 and args.n_layers > args.n_dense_layers
    if has_moe and args.n_routed_experts // args.n_expert_groups < 2:
        raise ValueError(
            f"ModelArgs.n_expert_groups={args.n_expert_groups} cannot be exported: HF's router "
            f"scores each group by its top-2 experts, so n_routed_experts={args.n_routed_experts} "
            "/ n_expert_groups must be >= 2")
    if args.norm_eps != _HF_LATENT_NORM_EPS:
        warnings.warn(f"norm_eps={args.norm_eps}: HF's q_a_layernorm/kv_a_layernorm always use "
                      f"eps={_HF_LATENT_NORM_EPS}, so the HF model differs slightly from ours",
                      stacklevel=2)
    if args.yarn_enabled:
        for name in ("beta_fast", "beta_slow"):
            if not getattr(args, name):
                raise ValueError(f"ModelArgs.{name}={getattr(args, name)!r} cannot be exported: "
                                 "HF replaces a zero YaRN beta by its default (32 / 1)")
        rope: dict[str, Any] = {
            "rope_type": "yarn",
            "rope_theta": float(args.rope_theta),
            "factor": float(args.rope_factor),
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
            "mscale": float(args.mscale),
            "mscale_all_dim": float(args.mscale),
        }
        if not args.mscale:
            # HF treats mscale 0 as "unset" and would scale cos/sin by 0.1·ln(s) + 1.
            rope["attention_factor"] = 1.0
    else:
        rope = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    return DeepseekV3Config(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim,
        num_hidden_layers=args.n_layers,
        first_k_dense_replace=args.n_dense_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads,
        q_lora_rank=args.q_lora_rank or None,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts,
        num_experts_per_tok=args.n_activated_experts,
        n_group=args.n_expert_groups,
        topk_group=args.n_limited_groups,
        routed_scaling_factor=float(args.route_scale),
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=args.max_seq_len,
        rope_parameters=rope,
        rope_interleave=True,
        rms_norm_eps=float(args.norm_eps),
        initializer_range=float(args.init_std),
        tie_word_embeddings=False,
        attention_bias=False,
        attention_dropout=0.0,
        num_mtp_layers=0,
    )


def _reject(field: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"unsupported DeepseekV3Config: {field}={value!r}; {allowed}")


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """HF's (and DeepSeek's) √t = 0.1·mscale·ln(s) + 1, or 1 for s <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_fields(config: DeepseekV3Config) -> dict[str, Any]:
    """ModelArgs' RoPE/YaRN fields from ``config.rope_parameters`` (validated)."""
    rope = config.rope_parameters
    if not isinstance(rope, dict) or "rope_type" not in rope:
        _reject("rope_parameters", rope, "expected one dict with a 'rope_type' (no per-layer RoPE)")
    rope_type = rope["rope_type"]
    if rope_type not in ("default", "yarn"):
        _reject("rope_parameters['rope_type']", rope_type,
                "allowed: 'default' or 'yarn' (the RoPE types dsv3lite implements)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _reject("rope_parameters['partial_rotary_factor']", rope["partial_rotary_factor"],
                "allowed: 1.0 (all qk_rope_head_dim dims rotate)")
    theta = rope["rope_theta"]
    if theta is None:  # RopeParameters allows None; float(None) would fail unexplained
        _reject("rope_parameters['rope_theta']", theta, "a number is required")
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    default_original = ModelArgs.original_seq_len
    if rope_type == "default":
        # Keep YaRN off on our side: original_seq_len must not be below max_seq_len.
        fields["original_seq_len"] = max(default_original, config.max_position_embeddings)
        return fields
    original = rope.get("original_max_position_embeddings")
    if not isinstance(original, int) or original < 1:
        _reject("rope_parameters['original_max_position_embeddings']", original,
                "a positive integer is required for YaRN")
    if config.max_position_embeddings <= original:
        _reject("max_position_embeddings", config.max_position_embeddings,
                f"must exceed rope_parameters['original_max_position_embeddings']={original} "
                "with rope_type 'yarn' (dsv3lite applies YaRN only beyond the original context)")
    if not rope.get("truncate", True):
        _reject("rope_parameters['truncate']", rope["truncate"],
                "allowed: True (the correction range is floored/ceiled, as in DeepSeek's code)")
    factor = rope.get("factor") or config.max_position_embeddings / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:  # what HF would infer (modeling_rope_utils)
        if mscale and mscale_all_dim:
            attention_factor = (_yarn_get_mscale(factor, mscale)
                                / _yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_get_mscale(factor)
    if not math.isclose(attention_factor, 1.0, rel_tol=0, abs_tol=1e-12):
        _reject("rope_parameters['mscale_all_dim']", mscale_all_dim,
                f"with mscale={mscale!r} and attention_factor={rope.get('attention_factor')!r} "
                f"HF scales cos/sin by {attention_factor:.6g}, dsv3lite only by 1.0: "
                "set mscale_all_dim equal to mscale (or attention_factor=1.0)")
    fields.update(original_seq_len=original, rope_factor=float(factor),
                  beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                  mscale=float(mscale_all_dim or 0.0))
    return fields


def from_hf_config(config: DeepseekV3Config) -> ModelArgs:
    """Our :class:`~dsv3lite.ModelArgs` for a ``DeepseekV3Config``.

    Args:
        config: A DeepSeek-V3 configuration (``model_type == "deepseek_v3"``).

    Returns:
        ModelArgs with ``n_mtp_depth=0`` (the HF model carries no MTP). Fields HF does not
        describe (``mtp_lambda``, ``balance_loss_alpha``, ``bias_update_speed``, and the
        YaRN fields when RoPE is plain) keep their ModelArgs defaults; ``original_seq_len``
        is raised to ``max_seq_len`` if needed so that plain RoPE stays plain.

    Raises:
        - ValueError: Naming the config field, its value and what is allowed, if the config
          asks for something dsv3lite does not implement (softmax scoring, un-normalised
          top-K gates, attention biases, non-interleaved RoPE, a RoPE type other than
          default/yarn, grouped KV heads, another activation, ...), or if the mapped
          values are invalid ModelArgs.
    """
    model_type = getattr(config, "model_type", None)
    if model_type != "deepseek_v3":
        _reject("model_type", model_type, "allowed: 'deepseek_v3'")
    checks = [  # (field, value, allowed values, explanation)
        ("scoring_func", getattr(config, "scoring_func", "sigmoid"), ("sigmoid",),
         "dsv3lite routes with sigmoid affinities"),
        ("topk_method", getattr(config, "topk_method", "noaux_tc"), ("noaux_tc",),
         "dsv3lite selects experts with the bias-corrected, group-limited top-K"),
        ("norm_topk_prob", config.norm_topk_prob, (True,),
         "dsv3lite normalises the chosen gates to sum to 1 before route_scale"),
        ("attention_bias", config.attention_bias, (False,), "dsv3lite's projections have no bias"),
        ("rope_interleave", config.rope_interleave, (True,),
         "dsv3lite rotates interleaved pairs, as DeepSeek's checkpoints expect"),
        ("hidden_act", config.hidden_act, ("silu",), "dsv3lite's FFNs are SwiGLU"),
        ("num_key_value_heads", config.num_key_value_heads, (config.num_attention_heads,),
         "MLA has one key/value per query head"),
    ]
    for field, value, allowed, why in checks:
        if value not in allowed:
            _reject(field, value, f"allowed: {' or '.join(map(repr, allowed))} ({why})")
    for field in ("first_k_dense_replace", "n_group", "topk_group", "num_experts_per_tok"):
        if not isinstance(getattr(config, field), int):
            _reject(field, getattr(config, field), "an integer is required")
    if config.qk_rope_head_dim % 2:
        _reject("qk_rope_head_dim", config.qk_rope_head_dim, "must be even")
    fields = {ours: getattr(config, theirs) for ours, theirs in FIELD_MAP.items()}
    fields["q_lora_rank"] = fields["q_lora_rank"] or 0
    fields.update(_rope_fields(config), n_mtp_depth=0)
    try:
        return ModelArgs(**fields)
    except ValueError as exc:
        match = re.match(r"ModelArgs\.(\w+)=", str(exc))
        theirs = FIELD_MAP.get(match.group(1)) if match else None
        hint = f" (HF field {theirs!r})" if theirs else ""
        raise ValueError(f"unsupported DeepseekV3Config: {exc}{hint}") from exc


# -------------------------------------------------------------------------- weights
def _pairs(args: ModelArgs) -> list[tuple[str, str]]:
    """(our state-dict key, HF state-dict key) for every tensor copied one to one."""
    pairs = [("embed.weight", "model.embed_tokens.weight"),
             ("norm.weight", "model.norm.weight"),
             ("head.weight", "lm_head.weight")]
    attn = [("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"),
            ("wkv_b", "kv_b_proj"), ("wo", "o_proj")]
    attn += ([("wq", "q_proj")] if args.q_lora_rank == 0 else
             [("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj")])
    mlp = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
    for i in range(args.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(o + "attn_norm.weight", h + "input_layernorm.weight"),
                  (o + "ffn_norm.weight", h + "post_attention_layernorm.weight")]
        pairs += [(f"{o}attn.{a}.weight", f"{h}self_attn.{b}.weight") for a, b in attn]
        if args.is_moe_layer(i):
            pairs += [(o + "ffn.gate.weight", h + "mlp.gate.weight"),
                      (o + "ffn.gate.balancer.bias", h + "mlp.gate.e_score_correction_bias")]
            if args.n_shared_experts:
                pairs += [(f"{o}ffn.shared_experts.{a}.weight", f"{h}mlp.shared_experts.{b}.weight")
                          for a, b in mlp]
        else:
            pairs += [(f"{o}ffn.{a}.weight", f"{h}mlp.{b}.weight") for a, b in mlp]
    return pairs


def _moe_layers(args: ModelArgs) -> Iterator[int]:
    return (i for i in range(args.n_layers) if args.is_moe_layer(i))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF's names and layouts (experts fused)."""
    args, ours = model.args, model.state_dict()
    out = {theirs: ours[mine] for mine, theirs in _pairs(args)}
    for i in _moe_layers(args):
        o, h = f"layers.{i}.ffn.", f"model.layers.{i}.mlp."
        # HF: gate, up = linear(x, gate_up_proj[e]).chunk(2) -> gate rows first, then up rows.
        out[h + "experts.gate_up_proj"] = torch.cat([ours[o + "experts.w1"],
                                                     ours[o + "experts.w3"]], dim=1)
        out[h + "experts.down_proj"] = ours[o + "experts.w2"]
        if not args.n_shared_experts:  # HF keeps a zero-width shared MLP
            w = ours[o + "gate.weight"]
            out[h + "shared_experts.gate_proj.weight"] = w.new_empty(0, args.dim)
            out[h + "shared_experts.up_proj.weight"] = w.new_empty(0, args.dim)
            out[h + "shared_experts.down_proj.weight"] = w.new_empty(args.dim, 0)
    return out


def _our_state_dict(hf_model: DeepseekV3ForCausalLM, args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF's weights under our names and layouts (experts split)."""
    theirs = hf_model.state_dict()
    if "lm_head.weight" not in theirs:  # tied embeddings may be reported once
        theirs["lm_head.weight"] = hf_model.lm_head.weight
    out = {mine: theirs[key] for mine, key in _pairs(args)}
    for i in _moe_layers(args):
        o, h = f"layers.{i}.ffn.", f"model.layers.{i}.mlp."
        gate_up = theirs[h + "experts.gate_up_proj"]  # (E, 2·I, dim)
        out[o + "experts.w1"], out[o + "experts.w3"] = gate_up.chunk(2, dim=1)
        out[o + "experts.w2"] = theirs[h + "experts.down_proj"]
    return out


# --------------------------------------------------------------------------- models
@torch.no_grad()
def to_hf(model: Transformer, *, attn_implementation: str = "eager",
          experts_implementation: str = "eager") -> DeepseekV3ForCausalLM:
    """A ``DeepseekV3ForCausalLM`` computing the same logits as ``model``.

    MTP modules are excluded: ``DeepseekV3ForCausalLM`` has no place for them whatever
    ``num_mtp_layers`` says (transformers keeps MTP layers in a separate ``MtpModel``,
    which ``generate(use_mtp=True)`` loads from a checkpoint on disk as a draft), and the
    exported config says ``num_mtp_layers=0``. Everything else is copied, so later
    changes to either model do not affect the other.

    Args:
        - model: Our model (any device; the copy is made on the same device).
        - attn_implementation: HF attention kernel; ``"eager"`` (default) is deterministic
          and available everywhere, ``"sdpa"`` is faster.
        - experts_implementation: HF MoE kernel; ``"eager"`` (default) loops over experts
          like ours.

    Returns:
        The HF model in eval mode, in the dtype of ``model.embed.weight`` (fp32 for a
        freshly built model), except ``e_score_correction_bias`` which HF keeps in fp32.
    """
    args = model.args
    weight = model.embed.weight
    config = to_hf_config(args)
    config.dtype = weight.dtype
    config._attn_implementation = attn_implementation
    config._experts_implementation = experts_implementation
    with _default_dtype(weight.dtype), torch.device(weight.device), warnings.catch_warnings():
        # n_shared_experts == 0 gives HF a zero-width shared MLP, whose init warns.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        hf_model = DeepseekV3ForCausalLM(config)
    for i in _moe_layers(args):  # HF's _keep_in_fp32_modules_strict
        router = hf_model.model.layers[i].mlp.gate
        router.e_score_correction_bias = router.e_score_correction_bias.float()
    hf_model.load_state_dict(_hf_state_dict(model), strict=True)  # copies (and casts)
    return hf_model.eval()


@torch.no_grad()
def from_hf(hf_model: DeepseekV3ForCausalLM) -> Transformer:
    """Our :class:`~dsv3lite.Transformer` with the weights of a ``DeepseekV3ForCausalLM``.

    Args:
        - hf_model: The HF model; its config must be one dsv3lite implements (see
          :func:`from_hf_config`).

    Returns:
        A new model in eval mode without MTP modules (``n_mtp_depth=0``), with copied
        weights in the dtype of HF's embedding, on the same device; the routing biases
        stay fp32. ``e_score_correction_bias`` becomes ``ffn.gate.balancer.bias``.

    Raises:
        - ValueError: For an unsupported configuration, naming the field, its value and
          what is allowed.
        - TypeError: If ``hf_model`` is not a causal LM (it needs ``lm_head``).
    """
    if not hasattr(hf_model, "lm_head") or not hasattr(hf_model, "config"):
        raise TypeError(f"expected a DeepseekV3ForCausalLM, got {type(hf_model).__name__}")
    args = from_hf_config(hf_model.config)
    if args.norm_eps != _HF_LATENT_NORM_EPS:
        warnings.warn(f"rms_norm_eps={args.norm_eps}: HF's q_a_layernorm/kv_a_layernorm use "
                      f"eps={_HF_LATENT_NORM_EPS}, our q_norm/kv_norm will use {args.norm_eps}",
                      stacklevel=2)
    weight = hf_model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor), "an embedding's weight is a Parameter"
    with _default_dtype(weight.dtype), torch.device(weight.device):
        model = Transformer(args)
    for moe in model.moe_layers():
        moe.gate.balancer.bias = moe.gate.balancer.bias.float()
    model.load_state_dict(_our_state_dict(hf_model, args), strict=True)
    return model.eval()

