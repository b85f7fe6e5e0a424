"""W8A8 INT8 / FP8 GEMV for decode batches (M <= 4): CUDA cores, weight streaming, GEMM-only.

Why a GEMV. At M <= 4 a linear is a weight stream: every weight byte is read once and used M times. The
swap-AB tensor-core GEMM (:func:`.triton_w8a8.a8w8_swap_gemm`) pads the tokens to a 16-wide MMA slot and
stages tiles through shared memory; this kernel keeps everything in registers instead. Each program owns
BLOCK_N output rows and one K split, loads a [BLOCK_N, BLOCK_K / 4] tile of 32-bit words per step (four codes
per word; the int8 / e4m3 tensors are viewed as int32 on the host) and applies it to the M activation rows,
which share the loaded tile.

* int8: ``dp4a.s32.s32`` (inline PTX) multiplies the four signed bytes of a weight word with those of an
  activation word and adds them to an int32 accumulator: four MACs per instruction, exact.
* fp8 e4m3: ``cvt.rn.f16x2.e4m3x2`` (inline PTX, sm_89+) turns a word into four halves, widened to float32;
  products and accumulation are float32 (exact products: e4m3 x e4m3 fits a float32 significand).
* Per-word accumulators ([BLOCK_N, BLOCK_K / 4] per row, as in the W4A16 GEMV v3): the reduction over the
  words of the tile, across threads, happens once after the K loop, not per step.
* The activation words are loaded as tiles of equal rows in the weight tile's layout (``_load_x``), so the
  loop has no shared-memory layout conversion and no barrier; the compiler merges a thread's equal loads
  (and, for fp8, their conversions).
* ``PREFETCH``: the next step's weight tile is requested before this step's arithmetic (registers); or
  ``STAGES`` > 1 hands the loop to Triton's cp.async pipeline (through shared memory).
* ``ASM`` (constexpr) switches the inline PTX off under the Triton interpreter, which computes the same
  numbers with integer ops: byte extraction with sign extension for dp4a, a bit-exact e4m3 decode for fp8.

The result is the GEMMs' own: the per-row sums go through :func:`.triton_w8a8._finish` (split-K workspace
and arrival counter of :func:`.triton_w4a16.split_k_reduce`, then :func:`.triton_w8a8._epilogue`,
``acc * a_scale[m] * w_scale[n] (+ bias[n])``), so int8 outputs are bit-identical to
:func:`.triton_w8a8.int8_gemm` / :func:`.triton_w8a8.a8w8_swap_gemm` (exact int32 sums, same epilogue).
The fp8 PTX needs sm_89 or newer (``ops`` sends fp8 to Triton only on sm_90+).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import INTERPRETING, MAX_TILES, _sm_count, _split_for, split_k_counters
from .triton_w8a8 import _finish, codes_are_fp8

MAX_M = 4

# four e4m3 codes (one word, byte j = code j) -> four float32: two cvt to f16x2, four f16 -> f32 widenings
_ASM_E4M3_FLOATS = tl.constexpr("\n".join([
    "{ .reg .b16 lo, hi, h0, h1, h2, h3;",
    ".reg .b32 p, q;",
    "mov.b32 {lo, hi}, $4;",
    "cvt.rn.f16x2.e4m3x2 p, lo;",
    "cvt.rn.f16x2.e4m3x2 q, hi;",
    "mov.b32 {h0, h1}, p;",
    "mov.b32 {h2, h3}, q;",
    "cvt.f32.f16 $0, h0;",
    "cvt.f32.f16 $1, h1;",
    "cvt.f32.f16 $2, h2;",
    "cvt.f32.f16 $3, h3;",
    "}"]))
_TWO_POW_120 = tl.constexpr(2.0 ** 120)   # e4m3 exponent bias 7 -> float32 bias 127


@triton.jit
def _sbyte(words, J: tl.constexpr):
    """Byte J of each word, sign-extended (shift it to the top, arithmetic shift back)."""
    return (words << (24 - 8 * J)) >> 24


@triton.jit
def _dp4a(acc, w, x, ASM: tl.constexpr):
    """acc + sum_j w_j * x_j over the four signed bytes of the words w and x (int32, exact)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return acc + ((_sbyte(w, 0) * _sbyte(x, 0) + _sbyte(w, 1) * _sbyte(x, 1))
                  + (_sbyte(w, 2) * _sbyte(x, 2) + _sbyte(w, 3) * _sbyte(x, 3)))


