"""Benchmark one training step: ours against transformers' DeepseekV3, FP8 against BF16.

    python benchmarks/train.py --device cpu                   # grouped vs loop experts
    python benchmarks/train.py --device cpu --compile --hf    # + compiled, + transformers
    python benchmarks/train.py --preset h100_1b --compile --hf --fp8-dims 1024,2048,4096

Every row times forward, backward and an AdamW step (and our bias update) on the same
random batch (token ids drawn uniformly, never a constant): ``--warmup`` untimed steps,
then ``--steps`` timed ones. The table gives the median step, tokens/s, the MFU against
the device's dense BF16 peak (CUDA only) and the peak memory (CUDA only: on a CPU it is
not measured). MFU counts 6 × activated non-embedding parameters × tokens plus the
attention FLOPs (``dsv3lite.train.flops_per_token``). The rows:

- ``ours grouped``: routed experts as three ``torch._grouped_mm`` per layer (default);
- ``ours loop``: one matmul per expert after reading the counts (the reference path);
- ``--compile``: ``torch.compile(model, fullgraph=True)`` of the grouped model, under
  BF16 autocast (the dtype the compiled grouped GEMM needs); on a CPU also the same
  model eager in BF16, so that compiled and eager compare in one dtype;
- ``--hf``: transformers' ``DeepseekV3ForCausalLM`` built from the same config with
  ``dsv3lite.hf.to_hf`` (SDPA attention, its ``grouped_mm`` experts), eager and (with
  ``--compile``) compiled, same loss (cross-entropy of its logits). These rows and ours
  next to them use the config without MTP, which transformers does not have;
- ``--fp8-dims``: our model at each d_model (the preset with ``dim`` replaced), BF16 and
  FP8 (``convert_to_fp8``), eager; the FP8/BF16 ratio is performance goal M2.

On CUDA ours and transformers' run under BF16 autocast; on a CPU the plain rows are FP32.
On CUDA our loss goes through the chunked head (``return_logits=False``), as the
trainer's does. Rows not started within ``--budget`` seconds are skipped and listed. It
prints a table and writes ``benchmarks/results/train-<device>-<yyyymmdd>.json`` with the
device, versions, configs and every raw step time.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv3lite import ModelArgs, Transformer, convert_to_fp8, count_params  # noqa: E402
from dsv3lite.train import _peak_flops, flops_per_token  # noqa: E402

PRESETS = {"tiny": ModelArgs.tiny, "small": ModelArgs.small, "h100": ModelArgs.h100,
           "h100_1b": ModelArgs.h100_1b}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_step(model, x, y, device):
    """Forward + backward of our model; returns the step's expert counts (on the device)."""
    out = model(x, y, return_logits=device.type != "cuda")
    out.loss.total.backward()
    return out.expert_counts


def hf_step(model, x, y, device):
    logits = model(input_ids=x).logits
    F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()


