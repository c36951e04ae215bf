"""DualPipe and the pipeline schedules it improves on ([V3] §3.2.1, Table 2).

Pipeline parallelism puts consecutive stages of the model on different devices and
streams micro-batches through them. The question is the order of the work:

- :mod:`.schedules`: each rank's op list for 1F1B, ZB1P, DualPipe and DualPipeV, the
  last two equal op for op to the orders recorded from deepseek-ai/DualPipe's own code;
- :mod:`.simulate`: those lists played as a dependency graph with chosen costs, which
  reproduces [V3] Table 2's bubbles and activation memory;
- :mod:`.stages`: a dsv3lite model cut into stages, with weight gradients that can wait;
- :mod:`.executor`: one real training step with one process per rank over
  ``torch.distributed`` (gloo, CPU), following the op lists and recording what each
  rank actually ran, then a forward-only step;
- :mod:`.check`: that step against one process, the way the official examples check
  theirs: losses bitwise, gradients by cosine difference < 1e-13, forward-only losses
  bitwise; and the recorded trace against the schedule, the biases exactly;
- :mod:`.torch_pipelining`: the same stages under PyTorch's own 1F1B and DualPipeV.

``python -m dsv3lite.pipeline simulate|check ...`` runs the last two from a shell.
"""

from .schedules import SCHEDULES, Op, Schedule, build_schedule
from .simulate import Event, Timeline, simulate, table2, table2_bubble
from .stages import PipelineStage, split_layers
from .executor import Executed, PipelineResult, run_pipeline
from .check import GRAD_COS_DIFF_MAX, CheckReport, cal_diff, check, reference_step
from ..plot import plot_timeline

__all__ = ["SCHEDULES", "Op", "Schedule", "build_schedule", "Event", "Timeline", "simulate",
           "table2", "table2_bubble", "CheckReport", "Executed", "GRAD_COS_DIFF_MAX",
           "PipelineResult", "PipelineStage",
           "cal_diff", "check", "reference_step", "run_pipeline", "split_layers",
           "plot_timeline"]
