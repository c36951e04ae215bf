"""Benchmark dsv3lite's FP8 kernels on one GPU: correctness first, then speed against peers.

Run from the repository root on a CUDA machine with FP8 tensor cores (sm_89+, e.g. H100):

    python benchmarks/fp8.py

It (1) checks the compiled Triton kernels against the plain-PyTorch reference on the GPU
(bit-exact quantization, an FP32-output GEMM within
``dsv3lite.fp8.accumulation.promoted_gemm_tolerance()`` of the float64 product of the
dequantized operands: the bound that Hopper's ~14-bit accumulation inside each 128-wide
block allows, derived from its emulation); (2) times, with ``triton.testing.do_bench``
medians on random data (never zeros; do_bench clears the L2 cache before every run):

- act_quant (1x128 and 128x1), weight_quant (128x128) and weight_dequant in GB/s against
  a same-run device-to-device copy (performance goal K5: >= 0.85x);
- fp8_gemm at M=N=K=4096 and 8192 and at DeepSeek-V3's shapes (the DeepGEMM README's table) against
  ``torch.nn.functional.scaled_mm`` blockwise (if present and verified) and bf16 matmul
  (goals K1, K2), and the Wgrad GEMM (both operands 1x128 along tokens, goal K3);
- two more peers at M=N=K=8192: ``torch._scaled_mm`` with rowwise scales (one scale per
  row of a and of b: a coarser recipe, the speed of torch's own FP8 GEMM) and a
  blockwise scaled mm written in PyTorch (dequantize, bf16 matmul) compiled with
  ``torch.compile(mode="max-autotune")``;
- the grouped FP8 GEMM of the MoE experts (``dsv3lite.fp8.grouped``, 128-aligned
  segments) against bf16 ``torch._grouped_mm`` on the same segments (goal K4);
- the one-pass 1x128 + 128x1 quantization (``act_quant_both``) against the two passes;
- FP8Linear forward+backward against a bf16 nn.Linear (goal K6).

It prints a table and writes ``benchmarks/results/fp8-<gpu>-<yyyymmdd>.json`` with the
device name, torch/triton versions and every raw number; it exits 1 if a correctness
check failed (the timings are still written, flagged). Without CUDA it says so and
exits 0 without writing anything. It takes a few minutes (autotuning included); GEMM
shapes not started within 150 s are skipped and listed (``make gpu-check`` fits 8 minutes).
"""

from __future__ import annotations

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
BUDGET_S = 150  # GEMM shapes not started by then are skipped (and listed in the JSON)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def median_ms(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                          return_mode="median"))


