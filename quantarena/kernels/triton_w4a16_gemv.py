"""W4A16 GEMV v3 for one activation row (M = 1, the decode case): the M = 1 path of ``ops`` where the dispatch
table names no tensor-core tile (kv_proj-sized weights, untuned shapes).

Why a third GEMV. v2 (``triton_w4a16.w4a16_gemv2_kernel``) reduced each step's products over the words of a
group before applying the group scale; those words sit in several threads, so every step paid warp
shuffles plus a shared-memory layout change (five barriers per step in the sm_90 SASS), and the loop ran
~40 instructions per 32-bit word. v3 (~26 per word, no barriers in the loop):

* Per-word accumulators. The word tile is indexed ``[rows, groups of the step, words of a group]``; each
  step adds ``scale * (sum_j f_j x_j - offset)`` per word, the scale broadcast along the last axis, and
  the sums over words and groups happen once, after the K loop.
* Sub-tiles (``SUB``). Triton loads a scale tile with at least one element per thread in a layout of its
  own and converts it through shared memory; a program's rows are therefore split into ``SUB`` sub-tiles
  whose scale tiles are small enough to be loaded straight in the words' layout. The sub-tiles share the
  step's activations.
* Nibbles to floats with inline PTX (``_asm_nibble_floats``): two ``lop3`` and a shift isolate the eight
  nibbles as bytes ``0x80 | u``; one ``prmt`` each makes the float ``1 + u/128``. Written with masks and
  ors, ptxas re-materialised a mask constant for nearly every nibble.
* Tile-contiguous weights (``TILED``, ``tile_words``): each (N tile, K step) tile of words is one
  contiguous block, so a program streams its weights sequentially (+5-9% on the large shapes over the
  row-major striped layout). Built once per weight from the striped layout, like it.
* ``PREFETCH`` (registers) or ``STAGES`` (Triton's cp.async pipeline) keep the next step's words in flight
  while the current step computes.

The activation side: with ``f_j = 1 + u_j/128``, ``sum_j f_j x_j = sum_j x_j + (sum_j u_j x_j)/128``, so the
``- 8 - zero`` offset and the ``1`` come from per-word activation sums shared by every row, and the final
``128`` is applied once to the result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import (INTERPRETING, MAX_TILES, StripedWeight, _block_kw, _nibble_dot, _sm_count, _split_for,
                           _split_k_finish, split_k_counters)
from .triton_pdl import pdl_ok
from .w4a16_layout import tile_words  # noqa: F401 (re-exported: the gemv3 TILED layout)


# The eight nibbles of a word as floats f_j = 1 + u_j / 128 (inline PTX, GPU only): one lop3 isolates the
# even nibbles in the low halves of the four bytes and sets each byte's top bit (0x80 | u), a shift and a
# second lop3 do the odd ones; each prmt then puts one such byte in bits 16-23 and 0x3F in bits 24-31,
# i.e. exponent 127 and mantissa u * 2^16. 11 instructions per word, no int->float converts, and only
# register operands besides the immediates (no mask constants to rematerialise per nibble).
def _asm_nibble_floats() -> str:
    lines = ["{ .reg .b32 lo, hi, c;",
             "mov.b32 c, 0x3F000000;",
             "lop3.b32 lo, $8, 0x0F0F0F0F, 0x80808080, 0xEA;",
             "shr.u32 hi, $8, 4;",
             "lop3.b32 hi, hi, 0x0F0F0F0F, 0x80808080, 0xEA;"]
    for j in range(8):
        lines.append(f"prmt.b32 ${j}, {'lo' if j % 2 == 0 else 'hi'}, c, {hex(0x7044 | (j // 2) << 8)};")
    return "\n".join(lines + ["}"])


_ASM_NIBBLE_FLOATS = tl.constexpr(_asm_nibble_floats())


@triton.jit
def _nibble_floats_128(words, ASM: tl.constexpr):
    """f_j = 1 + u_j / 128 for the eight nibbles of each word, in nibble order."""
    if ASM:
        return tl.inline_asm_elementwise(_ASM_NIBBLE_FLOATS, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    return ((((words >> 0) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True),
            (((words >> 4) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True),
            (((words >> 8) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True),
            (((words >> 12) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True),
            (((words >> 16) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True),
            (((words >> 20) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True),
            (((words >> 24) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True),
            (((words >> 28) & 0xF) << 16 | 0x3F800000).to(tl.float32, bitcast=True))


@triton.jit
def _gemv3_x(x_ptr, xoff, WPS: tl.constexpr):
    """The step's activations for nibble j of every word, [1, NG, WPGT] fp32 each, and their sum over j."""
    x0 = tl.load(x_ptr + xoff).to(tl.float32)[None, :, :]
    x1 = tl.load(x_ptr + xoff + WPS).to(tl.float32)[None, :, :]
    x2 = tl.load(x_ptr + xoff + 2 * WPS).to(tl.float32)[None, :, :]
    x3 = tl.load(x_ptr + xoff + 3 * WPS).to(tl.float32)[None, :, :]
    x4 = tl.load(x_ptr + xoff + 4 * WPS).to(tl.float32)[None, :, :]
    x5 = tl.load(x_ptr + xoff + 5 * WPS).to(tl.float32)[None, :, :]
    x6 = tl.load(x_ptr + xoff + 6 * WPS).to(tl.float32)[None, :, :]
    x7 = tl.load(x_ptr + xoff + 7 * WPS).to(tl.float32)[None, :, :]
    xz = ((x0 + x2) + (x4 + x6)) + ((x1 + x3) + (x5 + x7))
    return x0, x1, x2, x3, x4, x5, x6, x7, xz


