"""On a CUDA GPU: our training step reads nothing back to the host, and attention runs
on a fused SDPA kernel (issue 24's fair-benchmark checks). Skipped without CUDA."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv3lite import ModelArgs, Transformer
from dsv3lite.mla import causal_attention

pytestmark = pytest.mark.gpu
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _step(model, opt, x, y):
    """One step as dsv3lite.train runs it on CUDA: BF16 autocast, chunked loss, clipping,
    fused AdamW, the bias update without a read-back."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, y, return_logits=False)
    opt.zero_grad(set_to_none=True)
    out.loss.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.update_balance_biases(out.expert_counts, sync=False)


def test_training_step_never_syncs_with_the_host():
    """Under set_sync_debug_mode("error") any synchronising call (.item(), .tolist(),
    nonzero, a grouped GEMM's fall-back loop over experts) raises."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny()).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randint(0, 256, (2, 2, 32), device="cuda")
    _step(model, opt, x, y)  # first call: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _step(model, opt, x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("qk, v, heads", [(24, 16, 4), (192, 128, 16)])  # tiny, V3's heads
def test_attention_takes_a_fused_sdpa_kernel(qk, v, heads):
    """With only FlashAttention and memory-efficient attention allowed, MLA's causal
    attention (values narrower than queries) runs, forward and backward, and agrees with
    the math kernel."""
    torch.manual_seed(0)
    q, k, val = (torch.randn(2, 256, heads, d, device="cuda", dtype=torch.bfloat16,
                             requires_grad=True) for d in (qk, qk, v))
    with sdpa_kernel(FUSED):
        fused = causal_attention(q, k, val, scale=qk ** -0.5)
        fused.float().square().sum().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = causal_attention(q.double(), k.double(), val.double(), scale=qk ** -0.5)
    assert fused.shape == (2, 256, heads, v)
    assert torch.allclose(fused.double(), ref, atol=2e-2, rtol=2e-2)


def test_model_forward_runs_with_fused_attention_only():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.h100_1b(n_layers=2, vocab_size=1024)).cuda()
    x, y = torch.randint(0, 1024, (2, 2, 256), device="cuda")
    with sdpa_kernel(FUSED), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, y, return_logits=False)
    out.loss.total.backward()
    assert torch.isfinite(out.loss.total)
