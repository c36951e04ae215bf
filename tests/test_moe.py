import contextlib

import pytest
import torch

from dsv3lite import ModelArgs, MoE, Transformer, max_violation, sequence_balance_loss
from dsv3lite import moe as moe_module
from dsv3lite.moe import BiasBalancer, Gate, expert_path


def _gate(args, std=0.1):
    gate = Gate(args)
    torch.nn.init.normal_(gate.weight, std=std)
    return gate


def test_gates_sum_to_route_scale_and_no_token_is_dropped():
    args = ModelArgs.small()
    gates, indices, _ = _gate(args)(torch.randn(500, args.dim))
    torch.testing.assert_close(gates.sum(-1), torch.full((500,), args.route_scale))
    assert indices.shape == (500, args.n_activated_experts)
    assert all(len(set(row.tolist())) == args.n_activated_experts for row in indices)


def test_bias_changes_selection_not_gates():
    args = ModelArgs.small()
    gate, x = _gate(args), torch.randn(400, ModelArgs.small().dim)
    gates0, idx0, scores = gate(x)
    gate.balancer.bias += 0.25  # the same shift for every expert selects the same experts
    gates1, idx1, _ = gate(x)
    order0, order1 = idx0.argsort(-1), idx1.argsort(-1)
    assert torch.equal(idx0.gather(1, order0), idx1.gather(1, order1))
    torch.testing.assert_close(gates0.gather(1, order0), gates1.gather(1, order1))
    gate.balancer.bias[3] += 10.0  # expert 3 now wins every token
    gates2, idx2, scores2 = gate(x)
    assert torch.equal(scores2, scores)  # affinities never see the bias
    assert (idx2 == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    chosen = scores.gather(1, idx2)
    expected = chosen / chosen.sum(-1, keepdim=True) * args.route_scale  # unbiased s only
    torch.testing.assert_close(gates2, expected, rtol=0, atol=0)


def test_routing_stays_within_the_kept_groups():
    args = ModelArgs.small()  # 16 experts, 4 groups of 4, keep 2 groups, 4 experts
    _, indices, _ = _gate(args)(torch.randn(300, args.dim))
    groups = indices // (args.n_routed_experts // args.n_expert_groups)
    assert max(len(set(g.tolist())) for g in groups) <= args.n_limited_groups


def test_group_score_is_the_sum_of_its_top_two_not_its_max():
    # group 0 holds the single best expert; group 1 has the best top-2 sum
    # ([V3-code] Gate.forward ranks groups by topk(2).sum)
    args = ModelArgs.tiny(n_routed_experts=8, n_expert_groups=2, n_limited_groups=1,
                          n_activated_experts=2, dim=8)
    gate = Gate(args)
    logits = torch.tensor([3.0, -3.0, -3.0, -3.0, 1.5, 1.5, -3.0, -3.0])
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits
    _, indices, _ = gate(torch.eye(8)[:1])
    assert sorted(indices[0].tolist()) == [4, 5]


def test_dispatch_matches_a_token_by_token_reference():
    args = ModelArgs.small()
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 24, args.dim)
    out, stats = moe(x)
    flat = x.reshape(-1, args.dim)
    gates, indices, _ = moe.gate(flat)
    ref = torch.stack([
        moe.shared_experts(tok) + sum(g * moe.experts.expert(int(e), tok)
                                      for g, e in zip(gs, es))
        for tok, gs, es in zip(flat, gates, indices)])
    torch.testing.assert_close(out.reshape(-1, args.dim), ref, atol=1e-5, rtol=1e-5)
    # the counts it returns are the router's choices, K per token
    assert stats.counts.dtype == torch.long and stats.counts.sum() == flat.shape[0] * moe.top_k
    assert torch.equal(stats.counts, torch.bincount(indices.flatten(), minlength=moe.n_routed_experts))


