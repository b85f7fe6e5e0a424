"""W4A16 Triton kernels: int4 group-wise weights x bf16/fp16 activations.

CUDA-core GEMVs and the dequantize kernel; the tensor-core kernel for M >= 2 is in
:mod:`.triton_w4a16_tc`. :mod:`quantarena.kernels.ops` chooses by the batch size M:

* ``gemv2`` (M = 1) and ``gemv`` (M <= 4, any group size): CUDA-core FMA kernels, split-K, for the
  weight-read-bound decode case.
* ``dequant`` (large M): dequantize the whole weight to bf16 once, then cuBLAS.

Weight layouts. ``dequant`` (and the tensor-core kernel) read the canonical packed tensor as it is. The GEMV reads a
copy in a "striped" layout, built once per weight. The canonical layout (compressed-tensors) puts input elements
``8c .. 8c+7`` in word ``c``. The kernels use a layout repacked once per weight: the input dim is cut
into stripe blocks of ``S`` elements (``S = min(128, group)``, so a block never spans two groups),
and inside a block word ``w`` holds elements ``w, w + S/8, ..., w + 7 S/8`` (nibble ``j`` is element
``j * S/8 + w``). For a fixed nibble ``j`` the activations a row of words needs are then contiguous
(vector loads), every nibble needs one constant shift, and all eight nibbles of a word share one
group scale. Words hold ``q + 8`` like the canonical layout.

Cheap dequantization (gemv): a nibble ``u`` or-ed into the mantissa of the float ``1.0`` gives
``f = 1 + u * 2^-p`` with one mask-or and no int->float convert (half the nibbles also need a shift,
shared by two nibbles); ``sum u x`` is recovered from ``sum f x - sum x`` per word, and the ``- 8 - zero``
offset from ``sum x``, which is shared by all the rows of a tile.

Split-K without extra launches: programs of one output tile write fp32 partials to a workspace;
the last one to arrive (an atomic counter per tile) sums them, adds the bias, writes the output and
resets its counter to zero, so a counter buffer is reusable across calls and CUDA-graph replays.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

STRIPE_MAX = 128
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def stripe_size(group_size: int) -> int:
    """Stripe block (elements): the largest of 128, 64, 32, 16, 8 dividing ``group_size``."""
    for s in (128, 64, 32, 16, 8):
        if group_size % s == 0:
            return s
    raise ValueError(f"group size {group_size} is not a multiple of 8; the W4A16 kernels need one")


def repack_striped(packed: torch.Tensor, in_features: int, stripe: int) -> torch.Tensor:
    """Canonical packed int32 ``[N, K/8]`` -> striped kernel layout int32 ``[N, K/8]`` (see module doc)."""
    n = packed.shape[0]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF                       # [N, K/8, 8], element k = 8c + j
    u = u.reshape(n, in_features // stripe, 8, stripe // 8)            # [N, blocks, j, w]: k = b*S + j*S/8 + w
    u = u.transpose(2, 3)                                              # [N, blocks, w, j]
    words = torch.sum(u.to(torch.int64) << shifts.to(torch.int64), dim=-1)  # [N, K/8] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)              # same 32 bits as int32
    return words.to(torch.int32).reshape(n, in_features // 8).contiguous()


# ----------------------------------------------------------------------------- split-K finish

@triton.jit
def split_k_reduce(part, ws_ptr, cnt_ptr, rm, rn, M, N, pid_k, tile_id, SPLIT_K, ATOMIC: tl.constexpr = False):
    """Split-K in one launch. Returns ``(total, last)``: in the last program of the tile to arrive (an atomic
    counter per tile, which that program resets to zero so the buffer is reusable across calls and CUDA-graph
    replays), the sum of every split's partial and True; elsewhere zeros and False.

    * ``ATOMIC`` False: each program stores its partial ``part`` [BM, BN] (fp32 or int32) in its own slot of
      a ``[SPLIT_K, M, N]`` workspace; the last program reads the SPLIT_K slots and adds them in split order
      (deterministic).
    * ``ATOMIC`` True: each program adds its partial into one ``[M, N]`` workspace that is zero on entry
      (:func:`split_k_workspace`); the last program swaps that one tile for zeros (an atomic exchange). The last
      program reads 1 tile instead of SPLIT_K. int32 sums stay exact and deterministic; fp32 sums depend on
      the arrival order (a last-bit difference between runs).

    ``SPLIT_K`` may be a constexpr or a runtime value (the v2 GEMV passes it at run time)."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ws_off = rm[:, None] * N + rn[None, :]
    if ATOMIC:
        tl.atomic_add(ws_ptr + ws_off, part, mask=mask, sem="relaxed", scope="gpu")
    else:
        tl.store(ws_ptr + pid_k * M * N + ws_off, part, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(part)
    if last:
        if ATOMIC:
            # read and zero with one atomic exchange per element (on the 32-bit pattern: the interpreter
            # exchanges integers only). A load, then a store of zeros, can be done by two threads of the program
            # (the compiler picks each one's layout): the H100 showed zeros read after another thread cleared them
            bits = tl.atomic_xchg(ws_ptr.to(tl.pointer_type(tl.int32)) + ws_off,
                                  tl.zeros_like(part).to(tl.int32, bitcast=True), mask=mask, sem="relaxed", scope="gpu")
            total = bits.to(part.dtype, bitcast=True)
        else:
            for s in range(SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + ws_off, mask=mask, other=0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile_id, 0, sem="relaxed", scope="gpu")
    return total, last


@triton.jit
def _store_out(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        total += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_gated(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """``silu(gate) * up`` of a tile whose columns interleave gate and up (column 2j gate j, 2j+1 up j), in
    float32, rounded once: out [M, N / 2], column ``rn[0] / 2 + j``."""
    if HAS_BIAS:
        total += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    BM: tl.constexpr = total.shape[0]
    BN: tl.constexpr = total.shape[1]
    gate, up = tl.split(tl.reshape(total, [BM, BN // 2, 2]))
    val = gate * tl.sigmoid(gate) * up
    rj = tl.min(rn, axis=0) // 2 + tl.arange(0, BN // 2)
    mask = (rm[:, None] < M) & (rj[None, :] < N // 2)
    tl.store(out_ptr + rm[:, None] * stride_om + rj[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_finish(part, ws_ptr, cnt_ptr, bias_ptr, out_ptr, rm, rn, M, N, stride_om,
                    pid_k, tile_id, SPLIT_K, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr = False,
                    GATED: tl.constexpr = False):
    """part: fp32 [BM, BN] partial sum of this program. Writes out (bf16/fp16) once all splits are in;
    ``GATED``: the SiLU-gated half (:func:`_store_gated`)."""
    if SPLIT_K == 1:
        if GATED:
            _store_gated(part, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)
        else:
            _store_out(part, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)
    else:
        total, last = split_k_reduce(part, ws_ptr, cnt_ptr, rm, rn, M, N, pid_k, tile_id, SPLIT_K, ATOMIC)
        if last:
            if GATED:
                _store_gated(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)
            else:
                _store_out(total, bias_ptr, out_ptr, rm, rn, M, N, stride_om, HAS_BIAS)


# ----------------------------------------------------------------------------- gemv (M <= 4)

@triton.jit
def _mantissa_float(bits, MASK: tl.constexpr):
    """The float 1.0 with the nibble at ``MASK`` (bits 12..15 or 16..19) or-ed into its mantissa."""
    return ((bits & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_floats(words):
    """The eight nibbles of each word as floats 1 + u * 2^-p (see _gemv_row_step), in nibble order.

    Nibble j sits at bits 4j. Four shifts of the word (<<16, <<8, >>8, >>16) bring every nibble to
    bits 12..15 (odd j: f = 1 + u/2048) or 16..19 (even j: f = 1 + u/128); one mask-or each then
    gives a float without an int->float convert."""
    up16 = words << 16
    up8 = words << 8
    dn8 = (words >> 8) & 0x00FFFFFF                      # logical shifts: the masks below keep 4 bits
    dn16 = (words >> 16) & 0x0000FFFF
    return (_mantissa_float(up16, 0xF0000), _mantissa_float(up8, 0xF000), _mantissa_float(up8, 0xF0000),
            _mantissa_float(words, 0xF000), _mantissa_float(words, 0xF0000), _mantissa_float(dn8, 0xF000),
            _mantissa_float(dn8, 0xF0000), _mantissa_float(dn16, 0xF000))


@triton.jit
def _nibble_dot(f, a0, a1, a2, a3, a4, a5, a6, a7):
    """sum_j f_j a_j over a word's eight nibble floats ``f`` (a tuple in nibble order): one FMA chain."""
    f0, f1, f2, f3, f4, f5, f6, f7 = f
    t = f0 * a0
    t += f1 * a1
    t += f2 * a2
    t += f3 * a3
    t += f4 * a4
    t += f5 * a5
    t += f6 * a6
    t += f7 * a7
    return t


@triton.jit
def _gemv_row_step(acc, f, s, zc, x_row_ptr, xoff, J_STRIDE: tl.constexpr):
    """One activation row: acc [BN, BKW] += scale * sum_j q_j x_j over the eight nibbles of each word.

    Activations are pre-multiplied by 128 (even j) or 2048 (odd j), exact powers of two, so one FMA
    chain gives t = sum_j x_j (2^p + u_j), and sum_j q_j x_j = t - sum_j 2^p x_j - (8 + zero) sum_j x_j,
    whose x part is per column (shared by all the rows of the tile)."""
    x0 = tl.load(x_row_ptr + xoff).to(tl.float32)[None, :]               # [1, BKW], contiguous per stripe
    x1 = tl.load(x_row_ptr + xoff + J_STRIDE).to(tl.float32)[None, :]
    x2 = tl.load(x_row_ptr + xoff + 2 * J_STRIDE).to(tl.float32)[None, :]
    x3 = tl.load(x_row_ptr + xoff + 3 * J_STRIDE).to(tl.float32)[None, :]
    x4 = tl.load(x_row_ptr + xoff + 4 * J_STRIDE).to(tl.float32)[None, :]
    x5 = tl.load(x_row_ptr + xoff + 5 * J_STRIDE).to(tl.float32)[None, :]
    x6 = tl.load(x_row_ptr + xoff + 6 * J_STRIDE).to(tl.float32)[None, :]
    x7 = tl.load(x_row_ptr + xoff + 7 * J_STRIDE).to(tl.float32)[None, :]
    xsum = (x0 + x2 + x4 + x6) + (x1 + x3 + x5 + x7)
    a0 = x0 * 128.0
    a1 = x1 * 2048.0
    a2 = x2 * 128.0
    a3 = x3 * 2048.0
    a4 = x4 * 128.0
    a5 = x5 * 2048.0
    a6 = x6 * 128.0
    a7 = x7 * 2048.0
    offset = ((a0 + a2) + (a4 + a6)) + ((a1 + a3) + (a5 + a7)) + zc * xsum  # [1, BKW] or [BN, BKW]
    t = _nibble_dot(f, a0, a1, a2, a3, a4, a5, a6, a7)
    return acc + s * (t - offset)


@triton.jit
def w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, KW, G, stride_xm, stride_om,
                      GROUP: tl.constexpr, STRIPE: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * (q[n, k] - zero) * scale for M <= BLOCK_M <= 4 rows; one program per
    (N tile, K split). Weights in the striped layout; needs KW % BLOCK_KW == 0 and BLOCK_KW % (STRIPE/8) == 0,
    so no load along K is masked (the launcher checks)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPS: tl.constexpr = STRIPE // 8                      # words per stripe block
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # [BN]
    if not EVEN_N:
        rn = tl.minimum(rn, N - 1)                        # clamp: rows past N recompute row N-1, never stored
    c = tl.arange(0, BLOCK_KW)
    xoff = (c // WPS) * STRIPE + c % WPS                  # element of nibble 0 of each word, tile-relative
    words_per_split = tl.cdiv(KW // BLOCK_KW, SPLIT_K) * BLOCK_KW
    k_start = pid_k * words_per_split
    k_end = tl.minimum(k_start + words_per_split, KW)
    # rows past M re-read row M-1 (valid memory); their results are never stored
    x0 = x_ptr
    x1 = x_ptr + tl.minimum(1, M - 1) * stride_xm
    x2 = x_ptr + tl.minimum(2, M - 1) * stride_xm
    x3 = x_ptr + tl.minimum(3, M - 1) * stride_xm

    acc0 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    for kw0 in range(k_start, k_end, BLOCK_KW):
        cw = kw0 + c                                      # [BKW] word columns
        words = tl.load(w_ptr + rn[:, None] * KW + cw[None, :])           # [BN, BKW] int32
        grp = (cw * 8) // GROUP
        s = tl.load(s_ptr + rn[:, None] * G + grp[None, :]).to(tl.float32)
        if HAS_ZERO:
            zc = 8.0 + tl.load(z_ptr + rn[:, None] * G + grp[None, :]).to(tl.float32)
        else:
            zc = 8.0
        xk = kw0 * 8
        f = _nibble_floats(words)                         # dequantized once, used by every row
        acc0 = _gemv_row_step(acc0, f, s, zc, x0 + xk, xoff, WPS)
        if BLOCK_M > 1:
            acc1 = _gemv_row_step(acc1, f, s, zc, x1 + xk, xoff, WPS)
        if BLOCK_M > 2:
            acc2 = _gemv_row_step(acc2, f, s, zc, x2 + xk, xoff, WPS)
            acc3 = _gemv_row_step(acc3, f, s, zc, x3 + xk, xoff, WPS)

    # gather the rows into one [BLOCK_M, BN] tile for the shared finish
    rm = tl.arange(0, BLOCK_M)
    part = tl.where(rm[:, None] == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if BLOCK_M > 1:
        part = tl.where(rm[:, None] == 1, tl.sum(acc1, axis=1)[None, :], part)
    if BLOCK_M > 2:
        part = tl.where(rm[:, None] == 2, tl.sum(acc2, axis=1)[None, :], part)
        part = tl.where(rm[:, None] == 3, tl.sum(acc3, axis=1)[None, :], part)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _split_k_finish(part, ws_ptr, cnt_ptr, bias_ptr, out_ptr, rm, rn, M, N, stride_om,
                    pid_k, pid_n, SPLIT_K, HAS_BIAS)


# ----------------------------------------------------------------------------- gemv v2 (M <= 16)

@triton.jit
def _gemv2_row(acc, f, x_row_ptr, xoff, s, zc, BN: tl.constexpr, NG: tl.constexpr,
               WPGT: tl.constexpr, J_STRIDE: tl.constexpr):
    """One activation row of a [BN, BKW] word tile: acc [BN, NG] += s * sum_{words of each group} sum_j q_j x_j.

    f: the eight nibble floats 1 + u * 2^-p of the tile (shared by every row). Activations are scaled by
    2^p (exact), so f_j * a_j = a_j + u_j x_j: one FMA per nibble; the x-only parts (sum a_j, sum x_j)
    are reduced per group on a [1, NG] tensor, shared by all BN weight rows."""
    x0 = tl.load(x_row_ptr + xoff).to(tl.float32)[None, :]
    x1 = tl.load(x_row_ptr + xoff + J_STRIDE).to(tl.float32)[None, :]
    x2 = tl.load(x_row_ptr + xoff + 2 * J_STRIDE).to(tl.float32)[None, :]
    x3 = tl.load(x_row_ptr + xoff + 3 * J_STRIDE).to(tl.float32)[None, :]
    x4 = tl.load(x_row_ptr + xoff + 4 * J_STRIDE).to(tl.float32)[None, :]
    x5 = tl.load(x_row_ptr + xoff + 5 * J_STRIDE).to(tl.float32)[None, :]
    x6 = tl.load(x_row_ptr + xoff + 6 * J_STRIDE).to(tl.float32)[None, :]
    x7 = tl.load(x_row_ptr + xoff + 7 * J_STRIDE).to(tl.float32)[None, :]
    a0 = x0 * 128.0
    a1 = x1 * 2048.0
    a2 = x2 * 128.0
    a3 = x3 * 2048.0
    a4 = x4 * 128.0
    a5 = x5 * 2048.0
    a6 = x6 * 128.0
    a7 = x7 * 2048.0
    t = _nibble_dot(f, a0, a1, a2, a3, a4, a5, a6, a7)                    # [BN, BKW]
    xa = ((a0 + a2) + (a4 + a6)) + ((a1 + a3) + (a5 + a7))                  # [1, BKW]
    xz = ((x0 + x2) + (x4 + x6)) + ((x1 + x3) + (x5 + x7))
    tg = tl.sum(tl.reshape(t, (BN, NG, WPGT)), axis=2)                      # [BN, NG]
    xag = tl.sum(tl.reshape(xa, (1, NG, WPGT)), axis=2)                     # [1, NG]
    xzg = tl.sum(tl.reshape(xz, (1, NG, WPGT)), axis=2)
    return acc + s * (tg - xag - zc * xzg)


@triton.jit
def _gemv2_select(part, rm, i: tl.constexpr, acc):
    return tl.where(rm[:, None] == i, tl.sum(acc, axis=1)[None, :], part)


@triton.jit
def w4a16_gemv2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                       M, N, K, KW, G, stride_xm, stride_om, SPLIT_K,
                       GROUP: tl.constexpr, STRIPE: tl.constexpr, HAS_ZERO: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_KW: tl.constexpr, EVEN_N: tl.constexpr):
    """GEMV for M <= BLOCK_M <= 16 rows on the striped layout. One program per (N tile, K split); each
    step loads a [BLOCK_N, BLOCK_KW] word tile (16-byte loads along K), turns it into nibble floats once,
    and reuses them for every activation row; the scale (and zero) of each (row, group) is loaded once
    per step and applied to per-group sums. SPLIT_K is a runtime argument (one compiled kernel per tile
    shape). Needs KW % BLOCK_KW == 0, BLOCK_KW % (STRIPE/8) == 0, and GROUP/8 and BLOCK_KW powers of two."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPS: tl.constexpr = STRIPE // 8                       # words per stripe block
    WPG: tl.constexpr = GROUP // 8                        # words per group
    WPGT: tl.constexpr = WPG if WPG < BLOCK_KW else BLOCK_KW
    NG: tl.constexpr = BLOCK_KW // WPGT                   # groups per tile step
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if not EVEN_N:
        rn = tl.minimum(rn, N - 1)
    c = tl.arange(0, BLOCK_KW)
    xoff = (c // WPS) * STRIPE + c % WPS
    gl = tl.arange(0, NG)
    words_per_split = tl.cdiv(KW // BLOCK_KW, SPLIT_K) * BLOCK_KW
    k_start = pid_k * words_per_split
    k_end = tl.minimum(k_start + words_per_split, KW)

    acc0 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc8 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc9 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc10 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc11 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc12 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc13 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc14 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc15 = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for kw0 in range(k_start, k_end, BLOCK_KW):
        words = tl.load(w_ptr + rn[:, None] * KW + (kw0 + c)[None, :])           # [BN, BKW] int32
        grp = (kw0 * 8) // GROUP + gl                                              # [NG]
        s = tl.load(s_ptr + rn[:, None] * G + grp[None, :]).to(tl.float32)       # [BN, NG]
        if HAS_ZERO:
            zc = 8.0 + tl.load(z_ptr + rn[:, None] * G + grp[None, :]).to(tl.float32)
        else:
            zc = 8.0
        f = _nibble_floats(words)
        xp = x_ptr + kw0 * 8
        acc0 = _gemv2_row(acc0, f, xp, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
        if BLOCK_M > 1:
            acc1 = _gemv2_row(acc1, f, xp + tl.minimum(1, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
        if BLOCK_M > 2:
            acc2 = _gemv2_row(acc2, f, xp + tl.minimum(2, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc3 = _gemv2_row(acc3, f, xp + tl.minimum(3, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
        if BLOCK_M > 4:
            acc4 = _gemv2_row(acc4, f, xp + tl.minimum(4, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc5 = _gemv2_row(acc5, f, xp + tl.minimum(5, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc6 = _gemv2_row(acc6, f, xp + tl.minimum(6, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc7 = _gemv2_row(acc7, f, xp + tl.minimum(7, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
        if BLOCK_M > 8:
            acc8 = _gemv2_row(acc8, f, xp + tl.minimum(8, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc9 = _gemv2_row(acc9, f, xp + tl.minimum(9, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc10 = _gemv2_row(acc10, f, xp + tl.minimum(10, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc11 = _gemv2_row(acc11, f, xp + tl.minimum(11, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc12 = _gemv2_row(acc12, f, xp + tl.minimum(12, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc13 = _gemv2_row(acc13, f, xp + tl.minimum(13, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc14 = _gemv2_row(acc14, f, xp + tl.minimum(14, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)
            acc15 = _gemv2_row(acc15, f, xp + tl.minimum(15, M - 1) * stride_xm, xoff, s, zc, BLOCK_N, NG, WPGT, WPS)

    rm = tl.arange(0, BLOCK_M)
    part = tl.where(rm[:, None] == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if BLOCK_M > 1:
        part = _gemv2_select(part, rm, 1, acc1)
    if BLOCK_M > 2:
        part = _gemv2_select(part, rm, 2, acc2)
        part = _gemv2_select(part, rm, 3, acc3)
    if BLOCK_M > 4:
        part = _gemv2_select(part, rm, 4, acc4)
        part = _gemv2_select(part, rm, 5, acc5)
        part = _gemv2_select(part, rm, 6, acc6)
        part = _gemv2_select(part, rm, 7, acc7)
    if BLOCK_M > 8:
        part = _gemv2_select(part, rm, 8, acc8)
        part = _gemv2_select(part, rm, 9, acc9)
        part = _gemv2_select(part, rm, 10, acc10)
        part = _gemv2_select(part, rm, 11, acc11)
        part = _gemv2_select(part, rm, 12, acc12)
        part = _gemv2_select(part, rm, 13, acc13)
        part = _gemv2_select(part, rm, 14, acc14)
        part = _gemv2_select(part, rm, 15, acc15)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _split_k_finish(part, ws_ptr, cnt_ptr, bias_ptr, out_ptr, rm, rn, M, N, stride_om, pid_k, pid_n, SPLIT_K,
                    HAS_BIAS)


# ----------------------------------------------------------------------------- dot helper

@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """a @ b with float32 accumulation. Under TRITON_INTERPRET the 16-bit operands are widened first:
    the interpreter (triton 3.9) miscomputes dots of bf16 tensors made inside the kernel."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


# ----------------------------------------------------------------------------- dequant (large M)

@triton.jit
def w4a16_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, G,
                         GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Canonical int4 [N, K/8] -> dense weight [N, K] in out's dtype (for the cuBLAS path);
    each thread writes the eight elements of a word as one 16-byte store."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cw = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    nib = tl.arange(0, 8)
    wmask = (rn[:, None] < N) & (cw[None, :] < KW)
    words = tl.load(w_ptr + rn[:, None] * KW + cw[None, :], mask=wmask, other=0)
    grp = (cw * 8) // GROUP
    s = tl.load(s_ptr + rn[:, None] * G + grp[None, :], mask=wmask, other=0.0).to(tl.float32)
    u = (((words[:, :, None] >> (nib * 4)[None, None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
    if HAS_ZERO:
        z = tl.load(z_ptr + rn[:, None] * G + grp[None, :], mask=wmask, other=0).to(tl.float32)
        w = (u - (8388608.0 + 8.0 + z[:, :, None])) * s[:, :, None]
    else:
        w = (u - (8388608.0 + 8.0)) * s[:, :, None]
    col = cw[:, None] * 8 + nib[None, :]                                               # [BKW, 8]
    tl.store(out_ptr + rn[:, None, None] * K + col[None, :, :], w.to(out_ptr.dtype.element_ty),
             mask=wmask[:, :, None] & (nib[None, None, :] < 8))


# ----------------------------------------------------------------------------- launchers

class StripedWeight:
    """A W4A16 weight in the kernels' layout, built once from the canonical tensors.

    ``words`` replace the canonical packed codes; scales and zero points are used as stored."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                 hold_packed: bool = True):
        n, kw = packed.shape
        self._setup(n, kw * 8, scales, zeros, group_size)
        canonical = packed.contiguous()                                            # [N, K/8] int32, tc/dequant
        # A cache keyed on ``packed`` must not keep it alive: then hold it weakly (the caller passes it on
        # every call, so it is alive whenever a kernel runs).
        weak = not hold_packed and canonical is packed
        self._canonical = weakref.ref(canonical) if weak else (lambda: canonical)

    def _setup(self, out_features: int, in_features: int, scales: torch.Tensor, zeros: torch.Tensor | None,
               group_size: int) -> None:
        """Shapes, quantization parameters and the (empty) caches of the derived layouts."""
        self.out_features, self.in_features = out_features, in_features
        self.group_size = group_size
        self.stripe = stripe_size(group_size)
        self._words: torch.Tensor | None = None                                   # striped, built on first use
        self._tiled: dict[tuple[int, int], torch.Tensor] = {}                     # gemv3 tile layouts, likewise
        self._dot: torch.Tensor | None = None                                      # tc UNPACK=3 layout, likewise
        self._dot_tiled: dict[int, torch.Tensor] = {}                              # ... in row blocks
        self.scales = scales.contiguous()                                          # [N, K/g] bf16
        self.zeros = None if zeros is None else zeros.to(torch.int8).contiguous()  # [N, K/g] int8

    @classmethod
    def from_dot_tiled(cls, tiled: torch.Tensor, out_features: int, scales: torch.Tensor,
                       zeros: torch.Tensor | None, group_size: int) -> "StripedWeight":
        """A weight held only in the tensor-core kernel's TILED UNPACK=3 layout (``DOT_TILE_ROWS``-row blocks,
        ``w4a16_layout.dot_tiled_words``): no canonical copy, so only the TILED tc tiles and the tiled
        dequantize (``triton_w4a16_tc``) can serve it."""
        from .w4a16_layout import DOT_TILE_ROWS

        self = cls.__new__(cls)
        self._setup(out_features, tiled.shape[1] * 8, scales, zeros, group_size)
        self._dot_tiled[DOT_TILE_ROWS] = tiled
        self._canonical = None
        return self

    @property
    def canonical(self) -> torch.Tensor:
        if self._canonical is None:
            raise RuntimeError("this W4A16 weight is held only in the tensor-core kernel's layout; "
                               "only the TILED tc tiles and the tiled dequantize can read it")
        return self._canonical()

    @property
    def words(self) -> torch.Tensor:
        """The striped layout ``[N, K/8]`` int32 (gemv, gemv2), built on first use: a decode run that only
        needs the tiled copy (gemv3) never holds this one too."""
        if self._words is None:
            self._words = repack_striped(self.canonical, self.in_features, self.stripe)
        return self._words

    @property
    def dot_words(self) -> torch.Tensor:
        """The tensor-core kernel's UNPACK=3 layout (``triton_w4a16_tc.dot_layout_words``), built on first use."""
        if self._dot is None:
            from .w4a16_layout import dot_layout_words

            self._dot = dot_layout_words(self.canonical)
        return self._dot

    def dot_tiled(self, tile_rows: int | None = None) -> torch.Tensor:
        """The UNPACK=3 words in blocks of ``tile_rows`` rows (``triton_w4a16_tc.dot_tiled_words``; default
        ``DOT_TILE_ROWS``, which serves every tile of the tuned table: one copy per weight), built on first use;
        the untiled UNPACK=3 copy is not kept for it."""
        from .w4a16_layout import DOT_TILE_ROWS, dot_layout_words, dot_tiled_words

        rows = tile_rows or DOT_TILE_ROWS
        if rows not in self._dot_tiled:
            dot = self._dot if self._dot is not None else dot_layout_words(self.canonical)
            self._dot_tiled[rows] = dot_tiled_words(dot, rows)
        return self._dot_tiled[rows]

    def tiled(self, block_n: int, block_kw: int) -> torch.Tensor:
        """The gemv3 layout for one tile shape (see ``w4a16_layout.tile_words``), built on first use."""
        key = (block_n, block_kw)
        if key not in self._tiled:
            from .w4a16_layout import tile_words

            striped = self._words if self._words is not None else repack_striped(self.canonical, self.in_features,
                                                                                 self.stripe)
            self._tiled[key] = tile_words(striped, block_n, block_kw)
        return self._tiled[key]


MAX_TILES = 1 << 16   # split-K is used only while one launch has at most this many output tiles
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_k_counters(device: torch.device) -> torch.Tensor:
    """The per-device pool of split-K arrival counters (all zero between launches: the last program of
    each tile resets its counter). Launches on one stream never overlap, so one pool serves all kernels."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device]


ATOMIC_WS_WORDS = 1 << 20   # the ATOMIC split-K workspace: M * N of at most this many 32-bit sums (4 MB)
_ATOMIC_WS: dict[torch.device, torch.Tensor] = {}


def split_k_workspace(device: torch.device, m: int, n: int, split: int, dtype: torch.dtype,
                      atomic: bool) -> tuple[torch.Tensor, bool]:
    """The workspace of one split-K launch, and whether it is the ATOMIC one (see :func:`split_k_reduce`).
    ATOMIC: the per-device pool, zero between launches (each tile's last program zeroes what it read), viewed
    as ``dtype`` (fp32 or int32: zero bits either way); only where ``m * n`` fits it. Otherwise a fresh
    ``[split, m, n]`` buffer (one element without split-K)."""
    if atomic and split > 1 and m * n <= ATOMIC_WS_WORDS:
        if device not in _ATOMIC_WS:
            _ATOMIC_WS[device] = torch.zeros(ATOMIC_WS_WORDS, dtype=torch.int32, device=device)
        return _ATOMIC_WS[device].view(dtype), True
    return torch.empty((split, m, n) if split > 1 else (1,), dtype=dtype, device=device), False


NORM_SS_WORDS = 1 << 16   # split-K sums of squares of the NORM launches: tiles * BLOCK_M of at most this many
_NORM_SS: dict[torch.device, torch.Tensor] = {}


def norm_ss_pool(device: torch.device) -> torch.Tensor:
    """The per-device float32 slots where the split-K programs of a NORM launch meet their rows' sums of squares
    (zero between launches: each tile's last program zeroes its slots)."""
    if device not in _NORM_SS:
        _NORM_SS[device] = torch.zeros(NORM_SS_WORDS, dtype=torch.float32, device=device)
    return _NORM_SS[device]


def split_k_dirty(device: torch.device) -> str | None:
    """What a split-K launch left non-zero on ``device`` (the arrival counters, the ATOMIC workspace), or None:
    both must be zero between launches and CUDA-graph replays (tests and tune scripts check it)."""
    if int(split_k_counters(device).abs().sum()):
        return "split-K arrival counters"
    pool = _ATOMIC_WS.get(device)
    if pool is not None and int(pool.abs().sum()):
        return "the ATOMIC workspace"
    ss = _NORM_SS.get(device)
    if ss is not None and bool(ss.ne(0).any()):
        return "the NORM sums of squares"
    return None


def _split_for(tiles: int, k_steps: int, target_programs: int) -> int:
    """Smallest power-of-two split of K that gives about ``target_programs`` programs."""
    split = 1
    while tiles * split < target_programs and split * 2 <= k_steps and split < 16:
        split *= 2
    return split


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_kw(kw: int, stripe: int, want: int) -> int:
    """Largest power of two <= want that divides the K words and is a multiple of the stripe's words."""
    block = want
    while block > stripe // 8 and (kw % block or block % (stripe // 8)):
        block //= 2
    return max(block, stripe // 8)


# GEMV tile configs measured best per (N, K) on H100 by benchmarks/kernels.py --tune (M = 1, 2026-11-23)
TUNED_GEMV: dict[tuple[int, int], dict] = {
    (1024, 4096): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=8, num_warps=4, num_stages=3),  # 8.6 us
    (1024, 8192): dict(BLOCK_N=16, BLOCK_KW=64, SPLIT_K=8, num_warps=4, num_stages=3),  # 11.5 us
    (4096, 4096): dict(BLOCK_N=16, BLOCK_KW=64, SPLIT_K=2, num_warps=4, num_stages=3),  # 13.6 us
    (4096, 14336): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=4, num_warps=4, num_stages=3),  # 31.8 us
    (8192, 8192): dict(BLOCK_N=16, BLOCK_KW=64, SPLIT_K=1, num_warps=4, num_stages=3),  # 39.2 us
    (8192, 28672): dict(BLOCK_N=16, BLOCK_KW=64, SPLIT_K=8, num_warps=4, num_stages=3),  # 104.1 us
    (14336, 4096): dict(BLOCK_N=16, BLOCK_KW=64, SPLIT_K=1, num_warps=4, num_stages=3),  # 32.8 us
    (28672, 8192): dict(BLOCK_N=16, BLOCK_KW=64, SPLIT_K=1, num_warps=4, num_stages=3),  # 112.6 us
}


# the same for 3-4 rows (BLOCK_M = 4)
TUNED_GEMV_M4: dict[tuple[int, int], dict] = {
    (1024, 4096): dict(BLOCK_N=16, BLOCK_KW=32, SPLIT_K=8, num_warps=4, num_stages=3),  # 12.9 us
    (1024, 8192): dict(BLOCK_N=16, BLOCK_KW=32, SPLIT_K=8, num_warps=4, num_stages=3),  # 19.2 us
    (4096, 4096): dict(BLOCK_N=32, BLOCK_KW=32, SPLIT_K=8, num_warps=4, num_stages=3),  # 28.7 us
    (4096, 14336): dict(BLOCK_N=32, BLOCK_KW=32, SPLIT_K=16, num_warps=4, num_stages=3),  # 77.3 us
    (8192, 8192): dict(BLOCK_N=32, BLOCK_KW=32, SPLIT_K=8, num_warps=4, num_stages=3),  # 100.3 us
    (8192, 28672): dict(BLOCK_N=32, BLOCK_KW=32, SPLIT_K=16, num_warps=4, num_stages=3),  # 270.3 us
    (14336, 4096): dict(BLOCK_N=32, BLOCK_KW=32, SPLIT_K=4, num_warps=4, num_stages=3),  # 84.9 us
    (28672, 8192): dict(BLOCK_N=32, BLOCK_KW=32, SPLIT_K=4, num_warps=4, num_stages=3),  # 307.2 us
}


def gemv_config(m: int, n: int, k: int, stripe: int, sms: int) -> dict:
    block_m = 1 if m == 1 else (2 if m == 2 else 4)
    tuned = (TUNED_GEMV_M4 if block_m == 4 else TUNED_GEMV).get((n, k))
    if tuned is not None and (k // 8) % tuned["BLOCK_KW"] == 0 and tuned["BLOCK_KW"] % (stripe // 8) == 0:
        return dict(tuned, BLOCK_M=block_m)
    block_n = 16
    block_kw = _block_kw(k // 8, stripe, 64)
    split = _split_for(triton.cdiv(n, block_n), k // 8 // block_kw, 4 * sms)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KW=block_kw, SPLIT_K=split, num_warps=4, num_stages=3)


def _launch(kernel, grid, x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None, cfg: dict) -> torch.Tensor:
    m = x2.shape[0]
    n, k = w.out_features, w.in_features
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    split = cfg["SPLIT_K"]
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x2.device)
    dummy = w.scales
    kernel[grid](x2, w.words, w.scales, dummy if w.zeros is None else w.zeros, dummy if bias is None else bias,
                 out, ws, split_k_counters(x2.device), m, n, k, k // 8, k // w.group_size, x2.stride(0), out.stride(0),
                 GROUP=w.group_size, STRIPE=w.stripe, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
                 EVEN_N=n % cfg["BLOCK_N"] == 0, **cfg)
    return out


def w4a16_gemv(x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None = None,
               cfg: dict | None = None) -> torch.Tensor:
    """x2: [M <= 4, K] contiguous -> [M, N] (CUDA-core split-K GEMV)."""
    m, n, k = x2.shape[0], w.out_features, w.in_features
    if m > 4:
        raise ValueError(f"the W4A16 GEMV takes at most 4 rows, got {m}")
    cfg = cfg or gemv_config(m, n, k, w.stripe, _sm_count(x2.device))
    if (k // 8) % cfg["BLOCK_KW"] or cfg["BLOCK_KW"] % (w.stripe // 8):
        raise ValueError(f"BLOCK_KW {cfg['BLOCK_KW']} must divide {k // 8} words and be a multiple of {w.stripe // 8}")
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    return _launch(w4a16_gemv_kernel, grid, x2, w, bias, cfg)


def w4a16_dequantize(w: StripedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (canonical element order)."""
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), dtype=dtype, device=w.scales.device)
    block_n, block_kw = 16, 32
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // 8, block_kw))
    dummy = w.scales
    w4a16_dequant_kernel[grid](w.canonical, w.scales, dummy if w.zeros is None else w.zeros, out, n, k,
                               k // 8, k // w.group_size, GROUP=w.group_size, HAS_ZERO=w.zeros is not None,
                               BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=4)
    return out


def w4a16_dequant_matmul(x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Large M: dequantize once, then cuBLAS."""
    return torch.nn.functional.linear(x2, w4a16_dequantize(w, x2.dtype), bias)


# ----------------------------------------------------------------------------- gemv v2 launcher

GEMV2_MAX_M = 16


def gemv2_supported(w: StripedWeight) -> bool:
    """The v2 GEMV needs power-of-two words per group and K words divisible by a tile of >= 16 words."""
    wpg = w.group_size // 8
    return wpg & (wpg - 1) == 0 and (w.in_features // 8) % max(16, w.stripe // 8) == 0


def _gemv2_block_m(m: int) -> int:
    return 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8 if m <= 8 else 16


# v2 tile configs per (BLOCK_M, N, K) measured best on H100 by benchmarks/gemv2_tune.py (2026-11-23,
# torch 2.11, triton 3.6; benchmarks/results/h100-w4a16-gemv-v2.json). BLOCK_M 8/16 never beat dequant+cuBLAS.
TUNED_GEMV2: dict[tuple[int, int, int], dict] = {
    (1, 4096, 4096): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=4, num_warps=4),  # 11.58 us
    (2, 4096, 4096): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=2, num_warps=4),  # 21.95 us
    (4, 4096, 4096): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=2, num_warps=4),  # 35.34 us
    (1, 1024, 4096): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=8, num_warps=4),  # 8.26 us
    (2, 1024, 4096): dict(BLOCK_N=16, BLOCK_KW=128, SPLIT_K=4, num_warps=4),  # 11.14 us
    (4, 1024, 4096): dict(BLOCK_N=16, BLOCK_KW=128, SPLIT_K=4, num_warps=4),  # 16.13 us
    (1, 14336, 4096): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=1, num_warps=4),  # 24.69 us
    (2, 14336, 4096): dict(BLOCK_N=16, BLOCK_KW=128, SPLIT_K=1, num_warps=4),  # 52.72 us
    (4, 14336, 4096): dict(BLOCK_N=16, BLOCK_KW=128, SPLIT_K=1, num_warps=4),  # 85.52 us
    (1, 4096, 14336): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=4, num_warps=4),  # 25.22 us
    (2, 4096, 14336): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=8, num_warps=4),  # 57.34 us
    (4, 4096, 14336): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=2, num_warps=4),  # 99.73 us
    (1, 8192, 8192): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=2, num_warps=4),  # 27.17 us
    (2, 8192, 8192): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=4, num_warps=4),  # 59.42 us
    (4, 8192, 8192): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=4, num_warps=4),  # 109.01 us
    (1, 1024, 8192): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=8, num_warps=4),  # 10.18 us
    (2, 1024, 8192): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=8, num_warps=4),  # 14.94 us
    (4, 1024, 8192): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=8, num_warps=4),  # 22.72 us
    (1, 28672, 8192): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=1, num_warps=4),  # 73.18 us
    (2, 28672, 8192): dict(BLOCK_N=16, BLOCK_KW=128, SPLIT_K=1, num_warps=4),  # 150.08 us
    (4, 28672, 8192): dict(BLOCK_N=16, BLOCK_KW=128, SPLIT_K=1, num_warps=4),  # 253.81 us
    (1, 8192, 28672): dict(BLOCK_N=32, BLOCK_KW=64, SPLIT_K=2, num_warps=4),  # 73.73 us
    (2, 8192, 28672): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=1, num_warps=4),  # 199.9 us
    (4, 8192, 28672): dict(BLOCK_N=32, BLOCK_KW=128, SPLIT_K=1, num_warps=4),  # 378.42 us
}


def gemv2_config(m: int, n: int, k: int, stripe: int, sms: int, group: int = 128) -> dict:
    block_m = _gemv2_block_m(m)
    tuned = TUNED_GEMV2.get((block_m, n, k))
    kw = k // 8
    if tuned is not None and kw % tuned["BLOCK_KW"] == 0 and tuned["BLOCK_KW"] % (stripe // 8) == 0:
        return dict(tuned, BLOCK_M=block_m)
    block_n = 32 if block_m <= 4 else 16
    block_kw = _block_kw(kw, max(stripe, 128), 128)
    split = _split_for(triton.cdiv(n, block_n), kw // block_kw, 2 * sms)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KW=block_kw, SPLIT_K=split, num_warps=4, num_stages=3)


def w4a16_gemv2(x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None = None,
                cfg: dict | None = None) -> torch.Tensor:
    """x2: [M <= 16, K] contiguous -> [M, N] (CUDA-core split-K GEMV, v2)."""
    m, n, k = x2.shape[0], w.out_features, w.in_features
    if m > GEMV2_MAX_M:
        raise ValueError(f"the W4A16 GEMV v2 takes at most {GEMV2_MAX_M} rows, got {m}")
    cfg = dict(cfg or gemv2_config(m, n, k, w.stripe, _sm_count(x2.device), w.group_size))
    kw = k // 8
    if kw % cfg["BLOCK_KW"] or cfg["BLOCK_KW"] % (w.stripe // 8) or cfg["BLOCK_KW"] & (cfg["BLOCK_KW"] - 1):
        raise ValueError(f"BLOCK_KW {cfg['BLOCK_KW']} must be a power of two dividing {kw} words and a "
                         f"multiple of {w.stripe // 8}")
    if cfg["BLOCK_M"] < m:
        raise ValueError(f"BLOCK_M {cfg['BLOCK_M']} < M = {m}")
    split = cfg.pop("SPLIT_K")
    grid_n = triton.cdiv(n, cfg["BLOCK_N"])
    if split > 1 and grid_n > MAX_TILES:
        split = 1
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x2.device)
    dummy = w.scales
    w4a16_gemv2_kernel[(grid_n, split)](
        x2, w.words, w.scales, dummy if w.zeros is None else w.zeros, dummy if bias is None else bias,
        out, ws, split_k_counters(x2.device), m, n, k, kw, k // w.group_size, x2.stride(0), out.stride(0), split,
        GROUP=w.group_size, STRIPE=w.stripe, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
        EVEN_N=n % cfg["BLOCK_N"] == 0, **cfg)
    return out
