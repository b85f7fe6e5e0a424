"""W4A16 tensor-core GEMM for small and medium M (Triton), "swap-AB".

The tile computed is ``out^T[BN, BM] = W[BN, BK] @ x^T[BK, BM]``: the dequantized weight tile is the
left operand of the dot, so the wide weight dimension fills the tensor cores' M slot and a few tokens the
N slot. The weight words are read along K (the contiguous dimension of the canonical ``[N, K/8]``
layout), so the loads are coalesced. (Hopper's ``wgmma`` could take the left operand from registers, but
Triton 3.6 still stages the dequantized tile through shared memory before the dot: see
``benchmarks/results/h100-notes.md``.)

The tile is loaded once as ``[BN, BK/8]`` words and its nibbles are made floats in one of two ways
(``UNPACK``):

* ``1``: eight nibble planes by shift-and-mask, or-ed into the mantissa of ``2^23`` (``u | 0x4B000000``
  is the float ``2^23 + u``, no int->float convert), interleaved back into ``[BN, BK]``; the
  ``2^23 + 8 (+ zero)`` offset is subtracted exactly.
* ``2`` (GPU only, the tuned choice): bf16 pairs straight from inline PTX (prmt, lop3 and one bf16x2 fma
  per two weights, plus two shifts per two words). The interpreter cannot run PTX, so under
  ``TRITON_INTERPRET`` (and for fp16 activations) the launcher runs ``1``; the GPU benchmark and the
  kernel tests on a GPU check ``2`` against the reference.

The group scale multiplies the fp32 dot result of a K step (``BLOCK_K`` divides the group size), which is
cheaper than scaling every weight. Split-K reuses the single-launch counter finish of :mod:`.triton_w4a16`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import (INTERPRETING, MAX_TILES, StripedWeight, _dot, _sm_count, _split_for,
                           _split_k_finish, split_k_counters)


@triton.jit
def _load_words(w_ptr, w_desc, rbn, n0, kw0, KW, BLOCK_K: tl.constexpr, TMA: tl.constexpr):
    """The [BN, BK/8] words of the tile starting at row n0 (rows ``rbn``, clamped) and word kw0: a pointer
    load, or with ``TMA`` a tensor-descriptor load (the copy engine zero-fills rows past N)."""
    if TMA:
        return w_desc.load([n0, kw0])
    rkw = tl.arange(0, BLOCK_K // 8)
    return tl.load(w_ptr + rbn[:, None] * KW + (kw0 + rkw)[None, :])


@triton.jit
def _unpack_tile(words, BLOCK_K: tl.constexpr):
    """Nibbles u in [0, 16) of a [BN, BK/8] word tile as [BN, BK] floats 2^23 + u."""
    a01 = tl.join(words & 0xF, (words >> 4) & 0xF)                                      # [BN, BKW, 2]
    a23 = tl.join((words >> 8) & 0xF, (words >> 12) & 0xF)
    a45 = tl.join((words >> 16) & 0xF, (words >> 20) & 0xF)
    a67 = tl.join((words >> 24) & 0xF, (words >> 28) & 0xF)
    a = tl.join(tl.join(a01, a23), tl.join(a45, a67))                                  # [BN, BKW, 2, 2, 2]
    # join appends the new axis last: a[..., i, j, l] is nibble 4l + 2j + i -> reorder to (l, j, i)
    a = tl.permute(a, (0, 1, 4, 3, 2))
    u = tl.reshape(a, (words.shape[0], BLOCK_K))
    return (u | 0x4B000000).to(tl.float32, bitcast=True)


# Nibble j of two words -> bf16x2 (j - 8 in both halves). prmt puts byte j/2 of each word (of each word
# shifted right by 4 for odd j: bf16 has only 7 mantissa bits, so a nibble must sit in bits 0-3) in the
# low byte of one half; lop3 keeps the nibble and ors in the exponent of 128, giving 128 + u; one bf16x2
# fma maps that to u - 8 exactly. About 1.6 instructions per weight, no int->float converts.
# ``scaled``: the group scale folded in. The fma subtracts 128 + 8 + zero (``$12``/``$13``: the bf16 bits of
# -(136 + zero) of each word's row; exact for integer zero points) and one bf16x2 mul by the scale pair
# (``$10``/``$11``: each word's row scale) rounds (q - zero) * scale once, as a dequantized bf16 weight is.
def _asm_nibbles_bf16(scaled: bool) -> str:
    if scaled:
        lines = ["{ .reg .b32 a4, b4, t, one, off, sc;",
                 "shr.u32 a4, $8, 4; shr.u32 b4, $9, 4; mov.b32 one, 0x3F803F80;",
                 "prmt.b32 sc, $10, $11, 0x5410; prmt.b32 off, $12, $13, 0x5410;"]
    else:
        lines = ["{ .reg .b32 a4, b4, t, one, off;",
                 "shr.u32 a4, $8, 4; shr.u32 b4, $9, 4; mov.b32 one, 0x3F803F80; mov.b32 off, 0xC308C308;"]
    for j in range(8):
        i = j // 2
        a, b = ("$8", "$9") if j % 2 == 0 else ("a4", "b4")
        convert = f"fma.rn.bf16x2 t, t, one, off; mul.rn.bf16x2 ${j}, t, sc;" if scaled else \
            f"fma.rn.bf16x2 ${j}, t, one, off;"
        lines.append(f"prmt.b32 t, {a}, {b}, {hex(i | i << 4 | (4 + i) << 8 | (4 + i) << 12)}; "
                     f"lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; {convert}")
    return "\n".join(lines + ["}"])


_ASM_NIBBLES_BF16 = tl.constexpr(_asm_nibbles_bf16(scaled=False))
_ASM_NIBBLES_BF16_SCALED = tl.constexpr(_asm_nibbles_bf16(scaled=True))


@triton.jit
def _nibble_tile(n0, n1, n2, n3, n4, n5, n6, n7, BLOCK_K: tl.constexpr):
    """The PTX outputs (nibble j of every word of a [BN, BK/8] tile in ``nj``) interleaved into [BN, BK]."""
    a = tl.join(tl.join(tl.join(n0, n1), tl.join(n2, n3)), tl.join(tl.join(n4, n5), tl.join(n6, n7)))
    a = tl.permute(a, (0, 1, 4, 3, 2))                   # [..., i, j, l] is nibble 4l + 2j + i
    return tl.reshape(a, (n0.shape[0], BLOCK_K))


@triton.jit
def _unpack_tile_bf16(words, BLOCK_K: tl.constexpr):
    """Codes q = u - 8 of a [BN, BK/8] word tile as [BN, BK] bf16 (inline PTX, GPU only)."""
    n0, n1, n2, n3, n4, n5, n6, n7 = tl.inline_asm_elementwise(
        _ASM_NIBBLES_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
        dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    return _nibble_tile(n0, n1, n2, n3, n4, n5, n6, n7, BLOCK_K)


@triton.jit
def _unpack_tile_bf16_scaled(words, s, z, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """(q - zero) * scale of a [BN, BK/8] word tile as [BN, BK] bf16, rounded once (inline PTX, GPU only);
    s and z are the tile rows' scale and zero point [BN]."""
    sb = tl.broadcast_to(s.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)[:, None], words.shape)
    if HAS_ZERO:
        off = (-(136.0 + z.to(tl.float32))).to(tl.bfloat16)
    else:
        off = tl.full(s.shape, -136.0, tl.bfloat16)
    ob = tl.broadcast_to(off.to(tl.int16, bitcast=True).to(tl.int32)[:, None], words.shape)
    n0, n1, n2, n3, n4, n5, n6, n7 = tl.inline_asm_elementwise(
        _ASM_NIBBLES_BF16_SCALED, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r", [words, sb, ob],
        dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    return _nibble_tile(n0, n1, n2, n3, n4, n5, n6, n7, BLOCK_K)


@triton.jit
def _dot_acc(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b accumulated by the dot itself (16-bit operands widened under the interpreter, see ``_dot``)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def w4a16_tc_kernel(x_ptr, w_ptr, x_desc, w_desc, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                    M, N, K, KW, G, stride_xm, stride_om,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K, UNPACK: tl.constexpr, SCALE_W: tl.constexpr = False,
                    TMA: tl.constexpr = False, INTERPRET: tl.constexpr = False):
    """Needs GROUP % BLOCK_K == 0 and K % BLOCK_K == 0 (checked by the launcher). ``SPLIT_K`` is a run-time
    value (Triton specialises 1 by itself), so split choices share one compiled kernel. With ``TMA`` the word and
    activation tiles come through tensor descriptors (``w_desc`` [N, K/8] words in [BN, BK/8] boxes,
    ``x_desc`` [M, K] in [BM, BK] boxes), else through pointer loads (``w_ptr``, ``x_ptr``)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ram = tl.minimum(rm, M - 1)                       # clamped rows/cols are computed, never stored
    rbn = tl.minimum(rn, N - 1)
    rk = tl.arange(0, BLOCK_K)
    steps = K // BLOCK_K
    per_split = tl.cdiv(steps, SPLIT_K)
    s0 = pid_k * per_split
    s1 = tl.minimum(s0 + per_split, steps)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    sz = rbn * G                                      # the rows' scales and zero points
    # With TMA the pipeliner leaves plain loads in the loop, and a [BN] scale column is too narrow for a
    # descriptor: the next step's scales (and zero points) are requested one step ahead by hand.
    g_first = (tl.minimum(s0, steps - 1) * BLOCK_K) // GROUP
    s_nxt = tl.load(s_ptr + sz + g_first)
    z_nxt = s_nxt
    if HAS_ZERO:
        z_nxt = tl.load(z_ptr + sz + g_first)
    for step in range(s0, s1):
        k0 = step * BLOCK_K
        grp = k0 // GROUP
        if TMA:
            xt = x_desc.load([pid_m * BLOCK_M, k0]).T                                   # [BK, BM]
            s = s_nxt
            z = z_nxt
            g_next = (tl.minimum(step + 1, s1 - 1) * BLOCK_K) // GROUP
            s_nxt = tl.load(s_ptr + sz + g_next)
            if HAS_ZERO:
                z_nxt = tl.load(z_ptr + sz + g_next)
        else:
            xt = tl.load(x_ptr + ram[None, :] * stride_xm + (k0 + rk)[:, None])
            s = tl.load(s_ptr + sz + grp)                                               # [BN]
            z = s
            if HAS_ZERO:
                z = tl.load(z_ptr + sz + grp)
        words = _load_words(w_ptr, w_desc, rbn, pid_n * BLOCK_N, k0 // 8, KW, BLOCK_K, TMA)   # [BN, BK/8]
        if UNPACK == 2 and SCALE_W:   # (q - zero) * scale in bf16 straight from the PTX; the dot accumulates
            wq = _unpack_tile_bf16_scaled(words, s, z, HAS_ZERO, BLOCK_K)
            acc = _dot_acc(wq, xt, acc, INTERPRET)
        else:
            if UNPACK == 2:
                q = _unpack_tile_bf16(words, BLOCK_K)
                if HAS_ZERO:
                    q = q - z.to(tl.bfloat16)[:, None]
            else:
                f = _unpack_tile(words, BLOCK_K)
                if HAS_ZERO:
                    q = f - (8388608.0 + 8.0 + z.to(tl.float32)[:, None])
                else:
                    q = f - (8388608.0 + 8.0)
            if SCALE_W:   # (q - zero) * scale rounded once to the activation dtype; the dot accumulates
                acc = _dot_acc((q * s.to(tl.float32)[:, None]).to(xt.dtype), xt, acc, INTERPRET)
            else:         # exact codes into the dot, the fp32 partial scaled per K step
                acc += _dot(q.to(xt.dtype), xt, INTERPRET) * s.to(tl.float32)[:, None]
    tile_id = pid_m * num_n + pid_n
    _split_k_finish(tl.trans(acc), ws_ptr, cnt_ptr, bias_ptr, out_ptr, rm, rn, M, N, stride_om,
                    pid_k, tile_id, SPLIT_K, HAS_BIAS)


def tc_config(m: int, n: int, k: int, group: int, sms: int) -> dict:
    """Default tile for M rows of an N x K weight (the tuned table, :mod:`.tuned_w4a16`, wins where it has
    the shape); the tile most often fastest in the H100 search."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    block_k = next(b for b in (64, 128, 32, 16) if group % b == 0 and k % b == 0)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
    split = _split_for(tiles, k // block_k, 2 * sms) if tiles <= MAX_TILES else 1
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=split, UNPACK=2, num_warps=4, num_stages=4)


def tc_supported(w: StripedWeight) -> bool:
    """The kernel needs a K step that divides both the group and K, of at least 16 elements."""
    return any(w.group_size % b == 0 and w.in_features % b == 0 for b in (128, 64, 32, 16))


def tma_ok(x2: torch.Tensor, w: StripedWeight, cfg: dict) -> bool:
    """Tensor descriptors need contiguous operands with 16-byte aligned rows and base addresses, and boxes
    of at least 16 bytes along K (BLOCK_K >= 32: four words)."""
    k = x2.shape[1]
    return (x2.is_contiguous() and w.canonical.is_contiguous() and k % 32 == 0 and cfg["BLOCK_K"] >= 32
            and x2.data_ptr() % 16 == 0 and w.canonical.data_ptr() % 16 == 0)


def tma_race_prone(cfg: dict) -> bool:
    """``TMA`` with ``SCALE_W`` on tiles of 128+ rows with split-K: on the H100 (triton 3.6) this combination
    gave wrong results, varying from run to run on the same inputs, in 137 checks of the tile search (a race
    whose cause is not found; every other combination passed every check, see
    benchmarks/results/h100-w4a16-tc-tma-*.json, rows ``quantarena:tc-wrong``). The launcher runs such a
    tile with pointer loads instead, and the tile search skips it."""
    return bool(cfg.get("TMA") and cfg.get("SCALE_W") and cfg["BLOCK_M"] >= 128 and cfg["SPLIT_K"] > 1)


def w4a16_tc(x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None = None,
             cfg: dict | None = None) -> torch.Tensor:
    """x2: [M, K] contiguous -> [M, N] (tensor cores, the weight tile dequantized on the fly)."""
    m, n, k = x2.shape[0], w.out_features, w.in_features
    cfg = dict(cfg or tc_config(m, n, k, w.group_size, _sm_count(x2.device)))
    if cfg.get("UNPACK") == 2 and (INTERPRETING or x2.dtype != torch.bfloat16):
        cfg["UNPACK"] = 1
    bk = cfg["BLOCK_K"]
    if k % bk or w.group_size % bk:
        raise ValueError(f"BLOCK_K {bk} must divide K = {k} and the group size {w.group_size}")
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    if cfg["SPLIT_K"] > 1 and tiles > MAX_TILES:
        cfg["SPLIT_K"] = 1
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    split = cfg["SPLIT_K"]
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x2.device)
    dummy = w.scales
    x_desc = w_desc = None
    if cfg.get("TMA"):
        if not tma_ok(x2, w, cfg) or tma_race_prone(cfg):
            cfg["TMA"] = False
        else:
            from triton.tools.tensor_descriptor import TensorDescriptor
            x_desc = TensorDescriptor.from_tensor(x2, [cfg["BLOCK_M"], bk])
            w_desc = TensorDescriptor.from_tensor(w.canonical, [cfg["BLOCK_N"], bk // 8])
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    w4a16_tc_kernel[grid](x2, w.canonical, x_desc, w_desc, w.scales, dummy if w.zeros is None else w.zeros,
                          dummy if bias is None else bias, out, ws, split_k_counters(x2.device),
                          m, n, k, k // 8, k // w.group_size, x2.stride(0), out.stride(0),
                          GROUP=w.group_size, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
                          INTERPRET=INTERPRETING, **cfg)
    return out
