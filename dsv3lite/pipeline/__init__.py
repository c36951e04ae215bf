"""DualPipe and the pipeline schedules it improves on ([V3] §3.2.1, Table 2).

Pipeline parallelism puts consecutive stages of the model on different devices and
streams micro-batches through them. The question is the order of the work:

- :mod:`.schedules`: each rank's op list for 1F1B, ZB1P, DualPipe and DualPipeV, the
  last two op for op as deepseek-ai/DualPipe runs them;
- :mod:`.simulate`: those lists played as a dependency graph with chosen costs, which
  reproduces [V3] Table 2 (bubbles, activation memory, parameter copies);
- :mod:`.stages`: a dsv3lite model cut into stages, with weight gradients that can wait;
- :mod:`.executor`: one real training step with one process per rank over
  ``torch.distributed`` (gloo, CPU), following the op lists and recording a trace;
- :mod:`.check`: that step against one process, the way the official examples check
  theirs: losses bitwise, gradients by cosine difference, biases exactly;
- :mod:`.torch_pipelining`: the same stages under PyTorch's own 1F1B and DualPipeV.

``python -m dsv3lite.pipeline simulate|check ...`` runs the last two from a shell.
"""

from .schedules import SCHEDULES, Op, Schedule, build_schedule
from .simulate import Event, Timeline, simulate, table2, table2_bubble
from .stages import PipelineStage, split_layers
from .executor import PipelineResult, run_pipeline
from .check import CheckReport, cal_diff, check, reference_step
from ..plot import plot_timeline

__all__ = ["SCHEDULES", "Op", "Schedule", "build_schedule", "Event", "Timeline", "simulate",
           "table2", "table2_bubble", "CheckReport", "PipelineResult", "PipelineStage",
           "cal_diff", "check", "reference_step", "run_pipeline", "split_layers",
           "plot_timeline"]
