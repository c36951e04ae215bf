"""The oldest torch and transformers dsv3lite works with, checked once, at import.

The floors are those of ``pyproject.toml`` (a test keeps the two equal), set by what
``make floor-test`` measured: the unit tests pass on torch 2.10 (with its triton 3.6) and
transformers 5.0. On torch 2.9.1 they did not: compiling the float32 training step and
torch's blockwise ``scaled_mm`` need 2.10. Older releases lack more (2.8 has no CPU kernel
for ``torch._grouped_mm``, 2.7 no ``_grouped_mm`` at all). The HF bridge needs
transformers 5's ``DeepseekV3`` classes. One optional comparison sets its own, higher
floor: :data:`dsv3lite.pipeline.torch_pipelining.TORCH_PIPELINING_FLOOR`. An older install
fails here, with the installed and the needed versions, instead of deep inside a forward
pass.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

__all__ = ["TORCH_FLOOR", "TRANSFORMERS_FLOOR", "parse_version", "check_torch",
           "check_transformers"]

#: The oldest torch release dsv3lite runs on (the ``torch>=`` floor of ``pyproject.toml``);
#: :func:`check_torch` enforces it when the package is imported.
TORCH_FLOOR = "2.10"
#: The oldest transformers release the optional HF bridge (:mod:`dsv3lite.hf`) runs on;
#: :func:`check_transformers` enforces it when the bridge is imported.
TRANSFORMERS_FLOOR = "5.0"


def parse_version(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: ``"2.9.1+cpu"`` -> (2, 9, 1)."""
    match = re.match(r"\d+(?:\.\d+)*", str(version))
    if match is None:
        raise ValueError(f"version={version!r} is invalid: expected one like '2.9.1'")
    return tuple(int(part) for part in match.group(0).split("."))


def _check(package: str, installed: str, floor: str, extra: str = "") -> None:
    if parse_version(installed) < parse_version(floor):
        raise ImportError(f"dsv3lite needs {package}>={floor}, but {package} {installed} is "
                          f"installed: pip install -U '{package}>={floor}'{extra}")


def check_torch(installed: Optional[str] = None) -> None:
    """Raise ImportError if torch ``installed`` (default: the imported one) is older than
    :data:`TORCH_FLOOR`."""
    _check("torch", str(torch.__version__) if installed is None else installed, TORCH_FLOOR)


def check_transformers(installed: str) -> None:
    """Raise ImportError if transformers ``installed`` is older than
    :data:`TRANSFORMERS_FLOOR` (the HF bridge, ``pip install 'dsv3lite[hf]'``)."""
    _check("transformers", installed, TRANSFORMERS_FLOOR, " (the dsv3lite[hf] extra)")
