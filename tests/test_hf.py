"""The Hugging Face bridge: same logits both ways, exact weight round trips, clear refusals."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from dsv3lite import ModelArgs, Transformer  # noqa: E402
from dsv3lite.hf import FIELD_MAP, from_hf, from_hf_config, to_hf, to_hf_config  # noqa: E402
from dsv3lite.rope import yarn_correction_range  # noqa: E402

TOL = 1e-5

# q_lora_rank=32; 8 routed experts in 2 groups, 1 group kept per token
WITH_QUERY_COMPRESSION_AND_GROUPS = ModelArgs.tiny(n_mtp_depth=0)
WITHOUT_QUERY_COMPRESSION_OR_GROUPS = ModelArgs.tiny(
    n_mtp_depth=0, q_lora_rank=0, n_expert_groups=1, n_limited_groups=1, n_layers=3,
    n_shared_experts=2, n_activated_experts=3)
# Context 16 -> 64 (s = 4); rope_theta and beta_fast chosen so that the YaRN ramp is partial.
YARN = ModelArgs.tiny(n_mtp_depth=0, original_seq_len=16, max_seq_len=64, rope_factor=4.0,
                      rope_theta=1000.0, qk_rope_head_dim=16, beta_fast=4, beta_slow=1, mscale=0.7)
WITHOUT_SHARED_EXPERTS_OR_DENSE_LAYERS = ModelArgs.tiny(n_mtp_depth=0, n_shared_experts=0,
                                                        n_dense_layers=0)
CONFIGS = {
    "query_compression_and_groups": WITH_QUERY_COMPRESSION_AND_GROUPS,
    "no_query_compression_no_groups": WITHOUT_QUERY_COMPRESSION_OR_GROUPS,
    "yarn": YARN,
    "no_shared_experts_no_dense_layers": WITHOUT_SHARED_EXPERTS_OR_DENSE_LAYERS,
}


@torch.no_grad()
def _random_model(args: ModelArgs) -> Transformer:
    """fp32, eval mode, O(1) logits; norm gains away from 1; non-zero routing biases."""
    model = Transformer(args)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # RMSNorm gains
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name == "embed.weight":
            p.normal_()
        else:  # fan-in scaling keeps activations O(1)
            p.normal_(std=p.shape[-1] ** -0.5)
    for moe in model.moe_layers():
        moe.gate.balancer.bias.normal_(std=0.1)
    return model.eval()


def _tokens(args: ModelArgs, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, args.max_seq_len))


def _max_logit_diff(args: ModelArgs) -> float:
    model = _random_model(args)
    hf_model = to_hf(model)
    tokens = _tokens(args)
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = hf_model(tokens).logits
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 1.0, "logits should be O(1) so that the tolerance means something"
    return (ours - theirs).abs().max().item()


def _assert_logits_match(args: ModelArgs) -> None:
    diff = _max_logit_diff(args)
    print(f"max |ours - HF| logit difference: {diff:.3g}")
    assert diff <= TOL, f"max |ours - HF| logit difference {diff:.3g} exceeds {TOL}"


# ----------------------------------------------------------------------- logits agree
def test_to_hf_logits_match_with_query_compression_and_groups():
    _assert_logits_match(WITH_QUERY_COMPRESSION_AND_GROUPS)


def test_to_hf_logits_match_without_query_compression_or_groups():
    _assert_logits_match(WITHOUT_QUERY_COMPRESSION_OR_GROUPS)


def test_to_hf_logits_match_under_yarn_beyond_the_original_context():
    assert YARN.yarn_enabled and YARN.max_seq_len > YARN.original_seq_len
    low, high = yarn_correction_range(YARN)
    assert high - low >= 2, "the ramp should blend at least one pair partially"
    _assert_logits_match(YARN)  # the tokens span all 64 positions, 4x the original context


def test_to_hf_logits_match_without_shared_experts_or_dense_layers():
    _assert_logits_match(WITHOUT_SHARED_EXPERTS_OR_DENSE_LAYERS)


def test_to_hf_drops_mtp_modules_and_still_matches():
    args = ModelArgs.tiny(n_mtp_depth=1)
    model = _random_model(args)
    hf_model = to_hf(model)
    assert hf_model.config.num_mtp_layers == 0
    assert not any("mtp" in key for key in hf_model.state_dict())
    tokens = _tokens(args)
    with torch.no_grad():
        diff = (model(tokens).logits - hf_model(tokens).logits).abs().max().item()
    assert diff <= TOL, f"max |ours - HF| logit difference {diff:.3g} exceeds {TOL}"
    assert from_hf(hf_model).args == args.replace(n_mtp_depth=0)


def test_routing_bias_becomes_e_score_correction_bias_and_changes_the_logits():
    args = WITH_QUERY_COMPRESSION_AND_GROUPS
    model = _random_model(args)
    hf_model = to_hf(model)
    tokens = _tokens(args)
    with torch.no_grad():
        before = hf_model(tokens).logits
        for i, layer in enumerate(model.layers):
            if args.is_moe_layer(i):
                router = hf_model.model.layers[i].mlp.gate
                assert router.e_score_correction_bias.dtype == torch.float32
                assert torch.equal(router.e_score_correction_bias, layer.ffn.gate.balancer.bias)
                router.e_score_correction_bias.zero_()
        after = hf_model(tokens).logits
    assert (before - after).abs().max() > 1e-3, "the bias should change which experts are chosen"


def test_to_hf_copies_weights_rather_than_sharing_them():
    model = _random_model(WITH_QUERY_COMPRESSION_AND_GROUPS)
    hf_model = to_hf(model)
    with torch.no_grad():
        model.embed.weight.zero_()
    assert hf_model.model.embed_tokens.weight.abs().sum() > 0
    assert not hf_model.training


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("args", CONFIGS.values(), ids=CONFIGS.keys())
def test_from_hf_of_to_hf_round_trips_every_tensor_and_the_args(args):
    model = _random_model(args)
    back = from_hf(to_hf(model))
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    unequal = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not unequal, f"tensors changed in the round trip: {unequal}"
    for field in [*FIELD_MAP, "rope_theta"]:
        assert getattr(back.args, field) == getattr(args, field), field
    if args.yarn_enabled:
        for field in ["original_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale"]:
            assert getattr(back.args, field) == getattr(args, field), field
    assert back.args == args  # the remaining fields are defaults in these configs
    assert not back.training


def test_to_hf_config_uses_hf_names_and_yarn_only_beyond_the_original_context():
    plain = to_hf_config(WITHOUT_QUERY_COMPRESSION_OR_GROUPS)
    assert plain.q_lora_rank is None and plain.n_group == 1 and plain.first_k_dense_replace == 1
    assert plain.num_key_value_heads == plain.num_attention_heads
    assert plain.rope_parameters["rope_type"] == "default"
    yarn = to_hf_config(YARN).rope_parameters
    assert yarn["rope_type"] == "yarn"
    assert (yarn["factor"], yarn["original_max_position_embeddings"]) == (4.0, 16)
    assert yarn["mscale"] == yarn["mscale_all_dim"] == 0.7
    assert from_hf_config(to_hf_config(YARN)) == YARN


# -------------------------------------------------------------------------- refusals
def _set_rope(**changes):
    def change(config):
        config.rope_parameters = {**config.rope_parameters, **changes}
    return change


UNSUPPORTED = {
    "norm_topk_prob": lambda c: setattr(c, "norm_topk_prob", False),
    "attention_bias": lambda c: setattr(c, "attention_bias", True),
    "rope_interleave": lambda c: setattr(c, "rope_interleave", False),
    "scoring_func": lambda c: setattr(c, "scoring_func", "softmax"),
    "hidden_act": lambda c: setattr(c, "hidden_act", "gelu"),
    "rope_type": _set_rope(rope_type="linear", factor=2.0),
    "mscale_all_dim": _set_rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                mscale=1.0, mscale_all_dim=0.5),
}


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_from_hf_config_rejects_unsupported_configs_naming_the_field(field):
    config = to_hf_config(WITH_QUERY_COMPRESSION_AND_GROUPS)
    UNSUPPORTED[field](config)
    with pytest.raises(ValueError, match=field):
        from_hf_config(config)


def test_from_hf_rejects_a_model_with_unnormalised_gates():
    config = to_hf_config(WITH_QUERY_COMPRESSION_AND_GROUPS)
    config.norm_topk_prob = False
    from transformers import DeepseekV3ForCausalLM

    with pytest.raises(ValueError, match=r"norm_topk_prob=False.*allowed: True"):
        from_hf(DeepseekV3ForCausalLM(config))


def test_from_hf_config_rejects_yarn_that_does_not_extend_the_context():
    config = to_hf_config(YARN)
    config.max_position_embeddings = 16
    with pytest.raises(ValueError, match="max_position_embeddings"):
        from_hf_config(config)


def test_to_hf_config_rejects_groups_hf_cannot_score():
    args = ModelArgs.tiny(n_expert_groups=8, n_limited_groups=2)  # one expert per group
    with pytest.raises(ValueError, match="n_expert_groups=8"):
        to_hf_config(args)


def test_yarn_softmax_scale_matches_hf_attention_scaling():
    from dsv3lite.rope import softmax_scale

    hf_model = to_hf(_random_model(YARN))
    scaling = hf_model.model.layers[0].self_attn.scaling
    assert math.isclose(scaling, softmax_scale(YARN), rel_tol=1e-12)
    assert hf_model.model.rotary_emb.attention_scaling == 1.0