def test_balancing_bias_is_a_buffer_that_gets_no_gradient():
    model = Transformer(ModelArgs.tiny()).train()
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("balancer.bias") for n in names)
    assert any(n.endswith("balancer.bias") for n in model.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens[:, :-1], tokens[:, 1:]).loss.total.backward()
    assert all(m.gate.balancer.bias.grad is None for m in model.moe_layers())


def _skewed_moe():
    args = ModelArgs.tiny(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1,
                          n_activated_experts=2)
    moe = MoE(args).train()
    direction = torch.randn(args.dim)
    direction /= direction.norm()
    with torch.no_grad():
        torch.nn.init.normal_(moe.gate.weight, std=0.01)
        moe.gate.weight[:2] += 0.5 * direction  # experts 0 and 1 attract most tokens
    x = torch.randn(4, 64, args.dim) * 0.3 + direction
    return moe, x


@pytest.mark.parametrize("gamma", [1e-3, 0.0])
def test_bias_updates_reduce_max_violation_only_when_gamma_is_positive(gamma):
    moe, x = _skewed_moe()
    history = []
    with torch.no_grad():
        for _ in range(300):
            _, stats = moe(x)
            history.append(moe.gate.balancer.update(stats.counts, gamma))
    assert history[0] > 1.5  # strongly skewed to start with
    if gamma > 0:
        assert max(history[-20:]) < 0.5 * history[0]
    else:
        assert history[-1] == history[0]


def test_max_violation_definition():
    assert max_violation(torch.tensor([4.0, 4.0, 4.0, 4.0])) == 0.0
    assert max_violation(torch.tensor([8.0, 4.0, 2.0, 2.0])) == pytest.approx(1.0)


def test_sequence_balance_loss_equals_alpha_at_perfect_balance():
    n_experts, k, alpha = 8, 2, 1e-4
    indices = torch.arange(16).view(8, 2) % n_experts  # every expert chosen twice
    scores = torch.full((1, 8, n_experts), 0.3, requires_grad=True)
    loss = sequence_balance_loss(scores, indices[None], k, alpha)
    assert loss.item() == pytest.approx(alpha, rel=1e-6)
    skewed = torch.tensor([[0, 1]] * 8)[None]  # everything to experts 0 and 1
    peaked = torch.full((1, 8, n_experts), 0.1).index_fill(-1, torch.tensor([0, 1]), 0.9)
    assert float(sequence_balance_loss(peaked, skewed, k, alpha)) > 2 * alpha


def test_sequence_balance_loss_gradient_has_its_closed_form():
    """L = α/B Σ_b Σ_i f_bi P_bi, P_bi = 1/T Σ_t s_bti / S_bt, S_bt = Σ_j s_btj, f fixed:
    ∂L/∂s_btk = α/(B·T) · (f_bk / S_bt − Σ_i f_bi s_bti / S_bt²)."""
    torch.manual_seed(0)
    B, T, n_experts, k, alpha = 2, 5, 6, 2, 1e-2
    scores = torch.rand(B, T, n_experts, dtype=torch.float64).requires_grad_()
    indices = torch.rand(B, T, n_experts).topk(k, dim=-1).indices
    sequence_balance_loss(scores, indices, k, alpha).backward()
    chosen = torch.zeros(B, T, n_experts, dtype=torch.float64).scatter_(-1, indices, 1.0)
    f = chosen.sum(1) * n_experts / (k * T)                    # (B, N)
    s = scores.detach()
    S = s.sum(-1, keepdim=True)                                # (B, T, 1)
    fs = (f[:, None, :] * s).sum(-1, keepdim=True)             # (B, T, 1)
    want = alpha / (B * T) * (f[:, None, :] / S - fs / S ** 2)
    torch.testing.assert_close(scores.grad, want, rtol=1e-12, atol=1e-15)


