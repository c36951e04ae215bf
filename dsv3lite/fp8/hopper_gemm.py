# mypy: disable-error-code="no-untyped-def"
# (the @triton.jit kernels here annotate only their tl.constexpr parameters, as Triton
# wants: hints on the others would change how Triton specializes them)
"""The block-scaled FP8 GEMM, built for Hopper: TMA, a persistent grid, scales once per K block.

Same contract as :func:`~dsv3lite.fp8.kernels.fp8_gemm_triton`, the readable kernel
that chapter 5 shows (c = a @ b^T, a in 1x128 tiles, b in 128x128 blocks or, for Wgrad,
1x128 tiles; fp32 promotion every 128-wide K block, [V3] §3.3.2), and the same
arithmetic. What changes is how the data reaches the tensor cores:

- **TMA descriptors** (``tl.make_tensor_descriptor``): a, b and c are moved by Hopper's
  Tensor Memory Accelerator, one instruction per tile; partial tiles at the edges are
  zero-filled by the hardware, which is the reference's zero padding.
- **Scales loaded once per K block.** b's 128x128 block scale is one scalar per
  (n-block, k), loaded as one scalar; a's 1x128 scales are read K-major (one contiguous
  row of ``BLOCK_M`` floats per K block, :func:`~dsv3lite.fp8.segments.k_major`); the
  two are multiplied into one ``BLOCK_M`` vector, so promoting a K block's partial sum
  costs one fused multiply-add per output element.
- **Each K block's product in a fresh fp32 tile**, then scale-added into the
  accumulator, as DeepGEMM does ([DG]): the accumulator is never an input of the MMA,
  so no MMA depends on the previous block's scaling. Triton 3.7, compiling this for
  sm_90, still waits for each wgmma before its scale-add (``warp_group_dot_wait``
  with 0 pending in the TTGIR, as for the teaching kernel; an explicitly deferred
  scale-add did not change that and overflowed shared memory); what keeps the tensor
  cores fed is the TMA pipeline, ``num_stages`` K blocks ahead.
- **A persistent grid in grouped launch order**: one program per SM walks the output
  tiles, ``GROUP_M`` row tiles at a time so their b columns are reused from L2.

TMA needs 16-byte aligned rows: K a multiple of 16 (fp8) and N of 8 (bf16 out) or 4
(fp32 out), contiguous operands. Other shapes go to the teaching kernel, which takes
anything. The speed of this kernel has not been measured in this project yet (no GPU
so far); ``benchmarks/fp8.py`` sets it beside torch's blockwise ``scaled_mm`` (goal K1).

Importing this module imports Triton (see :mod:`dsv3lite.fp8.kernels` on
``TRITON_INTERPRET``: the interpreter runs this kernel too, TMA descriptors included).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .kernels import INTERPRET, fp8_gemm_triton
from .reference import BLOCK_SIZE, check_gemm_operands

__all__ = ["fp8_gemm_hopper", "tma_compatible", "GEMM_CONFIGS", "QUICK_CONFIGS",
           "AUTOTUNE_KEY"]

QUICK_AUTOTUNE = os.environ.get("DSV3LITE_QUICK_AUTOTUNE", "0") == "1"
"""``DSV3LITE_QUICK_AUTOTUNE=1`` (read at import): autotune over :data:`QUICK_CONFIGS`
only, so that ``make gpu-check`` fits its time."""


@triton.jit
def _tile_of(tile_id, n_pid_m, n_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile_id`` in grouped order: GROUP_M row tiles
    walk the column tiles together, so each b tile is read from L2 GROUP_M times."""
    in_group = GROUP_M * n_pid_n
    first_m = tile_id // in_group * GROUP_M
    group_m = min(n_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % in_group) % group_m, (tile_id % in_group) // group_m


@triton.jit
def _hopper_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, M_BUCKET, K_BUCKET,
                        stride_bsn, stride_bsk, B_SCALE_ROWS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
    """c[M, N] = sum over K blocks of (a_blk @ b_blk^T) * a_s[m, k] * b_s[n // B_SCALE_ROWS, k].

    a (M, K), b (N, K), c (M, N) are contiguous; a_s is K-major: (ceil(K/128), M)
    contiguous. b_s: B_SCALE_ROWS = 128, any strides, one scalar per (n block, k);
    B_SCALE_ROWS = 1, K-major (ceil(K/128), N) contiguous. ``M_BUCKET``/``K_BUCKET`` are
    autotuning keys only (see ``kernels._fp8_gemm_kernel``).
    """
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    n_pid_m, n_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), n_pid_m * n_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_of(tile_id, n_pid_m, n_pid_n, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        a_s_ptrs = a_s_ptr + rows  # K-major: one contiguous row of scales per K block
        if B_SCALE_ROWS == 1:  # Wgrad: one scale per row of b, K-major like a's
            b_s_ptrs = b_s_ptr + cols
        else:  # one scalar per (n block, k): BLOCK_N divides 128
            b_s_ptrs = b_s_ptr + (off_n // B_SCALE_ROWS) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            a = a_desc.load([off_m, k * BLOCK_K])  # (BM, BK), zero past M and K
            b = b_desc.load([off_n, k * BLOCK_K])  # (BN, BK), zero past N and K
            partial = tl.dot(a, b.T)  # a fresh fp32 tile: the accumulator is not an input
            a_s = tl.load(a_s_ptrs, mask=rows < M, other=0.0)
            if B_SCALE_ROWS == 1:
                b_s = tl.load(b_s_ptrs, mask=cols < N, other=0.0)
                acc += partial * a_s[:, None] * b_s[None, :]
            else:
                b_s = tl.load(b_s_ptrs)  # one scalar
                acc += partial * (a_s * b_s)[:, None]  # one FMA per element
            a_s_ptrs += M  # pointers are 64-bit: no int32 product of k and M
            b_s_ptrs += N if B_SCALE_ROWS == 1 else stride_bsk
        c_desc.store([off_m, off_n], acc.to(c_ptr.dtype.element_ty))  # rows/cols past M, N dropped


def _configs(shapes: list[tuple[int, int, int, int]]) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=stages,
                          num_warps=warps) for bm, bn, stages, warps in shapes]


