"""Benchmark dsv3lite's FP8 kernels on one GPU: correctness first, then speed against peers.

Run from the repository root on a CUDA machine with FP8 tensor cores (sm_89+, e.g. H100):

    python benchmarks/fp8.py                      # everything
    python benchmarks/fp8.py --only K1 --out-dir $OUT   # one goal's part (K5 K1 K2 K3 K4 K6)
    TRITON_INTERPRET=1 python benchmarks/fp8.py --only K1 --smoke --out-dir /tmp/x   # CPU

It (1) checks the compiled Triton kernels against the plain-PyTorch reference on the GPU
(bit-exact quantization, an FP32-output GEMM within
``dsv3lite.fp8.accumulation.promoted_gemm_tolerance()`` of the float64 product of the
dequantized operands: the bound that Hopper's ~14-bit accumulation inside each 128-wide
block allows, derived from its emulation); (2) times, with ``triton.testing.do_bench``
medians on random data (never zeros; do_bench clears the L2 cache before every run):

- act_quant (1x128 and 128x1), weight_quant (128x128) and weight_dequant in GB/s against
  a same-run device-to-device copy (performance goal K5: >= 0.85x);
- fp8_gemm at M=N=K=4096 and 8192 (K1) and at DeepSeek-V3's shapes (the DeepGEMM README's
  table, K2), each as two rows, the teaching kernel (``kernels.fp8_gemm_triton``) and the
  Hopper kernel (``hopper_gemm.fp8_gemm_hopper``: TMA, persistent grid), against
  ``torch.nn.functional.scaled_mm`` blockwise (if present and verified against the
  reference before it is timed) and bf16 matmul, and the Wgrad GEMM (both operands 1x128
  along tokens, K3);
- two more peers at M=N=K=8192: ``torch._scaled_mm`` with rowwise scales (one scale per
  row of a and of b: a coarser recipe, the speed of torch's own FP8 GEMM) and a
  blockwise scaled mm written in PyTorch (dequantize, bf16 matmul) compiled with
  ``torch.compile(mode="max-autotune")``;
- the grouped FP8 GEMM of the MoE experts (``dsv3lite.fp8.grouped``, 128-aligned
  segments) against bf16 ``torch._grouped_mm`` on the same segments (goal K4);
- the one-pass 1x128 + 128x1 quantization (``act_quant_both``) against the two passes;
- FP8Linear forward+backward with each GEMM backend ("triton", "hopper", "scaled_mm")
  against a bf16 nn.Linear (goal K6).

It prints a table and writes ``benchmarks/results/fp8-<gpu>-<yyyymmdd>.json`` (rewritten
after each part, so a run cut off keeps what it measured) with the device name,
torch/triton versions and every raw number; ``--only G`` runs goal G's part alone and
writes ``fp8-<gpu>-<yyyymmdd>-G.json`` as soon as it is done; ``--out-dir`` moves them.
It exits 1 if a correctness check failed (the timings are still written, flagged).
Without CUDA it says so and exits 0 without writing anything, unless ``--smoke``:
then it runs the same code on the CPU (tiny shapes, one timed repetition, no
autotuning: the caller sets ``TRITON_INTERPRET=1``) and writes the same JSON with
``"smoke": true``, so the GPU script is exercised on every change. It takes a few minutes (autotuning included); GEMM
shapes not started within 150 s are skipped and listed (``make gpu-check`` fits 8 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
               (7168, 2048)]  # DeepGEMM README: (N, K) of V3's projections
DEEPSEEK_M = [64, 128, 4096]
BUDGET_S = 150  # K2 shapes not started by then are skipped (and listed in the JSON)
GOALS = ("K5", "K1", "K2", "K3", "K4", "K6")
"""The parts, in the order they run: quantization, the GEMM (square, V3's shapes, Wgrad),
the grouped experts' GEMM, the Linear layer."""
SMOKE = False  # --smoke: CPU, tiny shapes, one timed repetition (set in main)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def median_ms(fn, grad_to_none=None) -> float:
    """do_bench's median on a GPU; in a smoke run, one call after one warm-up call."""
    if SMOKE:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                          return_mode="median"))


def size(n: int) -> int:
    """A benchmark dimension, cut to 256 at most in a smoke run."""
    return min(n, 256) if SMOKE else n