@triton.jit
def _e4m3_byte(words, J: tl.constexpr):
    """Interpreter path: e4m3 code J of each word as float32. Exponent and mantissa go to float32 bits
    23..26 / 20..22; the factor 2^120 rebiases the exponent (and scales subnormals exactly); S.1111.111 is NaN."""
    b = (words >> (8 * J)) & 0xFF
    mag = ((b & 0x7F) << 20).to(tl.float32, bitcast=True) * _TWO_POW_120
    mag = tl.where((b & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((b & 0x80) != 0, -mag, mag)


@triton.jit
def _e4m3_floats(words, ASM: tl.constexpr):
    """The four e4m3 codes of each int32 word as float32, in byte (= K) order."""
    if ASM:
        return tl.inline_asm_elementwise(_ASM_E4M3_FLOATS, "=r,=r,=r,=r,r", [words],
                                         dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    return _e4m3_byte(words, 0), _e4m3_byte(words, 1), _e4m3_byte(words, 2), _e4m3_byte(words, 3)


@triton.jit
def _load_w(w_tile, kw, rk, k_end, EVEN_K: tl.constexpr):
    """The step's weight words ``kw + rk``; past the split's end 0 (adds nothing: int8 0, e4m3 +0)."""
    if EVEN_K:
        return tl.load(w_tile + kw)
    return tl.load(w_tile + kw, mask=(kw + rk) < k_end, other=0)


@triton.jit
def _load_x(x_row, xcols, kw, KW, EVEN_K: tl.constexpr):
    """One activation row's words of the step as a [BN, BKW] tile of equal rows, in the weight tile's layout:
    each thread reads the words of its own columns (the compiler merges a thread's equal loads; L1 hits)
    instead of a 1-D load converted through shared memory, two barriers per row and step. Past the split
    the weight words are 0, so the index is clamped into the row instead of masked: a masked load would
    not be merged, and the clamped word is a real code (finite: 0 * it = 0)."""
    cols = kw + xcols
    if not EVEN_K:
        cols = tl.minimum(cols, KW - 1)
    return tl.load(x_row + cols)


@triton.jit
def _row_step(acc, w, wf, x_row, xcols, kw, KW, FP8: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """acc [BN, BKW] += one activation row's products with the step's weight words (w) / floats (wf)."""
    x = _load_x(x_row, xcols, kw, KW, EVEN_K)
    if FP8:
        x0, x1, x2, x3 = _e4m3_floats(x, ASM)
        w0, w1, w2, w3 = wf
        acc = acc + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3                # four fma
    else:
        acc = _dp4a(acc, w, x, ASM)
    return acc


@triton.jit
def _place_row(part, acc, rm, I: tl.constexpr):
    """part [BM, BN] with row I set to acc [BN, BKW] summed over the words."""
    return tl.where(rm[:, None] == I, tl.sum(acc, axis=1)[None, :], part)


@triton.jit
def a8w8_gemv_kernel(a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                     N, KW, stride_aw, stride_ww, stride_as, stride_om,
                     HAS_BIAS: tl.constexpr, FP8: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                     PREFETCH: tl.constexpr = True, STAGES: tl.constexpr = 1, ASM: tl.constexpr = True):
    """out[m, n] = epilogue(sum_k a[m, k] w[n, k]) for M (1..4) rows. a: int32 words [M, KW]; w: int32 words
    [N, KW] (four int8 or e4m3 codes each). One program per (BLOCK_N rows, K split); grid (cdiv(N, BLOCK_N),
    SPLIT_K). Rows past N are clamped to row N - 1 (computed, never stored)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BKW: tl.constexpr = BLOCK_K // 4                      # words per step
    BM: tl.constexpr = 1 if M == 1 else (2 if M == 2 else 4)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BKW)[None, :]
    w_tile = w_ptr + tl.minimum(rn, N - 1)[:, None] * stride_ww + rk
    xcols = tl.zeros((BLOCK_N, 1), dtype=tl.int32) + rk   # [BLOCK_N, BKW]: see _load_x
    x0 = a_ptr
    x1 = x0 + stride_aw
    x2 = x1 + stride_aw
    x3 = x2 + stride_aw
    words_per_split = tl.cdiv(tl.cdiv(KW, BKW), SPLIT_K) * BKW
    k_start = pid_k * words_per_split
    k_end = tl.minimum(k_start + words_per_split, KW)
    acc_ty = tl.float32 if FP8 else tl.int32
    acc0 = tl.zeros((BLOCK_N, BKW), dtype=acc_ty)
    acc1 = tl.zeros((BLOCK_N, BKW), dtype=acc_ty)
    acc2 = tl.zeros((BLOCK_N, BKW), dtype=acc_ty)
    acc3 = tl.zeros((BLOCK_N, BKW), dtype=acc_ty)
    if PREFETCH:
        w = _load_w(w_tile, k_start, rk, k_end, EVEN_K)
    for kw in tl.range(k_start, k_end, BKW, num_stages=STAGES):
        if PREFETCH:   # request the next step's tile first; EVEN_K's last step re-reads its own (in bounds)
            nxt = kw + BKW
            if EVEN_K:
                nxt = tl.minimum(nxt, k_end - BKW)
            w_next = _load_w(w_tile, nxt, rk, k_end, EVEN_K)
        else:
            w = _load_w(w_tile, kw, rk, k_end, EVEN_K)
        wf = w
        if FP8:
            wf = _e4m3_floats(w, ASM)
        acc0 = _row_step(acc0, w, wf, x0, xcols, kw, KW, FP8, EVEN_K, ASM)
        if M > 1:
            acc1 = _row_step(acc1, w, wf, x1, xcols, kw, KW, FP8, EVEN_K, ASM)
        if M > 2:
            acc2 = _row_step(acc2, w, wf, x2, xcols, kw, KW, FP8, EVEN_K, ASM)
        if M > 3:
            acc3 = _row_step(acc3, w, wf, x3, xcols, kw, KW, FP8, EVEN_K, ASM)
        if PREFETCH:
            w = w_next
    rm = tl.arange(0, BM)
    part = _place_row(tl.zeros((BM, BLOCK_N), dtype=acc_ty), acc0, rm, 0)
    if M > 1:
        part = _place_row(part, acc1, rm, 1)
    if M > 2:
        part = _place_row(part, acc2, rm, 2)
    if M > 3:
        part = _place_row(part, acc3, rm, 3)
    _finish(part, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn, M, N, stride_as, stride_om,
            pid_k, pid_n, SPLIT_K, HAS_BIAS)


def _word_view_ok(t: torch.Tensor) -> bool:
    """``t.view(torch.int32)`` works: unit-stride rows of whole words, starting on a word."""
    return t.stride(1) == 1 and t.shape[1] % 4 == 0 and t.stride(0) % 4 == 0 and t.storage_offset() % 4 == 0


def gemv_supported(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """1 to 4 rows, K a multiple of 4 (whole 32-bit words), weight rows readable as words."""
    return 1 <= a.shape[0] <= MAX_M and _word_view_ok(weight)


def gemv_config(m: int, n: int, k: int, sms: int) -> dict:
    """Default tile (the tuned table, :mod:`.tuned_w8a8`, wins where it has the shape): 16 rows x 512 codes
    per step (16 words per thread and row at 4 warps), split-K up to about two programs per SM."""
    block_n = 16
    block_k = min(512, triton.next_power_of_2(max(k, 4)))
    split = _split_for(triton.cdiv(n, block_n), triton.cdiv(k, block_k), 2 * sms)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=1, PREFETCH=True)


def _check(a: torch.Tensor, weight: torch.Tensor, cfg: dict) -> None:
    m, k = a.shape
    codes_are_fp8(a, weight)
    if weight.shape[1] != k:
        raise ValueError(f"activation K {k} != weight K {weight.shape[1]}")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"the A8W8 GEMV serves 1 to {MAX_M} rows, got {m}")
    if k % 4 or not _word_view_ok(weight):
        raise ValueError(f"the A8W8 GEMV reads 32-bit words: needs K % 4 == 0 (K={k}) and weight rows of whole "
                         f"words (unit stride, row stride and offset multiples of 4)")
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk < 4 or bk & (bk - 1) or bn & (bn - 1):
        raise ValueError(f"BLOCK_K {bk} (codes per step, >= 4) and BLOCK_N {bn} must be powers of two")


def a8w8_gemv(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """As :func:`.triton_w8a8.a8w8_swap_gemm` for M <= 4: a [M, K] int8 or fp8 e4m3 codes, a_scale float32
    [M, 1] (or an expanded static scalar, stride 0), weight [N, K] codes of the same kind, weight_scale
    float32 [N] or [N, 1], bias in out_dtype or None -> [M, N] out_dtype."""
    m, k = a.shape
    n = weight.shape[0]
    cfg = dict(cfg or gemv_config(m, n, k, _sm_count(a.device)))
    _check(a, weight, cfg)
    fp8 = a.dtype == torch.float8_e4m3fn
    a_words = a.contiguous().view(torch.int32)
    w_words = weight.view(torch.int32)
    kw = k // 4
    grid_n = triton.cdiv(n, cfg["BLOCK_N"])
    split = max(1, min(cfg.pop("SPLIT_K"), triton.cdiv(kw, cfg["BLOCK_K"] // 4)))
    if grid_n > MAX_TILES:
        split = 1
    w_scale = weight_scale.reshape(-1)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32 if fp8 else torch.int32,
                     device=a.device)
    a8w8_gemv_kernel[(grid_n, split)](
        a_words, w_words, a_scale, w_scale, bias if bias is not None else w_scale, out, ws,
        split_k_counters(a.device), n, kw, a_words.stride(0), w_words.stride(0), a_scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, FP8=fp8, M=m, SPLIT_K=split, EVEN_K=kw % (cfg["BLOCK_K"] // 4 * split) == 0,
        ASM=not INTERPRETING, **cfg)
    return out
