"""The asserted outcomes of the book's experiments, with their margins.

A seed fixes the data order and the initial weights, not the arithmetic: another CPU
(vector width, MKL code path, thread count) or a GPU rounds differently, and a short
training run amplifies those last bits into visibly different curves. So every chapter
states the outcome of a trained or sampled experiment with :func:`expect` instead of a
bare ``assert``. It asserts the same thing, and it also records the value, the bound and
the margin between them, which ``benchmarks/robustness.py`` collects across seeds and
arithmetic settings to show that each outcome stands clear of the noise.

The chapters read their seed and step counts through :func:`knob`, so that the
robustness script can vary them; the book build leaves the variables unset and gets the
defaults written in the chapter.

Environment variables (all unset in a normal build):

``DSV3LITE_SEED``, ``DSV3LITE_STEPS``, ...
    Override the chapter's ``knob("seed", ...)``, ``knob("steps", ...)``, ...
``DSV3LITE_OUTCOMES``
    A file to which each :func:`expect` appends one JSON line.
``DSV3LITE_KEEP_GOING``
    ``1``: a failed :func:`expect` is recorded but does not raise, so that one run of a
    chapter measures all of its outcomes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, TypeVar

__all__ = ["knob", "expect", "OutcomeError"]

T = TypeVar("T", int, float, str)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


class OutcomeError(AssertionError):
    """An asserted outcome of an experiment did not hold."""


def knob(name: str, default: T) -> T:
    """``default``, unless the environment variable ``DSV3LITE_<NAME>`` overrides it.

    The value is converted to the type of ``default``; a value that does not convert is an
    error that names the variable.
    """
    var = f"DSV3LITE_{name.upper()}"
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    kind = type(default)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__} "
                         f"(the chapter's default is {default!r})") from None


def expect(name: str, value: float, op: str, bound: float) -> float:
    """Assert ``value op bound`` and record it; returns the margin.

    Args:
        name: what the outcome says, e.g. ``"bias γ=1e-2 ends below half of no balancing"``.
        value: the measured quantity.
        op: one of ``<``, ``<=``, ``>``, ``>=``.
        bound: what ``value`` is compared with (a constant or another measurement).

    Returns:
        The margin: how far ``value`` is on the right side of ``bound``, as a fraction of
        ``|bound|`` (``bound - value`` for ``<``, ``value - bound`` for ``>``; divided by
        ``|bound|`` unless ``bound`` is 0). Negative when the outcome failed.

    Raises:
        OutcomeError: the outcome does not hold (unless ``DSV3LITE_KEEP_GOING=1``).
        ValueError: ``op`` is not one of the four comparisons, or a number is not finite.
    """
    if op not in _OPS:
        raise ValueError(f"op={op!r}: expected one of {sorted(_OPS)}")
    value, bound = float(value), float(bound)
    if not (math.isfinite(value) and math.isfinite(bound)):
        raise ValueError(f"{name}: value={value} and bound={bound} must be finite numbers")
    held = _OPS[op](value, bound)
    gap = bound - value if op.startswith("<") else value - bound
    margin = gap / abs(bound) if bound != 0 else gap
    path = os.environ.get("DSV3LITE_OUTCOMES")
    if path:
        record = {"name": name, "value": value, "op": op, "bound": bound,
                  "margin": margin, "held": held}
        with open(path, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if not held and os.environ.get("DSV3LITE_KEEP_GOING") != "1":
        raise OutcomeError(f"{name}: expected {value:.6g} {op} {bound:.6g}")
    return margin