GEMM_CONFIGS = _configs([(128, 128, 3, 8), (128, 128, 4, 8), (128, 64, 4, 4), (64, 128, 4, 4)])
"""Tiles for H100-class GPUs: BLOCK_K is the 128 of the scale groups; BLOCK_N <= 128 so
that a 128x128 block scale is one scalar per program and K block."""
QUICK_CONFIGS = _configs([(128, 128, 4, 8)])
"""The one configuration tried when ``DSV3LITE_QUICK_AUTOTUNE=1``."""
#: Kernel arguments whose values select a cached autotuning result: the bucketed M and K
#: (next powers of 2), N, and whether the weight has one scale row per N block.
AUTOTUNE_KEY = ["M_BUCKET", "N", "K_BUCKET", "B_SCALE_ROWS"]
INTERPRET_TILE = dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=2)
"""The fixed tile of the interpreter, which cannot autotune."""

if INTERPRET:
    _hopper_gemm = _hopper_gemm_kernel
    _FIXED = INTERPRET_TILE
else:
    _hopper_gemm = triton.autotune(QUICK_CONFIGS if QUICK_AUTOTUNE else GEMM_CONFIGS,
                                   key=AUTOTUNE_KEY)(_hopper_gemm_kernel)
    _FIXED = {}


def tma_compatible(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether TMA can move these operands: contiguous, 16-byte aligned base pointers and
    rows (K a multiple of 16 for E4M3, N times the output's element size of 16)."""
    K, N = b.shape[1], b.shape[0]
    out_bytes = torch.empty((), dtype=out_dtype).element_size()
    return (a.is_contiguous() and b.is_contiguous() and K % 16 == 0
            and (N * out_bytes) % 16 == 0 and a.data_ptr() % 16 == 0
            and b.data_ptr() % 16 == 0)


def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4  # the interpreter runs programs one after another: a few suffice
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_gemm_hopper(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Block-scaled FP8 GEMM c = a @ b^T on Hopper (same contract as ``fp8_gemm``).

    Args:
        a: (..., K) E4M3 with a_s (..., ceil(K/128)) scales, any strides.

        b: (N, K) E4M3 with b_s (ceil(N/128), ceil(K/128)) (128x128 blocks) or
            (N, ceil(K/128)) (1x128 tiles, Wgrad).

        out_dtype: bf16 or fp32 (default ``torch.get_default_dtype()``).

    Returns:
        (..., N) tensor. Shapes TMA cannot move (:func:`tma_compatible`) are computed by
        the teaching kernel ``fp8_gemm_triton`` instead, with the same result.
    """
    b_scale_rows = check_gemm_operands(a, a_s, b, b_s)
    out_dtype = out_dtype or torch.get_default_dtype()
    if out_dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"out_dtype={out_dtype} is invalid: must be torch.bfloat16, "
                         "torch.float16 or torch.float32")
    (N, K), nk = b.shape, a_s.shape[-1]
    a2 = a.reshape(-1, K)
    M = a2.shape[0]
    if M == 0 or N == 0 or K == 0 or not tma_compatible(a2, b, out_dtype):
        return fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    a_s_k = a_s.reshape(-1, nk).t().contiguous()  # (nk, M): free when already K-major
    if b_scale_rows == 1:
        b_s = b_s.t().contiguous()  # (nk, N), K-major like a's
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    device = a.device
    triton.set_allocator(lambda size, alignment, stream: torch.empty(
        size, dtype=torch.int8, device=device))  # global memory for the TMA descriptors
    num_sms = _num_sms(device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(num_sms, tiles),)

    _hopper_gemm[grid](a2, b, c, a_s_k, b_s, M, N, K, min(triton.next_power_of_2(M), 8192),
                       min(triton.next_power_of_2(K), 16384), b_s.stride(0), b_s.stride(1),
                       B_SCALE_ROWS=b_scale_rows, BLOCK_K=BLOCK_SIZE, NUM_SMS=num_sms,
                       **_FIXED)
    return c.view(*a.shape[:-1], N)
