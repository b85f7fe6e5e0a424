"""W8A8 INT8 Triton GEMM: int8 activations x per-channel int8 weights, int32 accumulation, fused epilogue.

``out[m, n] = acc[m, n] * a_scale[m] * w_scale[n] (+ bias[n])`` in the activation dtype, where ``acc`` is
the exact int32 product. Activations come from :mod:`quantarena.kernels.triton_act_quant` (dynamic
per-token, or a static per-tensor scale: ``a_scale`` is then read with stride 0).

Small M uses split-K so that enough programs run; partial int32 sums go to a workspace and the last
program of a tile (an atomic counter, reset by that program) adds them exactly and runs the epilogue.
Large M uses grouped tile order so that neighbouring programs share weight tiles in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pdl import pdl_launch, prefetch_rows, wait
from .triton_w4a16 import MAX_TILES, split_k_counters, split_k_reduce, split_k_workspace


@triton.jit
def _a_scales(a_scale_ptr, rm, M, stride_as):
    """The activation scales of rows rm from memory (0 past M): [M, 1] float32, or a static one at stride 0."""
    return tl.load(a_scale_ptr + rm * stride_as, mask=rm < M, other=0.0)


@triton.jit
def _epilogue(acc, a_s, w_scale_ptr, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """out[rm, rn] = acc * a_s[rm] * w_scale[rn] (+ bias[rn]); a_s [BM] float32 is passed in (loaded by
    :func:`_a_scales`, or computed by a kernel that quantizes its own activations)."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    w_s = tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(acc, a_s, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn, M, N, stride_om,
            pid_k, tile_id, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr = False):
    """acc [BM, BN] (int32 or fp32): the epilogue, at once or, with split-K, by the last program of the tile
    on the sum of every split's partial (:func:`.triton_w4a16.split_k_reduce`; ``ATOMIC``: added into one zeroed
    workspace, exact and order-free for int32 sums)."""
    if SPLIT_K == 1:
        _epilogue(acc, a_s, w_scale_ptr, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)
    else:
        total, last = split_k_reduce(acc, ws_ptr, cnt_ptr, rm, rn, M, N, pid_k, tile_id, SPLIT_K, ATOMIC)
        if last:
            _epilogue(total, a_s, w_scale_ptr, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)