@triton.jit
def _gemv3_tile(acc, words, s, z, xs, HAS_ZERO: tl.constexpr, ASM: tl.constexpr):
    """acc [BN, NG, WPGT] += s * (sum_j q_j x_j) / 128 per word of a tile of words [BN, NG, WPGT].

    With f_j = 1 + u_j / 128: t = sum_j f_j x_j = sum_j x_j + (sum_j u_j x_j) / 128, so
    (sum_j q_j x_j) / 128 = t - (1 + (8 + zero) / 128) sum_j x_j; the kernel multiplies by 128 at the end."""
    x0, x1, x2, x3, x4, x5, x6, x7, xz = xs
    t = _nibble_dot(_nibble_floats_128(words, ASM), x0, x1, x2, x3, x4, x5, x6, x7)
    if HAS_ZERO:
        off = ((1.0 + 8.0 / 128.0) + z * (1.0 / 128.0))[:, :, None] * xz   # [BN, NG, WPGT]
    else:
        off = (1.0 + 8.0 / 128.0) * xz
    return acc + s[:, :, None] * (t - off)


@triton.jit
def _gemv3_load(w_tile, s_tile, z_tile, kw, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, WSTEP: tl.constexpr):
    words = tl.load(w_tile + kw * WSTEP)
    s = tl.load(s_tile + (kw * 8) // GROUP).to(tl.float32)
    z = s
    if HAS_ZERO:
        z = tl.load(z_tile + (kw * 8) // GROUP).to(tl.float32)
    return words, s, z


@triton.jit
def _gemv3_load_sub(w0, w1, w2, w3, s0, s1, s2, s3, z0, z1, z2, z3, kw, GROUP: tl.constexpr,
                    HAS_ZERO: tl.constexpr, WSTEP: tl.constexpr, SUB: tl.constexpr):
    """The step's tiles of the SUB sub-tiles (words, scales, zero points each); sub-tiles past SUB repeat
    sub-tile 0's values, loaded once, and are never used."""
    q0, sc0, zp0 = _gemv3_load(w0, s0, z0, kw, GROUP, HAS_ZERO, WSTEP)
    q1, sc1, zp1 = q0, sc0, zp0
    q2, sc2, zp2 = q0, sc0, zp0
    q3, sc3, zp3 = q0, sc0, zp0
    if SUB > 1:
        q1, sc1, zp1 = _gemv3_load(w1, s1, z1, kw, GROUP, HAS_ZERO, WSTEP)
    if SUB > 2:
        q2, sc2, zp2 = _gemv3_load(w2, s2, z2, kw, GROUP, HAS_ZERO, WSTEP)
        q3, sc3, zp3 = _gemv3_load(w3, s3, z3, kw, GROUP, HAS_ZERO, WSTEP)
    return q0, sc0, zp0, q1, sc1, zp1, q2, sc2, zp2, q3, sc3, zp3


@triton.jit
def _gemv3_finish(acc, ws_ptr, cnt_ptr, bias_ptr, out_ptr, rn, N, pid_k, tile, SPLIT_K, HAS_BIAS: tl.constexpr):
    part = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :] * 128.0           # [1, BN]
    _split_k_finish(part, ws_ptr, cnt_ptr, bias_ptr, out_ptr, tl.arange(0, 1), rn, 1, N, N, pid_k, tile,
                    SPLIT_K, HAS_BIAS)


@triton.jit
def w4a16_gemv3_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                       N, KW, G, SPLIT_K,
                       GROUP: tl.constexpr, STRIPE: tl.constexpr, HAS_ZERO: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_KW: tl.constexpr,
                       EVEN_N: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr = 1,
                       TILED: tl.constexpr = False, ASM: tl.constexpr = True, PDL: tl.constexpr = False):
    """out[0, n] = sum_k x[0, k] * (q[n, k] - 8 - zero) * scale. One program per (N tile, K split).

    The program's BLOCK_N rows are SUB (1, 2 or 4) sub-tiles of BLOCK_N / SUB rows that share the step's
    activations. Sub-tiles, not one bigger tile: Triton loads a scale tile of at least one element per
    thread in its own layout and converts it (shared memory, two barriers per step); smaller scale tiles
    are loaded straight in the layout the words use. Needs KW % BLOCK_KW == 0, BLOCK_KW % (STRIPE/8) == 0,
    and GROUP/8 and BLOCK_KW powers of two.

    ``PDL`` (opt-in, ``cfg["PDL"]``; a programmatic dependent launch, Hopper): the program starts while the
    previous kernel finishes, requests its first weight tiles, and only then waits for that kernel
    (``gdc_wait``) before touching anything an earlier kernel writes (activations, bias, split-K workspace
    and counters). The weights, scales and zero points are never written by the kernels of a forward pass.
    Measured on the H100 (h100-gemv3-pdl.json): -0.5 to +1.0 us per GEMV after a plain kernel, and a decode
    step 4% slower, so it is off by default."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPS: tl.constexpr = STRIPE // 8                        # words per stripe block
    WPG: tl.constexpr = GROUP // 8                         # words per group
    WPGT: tl.constexpr = WPG if WPG < BLOCK_KW else BLOCK_KW
    NG: tl.constexpr = BLOCK_KW // WPGT                    # groups per step
    BNS: tl.constexpr = BLOCK_N // SUB                     # rows per sub-tile
    gl = tl.arange(0, NG)
    c3 = gl[:, None] * WPGT + tl.arange(0, WPGT)[None, :]  # [NG, WPGT] word column inside the step
    xoff = (c3 // WPS) * STRIPE + c3 % WPS                 # element of nibble 0 of each word
    r0 = pid_n * BLOCK_N + tl.arange(0, BNS)
    r1 = r0 + BNS
    r2 = r0 + 2 * BNS
    r3 = r0 + 3 * BNS
    if not EVEN_N:                                         # clamped rows recompute row N-1, never stored
        r0 = tl.minimum(r0, N - 1)
        r1 = tl.minimum(r1, N - 1)
        r2 = tl.minimum(r2, N - 1)
        r3 = tl.minimum(r3, N - 1)
    if TILED:   # words stored tile after tile: [N/BLOCK_N, KW/BLOCK_KW, BLOCK_N, BLOCK_KW], rows zero-padded
        WSTEP: tl.constexpr = BLOCK_N
        t0 = w_ptr + pid_n * BLOCK_N * KW + tl.arange(0, BNS)[:, None, None] * BLOCK_KW + c3[None, :, :]
        w0 = t0
        w1 = t0 + BNS * BLOCK_KW
        w2 = t0 + 2 * BNS * BLOCK_KW
        w3 = t0 + 3 * BNS * BLOCK_KW
    else:
        WSTEP: tl.constexpr = 1
        w0 = w_ptr + r0[:, None, None] * KW + c3[None, :, :]
        w1 = w_ptr + r1[:, None, None] * KW + c3[None, :, :]
        w2 = w_ptr + r2[:, None, None] * KW + c3[None, :, :]
        w3 = w_ptr + r3[:, None, None] * KW + c3[None, :, :]
    s0 = s_ptr + r0[:, None] * G + gl[None, :]
    s1 = s_ptr + r1[:, None] * G + gl[None, :]
    s2 = s_ptr + r2[:, None] * G + gl[None, :]
    s3 = s_ptr + r3[:, None] * G + gl[None, :]
    z0 = z_ptr + r0[:, None] * G + gl[None, :]
    z1 = z_ptr + r1[:, None] * G + gl[None, :]
    z2 = z_ptr + r2[:, None] * G + gl[None, :]
    z3 = z_ptr + r3[:, None] * G + gl[None, :]
    words_per_split = tl.cdiv(KW // BLOCK_KW, SPLIT_K) * BLOCK_KW
    k_start = pid_k * words_per_split
    k_end = tl.minimum(k_start + words_per_split, KW)

    acc0 = tl.zeros((BNS, NG, WPGT), dtype=tl.float32)
    acc1 = tl.zeros((BNS, NG, WPGT), dtype=tl.float32)
    acc2 = tl.zeros((BNS, NG, WPGT), dtype=tl.float32)
    acc3 = tl.zeros((BNS, NG, WPGT), dtype=tl.float32)
    if PREFETCH:   # the first step's tiles, before the loop
        q0, sc0, zp0, q1, sc1, zp1, q2, sc2, zp2, q3, sc3, zp3 = _gemv3_load_sub(
            w0, w1, w2, w3, s0, s1, s2, s3, z0, z1, z2, z3, k_start, GROUP, HAS_ZERO, WSTEP, SUB)
    if PDL:
        tl.extra.cuda.gdc_wait()
    for kw0 in tl.range(k_start, k_end, BLOCK_KW, num_stages=STAGES):
        if PREFETCH:   # the next step's tiles are requested before this step's arithmetic; the last step
            # re-reads its own tile instead of running past the split
            nxt = tl.minimum(kw0 + BLOCK_KW, k_end - BLOCK_KW)
            n0, ns0, nz0, n1, ns1, nz1, n2, ns2, nz2, n3, ns3, nz3 = _gemv3_load_sub(
                w0, w1, w2, w3, s0, s1, s2, s3, z0, z1, z2, z3, nxt, GROUP, HAS_ZERO, WSTEP, SUB)
        else:
            q0, sc0, zp0, q1, sc1, zp1, q2, sc2, zp2, q3, sc3, zp3 = _gemv3_load_sub(
                w0, w1, w2, w3, s0, s1, s2, s3, z0, z1, z2, z3, kw0, GROUP, HAS_ZERO, WSTEP, SUB)
        xs = _gemv3_x(x_ptr + kw0 * 8, xoff, WPS)
        acc0 = _gemv3_tile(acc0, q0, sc0, zp0, xs, HAS_ZERO, ASM)
        if SUB > 1:
            acc1 = _gemv3_tile(acc1, q1, sc1, zp1, xs, HAS_ZERO, ASM)
        if SUB > 2:
            acc2 = _gemv3_tile(acc2, q2, sc2, zp2, xs, HAS_ZERO, ASM)
            acc3 = _gemv3_tile(acc3, q3, sc3, zp3, xs, HAS_ZERO, ASM)
        if PREFETCH:
            q0, sc0, zp0 = n0, ns0, nz0
            if SUB > 1:
                q1, sc1, zp1 = n1, ns1, nz1
            if SUB > 2:
                q2, sc2, zp2 = n2, ns2, nz2
                q3, sc3, zp3 = n3, ns3, nz3

    o0 = pid_n * BLOCK_N + tl.arange(0, BNS)
    _gemv3_finish(acc0, ws_ptr, cnt_ptr, bias_ptr, out_ptr, o0, N, pid_k, pid_n * SUB, SPLIT_K, HAS_BIAS)
    if SUB > 1:
        _gemv3_finish(acc1, ws_ptr, cnt_ptr, bias_ptr, out_ptr, o0 + BNS, N, pid_k, pid_n * SUB + 1, SPLIT_K,
                      HAS_BIAS)
    if SUB > 2:
        _gemv3_finish(acc2, ws_ptr, cnt_ptr, bias_ptr, out_ptr, o0 + 2 * BNS, N, pid_k, pid_n * SUB + 2, SPLIT_K,
                      HAS_BIAS)
        _gemv3_finish(acc3, ws_ptr, cnt_ptr, bias_ptr, out_ptr, o0 + 3 * BNS, N, pid_k, pid_n * SUB + 3, SPLIT_K,
                      HAS_BIAS)


def gemv3_supported(w: StripedWeight) -> bool:
    """Power-of-two words per group and K words divisible by a 16-word tile."""
    wpg = w.group_size // 8
    return wpg & (wpg - 1) == 0 and (w.in_features // 8) % max(16, w.stripe // 8) == 0


def block_kw(kw: int, stripe: int, want: int) -> int:
    """The K step in words: the largest power of two <= ``want`` (>= 16) dividing ``kw`` and a multiple of the
    stripe's words (the v2 rule, with a floor of 16 words)."""
    return _block_kw(kw, max(stripe, 128), want)


