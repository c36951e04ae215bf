import os
import subprocess
import sys

import pytest
import torch

from dsv3lite import ModelArgs, Transformer
from dsv3lite.generate import generate, main
from dsv3lite.moe import MLP, GroupedExperts

ATTN = ["absorbed", "naive"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Decode steps are tiny: extra intra-op threads only add synchronisation cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_model() -> Transformer:
    """init_std=0.1 keeps predictions far from uniform; its MTP drafts are mostly wrong."""
    torch.manual_seed(0)
    return Transformer(ModelArgs.tiny(init_std=0.1)).eval()


def _bigram_model(noise: float = 0.0) -> Transformer:
    """A model whose MTP draft agrees with the main model (noise=0) or often does.

    With every attention output (``wo``) and FFN down-projection (``w2``) zeroed, the
    main model's hidden state is its input embedding, so it predicts head(norm(Emb(t))).
    With eh_proj = [0 | I] the MTP module computes head(norm(enorm(Emb(t_{i+1})))) =
    the same logits: the draft is what the main model will say one step later.
    ``noise`` perturbs every matrix, so drafts are right only some of the time.
    """
    args = ModelArgs.tiny(init_std=0.1)
    torch.manual_seed(1)
    model = Transformer(args).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "wo"):
                module.wo.weight.zero_()
            if isinstance(module, MLP):
                module.w2.weight.zero_()
            if isinstance(module, GroupedExperts):
                module.w2.zero_()
        eh = model.mtp[0].eh_proj.weight
        eh.zero_()
        eh[:, args.dim:] = torch.eye(args.dim)
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(noise * torch.randn_like(p))
    return model


def _prompt(n: int = 8, seed: int = 3) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("impl", ATTN)
@pytest.mark.parametrize("make", [_random_model, lambda: _bigram_model(0.01)],
                         ids=["random", "half-agreeing"])
def test_greedy_speculative_decoding_equals_plain_greedy(make, impl):
    model = make()
    plain = generate(model, _prompt(), 48, 0.0, attn_impl=impl)
    spec = generate(model, _prompt(), 48, 0.0, speculative=True, attn_impl=impl)
    assert spec.tokens == plain.tokens
    assert len(plain.tokens) == 48 and len(set(plain.tokens)) > 10  # not a constant stream
    assert spec.drafted > 0


@pytest.mark.parametrize("impl", ATTN)
def test_cached_greedy_equals_full_recompute_reference(impl):
    model = _random_model()
    seq = _prompt()
    with torch.no_grad():
        for _ in range(40):  # no cache: rerun the whole sequence for every token
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert generate(model, _prompt(), 40, 0.0, attn_impl=impl).tokens == seq[8:]


@pytest.mark.parametrize("make", [_random_model, lambda: _bigram_model(0.01)],
                         ids=["random", "half-agreeing"])
def test_cached_mtp_drafts_equal_uncached_mtp_predictions(make):
    """The MTP cache stays consistent through rejected drafts (a stale cache would not)."""
    model = make()
    r = generate(model, _prompt(), 40, 0.0, speculative=True)
    seq = torch.tensor([_prompt() + r.tokens])
    with torch.no_grad():
        mtp = model.mtp_logits(seq, model(seq).hidden)[0]  # position i predicts t_{i+2}
    assert r.drafted == len(r.draft_log) > 15
    assert r.drafted - r.accepted > 5  # rejections happened
    for pos, token in r.draft_log:
        assert token == int(mtp[0, pos - 2].argmax()), f"draft for position {pos}"


# ---------------------------------------------------------------- bookkeeping
def test_every_draft_is_accepted_when_mtp_agrees_with_the_main_model():
    model = _bigram_model(0.0)
    r = generate(model, _prompt(), 40, 0.0, speculative=True)
    assert r.tokens == generate(model, _prompt(), 40, 0.0).tokens
    # prefill gives 1 token, 19 verify passes give 2 each, one plain pass the 40th
    assert (r.n_forward_passes, r.drafted, r.accepted) == (21, 19, 19)
    assert r.acceptance_rate == 1.0


@pytest.mark.parametrize("temperature", [0.0, 0.3])
def test_token_count_is_forward_passes_plus_accepted_drafts(temperature):
    model = _bigram_model(0.01)
    plain = generate(model, _prompt(), 40, temperature, generator=_seeded(0))
    r = generate(model, _prompt(), 40, temperature, speculative=True, generator=_seeded(0))
    assert plain.n_forward_passes == 40 and plain.drafted == 0
    assert plain.acceptance_rate is None
    assert len(r.tokens) == 40 == r.n_forward_passes + r.accepted
    assert 0 < r.accepted < r.drafted
    assert r.n_forward_passes < 40
    assert r.acceptance_rate == pytest.approx(r.accepted / r.drafted)
    assert r.tokens_per_second == pytest.approx(40 / r.seconds)


