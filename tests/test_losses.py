"""The chunked head + cross-entropy against the plain computation."""

import pytest
import torch

from dsv3lite import ModelArgs, Transformer
from dsv3lite.losses import IGNORE_INDEX, linear_cross_entropy, reference_cross_entropy


def _inputs(n=37, d=24, vocab=53, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g, dtype=dtype) / d ** 0.5).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_loss_and_gradients_equal_the_full_logits_path(chunk):
    h, w, t = _inputs()
    t[[3, 10, 11]] = IGNORE_INDEX
    ours = linear_cross_entropy(h, w, t, chunk_size=chunk)
    dh, dw = torch.autograd.grad(ours, (h, w))
    ref = reference_cross_entropy(h, w, t)
    rdh, rdw = torch.autograd.grad(ref, (h, w))
    # float64 inputs: the chunked sums differ from the reference only in their order
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(dh, rdh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-7)
    assert dh[3].abs().max() == 0  # an ignored target contributes no gradient


def test_gradient_scales_with_the_upstream_gradient_and_batch_shape():
    h, w, t = _inputs(n=12)
    ours = linear_cross_entropy(h.view(3, 4, -1), w, t.view(3, 4), chunk_size=5)
    (2.5 * ours).backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (2.5 * reference_cross_entropy(ref_h, ref_w, t)).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_keeps_the_loss_close_and_master_grads_fp32():
    h, w, t = _inputs(n=64, d=32, vocab=100, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, chunk_size=16)
    ours.backward()
    assert ours.dtype == torch.float32 and w.grad.dtype == torch.float32
    exact = reference_cross_entropy(h.detach(), w.detach(), t)
    assert abs(ours.item() - exact.item()) < 0.02 * exact.item()


def test_all_targets_ignored_gives_nan_like_torch():
    h, w, t = _inputs(n=4)
    t[:] = IGNORE_INDEX
    assert torch.isnan(linear_cross_entropy(h, w, t)).item()
    assert torch.isnan(reference_cross_entropy(h, w, t)).item()


def test_model_without_logits_gives_the_same_losses_and_gradients():
    torch.manual_seed(0)
    # float64 for a tight comparison; _grouped_mm has no float64 kernel: loop experts
    model = Transformer(ModelArgs.tiny(n_mtp_depth=1, moe_impl="loop")).double()
    x = torch.randint(0, model.args.vocab_size, (2, 16))
    y = torch.randint(0, model.args.vocab_size, (2, 16))
    grads = {}
    for full in (True, False):
        model.zero_grad()
        out = model(x, y, return_logits=full)
        out.loss.total.backward()
        assert (out.logits is None) is (not full)
        grads[full] = (out.loss, {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None})
    (loss_a, g_a), (loss_b, g_b) = grads[True], grads[False]
    for part in ("main", "mtp", "balance", "total"):
        torch.testing.assert_close(getattr(loss_b, part), getattr(loss_a, part).to(
            getattr(loss_b, part).dtype), rtol=1e-6, atol=1e-9)
    assert g_a.keys() == g_b.keys()
    for name in g_a:  # the log-softmax is fp32 on both paths: agreement to fp32 rounding
        scale = g_a[name].abs().max().item()
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-6 * scale)


def test_bad_arguments_raise_clear_errors():
    h, w, t = _inputs(n=6)
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="targets has shape"):
        linear_cross_entropy(h, w, t[:5])
    with pytest.raises(ValueError, match="weight has shape"):
        linear_cross_entropy(h, w[:, :3], t)
    model = Transformer(ModelArgs.tiny())
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(torch.zeros(1, 4, dtype=torch.long), return_logits=False)