@triton.jit
def _grouped(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile`` in grouped order: GROUP_M row tiles walk the N tiles together, so
    neighbouring programs share weight tiles in L2."""
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % (GROUP_M * num_n)) % size_m, (tile % (GROUP_M * num_n)) // size_m


@triton.jit
def int8_gemm_kernel(a_ptr, b_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                     M, N, K, stride_am, stride_bn, stride_as, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
                     EVEN_K: tl.constexpr, ATOMIC: tl.constexpr = False, PDL: tl.constexpr = False, pf_bytes=0,
                     LANES: tl.constexpr = 128):
    """a: int8 [M, K]; b: int8 [N, K] (the weight, row-major); out [M, N]. ``PDL``: launched with programmatic
    dependent launch; the programs of the first row tile ask the L2 for the first ``pf_bytes`` of each of their
    weight rows' K slice (LANES = 32 x num_warps), then every program waits for the previous kernel
    (:mod:`.triton_pdl`)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped(pid, num_m, num_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ram = tl.max_contiguous(tl.multiple_of(tl.minimum(rm, M - 1), BLOCK_M), BLOCK_M)   # clamped rows, not stored
    rbn = tl.max_contiguous(tl.multiple_of(tl.minimum(rn, N - 1), BLOCK_N), BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PDL:
        if pid_m == 0:
            prefetch_rows(b_ptr + k_start, pid_n * BLOCK_N, N, stride_bn, tl.minimum(pf_bytes, k_end - k_start),
                          BLOCK_N, LANES)
        wait()
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            a = tl.load(a_ptr + ram[:, None] * stride_am + k[None, :])
            b = tl.load(b_ptr + rbn[:, None] * stride_bn + k[None, :])
        else:
            a = tl.load(a_ptr + ram[:, None] * stride_am + k[None, :], mask=k[None, :] < k_end, other=0)
            b = tl.load(b_ptr + rbn[:, None] * stride_bn + k[None, :], mask=k[None, :] < k_end, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    _finish(acc, _a_scales(a_scale_ptr, rm, M, stride_as), w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn,
            M, N, stride_om, pid_k, pid_m * num_n + pid_n, SPLIT_K, HAS_BIAS, ATOMIC)


@triton.jit
def a8w8_swap_kernel(a_ptr, b_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                     M, N, K, stride_am, stride_bn, stride_as, stride_om,
                     HAS_BIAS: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                     ATOMIC: tl.constexpr = False, PDL: tl.constexpr = False, pf_bytes=0,
                     LANES: tl.constexpr = 128):
    """Skinny-M variant ("swap-AB"): the tile is ``W[BN, BK] @ a^T[BK, BM]`` so the wide weight dimension fills
    the tensor cores' M slot and a handful of tokens the N slot. int8 x int8 -> int32 (exact) or
    fp8 e4m3 x fp8 e4m3 -> fp32; same epilogue and split-K finish as :func:`int8_gemm_kernel`."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ram = tl.minimum(rm, M - 1)
    rbn = tl.max_contiguous(tl.multiple_of(tl.minimum(rn, N - 1), BLOCK_N), BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PDL:   # see int8_gemm_kernel
        if pid_m == 0:
            prefetch_rows(b_ptr + k_start, pid_n * BLOCK_N, N, stride_bn, tl.minimum(pf_bytes, k_end - k_start),
                          BLOCK_N, LANES)
        wait()
    rk = tl.arange(0, BLOCK_K)
    if FP8:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            w = tl.load(b_ptr + rbn[:, None] * stride_bn + k[None, :])                 # [BN, BK]
            at = tl.load(a_ptr + ram[None, :] * stride_am + k[:, None])                # [BK, BM]
        else:
            # other=0.0: a float converts to int8 and to e4m3 (an integer 0 has no conversion to fp8)
            w = tl.load(b_ptr + rbn[:, None] * stride_bn + k[None, :], mask=k[None, :] < k_end, other=0.0)
            at = tl.load(a_ptr + ram[None, :] * stride_am + k[:, None], mask=k[:, None] < k_end, other=0.0)
        if FP8:
            acc = tl.dot(w, at, acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(w, at, acc, out_dtype=tl.int32)
    _finish(tl.trans(acc), _a_scales(a_scale_ptr, rm, M, stride_as), w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
            rm, rn, M, N, stride_om, pid_k, pid_m * num_n + pid_n, SPLIT_K, HAS_BIAS, ATOMIC)


def codes_are_fp8(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the activation and weight codes are fp8 e4m3 (else int8); a ValueError when they differ."""
    fp8 = a.dtype == torch.float8_e4m3fn
    if fp8 != (weight.dtype == torch.float8_e4m3fn):
        raise ValueError(f"activation codes {a.dtype} and weight codes {weight.dtype} must be both int8 or both fp8")
    return fp8


def swap_config(m: int, n: int, k: int, sms: int) -> dict:
    """Default skinny-M tile (the tuned table, :mod:`.tuned_w8a8`, wins where it has the shape)."""
    block_m = max(16, min(128, triton.next_power_of_2(m)))
    block_n, block_k = 128, 128
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split, k_steps = 1, triton.cdiv(k, block_k)
    while tiles * split < 2 * sms and split * 2 <= k_steps and split < 16 and tiles <= MAX_TILES:
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=4)


def a8w8_swap_gemm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """As :func:`int8_gemm` for int8 or fp8 e4m3 codes (``a`` and ``weight`` of the same kind), swap-AB tiles."""
    m, k = a.shape
    n = weight.shape[0]
    fp8 = codes_are_fp8(a, weight)
    w_scale = weight_scale.reshape(-1)
    cfg = dict(cfg or swap_config(m, n, k, _sm_count(a.device)))
    split = cfg["SPLIT_K"]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    ws, cfg["ATOMIC"] = split_k_workspace(a.device, m, n, split, torch.float32 if fp8 else torch.int32,
                                          bool(cfg.get("ATOMIC")))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    pdl = pdl_launch(cfg, a, weight, grid[0] * split)
    a8w8_swap_kernel[grid](a, weight, a_scale, w_scale, bias if bias is not None else w_scale, out, ws,
                           split_k_counters(a.device), m, n, k, a.stride(0), weight.stride(0), a_scale.stride(0),
                           out.stride(0), HAS_BIAS=bias is not None, FP8=fp8,
                           EVEN_K=k % (cfg["BLOCK_K"] * split) == 0, **cfg, **pdl)
    return out


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


# tile configs measured best per M bucket (next power of two, 16..4096) on H100 over the Llama-3-8B
# shapes by benchmarks/kernels.py --tune (2026-11-23); split-K is still chosen per shape below
TUNED_INT8: dict[int, dict] = {
    16: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4),
    32: dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4),
    64: dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, num_warps=4, num_stages=4),
    128: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4),
    256: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
    512: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
    1024: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
    2048: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    4096: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
}