def test_bias_update_is_exactly_plus_or_minus_gamma_and_leaves_ties_alone():
    balancer = BiasBalancer(4)
    vio = balancer.update(torch.tensor([5, 3, 4, 4]), 1e-3)  # mean 4: over, under, at, at
    step = torch.tensor([-1e-3, 1e-3, 0.0, 0.0])  # fp32, like the bias
    assert torch.equal(balancer.bias, step)
    assert vio == pytest.approx(0.25)  # (5 − 4) / 4
    balancer.update(torch.tensor([2, 2, 2, 2]), 1e-3)  # perfect balance: nothing moves
    assert torch.equal(balancer.bias, step)
    vio = balancer.update(torch.tensor([6.0, 2.0, 2.0, 2.0]), 0.0)  # γ = 0 only measures
    assert torch.equal(balancer.bias, step) and vio == pytest.approx(1.0)
    # the balancer keeps no state besides the bias
    assert [n for n, _ in balancer.named_buffers()] == ["bias"]


@pytest.mark.parametrize("counts", [torch.tensor([1, 2, 3]), [5, 3, 4, 4],
                                    torch.ones(2, 4)])
def test_bias_update_refuses_counts_of_the_wrong_shape(counts):
    with pytest.raises(ValueError, match=r"counts has .*must be a \(4,\) tensor"):
        BiasBalancer(4).update(counts, 1e-3)


def test_moe_layer_keeps_no_record_of_a_forward():
    moe = MoE(ModelArgs.tiny()).train()
    before = {n: t.clone() for n, t in moe.state_dict().items()}
    attributes = set(vars(moe)) | {k for m in moe.modules() for k in vars(m)}
    _, stats = moe(torch.randn(2, 8, moe.gate.weight.shape[1]))
    assert stats.balance_loss is not None and stats.balance_loss.requires_grad
    after = set(vars(moe)) | {k for m in moe.modules() for k in vars(m)}
    assert after == attributes  # nothing new set during forward
    # equal_nan: the gate's weight is torch.empty here, whose memory may hold NaNs
    assert all(torch.allclose(before[n].float(), t.float(), rtol=0, atol=0, equal_nan=True)
               for n, t in moe.state_dict().items())
    assert moe.eval()(torch.randn(2, 8, moe.gate.weight.shape[1]))[1].balance_loss is None


def test_router_logits_and_sigmoid_stay_fp32_under_bf16_autocast():
    args = ModelArgs.small()
    gate = _gate(args, std=1 / args.dim ** 0.5)  # unit-gain logits: bf16 would round them
    x = torch.randn(300, args.dim)
    _, idx32, scores32 = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, idx, scores = gate(x)
        bf16_scores = torch.sigmoid(torch.nn.functional.linear(x, gate.weight))  # autocast
    assert bf16_scores.dtype == torch.bfloat16  # what a plain Linear would have done
    assert scores.dtype == torch.float32
    assert torch.equal(scores, scores32) and torch.equal(idx, idx32)  # the fp32 routing
    assert not torch.equal(bf16_scores.float(), scores32)


def test_balancing_bias_and_counts_stay_fp32_after_model_to_bf16():
    model = Transformer(ModelArgs.tiny())
    balancer = model.moe_layers()[0].gate.balancer
    bias = torch.tensor([1.001, -0.3, 0.5, 2e-4, 0.0, 0.25, -1.0009, 3.0])  # not bf16 values
    balancer.bias.copy_(bias)
    model.to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16  # the rest did convert
    assert balancer.bias.dtype == torch.float32
    assert torch.equal(balancer.bias, bias)  # values kept exactly, not rounded through bf16
    tokens = torch.randint(0, 256, (2, 9))
    counts = model(tokens[:, :-1], tokens[:, 1:]).expert_counts
    model.update_balance_biases(counts, 1e-3)  # a bf16 bias at 1.001 could not move by 1e-3
    moved = (balancer.bias - bias).abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(1e-3), atol=1e-6)
    assert (moved > 0).sum() >= 4
    assert model.state_dict()["layers.1.ffn.gate.balancer.bias"].dtype == torch.float32


