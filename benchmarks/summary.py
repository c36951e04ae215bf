"""One table of the performance goals (../shared/spec/performance.md) from the results.

    python benchmarks/summary.py                    # newest GPU results in benchmarks/results/
    python benchmarks/summary.py --results "$OUT"   # what a gpu-check run left there

Reads the newest ``fp8-*.json`` and ``train-cuda-*.json``, or, where a GPU run of
``benchmarks/gpu_check.py`` left ``gpu-check-fp8.json`` / ``gpu-check-train.json`` (not
its ``--smoke`` run), their merged parts, and prints for each goal K1-K6, M1 and M2 the
measured ratio next to the target. Goals without a GPU result say "not measured";
nothing is estimated. ``benchmarks/gpu_check.py`` ends with the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"


def newest(pattern: str, results: Path = RESULTS) -> Optional[dict]:
    files = sorted(results.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def load(results: Path = RESULTS) -> tuple[Optional[dict], Optional[dict]]:
    """(fp8, train) results in ``results``: a GPU gpu-check run's merged parts first."""
    found = []
    for group, pattern in (("fp8", "fp8-*.json"), ("train", "train-cuda-*.json")):
        check = newest(f"gpu-check-{group}.json", results)
        if check and not check.get("smoke") and check.get("merged"):
            found.append(check["merged"])
        else:
            found.append(newest(pattern, results))
    return found[0], found[1]


def _ratio(a, b) -> Optional[float]:
    return a / b if a and b else None


def goals(fp8: Optional[dict], train: Optional[dict]) -> list[tuple[str, str, Optional[str]]]:
    """(goal, target, measured) rows; measured is None when there is no result."""
    rows = []

    def fmt(x: Optional[float], suffix: str = "x") -> Optional[str]:
        return None if x is None else f"{x:.2f}{suffix}"

    gemm = (fp8 or {}).get("gemm", [])
    big = next((r for r in gemm if (r["M"], r["N"], r["K"]) == (8192, 8192, 8192)), None)
    rows.append(("K1 block-scaled GEMM 8192^3 vs F.scaled_mm / vs bf16",
                 ">= 0.9x / >= 1.5x",
                 big and f"{fmt(_ratio(big['fp8_triton_tflops'], big['scaled_mm_tflops']))} / "
                 f"{fmt(_ratio(big['fp8_triton_tflops'], big['bf16_matmul_tflops']))}"))
    v3 = [r for r in gemm if r["M"] >= 4096 and (r["N"], r["K"]) != (r["M"], r["M"])]
    k2 = [_ratio(r["fp8_triton_tflops"], r["scaled_mm_tflops"]) for r in v3]
    k2 = [x for x in k2 if x is not None]
    rows.append(("K2 V3 shapes, M >= 4096, worst vs F.scaled_mm", ">= 0.9x",
                 fmt(min(k2)) if k2 else None))
    wgrad = (fp8 or {}).get("wgrad_gemm", [])
    rows.append(("K3 Wgrad GEMM vs F.scaled_mm (1x128, 1x128)", ">= 0.85x",
                 fmt(_ratio(wgrad[0]["fp8_triton_tflops"], wgrad[0]["scaled_mm_tflops"]))
                 if wgrad else None))
    grouped = (fp8 or {}).get("grouped", [])
    rows.append(("K4 grouped FP8 GEMM vs bf16 torch._grouped_mm (worst)", ">= 1.5x",
                 fmt(min(r["speedup"] for r in grouped)) if grouped else None))
    quant = [r for r in (fp8 or {}).get("quant", []) if "vs_copy" in r]
    rows.append(("K5 quant/dequant vs copy bandwidth (worst)", ">= 0.85x",
                 fmt(min(r["vs_copy"] for r in quant)) if quant else None))
    linear = [r for r in (fp8 or {}).get("linear", []) if (r["M"], r["K"]) == (16384, 8192)]
    rows.append(("K6 FP8Linear fwd+bwd vs bf16, 16384x8192x8192", ">= 1.3x",
                 fmt(linear[0]["speedup"]) if linear else None))
    ratios = (train or {}).get("ratios", {})
    by = {r["variant"]: r for r in (train or {}).get("rows", [])}
    mfu = by.get("ours (no MTP) compiled", {}).get("mfu")
    m1 = ratios.get("M1_ours_vs_transformers_compiled")
    rows.append(("M1 tokens/s vs transformers, both compiled (our MFU)", ">= 1.5x (MFU >= 30%)",
                 m1 and f"{fmt(m1)} (MFU {mfu:.1%})" if mfu else fmt(m1)))
    m2 = ratios.get("M2_fp8_vs_bf16") or {}
    rows.append(("M2 FP8 vs BF16 step, per d_model", ">= 0.95x; >= 1.05x at >= 2048",
                 ", ".join(f"{d}: {fmt(v)}" for d, v in m2.items() if v) or None))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON files")
    ns = parser.parse_args(argv)
    fp8, train = load(Path(ns.results))
    print("| goal | target | measured |")
    print("|---|---|---|")
    for goal, target, measured in goals(fp8, train):
        print(f"| {goal} | {target} | {measured or 'not measured (no GPU result)'} |")
    for name, result in (("fp8", fp8), ("train", train)):
        if result:
            print(f"{name}: {result.get('device')} on {result.get('date')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
