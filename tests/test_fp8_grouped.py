"""The grouped FP8 GEMMs of the routed experts against per-expert references.

Reference path (every CPU run): :func:`~dsv3lite.fp8.segments.pad_segments`, the grouped
reference GEMMs and the grouped FP8 experts, forward and backward, must reproduce what
one :func:`~dsv3lite.fp8.linear.fp8_linear` per expert computes. 128-aligned segments
make every quantization tile the same as per expert, so the results agree to the bit
here; the assertions allow 1e-6 for BLAS libraries that sum a differently-shaped GEMM in
another order.

Interpreted (every CPU run): the Triton kernels run in a child process, this file as a
script under ``TRITON_INTERPRET=1`` (Triton reads it at import; see
``tests/test_fp8_kernels.py`` for the pattern and the interpreter's known faults). Their
operands are quantized by the reference, because the interpreter's fp32 -> fp8 cast is
not exact; E4M3 dots are, so fp32 outputs must match the float64 product of the
dequantized operands to 1e-5 (fp32 accumulation error).

Compiled (``@pytest.mark.gpu``, skipped without CUDA): the same checks on an sm_89+ GPU
within :func:`~dsv3lite.fp8.accumulation.promoted_gemm_tolerance` (14-bit sums inside
each FP8 ``tl.dot``, [V3] §3.3.2), and no host synchronisation in the experts' layer.
"""

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv3lite.fp8 import grouped, grouped_kernels
from dsv3lite.fp8.accumulation import promoted_gemm_tolerance
from dsv3lite.fp8.grouped import (grouped_fp8_experts, grouped_fp8_gemm, grouped_fp8_gemm_ref,
                                  grouped_fp8_linear, grouped_weight_quant, grouped_wgrad,
                                  grouped_wgrad_ref, k_major, pad_segments, padded_rows, unpad)
from dsv3lite.fp8.linear import fp8_linear
from dsv3lite.fp8.reference import (act_quant_ref, dequantize_tiles, fp8_gemm_ref,
                                    weight_quant_ref)
