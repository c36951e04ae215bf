"""``python -m dsv3lite``: the one front door to the package's command-line tools.

``python -m dsv3lite`` lists the subcommands, ``python -m dsv3lite --version`` prints the
package version, and ``python -m dsv3lite <command> [args]`` runs a command with its own
arguments (``python -m dsv3lite train --help`` shows the trainer's). Each command is
also its module's own entry point (``python -m dsv3lite.train`` is the same as
``python -m dsv3lite train``).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from . import __version__
from .data import main as data_main
from .generate import main as generate_main
from .grpo.__main__ import main as grpo_main
from .pipeline.__main__ import main as pipeline_main
from .train import main as train_main

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, tuple[Callable[[Optional[list[str]]], int], str]] = {
    "train": (train_main, "pre-train a model on a corpus (progress bar, checkpoints, metrics)"),
    "generate": (generate_main, "sample from a checkpoint with the latent KV cache, "
                                "optionally MTP-speculative"),
    "pipeline": (pipeline_main, "simulate, draw and check pipeline schedules (1F1B, ZB1P, "
                                "DualPipe, DualPipeV)"),
    "grpo": (grpo_main, "GRPO on the addition task: warm-up, then group-relative RL"),
    "data": (data_main, "download (Shakespeare) and tokenize a corpus into data/"),
}
"""Subcommand name -> (its ``main(argv)``, one line of help)."""


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m dsv3lite [--version] <command> [args]", "",
             "DeepSeek-V3's training ideas, small enough to read and run. Commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "python -m dsv3lite <command> --help shows a command's own arguments."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the front door with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"dsv3lite {__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"error: unknown command {args[0]!r}; choose one of: {', '.join(COMMANDS)}\n",
              file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    return command[0](args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