def test_eos_stops_generation_and_is_included():
    model = _random_model()
    full = generate(model, _prompt(), 30, 0.0).tokens
    eos = full[6]
    first = full.index(eos)
    for speculative in (False, True):
        r = generate(model, _prompt(), 30, 0.0, speculative=speculative, eos_id=eos)
        assert r.tokens == full[:first + 1]


# ------------------------------------------------------------------ sampling
def test_top_k_one_sampling_equals_greedy():
    model = _random_model()
    greedy = generate(model, _prompt(), 30, 0.0).tokens
    assert generate(model, _prompt(), 30, 1.0, top_k=1, generator=_seeded(5)).tokens == greedy
    assert generate(model, _prompt(), 30, 1.0, top_k=1, speculative=True,
                    generator=_seeded(5)).tokens == greedy


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed():
    model = _random_model()
    a = generate(model, _prompt(), 30, 1.0, top_k=50, generator=_seeded(7)).tokens
    b = generate(model, _prompt(), 30, 1.0, top_k=50, generator=_seeded(7)).tokens
    c = generate(model, _prompt(), 30, 1.0, top_k=50, generator=_seeded(8)).tokens
    assert a == b and a != c


def test_speculative_sampling_draws_the_same_tokens_as_plain_sampling():
    """Accept iff the main model's sample equals the draft: one draw per token, exact."""
    model = _bigram_model(0.01)
    plain = generate(model, _prompt(), 40, 0.3, generator=_seeded(11))
    spec = generate(model, _prompt(), 40, 0.3, speculative=True, generator=_seeded(11))
    assert spec.tokens == plain.tokens
    assert spec.accepted > 3 and spec.drafted - spec.accepted > 3


# -------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    model = _random_model()
    n = model.args.max_seq_len
    cases = [(dict(temperature=-0.5), "temperature=-0.5"),
             (dict(top_k=0), "top_k=0"),
             (dict(max_new_tokens=-1), "max_new_tokens=-1"),
             (dict(attn_impl="flash"), "attn_impl='flash'"),
             (dict(prompt_ids=[0] * (n + 1)), f"max_seq_len={n}"),
             (dict(max_new_tokens=n - 7), f"at most {n - 8} new tokens"),
             (dict(prompt_ids=[]), "prompt_ids is empty"),
             (dict(prompt_ids=[3, 999]), "contains 999"),
             (dict(prompt_ids=torch.zeros(2, 4, dtype=torch.long)), "batch size 1")]
    for change, message in cases:
        kwargs = {"prompt_ids": _prompt(), "max_new_tokens": 4, **change}
        with pytest.raises(ValueError, match=message):
            generate(model, **kwargs)
    with pytest.raises(ValueError, match="no MTP module"):
        generate(model.drop_mtp(), _prompt(), 4, speculative=True)


# ----------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(text_corpus, tmp_path_factory):
    from dsv3lite.checkpoint import save_checkpoint
    from dsv3lite.data import prepare

    root = tmp_path_factory.mktemp("generate")
    prepared = prepare(str(text_corpus), vocab_size=300, data_dir=root / "data", verbose=False)
    vocab = prepared.tokenizer().get_vocab_size()
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(vocab_size=vocab, init_std=0.1))
    save_checkpoint(root / "run", model, 1, tokenizer_path=prepared.tokenizer_path)
    return root / "run"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsv3lite.generate", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_compares_plain_and_speculative_decoding(checkpoint):
    done = _cli("--ckpt", str(checkpoint), "--prompt", "def parse", "--max-new-tokens", "20",
                "--compare")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert done.stdout.startswith("def parse")
    assert any(line.startswith("plain") and "20 tokens" in line for line in lines)
    assert any(line.startswith("speculative") and "acceptance" in line for line in lines)
    assert lines[-1].split() == ["identical", "yes"]


def test_cli_sampling_with_a_seed_is_reproducible(checkpoint, capsys):
    argv = ["--ckpt", str(checkpoint), "--prompt", "class", "--max-new-tokens", "12",
            "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--speculative"]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert "12 tokens" in captured.err
        outputs.append(captured.out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("class")


def test_cli_missing_checkpoint_prints_one_error_line(tmp_path):
    done = _cli("--ckpt", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert done.returncode != 0
    assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert "nowhere" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--top-k", "0"], "top_k=0"),
    (["--max-new-tokens", "500"], "max_new_tokens=500"),
    (["--max-new-tokens", "many"], "invalid int value"),
])
def test_cli_bad_arguments_print_one_error_line(checkpoint, capsys, argv, message):
    assert main(["--ckpt", str(checkpoint), "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert message in err
