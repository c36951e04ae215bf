"""GRPO: advantages, the loss against hand values and a plain re-derivation, rollouts,
rewards, the trainer's resume and frozen bias, and the CLI."""

import json
import math
import random

import pytest
import torch

from dsv3lite import ModelArgs, Transformer
from dsv3lite.checkpoint import load_model
from dsv3lite.generate import generate
from dsv3lite.grpo import (AdditionTask, GRPOConfig, clip_fraction, group_advantages,
                           grpo_loss, kl_k3, sample, sequence_logprobs, train_grpo)
from dsv3lite.grpo import trainer as trainer_module
from dsv3lite.grpo.__main__ import main

EPS = 1e-4


# ------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    a = group_advantages(r, 4, "group")
    # group 1: mean 0.25, Bessel std sqrt((0.75² + 3·0.25²)/3) = 0.5
    # group 2: mean 0.5, Bessel std sqrt(4·0.25/3) = 0.57735...
    s2 = math.sqrt(1 / 3)
    want = [0.75 / (0.5 + EPS)] + [-0.25 / (0.5 + EPS)] * 3 \
        + [0.5 / (s2 + EPS)] * 2 + [-0.5 / (s2 + EPS)] * 2
    assert a.tolist() == pytest.approx(want, rel=1e-6)
    # batch: the whole batch's std, mean 3/8: sqrt((3·(5/8)² + 5·(3/8)²)/7)
    sb = math.sqrt((3 * 0.625 ** 2 + 5 * 0.375 ** 2) / 7)
    b = group_advantages(r, 4, "batch")
    assert b.tolist() == pytest.approx([x / (sb + EPS) for x in
                                        [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]],
                                       rel=1e-6)
    assert group_advantages(r, 4, "none").tolist() == \
        pytest.approx([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])


def test_a_group_with_equal_rewards_has_zero_advantage():
    a = group_advantages(torch.tensor([1.0, 1, 1, 0.2, 0.7, 0.1]), 3)
    assert a[:3].tolist() == [0.0, 0.0, 0.0] and a[3:].abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(rewards=torch.zeros(6), group_size=4), "not a multiple of group_size=4"),
    (dict(rewards=torch.zeros(6), group_size=1), "group_size=1 is invalid"),
    (dict(rewards=torch.zeros(6), group_size=3, scale="std"), "scale='std' is invalid"),
    (dict(rewards=torch.zeros(2, 3), group_size=3), r"rewards has shape \(2, 3\)"),
])
def test_group_advantages_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(**kwargs)


# ------------------------------------------------------------------------- loss
def _fixed():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]])
    old = logp.clone()
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logp, old, adv, mask


def test_loss_types_by_hand_at_ratio_one():
    logp, old, adv, mask = _fixed()  # ρ = 1: each token's loss is −A
    # grpo: mean over sequences of the per-sequence token mean: (−2 + 1) / 2
    assert float(grpo_loss(logp, old, adv, mask, loss_type="grpo")) == pytest.approx(-0.5)
    # dr_grpo: (2·(−2) + 3·1) / (B·T = 2·3)
    assert float(grpo_loss(logp, old, adv, mask, loss_type="dr_grpo")) == \
        pytest.approx(-1 / 6)
    # ... with max_completion_length = 4: / (2·4)
    assert float(grpo_loss(logp, old, adv, mask, loss_type="dr_grpo",
                           max_completion_length=4)) == pytest.approx(-1 / 8)
    # dapo and bnpo: (2·(−2) + 3·1) / 5 tokens
    for lt in ("dapo", "bnpo"):
        assert float(grpo_loss(logp, old, adv, mask, loss_type=lt)) == pytest.approx(-0.2)


def test_clipping_by_hand():
    old = torch.zeros(1, 4)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    logp = ratio.log()
    mask = torch.ones(1, 4)
    # A = +1: min(ρ, clip(ρ, 0.8, 1.2)) → 1.2, 0.5, 1.1, 0.7
    got = grpo_loss(logp, old, torch.tensor([1.0]), mask, loss_type="dapo")
    assert float(got) == pytest.approx(-(1.2 + 0.5 + 1.1 + 0.7) / 4)
    # A = −1: min(−ρ, −clip(ρ)) → −1.5, −0.8, −1.1, −0.8
    got = grpo_loss(logp, old, torch.tensor([-1.0]), mask, loss_type="dapo")
    assert float(got) == pytest.approx((1.5 + 0.8 + 1.1 + 0.8) / 4)
    # asymmetric range (DAPO's clip-higher): ε_high = 0.6 keeps 1.5 unclipped
    got = grpo_loss(logp, old, torch.tensor([1.0]), mask, loss_type="dapo",
                    epsilon_high=0.6)
    assert float(got) == pytest.approx(-(1.5 + 0.5 + 1.1 + 0.7) / 4)