# Tile configs per (N, K) measured best on H100 by benchmarks/gemv3_tune.py (2026-11-24, torch 2.11, triton 3.6;
# benchmarks/results/h100-w4a16-gemv3.json). Every winner reads the tile-contiguous layout (TILED).
TUNED_GEMV3: dict[tuple[int, int], dict] = {
    (4096, 4096): dict(BLOCK_N=32, SUB=1, BLOCK_KW=32, SPLIT_K=4, num_warps=4, PREFETCH=True, STAGES=1),    # 11.62 us
    (1024, 4096): dict(BLOCK_N=32, SUB=1, BLOCK_KW=32, SPLIT_K=8, num_warps=4, PREFETCH=True, STAGES=1),    # 8.13 us
    (14336, 4096): dict(BLOCK_N=128, SUB=2, BLOCK_KW=32, SPLIT_K=2, num_warps=8, PREFETCH=True, STAGES=1),  # 24.06 us
    (4096, 14336): dict(BLOCK_N=64, SUB=2, BLOCK_KW=32, SPLIT_K=8, num_warps=4, PREFETCH=True, STAGES=1),   # 24.45 us
    (8192, 8192): dict(BLOCK_N=64, SUB=2, BLOCK_KW=32, SPLIT_K=4, num_warps=4, PREFETCH=True, STAGES=1),    # 25.90 us
    (1024, 8192): dict(BLOCK_N=32, SUB=1, BLOCK_KW=32, SPLIT_K=16, num_warps=4, PREFETCH=True, STAGES=1),   # 9.95 us
    (28672, 8192): dict(BLOCK_N=128, SUB=4, BLOCK_KW=32, SPLIT_K=1, num_warps=4, PREFETCH=False, STAGES=3),  # 61.95 us
    (8192, 28672): dict(BLOCK_N=128, SUB=2, BLOCK_KW=32, SPLIT_K=4, num_warps=8, PREFETCH=True, STAGES=1),  # 61.68 us
    # the decode runner's fused q/k/v and gate/up and a quantized lm_head (h100-w4a16-gemv3-decode-shapes.json)
    (6144, 4096): dict(BLOCK_N=64, SUB=2, BLOCK_KW=32, SPLIT_K=4, num_warps=4, PREFETCH=True, STAGES=1),    # 13.04 us
    (28672, 4096): dict(BLOCK_N=128, SUB=2, BLOCK_KW=32, SPLIT_K=1, num_warps=8, PREFETCH=True, STAGES=1),  # 30.43 us
    (128256, 4096): dict(BLOCK_N=128, SUB=4, BLOCK_KW=32, SPLIT_K=1, num_warps=4, PREFETCH=False, STAGES=3),  # 105.89 us
}


