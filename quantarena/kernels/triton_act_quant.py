"""Activation quantization: bf16/fp16 rows -> int8 or fp8 e4m3 codes + per-token scales, one kernel.

One program per row. A row is read once and kept in registers, or, when it is long (over 32768 elements, or
over 8192 with M >= 256: :func:`launch_shape`), read twice in chunks (pass 1 finds the absmax after the
optional SmoothQuant divide, pass 2 rounds). Static (a
given per-tensor ``input_scale``): no absmax. The arithmetic is the reference's
(:func:`quantarena.kernels.reference.act_quant_int8` / ``act_quant_fp8``) step for step in float32 with
correctly rounded division, so int8 codes and scales match it bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_pdl import pdl_ok, trigger
from .triton_w4a16 import INTERPRETING

TINY = 1e-12  # the absmax floor of quantarena.primitives
MAX_ONE_PASS = 32768  # rows up to this many (padded) elements are read once and kept in registers


@triton.jit
def _rint(y):
    """Round half to even for |y| < 2^22 (adding 1.5 * 2^23 leaves no fraction bits), like torch.round."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _load_row(x_row, smooth_ptr, k, K, HAS_SMOOTH: tl.constexpr, GATED: tl.constexpr = False,
              LIBDEVICE: tl.constexpr = True):
    """The row's activations in float32; GATED: the row holds [gate | up] (2K wide), x = silu(gate) * up."""
    x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    if GATED:  # torch's float32 silu, x / (1 + exp(-x)): the same expf (libdevice) and a correctly rounded divide
        up = tl.load(x_row + K + k, mask=k < K, other=0.0).to(tl.float32)
        if LIBDEVICE:
            e = libdevice.exp(-x)
        else:  # the interpreter has no libdevice
            e = tl.exp(-x)
        x = tl.math.div_rn(x, 1.0 + e) * up
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + k, mask=k < K, other=1.0))
    return x


@triton.jit
def _store_codes(y, q_ptr, row, stride_qm, k, K, FP8: tl.constexpr, QMAX: tl.constexpr):
    if FP8:
        q = tl.clamp(y, -QMAX, QMAX).to(q_ptr.dtype.element_ty)
    else:
        q = _rint(tl.clamp(y, -128.0, 127.0)).to(tl.int8)
    tl.store(q_ptr + row * stride_qm + k, q, mask=k < K)


@triton.jit
def act_quant_kernel(x_ptr, smooth_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_xm, stride_qm,
                     HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, FP8: tl.constexpr,
                     QMAX: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr = False,
                     LIBDEVICE: tl.constexpr = True, TRIGGER: tl.constexpr = False):
    """q[row] = round(x[row] / smooth / scale[row]); scale = absmax / QMAX (dynamic) or the static scale.
    When BLOCK_K >= K the row is read once and kept in registers; otherwise twice (absmax, then codes).
    ``TRIGGER``: let a GEMM launched with PDL start now (:mod:`.triton_pdl`); it waits for this kernel's end."""
    if TRIGGER:
        trigger()
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    if BLOCK_K >= K:
        k = tl.arange(0, BLOCK_K)
        x = _load_row(x_row, smooth_ptr, k, K, HAS_SMOOTH, GATED, LIBDEVICE)
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
        else:
            scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), QMAX)
            tl.store(scale_ptr + row, scale)
        _store_codes(tl.math.div_rn(x, scale + tl.zeros_like(x)), q_ptr, row, stride_qm, k, K, FP8, QMAX)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
        else:
            absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = _load_row(x_row, smooth_ptr, k0 + tl.arange(0, BLOCK_K), K, HAS_SMOOTH, GATED, LIBDEVICE)
                absmax = tl.maximum(absmax, tl.abs(x))
            scale = tl.math.div_rn(tl.maximum(tl.max(absmax, axis=0), 1e-12), QMAX)
            tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = _load_row(x_row, smooth_ptr, k, K, HAS_SMOOTH, GATED, LIBDEVICE)
            y = tl.math.div_rn(x, scale + tl.zeros_like(k).to(tl.float32))
            _store_codes(y, q_ptr, row, stride_qm, k, K, FP8, QMAX)


def launch_shape(m: int, k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) for M rows of K values (after the gate), from the H100 run of
    ``benchmarks/act_quant_tune.py`` (h100-act-quant-tune.json; M 1, 16, 256, 4096, K 4096-28672, plain and gated).
    Rows wider than 8192 at M >= 256 are walked in 2048/4096-wide chunks by 8 warps (two reads, the second from
    L2): holding a whole row in registers lets one program fill an SM, which then alternates between loading and
    computing (K 28672 gated, M 4096: 1062 -> 388 us; K 14336 plain: 96 -> 76 us). Below M 256 a row stays in
    registers, spread over 32 warps from 8192 wide (4-17% faster at M 1-16 than 8-16 warps)."""
    block_k = triton.next_power_of_2(k)
    if block_k > MAX_ONE_PASS:
        return min(4096, MAX_ONE_PASS), 8
    if block_k > 8192 and m >= 256:
        return (2048 if k <= 16384 else 4096), 8
    if block_k >= 8192 and m < 256:
        return block_k, 32
    return block_k, (4 if block_k <= 2048 else 8 if block_k <= 8192 else 16)


def act_quant(x2: torch.Tensor, fp8: bool = False, input_scale: torch.Tensor | None = None,
              smooth: torch.Tensor | None = None, gated: bool = False,
              cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (codes int8 or float8_e4m3fn [M, K], float32 scale [M, 1]).

    ``input_scale`` (per-tensor, static) skips the absmax pass; ``smooth`` [K] divides x first.
    ``gated``: x2 is [M, 2K] = [gate | up] and the codes are those of silu(gate) * up, computed in float32
    in the kernel (an MLP's SiLU-mul fused into the down projection's activation quantization), with the
    arithmetic of torch's CUDA silu so that the int8 codes equal the reference's.
    ``cfg`` ``{"BLOCK_K", "num_warps"}`` overrides the launch (tuning): a BLOCK_K below the row width reads
    each row twice; the codes and scales are the same either way (an absmax is order-free)."""
    m, k = x2.shape
    if gated:
        if k % 2:
            raise ValueError(f"a gated activation needs an even width [gate | up], got {k}")
        k //= 2
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x2.device)
    if input_scale is not None:
        static = input_scale.float().reshape(1).contiguous()
        scale = static.reshape(1, 1).expand(m, 1)
    else:
        static = None
        scale = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    block_k, warps = (cfg["BLOCK_K"], cfg["num_warps"]) if cfg else launch_shape(m, k)
    if cfg and (block_k < 16 or block_k & (block_k - 1) or warps not in (1, 2, 4, 8, 16, 32)):
        raise ValueError(f"act_quant launch needs a power-of-two BLOCK_K >= 16 and 1-32 warps (a power of two), "
                         f"got BLOCK_K={block_k}, num_warps={warps}")
    act_quant_kernel[(m,)](x2, smooth if smooth is not None else x2, q, scale,
                           static if static is not None else scale, k, x2.stride(0), q.stride(0),
                           HAS_SMOOTH=smooth is not None, STATIC=static is not None, FP8=fp8,
                           QMAX=448.0 if fp8 else 127.0, BLOCK_K=block_k, GATED=gated,
                           LIBDEVICE=not INTERPRETING, TRIGGER=pdl_ok(x2.device), num_warps=warps)
    return q, scale
