"""Make a module callable, so ``dsv3lite.train(...)`` runs the function it is named after."""

from __future__ import annotations

import sys
import types
from typing import Callable


def make_module_callable(module_name: str, function: Callable) -> None:
    """Calling module ``module_name`` calls ``function`` (its namesake)."""

    class _CallableModule(types.ModuleType):
        __doc__ = sys.modules[module_name].__doc__

        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