# ------------------------------------------------------------ grouped experts
def _unit_gain_moe(impl: str, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(ModelArgs.tiny(moe_impl=impl, n_routed_experts=8, n_activated_experts=2))
    with torch.no_grad():
        for p in moe.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return moe.train()


def test_grouped_experts_match_the_loop_forward_and_backward():
    grouped, loop = _unit_gain_moe("grouped"), _unit_gain_moe("loop")
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(3, 5, 64)
    xg, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    (yg, sg), (yl, sl) = grouped(xg), loop(xl)
    assert torch.equal(sg.counts, sl.counts)
    assert torch.allclose(yg, yl, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(yg)
    (yg * g).sum().backward()
    (yl * g).sum().backward()
    assert torch.allclose(xg.grad, xl.grad, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(grouped.named_parameters(), loop.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5), name
    assert grouped.experts.w1.grad.abs().sum() > 0


def test_grouped_experts_with_an_expert_that_gets_no_token():
    grouped, loop = _unit_gain_moe("grouped"), _unit_gain_moe("loop")
    loop.load_state_dict(grouped.state_dict())
    grouped.gate.balancer.bias[0] = loop.gate.balancer.bias[0] = -100.0  # never chosen
    x = torch.randn(2, 4, 64)
    (yg, stats), (yl, _) = grouped(x), loop(x)
    assert torch.allclose(yg, yl, atol=1e-5, rtol=1e-5)
    assert stats.counts[0] == 0 and stats.counts.sum() == 2 * 4 * 2


def test_grouped_forward_reads_nothing_back_to_the_host(host_syncs):
    x = torch.randn(2, 4, 64)
    for impl, expect_sync in (("grouped", False), ("loop", True)):
        with host_syncs() as mode:
            _unit_gain_moe(impl)(x)
        assert bool(mode.calls) == expect_sync, (impl, mode.calls)


def test_segment_experts_match_grouped_mm_forward_and_backward():
    """The sync-free fallback (batched matmuls over 128-row segments) computes what
    float32 _grouped_mm computes, gradients included, with an expert left empty."""
    moe = _unit_gain_moe("grouped")
    experts = moe.experts
    counts = torch.tensor([0, 130, 1, 0, 7, 200, 0, 2])  # segments past 128 rows, empties
    x = torch.randn(int(counts.sum()), 64)
    outs = []
    for run in ("grouped_mm", "segments"):
        xr = x.clone().requires_grad_()
        experts.zero_grad()
        if run == "segments":
            y = experts._segments(xr, counts, experts.w1, experts.w2, experts.w3)
        else:
            y = experts(xr, counts)  # the CPU in eager mode: _grouped_mm
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y, xr.grad, [w.grad.clone() for w in (experts.w1, experts.w2, experts.w3)]))
    (y0, dx0, dw0), (y1, dx1, dw1) = outs
    assert torch.allclose(y1, y0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(dw1, dw0):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert dw0[0][0].abs().sum() == 0 and dw0[0][1].abs().sum() > 0  # expert 0 got nothing


@pytest.mark.parametrize("device, dtype, fast, compiling, expected", [
    ("cpu", torch.float32, None, False, "grouped_mm"),  # eager CPU numerics unchanged
    ("cpu", torch.bfloat16, None, True, "grouped_mm"),
    ("cpu", torch.float32, None, True, "segments"),  # compiled _grouped_mm wants bf16
    ("cuda", torch.bfloat16, True, False, "grouped_mm"),  # sm_90 / sm_100: one kernel
    ("cuda", torch.bfloat16, True, True, "grouped_mm"),
    ("cuda", torch.float32, True, False, "segments"),  # fp32 would copy offs to the host
    ("cuda", torch.float16, True, False, "segments"),
    ("cuda", torch.bfloat16, False, False, "segments"),  # e.g. an A100: the fallback too
    ("mps", torch.float32, None, False, "segments")])
def test_expert_path_never_picks_a_synchronising_grouped_mm_on_a_gpu(
        monkeypatch, device, dtype, fast, compiling, expected):
    if fast is not None:  # what torch.cuda.get_device_capability would have said
        monkeypatch.setitem(moe_module._grouped_mm_fast, 0, fast)
    got = expert_path("grouped", False, torch.device(device, 0) if device != "cpu"
                      else torch.device("cpu"), dtype, fp8_kernels=False, compiling=compiling)
    assert got == expected


@pytest.mark.parametrize("fp8_kernels, compiling, impl, expected", [
    (True, False, "grouped", "fp8_grouped"), (False, True, "grouped", "fp8_grouped"),
    (False, False, "grouped", "loop"), (True, False, "loop", "loop")])
def test_expert_path_of_fp8_experts(fp8_kernels, compiling, impl, expected):
    assert expert_path(impl, True, torch.device("cpu"), torch.float32,
                       fp8_kernels=fp8_kernels, compiling=compiling) == expected


def test_expert_path_rejects_an_unknown_impl():
    with pytest.raises(ValueError, match="impl='fast' is invalid"):
        expert_path("fast", False, torch.device("cpu"), torch.float32, fp8_kernels=False,
                    compiling=False)


def _cuda_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs.tiny(**overrides)).cuda()


@contextlib.contextmanager
def _no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_on_cuda_never_synchronizes(precision):
    """Forward, backward, optimizer step and bias update of the trainer's step, in fp32
    (experts on the segments path) and under bf16 autocast (one-kernel _grouped_mm)."""
    model = _cuda_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, model.args.vocab_size, (4, 65), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, y, return_logits=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.total.backward()
        optimizer.step()
        return model.update_balance_biases(out.expert_counts, 1e-3, sync=False)

    step()  # first step: lazy initialisations may synchronise once
    with _no_host_sync():
        step()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decoding_and_rollout_forward_passes_on_cuda_never_synchronize(precision):
    """The forward passes of generation and of GRPO rollouts (a latent-cache prefill, then
    one token per sequence) and the rollouts' log-prob pass with its backward, with the
    model in fp32 and no autocast (as dsv3lite.generate runs it), or under bf16 autocast.
    Picking tokens reads them on the host by design; here argmax stays on the device."""
    model = _cuda_model().eval()
    prompts = torch.randint(0, model.args.vocab_size, (4, 8), device="cuda")
    cache = model.new_cache(4, max_len=16)
    with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
        with torch.no_grad():
            model(prompts, cache=model.new_cache(4, max_len=16))  # warm-up
            with _no_host_sync():
                nxt = model(prompts, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
                for pos in range(8, 12):
                    nxt = model(nxt, cache=cache, start_pos=pos).logits[:, -1] \
                        .argmax(-1, keepdim=True)
        model.train()
        tokens = torch.cat([prompts, prompts], dim=1)
        model(tokens[:, :-1]).logits.float().logsumexp(-1).mean().backward()  # warm-up
        with _no_host_sync():
            model(tokens[:, :-1]).logits.float().logsumexp(-1).mean().backward()


def test_checkpoints_with_one_linear_per_expert_still_load():
    args = ModelArgs.tiny()
    model = Transformer(args)
    old = {}
    for key, value in model.state_dict().items():
        if key.endswith(("experts.w1", "experts.w2", "experts.w3")):
            prefix, name = key.rsplit(".", 1)
            for e in range(args.n_routed_experts):
                old[f"{prefix}.{e}.{name}.weight"] = value[e].clone()
        else:
            old[key] = value
    fresh = Transformer(args)
    fresh.load_state_dict(old)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_moe_impl_is_validated():
    with pytest.raises(ValueError, match="moe_impl='fast' is invalid"):
        ModelArgs.tiny(moe_impl="fast")
