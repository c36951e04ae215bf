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
        assert row["mfu"] is None and row["peak_memory_bytes"] is None  # CPU: not measured
    ratios = result["ratios"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert ratios["M1_ours_vs_transformers_eager"] == pytest.approx(
        rows["ours (no MTP)"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"])
    assert rows["ours (no MTP)"]["n_mtp_depth"] == 0 and rows["ours grouped"]["n_mtp_depth"] > 0
