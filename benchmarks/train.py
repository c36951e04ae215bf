"""Benchmark one training step of a dsv3lite model: tokens/s, and what the MoE layer costs.

    python benchmarks/train.py --device cpu            # grouped vs loop experts, small preset
    python benchmarks/train.py --device cpu --compile  # also torch.compile (slow to compile)

Each variant runs forward, backward and an AdamW step on the same random batch (token ids
drawn uniformly, never a constant), ``--warmup`` untimed steps then ``--steps`` timed
ones; the table gives the median step time, tokens/s and, on CUDA, the MFU against the
BF16 peak: 6 × activated non-embedding parameters × tokens plus the attention FLOPs
(``dsv3lite.train.flops_per_token``). Variants:

- ``grouped``: routed experts as three ``torch._grouped_mm`` per layer (the default);
- ``loop``: one matmul per expert after reading the counts on the host (the reference);
- ``grouped+compile``: ``torch.compile(model, fullgraph=True)`` of the grouped model
  (with ``--compile``; on a CPU it runs under BF16 autocast, the dtype the compiled
  grouped GEMM needs).

On CUDA every step runs under BF16 autocast. The comparison against transformers'
``DeepseekV3ForCausalLM`` and FP8 at d_model 1024-4096 (issue "Fast on one GPU") are not
here yet. It prints a table and writes ``benchmarks/results/train-<device>-<yyyymmdd>.json``
with the device, versions, the config and every raw step time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv3lite import ModelArgs, Transformer, count_params  # noqa: E402
from dsv3lite.train import _peak_flops, flops_per_token  # noqa: E402

PRESETS = {"tiny": ModelArgs.tiny, "small": ModelArgs.small, "h100": ModelArgs.h100}


def time_steps(model, x, y, device, steps: int, warmup: int, bf16: bool) -> list[float]:
    """Seconds of each timed training step (forward, backward, AdamW, bias update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = model(x, y).loss.total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model_of(model).update_balance_biases(sync=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def model_of(model):
    return getattr(model, "_orig_mod", model)  # a compiled module wraps the original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ns = parser.parse_args(argv)
    device = torch.device(ns.device)
    args = PRESETS[ns.preset]()
    if ns.seq_len > args.max_seq_len:
        print(f"error: seq_len={ns.seq_len} is invalid: the {ns.preset} preset's "
              f"max_seq_len is {args.max_seq_len}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (ns.batch_size, ns.seq_len + 1), generator=g)
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    tokens = x.numel()
    peak = _peak_flops(device)
    fpt = flops_per_token(args, ns.seq_len)
    variants = [("grouped", "grouped", False), ("loop", "loop", False)]
    if ns.compile:
        variants.append(("grouped+compile", "grouped", True))
    rows = []
    for name, impl, compiled in variants:
        torch.manual_seed(0)
        model = Transformer(args.replace(moe_impl=impl)).to(device).train()
        step_model = torch.compile(model, fullgraph=True) if compiled else model
        bf16 = device.type == "cuda" or compiled
        times = time_steps(step_model, x, y, device, ns.steps, ns.warmup, bf16)
        median = statistics.median(times)
        row = {"variant": name, "moe_impl": impl, "compiled": compiled, "bf16": bf16,
               "step_s": times, "median_step_s": median, "tokens_per_s": tokens / median}
        if peak:
            row["mfu"] = tokens / median * fpt / peak
        rows.append(row)
        print(f"{name:>16}: {median * 1e3:8.1f} ms/step  {tokens / median:10.0f} tokens/s"
              + (f"  MFU {row['mfu']:.1%}" if peak else ""), flush=True)
    base = rows[1]["median_step_s"]
    print("\n| variant | median step (ms) | tokens/s | speed-up vs loop |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['median_step_s'] * 1e3:.1f} | "
              f"{row['tokens_per_s']:.0f} | {base / row['median_step_s']:.2f}x |")
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    params = count_params(args)
    result = {"benchmark": "train", "device": name, "device_type": device.type,
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "preset": ns.preset,
              "config": {k: v for k, v in vars(args).items()},
              "params_total": params.total, "params_activated": params.activated,
              "batch_size": ns.batch_size, "seq_len": ns.seq_len, "tokens_per_step": tokens,
              "flops_per_token": fpt, "bf16_peak_flops": peak, "warmup": ns.warmup,
              "rows": rows, "date": datetime.date.today().isoformat()}
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda-" + name.replace(" ", "_") if device.type == "cuda" else "cpu"
    path = out / f"train-{tag}-{datetime.date.today():%Y%m%d}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
