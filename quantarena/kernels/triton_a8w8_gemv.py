"""W8A8 INT8 / FP8 GEMV for decode batches (M <= 4): CUDA cores, weight streaming; GEMM-only, or with the
activation quantization fused in (``QUANT_X``, :func:`a8w8_gemv_quant`).

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
* The activation words are loaded as tiles of equal rows in the weight tile's layout (``_act_step``), so the
  loop has no shared-memory layout conversion and no barrier; the compiler merges a thread's equal loads
  (and, for fp8, their conversions).
* ``PREFETCH``: the next step's weight tile is requested before this step's arithmetic (registers); or
  ``STAGES`` > 1 hands the loop to Triton's cp.async pipeline (through shared memory).
* ``ASM`` (constexpr) switches the inline PTX off under the Triton interpreter, which computes the same
  numbers with integer ops: byte extraction with sign extension for dp4a, a bit-exact e4m3 decode for fp8.
* ``QUANT_X``: the kernel reads the bf16 / fp16 activations and quantizes them itself, so that a decode
  step's linear is one launch instead of two (:func:`.triton_act_quant.act_quant`, then the GEMV): on a small
  layer at M <= 4 the GEMV takes a few microseconds, of the order of a second launch and the codes' round
  trip through memory. Each program first computes its rows' per-token scales over the whole row (split-K
  programs too: the row is small and in L2; a static per-tensor scale skips this), then quantizes each
  step's activation words on the fly. The arithmetic is act_quant's (float32, correctly rounded divisions),
  so the codes and scales are its own bit for bit.

The result is the GEMMs' own: the per-row sums go through :func:`.triton_w8a8._finish` (split-K workspace
and arrival counter of :func:`.triton_w4a16.split_k_reduce`, then :func:`.triton_w8a8._epilogue`,
``acc * a_scale[m] * w_scale[n] (+ bias[n])``), so int8 outputs are bit-identical to
:func:`.triton_w8a8.int8_gemm` / :func:`.triton_w8a8.a8w8_swap_gemm` (exact int32 sums, same epilogue), and
the fused kernel's int8 outputs to act_quant + :func:`a8w8_gemv`'s.
The fp8 PTX needs sm_89 or newer (``ops`` sends fp8 to Triton only on sm_90+).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import INTERPRETING, MAX_TILES, _sm_count, _split_for, split_k_counters
from .triton_act_quant import _load_row, _rint
from .triton_pdl import pdl_launch, prefetch_rows, wait
from .triton_w8a8 import _a_scales, _finish, codes_are_fp8

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
def _row_scales(a_ptr, smooth_ptr, rm, M, K, stride_am, HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr,
                BM: tl.constexpr, BLOCK: tl.constexpr):
    """[BM] float32: :func:`.triton_act_quant.act_quant_kernel`'s dynamic scale of each row over all of K,
    div_rn(max(absmax(x / smooth), 1e-12), QMAX), the same float32 operations (a max is exact in any order,
    so the blocking does not matter). Rows past M repeat row M - 1."""
    rows = a_ptr + tl.minimum(rm, M - 1)[:, None] * stride_am                      # [BM, 1]
    k = tl.zeros((BM, 1), dtype=tl.int32) + tl.arange(0, BLOCK)[None, :]          # [BM, BLOCK]
    absmax = tl.zeros((BM, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        absmax = tl.maximum(absmax, tl.abs(_load_row(rows, smooth_ptr, k0 + k, K, HAS_SMOOTH)))
    return tl.math.div_rn(tl.maximum(tl.max(absmax, axis=1), 1e-12), tl.full((BM,), QMAX, tl.float32))


@triton.jit
def _row_scale(a_s, rm, I: tl.constexpr):
    """Row I's scale from the [BM] scales, as a scalar (a sum of it and zeros: exact)."""
    return tl.sum(tl.where(rm == I, a_s, 0.0), axis=0)


