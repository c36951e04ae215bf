"""Our stage modules under PyTorch's ``Schedule1F1B`` and ``ScheduleDualPipeV``.

Each case spawns two gloo processes: 6-10 s on 2 CPU cores, mostly each child importing
torch and torch.distributed.pipelining.
"""

import pytest
import torch

from dsv3lite.pipeline.check import (check_args, make_microbatches, make_model,
                                     reference_step)
from dsv3lite.pipeline.torch_pipelining import torch_pipelining_losses


@pytest.mark.parametrize("name, n_ranks, n_microbatches",
                         [("1f1b", 2, 4), ("dualpipev", 2, 4)])
def test_torch_schedule_losses_equal_one_process_bitwise(name, n_ranks, n_microbatches):
    losses = torch_pipelining_losses(name, n_ranks, n_microbatches, timeout_s=60)
    n_stages = 2 * n_ranks if name == "dualpipev" else n_ranks
    args = check_args(n_stages, 0)
    ref = reference_step(make_model(args, 0), make_microbatches(args, n_microbatches))
    assert len(losses) == n_microbatches
    # Bitwise: the losses come out of the forward alone, and each rank runs the same
    # kernels on the same shapes with one thread, as reference_step does; no weight
    # changes within the step (torch's scale_grads only touches gradients).
    for i, (got, want) in enumerate(zip(losses, ref.losses)):
        assert torch.equal(got, want["total"]), \
            f"micro-batch {i}: {got.item()!r} != {want['total'].item()!r}"


@pytest.mark.parametrize("name, n_ranks, n_microbatches, arg", [
    ("zb1p", 2, 4, "name"),               # our schedule, not one of torch's two checked here
    ("dualpipe", 2, 4, "name"),
    ("dualpipev", 2, 3, "n_microbatches"),  # torch's ScheduleDualPipeV needs >= 2 * n_ranks
    ("1f1b", 3, 2, "n_microbatches"),       # Schedule1F1B needs >= n_stages
    ("1f1b", 0, 4, "n_ranks"),
])
def test_bad_arguments_raise_before_spawning(name, n_ranks, n_microbatches, arg):
    with pytest.raises(ValueError, match=f"^{arg}="):
        torch_pipelining_losses(name, n_ranks, n_microbatches)
