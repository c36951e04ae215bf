"""The benchmark scripts: their arithmetic, their errors, and one tiny CPU run end to end."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_goal_table_computes_each_ratio_from_the_raw_numbers():
    summary = _load("summary")
    fp8 = {"gemm": [dict(M=8192, N=8192, K=8192, fp8_triton_tflops=900,
                         scaled_mm_tflops=1000, bf16_matmul_tflops=600),
                    dict(M=4096, N=2112, K=7168, fp8_triton_tflops=800,
                         scaled_mm_tflops=1000, bf16_matmul_tflops=500),
                    dict(M=64, N=2112, K=7168, fp8_triton_tflops=10,
                         scaled_mm_tflops=1000, bf16_matmul_tflops=500)],
           "wgrad_gemm": [dict(fp8_triton_tflops=850, scaled_mm_tflops=1000)],
           "grouped": [dict(speedup=1.6), dict(speedup=1.2)],
           "quant": [dict(op="copy"), dict(vs_copy=0.9), dict(vs_copy=0.8)],
           "linear": [dict(M=16384, K=8192, speedup=1.4), dict(M=16384, K=2048, speedup=1.0)]}
    train = {"ratios": {"M1_ours_vs_transformers_compiled": 1.75,
                        "M2_fp8_vs_bf16": {"1024": 0.9, "2048": 1.1}},
             "rows": [{"variant": "ours (no MTP) compiled", "mfu": 0.31}]}
    measured = {goal.split()[0]: value for goal, _, value in summary.goals(fp8, train)}
    assert measured["K1"] == "0.90x / 1.50x"
    assert measured["K2"] == "0.80x"  # only M >= 4096 counts
    assert measured["K3"] == "0.85x"
    assert measured["K4"] == "1.20x"  # the worst shape
    assert measured["K5"] == "0.80x"
    assert measured["K6"] == "1.40x"
    assert measured["M1"] == "1.75x (MFU 31.0%)"
    assert measured["M2"] == "1024: 0.90x, 2048: 1.10x"
    assert all(value is None for _, _, value in summary.goals(None, None))


def test_train_benchmark_rejects_bad_flags_with_the_flag_named(capsys):
    train = _load("train")
    assert train.main(["--fp8-dims", "10x", "--device", "cpu"]) == 2
    assert "--fp8-dims='10x' is invalid" in capsys.readouterr().err
    assert train.main(["--steps", "0", "--device", "cpu"]) == 2
    assert "--steps=0 is invalid" in capsys.readouterr().err
    assert train.main(["--seq-len", "100000", "--preset", "tiny", "--device", "cpu"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_train_benchmark_runs_ours_and_transformers_on_a_cpu(tmp_path, capsys):
    train = _load("train")
    code = train.main(["--device", "cpu", "--preset", "tiny", "--batch-size", "2",
                       "--seq-len", "16", "--steps", "1", "--warmup", "0", "--hf",
                       "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    (path,) = tmp_path.glob("train-cpu-*.json")
    result = json.loads(path.read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names == ["ours grouped", "ours loop", "ours (no MTP)", "transformers"]
    for row in result["rows"]:
        assert len(row["step_s"]) == 1 and row["tokens_per_s"] == pytest.approx(
            result["tokens_per_step"] / row["median_step_s"])
        assert row["min_step_s"] == row["median_step_s"] == row["max_step_s"]
        assert row["mfu"] is None and row["peak_memory_bytes"] is None  # CPU: not measured
    ratios = result["ratios"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert ratios["M1_ours_vs_transformers_eager"] == pytest.approx(
        rows["ours (no MTP)"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"])
    assert rows["ours (no MTP)"]["n_mtp_depth"] == 0 and rows["ours grouped"]["n_mtp_depth"] > 0


def test_mtp_flops_are_what_chapter_8_adds_by_hand():
    """flops_per_token(mtp=True) adds, per MTP depth, 6 x (its block, eh_proj and norms,
    and the shared head again) plus its block's attention: for V3 (one depth) exactly
    chapter 8's mtp_part; the default leaves the main model's count unchanged."""
    from dsv3lite import count_params
    from dsv3lite.config import ModelArgs
    from dsv3lite.train import flops_per_token

    for args, seq in ((ModelArgs.deepseek_v3(), 4096), (ModelArgs.h100_1b(), 1024)):
        count = count_params(args)
        assert args.n_mtp_depth == 1
        by_hand = (6 * (count.mtp[1] + count.components["output head"][1])
                   + 3 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq)
        assert flops_per_token(args, seq, mtp=True) - flops_per_token(args, seq) == by_hand
        main_only = 6 * (count.activated - count.components["embedding"][1]) + (
            3 * args.n_layers * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq)
        assert flops_per_token(args, seq) == main_only
    one, two = ModelArgs.small(), ModelArgs.small(n_mtp_depth=2)
    extra = [flops_per_token(a, 128, mtp=True) - flops_per_token(a, 128) for a in (one, two)]
    assert extra[1] == 2 * extra[0]  # each depth has its own block and passes the head again
    none = ModelArgs.small(n_mtp_depth=0)
    assert flops_per_token(none, 128, mtp=True) == flops_per_token(none, 128)


def test_peak_flops_tells_the_h100_variants_apart():
    import torch

    from dsv3lite.train import _peak_flops

    cuda = torch.device("cuda")
    assert _peak_flops(cuda, "NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert _peak_flops(cuda, "NVIDIA H200") == 989e12
    assert _peak_flops(cuda, "NVIDIA H100 PCIe") == 756e12
    assert _peak_flops(cuda, "NVIDIA H100 NVL") == 835e12
    assert _peak_flops(cuda, "NVIDIA Unknown GPU") is None  # no MFU against a guess
    assert _peak_flops(torch.device("cpu")) is None


def test_train_benchmark_spread_and_goal_rows():
    train = _load("train")
    stats = train.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert stats == {"min_step_s": 1.0, "q1_step_s": 2.0, "median_step_s": 3.0,
                     "q3_step_s": 4.0, "max_step_s": 5.0}
    assert train.spread([2.0])["q1_step_s"] == 2.0
    ns = train.argparse.Namespace(only="M1", smoke=False, compile=False, hf=False,
                                  fp8_dims=[])
    args = train.PRESETS["tiny"]()
    rows = train.build_rows(ns, args, cuda=True)
    assert [(r["name"], r["kind"], r["bf16"], r["compiled"], r["args"].n_mtp_depth)
            for r in rows] == [("ours (no MTP) compiled", "ours", True, True, 0),
                               ("transformers compiled", "hf", True, True, 0)]
    ns.only, ns.fp8_dims = "M2", [2048]
    assert [r["name"] for r in train.build_rows(ns, args, cuda=True)] == [
        "ours d=2048 bf16", "ours d=2048 fp8"]


def test_train_benchmark_rejects_bad_goal_flags(capsys):
    train = _load("train")
    assert train.main(["--only", "M1", "--fp8-dims", "1024", "--device", "cpu"]) == 2
    assert "--fp8-dims=1024 is invalid with --only M1" in capsys.readouterr().err
    assert train.main(["--warmup", "-1", "--device", "cpu"]) == 2
    assert "--warmup=-1 is invalid" in capsys.readouterr().err
    assert train.main(["--smoke", "--device", "cuda"]) == 2
    assert "--device=cuda is invalid with --smoke" in capsys.readouterr().err