def int8_config(m: int, n: int, k: int, sms: int) -> dict:
    """Tile shape by M: skinny tiles + split-K for decode sizes, big tiles for prefill sizes."""
    bucket = min(max(16, triton.next_power_of_2(m)), 4096)
    if bucket in TUNED_INT8:
        cfg = dict(TUNED_INT8[bucket])
    elif m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=triton.next_power_of_2(m), BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4)
    elif m <= 256:
        cfg = dict(BLOCK_M=64 if m <= 128 else 128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = 1
    k_steps = triton.cdiv(k, cfg["BLOCK_K"])
    while tiles * split < 2 * sms and split * 2 <= k_steps and split < 16 and tiles <= MAX_TILES:
        split *= 2
    cfg["SPLIT_K"] = split
    cfg["GROUP_M"] = 8
    return cfg


def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """a: int8 [M, K]; a_scale float32 [M, 1] (or an expanded static scalar, stride 0); weight int8 [N, K];
    weight_scale float32 [N] or [N, 1] -> [M, N] in out_dtype."""
    m, k = a.shape
    n = weight.shape[0]
    w_scale = weight_scale.reshape(-1)
    cfg = dict(cfg or int8_config(m, n, k, _sm_count(a.device)))
    split = cfg["SPLIT_K"]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    ws, cfg["ATOMIC"] = split_k_workspace(a.device, m, n, split, torch.int32, bool(cfg.get("ATOMIC")))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    pdl = pdl_launch(cfg, a, weight, triton.cdiv(n, cfg["BLOCK_N"]) * split)   # the first row tile's programs
    int8_gemm_kernel[grid](a, weight, a_scale, w_scale, bias if bias is not None else w_scale, out, ws,
                           split_k_counters(a.device), m, n, k, a.stride(0), weight.stride(0), a_scale.stride(0),
                           out.stride(0),
                           HAS_BIAS=bias is not None, EVEN_K=k % (cfg["BLOCK_K"] * split) == 0, **cfg, **pdl)
    return out


# ----------------------------------------------------------------------------- large M: TMA, persistent

@triton.jit
def a8w8_tma_kernel(a_desc, b_desc, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_as, stride_om,
                    HAS_BIAS: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                    b_ptr=None, stride_bn=0, PDL: tl.constexpr = False, pf_bytes=0, LANES: tl.constexpr = 128,
                    WARP_SPEC: tl.constexpr = False):
    """Prefill-sized M: a persistent kernel (one program per SM walks the output tiles in grouped order) whose
    operand tiles come through tensor-memory-access descriptors (``a_desc`` [M, K] and ``b_desc`` [N, K] with
    [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K] boxes; out-of-range rows and K are zero-filled by the copy engine,
    so no masks). int8 -> exact int32 or fp8 -> fp32; the epilogue of :func:`int8_gemm_kernel`.
    ``PDL``: a program whose first tile is in the first row tile asks the L2 for the first ``pf_bytes`` of
    that tile's weight rows (``b_ptr``, ``stride_bn`` bytes per row); then every program waits for the previous
    kernel (:mod:`.triton_pdl`). ``WARP_SPEC``: Triton's warp specialization of the K loop (loads and MMAs in
    separate warps; Hopper support since Triton 3.5)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if PDL:
        first_m, first_n = _grouped(tl.program_id(0), num_m, num_n, GROUP_M)
        if first_m == 0:
            prefetch_rows(b_ptr, first_n * BLOCK_N, N, stride_bn, tl.minimum(pf_bytes, K), BLOCK_N, LANES)
        wait()
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        pid_m, pid_n = _grouped(tile, num_m, num_n, GROUP_M)
        if FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in tl.range(k_tiles, warp_specialize=WARP_SPEC):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.float32 if FP8 else tl.int32)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, _a_scales(a_scale_ptr, rm, M, stride_as), w_scale_ptr, bias_ptr, out_ptr, rm, rn, M, N,
                  stride_om, HAS_BIAS)


def tma_supported(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Descriptors need 16-byte aligned rows (K a multiple of 16 one-byte codes) and contiguous operands."""
    return a.shape[1] % 16 == 0 and a.is_contiguous() and weight.is_contiguous()


def tma_config(m: int, n: int, k: int) -> dict:
    """Default large-M tile (the tuned table, :mod:`.tuned_w8a8`, wins where it has the shape)."""
    return dict(BLOCK_M=128, BLOCK_N=256 if n >= 4096 else 128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def a8w8_tma_gemm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """As :func:`int8_gemm` (int8 or fp8 e4m3 codes, both of one kind), persistent with TMA loads; see
    :func:`tma_supported` for the shapes it takes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    n = weight.shape[0]
    fp8 = codes_are_fp8(a, weight)
    if not tma_supported(a, weight):
        raise ValueError(f"the TMA GEMM needs contiguous operands and K % 16 == 0 (K={k})")
    cfg = dict(cfg or tma_config(m, n, k))
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_desc = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    b_desc = TensorDescriptor.from_tensor(weight, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    programs = min(tiles, _sm_count(a.device))
    w_scale = weight_scale.reshape(-1)
    pdl = pdl_launch(cfg, a, weight, min(programs, triton.cdiv(n, cfg["BLOCK_N"])))
    a8w8_tma_kernel[(programs,)](a_desc, b_desc, a_scale, w_scale, bias if bias is not None else w_scale, out,
                                 m, n, k, a_scale.stride(0), out.stride(0), HAS_BIAS=bias is not None, FP8=fp8,
                                 NUM_PROGRAMS=programs, b_ptr=weight, stride_bn=weight.stride(0), **cfg, **pdl)
    return out