# ------------------------------------------------------------------- correctness
def check_correctness(device: torch.device) -> dict:
    from dsv3lite.fp8 import kernels, reference as ref
    from dsv3lite.fp8.accumulation import promoted_gemm_tolerance

    checks = {}
    tolerance = promoted_gemm_tolerance()
    x = torch.randn(4096, 7168, device=device, dtype=torch.bfloat16) * 3
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
        checks[name] = dict(scales_equal=bool(torch.equal(s, s_ref)), value_mismatches=mismatches,
                            ok=bool(torch.equal(s, s_ref)) and mismatches == 0)
    q, s = ref.weight_quant_ref(x.float())
    same = torch.equal(kernels.weight_dequant_triton(q, s, torch.bfloat16),
                       ref.weight_dequant_ref(q, s, torch.bfloat16))
    checks["weight_dequant"] = dict(ok=bool(same))
    for M, N, K, b_tiles in [(4096, 4096, 4096, "128x128"), (1000, 2112, 7168, "128x128"),
                             (4096, 4096, 4096, "1x128"), (130, 576, 300, "128x128")]:
        a_q, a_s = ref.act_quant_ref(torch.randn(M, K, device=device))
        b = torch.randn(N, K, device=device)
        b_q, b_s = ref.weight_quant_ref(b) if b_tiles == "128x128" else ref.act_quant_ref(b)
        tile = (128, 128) if b_tiles == "128x128" else (1, 128)
        exact = (ref.dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
                 @ ref.dequantize_tiles(b_q, b_s, tile, torch.float64).t())
        e32 = rel(kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32), exact)
        e16 = rel(kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.bfloat16), exact)
        checks[f"fp8_gemm {M}x{N}x{K} b {b_tiles}"] = dict(
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

    M, K = 16384, 8192
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
    """Time c = a @ b^T (a: (M, K) 1x128; b: (N, K) 128x128 blocks or 1x128 tiles)."""
    from dsv3lite.fp8 import kernels, reference as ref

    a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    b = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    a_q, a_s = kernels.act_quant_triton(a)
    quant_b = kernels.weight_quant_triton if b_tiles == "128x128" else kernels.act_quant_triton
    b_q, b_s = quant_b(b)
    tile = (128, 128) if b_tiles == "128x128" else (1, 128)
    ours = kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.bfloat16)
    exact = (ref.dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
             @ ref.dequantize_tiles(b_q, b_s, tile, torch.float64).t())
    flops = 2 * M * N * K
    row = dict(M=M, N=N, K=K, b_tiles=b_tiles, rel_err=rel(ours, exact))
    peer, note = scaled_mm_peer(a_q, a_s, b_q, b_s, b_tiles, exact)
    del exact
    row["fp8_triton_ms"] = median_ms(lambda: kernels.fp8_gemm_triton(a_q, a_s, b_q, b_s,
                                                                      torch.bfloat16))
    row["bf16_matmul_ms"] = median_ms(lambda: a @ b.t())
    row["scaled_mm_layout_or_reason"] = note
    row["scaled_mm_ms"] = median_ms(peer) if peer else None
    for name in ("fp8_triton", "bf16_matmul", "scaled_mm"):
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
    row["bf16_grouped_mm_ms"] = median_ms(lambda: torch._grouped_mm(x, wt, offs=ends))
    flops = 2 * E * tokens * N * K
    row["fp8_grouped_tflops"] = flops / row["fp8_grouped_ms"] / 1e9
    row["bf16_grouped_mm_tflops"] = flops / row["bf16_grouped_mm_ms"] / 1e9
    row["speedup"] = row["bf16_grouped_mm_ms"] / row["fp8_grouped_ms"]
    # the one-pass quantization of both tilings against two passes, same input
    row["quant_both_ms"] = median_ms(lambda: kernels.act_quant_both_triton(x))
    row["quant_two_passes_ms"] = median_ms(lambda: (kernels.act_quant_triton(x),
                                                    kernels.act_quant_triton(x, transpose=True)))
    return row


def bench_linear(device: torch.device, M: int, K: int, N: int) -> dict:
    """FP8Linear (fp32 master weight, bf16 activations) vs bf16 nn.Linear, fwd + bwd."""
    from dsv3lite.fp8 import FP8Linear

    x = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    fp8 = FP8Linear(K, N, bias=False, device=device)
    bf16 = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)

    def step(module):
        return lambda: module(x).backward(dy)

    fp8_ms = median_ms(step(fp8), grad_to_none=[x, fp8.weight])
    bf16_ms = median_ms(step(bf16), grad_to_none=[x, bf16.weight])
    return dict(M=M, K=K, N=N, fp8_ms=fp8_ms, bf16_ms=bf16_ms, speedup=bf16_ms / fp8_ms,
                fp8_tflops=6 * M * K * N / fp8_ms / 1e9, bf16_tflops=6 * M * K * N / bf16_ms / 1e9)


