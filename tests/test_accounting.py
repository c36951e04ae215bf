import pytest

from dsv3lite import ModelArgs, Transformer, count_params, kv_cache_elements_per_token


def test_deepseek_v3_has_671b_total_and_about_37b_activated():
    count = count_params(ModelArgs.deepseek_v3())
    assert count.total / 1e9 == pytest.approx(671.03, abs=0.01)  # [V3] §4.2: 671B total
    assert 36.5e9 < count.activated < 38e9  # "37B activated" ([V3] abstract)


def test_kv_cache_is_576_elements_per_token_per_layer_in_v3():
    args = ModelArgs.deepseek_v3()
    assert kv_cache_elements_per_token(args, per_layer=True) == 576  # [V2] Table 1: d_c + d_h^R
    assert kv_cache_elements_per_token(args) == 35_136
    assert 2 * args.n_heads * args.qk_nope_head_dim == 32_768  # the MHA it replaces


@pytest.mark.parametrize("args", [ModelArgs.tiny(), ModelArgs.tiny(q_lora_rank=0, n_mtp_depth=2),
                                  ModelArgs.small()], ids=["tiny", "no-q-lora-mtp2", "small"])
def test_count_matches_the_real_model_tensor_by_tensor(args):
    model = Transformer(args)
    count = count_params(args)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    main = sum(p.numel() for p in model.parameters()) - mtp
    assert count.total == main
    assert count.mtp[0] == mtp
    experts = sum(p.numel() for m in model.moe_layers()[: args.n_layers - args.n_dense_layers]
                  for p in m.experts.parameters())
    per_expert = 3 * args.dim * args.moe_inter_dim
    n_moe = args.n_layers - args.n_dense_layers
    assert count.total - count.activated == experts - n_moe * args.n_activated_experts * per_expert


def test_h100_preset_is_between_100m_and_500m():
    assert 100e6 <= count_params(ModelArgs.h100()).total <= 500e6


def test_h100_1b_preset_matches_its_docstring():
    args = ModelArgs.h100_1b()
    count = count_params(args)
    assert args.dim >= 2048
    assert round(count.total / 1e9, 2) == 0.99 and round(count.activated / 1e9, 2) == 0.37
    assert round(count.mtp[0] / 1e9, 2) == 0.12
    assert 16 * count.total_with_mtp / 1e9 < 18.5  # FP32 weights, grads, AdamW moments

