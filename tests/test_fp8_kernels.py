"""The Triton kernels against the reference: interpreted on CPU, compiled on CUDA.

Interpreted (every CPU run). Triton reads ``TRITON_INTERPRET`` when it builds the
kernels, at import, so the interpreted kernels run in a child process: this file,
executed as a script under ``TRITON_INTERPRET=1``, loads the inputs the parent saved,
runs the kernels and saves their outputs. The parent compares them with the reference;
its own Triton (if imported at all) is left compiled, so the rest of the suite is
unaffected. Known faults of the triton 3.7 interpreter, and how these tests live with
them:

- its fp32 -> fp8 cast truncates subnormals, rounds ties away from even, and drops the
  carry when rounding crosses into the next power of 2. The quantizer tests compare
  scales exactly and E4M3 values exactly on every element outside those three classes
  (the classes are counted and must stay a small minority);
- bf16 ``tl.dot`` is wrong: our GEMM only dots E4M3 operands, which the interpreter
  computes exactly (via fp16). GEMM operands are quantized by the reference, and
  outputs are fp32 so no interpreted downcast is involved: tolerance 1e-5 relative to
  the float64 product of the dequantized operands, the fp32 accumulation error;
- autotune and do_bench do not run: ``kernels.py`` uses one fixed tile when interpreting.

Compiled (``@pytest.mark.gpu``, skipped without CUDA): the same comparisons on an sm_89+
GPU, where the cast rounds correctly, so quantization must match bit for bit. The GEMM
does not match the float64 product to 1e-5 there: inside each 128-wide ``tl.dot`` the FP8
tensor cores keep only about 14 bits ([V3] §3.3.2), so FP32-output results are held to
:func:`~dsv3lite.fp8.accumulation.promoted_gemm_tolerance`, the bound that the emulation
of that accumulator sets (tests/test_fp8_accumulation.py).
"""

import sys
from pathlib import Path

import pytest
import torch

from dsv3lite.fp8 import FP8Linear, use_triton
from dsv3lite.fp8.accumulation import promoted_gemm_tolerance
from dsv3lite.fp8.e4m3 import rounding_edge_cases
from dsv3lite.fp8.reference import (act_quant_ref, dequantize_tiles, fp8_gemm_ref,
                                    weight_dequant_ref, weight_quant_ref)
from interpret import interpreted_outputs

