"""Our stage modules under PyTorch's ``Schedule1F1B`` and ``ScheduleDualPipeV``.

Each case spawns two gloo processes: 6-10 s on 2 CPU cores, mostly each child importing
torch and torch.distributed.pipelining.
"""

import pytest
import torch

from dsv3lite.pipeline.check import (GRAD_COS_DIFF_MAX, check_args, make_microbatches,
                                     make_model, max_grad_cal_diff, reference_step)
from dsv3lite.pipeline import torch_pipelining
from dsv3lite.pipeline.torch_pipelining import TORCH_PIPELINING_FLOOR, torch_pipelining_step
from dsv3lite.versions import parse_version

needs_pipelining_floor = pytest.mark.skipif(
    parse_version(torch.__version__) < TORCH_PIPELINING_FLOOR,
    reason=f"torch {torch.__version__} is older than TORCH_PIPELINING_FLOOR")


def _reference(name: str, n_ranks: int, n_microbatches: int):
    n_stages = 2 * n_ranks if name == "dualpipev" else n_ranks
    args = check_args(n_stages, 0)
    return reference_step(make_model(args, 0), make_microbatches(args, n_microbatches))


def _losses_bitwise_equal(losses, ref) -> bool:
    return len(losses) == len(ref.losses) and all(
        torch.equal(got, want["total"]) for got, want in zip(losses, ref.losses))


@needs_pipelining_floor
@pytest.mark.parametrize("name, n_ranks, n_microbatches",
                         [("1f1b", 2, 4), ("dualpipev", 2, 4)])
def test_torch_schedule_step_equals_one_process(name, n_ranks, n_microbatches):
    result = torch_pipelining_step(name, n_ranks, n_microbatches, timeout_s=60)
    ref = _reference(name, n_ranks, n_microbatches)
    # Bitwise: the losses come out of the forward alone, and each rank runs the same
    # kernels on the same shapes with one thread, as reference_step does.
    assert _losses_bitwise_equal(result.losses, ref)
    # The gradients show the backward too: torch's own B/W split through our stages,
    # summed over ranks, within deepseek-ai/DualPipe's bound.
    diff, worst = max_grad_cal_diff(result.grads, ref.grads)
    assert diff < GRAD_COS_DIFF_MAX, f"{worst}: cal_diff {diff:.3g}"
    assert all(float(g.abs().sum()) > 0 for g in ref.grads.values() if g.dim() > 1)


@needs_pipelining_floor
def test_gradient_comparison_fails_on_wrong_gradients_that_leave_losses_equal():
    """torch's default scale_grads=True divides every gradient by the number of
    micro-batches: the losses stay bitwise equal, so only the gradients can catch it."""
    result = torch_pipelining_step("1f1b", 2, 4, timeout_s=60, scale_grads=True)
    ref = _reference("1f1b", 2, 4)
    assert _losses_bitwise_equal(result.losses, ref)
    diff, _ = max_grad_cal_diff(result.grads, ref.grads)
    assert diff > 0.1  # 1 - 2(1/4)/(1 + 1/16) = 0.53 for a gradient scaled by 1/4


@pytest.mark.parametrize("name, n_ranks, n_microbatches, arg", [
    ("zb1p", 2, 4, "name"),               # our schedule, not one of torch's two checked here
    ("dualpipe", 2, 4, "name"),
    ("dualpipev", 2, 3, "n_microbatches"),  # torch's ScheduleDualPipeV needs >= 2 * n_ranks
    ("1f1b", 3, 2, "n_microbatches"),       # Schedule1F1B needs >= n_stages
    ("1f1b", 0, 4, "n_ranks"),
])
def test_bad_arguments_raise_before_spawning(name, n_ranks, n_microbatches, arg):
    with pytest.raises(ValueError, match=f"^{arg}="):
        torch_pipelining_step(name, n_ranks, n_microbatches)


def test_an_older_torch_is_refused_with_the_version_it_needs(monkeypatch):
    monkeypatch.setattr(torch_pipelining.torch, "__version__", "2.10.0+cu128")
    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.12 \(torch 2\.10\.0\+cu128 is"):
        torch_pipelining_step("1f1b", 2, 4)
