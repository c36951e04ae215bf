"""Every Triton kernel compiled for Hopper (sm_90) on this CPU machine, ahead of time.

The interpreted tests check what the kernels compute; they cannot tell whether a kernel
compiles for the GPU at all, with the tile shapes and pipeline depths its autotuner may
pick there. Here Triton's compiler builds each kernel, for each of those configurations
and for the fixed interpreter tile, down to a cubin with the ``ptxas`` of the triton
wheel (``tests/aot.py``), so a kernel that cannot compile for Hopper fails ``make test``
rather than the first GPU run. The default run compiles one configuration per kernel;
the full sweep of autotune configurations is marked ``slow``.

The generated IR also shows two properties that no small CPU tensor can:

- **int64 offsets**: no 32-bit multiplication in a kernel involves a stride or size
  argument or has two run-time operands (an index times a stride would wrap past 2^31
  elements); 32-bit products are only program ids times a compile-time block size;
- **NaN propagates through the quantizers**: their max/min are ``arith.maximumf`` /
  ``arith.minimumf`` (NaN in, NaN out), never ``arith.maxnumf`` / ``minnumf``, which is
  what ``tl.max`` and a plain ``tl.maximum`` lower to and which drop a NaN.
"""

from __future__ import annotations

import re

import pytest

from aot import compile_for_hopper, hopper_compile_skip_reason

pytestmark = pytest.mark.skipif(hopper_compile_skip_reason() is not None,
                                reason=str(hopper_compile_skip_reason()))

PTR = {"fp8": "*fp8e4nv", "fp32": "*fp32", "bf16": "*bf16", "i32": "*i32"}


def _kernels():
    from dsv3lite.fp8 import kernels  # optional dependency: Triton

    if kernels.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set in this process: its kernels cannot compile")
    return kernels


