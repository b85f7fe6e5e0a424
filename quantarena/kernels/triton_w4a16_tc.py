"""W4A16 tensor-core GEMM for small and medium M (Triton), "swap-AB".

The tile computed is ``out^T[BN, BM] = W[BN, BK] @ x^T[BK, BM]``: the dequantized weight tile is the
left operand of the dot (Hopper's ``wgmma`` takes it from registers), so the wide weight dimension fills the
tensor cores' M slot and a few tokens the N slot. The weight words are read along K, coalesced.

The nibbles become the dot's bf16 operand in one of three ways (``UNPACK``):

* ``1``: eight nibble planes by shift-and-mask, or-ed into the mantissa of ``2^23`` (``u | 0x4B000000``
  is the float ``2^23 + u``, no int->float convert), interleaved back into ``[BN, BK]``; the
  ``2^23 + 8 (+ zero)`` offset is subtracted exactly. Also the fp16-activation and interpreter path of ``2``.
* ``2``: bf16 pairs straight from inline PTX (prmt, lop3 and one bf16x2 fma per two weights). The unpacked
  tile is not in the operand's register layout, so Triton converts it through shared memory: on the H100
  ~370 instructions and 10 barriers per warp and 64 x 128 K step, which bound the kernel at ~1.5 TB/s at
  M <= 16 (``benchmarks/w4a16_tc_limits.py``: the same launch without its weight stream took as long).
* ``3`` (BLOCK_K 128): the words are stored in a layout (``dot_layout_words``, built once per weight) in
  which each thread's words hold exactly its operand codes, so every layout of the unpack is the operand's
  and no conversion is left: ~260 instructions and 2-3 barriers per step with the scale folded in, 198 with
  exact codes (``SCALE_W`` off: one lop3 and one bf16x2 fma per two weights, the step's fp32 partial scaled).
  ``TILED`` reads a copy stored in blocks of 16 rows x one K step (``dot_tiled_words``), each 1 KB contiguous.

``SCALE_W`` folds the group scale into the bf16 weight, so the dot accumulates in place; otherwise the fp32
partial of each K step is scaled (``BLOCK_K`` divides the group size). An in-place
accumulation needs ``_after_mma``: the next step's unpack must wait for the ``wgmma``s still reading their
register operands. Split-K reuses the single-launch counter finish of :mod:`.triton_w4a16`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import (INTERPRETING, MAX_TILES, NORM_SS_WORDS, StripedWeight, _dot, _sm_count, _split_for,
                           _store_gated, _store_out, norm_ss_pool, split_k_counters, split_k_reduce,
                           split_k_workspace)
from .triton_pdl import pdl_ok, prefetch_items
from .w4a16_layout import DOT_PAD_ROWS, DOT_TILE_ROWS, dot_layout_words, dot_tiled_words  # noqa: F401 (re-exported)


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


# UNPACK=3: the words are laid out (``dot_layout_words``) so that each thread's words hold exactly the codes it
# feeds the ``wgmma`` as its register left operand. Triton then derives every layout in the unpack from the
# dot operand's, back to the word load: no shared-memory round trip of the dequantized tile (UNPACK 1 and 2
# convert it, 8 barriers per K step at 64 x 128; see benchmarks/results/h100-notes.md). Within a 128-wide K
# step, word ``c = 4t + jp`` of a row holds in nibble ``4e + 2jj + h`` (bits 4(4e + 2jj + h)) the code of
# ``k = 32jp + 16jj + 8h + 2t + e``: ``t`` is the thread's lane in its quad, and the pair e = 0, 1 is one
# 32-bit register of the operand. The PTX makes that pair from bits 4p and 16 + 4p (p = 2jj + h) with one
# lop3, one bf16x2 fma (- 136 - zero) and one bf16x2 mul by the row's scale: (q - zero) * scale rounded once.
def _asm_dot_pairs(scaled: bool = True) -> str:
    """The PTX of four bf16 pairs from one UNPACK=3 word: operands $4 word, $5 scale pair and $6 offset pair
    (``scaled``), or $4 word and $5 offset pair (codes minus zero point only, exact)."""
    off = "$6" if scaled else "$5"
    lines = ["{ .reg .b32 t, one, w4, w8, w12;", "mov.b32 one, 0x3F803F80;",
             "shr.u32 w4, $4, 4; shr.u32 w8, $4, 8; shr.u32 w12, $4, 12;"]
    for p, src in enumerate(("$4", "w4", "w8", "w12")):
        convert = f"fma.rn.bf16x2 t, t, one, {off}; mul.rn.bf16x2 ${p}, t, $5;" if scaled else \
            f"fma.rn.bf16x2 ${p}, t, one, {off};"
        lines.append(f"lop3.b32 t, {src}, 0x000F000F, 0x43004300, 0xEA; {convert}")
    return "\n".join(lines + ["}"])


_ASM_DOT_PAIRS = tl.constexpr(_asm_dot_pairs())
_ASM_DOT_CODES = tl.constexpr(_asm_dot_pairs(scaled=False))
_NEG136_X2 = tl.constexpr(0xC308C308 - (1 << 32))   # the bf16 pair (-136, -136) as an int32


@triton.jit
def _bf16_halves(v):
    """The low and high bf16 halves of int32 pairs."""
    return ((v & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True),
            (v >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True))


@triton.jit
def _dot_code(words, s, zoff, SHIFT: tl.constexpr):
    """Interpreter path of the PTX: the code at bit SHIFT as (u + zoff) * s, zoff = -(8 + zero) (exact), then
    one rounding to bf16, as the PTX's bf16x2 mul rounds."""
    return ((((words >> SHIFT) & 0xF).to(tl.float32) + zoff) * s).to(tl.bfloat16)