def gemv3_config(n: int, k: int, stripe: int, sms: int) -> dict:
    """The tuned tile for (N, K), else the rule the tuned winners follow: 32-row tiles for small weights,
    two 32-row sub-tiles otherwise, 32-word steps, split-K up to about two programs per SM."""
    kw = k // 8
    tuned = TUNED_GEMV3.get((n, k))
    if tuned is not None and kw % tuned["BLOCK_KW"] == 0 and tuned["BLOCK_KW"] % (stripe // 8) == 0:
        return dict(tuned, TILED=True)
    small = n * k < 64 * 1024 * 1024
    block_n, sub = (32, 1) if small else (64, 2)
    bkw = block_kw(kw, stripe, 32)
    split = _split_for(triton.cdiv(n, block_n), kw // bkw, 2 * sms)
    return dict(BLOCK_N=block_n, SUB=sub, BLOCK_KW=bkw, SPLIT_K=split, num_warps=4, PREFETCH=True, STAGES=1,
                TILED=True)


def w4a16_gemv3(x2: torch.Tensor, w: StripedWeight, bias: torch.Tensor | None = None,
                cfg: dict | None = None, tiled: torch.Tensor | None = None) -> torch.Tensor:
    """x2: [1, K] contiguous -> [1, N]. With ``cfg["TILED"]`` (the default) the weight's tiled copy for the
    config's tile is used (built once, cached on ``w``); ``tiled`` passes one explicitly."""
    n, k = w.out_features, w.in_features
    if x2.shape[0] != 1:
        raise ValueError(f"the W4A16 GEMV v3 takes one row, got {x2.shape[0]}")
    cfg = dict(cfg or gemv3_config(n, k, w.stripe, _sm_count(x2.device)))
    kw = k // 8
    bkw = cfg["BLOCK_KW"]
    if kw % bkw or bkw % (w.stripe // 8) or bkw & (bkw - 1) or (w.group_size // 8) & (w.group_size // 8 - 1):
        raise ValueError(f"BLOCK_KW {bkw} must be a power of two dividing {kw} words and a multiple of "
                         f"{w.stripe // 8}, and the group's words a power of two (group {w.group_size})")
    if cfg.pop("TILED", False) and tiled is None:
        tiled = w.tiled(cfg["BLOCK_N"], bkw)
    split = cfg.pop("SPLIT_K")
    grid_n = triton.cdiv(n, cfg["BLOCK_N"])
    split = max(1, min(split, kw // bkw))
    if split > 1 and grid_n * cfg["SUB"] > MAX_TILES:
        split = 1
    out = torch.empty((1, n), dtype=x2.dtype, device=x2.device)
    ws = torch.empty((split, 1, n) if split > 1 else (1,), dtype=torch.float32, device=x2.device)
    dummy = w.scales
    # opt-in: measured no faster in a decode step (benchmarks/pdl_gemv.py; the kernels before it do not trigger early)
    pdl = cfg.pop("PDL", False) and pdl_ok(x2.device)
    launch = {"launch_pdl": True} if pdl else {}
    w4a16_gemv3_kernel[(grid_n, split)](
        x2, w.words if tiled is None else tiled, w.scales, dummy if w.zeros is None else w.zeros,
        dummy if bias is None else bias, out, ws, split_k_counters(x2.device), n, kw, k // w.group_size, split,
        GROUP=w.group_size, STRIPE=w.stripe, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
        EVEN_N=n % cfg["BLOCK_N"] == 0, TILED=tiled is not None, ASM=not INTERPRETING, PDL=pdl, **cfg, **launch)
    return out