from interpret import interpreted_outputs

ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn
COUNTS = [130, 0, 128, 45]  # an empty expert, a whole tile, partial tiles
DIM, INTER = 200, 160  # neither a multiple of 128
SMALL = dict(counts=[70, 0, 128, 20], dim=72, inter=40)  # the interpreted experts


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small ops: on a busy machine, OpenMP's barriers would stall each one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _experts_data(counts: list[int], dim: int, inter: int, seed: int = 0,
                  device: str = "cpu") -> dict:
    """Tokens, expert weights (unit-gain init) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    E, N = len(counts), sum(counts)
    data = {"counts": torch.tensor(counts), "x": torch.randn(N, dim, generator=g),
            "w1": torch.randn(E, inter, dim, generator=g) * dim ** -0.5,
            "w3": torch.randn(E, inter, dim, generator=g) * dim ** -0.5,
            "w2": torch.randn(E, dim, inter, generator=g) * inter ** -0.5,
            "dy": torch.randn(N, dim, generator=g)}
    return {k: v.to(device) for k, v in data.items()}


def _loop_experts(x, counts, w1, w2, w3, linear=fp8_linear):
    """The reference: one SwiGLU expert at a time (GroupedExperts' loop)."""
    outs = []
    for e, chunk in enumerate(x.split(counts.tolist())):
        if len(chunk):
            chunk = linear(F.silu(linear(chunk, w1[e])) * linear(chunk, w3[e]), w2[e])
        outs.append(chunk)
    return torch.cat(outs)


def _forward_backward(fn, data: dict, **kwargs) -> list[torch.Tensor]:
    """(y, dx, dw1, dw2, dw3) of ``fn(x, counts, w1, w2, w3)`` for the output gradient dy."""
    leaves = [data[k].clone().requires_grad_() for k in ("x", "w1", "w2", "w3")]
    x, w1, w2, w3 = leaves
    y = fn(x, data["counts"], w1, w2, w3, **kwargs)
    y.backward(data["dy"].to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


# ----------------------------------------------------------------- pad_segments
@pytest.mark.parametrize("counts,align", [(COUNTS, 128), ([0, 0, 5], 128), ([1, 300], 128),
                                          ([7, 0, 33, 16], 16)])
def test_pad_segments_round_trip_alignment_and_zero_padding(counts, align):
    x = torch.randn(sum(counts), 24, requires_grad=True)
    x_padded, ends, index = pad_segments(x, torch.tensor(counts), align)
    E, N = len(counts), sum(counts)
    bound = -(-(N + E * (align - 1)) // align) * align
    assert x_padded.shape == (bound, 24) == (padded_rows(N, E, align), 24)
    sizes = [-(-c // align) * align for c in counts]
    expected_ends = torch.tensor(sizes).cumsum(0)
    assert torch.equal(ends, expected_ends) and ends.dtype == torch.int64
    assert torch.equal(x_padded[index], x) and torch.equal(unpad(x_padded, index), x)
    starts, first = [0] + expected_ends[:-1].tolist(), 0
    for e, count in enumerate(counts):  # expert e's rows, in order, from its aligned start
        assert starts[e] % align == 0
        assert index[first:first + count].tolist() == list(range(starts[e], starts[e] + count))
        first += count
    padding = torch.ones(bound, dtype=torch.bool)
    padding[index] = False
    assert int(padding.sum()) == bound - N and not x_padded[padding].any()
    r = torch.randn(bound, 24)
    (x_padded * r).sum().backward()  # the gradient flows back to the original rows
    assert torch.equal(x.grad, r[index])


def test_pad_segments_shape_depends_only_on_rows_experts_and_align():
    x = torch.randn(300, 8)
    shapes, ends = set(), []
    for counts in ([300, 0, 0, 0], [75, 75, 75, 75], [1, 1, 1, 297], [0, 128, 128, 44]):
        x_padded, padded_ends, _ = pad_segments(x, torch.tensor(counts))
        shapes.add(tuple(x_padded.shape))
        ends.append(padded_ends.tolist())
    assert shapes == {(padded_rows(300, 4), 8)} == {(896, 8)}  # 300 + 4·127 -> 7 tiles
    assert len({tuple(e) for e in ends}) == 4  # while the segments do move


def test_pad_segments_of_zero_rows():
    x = torch.empty(0, 16)
    x_padded, ends, index = pad_segments(x, torch.zeros(3, dtype=torch.long))
    assert x_padded.shape == (384, 16) and not x_padded.any()
    assert index.shape == (0,) and ends.tolist() == [0, 0, 0]
    assert unpad(x_padded, index).shape == (0, 16)


# ----------------------------------------------------------------- references
def test_grouped_weight_quant_equals_per_expert_weight_quant():
    w = torch.randn(3, INTER, DIM) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    q, s = grouped_weight_quant(w)
    assert q.shape == w.shape and s.shape == (3, 2, 2)
    for e in range(3):
        q_e, s_e = weight_quant_ref(w[e])
        assert torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8))
        assert torch.equal(s[e], s_e)


@pytest.mark.parametrize("gemm", ["fprop", "dgrad"])
def test_grouped_gemm_ref_equals_the_per_expert_gemms_bitwise(gemm):
    data = _experts_data(COUNTS, DIM, INTER)
    w = data["w1"]  # (E, INTER, DIM)
    x = data["x"] if gemm == "fprop" else torch.randn(sum(COUNTS), INTER)
    x_padded, ends, index = pad_segments(x, data["counts"])
    a_q, a_s = act_quant_ref(x_padded)
    w_q, w_s = grouped_weight_quant(w)
    if gemm == "dgrad":  # W[e]^T as strided views, blocks transposed
        w_q, w_s = w_q.transpose(1, 2), w_s.transpose(1, 2)
    c = grouped_fp8_gemm_ref(a_q, a_s, w_q, w_s, ends, torch.float32)
    expected = torch.zeros_like(c)
    for e, (chunk, rows) in enumerate(zip(x.split(COUNTS), index.split(COUNTS))):
        if len(chunk):  # quantized alone, unpadded, exactly as fp8_linear does per expert
            b = w[e] if gemm == "fprop" else w[e].t().contiguous()
            expected[rows] = fp8_gemm_ref(*act_quant_ref(chunk), *weight_quant_ref(b),
                                          torch.float32)
    assert torch.equal(c, expected)  # padding rows and rows past the last end: zero
    assert torch.equal(grouped_fp8_gemm(a_q, k_major(a_s), w_q, w_s, ends, torch.float32), c)
    assert c.abs().sum() > 0


def test_grouped_wgrad_ref_equals_the_per_expert_wgrad():
    data = _experts_data(COUNTS, DIM, INTER)
    x, dy = data["x"], torch.randn(sum(COUNTS), INTER)
    x_padded, ends, _ = pad_segments(x, data["counts"])
    dy_padded, _, _ = pad_segments(dy, data["counts"])
    dw = grouped_wgrad_ref(*act_quant_ref(dy_padded, transpose=True),
                           *act_quant_ref(x_padded, transpose=True), ends)
    assert dw.shape == (4, INTER, DIM) and dw.dtype == torch.float32
    for e, (x_e, dy_e) in enumerate(zip(x.split(COUNTS), dy.split(COUNTS))):
        if not len(x_e):
            assert not dw[e].any()  # no tokens, no gradient
            continue
        expected = fp8_gemm_ref(*act_quant_ref(dy_e, transpose=True),
                                *act_quant_ref(x_e, transpose=True), torch.float32)
        assert _rel(dw[e], expected) <= 1e-6, e  # bitwise here; the sum order may vary
    assert torch.equal(grouped_wgrad(*act_quant_ref(dy_padded, transpose=True),
                                     *act_quant_ref(x_padded, transpose=True), ends), dw)


def test_grouped_fp8_experts_match_per_expert_fp8_linear_forward_and_backward():
    data = _experts_data(COUNTS, DIM, INTER)
    ours = _forward_backward(grouped_fp8_experts, data)
    reference = _forward_backward(_loop_experts, data)
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), ours, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel(a, b) <= 1e-6, name  # measured: identical bits
    assert not ours[2][1].any() and not ours[3][1].any()  # the empty expert: no gradient
    exact = _forward_backward(_loop_experts, data, linear=F.linear)  # FP8 is FP8 though
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), ours, exact):
        assert 1e-3 < _rel(a, b) < 8e-2, name