@triton.jit
def _unpack_dot_tile(words, s, z, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     ASM: tl.constexpr, MMA_WAIT: tl.constexpr, SCALED: tl.constexpr = True):
    """(q - zero) * scale of a UNPACK=3 word tile ``[2, BN/16, 8, 16]`` (tile row 16 d1 + 8 d0 + d2) as the
    ``[BN, BK]`` bf16 left operand; s, z: the rows' scale and zero point ``[2, BN/16, 8, 1]``. Without
    ``SCALED`` the codes minus the zero point (exact; ``s`` unused). ``MMA_WAIT``: the unpack waits for the
    ``wgmma``s in flight (see ``_after_mma``) through the scales, a small tensor: a side-effecting op on the
    words would pin their layout and bring back the shared-memory round trip."""
    if ASM:
        if HAS_ZERO:
            ob = (-(136.0 + z.to(tl.float32))).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            off = tl.broadcast_to(ob | (ob << 16), words.shape)
        else:   # bf16x2 (-136, -136), made at the words' shape (a [BN]-shaped constant broadcast here kept
            off = tl.full(words.shape, _NEG136_X2, tl.int32)   # Triton from giving the loads the dot's layout)
        if SCALED:
            sb = _after_mma(s.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF, MMA_WAIT)
            v0, v1, v2, v3 = tl.inline_asm_elementwise(
                _ASM_DOT_PAIRS, "=r,=r,=r,=r,r,r,r", [words, tl.broadcast_to(sb | (sb << 16), words.shape), off],
                dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        else:
            v0, v1, v2, v3 = tl.inline_asm_elementwise(
                _ASM_DOT_CODES, "=r,=r,=r,=r,r,r", [words, off], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        n0, n1 = _bf16_halves(v0)
        n2, n3 = _bf16_halves(v1)
        n4, n5 = _bf16_halves(v2)
        n6, n7 = _bf16_halves(v3)
    else:
        sf = s.to(tl.bfloat16).to(tl.float32)
        if not SCALED:
            sf = tl.full(s.shape, 1.0, tl.float32)
        zoff = -8.0 + tl.zeros_like(sf)
        if HAS_ZERO:
            zoff = zoff - z.to(tl.float32)
        n0 = _dot_code(words, sf, zoff, 0)
        n1 = _dot_code(words, sf, zoff, 16)
        n2 = _dot_code(words, sf, zoff, 4)
        n3 = _dot_code(words, sf, zoff, 20)
        n4 = _dot_code(words, sf, zoff, 8)
        n5 = _dot_code(words, sf, zoff, 24)
        n6 = _dot_code(words, sf, zoff, 12)
        n7 = _dot_code(words, sf, zoff, 28)
    # n(2p + e) holds the pair slot (p = 2jj + h, e); nested joins append axes (e, h, jj) in that order
    a = tl.join(tl.join(tl.join(n0, n1), tl.join(n2, n3)), tl.join(tl.join(n4, n5), tl.join(n6, n7)))
    a = tl.reshape(a, (2, BLOCK_N // 16, 8, 4, 4, 2, 2, 2))   # [d0, d1, d2, t, jp, e, h, jj]
    a = tl.permute(a, (1, 0, 2, 4, 7, 6, 3, 5))               # [d1, d0, d2, jp, jj, h, t, e]
    return tl.reshape(a, (BLOCK_N, BLOCK_K))


@triton.jit
def _after_mma(words, WAIT: tl.constexpr):
    """``words``, handed on only after every ``wgmma`` in flight has completed (``wgmma.wait_group 0``).

    With the dequantized tile as the register left operand and the dot accumulating in place, Triton waits
    after each K step's ``wgmma`` only until at most 7 are pending, so the next step's unpack can overwrite
    registers that in-flight ``wgmma``s still read. On the H100 (triton 3.6) that gave wrong results,
    varying from run to run, at 64-256 token rows: the UNPACK 3 tiles with 3 stages, and the TMA + SCALE_W
    tiles with split-K that an earlier launcher guard ran without TMA (a "race" whose cause was not found
    then). With this wait every such tile passed (benchmarks/w4a16_tc_check.py, ``CHECK_MODE=dot``). It is
    pure, so Triton keeps its freedom over the operand's layout; the data dependency orders it."""
    if WAIT:
        return tl.inline_asm_elementwise("wgmma.wait_group.sync.aligned 0;\nmov.b32 $0, $1;", "=r,r", [words],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return words


@triton.jit
def _dot_acc(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b accumulated by the dot itself (16-bit operands widened under the interpreter, see ``_dot``)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _norm_step(xt, dt, nw, xo_ptr, ram, rm, M, k0, rk, stride_xm, pid_n, HAS_DELTA: tl.constexpr):
    """One K step of a NORM launch: the residual stream's [BK, BM] slice ``xt`` (plus the delta's ``dt``, rounded
    once to the activation dtype, as a 16-bit add is; the first column tile's programs store that sum for the next
    residual add) -> the dot operand ``x * nw`` (the norm weight's [BK] slice) rounded once, and the squares of x
    (float32, elementwise: the rows are summed once, after the loop). The row's rsqrt(mean + eps) then scales the
    float32 sums: the same product as rounding ``x * rsqrt`` first, up to where the 16-bit roundings fall."""
    if HAS_DELTA:
        xt = (xt.to(tl.float32) + dt.to(tl.float32)).to(xt.dtype)
        live = tl.where(pid_n == 0, M, 0)             # rows stored: those < M, in the first column tile only
        tl.store(xo_ptr + ram[None, :] * stride_xm + (k0 + rk)[:, None], xt,
                 mask=(rm[None, :] + 0 * rk[:, None]) < live)
    xf = xt.to(tl.float32)
    return (xf * nw.to(tl.float32)[:, None]).to(xt.dtype), xf * xf


@triton.jit
def _rstd(ss, K, eps):
    """1 / sqrt(mean + eps) of rows whose squares sum to ``ss`` over K elements (float32)."""
    return 1.0 / tl.sqrt_rn(ss / K + eps)


@triton.jit
def _store_res_norm(total, bias_ptr, out_ptr, res_ptr, xo_ptr, nw_ptr, ssp_ptr, rm, rn, M, N, stride_om, pid_n,
                    HAS_BIAS: tl.constexpr):
    """The epilogue of a linear whose output is a residual delta (RES_NORM): ``x = res + out`` (the output and the
    sum each rounded once, as the separate ops round them) stored at ``xo_ptr``; ``x * norm_weight`` (rounded
    once) stored as this launch's output, the operand of the next linear; and the squares of x summed over this
    tile's columns, per row, at ``ssp_ptr[pid_n, row]`` (the next linear adds the tiles up, ``ROW_SS``)."""
    if HAS_BIAS:
        total += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * stride_om + rn[None, :]
    o = total.to(out_ptr.dtype.element_ty).to(tl.float32)
    x = (tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32) + o).to(out_ptr.dtype.element_ty)
    tl.store(xo_ptr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    nw = tl.load(nw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (xf * nw[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(ssp_ptr + pid_n * M + rm, tl.sum(xf * xf, axis=1), mask=rm < M)


@triton.jit
def _tc_store(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, pid_n, K, eps, GATED: tl.constexpr,
              HAS_BIAS: tl.constexpr, ROW_SS: tl.constexpr, RES_NORM: tl.constexpr, ssp_ptr, ss_tiles,
              SS_TILES: tl.constexpr, res_ptr, xo_ptr, nw_ptr):
    """The tile's final sums -> out. ``ROW_SS``: first scaled by each row's rsqrt(mean + eps), from the squares a
    RES_NORM launch left in ``ssp_ptr`` [ss_tiles, M] (added in tile order: deterministic)."""
    if ROW_SS:
        t = tl.arange(0, SS_TILES)[:, None]
        parts = tl.load(ssp_ptr + t * M + rm[None, :], mask=(t < ss_tiles) & (rm[None, :] < M), other=0.0)
        total = total * _rstd(tl.sum(parts, axis=0), K, eps)[:, None]
    if RES_NORM:
        _store_res_norm(total, bias_ptr, out_ptr, res_ptr, xo_ptr, nw_ptr, ssp_ptr, rm, rn, M, N, stride_om,
                        pid_n, HAS_BIAS)
    elif GATED:
        _store_gated(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)
    else:
        _store_out(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)


@triton.jit
def _tc_finish(part, ws_ptr, cnt_ptr, bias_ptr, out_ptr, rm, rn, M, N, K, stride_om, pid_n, pid_k, tile_id,
               SPLIT_K, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
               ss, ss_ptr, eps, ROW_SS: tl.constexpr, RES_NORM: tl.constexpr, ssp_ptr, ss_tiles,
               SS_TILES: tl.constexpr, res_ptr, xo_ptr, nw_ptr):
    """part: fp32 [BM, BN] partial sum of this program; out written once all splits are in (see
    :func:`.triton_w4a16.split_k_reduce`). ``NORM``: ``ss`` [BM] is this program's share of each row's sum of
    squares over K, and the sums are scaled by the row's rsqrt(mean + eps) (with split-K the shares meet in
    ``ss_ptr``'s slots of the tile, BM per tile, zero between launches: the tile's last program reads and zeroes
    them, as it does the ATOMIC workspace). ``ROW_SS`` / ``RES_NORM``: see :func:`_tc_store`."""
    if SPLIT_K == 1:
        if NORM:
            part = part * _rstd(ss, K, eps)[:, None]
        _tc_store(part, bias_ptr, out_ptr, rm, rn, M, N, stride_om, pid_n, K, eps, GATED, HAS_BIAS, ROW_SS,
                  RES_NORM, ssp_ptr, ss_tiles, SS_TILES, res_ptr, xo_ptr, nw_ptr)
    else:
        if NORM:   # before split_k_reduce's barrier and release, as the partials are
            ss_off = tile_id * part.shape[0] + tl.arange(0, part.shape[0])
            tl.atomic_add(ss_ptr + ss_off, ss, sem="relaxed", scope="gpu")
        total, last = split_k_reduce(part, ws_ptr, cnt_ptr, rm, rn, M, N, pid_k, tile_id, SPLIT_K, ATOMIC)
        if last:
            if NORM:
                bits = tl.atomic_xchg(ss_ptr.to(tl.pointer_type(tl.int32)) + ss_off, tl.zeros_like(ss_off),
                                      sem="relaxed", scope="gpu")
                total = total * _rstd(bits.to(tl.float32, bitcast=True), K, eps)[:, None]
            _tc_store(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, pid_n, K, eps, GATED, HAS_BIAS, ROW_SS,
                      RES_NORM, ssp_ptr, ss_tiles, SS_TILES, res_ptr, xo_ptr, nw_ptr)


@triton.jit
def w4a16_tc_kernel(x_ptr, w_ptr, x_desc, w_desc, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                    M, N, K, KW, G, stride_xm, stride_om,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K, UNPACK: tl.constexpr, SCALE_W: tl.constexpr = False,
                    TMA: tl.constexpr = False, INTERPRET: tl.constexpr = False, MMA_WAIT: tl.constexpr = True,
                    TILED: tl.constexpr = False, TILE_ROWS: tl.constexpr = DOT_TILE_ROWS,
                    ATOMIC: tl.constexpr = False, pf_ptr=None, pf_items=0, pf_chunks=1, pf_block_bytes=0,
                    pf_chunk_bytes=0, pf_bytes=0, PF: tl.constexpr = False, PF_LANES: tl.constexpr = 128,
                    GATED: tl.constexpr = False, NORM: tl.constexpr = False, HAS_DELTA: tl.constexpr = False,
                    d_ptr=None, d_desc=None, nw_ptr=None, xo_ptr=None, ss_ptr=None, eps=1e-6,
                    ROW_SS: tl.constexpr = False, RES_NORM: tl.constexpr = False, ssp_ptr=None, ss_tiles=0,
                    SS_TILES: tl.constexpr = 1, res_ptr=None):
    """Needs GROUP % BLOCK_K == 0 and K % BLOCK_K == 0 (checked by the launcher). ``SPLIT_K`` is a run-time
    value (Triton specialises 1 by itself), so split choices share one compiled kernel. With ``TMA`` the word and
    activation tiles come through tensor descriptors (``w_desc`` [N, K/8] words in [BN, BK/8] boxes,
    ``x_desc`` [M, K] in [BM, BK] boxes), else through pointer loads (``w_ptr``, ``x_ptr``). ``TILED`` (UNPACK 3):
    ``w_ptr`` holds the UNPACK=3 words in blocks of TILE_ROWS rows (``dot_tiled_words``), so each K step of a
    program reads BN / TILE_ROWS contiguous blocks of TILE_ROWS x 64 bytes instead of BN rows 64 bytes apart.
    ``ATOMIC``: the split-K partials are added into one zeroed workspace (see :func:`.triton_w4a16.split_k_reduce`:
    fewer bytes for the tile's last program, fp32 sums in arrival order). ``PF``: once its work is done, each
    program asks the L2 for its share of the next linear's weight (``pf_*``, see :mod:`.l2_chain`). ``GATED``:
    the weight's rows interleave an MLP's gate and up projections, and the kernel writes ``silu(gate) * up``
    ([M, N / 2]) instead of the product (see :func:`.triton_w4a16._store_gated`). ``NORM``: x is the residual
    stream (plus ``d_ptr``'s rows with ``HAS_DELTA``, rounded once, written to ``xo_ptr`` by the programs of the
    first column tile) and the product is ``rms_norm(x) @ W^T``: each K step feeds the dot ``x * nw`` (the norm
    weight), and the row's ``rsqrt(mean(x^2) + eps)`` scales the float32 sums before the store (see
    :func:`_norm_step`; with ``TMA`` the delta comes through ``d_desc`` as x does, and the norm weight's next
    slice is requested one step ahead by hand). The same norm split across two launches: ``RES_NORM`` (the linear
    whose output is the delta) adds the residual ``res_ptr`` in its epilogue, stores x (``xo_ptr``), writes
    ``x * nw`` as its output and each tile's squares of x (``ssp_ptr``); ``ROW_SS`` (the next linear, on that
    output) scales its sums by the rsqrt of those squares summed over ``ss_tiles`` tiles (see :func:`_tc_store`)."""
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
    sq = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)   # NORM: this program's squares of x, summed after the loop
    if NORM:
        nw_nxt = tl.load(nw_ptr + tl.minimum(s0, steps - 1) * BLOCK_K + rk)
    sz = rbn * G                                      # the rows' scales and zero points
    if UNPACK == 3:   # the word tile as [2, BN/16, 8, 16] (tile row 16 d1 + 8 d0 + d2, word d3), see dot_layout_words
        d0 = tl.arange(0, 2)[:, None, None, None]
        d1 = tl.arange(0, BLOCK_N // 16)[None, :, None, None]
        d2 = tl.arange(0, 8)[None, None, :, None]
        d3 = tl.arange(0, 16)[None, None, None, :]
        rows4 = tl.minimum(pid_n * BLOCK_N + 16 * d1 + 8 * d0 + d2, N - 1)             # [2, BN/16, 8, 1]
        if TILED:   # block (b, step) of TILE_ROWS rows at (b * steps + step) * TILE_ROWS * 16 words; rows past N zero
            row = 16 * d1 + 8 * d0 + d2
            w_tile = w_ptr + (pid_n * (BLOCK_N // TILE_ROWS) + row // TILE_ROWS) * TILE_ROWS * KW \
                + (row % TILE_ROWS) * 16 + d3
        else:
            w_tile = w_ptr + rows4 * KW + d3
    elif TMA:
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
        else:
            xt = tl.load(x_ptr + ram[None, :] * stride_xm + (k0 + rk)[:, None])
        if NORM:
            dt = xt
            if HAS_DELTA:
                if TMA:
                    dt = d_desc.load([pid_m * BLOCK_M, k0]).T
                else:
                    dt = tl.load(d_ptr + ram[None, :] * stride_xm + (k0 + rk)[:, None])
            nw = nw_nxt
            nw_nxt = tl.load(nw_ptr + tl.minimum(step + 1, s1 - 1) * BLOCK_K + rk)
            xt, sq_step = _norm_step(xt, dt, nw, xo_ptr, ram, rm, M, k0, rk, stride_xm, pid_n, HAS_DELTA)
            sq += sq_step
        if UNPACK == 3:   # words born in the dot operand's layout; scales folded in by the PTX, or after the dot
            if TILED:
                words = tl.load(w_tile + step * (TILE_ROWS * 16))                       # [2, BN/16, 8, 16]
            else:
                words = tl.load(w_tile + k0 // 8)
            s4 = rows4   # without SCALE_W only the shape is used (the step's scales come after the dot)
            if SCALE_W:
                s4 = tl.load(s_ptr + rows4 * G + grp)
            z4 = s4
            if HAS_ZERO:
                z4 = tl.load(z_ptr + rows4 * G + grp)
            wq = _unpack_dot_tile(words, s4, z4, HAS_ZERO, BLOCK_N, BLOCK_K, not INTERPRET, MMA_WAIT, SCALE_W)
            if SCALE_W:
                acc = _dot_acc(wq, xt, acc, INTERPRET)
            else:   # exact codes; the fp32 partial scaled per step (one fp32 fma per output, no bf16x2 mul per pair)
                acc += _dot(wq, xt, INTERPRET) * tl.load(s_ptr + sz + grp).to(tl.float32)[:, None]
        else:
            if TMA:
                s = s_nxt
                z = z_nxt
                g_next = (tl.minimum(step + 1, s1 - 1) * BLOCK_K) // GROUP
                s_nxt = tl.load(s_ptr + sz + g_next)
                if HAS_ZERO:
                    z_nxt = tl.load(z_ptr + sz + g_next)
            else:
                s = tl.load(s_ptr + sz + grp)                                               # [BN]
                z = s
                if HAS_ZERO:
                    z = tl.load(z_ptr + sz + grp)
            words = _load_words(w_ptr, w_desc, rbn, pid_n * BLOCK_N, k0 // 8, KW, BLOCK_K, TMA)   # [BN, BK/8]
            if SCALE_W:   # the dot accumulates in place: see _after_mma
                words = _after_mma(words, MMA_WAIT and not INTERPRET)
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
    _tc_finish(tl.trans(acc), ws_ptr, cnt_ptr, bias_ptr, out_ptr, rm, rn, M, N, K, stride_om, pid_n, pid_k, tile_id,
               SPLIT_K, HAS_BIAS, ATOMIC, GATED, NORM, tl.sum(sq, axis=0), ss_ptr, eps, ROW_SS, RES_NORM, ssp_ptr,
               ss_tiles, SS_TILES, res_ptr, xo_ptr, nw_ptr)
    if PF:   # programs start in launch order: n fastest, then m, then k
        num_m = tl.num_programs(1)
        prefetch_items(pf_ptr.to(tl.pointer_type(tl.int8)), pid_n + num_n * (pid_m + num_m * pid_k),
                       num_n * num_m * tl.num_programs(2), pf_items, pf_chunks, pf_block_bytes, pf_chunk_bytes,
                       pf_bytes, PF_LANES)


def tc_config(m: int, n: int, k: int, group: int, sms: int, hopper: bool = False) -> dict:
    """Default tile for M rows of an N x K weight (the tuned table, :mod:`.tuned_w4a16`, wins where it has
    the shape). On Hopper with 128-wide groups: the TILED UNPACK=3 tile the H100 search picked most often
    (exact codes up to M = 64, the scale folded into the weight above; h100-w4a16-tc-tiled-*.json). Elsewhere
    the UNPACK=2 tile most often fastest in the earlier search (the TILED tiles were measured on Hopper only)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    block_k = next(b for b in (64, 128, 32, 16) if group % b == 0 and k % b == 0)
    dot = hopper and group % 128 == 0 and k % 128 == 0
    if dot:
        block_k = 128
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
    split = _split_for(tiles, k // block_k, 2 * sms) if tiles <= MAX_TILES else 1
    if dot:
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=m > 64, TMA=True,
                    TILED=True, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=split, UNPACK=2, num_warps=4, num_stages=4)


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and not INTERPRETING and torch.cuda.get_device_capability(device)[0] == 9


def tc_supported(w: StripedWeight) -> bool:
    """The kernel needs a K step that divides both the group and K, of at least 16 elements."""
    return any(w.group_size % b == 0 and w.in_features % b == 0 for b in (128, 64, 32, 16))


def tma_ok(x2: torch.Tensor, w: StripedWeight, cfg: dict) -> bool:
    """Tensor descriptors need contiguous operands with 16-byte aligned rows and base addresses, and boxes
    of at least 16 bytes along K (BLOCK_K >= 32: four words). A TILED tile reads its words by pointer: only the
    activations go through a descriptor."""
    k = x2.shape[1]
    ok = x2.is_contiguous() and k % 32 == 0 and cfg["BLOCK_K"] >= 32 and x2.data_ptr() % 16 == 0
    if cfg.get("TILED"):
        return ok
    return ok and w.canonical.is_contiguous() and w.canonical.data_ptr() % 16 == 0


MAX_SS_TILES = 256   # column tiles of a RES_NORM launch whose squares a ROW_SS launch adds up in one load


def w4a16_tc(x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None = None,
             cfg: dict | None = None, prefetch: tuple[torch.Tensor, dict] | None = None,
             gated: bool = False, row_ss: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x2: [M, K] contiguous -> [M, N] (tensor cores, the weight tile dequantized on the fly). ``prefetch``: the
    next linear's weight words and their plan (:func:`.l2_chain.tiled_plan`), asked of the L2 by each program
    once its work is done (Hopper, compiled kernels only; ignored elsewhere). ``gated``: the weight's rows
    interleave gate and up (row 2j gate j, 2j+1 up j); returns ``silu(gate) * up`` [M, N / 2], computed from
    the float32 sums and rounded once. ``row_ss``: ``(ss_parts, eps)`` from :func:`w4a16_tc_res_norm`, whose
    output x2 is (x * norm weight); each row's sums are scaled by rsqrt(mean(x^2) + eps) before the bias: the
    second half of an RMSNorm split across the two launches."""
    if row_ss is not None:
        parts = row_ss[0]
        if parts.dim() != 2 or parts.shape[1] != x2.shape[0] or parts.dtype != torch.float32 \
                or not parts.is_contiguous() or parts.shape[0] > MAX_SS_TILES:
            raise ValueError(f"row_ss must be a contiguous float32 [tiles <= {MAX_SS_TILES}, {x2.shape[0]}] tensor of "
                             f"squares, got {tuple(parts.shape)} {parts.dtype}")
    return _launch(x2, w, bias, cfg, prefetch, gated, None, row_ss=row_ss)[0]


def w4a16_tc_res_norm(x2: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w: StripedWeight,
                      bias: torch.Tensor | None = None, cfg: dict | None = None,
                      prefetch: tuple[torch.Tensor, dict] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear whose output is a residual delta, with the first half of the next RMSNorm in its epilogue:
    ``x = residual + (x2 @ W^T + bias)`` (each rounded once, bit for bit the separate ops' x), and returns
    ``(x * norm_weight, x, ss_parts)``: the next linear's operand (rounded once), x, and float32 [tiles, M] sums
    of squares of x per column tile. The next linear finishes the norm with ``w4a16_tc(..., row_ss=(ss_parts,
    eps))``; the pair equals norm-then-linear up to where the 16-bit roundings fall."""
    m, n = x2.shape[0], w.out_features
    if residual.shape != (m, n) or residual.dtype != x2.dtype or not residual.is_contiguous():
        raise ValueError(f"the residual must be a contiguous {(m, n)} {x2.dtype} tensor, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if norm_weight.shape != (n,):
        raise ValueError(f"the norm weight must have shape ({n},), got {tuple(norm_weight.shape)}")
    return _launch(x2, w, bias, cfg, prefetch, False, None, res_norm=(residual, norm_weight.contiguous()))


def w4a16_tc_norm(x2: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  w: StripedWeight, bias: torch.Tensor | None = None, cfg: dict | None = None,
                  prefetch: tuple[torch.Tensor, dict] | None = None,
                  gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add, RMSNorm and linear in one launch: ``x = x2 + delta`` (16-bit, rounded
    once; no add without ``delta``), ``y = x * rsqrt(mean(x^2) + eps) * norm_weight`` and ``y @ W^T + bias``
    (``gated``, ``prefetch``: as :func:`w4a16_tc`). Returns ``(out, x)``; x is ``x2`` itself without ``delta``.
    The dot reads ``x * norm_weight`` and the row's rsqrt scales the float32 sums, so the result equals the
    separate ops' up to where the 16-bit roundings of y fall (tests: relative error against the reference)."""
    m, k = x2.shape
    if norm_weight.shape != (k,):
        raise ValueError(f"the norm weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if delta is not None and (delta.shape != x2.shape or delta.dtype != x2.dtype or not delta.is_contiguous()):
        raise ValueError(f"the residual delta must be a contiguous {tuple(x2.shape)} {x2.dtype} tensor, got "
                         f"{tuple(delta.shape)} {delta.dtype}")
    out, x_new = _launch(x2, w, bias, cfg, prefetch, gated, (delta, norm_weight.contiguous(), float(eps)))
    return out, (x2 if delta is None else x_new)


def _launch(x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None, cfg: dict | None,
            prefetch: tuple[torch.Tensor, dict] | None, gated: bool,
            norm: tuple[torch.Tensor | None, torch.Tensor, float] | None,
            row_ss: tuple[torch.Tensor, float] | None = None,
            res_norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple:
    """One launch of the kernel: ``(out, x_new)``, or with ``res_norm`` ``(out, x_new, ss_parts)``."""
    m, n, k = x2.shape[0], w.out_features, w.in_features
    if gated and n % 2:
        raise ValueError(f"a gated W4A16 linear needs an even number of outputs (gate and up rows), got {n}")
    cfg = dict(cfg or tc_config(m, n, k, w.group_size, _sm_count(x2.device), _hopper(x2.device)))
    if (cfg.get("UNPACK") == 2 and INTERPRETING) or (cfg.get("UNPACK") in (2, 3) and x2.dtype != torch.bfloat16):
        cfg["UNPACK"] = 1   # the PTX makes bf16; UNPACK 3 has an interpreter path of its own
    bk = cfg["BLOCK_K"]
    if k % bk or w.group_size % bk:
        raise ValueError(f"BLOCK_K {bk} must divide K = {k} and the group size {w.group_size}")
    if cfg.get("UNPACK") == 3 and (bk != 128 or cfg["BLOCK_N"] % 16):
        raise ValueError(f"UNPACK 3 needs BLOCK_K = 128 and BLOCK_N a multiple of 16, got {bk} and {cfg['BLOCK_N']}")
    if cfg.get("TILED") and cfg.get("UNPACK") != 3:
        cfg["TILED"] = False   # only the UNPACK=3 words have a tiled copy (fp16 activations fall back to UNPACK 1)
    if cfg.get("TILED"):
        rows = cfg.setdefault("TILE_ROWS", DOT_TILE_ROWS)
        if cfg["BLOCK_N"] % rows or cfg["BLOCK_N"] > max(DOT_PAD_ROWS, rows):
            raise ValueError(f"TILED needs BLOCK_N a multiple of TILE_ROWS {rows} and at most "
                             f"{max(DOT_PAD_ROWS, rows)}, got {cfg['BLOCK_N']}")
    else:
        cfg.pop("TILE_ROWS", None)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    if cfg["SPLIT_K"] > 1 and (tiles > MAX_TILES or (norm is not None and tiles * cfg["BLOCK_M"] > NORM_SS_WORDS)):
        cfg["SPLIT_K"] = 1
    nk = {}
    x_new = None
    if norm is not None:   # each K step adds the delta and multiplies by the norm weight
        delta, nw, eps = norm
        if delta is not None and delta.data_ptr() % 16:
            cfg["TMA"] = False
        x_new = None if delta is None else torch.empty_like(x2)
        nk = dict(NORM=True, HAS_DELTA=delta is not None, d_ptr=x2 if delta is None else delta, nw_ptr=nw,
                  xo_ptr=x2 if x_new is None else x_new, ss_ptr=norm_ss_pool(x2.device), eps=eps)
    if row_ss is not None:
        nk.update(ROW_SS=True, ssp_ptr=row_ss[0], ss_tiles=row_ss[0].shape[0],
                  SS_TILES=triton.next_power_of_2(row_ss[0].shape[0]), eps=float(row_ss[1]))
    ss_parts = None
    if res_norm is not None:
        x_new = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        ss_parts = torch.empty((triton.cdiv(n, cfg["BLOCK_N"]), m), dtype=torch.float32, device=x2.device)
        nk.update(RES_NORM=True, res_ptr=res_norm[0], nw_ptr=res_norm[1], xo_ptr=x_new, ssp_ptr=ss_parts)
    out = torch.empty((m, n // 2 if gated else n), dtype=x2.dtype, device=x2.device)
    split = cfg["SPLIT_K"]
    ws, cfg["ATOMIC"] = split_k_workspace(x2.device, m, n, split, torch.float32, bool(cfg.get("ATOMIC")))
    dummy = w.scales
    x_desc = w_desc = None
    if cfg.get("TMA"):
        if not tma_ok(x2, w, cfg):
            cfg["TMA"] = False
        else:
            from triton.tools.tensor_descriptor import TensorDescriptor
            x_desc = TensorDescriptor.from_tensor(x2, [cfg["BLOCK_M"], bk])
            if norm is not None and norm[0] is not None:
                nk["d_desc"] = TensorDescriptor.from_tensor(norm[0], [cfg["BLOCK_M"], bk])
            if not cfg.get("TILED"):
                w_desc = TensorDescriptor.from_tensor(w.canonical, [cfg["BLOCK_N"], bk // 8])
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    if cfg.get("TILED"):
        words = w.dot_tiled(cfg["TILE_ROWS"])
    else:
        words = w.dot_words if cfg.get("UNPACK") == 3 else w.canonical
    pf = {}
    if prefetch is not None and prefetch[1]["pf_bytes"] > 0 and pdl_ok(x2.device) \
            and prefetch[0].data_ptr() % 16 == 0:
        pf = dict(pf_ptr=prefetch[0], PF=True, PF_LANES=32 * cfg["num_warps"], **prefetch[1])
    w4a16_tc_kernel[grid](x2, words, x_desc, w_desc, w.scales, dummy if w.zeros is None else w.zeros,
                          dummy if bias is None else bias, out, ws, split_k_counters(x2.device),
                          m, n, k, k // 8, k // w.group_size, x2.stride(0), out.stride(0),
                          GROUP=w.group_size, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
                          INTERPRET=INTERPRETING, GATED=gated, **cfg, **pf, **nk)
    return (out, x_new) if res_norm is None else (out, x_new, ss_parts)


# ----------------------------------------------------------------------------- dequantize from the TILED layout

@triton.jit
def w4a16_dequant_tiled_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, G, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                               TILE_ROWS: tl.constexpr):
    """One block of TILE_ROWS rows x one 128-wide K step of a TILED UNPACK=3 weight -> dense [N, K] in out's
    dtype, (q - zero) * scale rounded once (as ``w4a16_dequant_kernel``). Word ``c = 4t + jp`` holds in nibble
    ``4e + 2jj + h`` the code of ``k = 32jp + 16jj + 8h + 2t + e`` (``w4a16_layout.dot_layout_words``)."""
    pid_b = tl.program_id(0)
    step = tl.program_id(1)
    steps = K // 128
    i = tl.arange(0, TILE_ROWS)[:, None]
    c = tl.arange(0, 16)[None, :]
    words = tl.load(w_ptr + (pid_b * steps + step) * (TILE_ROWS * 16) + i * 16 + c)         # [R, 16]
    f = _unpack_tile(words, 128)                      # 2^23 + u at 8c + nibble = [t, jp | e, jj, h]
    f = tl.reshape(f, (TILE_ROWS, 4, 4, 2, 2, 2))
    f = tl.reshape(tl.permute(f, (0, 2, 4, 5, 1, 3)), (TILE_ROWS, 128))             # k order (jp, jj, h, t, e)
    rows = pid_b * TILE_ROWS + tl.arange(0, TILE_ROWS)
    live = rows < N
    grp = (step * 128) // GROUP
    s = tl.load(s_ptr + rows * G + grp, mask=live, other=0.0).to(tl.float32)[:, None]
    q = f - (8388608.0 + 8.0)
    if HAS_ZERO:
        q = q - tl.load(z_ptr + rows * G + grp, mask=live, other=0).to(tl.float32)[:, None]
    cols = step * 128 + tl.arange(0, 128)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], (q * s).to(out_ptr.dtype.element_ty), mask=live[:, None])


def w4a16_dequantize_tiled(w: StripedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` from the TILED UNPACK=3 words (all a kernel-layout-only weight
    holds; 128-wide groups or wider)."""
    n, k = w.out_features, w.in_features
    if k % 128 or w.group_size % 128:
        raise ValueError(f"the TILED layout needs K and the group size divisible by 128, got {k} and {w.group_size}")
    words = w.dot_tiled(DOT_TILE_ROWS)
    out = torch.empty((n, k), dtype=dtype, device=w.scales.device)
    grid = (triton.cdiv(n, DOT_TILE_ROWS), k // 128)
    w4a16_dequant_tiled_kernel[grid](words, w.scales, w.scales if w.zeros is None else w.zeros, out, n, k,
                                     k // w.group_size, GROUP=w.group_size, HAS_ZERO=w.zeros is not None,
                                     TILE_ROWS=DOT_TILE_ROWS, num_warps=4)
    return out
