"""The same stage modules under PyTorch's own schedules: ``torch.distributed.pipelining``.

:mod:`.executor` runs our op lists with our own send/recv code. A bug shared by our
schedule builder and our executor (a micro-batch sent to the wrong stage, a stale
balance slot, a loss computed on the wrong tokens) could let both agree with themselves.
This module runs the *same* :class:`~dsv3lite.pipeline.stages.PipelineStage` modules
under code we did not write, PyTorch's ``Schedule1F1B`` and ``ScheduleDualPipeV``, and
returns each micro-batch's loss and every parameter's gradient, summed over the ranks:
the losses must equal the single-process ones bitwise and the gradients within
deepseek-ai/DualPipe's bound (``check.GRAD_COS_DIFF_MAX``). The losses come from the
forward alone; only the gradients show that torch's backward, with its own split into
input and weight gradients, ran through our stages as one process would.

How the pieces map onto torch's API:

- each of our stages is wrapped, unchanged, in ``torch.distributed.pipelining``'s
  ``PipelineStage``; rank r holds stage r (1F1B), or stages r and 2R-1-r (DualPipeV);
- the last stage's loss is our :meth:`PipelineStage.criterion`: it needs the micro-batch's
  token ids (the MTP module embeds ``tokens[:, 1:]``) besides the targets, so the
  schedule's ``target`` packs both, ``(batch, 2, seq_len)``; torch splits it along dim 0
  into micro-batches exactly as it splits the first stage's input;
- every stage is given example inputs and outputs (from a forward of micro-batch 0 on a
  scratch copy of the model), so torch runs in its STATIC metadata mode: it runs no
  shape-inference forward on uninitialized buffers and leaves the model's MoE counts alone;
- ``scale_grads=False``, as our loss is a sum over micro-batches; torch returns the
  ``loss_fn`` outputs unscaled in ``losses`` either way. (``scale_grads=True``, torch's
  default, divides every gradient by the number of micro-batches: the same losses, wrong
  gradients, which the tests use to see the gradient comparison fail.)
"""

from __future__ import annotations

import os
import tempfile
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Union

import torch
import torch.distributed as dist

from ..config import ModelArgs
from ..versions import parse_version
from .check import check_args, make_microbatches, make_model
from .processes import run_ranks
from .stages import PipelineStage
from .schedules import build_schedule

if TYPE_CHECKING:  # the type torch's schedules take their stages as
    from torch.distributed.pipelining.stage import _PipelineStageBase

__all__ = ["TORCH_SCHEDULES", "TORCH_PIPELINING_FLOOR", "TorchPipeliningResult",
           "torch_pipelining_step"]

#: The schedule names :func:`torch_pipelining_step` can hand to
#: ``torch.distributed.pipelining``: its 1F1B and its DualPipeV.
TORCH_SCHEDULES = ("1f1b", "dualpipev")

#: The oldest torch whose pipelining runs our stages: before it, a stage must send back a
#: gradient for every tensor it received, and the expert counts our stages pass on beside
#: the hidden state have none ("has gradients None and is expecting to send gradients",
#: seen with torch 2.10; pytorch/pytorch#152827, fixed by #182182 in May 2026). The rest
#: of the package works from ``versions.TORCH_FLOOR`` on.
TORCH_PIPELINING_FLOOR = (2, 12)


@dataclass
class TorchPipeliningResult:
    """What :func:`torch_pipelining_step` returns.

    Attributes:
        losses: The total loss of micro-batches 0..M-1, 0-dim tensors.
        grads: Every parameter's gradient, summed over the ranks (zeros where none).
    """

    losses: list[torch.Tensor]
    grads: dict[str, torch.Tensor]


def _stage_examples(args: ModelArgs, seed: int, n_stages: int, tokens: torch.Tensor
                    ) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """(inputs, outputs) of every stage for ``tokens``, run on a scratch model, with the
    ``requires_grad`` each carried tensor has at run time (the first stage's all-zero
    balance vector has none)."""
    model = make_model(args, seed)
    inputs: tuple[torch.Tensor, ...] = (tokens,)
    examples = []
    for s in range(n_stages):
        outputs = PipelineStage(model, s, n_stages)(*inputs)
        outputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in outputs)
        examples.append((inputs, outputs))
        inputs = outputs
    return examples


