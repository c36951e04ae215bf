import inspect
import pathlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def host_syncs():
    """A context manager class whose ``calls`` lists every .item(), .tolist(), .cpu() and
    tensor truth test made inside it: the ways a step waits for the device."""
    from torch.overrides import TorchFunctionMode

    class HostSyncs(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("tolist", "item", "cpu", "__bool__"):
                self.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    return HostSyncs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> pathlib.Path:
    """A small folder of real English-ish text: docstrings and sources of stdlib modules."""
    import argparse
    import collections
    import dataclasses as dc
    import email.message
    import json as js
    import textwrap

    folder = tmp_path_factory.mktemp("corpus")
    for module in (argparse, collections, dc, email.message, js, textwrap, inspect, pathlib):
        name = module.__name__.replace(".", "_")
        (folder / f"{name}.txt").write_text(inspect.getsource(module))
    (folder / "empty.txt").write_text("   \n")
    return folder


def _cuda_with(capability: tuple[int, int], lacks: str) -> torch.device:
    """The CUDA device when it has at least ``capability`` and triton imports; else skip.
    (Tests that use it are marked ``gpu``, so a machine without CUDA skips them earlier.)"""
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < capability:
        pytest.skip(f"{torch.cuda.get_device_name(device)} {lacks}")
    pytest.importorskip("triton")
    return device


@pytest.fixture
def fp8_cuda() -> torch.device:
    """A CUDA device with FP8 tensor cores (sm_89+) for the compiled kernels."""
    return _cuda_with((8, 9), "has no FP8 tensor cores (sm_89+)")


@pytest.fixture
def hopper_cuda() -> torch.device:
    """A Hopper-class CUDA device (sm_90+: TMA, wgmma) for the fast FP8 GEMM."""
    return _cuda_with((9, 0), "is not sm_90+ (TMA, wgmma)")
