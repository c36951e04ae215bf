"""The Hopper FP8 GEMM and FP8Linear's backends: against the reference, on CPU and on CUDA.

- Interpreted (every CPU run): ``hopper_gemm.fp8_gemm_hopper`` runs under
  ``TRITON_INTERPRET=1`` in a child process (this file run as a script, as in
  tests/test_fp8_kernels.py), TMA descriptors included, and is compared with the
  float64 product of the dequantized operands (1e-5, the fp32 accumulation error) and
  with ``fp8_gemm_ref``.
- Compiled for sm_90 on this CPU (tests/aot.py): every autotune configuration, both
  scalings of b and both output dtypes, must build a cubin that uses TMA and wgmma and
  fits Hopper's 227 KB of shared memory per block.
- Backend selection (CPU): names checked at construction, ``fp8_backend`` sets and
  restores the default, the CPU runs the reference for every backend.
- ``benchmarks/fp8.py --only K1 --smoke`` runs end to end on the CPU.
- ``gpu`` tests: the compiled kernel and every backend against the reference.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsv3lite.fp8 import FP8Linear, backends, fp8_backend, linear_class
from dsv3lite.fp8.accumulation import promoted_gemm_tolerance
from dsv3lite.fp8.reference import act_quant_ref, dequantize_tiles, fp8_gemm_ref, weight_quant_ref
from interpret import interpreted_outputs

ROOT = Path(__file__).resolve().parents[1]
# (M, N, K, b tiles): TMA-aligned shapes with partial tiles in M, N and K, a single row,
# and K=300 (not a multiple of 16: TMA cannot move it, the teaching kernel takes over)
CASES = [(100, 200, 304, "128x128"), (128, 256, 384, "1x128"), (1, 576, 128, "128x128"),
         (130, 192, 272, "1x128"), (70, 136, 300, "128x128")]
SHARED_MEMORY_PER_BLOCK = 232448  # H100/H200: 227 KB of shared memory per thread block


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _operands(M, N, K, b_tiles, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + M * N * K)
    a_q, a_s = act_quant_ref(torch.randn(M, K, generator=g).to(device))
    b = torch.randn(N, K, generator=g).to(device)
    b_q, b_s = weight_quant_ref(b) if b_tiles == "128x128" else act_quant_ref(b)
    return a_q, a_s, b_q, b_s


def _exact(a_q, a_s, b_q, b_s, b_tiles):
    b_tile = (128, 128) if b_tiles == "128x128" else (1, 128)
    return (dequantize_tiles(a_q, a_s, (1, 128), torch.float64)
            @ dequantize_tiles(b_q, b_s, b_tile, torch.float64).t())


def _run_interpreted(inputs: dict) -> dict:
    """The child's job (under TRITON_INTERPRET=1): the Hopper kernel on every case, with
    row-major and K-major a scales."""
    from dsv3lite.fp8 import hopper_gemm

    assert hopper_gemm.INTERPRET, "the child must run with TRITON_INTERPRET=1"
    out = {}
    for case in CASES:
        a_q, a_s, b_q, b_s = (t.view(torch.float8_e4m3fn) if t.dtype == torch.uint8 else t
                              for t in inputs[case])
        out[case] = hopper_gemm.fp8_gemm_hopper(a_q, a_s, b_q, b_s, torch.float32)
        k_major = a_s.t().contiguous().t()
        out[("k-major",) + case] = hopper_gemm.fp8_gemm_hopper(a_q, k_major, b_q, b_s,
                                                               torch.float32)
        out[("tma",) + case] = hopper_gemm.tma_compatible(a_q, b_q, torch.float32)
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("hopper_interpret")
    inputs = {}
    for case in CASES:
        a_q, a_s, b_q, b_s = _operands(*case)
        inputs[case] = (a_q.view(torch.uint8), a_s, b_q.view(torch.uint8), b_s)
    return interpreted_outputs(__file__, inputs, folder)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_interpreted_hopper_gemm_matches_the_float64_dequantized_product(interpreted, case):
    M, N, K, b_tiles = case
    a_q, a_s, b_q, b_s = _operands(*case)
    c = interpreted[case]
    assert c.shape == (M, N) and c.dtype == torch.float32
    assert torch.equal(interpreted[("k-major",) + case], c)  # scale layout does not matter
    assert _rel(c, _exact(a_q, a_s, b_q, b_s, b_tiles)) <= 1e-5
    assert _rel(c, fp8_gemm_ref(a_q, a_s, b_q, b_s, torch.float32)) <= 1e-6
    assert interpreted[("tma",) + case] == (K % 16 == 0)  # K=300 took the teaching kernel


# ----------------------------------------------------------- compiled for sm_90
def _compile_all():
    sys.path.insert(0, str(ROOT / "tests"))
    from aot import compile_for_hopper, config_options, hopper_compile_skip_reason

    reason = hopper_compile_skip_reason()
    if reason:
        pytest.skip(reason)
    from dsv3lite.fp8 import hopper_gemm

    if hopper_gemm.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set in this process: nothing to compile")
    for config in hopper_gemm.GEMM_CONFIGS + hopper_gemm.QUICK_CONFIGS:
        for rows, out in ((128, "bf16"), (128, "fp32"), (1, "fp32"), (1, "bf16")):
            options = config_options(config)
            signature = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": f"*{out}",
                         "a_s_ptr": "*fp32", "b_s_ptr": "*fp32", "M": "i32", "N": "i32",
                         "K": "i32", "M_BUCKET": "i32", "K_BUCKET": "i32",
                         "stride_bsn": "i32", "stride_bsk": "i32"}
            constexprs = {**options["constexprs"], "B_SCALE_ROWS": rows, "BLOCK_K": 128,
                          "NUM_SMS": 132}
            yield config, rows, out, compile_for_hopper(
                hopper_gemm._hopper_gemm, signature, constexprs,
                num_warps=options["num_warps"], num_stages=options["num_stages"])


def test_hopper_gemm_compiles_for_sm90_with_tma_and_wgmma_in_every_config():
    """Every configuration the autotuner may pick builds for sm_90, moves its tiles with
    TMA (cp.async.bulk.tensor), multiplies with wgmma and fits in shared memory."""
    for config, rows, out, compiled in _compile_all():
        where = f"{config}, B_SCALE_ROWS={rows}, {out} out"
        ptx = compiled.asm["ptx"]
        assert "cp.async.bulk.tensor" in ptx, f"{where}: no TMA load"
        assert "wgmma.mma_async" in ptx, f"{where}: no wgmma"
        assert compiled.metadata.shared <= SHARED_MEMORY_PER_BLOCK, \
            f"{where}: {compiled.metadata.shared} bytes of shared memory"
        waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
        assert waits, f"{where}: no wgmma wait at all"  # documented: 0 pending (docstring)


def test_hopper_configs_keep_one_scalar_block_scale_per_program_and_k_block():
    from dsv3lite.fp8 import hopper_gemm

    for config in hopper_gemm.GEMM_CONFIGS + hopper_gemm.QUICK_CONFIGS:
        assert 128 % config.kwargs["BLOCK_N"] == 0, config  # b's 128x128 scale: one scalar
    assert len(hopper_gemm.QUICK_CONFIGS) == 1
    assert "K" not in hopper_gemm.AUTOTUNE_KEY and "M" not in hopper_gemm.AUTOTUNE_KEY


# ------------------------------------------------------------- backend selection
def test_a_bad_backend_name_fails_at_construction_naming_the_choices():
    with pytest.raises(ValueError, match=r"backend='cublas' is invalid: must be one of"):
        FP8Linear(256, 128, backend="cublas")
    with pytest.raises(ValueError, match="backend='Hopper' is invalid"):
        with fp8_backend("Hopper"):
            pass
    with pytest.raises(ValueError, match="backend='nope' is invalid"):
        backends.block_scaled_gemm(*_operands(4, 128, 128, "128x128"),
                                   torch.float32, "nope")


def test_scaled_mm_on_a_torch_without_it_fails_at_construction(monkeypatch):
    monkeypatch.setattr(backends, "F", SimpleNamespace())  # a torch before 2.10
    with pytest.raises(ValueError, match="backend='scaled_mm' is unavailable: torch"):
        FP8Linear(256, 128, backend="scaled_mm")
    assert FP8Linear(256, 128, backend="hopper").backend == "hopper"


def test_fp8_backend_sets_the_default_of_layers_built_inside_and_restores_it():
    assert backends.default_backend() == backends.DEFAULT_BACKEND == "triton"
    with fp8_backend("hopper"):
        built = linear_class(True)(256, 128, bias=False)  # how the model builds layers
        converted = FP8Linear.from_linear(torch.nn.Linear(256, 128))
        explicit = FP8Linear(256, 128, backend="triton")
        with fp8_backend("scaled_mm"):
            assert FP8Linear(256, 128).backend == "scaled_mm"
        assert FP8Linear(256, 128).backend == "hopper"
    assert (built.backend, converted.backend, explicit.backend) == ("hopper", "hopper", "triton")
    with pytest.raises(RuntimeError):
        with fp8_backend("hopper"):
            raise RuntimeError("a failure inside")
    assert FP8Linear(256, 128).backend == "triton" and "backend='triton'" in repr(explicit)


def test_every_backend_runs_the_reference_on_the_cpu():
    """Same values, forward and backward, bit for bit: the backend only matters on CUDA."""
    x, dy = torch.randn(300, 256), torch.randn(300, 384)
    results = {}
    for backend in backends.BACKENDS:
        torch.manual_seed(0)
        layer = FP8Linear(256, 384, backend=backend)
        xb = x.clone().requires_grad_()
        y = layer(xb)
        y.backward(dy)
        results[backend] = (y, xb.grad, layer.weight.grad, layer.bias.grad)
    for backend in ("hopper", "scaled_mm"):
        for ours, reference in zip(results[backend], results["triton"]):
            assert torch.equal(ours, reference), backend
    x_q, x_s = act_quant_ref(x)
    w_q, w_s = weight_quant_ref(layer.weight.detach())
    expected = fp8_gemm_ref(x_q, x_s, w_q, w_s, torch.float32) + layer.bias.detach()
    assert torch.equal(results["scaled_mm"][0].detach(), expected)


def test_backend_dispatch_compiles_as_one_graph_on_the_cpu():
    layer = FP8Linear(256, 128, backend="hopper")
    x = torch.randn(64, 256)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))


# ---------------------------------------------------------------- the benchmark
def test_fp8_benchmark_k1_smoke_runs_on_the_cpu_and_writes_its_json(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "benchmarks/fp8.py", "--only", "K1", "--smoke",
                          "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = tmp_path.glob("fp8-cpu-*-K1.json")
    result = json.loads(path.read_text())
    assert result["smoke"] is True and result["goals"] == ["K1"]
    assert result["all_checks_passed"] and result["correctness"]
    assert any("hopper" in name for name in result["correctness"])
    (row,) = result["gemm"]
    assert row["hopper_rel_err"] <= 4e-3 and row["fp8_hopper_ms"] > 0
    assert row["scaled_mm_ms"] is None and "no CUDA" in row["scaled_mm_layout_or_reason"]


# ----------------------------------------------------------------- on CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(4096, 2112, 7168), (64, 7168, 2048), (1000, 576, 304),
                                   (1000, 576, 300)])
@pytest.mark.parametrize("b_tiles", ["128x128", "1x128"])
def test_compiled_hopper_gemm_matches_the_float64_dequantized_product(M, N, K, b_tiles, hopper_cuda):
    from dsv3lite.fp8.hopper_gemm import fp8_gemm_hopper

    operands = _operands(M, N, K, b_tiles, hopper_cuda)
    exact = _exact(*operands, b_tiles)
    assert _rel(fp8_gemm_hopper(*operands, torch.float32), exact) <= promoted_gemm_tolerance()
    bf16 = fp8_gemm_hopper(*operands, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and _rel(bf16, exact) <= 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("tokens", [1024, 700])
def test_fp8_linear_backend_on_cuda_matches_the_cpu_reference(backend, tokens, hopper_cuda):
    """Fprop, Dgrad and Wgrad of every backend against the CPU reference path (700
    tokens: Wgrad's K is not whole 128-tiles, the fast paths hand it on)."""
    device = hopper_cuda
    if backend == "scaled_mm" and not backends.has_blockwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__} has no blockwise scaled_mm")
    cpu = FP8Linear(1024, 768, bias=False)
    gpu = FP8Linear(1024, 768, bias=False, backend=backend).to(device)
    gpu.load_state_dict(cpu.state_dict())
    x, dy = torch.randn(tokens, 1024), torch.randn(tokens, 768)
    results = []
    for module, dev in ((cpu, "cpu"), (gpu, device)):
        xd = x.to(dev).requires_grad_()
        module(xd).backward(dy.to(dev))
        results.append([t.detach().cpu() for t in (module(xd), xd.grad, module.weight.grad)])
    for name, ours, reference in zip(("y", "dx", "dW"), results[1], results[0]):
        assert _rel(ours, reference) <= promoted_gemm_tolerance(), (backend, name)


if __name__ == "__main__":  # the interpreted child process (see the module docstring)
    torch.save(_run_interpreted(torch.load(sys.argv[1])), sys.argv[2])
