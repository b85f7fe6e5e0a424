"""Decode-step attention over a static KV cache (flash-decoding, split-KV), GQA-aware.

One new query token per sequence attends to the cache positions ``0 .. length-1``. ``length`` is a device
tensor the kernels read themselves, and the launch grid depends only on static shapes, so one call can be
captured in a CUDA graph and replayed while ``length`` grows. Positions at or beyond ``length`` are never
loaded (masked loads), so whatever the cache holds there cannot reach the result.

Two kernels:

* partial, grid ``(B * Hkv, S)``: a program owns one (batch, KV head) and one contiguous chunk of
  ``CHUNK`` positions. It loads the ``G = Hq / Hkv`` query rows that share the KV head (padded to at least
  16 rows for ``tl.dot``), so every valid K/V byte is read once for the whole group, and runs an online
  softmax over ``BLOCK_N``-position tiles (fp32 max, sum and accumulator). It writes the chunk's normalised
  output and its log-sum-exp (base 2) as fp32. Chunks starting at or after ``length`` do no work and write
  nothing; the combine skips them. With ``S = 1`` it writes the final output directly and no combine runs.
* combine, grid ``(B * Hq,)``: merges the active chunks of one query head with the usual max/exp rescaling.

The split count comes from static shapes only (:func:`decode_splits`): about two programs per SM while
``B * Hkv`` alone is below the SM count, one split once it fills the GPU.

One launch (``finish="inline"``, the default): with ``S > 1`` each partial program, once its chunk is written,
counts itself in with an atomic add on a per-(batch, KV head) counter; the last of the ``S`` to arrive merges the
chunks of its ``G`` query heads (in chunk order, so the result does not depend on the arrival order) and resets
the counter, which leaves the pool zero for the next launch or CUDA-graph replay. ``finish="kernel"`` launches the
combine kernel instead (the two-launch form, kept for A/B timing).

:func:`decode_rope_attention` also takes over what runs before attention in a decode step: from the fused
q/k/v projection's output row it applies RoPE to the query heads (in every program, which needs them) and to the
new key, and writes the new key and value at position ``length - 1`` of the caches (the program whose chunk holds
that position, before it reads the chunk). Three elementwise kernels and the combine become one launch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_w4a16 import INTERPRETING, _dot, split_k_counters

HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 64          # query heads per KV head
CPU_SM_COUNT = 132      # what the split heuristic assumes off-GPU (an H100's SM count)


@triton.jit
def _rope(x_ptr, offs_d, cos, sin, mask, D: tl.constexpr):
    """RoPE (rotate-half) of the rows at ``x_ptr`` ([R, D] pointers along ``offs_d``) in float32:
    ``x * cos + cat(-x2, x1) * sin``."""
    half: tl.constexpr = D // 2
    rot_d = (offs_d + half) % D
    sign = tl.where(offs_d < half, -1.0, 1.0)
    x = tl.load(x_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    x_rot = tl.load(x_ptr + rot_d, mask=mask, other=0.0).to(tl.float32)
    return x * cos + sign * x_rot * sin


@triton.jit
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, len_ptr, part_ptr, lse_ptr, out_ptr, cos_ptr, sin_ptr, cnt_ptr,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                           stride_ob, stride_oh, L, HKV, S, qk_scale,
                           G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                           CHUNK: tl.constexpr, ONE_SPLIT: tl.constexpr, ROPE: tl.constexpr, FINISH: tl.constexpr,
                           INTERPRET: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    length = tl.minimum(tl.load(len_ptr).to(tl.int32), L)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)            # end <= start: nothing to do in this chunk

    rows = tl.arange(0, G_PAD)                         # query rows of the group, padded
    row_ok = rows < G
    row_live = rows < tl.where(start < end, G, 0)     # no rows when the chunk has no work
    offs_d = tl.arange(0, D)
    qh = h * G + rows                                  # query head of each row
    q_row = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b * stride_vb + h.to(tl.int64) * stride_vh
    if ROPE:
        # q_ptr is the fused projection's row [Hq | Hkv | Hkv heads]; cos/sin the new position's rows [D]
        cos = tl.load(cos_ptr + offs_d).to(tl.float32)
        sin = tl.load(sin_ptr + offs_d).to(tl.float32)
        q = _rope(q_row + qh[:, None] * stride_qh, offs_d[None, :], cos[None, :], sin[None, :],
                  row_live[:, None], D).to(q_ptr.dtype.element_ty)
        pos = length - 1
        if (pos >= start) & (pos < end):               # this chunk holds the new position: write it first
            hq = HKV * G
            k_new = _rope(q_row + (hq + h) * stride_qh, offs_d, cos, sin, offs_d < D, D)
            v_new = tl.load(q_row + (hq + HKV + h) * stride_qh + offs_d)
            tl.store(k_base + pos * stride_kl + offs_d, k_new.to(k_ptr.dtype.element_ty))
            tl.store(v_base + pos * stride_vl + offs_d, v_new)
            tl.debug_barrier()                         # the program's own stores are seen by its loads below
    else:
        q = tl.load(q_row + qh[:, None] * stride_qh + offs_d[None, :], mask=row_live[:, None], other=0.0)  # [G_PAD, D]

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)  # running max (base-2 scaled scores)
    l_i = tl.zeros([G_PAD], tl.float32)                # running sum of exp2(score - m_i)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = _dot(q, tl.trans(k), INTERPRET) * qk_scale         # [G_PAD, BLOCK_N], log2 domain
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INTERPRET)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = out_ptr + b * stride_ob + qh[:, None] * stride_oh + offs_d[None, :]
    if ONE_SPLIT:
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        slot = (b * HKV * G + qh) * S                  # [G_PAD] index of split 0 in [B, Hq, S]
        tl.store(lse_ptr + slot + split, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=row_live)
        tl.store(part_ptr + (slot + split)[:, None] * D + offs_d[None, :], o, mask=row_live[:, None])
        if FINISH:
            tl.debug_barrier()                         # every thread's partial is written before the release
            arrived = tl.atomic_add(cnt_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            if arrived == S - 1:                       # the last chunk of this (batch, KV head) to finish
                active = (length + CHUNK - 1) // CHUNK # chunks that start before length wrote a partial
                m = tl.full([G_PAD], float("-inf"), tl.float32)
                den = tl.zeros([G_PAD], tl.float32)
                tot = tl.zeros([G_PAD, D], tl.float32)
                for c in range(0, active):             # chunk order: the same sum whatever the arrival order
                    lse = tl.load(lse_ptr + slot + c, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                    part = tl.load(part_ptr + (slot + c)[:, None] * D + offs_d[None, :], mask=row_ok[:, None],
                                   other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m, lse)
                    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
                    a = tl.exp2(m - m_new)
                    w = tl.exp2(lse - m_new)
                    den = den * a + w
                    tot = tot * a[:, None] + part * w[:, None]
                    m = m_new
                o = tot / tl.where(den > 0, den, 1.0)[:, None]
                tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
                tl.atomic_xchg(cnt_ptr + pid_bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _decode_combine_kernel(part_ptr, lse_ptr, len_ptr, out_ptr, stride_ob, stride_oh, L, HQ, S,
                           D: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)                             # b * HQ + query head
    b = pid // HQ
    hq = pid % HQ
    length = tl.minimum(tl.load(len_ptr).to(tl.int32), L)
    active = (length + CHUNK - 1) // CHUNK             # chunks that start before length
    offs_s = tl.arange(0, S_PAD)
    s_ok = offs_s < active
    offs_d = tl.arange(0, D)
    base = pid.to(tl.int64) * S
    lse = tl.load(lse_ptr + base + offs_s, mask=s_ok, other=float("-inf"))                   # [S_PAD]
    part = tl.load(part_ptr + (base + offs_s[:, None]) * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)           # length 0: no chunk, output zeros
    w = tl.where(s_ok, tl.exp2(lse - m), 0.0)
    denom = tl.sum(w, axis=0)
    o = tl.sum(part * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    out = out_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh + offs_d
    tl.store(out, o.to(out_ptr.dtype.element_ty))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_block_n(head_dim: int) -> int:
    """Positions per tile: 64 up to D = 128 (a 16 KB bf16 K tile), 32 at D = 256."""
    return 64 if head_dim <= 128 else 32


def decode_splits(batch: int, kv_heads: int, max_len: int, sm_count: int, block_n: int,
                  splits: int | None = None) -> tuple[int, int]:
    """(S splits, chunk positions) for a cache of ``max_len`` positions, from static shapes only.

    ``B * Hkv`` programs at or above the SM count fill the GPU: one split. Below, enough splits for about
    two programs per SM, at most one per ``block_n`` tile. The chunk is a multiple of ``block_n`` and the
    S chunks cover ``max_len`` with none empty. ``splits`` forces S (clamped to the tile count)."""
    tiles = triton.cdiv(max_len, block_n)
    if splits is None:
        programs = batch * kv_heads
        splits = 1 if programs >= sm_count else triton.cdiv(2 * sm_count, programs)
    splits = max(1, min(splits, tiles))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(max_len, chunk), chunk


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why the kernels cannot serve these inputs, or None when they can."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return (f"decode attention wants q [B, Hq, D] and caches [B, Hkv, L, D] of one shape, got "
                f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    kb, hkv, _, kd = k_cache.shape
    if kb != b or kd != d:
        return f"q {tuple(q.shape)} and cache {tuple(k_cache.shape)} differ in batch or head dim"
    if d not in HEAD_DIMS:
        return f"decode attention supports head dim {HEAD_DIMS}, got {d}"
    if hq % hkv or hq // hkv > MAX_GROUP:
        return f"query heads ({hq}) must be a multiple of KV heads ({hkv}), at most {MAX_GROUP} times"
    if q.dtype not in (torch.bfloat16, torch.float16) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return (f"decode attention wants bf16/fp16 q and caches of one dtype, got "
                f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "decode attention wants the head dim contiguous (stride 1) in q and both caches"
    return None


FINISHES = ("inline", "kernel")


def _check_length(length: torch.Tensor, device: torch.device) -> None:
    if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64) or length.device != device:
        raise ValueError(f"length must be a 1-element int32/int64 tensor on {device}, got "
                         f"{tuple(length.shape)} {length.dtype} on {length.device}")


def _check_out(out: torch.Tensor | None, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(shape)} {like.dtype} tensor on {like.device} with the head dim "
                         f"contiguous, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _launch(q, q_strides, k_cache, v_cache, length, out, hq, scale, rope, splits, block_n, finish, num_warps,
            num_stages):
    """Both entry points: q's rows at ``q`` with (batch, head) strides ``q_strides``; ``rope`` None or (cos, sin)."""
    if finish not in FINISHES:
        raise ValueError(f"unknown finish {finish!r}; use one of {', '.join(FINISHES)}")
    b = out.shape[0]
    _, hkv, max_len, d = k_cache.shape
    g = hq // hkv
    block_n = block_n or default_block_n(d)
    s, chunk = decode_splits(b, hkv, max_len, _sm_count(q.device), block_n, splits)
    inline = s > 1 and finish == "inline"
    if inline and b * hkv > split_k_counters(q.device).numel():
        inline = False                                 # more (batch, KV head) pairs than arrival counters
    if s > 1:
        part = torch.empty((b, hq, s, d), device=q.device, dtype=torch.float32)
        lse = torch.empty((b, hq, s), device=q.device, dtype=torch.float32)
    else:  # unused by the one-split kernel; not `out` itself (the interpreter copies each argument back)
        part = lse = torch.empty(0, device=q.device, dtype=torch.float32)
    cnt = split_k_counters(q.device) if inline else part
    cos, sin = rope if rope is not None else (part, part)
    _decode_partial_kernel[(b * hkv, s)](
        q, k_cache, v_cache, length, part, lse, out, cos, sin, cnt,
        q_strides[0], q_strides[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        max_len, hkv, s, scale * math.log2(math.e),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=block_n, CHUNK=chunk, ONE_SPLIT=s == 1,
        ROPE=rope is not None, FINISH=inline, INTERPRET=INTERPRETING, num_warps=num_warps, num_stages=num_stages)
    if s > 1 and not inline:
        _decode_combine_kernel[(b * hq,)](part, lse, length, out, out.stride(0), out.stride(1), max_len, hq, s,
                                          D=d, S_PAD=triton.next_power_of_2(s), CHUNK=chunk, num_warps=4)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     scale: float | None = None, out: torch.Tensor | None = None, splits: int | None = None,
                     block_n: int | None = None, finish: str = "inline", num_warps: int = 4,
                     num_stages: int = 2) -> torch.Tensor:
    """softmax(q K^T * scale) V over cache positions ``< length``, for one query token per sequence.

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, L, D] (any strides but the last); length: 1-element int
    tensor on q's device (read by the kernels, no host sync; values above L count as L, 0 gives zeros).
    Returns [B, Hq, D] in q's dtype, written into ``out`` when given (head dim contiguous).
    ``finish``: merge the chunks in the partial kernel's last program ("inline", one launch) or in the combine
    kernel ("kernel"). ``splits``/``block_n``/``num_warps``/``num_stages``: tests and tuning."""
    reason = unsupported_reason(q, k_cache, v_cache)
    if reason is not None:
        raise ValueError(reason)
    _check_length(length, q.device)
    out = _check_out(out, tuple(q.shape), q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _launch(q, (q.stride(0), q.stride(1)), k_cache, v_cache, length, out, q.shape[1], scale, None,
                   splits, block_n, finish, num_warps, num_stages)


def rope_unsupported_reason(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, heads: int) -> str | None:
    """Why :func:`decode_rope_attention` cannot serve these inputs, or None when it can."""
    if qkv.dim() != 2 or k_cache.dim() != 4:
        return (f"decode_rope_attention wants qkv [B, (Hq + 2 Hkv) D] and caches [B, Hkv, L, D], got "
                f"{tuple(qkv.shape)}, {tuple(k_cache.shape)}")
    b, hkv, _, d = k_cache.shape
    if heads <= 0 or qkv.shape != (b, (heads + 2 * hkv) * d):
        return (f"qkv {tuple(qkv.shape)} is not [B, (Hq + 2 Hkv) D] = [{b}, ({heads} + 2 x {hkv}) x {d}] "
                f"for caches {tuple(k_cache.shape)}")
    if qkv.stride(-1) != 1:
        return "decode_rope_attention wants each qkv row contiguous"
    if cos.shape != (d,) or sin.shape != (d,) or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return f"cos and sin must be contiguous [{d}] rows (the new position's), got {tuple(cos.shape)}, {tuple(sin.shape)}"
    q = qkv[:, :heads * d].view(b, heads, d)
    return unsupported_reason(q, k_cache, v_cache)


def decode_rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, length: torch.Tensor, heads: int, scale: float | None = None,
                          out: torch.Tensor | None = None, splits: int | None = None, block_n: int | None = None,
                          finish: str = "inline", num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """One decode step's attention from the fused q/k/v projection, in one launch.

    qkv: [B, (Hq + 2 Hkv) D], the q, k and v heads of each sequence's new token in that order; cos, sin: [D], the
    RoPE rows of the new position (rotate-half convention). Applies RoPE to q and k (float32, rounded once to
    the caches' dtype), writes k and v at position ``length - 1`` of k_cache / v_cache (in place; ``length`` in
    1 .. L), and returns softmax(q K^T * scale) V over positions ``< length``: [B, Hq, D]."""
    reason = rope_unsupported_reason(qkv, cos, sin, k_cache, v_cache, heads)
    if reason is not None:
        raise ValueError(reason)
    _check_length(length, qkv.device)
    d = k_cache.shape[-1]
    out = _check_out(out, (qkv.shape[0], heads, d), qkv)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return _launch(qkv, (qkv.stride(0), d), k_cache, v_cache, length, out, heads, scale, (cos, sin),
                   splits, block_n, finish, num_warps, num_stages)