def _worker(rank: int, name: str, n_ranks: int, n_microbatches: int, seed: int,
            workdir: str, timeout_s: float, scale_grads: bool) -> None:
    """One rank: build the model, wrap its stages, run one ``step`` of torch's schedule."""
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import Schedule1F1B, ScheduleDualPipeV

    try:
        torch.set_num_threads(1)  # as reference_step: the same kernels, the same sums
        dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous",
                                rank=rank, world_size=n_ranks,
                                timeout=timedelta(seconds=timeout_s))
        n_stages = 2 * n_ranks if name == "dualpipev" else n_ranks
        held = sorted({rank, n_stages - 1 - rank}) if name == "dualpipev" else [rank]
        args = check_args(n_stages, 0)
        microbatches = make_microbatches(args, n_microbatches, seed=seed)
        examples = _stage_examples(args, seed, n_stages, microbatches[0][0])
        model = make_model(args, seed)
        ours = {s: PipelineStage(model, s, n_stages) for s in held}
        stages: list[_PipelineStageBase] = [
            TorchStage(ours[s], s, n_stages, torch.device("cpu"), input_args=examples[s][0],
                       output_args=examples[s][1])
            for s in held]

        def loss_fn(outputs: tuple[torch.Tensor, ...], packed: torch.Tensor) -> torch.Tensor:
            loss = ours[n_stages - 1].criterion(outputs, packed[:, 0], packed[:, 1]).loss
            assert loss is not None, "the last stage's criterion computes the loss"
            return loss.total

        schedule: Union[ScheduleDualPipeV, Schedule1F1B]
        if name == "dualpipev":
            schedule = ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn,
                                         scale_grads=scale_grads)
        else:
            schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn,
                                    scale_grads=scale_grads)
        tokens = torch.cat([t for t, _ in microbatches])
        packed = torch.stack((tokens, torch.cat([y for _, y in microbatches])), dim=1)
        has_last = n_stages - 1 in held
        losses: list[torch.Tensor] = []
        schedule.step(*((tokens,) if 0 in held else ()),
                      target=packed if has_last else None,
                      losses=losses if has_last else None)
        if has_last:
            torch.save([loss.detach() for loss in losses], os.path.join(workdir, "losses.pt"))
        # Every rank holds the whole model; the stages it ran have gradients (the
        # embedding on the first and the last stage, through MTP): sum them over ranks.
        grads = {}
        for n, p in model.named_parameters():
            grads[n] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grads[n])
        if rank == 0:
            torch.save(grads, os.path.join(workdir, "grads.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(workdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)


def torch_pipelining_step(name: str, n_ranks: int, n_microbatches: int, *, seed: int = 0,
                          timeout_s: float = 120.0, scale_grads: bool = False
                          ) -> TorchPipeliningResult:
    """One training step under torch's schedule: per-micro-batch losses and gradients.

    Args:
        name: ``"1f1b"`` (``Schedule1F1B``, ``n_ranks`` stages) or ``"dualpipev"``
            (``ScheduleDualPipeV``, ``2 * n_ranks`` stages, two per rank).

        n_ranks: Processes (gloo, CPU), one per pipeline rank.

        n_microbatches: Micro-batches of :func:`make_microbatches` (batch 2, length 16);
            at least the number of stages, as both torch schedules require.

        seed: Seed of the model (:func:`make_model`) and of the micro-batches.

        timeout_s: Process-group timeout; the whole call fails after about this long
            plus start-up.

        scale_grads: Passed to torch's schedule. False is right for our summed loss;
            True divides the gradients by ``n_microbatches`` (for tests).

    Returns:
        A :class:`TorchPipeliningResult`; compare it with
        ``reference_step(make_model(check_args(n_stages, 0), seed), microbatches)``.

    Raises:
        ValueError: on a bad argument, naming it. RuntimeError: on a torch older than
            :data:`TORCH_PIPELINING_FLOOR`; when a rank fails or the step does not finish
            in time, naming the rank and its error.
    """
    if name not in TORCH_SCHEDULES:
        raise ValueError(f"name={name!r} is invalid: choose one of {', '.join(TORCH_SCHEDULES)}")
    build_schedule(name, n_ranks, n_microbatches)  # the same limits as torch's: raises
    if parse_version(str(torch.__version__)) < TORCH_PIPELINING_FLOOR:
        raise RuntimeError(
            f"torch_pipelining_step needs torch >= {'.'.join(map(str, TORCH_PIPELINING_FLOOR))}"
            f" (torch {torch.__version__} is installed): older torch.distributed.pipelining "
            "wants a gradient for every tensor a stage receives, and the expert counts our "
            "stages pass on have none. Our own executor (run_pipeline) has no such limit.")
    with tempfile.TemporaryDirectory(prefix="dsv3lite-torchpp-") as workdir:
        run_ranks(_worker, n_ranks, workdir, timeout_s,
                  (name, n_ranks, n_microbatches, seed, workdir, timeout_s, scale_grads),
                  label=f"torch.pipelining {name}")
        return TorchPipeliningResult(torch.load(os.path.join(workdir, "losses.pt")),
                                     torch.load(os.path.join(workdir, "grads.pt")))
