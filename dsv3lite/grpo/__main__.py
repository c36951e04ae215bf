"""``python -m dsv3lite.grpo``: warm up a small model on a verifiable task, then GRPO.

    python -m dsv3lite.grpo --task addition --steps 60 --out runs/grpo
    python -m dsv3lite.grpo --out runs/grpo --steps 100 --resume

Bad arguments give one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import NoReturn, Optional

from ..checkpoint import CheckpointError, latest_checkpoint
from .objective import LOSS_TYPES, SCALES
from .trainer import TASKS, GRPOConfig, train_grpo


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Optional[list[str]] = None) -> int:
    d = GRPOConfig()
    parser = _Parser(prog="python -m dsv3lite.grpo",
                     description="GRPO on a verifiable task with a small dsv3lite model.")
    parser.add_argument("--task", default=d.task, help=", ".join(sorted(TASKS)))
    parser.add_argument("--digits", type=int, default=d.digits)
    parser.add_argument("--steps", type=int, default=d.steps, help="GRPO steps")
    parser.add_argument("--out", default=d.out, help="run folder")
    parser.add_argument("--loss-type", default=d.loss_type, help=", ".join(LOSS_TYPES))
    parser.add_argument("--beta", type=float, default=d.beta, help="KL coefficient")
    parser.add_argument("--group-size", type=int, default=d.group_size, help="G")
    parser.add_argument("--scale-rewards", default=d.scale_rewards, help=", ".join(SCALES))
    parser.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    parser.add_argument("--mu", type=int, default=d.mu, help="updates per sampling round")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--epsilon", type=float, default=d.epsilon,
                        help="clip range [1 - epsilon, 1 + epsilon-high]")
    parser.add_argument("--epsilon-high", type=float, default=d.epsilon_high,
                        help="upper clip (default: --epsilon)")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help="sampling temperature of the rollouts (> 0)")
    parser.add_argument("--shuffle-rewards", action="store_true",
                        help="control run: permute the rewards across the batch")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--init-from", default=None, help="a warm-up model to start from")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    try:
        if ns.resume:
            saved = json.loads((latest_checkpoint(ns.out) / "state.json").read_text())
            cfg = GRPOConfig(**{**saved["config"], "steps": ns.steps, "out": ns.out,
                                "stop_after": ns.stop_after})
        else:
            cfg = GRPOConfig(task=ns.task, digits=ns.digits, steps=ns.steps, out=ns.out,
                             loss_type=ns.loss_type, beta=ns.beta, group_size=ns.group_size,
                             scale_rewards=ns.scale_rewards,
                             prompts_per_step=ns.prompts_per_step, mu=ns.mu, lr=ns.lr,
                             epsilon=ns.epsilon, epsilon_high=ns.epsilon_high,
                             temperature=ns.temperature,
                             shuffle_rewards=ns.shuffle_rewards,
                             warmup_steps=ns.warmup_steps,
                             init_from=ns.init_from, stop_after=ns.stop_after, seed=ns.seed)
        cfg.validate()
        result = train_grpo(cfg, resume=ns.resume, progress=not ns.no_progress)
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"held-out accuracy: {result.warmup_accuracy:.3f} after the warm-up, "
          f"{result.final_accuracy:.3f} now ({result.seconds:.1f} s)")
    print(f"run folder: {result.out}; config: {json.dumps(dataclasses.asdict(cfg))[:120]}...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