def test_kl_term_by_hand():
    logp, old, adv, mask = _fixed()
    ref = logp + torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, -1.0]])
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    per_seq = [(2 * -2 + 0.1 * (k3(0.5) + k3(-0.5))) / 2,
               (1 * 3 + 0.1 * (k3(1.0) + 0 + k3(-1.0))) / 3]
    got = grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, loss_type="grpo")
    assert float(got) == pytest.approx(sum(per_seq) / 2)


def test_k3_is_nonnegative_and_unbiased():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50), 0)
    q = torch.softmax(torch.randn(50), 0)
    k3 = kl_k3(p.log(), q.log())  # π = p, π_ref = q, per outcome
    assert (k3 >= 0).all()
    exact_kl = float((p * (p.log() - q.log())).sum())
    assert float((p * k3).sum()) == pytest.approx(exact_kl, rel=1e-5)  # E_p[k3] = KL(p‖q)
    # sampled from another policy (q, as π_θold after μ > 1 updates), it is not KL(p‖q)
    assert abs(float((q * k3).sum()) - exact_kl) > 0.1 * exact_kl


def test_k3_loss_gradient_is_that_of_the_reverse_kl():
    """E_{o~π_θ}[∇ k3(o)] = ∇ KL(π_ref‖π_θ), not ∇ KL(π_θ‖π_ref) (arXiv 2506.09477)."""
    torch.manual_seed(0)
    logits = torch.randn(20, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(20, dtype=torch.float64), 0)
    logp = torch.log_softmax(logits, 0)
    # the expectation over sampled tokens, with the sampling weights held fixed (a loss)
    expected = (logp.exp().detach() * kl_k3(logp, ref)).sum()
    grad_k3, = torch.autograd.grad(expected, logits)
    reverse = (ref.exp() * (ref - torch.log_softmax(logits, 0))).sum()   # KL(π_ref‖π_θ)
    forward = (torch.softmax(logits, 0) * (torch.log_softmax(logits, 0) - ref)).sum()
    grad_reverse, = torch.autograd.grad(reverse, logits)
    grad_forward, = torch.autograd.grad(forward, logits)
    assert torch.allclose(grad_k3, grad_reverse, atol=1e-12)
    assert (grad_k3 - grad_forward).abs().max() > 0.05


def _plain_loss(logp, old, adv, mask, ref, beta, eps, eps_high, loss_type, max_len):
    """Token by token, with Python loops, straight from [Math] Eq. 3 and TRL's normalizers."""
    B, T = logp.shape
    seq_terms, total, count = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            term = -torch.minimum(rho * adv[i], torch.clamp(rho, 1 - eps, 1 + eps_high) * adv[i])
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            s, n = s + term, n + 1
        seq_terms.append(s / max(n, 1))
        total, count = total + s, count + n
    if loss_type == "grpo":
        return sum(seq_terms) / B
    if loss_type == "dr_grpo":
        return total / (B * max_len)
    return total / count


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gradient_matches_a_plain_rederivation(loss_type, beta):
    torch.manual_seed(1)
    B, T = 4, 6
    old = -torch.rand(B, T) * 3
    ref = old + 0.3 * torch.randn(B, T)
    adv = torch.randn(B)
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    base = old + 0.3 * torch.randn(B, T)  # ratios on both sides of the clip range
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    got = grpo_loss(a, old, adv, mask, ref_logprobs=ref, beta=beta, epsilon=0.2,
                    epsilon_high=0.28, loss_type=loss_type, max_completion_length=8)
    want = _plain_loss(b, old, adv, mask, ref, beta, 0.2, 0.28, loss_type, 8)
    got.backward()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert a.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="ppo"), "loss_type='ppo' is invalid"),
    (dict(old_logprobs=torch.zeros(2, 4)), r"old_logprobs has shape \(2, 4\)"),
    (dict(mask=torch.ones(3, 3)), r"mask has shape \(3, 3\)"),
    (dict(advantages=torch.zeros(3)), r"advantages has shape \(3,\)"),
    (dict(beta=0.1), "ref_logprobs is None"),
    (dict(epsilon=-0.1), "epsilon=-0.1 is invalid"),
    (dict(epsilon_high=-0.1), r"epsilon_high=-0.1 is invalid: must be a number >= 0 "
                              r"\(the clip's upper end is 1 \+ epsilon_high\), or None"),
    (dict(epsilon_high=float("nan")), "epsilon_high=nan is invalid"),
    (dict(epsilon_high="0.3"), "epsilon_high='0.3' is invalid"),
])
def test_loss_errors_name_the_argument(kwargs, message):
    logp, old, adv, mask = _fixed()
    args = dict(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask) | kwargs
    with pytest.raises(ValueError, match=message):
        grpo_loss(**args)