def time_steps(model, step, x, y, device, steps: int, warmup: int, bf16: bool,
               update=None) -> list[float]:
    """Seconds of each timed training step (forward, backward, AdamW, ``update``, which
    gets what ``step`` returned)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            result = step(model, x, y, device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if update is not None:
            update(result)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def build_rows(ns, args: ModelArgs, cuda: bool) -> list[dict]:
    """The variants to run, in order: name, how to build the model, dtype, compile."""
    rows = [dict(name="ours grouped", kind="ours", args=args, bf16=cuda, compiled=False),
            dict(name="ours loop", kind="ours", args=args.replace(moe_impl="loop"), bf16=cuda,
                 compiled=False)]
    if ns.compile:
        if not cuda:
            rows.append(dict(name="ours grouped bf16", kind="ours", args=args, bf16=True,
                             compiled=False))
        rows.append(dict(name="ours grouped bf16 compiled", kind="ours", args=args, bf16=True,
                         compiled=True))
    if ns.hf:
        plain = args.replace(n_mtp_depth=0)
        rows.append(dict(name="ours (no MTP)", kind="ours", args=plain, bf16=cuda,
                         compiled=False))
        rows.append(dict(name="transformers", kind="hf", args=plain, bf16=cuda,
                         compiled=False))
        if ns.compile:
            rows.append(dict(name="ours (no MTP) compiled", kind="ours", args=plain,
                             bf16=True, compiled=True))
            rows.append(dict(name="transformers compiled", kind="hf", args=plain, bf16=True,
                             compiled=True))
    for dim in ns.fp8_dims:
        sized = args.replace(dim=dim)
        for fp8 in (False, True):
            rows.append(dict(name=f"ours d={dim} {'fp8' if fp8 else 'bf16'}", kind="ours",
                             args=sized, bf16=True, compiled=False, fp8=fp8, dim=dim))
    return rows


def run_row(row: dict, ns, device, x, y) -> dict:
    from dsv3lite.hf import to_hf  # transformers: optional, only for this benchmark

    torch.manual_seed(0)
    model = Transformer(row["args"]).to(device).train()
    update = None
    if row["kind"] == "hf":
        model = to_hf(model, attn_implementation="sdpa",
                      experts_implementation="grouped_mm").train()  # ours is dropped
        step = hf_step
    else:
        if row.get("fp8"):
            convert_to_fp8(model)
        step = ours_step
        update = (lambda counts, m=model: m.update_balance_biases(counts, sync=False))
    if row["compiled"]:
        model = torch.compile(model, fullgraph=row["kind"] == "ours")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(model, step, x, y, device, ns.steps, ns.warmup, row["bf16"], update)
    median = statistics.median(times)
    args = row["args"]
    tokens = x.numel()
    fpt = flops_per_token(args, x.shape[1])
    peak = _peak_flops(device)
    params = count_params(args)
    out = {"variant": row["name"], "kind": row["kind"], "moe_impl": args.moe_impl,
           "compiled": row["compiled"], "bf16": row["bf16"], "fp8": bool(row.get("fp8")),
           "dim": args.dim, "n_mtp_depth": args.n_mtp_depth,
           "params_total": params.total, "params_activated": params.activated,
           "flops_per_token": fpt, "step_s": times, "median_step_s": median,
           "tokens_per_s": tokens / median,
           "mfu": tokens / median * fpt / peak if peak else None,
           "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                                 if device.type == "cuda" else None)}
    del model
    return out


def summary(rows: list[dict]) -> dict:
    """The ratios the performance goals name, from the rows that ran."""
    by = {r["variant"]: r for r in rows}
    out = {}

    def ratio(a, b):
        if a in by and b in by:
            return by[a]["tokens_per_s"] / by[b]["tokens_per_s"]
        return None

    out["grouped_vs_loop"] = ratio("ours grouped", "ours loop")
    out["compiled_vs_eager_bf16"] = (ratio("ours grouped bf16 compiled", "ours grouped bf16")
                                     or ratio("ours grouped bf16 compiled", "ours grouped"))
    out["M1_ours_vs_transformers_eager"] = ratio("ours (no MTP)", "transformers")
    out["M1_ours_vs_transformers_compiled"] = ratio("ours (no MTP) compiled",
                                                    "transformers compiled")
    out["M2_fp8_vs_bf16"] = {str(r["dim"]): ratio(f"ours d={r['dim']} fp8",
                                                  f"ours d={r['dim']} bf16")
                             for r in rows if r["fp8"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--hf", action="store_true", help="also transformers' DeepseekV3")
    parser.add_argument("--fp8-dims", default="", help="comma-separated d_model values")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds after which rows not yet started are skipped")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ns = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        ns.fp8_dims = [int(d) for d in ns.fp8_dims.split(",") if d.strip()]
    except ValueError:
        return fail(f"--fp8-dims={ns.fp8_dims!r} is invalid: use integers like 1024,2048")
    if any(d < 1 for d in ns.fp8_dims):
        return fail(f"--fp8-dims={ns.fp8_dims} is invalid: every d_model must be >= 1")
    for flag in ("batch_size", "seq_len", "steps"):
        if getattr(ns, flag) < 1:
            return fail(f"--{flag.replace('_', '-')}={getattr(ns, flag)} is invalid: "
                        "must be >= 1")
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("--device=cuda is invalid here: no CUDA device is available")
    args = PRESETS[ns.preset]()
    if ns.seq_len > args.max_seq_len:
        return fail(f"--seq-len={ns.seq_len} is invalid: the {ns.preset} preset's "
                    f"max_seq_len is {args.max_seq_len}")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (ns.batch_size, ns.seq_len + 1), generator=g)
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    rows, skipped, failed = [], [], []
    for row in build_rows(ns, args, cuda):
        if time.perf_counter() - start > ns.budget:
            skipped.append(row["name"])
            continue
        try:
            result = run_row(row, ns, device, x, y)
        except Exception as exc:  # one failing peer must not lose the other rows
            failed.append({"variant": row["name"], "error": f"{type(exc).__name__}: {exc}"})
            print(f"{row['name']:>28}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append(result)
        mem = result["peak_memory_bytes"]
        print(f"{row['name']:>28}: {result['median_step_s'] * 1e3:9.1f} ms/step "
              f"{result['tokens_per_s']:10.0f} tokens/s"
              + (f"  MFU {result['mfu']:.1%}" if result["mfu"] is not None else "")
              + (f"  peak {mem / 2**30:.1f} GiB" if mem is not None else ""), flush=True)
    print("\n| variant | dtype | median step (ms) | tokens/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dtype = "fp8" if r["fp8"] else ("bf16" if r["bf16"] else "fp32")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = (f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] is not None
               else "not measured")
        print(f"| {r['variant']} | {dtype} | {r['median_step_s'] * 1e3:.1f} "
              f"| {r['tokens_per_s']:.0f} | {mfu} | {mem} |")
    ratios = summary(rows)
    print("\nratios (tokens/s):", json.dumps(ratios))
    if skipped:
        print("skipped (budget):", ", ".join(skipped))
    name = (torch.cuda.get_device_name(device) if cuda
            else platform.processor() or platform.machine())
    import transformers

    result = {"benchmark": "train", "device": name, "device_type": device.type,
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "python": platform.python_version(), "preset": ns.preset,
              "config": dict(vars(args)), "batch_size": ns.batch_size,
              "seq_len": ns.seq_len, "tokens_per_step": x.numel(), "warmup": ns.warmup,
              "bf16_peak_flops": _peak_flops(device),
              "mfu_counts": "6 x activated non-embedding params + causal attention FLOPs",
              "rows": rows, "ratios": ratios, "skipped": skipped, "failed": failed,
              "date": datetime.date.today().isoformat()}
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda-" + name.replace(" ", "_") if cuda else "cpu"
    path = out / f"train-{tag}-{datetime.date.today():%Y%m%d}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