@triton.jit
def _code(x_row, smooth_ptr, scale, k, K, FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    """act_quant's code of the elements k of one row (_load_row's float32 x / smooth, divided by the row's
    scale and rounded as act_quant's _store_codes does): int8 as int32, fp8 as the e4m3 code's float32 value."""
    x = _load_row(x_row, smooth_ptr, k, K, HAS_SMOOTH)
    y = tl.math.div_rn(x, scale + tl.zeros_like(x))
    if FP8:
        code = tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
    else:
        code = _rint(tl.clamp(y, -128.0, 127.0)).to(tl.int32)
    return code


@triton.jit
def _act_step(x_row, smooth_ptr, scale, xcols, kw, KW, FP8: tl.constexpr, QUANT_X: tl.constexpr,
              HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """One activation row's operand for the step's words, as [BN, BKW] tiles of equal rows in the weight
    tile's layout: int8, one int32 word of four codes (dp4a's operand); fp8, the four codes' float32 values.

    Codes given: the words are loaded by each thread for its own columns (the compiler merges a thread's
    equal loads: L1 hits) instead of a 1-D load converted through shared memory, two barriers per row and
    step. Past the split the weight words are 0, so the word index is clamped into the row instead of
    masked: a masked load would not be merged, and the clamped word is a real one (finite: 0 * it = 0).

    QUANT_X: x_row points at the bf16 / fp16 row; the four elements of each word are quantized here with the
    row's ``scale`` (act_quant's arithmetic, see _code) and, for int8, packed little-endian (byte j = element
    4w + j: act_quant's codes viewed as int32). The quantization runs on a [1, BKW] row and is broadcast to
    the tile in registers (no added barrier in the sm_90 code of the tuned tiles): on the [BN, BKW] tile,
    each thread would repeat the divisions for every tile row it holds (its equal loads are merged, the
    divisions are not)."""
    if QUANT_X:
        cols = kw + tl.arange(0, xcols.shape[1])[None, :]
        if not EVEN_K:
            cols = tl.minimum(cols, KW - 1)
        k = 4 * cols
        c0 = _code(x_row, smooth_ptr, scale, k, 4 * KW, FP8, HAS_SMOOTH)
        c1 = _code(x_row, smooth_ptr, scale, k + 1, 4 * KW, FP8, HAS_SMOOTH)
        c2 = _code(x_row, smooth_ptr, scale, k + 2, 4 * KW, FP8, HAS_SMOOTH)
        c3 = _code(x_row, smooth_ptr, scale, k + 3, 4 * KW, FP8, HAS_SMOOTH)
        if FP8:
            x = (tl.broadcast_to(c0, xcols.shape), tl.broadcast_to(c1, xcols.shape),
                 tl.broadcast_to(c2, xcols.shape), tl.broadcast_to(c3, xcols.shape))
        else:
            x = tl.broadcast_to((c0 & 0xFF) | ((c1 & 0xFF) << 8) | ((c2 & 0xFF) << 16) | (c3 << 24), xcols.shape)
    else:
        cols = kw + xcols
        if not EVEN_K:
            cols = tl.minimum(cols, KW - 1)
        x = tl.load(x_row + cols)
        if FP8:
            x = _e4m3_floats(x, ASM)
    return x


@triton.jit
def _row_step(acc, w, wf, x, FP8: tl.constexpr, ASM: tl.constexpr):
    """acc [BN, BKW] += one activation row's operand x (see _act_step) times the step's weight words (w) /
    floats (wf)."""
    if FP8:
        x0, x1, x2, x3 = x
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
def a8w8_gemv_kernel(a_ptr, smooth_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                     N, KW, stride_am, stride_ww, stride_as, stride_om,
                     HAS_BIAS: tl.constexpr, FP8: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                     PREFETCH: tl.constexpr = True, STAGES: tl.constexpr = 1, ASM: tl.constexpr = True,
                     QUANT_X: tl.constexpr = False, HAS_SMOOTH: tl.constexpr = False, STATIC: tl.constexpr = False,
                     PDL: tl.constexpr = False, pf_bytes=0, LANES: tl.constexpr = 128):
    """out[m, n] = epilogue(sum_k a[m, k] w[n, k]) for M (1..4) rows; w: int32 words [N, KW] (four int8 or e4m3
    codes each). a: int32 words [M, KW] of codes with a_scale [M, 1] at stride_as; or, QUANT_X, the bf16 / fp16
    activations [M, 4 KW] (stride_am in elements), quantized in the kernel as act_quant would: a_scale the
    static scale (STATIC) or, dynamic, each row's scale computed first over the whole row (every program
    does, split-K ones too: the row is in L2); smooth [4 KW] float32 divides x first (HAS_SMOOTH).
    One program per (BLOCK_N rows, K split); grid (cdiv(N, BLOCK_N), SPLIT_K). Rows past N are clamped to row
    N - 1 (computed, never stored). ``PDL`` (codes given, not QUANT_X): the program asks the L2 for the first
    ``pf_bytes`` of each of its weight rows' K slice (LANES = 32 x num_warps), then waits for the previous
    kernel (:mod:`.triton_pdl`)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BKW: tl.constexpr = BLOCK_K // 4                      # words per step
    BM: tl.constexpr = 1 if M == 1 else (2 if M == 2 else 4)
    rm = tl.arange(0, BM)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BKW)[None, :]
    w_tile = w_ptr + tl.minimum(rn, N - 1)[:, None] * stride_ww + rk
    xcols = tl.zeros((BLOCK_N, 1), dtype=tl.int32) + rk   # [BLOCK_N, BKW]: see _act_step
    words_per_split = tl.cdiv(tl.cdiv(KW, BKW), SPLIT_K) * BKW
    k_start = pid_k * words_per_split
    k_end = tl.minimum(k_start + words_per_split, KW)
    if PDL:
        prefetch_rows((w_ptr + k_start).to(tl.pointer_type(tl.int8)), pid_n * BLOCK_N, N, 4 * stride_ww,
                      tl.minimum(pf_bytes, 4 * (k_end - k_start)), BLOCK_N, LANES)
        wait()
    if QUANT_X:   # the rows' scales first: the codes need them
        if STATIC:
            a_s = _a_scales(a_scale_ptr, rm, M, stride_as)
        else:
            a_s = _row_scales(a_ptr, smooth_ptr, rm, M, 4 * KW, stride_am, HAS_SMOOTH, 448.0 if FP8 else 127.0, BM,
                              BLOCK_K)
        s0 = _row_scale(a_s, rm, 0)
        s1 = _row_scale(a_s, rm, 1)
        s2 = _row_scale(a_s, rm, 2)
        s3 = _row_scale(a_s, rm, 3)
    else:         # codes given: their scales are read by the epilogue only
        s0, s1, s2, s3 = 1.0, 1.0, 1.0, 1.0
    x0 = a_ptr
    x1 = x0 + stride_am
    x2 = x1 + stride_am
    x3 = x2 + stride_am
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
        acc0 = _row_step(acc0, w, wf, _act_step(x0, smooth_ptr, s0, xcols, kw, KW, FP8, QUANT_X, HAS_SMOOTH, EVEN_K,
                                                ASM), FP8, ASM)
        if M > 1:
            acc1 = _row_step(acc1, w, wf, _act_step(x1, smooth_ptr, s1, xcols, kw, KW, FP8, QUANT_X, HAS_SMOOTH,
                                                    EVEN_K, ASM), FP8, ASM)
        if M > 2:
            acc2 = _row_step(acc2, w, wf, _act_step(x2, smooth_ptr, s2, xcols, kw, KW, FP8, QUANT_X, HAS_SMOOTH,
                                                    EVEN_K, ASM), FP8, ASM)
        if M > 3:
            acc3 = _row_step(acc3, w, wf, _act_step(x3, smooth_ptr, s3, xcols, kw, KW, FP8, QUANT_X, HAS_SMOOTH,
                                                    EVEN_K, ASM), FP8, ASM)
        if PREFETCH:
            w = w_next
    part = _place_row(tl.zeros((BM, BLOCK_N), dtype=acc_ty), acc0, rm, 0)
    if M > 1:
        part = _place_row(part, acc1, rm, 1)
    if M > 2:
        part = _place_row(part, acc2, rm, 2)
    if M > 3:
        part = _place_row(part, acc3, rm, 3)
    if not QUANT_X:
        a_s = _a_scales(a_scale_ptr, rm, M, stride_as)
    _finish(part, a_s, w_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, rm, rn, M, N, stride_om, pid_k, pid_n,
            SPLIT_K, HAS_BIAS)


def _word_view_ok(t: torch.Tensor) -> bool:
    """``t.view(torch.int32)`` works: unit-stride rows of whole words, starting on a word."""
    return t.stride(1) == 1 and t.shape[1] % 4 == 0 and t.stride(0) % 4 == 0 and t.storage_offset() % 4 == 0


def gemv_supported(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """1 to 4 rows (codes, or the activations :func:`a8w8_gemv_quant` quantizes), K a multiple of 4 (whole
    32-bit words), weight rows readable as words."""
    return 1 <= a.shape[0] <= MAX_M and _word_view_ok(weight)


def gemv_config(m: int, n: int, k: int, sms: int) -> dict:
    """Default tile (the tuned table, :mod:`.tuned_w8a8`, wins where it has the shape): 16 rows x 512 codes
    per step (16 words per thread and row at 4 warps), split-K up to about two programs per SM."""
    block_n = 16
    block_k = min(512, triton.next_power_of_2(max(k, 4)))
    split = _split_for(triton.cdiv(n, block_n), triton.cdiv(k, block_k), 2 * sms)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=1, PREFETCH=True)


def _check(m: int, k: int, weight: torch.Tensor, cfg: dict) -> None:
    """A ValueError for M rows of K features, a weight or a tile the GEMV cannot take."""
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


def _launch(a: torch.Tensor, a_scale: torch.Tensor | None, smooth: torch.Tensor | None, weight: torch.Tensor,
            weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, fp8: bool, cfg: dict,
            quant_x: bool) -> torch.Tensor:
    """One launch of :func:`a8w8_gemv_kernel` (a: code words, or the activations when quant_x; a_scale None:
    the dynamic scales the kernel computes) with its split-K workspace -> [M, N] out_dtype."""
    m, n, kw = a.shape[0], weight.shape[0], weight.shape[1] // 4
    w_words = weight.view(torch.int32)
    grid_n = triton.cdiv(n, cfg["BLOCK_N"])
    split = max(1, min(cfg.pop("SPLIT_K"), triton.cdiv(kw, cfg["BLOCK_K"] // 4)))
    if grid_n > MAX_TILES:
        split = 1
    w_scale = weight_scale.reshape(-1)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32 if fp8 else torch.int32,
                     device=a.device)
    # the fused form (quant_x) has no quantization kernel before it to overlap
    pdl = pdl_launch(cfg, a, weight, grid_n * split, allowed=not quant_x)
    a8w8_gemv_kernel[(grid_n, split)](
        a, smooth if smooth is not None else w_scale, w_words, a_scale if a_scale is not None else w_scale, w_scale,
        bias if bias is not None else w_scale, out, ws, split_k_counters(a.device), n, kw, a.stride(0),
        w_words.stride(0), a_scale.stride(0) if a_scale is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, FP8=fp8, M=m, SPLIT_K=split, EVEN_K=kw % (cfg["BLOCK_K"] // 4 * split) == 0,
        ASM=not INTERPRETING, QUANT_X=quant_x, HAS_SMOOTH=smooth is not None,
        STATIC=quant_x and a_scale is not None, **cfg, **pdl)
    return out


def a8w8_gemv(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """As :func:`.triton_w8a8.a8w8_swap_gemm` for M <= 4: a [M, K] int8 or fp8 e4m3 codes, a_scale float32
    [M, 1] (or an expanded static scalar, stride 0), weight [N, K] codes of the same kind, weight_scale
    float32 [N] or [N, 1], bias in out_dtype or None -> [M, N] out_dtype."""
    m, k = a.shape
    cfg = dict(cfg or gemv_config(m, weight.shape[0], k, _sm_count(a.device)))
    fp8 = codes_are_fp8(a, weight)
    _check(m, k, weight, cfg)
    return _launch(a.contiguous().view(torch.int32), a_scale, None, weight, weight_scale, bias, out_dtype, fp8, cfg,
                   quant_x=False)


def a8w8_gemv_quant(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    smooth: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                    cfg: dict | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``act_quant`` + :func:`a8w8_gemv` in one launch: x [M, K] bf16 / fp16 activations (M <= 4), weight
    [N, K] int8 or fp8 e4m3 codes (their kind is that of the activation codes), weight_scale float32 [N] or
    [N, 1], bias or None; ``smooth`` [K] (SmoothQuant divisor) and ``input_scale`` (static per-tensor scale,
    else dynamic per-token) as in :func:`.triton_act_quant.act_quant` -> [M, N] in out_dtype (default
    x.dtype). The codes and scales are act_quant's bit for bit, so int8 outputs equal act_quant +
    a8w8_gemv's with the same tile."""
    m, k = x.shape
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the fused GEMV quantizes bf16 or fp16 activations, got {x.dtype}")
    if weight.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"the weight must hold int8 or fp8 e4m3 codes, got {weight.dtype}")
    if smooth is not None and smooth.numel() != k:
        raise ValueError(f"smooth must hold one divisor per input feature ({k}), got {smooth.numel()}")
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"input_scale must be one per-tensor scale, got {input_scale.numel()} values")
    cfg = dict(cfg or gemv_config(m, weight.shape[0], k, _sm_count(x.device)))
    _check(m, k, weight, cfg)
    static = None if input_scale is None else input_scale.float().reshape(1, 1).expand(m, 1)   # stride 0
    smooth = None if smooth is None else smooth.float().reshape(-1).contiguous()
    return _launch(x.contiguous(), static, smooth, weight, weight_scale, bias, out_dtype or x.dtype,
                   weight.dtype == torch.float8_e4m3fn, cfg, quant_x=True)