def _grouped():
    from dsv3lite.fp8 import grouped_kernels

    _kernels()
    return grouped_kernels


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Pointer arguments as given, every other run-time argument an i32 scalar (what
    the launcher gives a stride or size below 2^31)."""
    return {name: pointers.get(name, "i32") for name in fn.arg_names
            if name not in constexprs}


def _quantizer_cases():
    """(name, kernel getter, pointer types, constexprs, num_warps, num_stages)."""
    for src in ("bf16", "fp32"):
        for pow2 in (False, True):
            yield (f"quant_tiles-{src}-pow2={pow2}", "_quant_tiles_kernel",
                   {"x_ptr": PTR[src], "q_ptr": PTR["fp8"], "s_ptr": PTR["fp32"]},
                   {"POW2_SCALES": pow2, "BLOCK_R": 64, "BLOCK_C": 128}, 8, 3)
            yield (f"quant_both-{src}-pow2={pow2}", "_quant_both_kernel",
                   {"x_ptr": PTR[src], "q_ptr": PTR["fp8"], "s_ptr": PTR["fp32"],
                    "qt_ptr": PTR["fp8"], "st_ptr": PTR["fp32"]},
                   {"POW2_SCALES": pow2, "BLOCK": 128}, 8, 3)
    for pow2 in (False, True):
        yield (f"weight_quant-pow2={pow2}", "_weight_quant_kernel",
               {"w_ptr": PTR["fp32"], "q_ptr": PTR["fp8"], "s_ptr": PTR["fp32"]},
               {"POW2_SCALES": pow2, "BLOCK": 128}, 8, 3)


QUANTIZERS = list(_quantizer_cases())
DEQUANT = ("weight_dequant", "_weight_dequant_kernel",
           {"q_ptr": PTR["fp8"], "s_ptr": PTR["fp32"], "y_ptr": PTR["bf16"]}, {"BLOCK": 128},
           8, 3)


def _gemm_cases(full: bool):
    """The plain GEMM for each autotune config (and the interpreter's tile), with b in
    128x128 blocks (B_SCALE_ROWS=128, Fprop/Dgrad) and in 1x128 tiles (1, Wgrad)."""
    from dsv3lite.fp8 import kernels

    tiles = [((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["GROUP_M"]),
              c.num_stages, c.num_warps) for c in kernels._GEMM_CONFIGS]
    fixed = dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8)
    tiles.append(((fixed["BLOCK_M"], fixed["BLOCK_N"], fixed["GROUP_M"]), 3, 4))
    if not full:
        tiles = tiles[:1]
    pointers = {"a_ptr": PTR["fp8"], "b_ptr": PTR["fp8"], "c_ptr": PTR["bf16"],
                "a_s_ptr": PTR["fp32"], "b_s_ptr": PTR["fp32"]}
    for (bm, bn, gm), stages, warps in tiles:
        for b_rows in ((128, 1) if full else (128,)):
            yield (f"fp8_gemm-{bm}x{bn}-s{stages}-w{warps}-b_rows={b_rows}",
                   "_fp8_gemm_kernel", pointers,
                   {"B_SCALE_ROWS": b_rows, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128,
                    "GROUP_M": gm}, warps, stages)


def _grouped_cases(full: bool):
    from dsv3lite.fp8 import grouped_kernels as gk

    gemm_tiles = list(gk.GEMM_TILES) + [(64, 64, 3, 4)]  # + the interpreter's tile
    wgrad_tiles = list(gk.WGRAD_TILES) + [(64, 64, 3, 4)]
    if not full:
        gemm_tiles, wgrad_tiles = gemm_tiles[:1], wgrad_tiles[:1]
    for bm, bn, stages, warps in gemm_tiles:
        yield (f"grouped_gemm-{bm}x{bn}-s{stages}-w{warps}", "_grouped_fp8_gemm_kernel",
               {"a_ptr": PTR["fp8"], "b_ptr": PTR["fp8"], "c_ptr": PTR["bf16"],
                "a_s_ptr": PTR["fp32"], "b_s_ptr": PTR["fp32"], "seg_expert_ptr": PTR["i32"]},
               {"SEGMENT": 128, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8},
               warps, stages)
    for bn, bk, stages, warps in wgrad_tiles:
        yield (f"grouped_wgrad-{bn}x{bk}-s{stages}-w{warps}", "_grouped_fp8_wgrad_kernel",
               {"dy_ptr": PTR["fp8"], "x_ptr": PTR["fp8"], "dw_ptr": PTR["fp32"],
                "dy_s_ptr": PTR["fp32"], "x_s_ptr": PTR["fp32"], "ends_ptr": PTR["i32"]},
               {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_T": 128}, warps, stages)


def _compile(case):
    _, name, pointers, constexprs, warps, stages = case
    module = _grouped() if name.startswith("_grouped") else _kernels()
    fn = getattr(module, name)
    return compile_for_hopper(fn, _signature(fn, pointers, constexprs), constexprs,
                              num_warps=warps, num_stages=stages)


_I32_PRODUCT = re.compile(r"= arith\.muli (%[\w.]+), (%[\w.]+) : (?:tensor<[^>]*xi32>|i32)")
_CONSTANT = re.compile(r"^\s*(%[\w.]+) = arith\.constant (?:dense<[^>]*> : tensor<[^>]*>|"
                       r"-?\d+ : i32)", re.M)
_I32_ARGUMENT = re.compile(r"(%[\w.]+): i32")
_SPLAT = re.compile(r"^\s*(%[\w.]+) = tt\.splat (%[\w.]+)", re.M)


def int32_index_stride_products(ttir: str) -> list[str]:
    """The lines of ``ttir`` that multiply in 32 bits either two run-time values or a
    kernel argument (a stride, a size; or its splat) by anything: an index times a
    stride formed in int32, which wraps past 2^31. A program id or loop counter times a
    compile-time block size is an index, and allowed."""
    constants = set(_CONSTANT.findall(ttir))
    header = next(line for line in ttir.splitlines() if "tt.func" in line)
    arguments = set(_I32_ARGUMENT.findall(header))
    arguments |= {value for value, source in _SPLAT.findall(ttir) if source in arguments}
    bad = []
    for line in ttir.splitlines():
        m = _I32_PRODUCT.search(line)
        if m is None:
            continue
        operands = {m.group(1), m.group(2)}
        if operands & arguments or not operands & constants:
            bad.append(line.strip())
    return bad


def _check_int64_offsets(compiled, label: str) -> None:
    bad = int32_index_stride_products(compiled.asm["ttir"])
    assert not bad, f"{label}: 32-bit index x stride products (wrap past 2^31): {bad[:3]}"


def _assert_compiled(compiled, label: str) -> None:
    assert compiled.asm["cubin"], f"{label}: ptxas produced no cubin"
    assert 'ttg.target = "cuda:90"' in compiled.asm["ttgir"], label
    assert ".target sm_90" in compiled.asm["ptx"], label


@pytest.mark.parametrize("case", QUANTIZERS + [DEQUANT], ids=lambda c: c[0])
def test_quantizers_compile_for_hopper_with_int64_offsets(case):
    compiled = _compile(case)
    _assert_compiled(compiled, case[0])
    _check_int64_offsets(compiled, case[0])


@pytest.mark.parametrize("case", QUANTIZERS, ids=lambda c: c[0])
def test_quantizers_propagate_nan_in_their_max_and_clamp(case):
    ttir = _compile(case).asm["ttir"]
    dropping = sorted(set(re.findall(r"arith\.(?:maxnumf|minnumf)", ttir)))
    assert not dropping, f"{case[0]}: NaN-dropping {dropping} (tl.max / tl.maximum default)"
    assert "arith.maximumf" in ttir and "arith.minimumf" in ttir, case[0]


@pytest.mark.parametrize("case", list(_gemm_cases(False)) + list(_grouped_cases(False)),
                         ids=lambda c: c[0])
def test_gemms_compile_for_hopper_with_int64_offsets(case):
    compiled = _compile(case)
    _assert_compiled(compiled, case[0])
    _check_int64_offsets(compiled, case[0])
    assert "wgmma" in compiled.asm["ptx"], f"{case[0]}: no Hopper wgmma in the PTX"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_gemm_cases(True))[1:] + list(_grouped_cases(True))[1:],
                         ids=lambda c: c[0])
def test_every_autotune_config_compiles_for_hopper(case):
    compiled = _compile(case)
    _assert_compiled(compiled, case[0])
    _check_int64_offsets(compiled, case[0])
    # Hopper has 227 KiB of shared memory per block: a config over it cannot launch.
    assert compiled.metadata.shared <= 227 * 1024, (case[0], compiled.metadata.shared)


def test_int32_product_check_sees_an_index_times_a_stride():
    """The int64 check flags 32-bit index x stride products (stride as an argument,
    splatted, or times a block size) and accepts program id x block size and int64."""
    ttir = ("tt.func public @k(%x_ptr: !tt.ptr<f32>, %stride: i32, %M: i32) {\n"
            "%c64_i32 = arith.constant 64 : i32\n"
            "%0 = arith.muli %pid, %c64_i32 : i32\n"
            "%1 = tt.splat %stride : i32 -> tensor<64x1xi32>\n"
            "%5 = arith.muli %rows, %1 : tensor<64x1xi32>\n"
            "%6 = arith.muli %rows64, %stride64 : tensor<64x1xi64>\n"
            "%7 = arith.muli %c64_i32, %stride : i32\n"
            "%8 = arith.muli %k, %n : i32\n")
    assert int32_index_stride_products(ttir) == [
        "%5 = arith.muli %rows, %1 : tensor<64x1xi32>", "%7 = arith.muli %c64_i32, %stride : i32",
        "%8 = arith.muli %k, %n : i32"]