def test_epsilon_high_is_validated_everywhere():
    logp, old, adv, mask = _fixed()
    with pytest.raises(ValueError, match="epsilon_high=-1 is invalid"):
        clip_fraction(logp, old, adv, mask, epsilon_high=-1)
    with pytest.raises(ValueError, match="epsilon_high=-0.5 is invalid"):
        GRPOConfig(epsilon_high=-0.5).validate()
    with pytest.raises(ValueError, match="epsilon=-0.5 is invalid"):
        GRPOConfig(epsilon=-0.5).validate()
    GRPOConfig(epsilon_high=0.28).validate()  # DAPO's clip-higher is allowed
    GRPOConfig(epsilon=10.0).validate()        # R1's ε = 10 too


# ---------------------------------------------------------------------- rollouts
def _model(seed=0, vocab=15, max_len=12):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.tiny(vocab_size=vocab, max_seq_len=max_len))
    with torch.no_grad():  # unit gain: outputs that depend on the input
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model.eval()


def test_batched_greedy_decoding_equals_one_at_a_time():
    model = _model()
    prompts = torch.randint(2, 15, (12, 5), generator=torch.Generator().manual_seed(3))
    free = sample(model, prompts, 6, temperature=0)
    stop = int(free.completions[0, 1])  # a token the greedy model does produce
    roll = sample(model, prompts, 6, temperature=0, stop_id=stop, pad_id=0)
    stopped_early = 0
    for row, prompt in enumerate(prompts):
        one = generate(model, prompt.tolist(), 6, temperature=0, eos_id=stop).tokens
        assert roll.completion_lists()[row] == one
        n = len(one)
        assert roll.mask[row].tolist() == [True] * n + [False] * (6 - n)
        assert (roll.completions[row, n:] == 0).all()
        stopped_early += n < 6
    assert stopped_early > 0  # the per-sequence stop was exercised


def test_rollout_logprobs_equal_a_full_forward():
    model = _model(1)
    prompts = torch.randint(2, 15, (8, 4), generator=torch.Generator().manual_seed(0))
    roll = sample(model, prompts, 5, temperature=1.0, stop_id=4,
                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = sequence_logprobs(model, roll.tokens, roll.prompt_len)
    assert torch.allclose(full[roll.mask], roll.logprobs[roll.mask], atol=1e-5)
    again = sample(model, prompts, 5, temperature=1.0, stop_id=4,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, roll.tokens)  # seeded sampling reproduces


def test_top_k_rollout_logprobs_are_those_of_the_truncated_distribution():
    model = _model(1)
    prompts = torch.randint(2, 15, (8, 4), generator=torch.Generator().manual_seed(0))
    k, temperature = 3, 0.8
    roll = sample(model, prompts, 5, temperature=temperature, top_k=k,
                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(roll.tokens[:, :-1]).logits[:, roll.prompt_len - 1:].float()
        tempered = torch.log_softmax(logits / temperature, dim=-1)
        kth = tempered.topk(k, dim=-1).values[..., -1:]
        truncated = tempered.masked_fill(tempered < kth, float("-inf")).log_softmax(-1)
        want = truncated.gather(-1, roll.completions.unsqueeze(-1)).squeeze(-1)
        untruncated = sequence_logprobs(model, roll.tokens, roll.prompt_len, temperature)
    m = roll.mask
    assert torch.isfinite(want[m]).all()  # every sampled token is among the top k
    assert torch.allclose(roll.logprobs[m], want[m], atol=1e-5)
    # renormalising over k < V tokens raises every sampled token's log-prob
    assert (roll.logprobs[m] > untruncated[m] + 1e-4).all()
    with pytest.raises(ValueError, match="top_k=0 is invalid"):
        sample(model, prompts, 5, top_k=0)


def test_sample_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="max_new_tokens=20 is invalid"):
        sample(model, torch.zeros(2, 4, dtype=torch.long), 20)
    with pytest.raises(ValueError, match=r"prompts has shape \(4,\)"):
        sample(model, torch.zeros(4, dtype=torch.long), 2)


# ----------------------------------------------------------------------- rewards
def test_rewards_right_wrong_and_malformed():
    task = AdditionTask(digits=2)
    tok = task.tokenizer
    E = tok.EOS
    cases = [  # completion, accuracy, format for 27 + 25 = 52 (written "25")
        (tok.encode("25") + [E], 1, 1),
        (tok.encode("52") + [E], 0, 1),        # the digits in the wrong order
        (tok.encode("26") + [E], 0, 1),
        (tok.encode("25"), 0, 0),              # never stopped
        ([E], 0, 0),                           # empty
        (tok.encode("2+5") + [E], 0, 0),       # not a number
        (tok.encode("2500") + [E], 0, 0),      # longer than any sum
        (tok.encode("2") + [tok.PAD] + tok.encode("5") + [E], 0, 0),
    ]
    for completion, acc, fmt in cases:
        assert task.accuracy_reward(completion, 27, 25) == acc, completion
        assert task.format_reward(completion) == fmt, completion
    total, acc, fmt = task.rewards([c for c, _, _ in cases], [(27, 25)] * len(cases))
    assert total.tolist() == pytest.approx([a + 0.1 * f for _, a, f in cases])


def test_held_out_problems_never_appear_in_training():
    task = AdditionTask(digits=2)
    test = set(task._pairs("test"))
    train = set(task.problems("train", 5000, random.Random(0)))
    assert len(test) == 2000 and not test & train
    assert task.prompt_ids(task.test_set(8)).shape == (8, task.prompt_len)


# ----------------------------------------------------------------------- trainer
def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), steps=4, prompts_per_step=4, group_size=4,
                warmup_steps=20, warmup_eval_interval=10, eval_size=32, eval_interval=2,
                ckpt_interval=2, lr=1e-3)
    return GRPOConfig(**(base | kw))


