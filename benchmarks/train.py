"""Benchmark one training step: ours against transformers' DeepseekV3, FP8 against BF16.

    python benchmarks/train.py --device cpu                   # grouped vs loop experts
    python benchmarks/train.py --device cpu --compile --hf    # + compiled, + transformers
    python benchmarks/train.py --preset h100_1b --only M1     # goal M1 alone (CUDA)
    python benchmarks/train.py --preset h100_1b --only M2     # goal M2 alone (CUDA)
    python benchmarks/train.py --only M1 --smoke              # the same rows, 1 CPU step

Every row times forward, backward and an AdamW step (and our bias update) on the same
random batch (token ids drawn uniformly, never a constant): ``--warmup`` untimed steps
(compilation happens there), then ``--steps`` timed ones, each between two device
synchronisations. On CUDA the defaults are 16 sequences of 1,024 tokens (16,384 tokens
per step: fewer leave the GPU idle and make MFU meaningless), 3 warm-up steps and 20
timed ones; on a CPU 8 x 128 tokens, 2 and 5. The table and the JSON give the minimum,
median and maximum step and the interquartile range, the tokens/s of the median step,
the MFU against the device's dense BF16 peak (CUDA only) and the peak memory (CUDA only:
on a CPU it is not measured).

MFU counts, per token, 6 x the activated non-embedding parameters (output head
included), the causal attention products of every layer, and the MTP modules when the
row has them (their block, ``eh_proj``, the second pass through the shared head and
their attention): ``dsv3lite.train.flops_per_token(args, seq_len, mtp=True)``. The peak
is the datasheet's dense BF16 number of the detected GPU (``dsv3lite.train._peak_flops``:
989 TFLOPS for H100 SXM and H200, 756 for H100 PCIe); an unknown GPU gets no MFU.

The rows:

- ``ours grouped``: routed experts as three ``torch._grouped_mm`` per layer (default);
- ``ours loop``: one matmul per expert after reading the counts (the reference path);
- ``--compile``: ``torch.compile(model, fullgraph=True)`` of the grouped model, under
  BF16 autocast (the dtype the compiled grouped GEMM needs); on a CPU also the same
  model eager in BF16, so that compiled and eager compare in one dtype;
- ``--hf``: transformers' ``DeepseekV3ForCausalLM`` built from the same config with
  ``dsv3lite.hf.to_hf`` (SDPA attention, its ``grouped_mm`` experts, ``use_cache=False``),
  eager and (with ``--compile``) compiled. On CUDA its parameters are cast to BF16:
  transformers runs its experts through ``torch._grouped_mm`` only with BF16 weights
  (under ``torch.compile`` FP32 weights fall back to a loop over experts with a host
  sync). Its loss is ``F.cross_entropy`` of its BF16 logits outside autocast, so no FP32
  copy of the logits is made (transformers has no chunked loss; its own ``labels=`` path
  casts all logits to FP32). Pure BF16 weights and a BF16 AdamW favour transformers: our
  rows keep FP32 weights under BF16 autocast, as the trainer does. These rows and ours
  next to them use the config without MTP, which transformers does not train;
- ``--fp8-dims``: our model at each d_model (the preset with ``dim`` replaced), BF16 and
  FP8 (``convert_to_fp8``), eager; the FP8/BF16 ratio is performance goal M2.

``--only M1`` runs just ``ours (no MTP) compiled`` and ``transformers compiled`` (goal
M1: both BF16 and compiled); ``--only M2`` just the ``--fp8-dims`` rows (default 1024
and 2048). ``--smoke`` makes it a CPU check of the script: the tiny preset, 2 x 16
tokens, one timed step, no warm-up and, for M1, no compilation (the rows keep their
names). On CUDA ours runs under BF16 autocast and its loss goes through the chunked head
(``return_logits=False``), as the trainer's does; on a CPU the plain rows are FP32.
Rows not started within ``--budget`` seconds are skipped and listed. The JSON,
``<out>/train-<device>-<yyyymmdd>.json`` with the device, versions, configs and every
raw step time, is rewritten after every row, so a run cut short keeps what it measured.
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
GOALS = ("M1", "M2")
MFU_COUNTS = ("6 x activated non-embedding parameters (output head included) + causal "
              "attention products of every layer + the MTP modules when the row has them "
              "(block, eh_proj, shared head again, attention), forward + backward; over "
              "the device's dense BF16 datasheet peak")
HF_SETUP = ("transformers' DeepseekV3ForCausalLM via dsv3lite.hf.to_hf: SDPA attention, "
            "grouped_mm experts, use_cache=False; on CUDA BF16 parameters and AdamW state "
            "(its grouped_mm needs BF16 weights), loss F.cross_entropy of its BF16 logits "
            "outside autocast (no FP32 logits; transformers has no chunked loss)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_step(model, x, y, device):
    """Forward + backward of our model; returns the step's expert counts (on the device)."""
    out = model(x, y, return_logits=device.type != "cuda")
    out.loss.total.backward()
    return out.expert_counts