ROOT = Path(__file__).resolve().parents[1]
QUANT_CASES = [(kind, fmt) for kind in ("1x128", "128x1", "128x128") for fmt in (None, "ue8m0")]
GEMM_CASES = [(M, N, K, b_tiles) for M, N, K in [(100, 200, 300), (128, 256, 384), (1, 576, 128)]
              for b_tiles in ("128x128", "1x128")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _wide_range(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Normal values whose 128x128 blocks span 10^-3 .. 10^3 in magnitude (so every
    1x128, 128x1 or 128x128 tile holds values of one magnitude)."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (6 * torch.rand(-(-rows // 128), -(-cols // 128), generator=g) - 3)
    scale = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return torch.randn(rows, cols, generator=g) * scale


def _with_specials(x: torch.Tensor) -> torch.Tensor:
    """x with NaN, +Inf and -Inf in a few tiles: alone, together, and a whole NaN row."""
    x = x.clone()
    nan, inf = float("nan"), float("inf")
    x[0, 3] = nan  # a NaN among finite values
    x[1, 130] = inf  # +Inf alone
    x[2, 5] = -inf  # -Inf alone
    x[3, 7], x[3, 9] = inf, nan  # NaN and Inf: NaN wins
    x[4, 131], x[4, 133] = inf, -inf  # both infinities
    x[130, :] = nan  # every element NaN (whole 1x128 tiles, one row of 128x1 / 128x128)
    return x


SPECIAL_NAMES = ("special", "special_bf16", "special_w")


def _make_inputs() -> dict:
    """Inputs of every case, in fp32 and (for activations) bf16, and reference operands."""
    inputs = {"x": _wide_range(300, 200, seed=1), "x_bf16": _wide_range(130, 384, 2).bfloat16(),
              "w": _wide_range(300, 260, seed=3)}
    inputs["special"] = _with_specials(_wide_range(136, 260, seed=8))
    inputs["special_bf16"] = _with_specials(_wide_range(136, 260, seed=9)).bfloat16()
    inputs["special_w"] = _with_specials(_wide_range(136, 260, seed=10))
    w_q, w_s = weight_quant_ref(inputs["w"])
    inputs["w_q"], inputs["w_s"] = w_q.view(torch.uint8), w_s
    for M, N, K, b_tiles in GEMM_CASES:
        g = torch.Generator().manual_seed(M * N * K)
        a_q, a_s = act_quant_ref(torch.randn(M, K, generator=g))
        b = torch.randn(N, K, generator=g)
        b_q, b_s = weight_quant_ref(b) if b_tiles == "128x128" else act_quant_ref(b)
        operands = (a_q.view(torch.uint8), a_s, b_q.view(torch.uint8), b_s)
        inputs[("gemm", M, N, K, b_tiles)] = operands
    return inputs


def _quantize(kind: str, fmt, x: torch.Tensor, kernels=None):
    """Quantize x with the reference or, given the kernels module, with Triton."""
    if kind == "128x128":
        return (kernels.weight_quant_triton if kernels else weight_quant_ref)(x, fmt)
    quant = kernels.act_quant_triton if kernels else act_quant_ref
    return quant(x, fmt, kind == "128x1")


def _run_kernels(inputs: dict) -> dict:
    """The child's job: every kernel on every case (run under TRITON_INTERPRET=1)."""
    from dsv3lite.fp8 import kernels

    assert kernels.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    fp8 = torch.float8_e4m3fn
    out = {}
    for kind, fmt in QUANT_CASES:
        names = ["w", "special_w"] if kind == "128x128" else ["x", "x_bf16", "special",
                                                              "special_bf16"]
        for name in names:
            q, s = _quantize(kind, fmt, inputs[name], kernels)
            out[(kind, fmt, name)] = (q.view(torch.uint8), s)
    out["dequant"] = kernels.weight_dequant_triton(inputs["w_q"].view(fp8), inputs["w_s"],
                                                   torch.float32)
    for M, N, K, b_tiles in GEMM_CASES:
        a_q, a_s, b_q, b_s = inputs[("gemm", M, N, K, b_tiles)]
        out[("gemm", M, N, K, b_tiles)] = kernels.fp8_gemm_triton(
            a_q.view(fp8), a_s, b_q.view(fp8), b_s, torch.float32)
        k_major = a_s.t().contiguous().t()  # the layout act_quant_triton writes
        out[("gemm k-major", M, N, K, b_tiles)] = kernels.fp8_gemm_triton(
            a_q.view(fp8), k_major, b_q.view(fp8), b_s, torch.float32)
    for fmt in (None, "ue8m0"):
        for name in ("x", "x_bf16", "special", "special_bf16"):
            q, s, qt, st = kernels.act_quant_both_triton(inputs[name], fmt)
            out[("both", fmt, name)] = (q.view(torch.uint8), s, qt.view(torch.uint8), st)
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(inputs, kernel outputs) from one interpreted child process."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("triton_interpret")
    inputs = _make_inputs()
    return inputs, interpreted_outputs(__file__, inputs, folder)


@pytest.mark.parametrize("kind,fmt", QUANT_CASES)
def test_interpreted_quantizers_match_the_reference(interpreted, kind, fmt):
    inputs, outputs = interpreted
    for name in (["w"] if kind == "128x128" else ["x", "x_bf16"]):
        q_ref, s_ref = _quantize(kind, fmt, inputs[name])
        q, s = outputs[(kind, fmt, name)]
        assert torch.equal(s, s_ref), f"{name}: scales differ"  # exact: div_rn, same bits
        tile = (128, 128) if kind == "128x128" else (1, 128)
        target = inputs[name].reshape(-1, inputs[name].shape[-1]).float()
        target = target.t() if kind == "128x1" else target
        scale = s_ref.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)
        scaled = target / scale[:target.shape[0], :target.shape[1]]
        faults = rounding_edge_cases(scaled, q_ref)
        differ = q.view(torch.float8_e4m3fn).float() != q_ref.float()
        assert not (differ & ~faults).any(), f"{name}: values differ outside the cast faults"
        assert faults.float().mean() < 0.15  # measured 4-11%: most elements checked exactly


E4M3_NAN_BITS = 0x7F  # e4m3fn has one NaN per sign: S.1111.111


def _assert_specials_like_the_reference(q, s, q_ref, s_ref, interpreted: bool, label: str):
    """Scales equal bit for bit, NaN where the reference's are; E4M3 bytes equal wherever
    the reference is not NaN (±0 keep their sign), and NaN where it is NaN.

    The sign of a NaN is not compared: PyTorch on x86 makes ∞/∞ a negative NaN, the GPU
    a positive one. Under the interpreter a NaN lands as S.1111.xxx instead (its fp32 ->
    fp8 cast knows no NaN and keeps the top mantissa bits of the fp32 NaN's payload), so
    only the exponent bits are checked there; compiled, the cast (``cvt.rn.satfinite``)
    writes 0x7F, which the GPU test requires."""
    both_nan = s.isnan() & s_ref.isnan()
    assert torch.equal(torch.where(both_nan, 0.0, s), torch.where(both_nan, 0.0, s_ref)), \
        f"{label}: scales differ (NaN where the reference is finite, or the reverse)"
    assert s_ref.isnan().any() and s_ref.isinf().any(), f"{label}: no special tile"
    ref_nan = (q_ref & 0x7F) == E4M3_NAN_BITS
    bits = 0x78 if interpreted else E4M3_NAN_BITS
    assert ((q[ref_nan] & bits) == bits).all(), f"{label}: a NaN did not stay NaN"
    assert not ((q[~ref_nan] & 0x7F) == E4M3_NAN_BITS).any(), f"{label}: NaN out of nothing"
    return ref_nan


@pytest.mark.parametrize("kind,fmt", QUANT_CASES)
def test_interpreted_quantizers_pass_nan_and_inf_as_the_reference_does(interpreted, kind, fmt):
    """A tile with a NaN: NaN scale, every value NaN. A tile with ±Inf (no NaN): +Inf
    scale, finite values ±0, the infinities NaN (∞/∞) - exactly as PyTorch computes it."""
    inputs, outputs = interpreted
    for name in (["special_w"] if kind == "128x128" else ["special", "special_bf16"]):
        q_ref, s_ref = _quantize(kind, fmt, inputs[name])
        q, s = outputs[(kind, fmt, name)]
        q_ref = q_ref.view(torch.uint8)
        ref_nan = _assert_specials_like_the_reference(q, s, q_ref, s_ref, True, name)
        # The tiles with a special value hold only NaN or ±0 (no interpreter cast fault
        # touches them): bytes equal. Ordinary tiles are checked by the test above.
        special = ref_nan | ((q_ref & 0x7F) == 0)
        assert torch.equal(q[special & ~ref_nan], q_ref[special & ~ref_nan]), name
    if kind != "128x128":
        for name in ("special", "special_bf16"):
            both = outputs[("both", fmt, name)]
            separate = outputs[(kind, fmt, name)]
            ours = both[:2] if kind == "1x128" else both[2:]
            for got, want in zip(ours, separate):
                assert torch.equal(got.nan_to_num(), want.nan_to_num()), name


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_interpreted_scales_are_k_major_and_both_tilings_in_one_pass_match(interpreted, fmt):
    """act_quant_both_triton reads x once and writes exactly what the two separate
    kernels write; every activation scale tensor comes K-major (stride 1 along tokens)."""
    inputs, outputs = interpreted
    for name in ("x", "x_bf16"):
        M, K = inputs[name].shape
        q, s = outputs[("1x128", fmt, name)]
        qt, st = outputs[("128x1", fmt, name)]
        both = outputs[("both", fmt, name)]
        assert s.stride() == (1, M) and st.stride() == (1, K), "scales must be K-major"
        assert both[1].stride() == (1, M) and both[3].stride() == (1, K)
        for ours, separate in zip(both, (q, s, qt, st)):
            assert ours.shape == separate.shape and torch.equal(ours, separate)


def test_interpreted_weight_dequant_matches_the_reference_exactly(interpreted):
    inputs, outputs = interpreted
    expected = weight_dequant_ref(inputs["w_q"].view(torch.float8_e4m3fn), inputs["w_s"],
                                  torch.float32)
    assert torch.equal(outputs["dequant"], expected)


@pytest.mark.parametrize("M,N,K,b_tiles", GEMM_CASES)
def test_interpreted_fp8_gemm_matches_the_float64_dequantized_product(interpreted, M, N, K,
                                                                      b_tiles):
    inputs, outputs = interpreted
    a_q, a_s, b_q, b_s = inputs[("gemm", M, N, K, b_tiles)]
    a_q, b_q = a_q.view(torch.float8_e4m3fn), b_q.view(torch.float8_e4m3fn)
    b_tile = (128, 128) if b_tiles == "128x128" else (1, 128)
    exact = (dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
             @ dequantize_tiles(b_q, b_s, b_tile, torch.float64).t())
    c = outputs[("gemm", M, N, K, b_tiles)]
    assert torch.equal(outputs[("gemm k-major", M, N, K, b_tiles)], c)  # layout-blind
    assert c.shape == (M, N)
    assert _rel(c, exact) <= 1e-5
    assert _rel(c, fp8_gemm_ref(a_q, a_s, b_q, b_s, torch.float32)) <= 1e-6  # same order


# ----------------------------------------------------------------- compiled, on CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("kind,fmt", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_quantizers_match_the_reference_bit_for_bit(kind, fmt, dtype, fp8_cuda):
    from dsv3lite.fp8 import kernels

    x = _wide_range(1000, 4200, seed=5).to(device=fp8_cuda, dtype=dtype)
    q, s = _quantize(kind, fmt, x, kernels)
    q_ref, s_ref = _quantize(kind, fmt, x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,fmt", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_quantizers_pass_nan_and_inf_as_the_reference_does(kind, fmt, dtype, fp8_cuda):
    """Compiled, NaN-dropping max/min would show here: bytes equal except NaN signs."""
    from dsv3lite.fp8 import kernels

    x = _with_specials(_wide_range(1000, 4200, seed=11)).to(device=fp8_cuda, dtype=dtype)
    q, s = _quantize(kind, fmt, x, kernels)
    q_ref, s_ref = _quantize(kind, fmt, x)
    q, q_ref = q.view(torch.uint8), q_ref.view(torch.uint8)
    ref_nan = _assert_specials_like_the_reference(q, s, q_ref, s_ref, False, str(dtype))
    assert torch.equal(q[~ref_nan], q_ref[~ref_nan])


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_compiled_weight_dequant_matches_the_reference(out_dtype, fp8_cuda):
    from dsv3lite.fp8 import kernels

    q, s = weight_quant_ref(_wide_range(1000, 4200, seed=6).to(fp8_cuda))
    assert torch.equal(kernels.weight_dequant_triton(q, s, out_dtype),
                       weight_dequant_ref(q, s, out_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(4096, 2112, 7168), (64, 7168, 2048), (1000, 576, 300)])
@pytest.mark.parametrize("b_tiles", ["128x128", "1x128"])
def test_compiled_fp8_gemm_matches_the_float64_dequantized_product(M, N, K, b_tiles, fp8_cuda):
    from dsv3lite.fp8 import kernels

    device = fp8_cuda
    a_q, a_s = act_quant_ref(torch.randn(M, K, device=device))
    b = torch.randn(N, K, device=device)
    b_q, b_s = weight_quant_ref(b) if b_tiles == "128x128" else act_quant_ref(b)
    b_tile = (128, 128) if b_tiles == "128x128" else (1, 128)
    exact = (dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
             @ dequantize_tiles(b_q, b_s, b_tile, torch.float64).t())
    fp32 = kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32)
    assert _rel(fp32, exact) <= promoted_gemm_tolerance()  # 14-bit sums inside each tl.dot
    bf16 = kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and _rel(bf16, exact) <= 4e-3  # bf16: 2^-9 steps


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_compiled_both_tilings_in_one_pass_match_the_reference_bit_for_bit(fmt, fp8_cuda):
    from dsv3lite.fp8 import kernels

    x = _wide_range(1000, 4200, seed=7).to(device=fp8_cuda, dtype=torch.bfloat16)
    ours = kernels.act_quant_both_triton(x, fmt)
    reference = (*act_quant_ref(x, fmt), *act_quant_ref(x, fmt, True))
    for got, want in zip(ours, reference):
        assert got.shape == want.shape
        assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                           want.view(torch.uint8) if want.element_size() == 1 else want)