# ------------------------------------------------------------------- correctness
def check_quantizers(device: torch.device) -> dict:
    """Bit-exact quantization (K5's kernels) against the reference."""
    from dsv3lite.fp8 import kernels, reference as ref

    checks = {}
    x = torch.randn(size(4096), size(7168), device=device, dtype=torch.bfloat16) * 3
    for name, ours, theirs in [
        ("act_quant 1x128", lambda: kernels.act_quant_triton(x), lambda: ref.act_quant_ref(x)),
        ("act_quant 128x1", lambda: kernels.act_quant_triton(x, transpose=True),
         lambda: ref.act_quant_ref(x, transpose=True)),
        ("act_quant 1x128 ue8m0", lambda: kernels.act_quant_triton(x, "ue8m0"),
         lambda: ref.act_quant_ref(x, "ue8m0")),
        ("weight_quant 128x128", lambda: kernels.weight_quant_triton(x.float()),
         lambda: ref.weight_quant_ref(x.float())),
    ]:
        (q, s), (q_ref, s_ref) = ours(), theirs()
        mismatches = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
        # the interpreter's fp8 cast has known faults (tests/test_fp8_kernels.py): a smoke
        # run checks the scales exactly and counts the values
        ok = bool(torch.equal(s, s_ref)) and (mismatches == 0 or SMOKE)
        checks[name] = dict(scales_equal=bool(torch.equal(s, s_ref)),
                            value_mismatches=mismatches, ok=ok)
    q, s = ref.weight_quant_ref(x.float())
    same = torch.equal(kernels.weight_dequant_triton(q, s, torch.float32),
                       ref.weight_dequant_ref(q, s, torch.float32))
    checks["weight_dequant"] = dict(ok=bool(same))
    return checks


def check_gemms(device: torch.device, cases) -> dict:
    """Both FP8 GEMM kernels against the float64 product of the dequantized operands:
    fp32 output within promoted_gemm_tolerance(), bf16 output within 4e-3."""
    from dsv3lite.fp8 import hopper_gemm, kernels, reference as ref
    from dsv3lite.fp8.accumulation import promoted_gemm_tolerance

    checks, tolerance = {}, promoted_gemm_tolerance()
    if SMOKE:  # one small case with partial tiles in every dimension
        cases = [(130, 192, 272, cases[0][3])]
    for M, N, K, b_tiles in cases:
        a_q, a_s = ref.act_quant_ref(torch.randn(M, K, device=device))
        b = torch.randn(N, K, device=device)
        b_q, b_s = ref.weight_quant_ref(b) if b_tiles == "128x128" else ref.act_quant_ref(b)
        tile = (128, 128) if b_tiles == "128x128" else (1, 128)
        exact = (ref.dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
                 @ ref.dequantize_tiles(b_q, b_s, tile, torch.float64).t())
        for name, gemm in (("triton", kernels.fp8_gemm_triton),
                           ("hopper", hopper_gemm.fp8_gemm_hopper)):
            e32 = rel(gemm(a_q, a_s, b_q, b_s, torch.float32), exact)
            e16 = rel(gemm(a_q, a_s, b_q, b_s, torch.bfloat16), exact)
            checks[f"fp8_gemm {name} {M}x{N}x{K} b {b_tiles}"] = dict(
                rel_err_fp32_out=e32, rel_err_bf16_out=e16, fp32_tolerance=tolerance,
                ok=e32 <= tolerance and e16 <= 4e-3)
    return checks


