"""Compile a Triton kernel ahead of time for Hopper (sm_90) on a machine without a GPU.

A kernel that only ever runs under the interpreter on CPU could still fail to compile
for the GPU (an unsupported dot shape, too much shared memory for a pipelined config,
a type the NVIDIA backend rejects). Triton's compiler does not need a GPU to build a
kernel: given a ``GPUTarget("cuda", 90, 32)`` it lowers the kernel through TTIR, TTGIR,
LLVM IR and PTX, and the ``ptxas`` that ships in the triton wheel assembles the cubin,
so every stage the first GPU run would go through runs here, without executing.

Use from a test::

    from aot import compile_for_hopper, hopper_compile_skip_reason

    reason = hopper_compile_skip_reason()
    if reason:
        pytest.skip(reason)
    compiled = compile_for_hopper(kernels._weight_dequant_kernel,
                                  {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16",
                                   "N": "i32", ...}, {"BLOCK": 128}, num_warps=8)
    compiled.asm["ttgir"], compiled.asm["ptx"], compiled.metadata.shared

Triton reads ``TRITON_INTERPRET`` when a module's kernels are built: under the
interpreter ``@triton.jit`` gives an interpreted function, which cannot be compiled,
and :func:`compile_for_hopper` says so. Compile in a process where it is unset (the
interpreted kernel tests run in child processes, so the pytest process itself is one).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Optional

HOPPER = 90
"""The compute capability compiled for: sm_90 (H100, H200)."""


def hopper_compile_skip_reason() -> Optional[str]:
    """Why ahead-of-time compilation cannot run here, or None when it can.

    It needs triton importable, its NVIDIA backend, and a ``ptxas`` that runs (the
    wheel's own, or ``TRITON_PTXAS_PATH``).
    """
    try:
        import triton  # optional dependency: Triton
        from triton.backends.nvidia.compiler import get_ptxas  # optional dependency
    except ImportError as err:
        return f"triton or its NVIDIA backend cannot be imported: {err}"
    try:
        try:
            get_ptxas(HOPPER).path
        except TypeError:  # triton < 3.6: get_ptxas() takes no architecture
            get_ptxas().path
    except RuntimeError as err:
        return f"no working ptxas for sm_{HOPPER} (triton {triton.__version__}): {err}"
    return _probe_compile()


@functools.cache
def _probe_compile() -> Optional[str]:
    """Compile one small kernel of the package; None if it builds, else why not (an
    older triton whose compiler API this helper does not speak, say)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set in this process: its kernels cannot compile"
    try:
        import triton  # optional dependency: Triton

        from dsv3lite.fp8 import kernels  # optional dependency: imports Triton

        compile_for_hopper(kernels._weight_dequant_kernel,
                           {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*fp32",
                            **dict.fromkeys(["N", "K", "stride_qn", "stride_qk",
                                             "stride_sn", "stride_sk"], "i32")},
                           {"BLOCK": 128}, num_warps=4)
    except Exception as err:  # noqa: BLE001 - any failure means: cannot check here
        return (f"triton {triton.__version__} cannot compile for sm_{HOPPER} through this "
                f"helper: {type(err).__name__}: {str(err)[:300]}")
    return None


def _jit_function(kernel: Any):
    """The JITFunction under autotune/heuristics wrappers; refuses an interpreted one."""
    from triton.runtime.jit import JITFunction  # optional dependency: Triton

    fn = kernel
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # Autotuner, Heuristics: the wrapped kernel sits in .fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"kernel {getattr(kernel, '__name__', kernel)!r} is a "
                        f"{type(fn).__name__}, not a triton JITFunction: it was built "
                        f"under TRITON_INTERPRET=1, which cannot be compiled; import it "
                        f"in a process without TRITON_INTERPRET")
    return fn


def compile_for_hopper(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any],
                       num_warps: int = 4, num_stages: int = 3,
                       aligned: Optional[Iterable[str]] = None, arch: int = HOPPER):
    """Compile ``kernel`` for ``sm_<arch>`` (default sm_90) down to a cubin, without a GPU.

    Args:
        kernel: a ``@triton.jit`` function, or a ``triton.autotune`` / ``heuristics``
            wrapper of one (its configs are not applied: pass a config's meta-parameters
            in ``constexprs`` and its ``num_warps`` / ``num_stages`` here).
        signature: the type of every runtime argument, by name, in Triton's spelling:
            ``"*fp8e4nv"``, ``"*fp32"``, ``"*bf16"``, ``"*i32"`` for pointers, ``"i32"``,
            ``"i64"``, ``"fp32"`` for scalars. An int argument launched with a value
            ≥ 2^31 is specialized to ``"i64"`` by the launcher; below that, ``"i32"``.
        constexprs: the value of every ``tl.constexpr`` argument, by name.
        num_warps, num_stages: the launch options a ``triton.Config`` carries.
        aligned: names of arguments to compile as divisible by 16, as the launcher
            specializes 16-byte-aligned pointers and ints that are multiples of 16.
            ``None`` (default): every pointer argument (what torch allocations give).
        arch: compute capability, e.g. 90 for Hopper.

    Returns:
        Triton's ``CompiledKernel``: ``.asm`` maps "ttir", "ttgir", "llir", "ptx",
        "cubin" to each stage's output; ``.metadata`` holds e.g. ``shared`` (bytes of
        shared memory) and ``num_warps``.

    Raises:
        ValueError: an argument of the kernel is in neither ``signature`` nor
            ``constexprs``, or a name in them is not an argument.
        TypeError: the kernel was built by the interpreter (``TRITON_INTERPRET=1``).
        Whatever Triton raises when the kernel does not compile for the target
        (``triton.compiler.errors.CompilationError``, a ptxas ``RuntimeError``, ...).
    """
    import triton  # optional dependency: Triton
    from triton.backends.compiler import GPUTarget  # optional dependency: Triton
    from triton.compiler import ASTSource  # optional dependency: Triton

    fn = _jit_function(kernel)
    names = list(fn.arg_names)
    unknown = sorted((set(signature) | set(constexprs)) - set(names))
    if unknown:
        raise ValueError(f"signature/constexprs name {unknown}, which are not arguments of "
                         f"{fn.__name__}; its arguments are {names}")
    both = sorted(set(signature) & set(constexprs))
    if both:
        raise ValueError(f"{both} appear in both signature and constexprs of "
                         f"{fn.__name__}: give each argument once")
    missing = [n for n in names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"arguments {missing} of {fn.__name__} have no type in signature "
                         f"and no value in constexprs")
    full_signature = {n: signature.get(n, "constexpr") for n in names}
    if aligned is None:
        aligned = [n for n, t in signature.items() if t.startswith("*")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn, signature=full_signature, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def config_options(config: Any) -> dict[str, Any]:
    """``constexprs`` and launch options of one ``triton.Config``, for
    :func:`compile_for_hopper`: ``{"constexprs": {...}, "num_warps": w, "num_stages": s}``."""
    return {"constexprs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages}