def _distinct_rewards(self, completions, problems):
    """Every completion its own reward (0, 1, 2, ...): no group has zero advantage."""
    n = len(completions)
    return torch.arange(n, dtype=torch.float32), torch.zeros(n), torch.zeros(n)


@pytest.mark.parametrize("changes", [
    {},
    # the KL term and the control, from an untrained model (no warm-up) that every
    # reward moves: their own state (π_ref, the permutations) must resume exactly too
    {"beta": 0.04, "shuffle_rewards": True, "warmup_steps": 0, "distinct_rewards": True}])
def test_resume_continues_exactly(tmp_path, monkeypatch, changes):
    changes = dict(changes)
    if changes.pop("distinct_rewards", False):
        monkeypatch.setattr(AdditionTask, "rewards", _distinct_rewards)
    whole = train_grpo(_cfg(tmp_path / "a", **changes), progress=False)
    first = train_grpo(_cfg(tmp_path / "b", stop_after=2, **changes), progress=False)
    assert first.records[-1]["step"] == 2
    rest = train_grpo(_cfg(tmp_path / "b", **changes), resume=True, progress=False)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, rest.model.state_dict()[key]), key
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    lines = [json.loads(x) for x in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    assert [strip(r) for r in lines] == [strip(r) for r in whole.records]


def test_bias_is_frozen_during_rl_and_the_policy_moves(tmp_path):
    result = train_grpo(_cfg(tmp_path, steps=3), progress=False)
    warm, _ = load_model(tmp_path / "run" / "warmup")
    for (name, now), (_, before) in zip(result.model.state_dict().items(),
                                        warm.state_dict().items()):
        if name.endswith("balancer.bias"):
            assert torch.equal(now, before), name
    changed = [n for (n, p), (_, q) in zip(result.model.named_parameters(),
                                           warm.named_parameters()) if not torch.equal(p, q)]
    assert changed
    grpo = [r for r in result.records if r["phase"] == "grpo"]
    assert len(grpo) == 3 and all(0 <= r["zero_variance_groups"] <= 1 for r in grpo)


def _count_frozen_forwards(monkeypatch):
    """Count sequence_logprobs calls on a model without trainable parameters (π_ref)."""
    calls = []
    real = trainer_module.sequence_logprobs

    def counting(model, *args, **kwargs):
        calls.append(not any(p.requires_grad for p in model.parameters()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "sequence_logprobs", counting)
    return calls


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_reference_runs_only_when_beta_is_positive(tmp_path, monkeypatch, beta):
    calls = _count_frozen_forwards(monkeypatch)
    result = train_grpo(_cfg(tmp_path, steps=2, beta=beta, warmup_steps=0), progress=False)
    grpo = [r for r in result.records if r["phase"] == "grpo"]
    # per step: one π_θold forward and μ = 1 policy forward, plus π_ref when β > 0
    assert len(calls) == 2 * (3 if beta > 0 else 2)
    assert sum(calls) == (2 if beta > 0 else 0)
    if beta > 0:
        assert all(r["kl"] >= 0 for r in grpo)
    else:
        assert all("kl" not in r for r in grpo)


def test_logged_loss_is_the_mean_over_the_mu_updates(tmp_path, monkeypatch):
    losses = []
    real = trainer_module.grpo_loss

    def recording(*args, **kwargs):
        loss = real(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(trainer_module, "grpo_loss", recording)
    monkeypatch.setattr(AdditionTask, "rewards", _distinct_rewards)
    result = train_grpo(_cfg(tmp_path, steps=2, mu=3, warmup_steps=0), progress=False)
    grpo = [r for r in result.records if r["phase"] == "grpo"]
    assert len(losses) == 6
    for step, record in enumerate(grpo):
        mine = losses[3 * step: 3 * step + 3]
        assert record["loss"] == pytest.approx(sum(mine) / 3, abs=1e-12)
        assert mine[-1] != pytest.approx(sum(mine) / 3)  # the last one alone differs


@pytest.mark.parametrize("shuffle", [False, True])
def test_shuffle_rewards_permutes_them_across_the_batch(tmp_path, monkeypatch, shuffle):
    seen = []
    real = trainer_module.group_advantages

    def recording(rewards, *args, **kwargs):
        seen.append(rewards.clone())
        return real(rewards, *args, **kwargs)

    monkeypatch.setattr(AdditionTask, "rewards", _distinct_rewards)
    monkeypatch.setattr(trainer_module, "group_advantages", recording)
    result = train_grpo(_cfg(tmp_path, steps=2, shuffle_rewards=shuffle, warmup_steps=0),
                        progress=False)
    n = 4 * 4  # prompts_per_step × group_size
    assert len(seen) == 2
    for rewards in seen:
        assert sorted(rewards.tolist()) == list(range(n))  # a permutation of the batch
        moved_groups = (rewards.view(-1, 4) // 4 != torch.arange(4)[:, None]).any()
        assert bool(moved_groups) == shuffle  # ... that mixes the groups
    assert not torch.equal(seen[0], seen[1]) or not shuffle  # a new one every step
    grpo = [r for r in result.records if r["phase"] == "grpo"]
    assert all(r["reward"] == pytest.approx((n - 1) / 2) for r in grpo)  # true rewards


def test_one_update_raises_the_logprob_of_rewarded_completions():
    model = _model(2).train()
    prompts = torch.randint(2, 15, (2, 4), generator=torch.Generator().manual_seed(1))
    prompts = prompts.repeat_interleave(4, dim=0)
    roll = sample(model, prompts, 4, generator=torch.Generator().manual_seed(2))
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 0])
    adv = group_advantages(rewards, 4)
    with torch.no_grad():
        old = sequence_logprobs(model, roll.tokens, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    grpo_loss(sequence_logprobs(model, roll.tokens, 4), old, adv, roll.mask).backward()
    opt.step()
    with torch.no_grad():
        new = sequence_logprobs(model, roll.tokens, 4)
    # each sequence's mean log-prob change, weighted by its advantage: a small step of
    # gradient descent on the loss must make the rewarded completions more likely
    # (with the sign of the surrogate flipped, this goes negative)
    delta = ((new - old) * roll.mask).sum(dim=1) / roll.mask.sum(dim=1)
    assert float((adv * delta).sum()) > 0
    assert float(delta[adv > 0].mean()) > float(delta[adv < 0].mean())


# --------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [
    (["--loss-type", "ppo"], "loss_type='ppo' is invalid"),
    (["--group-size", "1"], "group_size=1 is invalid"),
    (["--scale-rewards", "std"], "scale_rewards='std' is invalid"),
    (["--beta", "-1"], "beta=-1.0 is invalid"),
    (["--epsilon-high", "-0.5"], "epsilon_high=-0.5 is invalid"),
    (["--temperature", "0"], "temperature=0.0 is invalid"),
    (["--task", "countdown"], "task='countdown' is invalid"),
    (["--steps", "ten"], "invalid int value"),
    (["--resume"], "no checkpoint in"),
])
def test_cli_errors_are_one_clear_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv + ["--out", str(tmp_path / "o"), "--no-progress"]))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_cli_passes_epsilon_high_temperature_and_the_control(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--out", str(out), "--steps", "1", "--warmup-steps", "0",
                 "--prompts-per-step", "2", "--group-size", "2", "--epsilon-high", "0.28",
                 "--temperature", "0.7", "--shuffle-rewards", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "step-000001" / "state.json").read_text())["config"]
    assert (saved["epsilon_high"], saved["temperature"], saved["shuffle_rewards"]) == \
        (0.28, 0.7, True)
    assert saved["epsilon"] == GRPOConfig().epsilon