# --------------------------------------------------------- torch's blockwise peer
def scaled_mm_peer(a_q, a_s, b_q, b_s, b_tiles: str, exact: torch.Tensor):
    """A verified ``F.scaled_mm`` blockwise call for c = a @ b^T, or (None, reason).

    Scale layouts follow torch's checks (column-major scales; 128x128 scales padded to
    a multiple of 4 along K/128). Older releases gave silently wrong results for some
    layouts, so each candidate is checked against the float64 product before use.
    """
    import torch.nn.functional as F

    if not a_q.is_cuda:
        return None, "no CUDA (smoke run): cuBLASLt's blockwise GEMM needs a GPU"
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return None, "torch.nn.functional.scaled_mm is absent"
    blocks = F.ScalingType.BlockWise128x128
    recipe_b = blocks if b_tiles == "128x128" else F.ScalingType.BlockWise1x128
    scale_a = a_s.t().contiguous().t()  # (M, K/128), stride (1, M)
    nk = b_s.shape[1]
    padded = torch.zeros(b_s.shape[0], -(-nk // 4) * 4, device=b_s.device)
    padded[:, :nk] = b_s
    candidates = {"column-major": b_s.t().contiguous().t() if b_tiles == "1x128" else b_s.t(),
                  "padded-to-4": padded.t(), "row-major": b_s.t().contiguous()}
    reasons = []
    for layout, scale_b in candidates.items():
        def call(scale_b=scale_b):
            return F.scaled_mm(a_q, b_q.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b,
                               recipe_b, output_dtype=torch.bfloat16)
        try:
            error = rel(call(), exact)
        except Exception as exc:  # a rejected layout: try the next
            reasons.append(f"{layout}: {str(exc).splitlines()[0][:120]}")
            continue
        if error <= 4e-3:
            return call, layout
        reasons.append(f"{layout}: wrong result (rel err {error:.3g})")
    return None, "; ".join(reasons)


# ------------------------------------------------------------------------ timing
def bench_quant(device: torch.device) -> list[dict]:
    from dsv3lite.fp8 import kernels, reference as ref

    M, K = size(16384), size(8192)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(K, K, device=device)  # fp32 master weight
    w_q, w_s = kernels.weight_quant_triton(w)
    dst = torch.empty_like(x)
    copy_ms = median_ms(lambda: dst.copy_(x))
    copy_gbs = 2 * x.numel() * 2 / copy_ms / 1e6
    rows = [dict(op="device copy (bf16)", shape=[M, K], ms=copy_ms, gbs=copy_gbs)]
    scale_bytes = x.numel() // 128 * 4
    for op, fn, reference_fn, nbytes in [
        ("act_quant 1x128 (bf16 in)", lambda: kernels.act_quant_triton(x),
         lambda: ref.act_quant_ref(x), x.numel() * 3 + scale_bytes),
        ("act_quant 128x1 (bf16 in)", lambda: kernels.act_quant_triton(x, transpose=True),
         lambda: ref.act_quant_ref(x, transpose=True), x.numel() * 3 + scale_bytes),
        ("weight_quant 128x128 (fp32 in)", lambda: kernels.weight_quant_triton(w),
         lambda: ref.weight_quant_ref(w), w.numel() * 5 + w.numel() // 128 ** 2 * 4),
        ("weight_dequant (bf16 out)",
         lambda: kernels.weight_dequant_triton(w_q, w_s, torch.bfloat16),
         lambda: ref.weight_dequant_ref(w_q, w_s, torch.bfloat16), w.numel() * 3),
    ]:
        ms, eager_ms = median_ms(fn), median_ms(reference_fn)
        gbs = nbytes / ms / 1e6
        rows.append(dict(op=op, shape=[M, K] if "act" in op else [K, K], ms=ms, gbs=gbs,
                         vs_copy=gbs / copy_gbs, torch_eager_ms=eager_ms))
    return rows


def bench_gemm(device: torch.device, M: int, N: int, K: int, b_tiles: str = "128x128") -> dict:
    """Time c = a @ b^T (a: (M, K) 1x128; b: (N, K) 128x128 blocks or 1x128 tiles) with
    the teaching kernel, the Hopper kernel, torch's blockwise scaled_mm (verified first)
    and bf16 matmul."""
    from dsv3lite.fp8 import hopper_gemm, kernels, reference as ref

    M, N, K = size(M), size(N), size(K)
    a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    b = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    a_q, a_s = kernels.act_quant_triton(a)
    quant_b = kernels.weight_quant_triton if b_tiles == "128x128" else kernels.act_quant_triton
    b_q, b_s = quant_b(b)
    tile = (128, 128) if b_tiles == "128x128" else (1, 128)
    exact = (ref.dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
             @ ref.dequantize_tiles(b_q, b_s, tile, torch.float64).t())
    flops = 2 * M * N * K
    row = dict(M=M, N=N, K=K, b_tiles=b_tiles,
               rel_err=rel(kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.bfloat16), exact),
               hopper_rel_err=rel(hopper_gemm.fp8_gemm_hopper(a_q, a_s, b_q, b_s,
                                                              torch.bfloat16), exact))
    row["ok"] = row["rel_err"] <= 4e-3 and row["hopper_rel_err"] <= 4e-3
    peer, note = scaled_mm_peer(a_q, a_s, b_q, b_s, b_tiles, exact)
    del exact
    row["fp8_triton_ms"] = median_ms(lambda: kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s,
                                                                      torch.bfloat16))
    row["fp8_hopper_ms"] = median_ms(lambda: hopper_gemm.fp8_gemm_hopper(a_q, a_s, b_q, b_s,
                                                                         torch.bfloat16))
    row["bf16_matmul_ms"] = median_ms(lambda: a @ b.t())
    row["scaled_mm_layout_or_reason"] = note
    row["scaled_mm_ms"] = median_ms(peer) if peer else None
    for name in ("fp8_triton", "fp8_hopper", "bf16_matmul", "scaled_mm"):
        ms = row[f"{name}_ms"]
        row[f"{name}_tflops"] = flops / ms / 1e9 if ms else None
    return row


def bench_peers(device: torch.device, M: int = 8192) -> dict:
    """Rowwise ``torch._scaled_mm`` and a compiled PyTorch blockwise scaled mm, M=N=K."""
    from dsv3lite.fp8 import kernels, reference as ref

    N = K = M
    a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    b = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    flops = 2 * M * N * K
    row = dict(M=M, N=N, K=K)
    a_q, a_s = kernels.act_quant_triton(a)
    b_q, b_s = kernels.weight_quant_triton(b)
    exact = (ref.dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
             @ ref.dequantize_tiles(b_q, b_s, (128, 128), torch.float64).t())
    row["ours_ms"] = median_ms(lambda: kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s,
                                                                torch.bfloat16))
    # rowwise: one scale per row of a and per row of b (per output column)
    amax_a = a.float().abs().amax(1, keepdim=True).clamp(min=1e-4)
    amax_b = b.float().abs().amax(1, keepdim=True).clamp(min=1e-4)
    sa, sb = amax_a / 448, amax_b / 448
    ra = (a.float() / sa).to(torch.float8_e4m3fn)
    rb = (b.float() / sb).to(torch.float8_e4m3fn)
    try:
        def rowwise():
            return torch._scaled_mm(ra, rb.t(), scale_a=sa, scale_b=sb.t(),
                                    out_dtype=torch.bfloat16)
        row["rowwise_rel_err_vs_bf16_product"] = rel(rowwise(), a.float() @ b.float().t())
        row["rowwise_scaled_mm_ms"] = median_ms(rowwise)
    except Exception as exc:
        row["rowwise_scaled_mm_ms"], row["rowwise_error"] = None, str(exc).splitlines()[0]

    def blockwise(a_q, a_s, b_q, b_s):
        a_deq = (a_q.float().view(M, K // 128, 128) * a_s[..., None]).view(M, K)
        b_deq = (b_q.float().view(N // 128, 128, K // 128, 128)
                 * b_s[:, None, :, None]).view(N, K)
        return a_deq.bfloat16() @ b_deq.bfloat16().t()

    try:
        compiled = torch.compile(blockwise, mode="max-autotune")
        t0 = time.time()
        out = compiled(a_q, a_s, b_q, b_s)
        row["compiled_blockwise_compile_s"] = time.time() - t0
        row["compiled_blockwise_rel_err"] = rel(out, exact)
        row["compiled_blockwise_ms"] = median_ms(lambda: compiled(a_q, a_s, b_q, b_s))
    except Exception as exc:
        row["compiled_blockwise_ms"], row["compiled_error"] = None, str(exc).splitlines()[0]
    for name in ("ours", "rowwise_scaled_mm", "compiled_blockwise"):
        ms = row.get(f"{name}_ms")
        row[f"{name}_tflops"] = flops / ms / 1e9 if ms else None
    return row


def bench_grouped(device: torch.device, E: int, tokens: int, N: int, K: int) -> dict:
    """Grouped FP8 GEMM vs bf16 torch._grouped_mm: E experts, ``tokens`` rows each (a
    multiple of 128, so the segments need no padding), y_e = x_e W_e^T."""
    from dsv3lite.fp8 import grouped, kernels

    x = torch.randn(E * tokens, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=device, dtype=torch.bfloat16)
    ends = torch.arange(1, E + 1, device=device, dtype=torch.int32) * tokens
    x_q, x_s = kernels.act_quant_triton(x)
    w_q, w_s = grouped.grouped_weight_quant(w.float())
    ours = grouped.grouped_fp8_gemm_triton(x_q, x_s, w_q, w_s, ends.long(), torch.bfloat16)
    reference = grouped.grouped_fp8_gemm_ref(x_q, x_s, w_q, w_s, ends.long(), torch.float32)
    row = dict(E=E, tokens_per_expert=tokens, N=N, K=K, rel_err_vs_reference=rel(ours, reference))
    del reference
    row["fp8_grouped_ms"] = median_ms(lambda: grouped.grouped_fp8_gemm_triton(
        x_q, x_s, w_q, w_s, ends.long(), torch.bfloat16))
    wt = w.transpose(-2, -1)
    try:
        row["bf16_grouped_mm_ms"] = median_ms(lambda: torch._grouped_mm(x, wt, offs=ends))
    except RuntimeError as exc:  # the CPU build may lack a bf16 _grouped_mm (smoke)
        row["bf16_grouped_mm_ms"], row["bf16_error"] = None, str(exc).splitlines()[0][:200]
    flops = 2 * E * tokens * N * K
    row["fp8_grouped_tflops"] = flops / row["fp8_grouped_ms"] / 1e9
    bf16_ms = row["bf16_grouped_mm_ms"]
    row["bf16_grouped_mm_tflops"] = flops / bf16_ms / 1e9 if bf16_ms else None
    row["speedup"] = bf16_ms / row["fp8_grouped_ms"] if bf16_ms else None
    row["ok"] = row["rel_err_vs_reference"] <= 4e-3  # bf16 output against fp32
    # the one-pass quantization of both tilings against two passes, same input
    row["quant_both_ms"] = median_ms(lambda: kernels.act_quant_both_triton(x))
    row["quant_two_passes_ms"] = median_ms(lambda: (kernels.act_quant_triton(x),
                                                    kernels.act_quant_triton(x, transpose=True)))
    return row


def bench_linear(device: torch.device, M: int, K: int, N: int, backend: str) -> dict:
    """FP8Linear with ``backend`` (fp32 master weight, bf16 activations) vs bf16
    nn.Linear, forward + backward; its output checked against the "triton" backend's."""
    from dsv3lite.fp8 import FP8Linear

    M, K, N = size(M), size(K), size(N)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    bf16 = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    bf16_ms = median_ms(lambda: bf16(x).backward(dy), grad_to_none=[x, bf16.weight])
    row = dict(M=M, K=K, N=N, backend=backend, bf16_ms=bf16_ms,
               bf16_tflops=6 * M * K * N / bf16_ms / 1e9, fp8_ms=None, speedup=None)
    try:
        fp8 = FP8Linear(K, N, bias=False, device=device, backend=backend)
        with torch.no_grad():
            reference = FP8Linear(K, N, bias=False, device=device, backend="triton")
            reference.weight.copy_(fp8.weight)
            row["rel_err_vs_triton_backend"] = rel(fp8(x), reference(x))
    except (ValueError, RuntimeError) as exc:  # a backend this torch or GPU lacks
        row["error"] = str(exc).splitlines()[0][:200]
        return row
    row["ok"] = row["rel_err_vs_triton_backend"] <= 4e-3
    row["fp8_ms"] = median_ms(lambda: fp8(x).backward(dy), grad_to_none=[x, fp8.weight])
    row["speedup"] = bf16_ms / row["fp8_ms"]
    row["fp8_tflops"] = 6 * M * K * N / row["fp8_ms"] / 1e9
    return row


# ------------------------------------------------------------------------- parts
def run_part(goal: str, device: torch.device, start: float) -> dict:
    """One goal's measurements (and the correctness checks they rest on)."""
    if goal == "K5":
        return dict(correctness=check_quantizers(device), quant=bench_quant(device))
    if goal == "K1":
        checks = check_gemms(device, [(4096, 4096, 4096, "128x128"),
                                      (1000, 2112, 7168, "128x128"),
                                      (130, 576, 300, "128x128")])
        gemm = [bench_gemm(device, n, n, n) for n in ((4096,) if SMOKE else (4096, 8192))]
        peers = [] if SMOKE else [bench_peers(device)]
        return dict(correctness=checks, gemm=gemm, peers=peers)
    if goal == "K2":
        rows, skipped = [], []
        for shape in [(M, N, K) for M in DEEPSEEK_M for N, K in DEEPSEEK_NK]:
            if time.time() - start > BUDGET_S or (SMOKE and rows):
                skipped.append(list(shape))  # stay inside the device call's time
                continue
            rows.append(bench_gemm(device, *shape))
        return dict(gemm=rows, skipped_for_time=skipped)
    if goal == "K3":  # Wgrad: dW (N, K) = dy^T x over 16384 tokens, both 1x128 along tokens
        checks = check_gemms(device, [(4096, 4096, 4096, "1x128")])
        return dict(correctness=checks,
                    wgrad_gemm=[bench_gemm(device, 8192, 8192, 16384, "1x128")])
    if goal == "K4":  # V3's expert shapes (dim 7168, expert width 2048), ours (2048, 512)
        shapes = [(2, 128, 256, 256)] if SMOKE else [(8, 2048, 2048, 7168),
                                                       (32, 512, 512, 2048)]
        return dict(grouped=[bench_grouped(device, *shape) for shape in shapes])
    if goal == "K6":
        return dict(linear=[bench_linear(device, M, K, N, backend)
                            for M, K, N in [(16384, 8192, 8192), (16384, 2048, 2048)]
                            for backend in ("triton", "hopper", "scaled_mm")])
    raise ValueError(f"goal={goal!r} is invalid: must be one of {GOALS}")


def failures(part: dict) -> list[str]:
    """Names of the failed correctness checks of one part."""
    failed = [k for k, v in part.get("correctness", {}).items() if not v["ok"]]
    for key in ("gemm", "wgrad_gemm", "grouped", "linear"):
        failed += [f"{key} {i}" for i, r in enumerate(part.get(key, [])) if r.get("ok") is False]
    return failed


def main(argv=None) -> int:
    global SMOKE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=GOALS, help="run this goal's part alone")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shapes, one repetition (set TRITON_INTERPRET=1)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    SMOKE = args.smoke
    try:
        import triton
    except ImportError:
        print("benchmarks/fp8.py: Triton is not installed; nothing measured, nothing written.")
        return 0
    if SMOKE:
        device, name, capability = torch.device("cpu"), "cpu", [0, 0]
        from dsv3lite.fp8 import kernels
        if not kernels.INTERPRET:
            print("benchmarks/fp8.py --smoke: set TRITON_INTERPRET=1 (the kernels run on the "
                  "CPU through Triton's interpreter)")
            return 1
    else:
        if not torch.cuda.is_available():
            print("benchmarks/fp8.py: no CUDA GPU on this machine; nothing measured, nothing "
                  "written. Run it on a GPU with FP8 tensor cores (sm_89+), or use --smoke.")
            return 0
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        capability = list(torch.cuda.get_device_capability(device))
        if tuple(capability) < (8, 9):
            print(f"benchmarks/fp8.py: {name} (sm_{capability[0]}{capability[1]}) has no FP8 "
                  "tensor cores; nothing measured, nothing written.")
            return 0
    start = time.time()
    torch.manual_seed(0)
    results = dict(device=name, capability=capability, torch=torch.__version__,
                   triton=triton.__version__, cuda=torch.version.cuda,
                   date=datetime.date.today().isoformat(), smoke=SMOKE,
                   goals=[args.only] if args.only else list(GOALS))
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}"
          + (" (smoke run: CPU, Triton interpreter)" if SMOKE else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = f"fp8-{slug}-{datetime.date.today():%Y%m%d}"
    path = args.out_dir / (f"{stem}-{args.only}.json" if args.only else f"{stem}.json")
    failed = []
    for goal in results["goals"]:
        part = run_part(goal, device, start)
        failed += [f"{goal}: {f}" for f in failures(part)]
        for key, value in part.items():  # the JSON keys of the full run, one file
            if isinstance(value, dict):
                results.setdefault(key, {}).update(value)
            else:
                results.setdefault(key, []).extend(value)
        results["all_checks_passed"] = not failed
        results["seconds"] = time.time() - start
        path.write_text(json.dumps(results, indent=2))  # now: a cut-off run keeps it
        print(f"  {goal} done at {time.time() - start:.0f} s"
              + (f", FAILED: {failures(part)}" if failures(part) else ""))
    for k, v in results.get("correctness", {}).items():
        print(f"  check {k:44s} {'ok' if v['ok'] else 'FAILED'}  {v}")
    print_table(results)
    print(f"\n{time.time() - start:.0f} s. Wrote {path}")
    if results.get("skipped_for_time"):
        print(f"Skipped for time: {results['skipped_for_time']}")
    if failed:
        print(f"CORRECTNESS FAILED ({', '.join(failed)}): the timings above are of kernels "
              "that disagree with the reference.")
        return 1
    return 0


def print_table(results: dict) -> None:
    if "quant" in results:
        print("\nQuantization (GB/s = bytes read + written / time)")
        print(f"  {'op':34s} {'ms':>8s} {'GB/s':>8s} {'x copy':>7s} {'eager ms':>9s}")
    for r in results.get("quant", []):
        print(f"  {r['op']:34s} {r['ms']:8.3f} {r['gbs']:8.0f} {r.get('vs_copy', 1.0):7.2f} "
              f"{r.get('torch_eager_ms', float('nan')):9.3f}")
    print("\nGEMM c = a @ b^T, bf16 out (TFLOPS; ratios: hopper kernel / peer)")
    print(f"  {'M':>6s} {'N':>6s} {'K':>6s} {'b':>7s} {'triton':>7s} {'hopper':>7s} "
          f"{'scaled_mm':>9s} {'bf16':>7s} {'/smm':>6s} {'/bf16':>6s} {'rel err':>8s}")
    nan = float("nan")
    for r in results.get("gemm", []) + results.get("wgrad_gemm", []):
        smm, hop = r["scaled_mm_tflops"] or nan, r["fp8_hopper_tflops"] or nan
        print(f"  {r['M']:6d} {r['N']:6d} {r['K']:6d} {r['b_tiles']:>7s} "
              f"{r['fp8_triton_tflops']:7.0f} {hop:7.0f} {smm:9.0f} "
              f"{r['bf16_matmul_tflops']:7.0f} {hop / smm:6.2f} "
              f"{hop / r['bf16_matmul_tflops']:6.2f} {r['rel_err']:8.1e}")
    print("\nPeers at M=N=K (TFLOPS)")
    for r in results.get("peers", []):
        print(f"  {r['M']}: ours {r['ours_tflops'] or float('nan'):.0f}, rowwise _scaled_mm "
              f"{r['rowwise_scaled_mm_tflops'] or float('nan'):.0f}, compiled blockwise "
              f"{r['compiled_blockwise_tflops'] or float('nan'):.0f}")
    print("\nGrouped experts GEMM (K4: fp8 grouped vs bf16 torch._grouped_mm)")
    for r in results.get("grouped", []):
        print(f"  E={r['E']} x {r['tokens_per_expert']} tokens, N={r['N']} K={r['K']}: "
              f"fp8 {r['fp8_grouped_tflops']:.0f} TFLOPS, bf16 "
              f"{r['bf16_grouped_mm_tflops'] or float('nan'):.0f}, speedup "
              f"{r['speedup'] or float('nan'):.2f}x (rel err {r['rel_err_vs_reference']:.1e}); "
              f"quant both {r['quant_both_ms']:.3f} ms vs two passes "
              f"{r['quant_two_passes_ms']:.3f} ms")
    print("\nLinear forward + backward (FP8Linear vs bf16 nn.Linear)")
    for r in results.get("linear", []):
        print(f"  M={r['M']} K={r['K']} N={r['N']} backend {r['backend']}: "
              f"fp8 {r['fp8_ms'] or float('nan'):.2f} ms, bf16 {r['bf16_ms']:.2f} ms, "
              f"speedup {r['speedup'] or float('nan'):.2f}x {r.get('error', '')}")


if __name__ == "__main__":
    sys.exit(main())