def hf_step(model, x, y, device):
    """Forward + backward of transformers' model: next-token cross-entropy of its logits.

    The logits keep the model's dtype (BF16 on CUDA) and the loss runs outside autocast,
    which would otherwise make an FP32 copy of them for the log-softmax.
    """
    logits = model(input_ids=x, use_cache=False).logits
    with torch.autocast(device.type, enabled=False):
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()


def spread(times: list[float]) -> dict:
    """min, quartiles, median and max of the step times (seconds)."""
    ordered = sorted(times)
    if len(ordered) > 1:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"min_step_s": ordered[0], "q1_step_s": q1,
            "median_step_s": statistics.median(ordered), "q3_step_s": q3,
            "max_step_s": ordered[-1]}


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
    """The variants to run, in order: name, how to build the model, dtype, compile.

    ``bf16`` means BF16 autocast for our rows and BF16 parameters for transformers'.
    """
    plain = args.replace(n_mtp_depth=0)
    compile_ok = not ns.smoke  # the smoke run keeps the compiled rows' names, eager
    if ns.only == "M1":
        return [dict(name="ours (no MTP) compiled", kind="ours", args=plain, bf16=True,
                     compiled=compile_ok),
                dict(name="transformers compiled", kind="hf", args=plain, bf16=True,
                     compiled=compile_ok)]
    rows = []
    if ns.only is None:
        rows += [dict(name="ours grouped", kind="ours", args=args, bf16=cuda, compiled=False),
                 dict(name="ours loop", kind="ours", args=args.replace(moe_impl="loop"),
                      bf16=cuda, compiled=False)]
        if ns.compile:
            if not cuda:
                rows.append(dict(name="ours grouped bf16", kind="ours", args=args, bf16=True,
                                 compiled=False))
            rows.append(dict(name="ours grouped bf16 compiled", kind="ours", args=args,
                             bf16=True, compiled=True))
        if ns.hf:
            rows.append(dict(name="ours (no MTP)", kind="ours", args=plain, bf16=cuda,
                             compiled=False))
            rows.append(dict(name="transformers", kind="hf", args=plain, bf16=cuda,
                             compiled=False))
            if ns.compile:
                rows.append(dict(name="ours (no MTP) compiled", kind="ours", args=plain,
                                 bf16=True, compiled=True))
                rows.append(dict(name="transformers compiled", kind="hf", args=plain,
                                 bf16=True, compiled=True))
    for dim in ns.fp8_dims:
        sized = args.replace(dim=dim)
        for fp8 in (False, True):
            rows.append(dict(name=f"ours d={dim} {'fp8' if fp8 else 'bf16'}", kind="ours",
                             args=sized, bf16=True, compiled=False, fp8=fp8, dim=dim))
    return rows