@pytest.mark.gpu
def test_fp8_linear_on_cuda_matches_the_cpu_reference_path(fp8_cuda):
    device = fp8_cuda
    assert use_triton(torch.empty(1, device=device))
    cpu = FP8Linear(1024, 768, bias=False)
    gpu = FP8Linear(1024, 768, bias=False).to(device)
    gpu.load_state_dict(cpu.state_dict())
    x, dy = torch.randn(700, 1024), torch.randn(700, 768)
    results = []
    for module, dev in ((cpu, "cpu"), (gpu, device)):
        xd = x.to(dev).requires_grad_()
        y = module(xd)
        y.backward(dy.to(dev))
        results.append([t.detach().cpu() for t in (y, xd.grad, module.weight.grad)])
    for name, ours, reference in zip(("y", "dx", "dW"), results[1], results[0]):
        # the same quantization bit for bit; the sums differ by the tensor cores' 14 bits
        assert _rel(ours, reference) <= promoted_gemm_tolerance(), name


if __name__ == "__main__":  # the interpreted child process (see the module docstring)
    saved_inputs, outputs_path = torch.load(sys.argv[1]), sys.argv[2]
    torch.save(_run_kernels(saved_inputs), outputs_path)


def test_gemm_autotune_key_has_no_raw_token_count():
    """A Wgrad GEMM's K is the step's token count: keyed raw, MoE would re-tune constantly."""
    from dsv3lite.fp8 import kernels

    assert "K" not in kernels._GEMM_AUTOTUNE_KEY and "M" not in kernels._GEMM_AUTOTUNE_KEY
    assert {"M_BUCKET", "K_BUCKET"} <= set(kernels._GEMM_AUTOTUNE_KEY)