def test_grouped_fp8_experts_under_bf16_autocast_match_the_loop():
    data = _experts_data(COUNTS, DIM, INTER, seed=1)
    results = []
    for fn in (grouped_fp8_experts, _loop_experts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_forward_backward(fn, data))
    (y, dx, *dws), reference = results
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert all(dw.dtype == torch.float32 for dw in dws)
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), results[0], reference):
        assert _rel(a, b) <= 1e-6, name


def test_grouped_fp8_linear_inference_equals_the_training_forward():
    data = _experts_data(COUNTS, DIM, INTER)
    x_padded, ends, index = pad_segments(data["x"], data["counts"])
    with torch.no_grad():
        y_inference = grouped_fp8_linear(x_padded, data["w1"], ends)
    y_train = grouped_fp8_linear(x_padded, data["w1"].clone().requires_grad_(), ends)
    assert y_train.requires_grad and torch.equal(y_inference, y_train.detach())
    loop = [fp8_linear(chunk, data["w1"][e]) for e, chunk in
            enumerate(data["x"].split(COUNTS)) if len(chunk)]
    assert _rel(unpad(y_inference, index), torch.cat(loop)) <= 1e-6


def _bad_calls():
    x, counts = torch.randn(10, 8), torch.tensor([4, 6])
    a, a_s = act_quant_ref(torch.randn(256, 8))
    b, b_s = grouped_weight_quant(torch.randn(2, 16, 8))
    ends = torch.tensor([128, 256])
    dyt, dyt_s = act_quant_ref(torch.randn(256, 16), transpose=True)
    xt, xt_s = act_quant_ref(torch.randn(128, 8), transpose=True)
    w, w2 = torch.randn(2, 16, 8), torch.randn(2, 8, 15)
    return [
        ("x has shape (10, 8, 1)", lambda: pad_segments(x[..., None], counts)),
        ("counts is a torch.float32", lambda: pad_segments(x, counts.float())),
        ("counts=[4, 5]", lambda: pad_segments(x, torch.tensor([4, 5]))),
        ("align=0", lambda: pad_segments(x, counts, 0)),
        ("a has dtype torch.float32", lambda: grouped_fp8_gemm(a.float(), a_s, b, b_s, ends)),
        ("b has dtype", lambda: grouped_fp8_gemm(a, a_s, b[0], b_s, ends)),
        ("a_s has shape (256, 2)", lambda: grouped_fp8_gemm(a, a_s.repeat(1, 2), b, b_s, ends)),
        ("b_s.dtype=torch.float64", lambda: grouped_fp8_gemm(a, a_s, b, b_s.double(), ends)),
        ("ends is a torch.int64 tensor of shape (3,)",
         lambda: grouped_fp8_gemm(a, a_s, b, b_s, torch.tensor([128, 256, 256]))),
        ("ends=[100, 256]", lambda: grouped_fp8_gemm_ref(a, a_s, b, b_s, torch.tensor([100, 256]))),
        ("x_t has shape (8, 128)", lambda: grouped_wgrad(dyt, dyt_s, xt, xt_s, ends)),
        ("w has shape (2, 16, 8)", lambda: grouped_fp8_linear(torch.randn(256, 9), w, ends)),
        ("w2 has shape (2, 8, 15)", lambda: grouped_fp8_experts(x, counts, w, w2, w)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_value_errors_naming_them(case):
    message, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_autotune_keys_bucket_the_token_counts():
    """The padded token count changes every step: keyed raw, each kernel would re-tune."""
    for key, bucket in ((grouped_kernels._GROUPED_GEMM_KEY, "M_BUCKET"),
                        (grouped_kernels._GROUPED_WGRAD_KEY, "T_BUCKET")):
        assert bucket in key and not {"M", "T"} & set(key)
    assert [grouped_kernels._bucket(n) for n in (0, 1, 300, 512, 513, 10 ** 7)] == \
        [1, 1, 512, 512, 1024, grouped_kernels.BUCKET_CAP]
    pytest.importorskip("triton")
    from dsv3lite.fp8.kernels import INTERPRET

    if INTERPRET:
        pytest.skip("no autotuning under TRITON_INTERPRET")
    kernels = grouped_kernels._triton_kernels()
    assert kernels.gemm.keys == grouped_kernels._GROUPED_GEMM_KEY
    assert kernels.wgrad.keys == grouped_kernels._GROUPED_WGRAD_KEY


# ----------------------------------------------------------------- interpreted kernels
def _operands(inputs: dict) -> dict:
    """Reference-quantized operands of the three GEMMs (the same bits in both processes).

    Fprop: x_padded (1x128, K-major scales) by W (blocks). Dgrad: dy_padded by W^T as a
    strided view. Wgrad: dy^T and x^T in 128x1 tiles, dy^T's scales K-major.
    """
    counts = inputs["counts"]
    x_padded, ends, index = pad_segments(inputs["x"], counts)
    dy_padded, _, _ = pad_segments(inputs["dy"], counts)
    a_q, a_s = act_quant_ref(x_padded)
    w_q, w_s = grouped_weight_quant(inputs["w"])
    d_q, d_s = act_quant_ref(dy_padded)
    dyt_q, dyt_s = act_quant_ref(dy_padded, transpose=True)
    xt_q, xt_s = act_quant_ref(x_padded, transpose=True)
    a_s, d_s, dyt_s = k_major(a_s), k_major(d_s), k_major(dyt_s)
    assert a_s.stride() == (1, a_s.shape[0])  # K-major: one K block's scales adjacent
    return {"ends": ends, "index": index,
            "fprop": (a_q, a_s, w_q, w_s),
            "dgrad": (d_q, d_s, w_q.transpose(1, 2), w_s.transpose(1, 2)),
            "wgrad": (dyt_q, dyt_s, xt_q, xt_s)}


def _make_inputs() -> dict:
    g = torch.Generator().manual_seed(7)
    n = sum(COUNTS)
    return {"counts": torch.tensor(COUNTS), "x": torch.randn(n, DIM, generator=g),
            "dy": torch.randn(n, INTER, generator=g),
            "w": torch.randn(len(COUNTS), INTER, DIM, generator=g),
            "experts": _experts_data(**SMALL, seed=8)}


def _run_kernels(inputs: dict) -> dict:
    """The child's job (under TRITON_INTERPRET=1): every grouped kernel, fp32 outputs."""
    from dsv3lite.fp8 import kernels

    assert kernels.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    ops = _operands(inputs)
    out = {gemm: grouped.grouped_fp8_gemm_triton(*ops[gemm], ops["ends"], torch.float32)
           for gemm in ("fprop", "dgrad")}
    out["wgrad"] = grouped.grouped_wgrad_triton(*ops["wgrad"], ops["ends"])
    grouped._force_triton = True  # the experts' layer on the kernels, quantizers reference
    calls = {"gemm": 0, "wgrad": 0}  # what the dispatch sent to the kernels
    for name, kind in (("grouped_fp8_gemm_triton", "gemm"), ("grouped_wgrad_triton", "wgrad")):
        def counted(*args, _kernel=getattr(grouped, name), _kind=kind, **kwargs):
            calls[_kind] += 1
            return _kernel(*args, **kwargs)
        setattr(grouped, name, counted)
    out["experts"] = _forward_backward(grouped_fp8_experts, inputs["experts"])
    out["kernel_calls"] = calls
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(inputs, kernel outputs) from one interpreted child process."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("triton_interpret_grouped")
    inputs = _make_inputs()
    return inputs, interpreted_outputs(__file__, inputs, folder, threads=1)


def _exact_grouped_gemm(a_q, a_s, b_q, b_s, ends) -> torch.Tensor:
    """float64 product of the dequantized operands, expert by expert."""
    c = torch.zeros(a_q.shape[0], b_q.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(ends.tolist()):
        a = dequantize_tiles(a_q[start:end], a_s[start:end], (1, 128), torch.float64)
        c[start:end] = a @ dequantize_tiles(b_q[e], b_s[e], (128, 128), torch.float64).t()
        start = end
    return c


@pytest.mark.parametrize("gemm", ["fprop", "dgrad"])
def test_interpreted_grouped_gemm_matches_the_float64_product(interpreted, gemm):
    inputs, outputs = interpreted
    ops = _operands(inputs)
    c, ends = outputs[gemm], ops["ends"]
    exact = _exact_grouped_gemm(*ops[gemm], ends)
    assert c.shape == exact.shape and c.dtype == torch.float32
    assert _rel(c, exact) <= 1e-5
    assert _rel(c, grouped_fp8_gemm_ref(*ops[gemm], ends, torch.float32)) <= 1e-6
    assert not c[int(ends[-1]):].any()  # rows past the last segment: zero
    padding = torch.ones(c.shape[0], dtype=torch.bool)
    padding[ops["index"]] = False
    assert not c[padding].any()  # zero rows in, zero rows out


def test_interpreted_grouped_wgrad_matches_the_float64_product(interpreted):
    inputs, outputs = interpreted
    ops = _operands(inputs)
    dyt_q, dyt_s, xt_q, xt_s = ops["wgrad"]
    dw, start = outputs["wgrad"], 0
    assert dw.shape == (len(COUNTS), INTER, DIM) and dw.dtype == torch.float32
    for e, end in enumerate(ops["ends"].tolist()):
        if end == start:
            assert not dw[e].any(), e  # the expert without tokens
            continue
        tiles = slice(start // 128, end // 128)
        dy_e = dequantize_tiles(dyt_q[:, start:end], dyt_s[:, tiles], (1, 128), torch.float64)
        x_e = dequantize_tiles(xt_q[:, start:end], xt_s[:, tiles], (1, 128), torch.float64)
        assert _rel(dw[e], dy_e @ x_e.t()) <= 1e-5, e
        start = end
    assert _rel(dw, grouped_wgrad_ref(*ops["wgrad"], ops["ends"])) <= 1e-6


def test_interpreted_experts_layer_matches_the_reference_path(interpreted):
    """Forward and backward of the experts with every GEMM in the interpreted kernels."""
    inputs, outputs = interpreted
    # _force_triton reached the dispatch: Fprop and Dgrad of w1, w3, w2 and their Wgrads
    assert outputs["kernel_calls"] == {"gemm": 6, "wgrad": 3}
    reference = _forward_backward(grouped_fp8_experts, inputs["experts"])
    for name, ours, ref in zip(("y", "dx", "dw1", "dw2", "dw3"), outputs["experts"],
                               reference):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype, name
        assert _rel(ours, ref) <= 1e-5, name  # measured ~2e-8: fp32 sums in another order


# ----------------------------------------------------------------- compiled, on CUDA
def _gpu_operands(device: torch.device) -> tuple[dict, list[int]]:
    counts = [700, 0, 1, 128, 2000, 333, 0, 900]
    data = {"counts": torch.tensor(counts, device=device),
            "x": torch.randn(sum(counts), 1536, device=device),
            "dy": torch.randn(sum(counts), 1000, device=device),
            "w": torch.randn(len(counts), 1000, 1536, device=device)}
    return _operands(data), counts


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["fprop", "dgrad"])
def test_compiled_grouped_gemm_matches_the_float64_product(gemm, fp8_cuda):
    ops, _ = _gpu_operands(fp8_cuda)
    ends = ops["ends"]
    exact = _exact_grouped_gemm(*(t.cpu() for t in ops[gemm]), ends.cpu())
    fp32 = grouped.grouped_fp8_gemm_triton(*ops[gemm], ends, torch.float32).cpu()
    assert _rel(fp32, exact) <= promoted_gemm_tolerance()  # 14-bit sums inside each tl.dot
    assert not fp32[int(ends[-1]):].any()
    bf16 = grouped_fp8_gemm(*ops[gemm], ends, torch.bfloat16)  # the dispatch picks Triton
    assert bf16.dtype == torch.bfloat16 and _rel(bf16.cpu(), exact) <= 4e-3


@pytest.mark.gpu
def test_compiled_grouped_wgrad_matches_the_float64_product(fp8_cuda):
    ops, counts = _gpu_operands(fp8_cuda)
    ends = ops["ends"]
    dw = grouped_wgrad(*ops["wgrad"], ends).cpu()
    cpu = [t.cpu() for t in ops["wgrad"]]
    start = 0
    for e, end in enumerate(ends.tolist()):
        if counts[e] == 0:
            assert not dw[e].any(), e
        else:
            tiles = slice(start // 128, end // 128)
            dy_e = dequantize_tiles(cpu[0][:, start:end], cpu[1][:, tiles], (1, 128),
                                    torch.float64)
            x_e = dequantize_tiles(cpu[2][:, start:end], cpu[3][:, tiles], (1, 128),
                                   torch.float64)
            assert _rel(dw[e], dy_e @ x_e.t()) <= promoted_gemm_tolerance(), e
        start = end


@pytest.mark.gpu
def test_grouped_fp8_experts_on_cuda_match_the_cpu_reference_path(fp8_cuda):
    device = fp8_cuda
    data = _experts_data([300, 0, 1000, 129, 57, 700], 1024, 384, seed=3)
    cpu = _forward_backward(grouped_fp8_experts, data)
    gpu = _forward_backward(grouped_fp8_experts, {k: v.to(device) for k, v in data.items()})
    for name, ours, reference in zip(("y", "dx", "dw1", "dw2", "dw3"), gpu, cpu):
        # The GEMMs differ by the tensor cores' 14-bit sums (<= 4.9e-4); requantizing the
        # slightly different hidden activation h for w2 flips a few E4M3 roundings,
        # each worth one E4M3 step (up to 6%): about sqrt(1e-4 · 0.06) ≈ 3e-3 overall.
        assert _rel(ours.cpu(), reference) <= 2e-2, name


@pytest.mark.gpu
def test_grouped_fp8_experts_on_cuda_never_synchronize_with_the_host(fp8_cuda):
    device = fp8_cuda
    data = {k: v.to(device) for k, v in _experts_data([300, 0, 1000, 129], 512, 256).items()}
    _forward_backward(grouped_fp8_experts, data)  # autotuning benchmarks (and syncs) once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _forward_backward(grouped_fp8_experts, data)
    finally:
        torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":  # the interpreted child process (see the module docstring)
    saved_inputs, outputs_path = torch.load(sys.argv[1]), sys.argv[2]
    torch.save(_run_kernels(saved_inputs), outputs_path)