def run_row(row: dict, ns, device, x, y) -> dict:
    from dsv3lite.hf import to_hf  # optional dependency: transformers, only for these rows

    torch.manual_seed(0)
    model = Transformer(row["args"]).to(device).train()
    update = None
    autocast = row["bf16"]
    if row["kind"] == "hf":
        model = to_hf(model, attn_implementation="sdpa",
                      experts_implementation="grouped_mm").train()  # ours is dropped
        model.config.use_cache = False
        if row["bf16"]:
            model = model.to(torch.bfloat16)
            autocast = False  # already BF16; the loss stays in BF16 too
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
    times = time_steps(model, step, x, y, device, ns.steps, ns.warmup, autocast, update)
    stats = spread(times)
    args = row["args"]
    tokens = x.numel()
    fpt = flops_per_token(args, x.shape[1], mtp=True)
    peak = _peak_flops(device)
    params = count_params(args)
    median = stats["median_step_s"]
    out = {"variant": row["name"], "kind": row["kind"], "moe_impl": args.moe_impl,
           "compiled": row["compiled"], "bf16": row["bf16"], "fp8": bool(row.get("fp8")),
           "dim": args.dim, "n_mtp_depth": args.n_mtp_depth,
           "params_total": params.total, "params_activated": params.activated,
           "params_mtp": params.mtp[0], "flops_per_token": fpt, "step_s": times, **stats,
           "tokens_per_s": tokens / median,
           "tokens_per_s_range": [tokens / stats["max_step_s"], tokens / stats["min_step_s"]],
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


def print_table(rows: list[dict]) -> None:
    print("\n| variant | dtype | step min / median / max (ms) | tokens/s (median) | MFU "
          "| peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dtype = "fp8" if r["fp8"] else ("bf16" if r["bf16"] else "fp32")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = (f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] is not None
               else "not measured")
        print(f"| {r['variant']}{' (compiled)' if r['compiled'] and 'compiled' not in r['variant'] else ''} "
              f"| {dtype} | {r['min_step_s'] * 1e3:.1f} / {r['median_step_s'] * 1e3:.1f} / "
              f"{r['max_step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {mfu} | {mem} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="default: small (h100_1b with --only on CUDA, tiny with --smoke)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 16 on CUDA, 8 on a CPU, 2 with --smoke")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="default: 1024 on CUDA, 128 on a CPU, 16 with --smoke")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps; default: 20 on CUDA, 5 on a CPU, 1 with --smoke")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first; default: 3 on CUDA, 2 on a CPU, 0 with "
                             "--smoke")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--hf", action="store_true", help="also transformers' DeepseekV3")
    parser.add_argument("--fp8-dims", default=None,
                        help="comma-separated d_model values (default: none; 1024,2048 with "
                             "--only M2, 128 with --only M2 --smoke)")
    parser.add_argument("--only", default=None, choices=GOALS,
                        help="run only the rows of one performance goal")
    parser.add_argument("--smoke", action="store_true",
                        help="a fast CPU run of the same rows: tiny preset, one step")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds after which rows not yet started are skipped")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ns = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if ns.device is None:
        ns.device = "cuda" if torch.cuda.is_available() and not ns.smoke else "cpu"
    cuda = ns.device.startswith("cuda")
    if ns.smoke and cuda:
        return fail(f"--device={ns.device} is invalid with --smoke: the smoke run is the CPU "
                    "check of this script")
    mode = "smoke" if ns.smoke else ("cuda" if cuda else "cpu")
    defaults = {"smoke": dict(batch_size=2, seq_len=16, steps=1, warmup=0),
                "cuda": dict(batch_size=16, seq_len=1024, steps=20, warmup=3),
                "cpu": dict(batch_size=8, seq_len=128, steps=5, warmup=2)}[mode]
    for key, value in defaults.items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    if ns.preset is None:
        ns.preset = "tiny" if ns.smoke else ("h100_1b" if ns.only and cuda else "small")
    if ns.fp8_dims is None:
        ns.fp8_dims = ("128" if ns.smoke else "1024,2048") if ns.only == "M2" else ""
    try:
        ns.fp8_dims = [int(d) for d in ns.fp8_dims.split(",") if d.strip()]
    except ValueError:
        return fail(f"--fp8-dims={ns.fp8_dims!r} is invalid: use integers like 1024,2048")
    if any(d < 1 for d in ns.fp8_dims):
        return fail(f"--fp8-dims={ns.fp8_dims} is invalid: every d_model must be >= 1")
    if ns.only == "M1" and ns.fp8_dims:
        return fail(f"--fp8-dims={','.join(map(str, ns.fp8_dims))} is invalid with --only M1:"
                    " the FP8 rows are goal M2")
    for flag in ("batch_size", "seq_len", "steps"):
        if getattr(ns, flag) < 1:
            return fail(f"--{flag.replace('_', '-')}={getattr(ns, flag)} is invalid: "
                        "must be >= 1")
    if ns.warmup < 0:
        return fail(f"--warmup={ns.warmup} is invalid: must be >= 0")
    device = torch.device(ns.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"--device={ns.device} is invalid here: no CUDA device is available")
    args = PRESETS[ns.preset]()
    if ns.seq_len > args.max_seq_len:
        return fail(f"--seq-len={ns.seq_len} is invalid: the {ns.preset} preset's "
                    f"max_seq_len is {args.max_seq_len}")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (ns.batch_size, ns.seq_len + 1), generator=g)
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    name = (torch.cuda.get_device_name(device) if cuda
            else platform.processor() or platform.machine())
    import transformers  # optional dependency: only its version is recorded here

    result = {"benchmark": "train", "device": name, "device_type": device.type,
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "python": platform.python_version(), "preset": ns.preset, "only": ns.only,
              "smoke": ns.smoke, "config": dict(vars(args)), "batch_size": ns.batch_size,
              "seq_len": ns.seq_len, "tokens_per_step": x.numel(), "warmup": ns.warmup,
              "timed_steps": ns.steps, "bf16_peak_flops": _peak_flops(device),
              "mfu_counts": MFU_COUNTS, "transformers_setup": HF_SETUP,
              "rows": [], "ratios": {}, "skipped": [], "failed": [],
              "date": datetime.date.today().isoformat()}
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda-" + name.replace(" ", "_") if cuda else "cpu"
    path = out / f"train-{tag}-{datetime.date.today():%Y%m%d}.json"

    def save() -> None:  # after every row: a run cut off keeps what it measured
        result["ratios"] = summary(result["rows"])
        path.write_text(json.dumps(result, indent=1))

    start = time.perf_counter()
    for row in build_rows(ns, args, cuda):
        if time.perf_counter() - start > ns.budget:
            result["skipped"].append(row["name"])
            continue
        try:
            r = run_row(row, ns, device, x, y)
        except Exception as exc:  # one failing peer must not lose the other rows
            result["failed"].append({"variant": row["name"],
                                     "error": f"{type(exc).__name__}: {exc}"})
            print(f"{row['name']:>28}: FAILED {type(exc).__name__}: {exc}", flush=True)
            save()
            continue
        result["rows"].append(r)
        save()
        mem = r["peak_memory_bytes"]
        print(f"{row['name']:>28}: {r['median_step_s'] * 1e3:9.1f} ms/step (median of "
              f"{len(r['step_s'])}) {r['tokens_per_s']:10.0f} tokens/s"
              + (f"  MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
              + (f"  peak {mem / 2**30:.1f} GiB" if mem is not None else ""), flush=True)
    save()
    print_table(result["rows"])
    print("\nratios (tokens/s):", json.dumps(result["ratios"]))
    if result["skipped"]:
        print("skipped (budget):", ", ".join(result["skipped"]))
    print(f"\nwrote {path}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
