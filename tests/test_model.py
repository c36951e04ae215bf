import math

import pytest
import torch

from dsv3lite import ModelArgs, Transformer


def _batch(args, B=2, T=17):
    tokens = torch.randint(0, args.vocab_size, (B, T))
    return tokens[:, :-1], tokens[:, 1:]


def test_mtp_shares_embedding_and_head_by_identity():
    model = Transformer(ModelArgs.tiny(n_mtp_depth=2))
    params = {id(p) for p in model.parameters()}
    mtp_params = {id(p) for p in model.mtp.parameters()}
    assert id(model.embed.weight) not in mtp_params and id(model.head.weight) not in mtp_params
    assert len(params) == len(list(model.parameters()))  # no duplicated copies anywhere
    # the MTP loss reaches the one shared embedding and head
    x, y = _batch(model.args)
    out = model(x, y, mtp_lambda=1.0)
    grads = torch.autograd.grad(out.loss.mtp, [model.embed.weight, model.head.weight])
    assert all(g.abs().sum() > 0 for g in grads)


def test_loss_breakdown_adds_up():
    args = ModelArgs.tiny()
    model = Transformer(args).train()
    x, y = _batch(args)
    loss = model(x, y, mtp_lambda=0.3).loss
    torch.testing.assert_close(loss.total, loss.main + 0.3 * loss.mtp + loss.balance)
    assert abs(loss.main.item() - math.log(args.vocab_size)) < 0.05  # near-uniform at init
    assert loss.mtp.item() > 0 and loss.balance.item() > 0
    model.eval()
    assert model(x, y).loss.balance.item() == 0.0  # balance loss is a training-time term


def test_mtp_keeps_the_causal_chain():
    """Depth-1 predictions at position i see tokens up to i+1, never beyond."""
    args = ModelArgs.tiny(init_std=0.1)
    model = Transformer(args).eval()
    x, _ = _batch(args, B=1, T=13)
    with torch.no_grad():
        base = model.mtp_logits(x, model(x).hidden)[0]
        x2 = x.clone()
        x2[0, 8] = (x2[0, 8] + 1) % args.vocab_size
        changed = model.mtp_logits(x2, model(x2).hidden)[0]
    torch.testing.assert_close(changed[:, :7], base[:, :7], atol=1e-5, rtol=0)  # i + 1 < 8
    assert (changed[:, 7] - base[:, 7]).abs().max() > 1e-4  # i = 7 embeds t_8


def test_mtp_loss_matches_its_definition():
    args = ModelArgs.tiny(init_std=0.1)
    model = Transformer(args).eval()
    x, y = _batch(args)
    with torch.no_grad():
        out = model(x, y)
        draft = model.mtp_logits(x, out.hidden)[0]  # predicts y[:, 1:]
        expected = torch.nn.functional.cross_entropy(draft.flatten(0, 1), y[:, 1:].flatten())
    torch.testing.assert_close(out.loss.mtp, expected)


def test_dropping_mtp_changes_no_logits():
    model = Transformer(ModelArgs.tiny()).eval()
    x, y = _batch(model.args)
    before = model(x).logits
    model.drop_mtp()
    assert len(model.mtp) == 0 and model(x, y).loss.mtp.item() == 0.0
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)


def test_a_few_steps_fit_one_batch_and_update_the_balancer():
    args = ModelArgs.tiny(init_std=0.02)
    model = Transformer(args).train()
    x, y = _batch(args, B=4, T=33)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(x, y)
        loss, counts = out.loss, out.expert_counts  # counts: the step's load per layer
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        violations = model.update_balance_biases(counts)
        first = first if first is not None else loss.main.item()
    assert loss.main.item() < first - 1.0
    assert len(violations) == len(model.moe_layers()) == 2  # main MoE layer + MTP block
    assert all(m.gate.balancer.bias.abs().sum() > 0 for m in model.moe_layers())
    assert counts.shape == (2, args.n_routed_experts)
    # no token dropped: every token of the main layer, and the MTP block's T-1 positions
    assert counts.sum(-1).tolist() == [4 * 32 * args.n_activated_experts,
                                       4 * 31 * args.n_activated_experts]


def test_expert_counts_are_values_of_the_forward_and_rows_of_layers_not_run_are_zero():
    args = ModelArgs.tiny()
    model = Transformer(args).train()
    x, y = _batch(args, B=2, T=9)
    full = model(x, y).expert_counts  # main MoE layer and the MTP block's
    assert full.shape == (2, args.n_routed_experts) and full.dtype == torch.long
    assert full.sum(-1).tolist() == [2 * 8 * args.n_activated_experts,
                                     2 * 7 * args.n_activated_experts]
    no_targets = model(x).expert_counts  # the MTP block does not run
    assert torch.equal(no_targets[0], full[0]) and no_targets[1].sum() == 0
    assert torch.equal(model.eval()(x, y).expert_counts, full)  # eval counts too
    # the model keeps nothing of a forward: a second call gives the same values
    assert torch.equal(model.train()(x, y).expert_counts, full)
    with pytest.raises(ValueError, match=r"counts has shape \(1, 8\): must be a \(2, 8\)"):
        model.update_balance_biases(full[:1])
    with pytest.raises(ValueError, match="counts has type float"):
        model.update_balance_biases(1e-3)


def test_wrong_input_shapes_raise_clear_errors():
    model = Transformer(ModelArgs.tiny())
    with pytest.raises(ValueError, match="expected \\(batch, seq_len\\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets has shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_a_training_step_reads_nothing_back_to_the_host(host_syncs):
    """Forward, backward and the bias update (sync=False) issue no .item(), .tolist(),
    .cpu() or truth test of a tensor: nothing waits for the device."""
    model = Transformer(ModelArgs.tiny()).train()
    x, y = _batch(model.args, B=2, T=16)
    with host_syncs() as mode:
        out = model(x, y)
        out.loss.total.backward()
        chunked = model(x, y, return_logits=False)  # chunked loss (CUDA's)
        chunked.loss.total.backward()
        counts = out.expert_counts + chunked.expert_counts  # the step's two passes
        vios = model.update_balance_biases(counts, sync=False)
    assert mode.calls == [] and all(isinstance(v, torch.Tensor) for v in vios)
    with host_syncs() as mode:
        model.update_balance_biases(counts)  # the default returns floats: it must sync
    assert "item" in mode.calls  # the detector does see a sync
