import pytest

from dsv3lite import ModelArgs


def test_presets_build_and_match_their_purpose():
    v3 = ModelArgs.deepseek_v3()
    assert (v3.dim, v3.n_layers, v3.n_dense_layers, v3.n_heads) == (7168, 61, 3, 128)
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_head_dim, v3.v_head_dim) == (1536, 512, 192, 128)
    assert (v3.n_routed_experts, v3.n_activated_experts, v3.n_expert_groups,
            v3.n_limited_groups, v3.route_scale) == (256, 8, 8, 4, 2.5)
    for preset in (ModelArgs.tiny, ModelArgs.small, ModelArgs.h100):
        assert preset().max_seq_len <= preset().original_seq_len  # no YaRN while training short


@pytest.mark.parametrize("changes, field", [
    (dict(n_limited_groups=3), "n_limited_groups"),          # more kept groups than groups
    (dict(n_activated_experts=5), "n_activated_experts"),    # 1 kept group of 4 experts holds 4
    (dict(n_routed_experts=9), "n_expert_groups"),           # 9 experts into 2 groups
    (dict(n_dense_layers=3), "n_dense_layers"),              # more dense layers than layers
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),          # RoPE needs pairs
    (dict(dim=0), "dim"),
    (dict(route_scale=-1.0), "route_scale"),
    (dict(max_seq_len=8192, original_seq_len=4096, rope_factor=1.0), "rope_factor"),
])
def test_impossible_combinations_raise_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelArgs\.{field}="):
        ModelArgs.tiny(**changes)


def test_replace_revalidates():
    with pytest.raises(ValueError, match="n_limited_groups"):
        ModelArgs.tiny().replace(n_limited_groups=5)
    assert ModelArgs.tiny().replace(dim=32).dim == 32


def test_all_dense_model_needs_no_experts():
    args = ModelArgs.tiny(n_dense_layers=2, n_mtp_depth=0, n_routed_experts=0)
    assert not any(args.is_moe_layer(i) for i in range(args.n_layers))


@pytest.mark.parametrize("field, value", [("dim", 36), ("moe_inter_dim", 20)])
def test_grouped_moe_needs_rows_that_grouped_mm_can_take(field, value):
    """torch._grouped_mm raises 'strides should be multiple of 16 bytes' deep inside a
    bf16 forward for such sizes; ModelArgs says so up front, and the loop takes them."""
    with pytest.raises(ValueError, match=rf"ModelArgs.{field}={value} is invalid: must be a "
                                         r"multiple of 8 with moe_impl='grouped'"):
        ModelArgs.tiny(**{field: value})
    ModelArgs.tiny(**{field: value}, moe_impl="loop")  # the loop has no such need


def test_every_preset_the_book_uses_passes_the_tiling_checks():
    for args in (ModelArgs.tiny(), ModelArgs.tiny(fp8=True), ModelArgs.small(),
                 ModelArgs.h100(), ModelArgs.h100_1b(), ModelArgs.deepseek_v3()):
        assert args.dim % 8 == 0 and args.moe_inter_dim % 8 == 0
