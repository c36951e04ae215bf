import pytest
import torch

from dsv3lite import MLA, LatentKVCache, ModelArgs, Transformer
from dsv3lite.rope import precompute_rope

# init_std=0.1 makes attention patterns far from uniform, so agreement means something
ARGS = [ModelArgs.tiny(init_std=0.1), ModelArgs.tiny(init_std=0.1, q_lora_rank=0)]
IDS = ["q-compressed", "no-q-compression"]


def _mla(args):
    mla = MLA(args)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    return mla


@pytest.mark.parametrize("args", ARGS, ids=IDS)
def test_absorbed_decode_matches_naive(args):
    mla = _mla(args)
    cos, sin = precompute_rope(args)
    x = torch.randn(2, 12, args.dim)
    outs = {}
    for impl in ("naive", "absorbed"):
        cache = LatentKVCache(args, batch_size=2)
        prefill = mla(x[:, :8], cos[:8], sin[:8], cache, 0, 0, impl)
        steps = [mla(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache, 0, t, impl)
                 for t in range(8, 12)]
        outs[impl] = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(outs["absorbed"], outs["naive"], atol=1e-5, rtol=1e-5)
    assert outs["naive"].abs().mean() > 1e-2  # a real signal, not zeros


@pytest.mark.parametrize("args", ARGS, ids=IDS)
@pytest.mark.parametrize("impl", ["naive", "absorbed"])
def test_cached_attention_matches_training_path(args, impl):
    mla = _mla(args)
    cos, sin = precompute_rope(args)
    x = torch.randn(2, 10, args.dim)
    full = mla(x, cos[:10], sin[:10])
    cache = LatentKVCache(args, batch_size=2, max_len=16)
    steps = [mla(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache, 0, t, impl) for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "absorbed"])
def test_incremental_decoding_reproduces_full_sequence_logits(impl):
    args = ModelArgs.tiny(init_std=0.1)
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache(batch_size=2)
        chunks = [model(tokens[:, :5], cache=cache, attn_impl=impl).logits]  # prefill 5
        for t in range(5, 20):  # then one token at a time
            chunks.append(model(tokens[:, t:t + 1], cache=cache, start_pos=t,
                                attn_impl=impl).logits)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=2e-5, rtol=1e-5)


def test_cache_holds_only_latent_and_rope_key_per_token_per_layer():
    args = ModelArgs.tiny()
    cache = Transformer(args).new_cache(batch_size=3, max_len=10)
    assert cache.elements_per_token_per_layer() == args.kv_lora_rank + args.qk_rope_head_dim
    assert cache.nbytes() == 3 * 10 * args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * 4
    v3 = ModelArgs.deepseek_v3()
    assert LatentKVCache(v3, 1, max_len=2, n_layers=1).elements_per_token_per_layer() == 576


def test_bad_decode_arguments_raise_clear_errors():
    args = ModelArgs.tiny()
    model = Transformer(args).eval()
    cache = model.new_cache(batch_size=1, max_len=8)
    tok = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="attn_impl='flash'"):
        model(tok, cache=cache, attn_impl="flash")
    with pytest.raises(ValueError, match="cannot hold"):
        model(tok, cache=cache, start_pos=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, args.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len=1000"):
        LatentKVCache(args, 1, max_len=1000)


def test_causal_attention_with_padded_values_is_the_same_function():
    """The CUDA path pads the value heads; padding by hand on the CPU shows it is exact."""
    import torch.nn.functional as F

    from dsv3lite.mla import causal_attention

    torch.manual_seed(0)
    q, k = torch.randn(2, 7, 3, 24), torch.randn(2, 7, 3, 24)
    v = torch.randn(2, 7, 3, 16)
    plain = causal_attention(q, k, v, 0.2)
    padded = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, 8)).transpose(1, 2),
        is_causal=True, scale=0.2).transpose(1, 2)
    assert plain.shape == (2, 7, 3, 16)
    torch.testing.assert_close(padded[..., :16], plain, rtol=1e-6, atol=1e-6)
    assert padded[..., 16:].abs().max() == 0


@pytest.mark.gpu
def test_training_attention_runs_on_the_flash_kernel():
    """With FlashAttention as the only allowed backend, MLA's training attention runs
    (it raises if the shapes pushed it to the math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dsv3lite.mla import causal_attention

    args = ModelArgs.h100()
    q = torch.randn(2, 256, args.n_heads, args.qk_head_dim, device="cuda",
                    dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(2, 256, args.n_heads, args.v_head_dim, device="cuda",
                    dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = causal_attention(q, k, v, args.qk_head_dim ** -0.5)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = causal_attention(q.float(), k.float(), v.float(), args.qk_head_dim ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