# ------------------------------------------------------------------------- main
def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/fp8.py: no CUDA GPU on this machine; nothing measured, nothing "
              "written. Run it on a GPU with FP8 tensor cores (sm_89+).")
        return 0
    device = torch.device("cuda")
    name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        print(f"benchmarks/fp8.py: {name} (sm_{capability[0]}{capability[1]}) has no FP8 tensor "
              "cores; nothing measured, nothing written.")
        return 0
    try:
        import triton
    except ImportError:
        print("benchmarks/fp8.py: Triton is not installed; nothing measured, nothing written.")
        return 0
    start = time.time()
    torch.manual_seed(0)
    results = dict(device=name, capability=list(capability), torch=torch.__version__,
                   triton=triton.__version__, cuda=torch.version.cuda,
                   date=datetime.date.today().isoformat())
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}")
    results["correctness"] = checks = check_correctness(device)
    failed = [k for k, v in checks.items() if not v["ok"]]
    results["all_checks_passed"] = not failed
    for k, v in checks.items():
        print(f"  check {k:36s} {'ok' if v['ok'] else 'FAILED'}  {v}")
    results["quant"] = bench_quant(device)
    shapes = [(4096, 4096, 4096), (8192, 8192, 8192)]
    shapes += [(M, N, K) for M in DEEPSEEK_M for N, K in DEEPSEEK_NK]
    results["gemm"], results["skipped_for_time"] = [], []
    for shape in shapes:  # stay inside the 8-minute device call, whatever autotuning costs
        if time.time() - start > BUDGET_S:
            results["skipped_for_time"].append(list(shape))
            continue
        results["gemm"].append(bench_gemm(device, *shape))
    # Wgrad: dW (N, K) = dy^T x over 16384 tokens, both operands 1x128 along tokens.
    results["wgrad_gemm"] = [bench_gemm(device, 8192, 8192, 16384, "1x128")]
    results["peers"] = [bench_peers(device)]
    # V3's expert shapes (dim 7168, expert width 2048) and ours (h100_1b: 2048, 512)
    results["grouped"] = [bench_grouped(device, 8, 2048, 2048, 7168),
                          bench_grouped(device, 32, 512, 512, 2048)]
    results["linear"] = [bench_linear(device, 16384, 8192, 8192),
                         bench_linear(device, 16384, 2048, 2048)]
    results["seconds"] = time.time() - start
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = out_dir / f"fp8-{slug}-{datetime.date.today():%Y%m%d}.json"
    path.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\n{time.time() - start:.0f} s. Wrote {path}")
    if results["skipped_for_time"]:
        print(f"Skipped for time: {results['skipped_for_time']}")
    if failed:
        print(f"CORRECTNESS FAILED ({', '.join(failed)}): the timings above are of kernels "
              "that disagree with the reference.")
        return 1
    return 0


def print_table(results: dict) -> None:
    print("\nQuantization (GB/s = bytes read + written / time)")
    print(f"  {'op':34s} {'ms':>8s} {'GB/s':>8s} {'x copy':>7s} {'eager ms':>9s}")
    for r in results["quant"]:
        print(f"  {r['op']:34s} {r['ms']:8.3f} {r['gbs']:8.0f} {r.get('vs_copy', 1.0):7.2f} "
              f"{r.get('torch_eager_ms', float('nan')):9.3f}")
    print("\nGEMM c = a @ b^T, bf16 out (TFLOPS; ratios are ours / peer)")
    print(f"  {'M':>6s} {'N':>6s} {'K':>6s} {'b':>7s} {'ours':>7s} {'scaled_mm':>9s} "
          f"{'bf16':>7s} {'/smm':>6s} {'/bf16':>6s} {'rel err':>8s}")
    for r in results["gemm"] + results["wgrad_gemm"]:
        smm = r["scaled_mm_tflops"]
        print(f"  {r['M']:6d} {r['N']:6d} {r['K']:6d} {r['b_tiles']:>7s} "
              f"{r['fp8_triton_tflops']:7.0f} {smm or float('nan'):9.0f} "
              f"{r['bf16_matmul_tflops']:7.0f} "
              f"{r['fp8_triton_tflops'] / smm if smm else float('nan'):6.2f} "
              f"{r['fp8_triton_tflops'] / r['bf16_matmul_tflops']:6.2f} {r['rel_err']:8.1e}")
    print("\nPeers at M=N=K (TFLOPS)")
    for r in results.get("peers", []):
        print(f"  {r['M']}: ours {r['ours_tflops'] or float('nan'):.0f}, rowwise _scaled_mm "
              f"{r['rowwise_scaled_mm_tflops'] or float('nan'):.0f}, compiled blockwise "
              f"{r['compiled_blockwise_tflops'] or float('nan'):.0f}")
    print("\nGrouped experts GEMM (K4: fp8 grouped vs bf16 torch._grouped_mm)")
    for r in results.get("grouped", []):
        print(f"  E={r['E']} x {r['tokens_per_expert']} tokens, N={r['N']} K={r['K']}: "
              f"fp8 {r['fp8_grouped_tflops']:.0f} TFLOPS, bf16 {r['bf16_grouped_mm_tflops']:.0f}"
              f", speedup {r['speedup']:.2f}x (rel err {r['rel_err_vs_reference']:.1e}); "
              f"quant both {r['quant_both_ms']:.3f} ms vs two passes "
              f"{r['quant_two_passes_ms']:.3f} ms")
    print("\nLinear forward + backward (FP8Linear vs bf16 nn.Linear)")
    for r in results["linear"]:
        print(f"  M={r['M']} K={r['K']} N={r['N']}: fp8 {r['fp8_ms']:.2f} ms, "
              f"bf16 {r['bf16_ms']:.2f} ms, speedup {r['speedup']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
