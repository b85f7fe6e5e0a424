"""Kernel dispatch: one function per quantized linear, chosen by device and batch size M.

CPU (and any device or shape without a fast path) runs :mod:`quantarena.kernels.reference`. On CUDA the
work goes through ``torch.library`` custom ops (``quantarena::w4a16_linear``, ``::w8a8_linear``,
``::fp8_linear``) with fake implementations, so ``torch.compile`` traces them and CUDA graphs capture them.

W4A16 paths by M: the GEMV v3 (``gemv3``, :mod:`.triton_w4a16_gemv`) at M = 1 unless the table names a
tensor-core tile there (it does for most tuned shapes); the tensor-core kernel (``tc``, :mod:`.triton_w4a16_tc`)
from M = 2; dequantize + cuBLAS (``dequant``) once M is large enough for cuBLAS to win (M > 256 by default). Per (M bucket, N, K) the path and tile measured fastest on H100 come from
:mod:`.tuned_w4a16` (written by ``benchmarks/w4a16_tc_tune.py``); shapes not in it, and GPUs other than
Hopper (the tables were measured on an H100), get the defaults above.
The older CUDA-core GEMVs (``gemv``, M <= 4; ``gemv2``, M <= 16) serve group sizes the others cannot, and
benchmarks.

W8A8 int8 and FP8: one fused activation-quant kernel, then the GEMM measured fastest for the shape in
:mod:`.tuned_w8a8`: the swap-AB Triton kernel for skinny M, the tiled int8 kernel (tuned tile) or
``torch._scaled_mm`` for larger M; untuned shapes get the tiled int8 kernel / ``torch._scaled_mm``. At M <= 4
the table may name the CUDA-core GEMV (``gemv``) or the GEMV that quantizes its activations itself
(``gemv_q``: one launch instead of two).
Under ``torch.compile`` the activation quantization is written in torch ops (the reference's) and only the
GEMM is a custom op (``quantarena::a8w8_gemm``), so inductor fuses the quantization into the kernel that
produces the activations (RMSNorm, SiLU-mul) instead of launching it separately. Its float32 division is
inductor's, not correctly rounded: a code can differ by one where x / scale falls within an ulp of a .5.
``w8a8_silu_mul_linear`` / ``fp8_silu_mul_linear`` take an MLP's ``[gate | up]`` and quantize silu(gate) * up
in the act-quant kernel itself (``quantarena::a8w8_silu_mul_linear``), one launch where inductor makes three.

``decode_attention``: one decode step's attention over the valid positions of a static KV cache, the split-KV
kernel of :mod:`.triton_decode_attention` (``quantarena::decode_attention``). ``decode_rope_attention`` starts from
the fused q/k/v projection's output instead: RoPE, the cache writes and the attention in one launch
(``quantarena::decode_rope_attention``, which mutates the caches).

A weight held only in the tensor-core kernel's layout (``W4A16Linear.to_kernel_layout``, for serving: one copy of
the 4-bit weights) goes through ``w4a16_linear_tiled`` (``quantarena::w4a16_linear_tiled``): the TILED tc tile,
or the dequantize from that layout + cuBLAS where the table says dequantize; no GEMV (they need layouts of their own).

The kernel-layout copy of each canonical W4A16 weight is built once, on first use, and kept while the canonical tensor lives (keyed on the tensor
object, dropped with it). Build it before CUDA-graph capture: run the layer once first, as every
graph capture needs a warm-up call anyway.
"""
from __future__ import annotations

import weakref

import torch

from . import reference

W4A16_GEMV_MAX_M = 4
W4A16_GEMV2_MAX_M = 16
W4A16_TC_MAX_M = 256          # default upper end of the tensor-core path; dequant + cuBLAS above


def _tuned_for(x: torch.Tensor) -> bool:
    """The dispatch tables were measured on an H100: use them on Hopper GPUs (sm_90), defaults elsewhere."""
    return x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] == 9


def _triton_ok(x: torch.Tensor) -> bool:
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- W4A16

class _Prepared:
    """Kernel-layout weight (+ act-order column permutation) derived from one canonical packed tensor."""

    def __init__(self, striped, perm: torch.Tensor | None, version: int):
        self.striped, self.perm, self.version = striped, perm, version


_W4A16_CACHE: dict[int, tuple[weakref.ref, _Prepared]] = {}


def act_order_perm(g_idx: torch.Tensor | None, group_size: int, in_features: int) -> torch.Tensor | None | bool:
    """None when ``g_idx`` is absent or the plain ``k // group_size``; else the column order that makes
    groups contiguous; False when the groups are not all ``group_size`` columns (no fast kernel)."""
    if g_idx is None:
        return None
    plain = torch.arange(in_features, device=g_idx.device) // group_size
    if torch.equal(g_idx.long(), plain):
        return None
    counts = torch.bincount(g_idx.long(), minlength=in_features // group_size)
    if not bool((counts == group_size).all()):
        return False
    return torch.argsort(g_idx.long(), stable=True)


def _prepared(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
              g_idx: torch.Tensor | None) -> _Prepared | None:
    from . import triton_w4a16 as T
    from .. import primitives as P

    key = id(packed)
    hit = _W4A16_CACHE.get(key)
    if hit is not None and hit[0]() is packed and hit[1].version == packed._version:
        return hit[1]
    in_features = packed.shape[1] * 8
    perm = act_order_perm(g_idx, group_size, in_features)
    if perm is False:
        return None
    if perm is not None:  # act order: permute the columns so that each group is contiguous
        packed_k = P.pack_int4(P.unpack_int4(packed, in_features)[:, perm])
    else:
        packed_k = packed
    prep = _Prepared(T.StripedWeight(packed_k, scales, zeros, group_size, hold_packed=perm is not None), perm,
                     packed._version)
    _W4A16_CACHE[key] = (weakref.ref(packed, lambda _, cache=_W4A16_CACHE: cache.pop(key, None)), prep)
    return prep


def w4a16_path(m: int, n: int | None = None, k: int | None = None, tuned_table: bool = True) -> str:
    """Which W4A16 CUDA kernel serves M rows of an N x K weight: the measured fastest where tuned."""
    from .tuned_w4a16 import lookup

    tuned = lookup(m, n, k) if tuned_table else None
    if m == 1 and (tuned is None or tuned[0] == "gemv2"):   # gemv3 beat gemv2 on 7 of 8 tuned shapes and tied
        return "gemv3"                                     # the 8th (h100-w4a16-gemv3.json)
    if tuned is not None:
        return tuned[0]
    return "tc" if m <= W4A16_TC_MAX_M else "dequant"


@torch.library.custom_op("quantarena::w4a16_linear", mutates_args=())
def _w4a16_op(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, bias: torch.Tensor | None, g_idx: torch.Tensor | None, path: str) -> torch.Tensor:
    from . import triton_w4a16 as T, triton_w4a16_gemv as G3, triton_w4a16_tc as TC

    prep = _prepared(packed, scales, zeros, group_size, g_idx)
    if prep is None:
        return reference.w4a16_linear(x2, packed, scales, zeros, group_size, bias, g_idx)
    x2 = x2.contiguous() if prep.perm is None else x2[:, prep.perm].contiguous()
    m, n, k = x2.shape[0], prep.striped.out_features, prep.striped.in_features
    if path == "gemv3" and (m != 1 or not G3.gemv3_supported(prep.striped)):
        path = "gemv2"
    if path == "gemv3":
        return G3.w4a16_gemv3(x2, prep.striped, bias)
    if path == "gemv2" and not T.gemv2_supported(prep.striped):
        path = "tc"
    if path == "tc" and not TC.tc_supported(prep.striped):
        path = "gemv" if m <= W4A16_GEMV_MAX_M else "dequant"
    if path == "gemv2":
        return T.w4a16_gemv2(x2, prep.striped, bias)
    if path == "gemv":
        return T.w4a16_gemv(x2, prep.striped, bias)
    if path == "tc":
        from .tuned_w4a16 import lookup

        tuned = lookup(m, n, k) if _tuned_for(x2) else None
        cfg = tuned[1] if tuned is not None and tuned[0] == "tc" else None
        return TC.w4a16_tc(x2, prep.striped, bias, cfg)
    return T.w4a16_dequant_matmul(x2, prep.striped, bias)


@_w4a16_op.register_fake
def _(x2, packed, scales, zeros, group_size, bias, g_idx, path):
    return x2.new_empty((x2.shape[0], packed.shape[0]))


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                 path: str | None = None) -> torch.Tensor:
    """``x @ dequant(W).T + bias``; ``path`` forces a CUDA kernel (``gemv``/``gemv2``/``gemv3``/``tc``/``dequant``;
    benchmarks)."""
    in_features = x.shape[-1]
    if not _triton_ok(x) or in_features % 8 or group_size % 8:
        return reference.w4a16_linear(x, packed, scales, zeros, group_size, bias, g_idx)
    x2 = x.reshape(-1, in_features)
    path = path or w4a16_path(x2.shape[0], packed.shape[0], in_features, _tuned_for(x2))
    if path == "gemv" and x2.shape[0] > W4A16_GEMV_MAX_M:
        raise ValueError(f"the W4A16 GEMV serves at most {W4A16_GEMV_MAX_M} rows, got {x2.shape[0]}")
    if path == "gemv2" and x2.shape[0] > W4A16_GEMV2_MAX_M:
        raise ValueError(f"the W4A16 GEMV v2 serves at most {W4A16_GEMV2_MAX_M} rows, got {x2.shape[0]}")
    if path == "gemv3" and x2.shape[0] != 1:
        raise ValueError(f"the W4A16 GEMV v3 serves one row, got {x2.shape[0]}")
    bias = None if bias is None else bias.to(x.dtype)
    out = _w4a16_op(x2, packed, scales.to(x.dtype), zeros, group_size, bias, g_idx, path)
    return out.reshape(*x.shape[:-1], packed.shape[0])


def w4a16_tiled_config(m: int, n: int, k: int, group_size: int, x: torch.Tensor) -> tuple[str, dict | None]:
    """Path and tile for a weight held only in the TILED tensor-core layout: ``dequant`` where the table (or the
    default) says dequantize + cuBLAS, else the tensor-core kernel with the table's tile when that tile reads
    the TILED words (on Hopper), otherwise the Hopper default TILED tile. The GEMVs need layouts of their own,
    so a shape tuned to a GEMV at M = 1 runs the tensor-core kernel."""
    from . import triton_w4a16_tc as TC
    from .tuned_w4a16 import lookup
    from .w4a16_layout import DOT_TILE_ROWS

    path = w4a16_path(m, n, k, _tuned_for(x))
    if path == "dequant":
        return path, None
    tuned = lookup(m, n, k) if _tuned_for(x) else None
    if tuned is not None and tuned[0] == "tc" and tuned[1].get("TILED") \
            and tuned[1].get("TILE_ROWS", DOT_TILE_ROWS) == DOT_TILE_ROWS:
        return "tc", tuned[1]
    from .triton_w4a16 import _sm_count

    cfg = TC.tc_config(m, n, k, group_size, _sm_count(x.device), hopper=True)
    cfg["TMA"] = x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9   # TMA: Hopper on
    return "tc", cfg


@torch.library.custom_op("quantarena::w4a16_linear_tiled", mutates_args=())
def _w4a16_tiled_op(x2: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, out_features: int, bias: torch.Tensor | None,
                    prefetch: torch.Tensor | None = None, prefetch_n: int = 0, prefetch_group: int = 0,
                    prefetch_budget: int = 0, gated: bool = False, row_ss: torch.Tensor | None = None,
                    eps: float = 0.0) -> torch.Tensor:
    from . import triton_w4a16 as T, triton_w4a16_tc as TC

    w = T.StripedWeight.from_dot_tiled(tiled, out_features, scales, zeros, group_size)
    x2 = x2.contiguous()
    path, cfg = w4a16_tiled_config(x2.shape[0], out_features, w.in_features, group_size, x2)
    if path == "dequant":
        dense = TC.w4a16_dequantize_tiled(w, x2.dtype)
        out = torch.nn.functional.linear(x2, dense, bias) if row_ss is None else \
            _row_scaled(torch.nn.functional.linear(x2, dense), row_ss, eps, bias, w.in_features).to(x2.dtype)
        return reference.silu_mul_interleaved(out).to(x2.dtype) if gated else out
    plan = None
    if prefetch is not None and prefetch_budget > 0:
        plan = (prefetch, _next_tiled_plan(x2, prefetch, prefetch_n, prefetch_group, prefetch_budget))
    return TC.w4a16_tc(x2, w, bias, cfg, plan, gated, None if row_ss is None else (row_ss, eps))


def _row_scaled(out: torch.Tensor, row_ss: torch.Tensor, eps: float, bias: torch.Tensor | None,
                k: int) -> torch.Tensor:
    """``out`` [M, N] (no bias yet) times each row's rsqrt(sum / k + eps) of the squares in ``row_ss`` [tiles, M]
    (summed over the tiles), plus the bias, in float32: the tensor-core kernel's ROW_SS epilogue, in torch."""
    out = out.float() * torch.rsqrt(row_ss.sum(0) / k + eps)[:, None]
    return out if bias is None else out + bias.float()


def _next_tiled_plan(x2: torch.Tensor, tiled: torch.Tensor, n: int, group_size: int, budget: int) -> dict:
    """The L2 plan for the next linear (TILED words ``tiled`` of ``n`` outputs) at this call's M: its K slices are
    those of the tile it will run with."""
    from .l2_chain import tiled_plan

    k = tiled.shape[1] * 8
    path, cfg = w4a16_tiled_config(x2.shape[0], n, k, group_size, x2)
    return tiled_plan(tiled.shape[0], k, cfg["SPLIT_K"] if path == "tc" else 1, budget)


@_w4a16_tiled_op.register_fake
def _(x2, tiled, scales, zeros, group_size, out_features, bias, prefetch=None, prefetch_n=0, prefetch_group=0,
      prefetch_budget=0, gated=False, row_ss=None, eps=0.0):
    return x2.new_empty((x2.shape[0], out_features // 2 if gated else out_features))


@torch.library.custom_op("quantarena::w4a16_res_norm_linear_tiled", mutates_args=())
def _w4a16_res_norm_tiled_op(x2: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                             tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                             out_features: int, bias: torch.Tensor | None, prefetch: torch.Tensor | None = None,
                             prefetch_n: int = 0, prefetch_group: int = 0,
                             prefetch_budget: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton_w4a16 as T, triton_w4a16_tc as TC

    w = T.StripedWeight.from_dot_tiled(tiled, out_features, scales, zeros, group_size)
    x2, residual = x2.contiguous(), residual.contiguous()
    path, cfg = w4a16_tiled_config(x2.shape[0], out_features, w.in_features, group_size, x2)
    if path == "dequant":   # the same three outputs from the separate ops (one column tile of squares)
        x_new = residual + torch.nn.functional.linear(x2, TC.w4a16_dequantize_tiled(w, x2.dtype), bias)
        xf = x_new.float()
        return (xf * norm_weight.float()).to(x2.dtype), x_new, xf.pow(2).sum(-1)[None, :]
    plan = None
    if prefetch is not None and prefetch_budget > 0:
        plan = (prefetch, _next_tiled_plan(x2, prefetch, prefetch_n, prefetch_group, prefetch_budget))
    return TC.w4a16_tc_res_norm(x2, residual, norm_weight, w, bias, cfg, plan)


@_w4a16_res_norm_tiled_op.register_fake
def _(x2, residual, norm_weight, tiled, scales, zeros, group_size, out_features, bias, prefetch=None, prefetch_n=0,
      prefetch_group=0, prefetch_budget=0):
    m = x2.shape[0]
    path, cfg = w4a16_tiled_config(m, out_features, tiled.shape[1] * 8, group_size, x2)
    tiles = 1 if path == "dequant" else -(-out_features // cfg["BLOCK_N"])
    y = x2.new_empty((m, out_features))
    return y, torch.empty_like(y), x2.new_empty((tiles, m), dtype=torch.float32)


def w4a16_res_norm_linear_tiled(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                                tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                                group_size: int, out_features: int, bias: torch.Tensor | None = None,
                                prefetch: tuple[torch.Tensor, int, int, int] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The W4A16 linear of :func:`w4a16_linear_tiled` whose output is a residual delta, with the first half of the
    next RMSNorm: returns ``(x * norm_weight, x, ss)`` for ``x = residual + linear(x)`` (x bit for bit as the
    separate ops round it) and ``ss`` float32 [tiles, M], the squares of x summed per column tile. The next linear
    finishes the norm: ``w4a16_linear_tiled(y, ..., row_ss=(ss, eps))``. On CUDA one launch
    (:func:`.triton_w4a16_tc.w4a16_tc_res_norm`); elsewhere the same three outputs from the reference ops."""
    in_features = tiled.shape[1] * 8
    if residual.shape != (*x.shape[:-1], out_features) or norm_weight.shape != (out_features,):
        raise ValueError(f"the residual must be {(*x.shape[:-1], out_features)} and the norm weight "
                         f"({out_features},), got {tuple(residual.shape)} and {tuple(norm_weight.shape)}")
    if not _triton_ok(x) or x.dtype != torch.bfloat16 or residual.dtype != x.dtype:
        x_new = residual + w4a16_linear_tiled(x, tiled, scales, zeros, group_size, out_features, bias, prefetch)
        xf = x_new.float()
        return (xf * norm_weight.float()).to(x.dtype), x_new, xf.pow(2).sum(-1).reshape(1, -1)
    lead = x.shape[:-1]
    bias = None if bias is None else bias.to(torch.bfloat16)
    y, x_new, ss = _w4a16_res_norm_tiled_op(x.reshape(-1, in_features), residual.reshape(-1, out_features),
                                            norm_weight, tiled, scales.to(torch.bfloat16), zeros, group_size,
                                            out_features, bias, *(prefetch or (None, 0, 0, 0)))
    return y.reshape(*lead, out_features), x_new.reshape(*lead, out_features), ss


def w4a16_linear_tiled(x: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       group_size: int, out_features: int, bias: torch.Tensor | None = None,
                       prefetch: tuple[torch.Tensor, int, int, int] | None = None,
                       gated: bool = False, row_ss: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for a weight held only in the tensor-core kernel's TILED layout
    (``w4a16_layout.dot_tiled_words``; K and the group size multiples of 128). On CUDA the tensor-core kernel
    or the tiled dequantize + cuBLAS, in bf16 (fp16 activations are computed in bf16 and cast back: the
    layout's PTX makes bf16); elsewhere the reference on the canonical codes rebuilt for the call.
    ``prefetch``: the next linear's TILED words, out_features, group size and an L2 byte budget (see
    :mod:`.l2_chain`); the tensor-core kernel asks the L2 for them once done. It changes no value.
    ``gated``: the rows interleave an MLP's gate and up projections (``reference.interleave_gate_up``); returns
    ``silu(gate) * up`` [..., out_features / 2], in the tensor-core kernel's epilogue (float32, one rounding).
    ``row_ss``: ``(ss, eps)`` from :func:`w4a16_res_norm_linear_tiled`, whose output x is; each row's sums are
    scaled by rsqrt(mean + eps) of those squares before the bias (the second half of the RMSNorm)."""
    in_features = tiled.shape[1] * 8
    n_out = out_features // 2 if gated else out_features
    if not _triton_ok(x):
        from .w4a16_layout import canonical_from_dot_tiled

        packed = canonical_from_dot_tiled(tiled, out_features)
        if row_ss is None:
            out = reference.w4a16_linear(x, packed, scales, zeros, group_size, bias)
        else:
            out = reference.w4a16_linear(x.reshape(-1, in_features).float(), packed, scales, zeros, group_size)
            out = _row_scaled(out, row_ss[0], row_ss[1], bias, in_features).to(x.dtype)
            out = out.reshape(*x.shape[:-1], out_features)
        return reference.silu_mul_interleaved(out).to(x.dtype) if gated else out
    x2 = x.reshape(-1, in_features).to(torch.bfloat16)
    bias = None if bias is None else bias.to(torch.bfloat16)
    out = _w4a16_tiled_op(x2, tiled, scales.to(torch.bfloat16), zeros, group_size, out_features, bias,
                          *(prefetch or (None, 0, 0, 0)), gated, *((None, 0.0) if row_ss is None else row_ss))
    return out.to(x.dtype).reshape(*x.shape[:-1], n_out)


@torch.library.custom_op("quantarena::w4a16_norm_linear_tiled", mutates_args=())
def _w4a16_norm_tiled_op(x2: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                         tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                         out_features: int, bias: torch.Tensor | None, prefetch: torch.Tensor | None = None,
                         prefetch_n: int = 0, prefetch_group: int = 0, prefetch_budget: int = 0,
                         gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_w4a16 as T, triton_w4a16_tc as TC

    w = T.StripedWeight.from_dot_tiled(tiled, out_features, scales, zeros, group_size)
    x2 = x2.contiguous()
    delta = None if delta is None else delta.contiguous()
    path, cfg = w4a16_tiled_config(x2.shape[0], out_features, w.in_features, group_size, x2)
    if path == "dequant":   # a prefill's M: the separate ops (the runner fuses these with inductor instead)
        y, x_new = reference.add_rms_norm(x2, delta, norm_weight, eps)
        out = torch.nn.functional.linear(y, TC.w4a16_dequantize_tiled(w, x2.dtype), bias)
        out = reference.silu_mul_interleaved(out).to(x2.dtype) if gated else out
    else:
        plan = None
        if prefetch is not None and prefetch_budget > 0:
            plan = (prefetch, _next_tiled_plan(x2, prefetch, prefetch_n, prefetch_group, prefetch_budget))
        out, x_new = TC.w4a16_tc_norm(x2, delta, norm_weight, eps, w, bias, cfg, plan, gated)
    return out, (x2.new_empty(0) if delta is None else x_new)   # an op's output may not alias its input


@_w4a16_norm_tiled_op.register_fake
def _(x2, delta, norm_weight, eps, tiled, scales, zeros, group_size, out_features, bias, prefetch=None,
      prefetch_n=0, prefetch_group=0, prefetch_budget=0, gated=False):
    out = x2.new_empty((x2.shape[0], out_features // 2 if gated else out_features))
    return out, (x2.new_empty(0) if delta is None else torch.empty_like(x2))


NORM_FOLD_MAX_STEPS = 4   # K steps per program up to which folding the norm into the kernel pays (H100, below)


def w4a16_norm_fold_pays(m: int, n: int, k: int, group_size: int, x: torch.Tensor) -> bool:
    """Whether :func:`w4a16_norm_linear_tiled` (one launch) beats a separate add + RMSNorm kernel and the linear at
    M rows of an N x K weight: the tensor-core path with at most ``NORM_FOLD_MAX_STEPS`` K steps per program. Each
    step of a folded launch rounds ``x * norm_weight`` into the dot operand, a round trip through shared memory
    that a short loop hides and a long one pays for. On the H100 (``h100-norm-fold-kernel.json``) the 8B q/k/v
    took 14.1 us against 16.2 for the two launches at M = 1 (4 K steps per program), 15.4 against 15.3 at M = 4
    (8 steps; ``h100-norm-fold-kernel-first.json``, before the squares were summed once), and the gate/up and
    lm_head tiles (32 steps, no split) 37.3 and 117.3 against 32.1 and 110.2. In decode steps
    (``h100-norm-fold.json``) the q/k/v fold took 2.5% off the step at batch 1 and added 1% at batch 4."""
    path, cfg = w4a16_tiled_config(m, n, k, group_size, x)
    return path == "tc" and k // cfg["BLOCK_K"] <= NORM_FOLD_MAX_STEPS * cfg["SPLIT_K"]


def w4a16_norm_linear_tiled(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                            tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                            out_features: int, bias: torch.Tensor | None = None,
                            prefetch: tuple[torch.Tensor, int, int, int] | None = None,
                            gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's ``x + delta`` (x itself without ``delta``), its RMSNorm (``norm_weight``, ``eps``) and
    the W4A16 linear of :func:`w4a16_linear_tiled` on it (``prefetch``, ``gated`` as there). Returns
    ``(out, x + delta)``. On CUDA at the tensor-core kernel's M one launch (:func:`.triton_w4a16_tc.w4a16_tc_norm`:
    the norm's rsqrt scales the float32 sums, so y's 16-bit roundings fall elsewhere than in the separate ops);
    elsewhere the reference ops."""
    in_features = tiled.shape[1] * 8
    if x.shape[-1] != in_features or norm_weight.shape != (in_features,):
        raise ValueError(f"the input and norm weight must be {in_features} wide, got {x.shape[-1]} and "
                         f"{tuple(norm_weight.shape)}")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"the residual delta must have the input's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    if not _triton_ok(x) or x.dtype != torch.bfloat16 or (delta is not None and delta.dtype != x.dtype):
        y, x_new = reference.add_rms_norm(x, delta, norm_weight, eps)
        return w4a16_linear_tiled(y, tiled, scales, zeros, group_size, out_features, bias, prefetch, gated), x_new
    n_out = out_features // 2 if gated else out_features
    x2 = x.reshape(-1, in_features)
    d2 = None if delta is None else delta.reshape(-1, in_features)
    bias = None if bias is None else bias.to(torch.bfloat16)
    out, x_new = _w4a16_norm_tiled_op(x2, d2, norm_weight, float(eps), tiled, scales.to(torch.bfloat16), zeros,
                                      group_size, out_features, bias, *(prefetch or (None, 0, 0, 0)), gated)
    return out.reshape(*x.shape[:-1], n_out), (x if delta is None else x_new.reshape(x.shape))


# ----------------------------------------------------------------------------- W8A8 INT8

def _a8w8_choice(op: str, m: int, n: int, k: int, tuned_table: bool = True) -> tuple[str, dict | None]:
    """The GEMM kernel (and tile) measured fastest for an int8 (``w8a8``) or ``fp8`` linear of this shape:
    from :mod:`.tuned_w8a8` where it has the shape, else the tiled int8 kernel / ``torch._scaled_mm``.

    Kernels: ``std`` (tiled int8), ``scaled_mm`` (fp8, cuBLASLt), ``swap``, ``tma``, and for M <= 4 ``gemv``
    (act_quant, then :func:`.triton_a8w8_gemv.a8w8_gemv`) or ``gemv_q`` (one launch,
    :func:`.triton_a8w8_gemv.a8w8_gemv_quant`: the GEMV quantizes the activations itself; the same tile
    serves the plain GEMV where the activations come quantized, under ``torch.compile`` and for gated inputs)."""
    from .tuned_w8a8 import lookup

    tuned = lookup(op, m, n, k) if tuned_table else None
    if tuned is not None:
        return tuned
    return ("std" if op == "w8a8" else "scaled_mm"), None


def _a8w8_gemm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Quantized activations (int8 or fp8 codes, float32 scales [M, 1]) x the weight codes: the GEMM kernel
    the dispatch table names for the shape (``gemv`` / ``gemv_q``: the CUDA-core GEMV for M <= 4, where it
    takes the shape; otherwise, and for a kernel that cannot take the shape, the defaults)."""
    from .triton_a8w8_gemv import a8w8_gemv, gemv_supported
    from .triton_w8a8 import a8w8_swap_gemm, a8w8_tma_gemm, int8_gemm, tma_supported

    fp8 = xq.dtype == torch.float8_e4m3fn
    kernel, cfg = _a8w8_choice("fp8" if fp8 else "w8a8", xq.shape[0], weight.shape[0], weight.shape[1],
                               _tuned_for(xq))
    if kernel in ("gemv", "gemv_q") and gemv_supported(xq, weight):
        return a8w8_gemv(xq, xs, weight, weight_scale, bias, out_dtype, cfg)
    if kernel == "swap":
        return a8w8_swap_gemm(xq, xs, weight, weight_scale, bias, out_dtype, cfg)
    if kernel == "tma" and tma_supported(xq, weight):
        return a8w8_tma_gemm(xq, xs, weight, weight_scale, bias, out_dtype, cfg)
    if not fp8:
        return int8_gemm(xq, xs, weight, weight_scale, bias, out_dtype, cfg if kernel == "std" else None)
    # weight [N, K] row-major: .t() is the column-major [K, N] operand cuBLASLt wants; rowwise scales
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.reshape(1, -1),
                            bias=bias, out_dtype=out_dtype)


def _gemv_q(op: str, x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
            smooth: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """The linear in one launch, the GEMV quantizing x2 itself, where the dispatch table names ``gemv_q`` for
    the shape and the GEMV takes it (M <= 4, K % 4 == 0); else None (quantize, then :func:`_a8w8_gemm`)."""
    from .triton_a8w8_gemv import a8w8_gemv_quant, gemv_supported

    kernel, cfg = _a8w8_choice(op, x2.shape[0], weight.shape[0], weight.shape[1], _tuned_for(x2))
    if kernel != "gemv_q" or not gemv_supported(x2, weight):
        return None
    return a8w8_gemv_quant(x2, weight, weight_scale, bias, smooth, input_scale, cfg)


@torch.library.custom_op("quantarena::a8w8_gemm", mutates_args=())
def _a8w8_gemm_op(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _a8w8_gemm(xq.contiguous(), xs, weight, weight_scale, bias, out_dtype)


@_a8w8_gemm_op.register_fake
def _(xq, xs, weight, weight_scale, bias, out_dtype):
    return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("quantarena::w8a8_linear", mutates_args=())
def _w8a8_op(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
             smooth: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    from .triton_act_quant import act_quant

    out = _gemv_q("w8a8", x2, weight, weight_scale, bias, smooth, input_scale)
    if out is not None:
        return out
    xq, xs = act_quant(x2.contiguous(), fp8=False, input_scale=input_scale, smooth=smooth)
    return _a8w8_gemm(xq, xs, weight, weight_scale, bias, x2.dtype)


@_w8a8_op.register_fake
def _(x2, weight, weight_scale, input_scale, smooth, bias):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, hadamard: torch.Tensor | None = None) -> torch.Tensor:
    """``hadamard``: an online input rotation, a torch matmul before the activation quantization (no fused kernel)."""
    if hadamard is not None:
        x, smooth = reference.rotate_input(x, smooth, hadamard), None
    if not _triton_ok(x):
        return reference.w8a8_linear(x, weight, weight_scale, input_scale, smooth, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    smooth = None if smooth is None else smooth.float()
    bias = None if bias is None else bias.to(x.dtype)
    if torch.compiler.is_compiling():  # quantize in torch ops: inductor fuses them into the producer's kernel
        xq, xs = reference.act_quant_int8(x2, input_scale, smooth)
        out = _a8w8_gemm_op(xq, xs.contiguous(), weight, weight_scale.float(), bias, x.dtype)
    else:
        out = _w8a8_op(x2, weight, weight_scale.float(), input_scale, smooth, bias)
    return out.reshape(*shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- FP8

@torch.library.custom_op("quantarena::fp8_linear", mutates_args=())
def _fp8_op(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    from .triton_act_quant import act_quant

    out = _gemv_q("fp8", x2, weight, weight_scale, bias)
    if out is not None:
        return out
    xq, xs = act_quant(x2.contiguous(), fp8=True)
    return _a8w8_gemm(xq, xs, weight, weight_scale, bias, x2.dtype)


@_fp8_op.register_fake
def _(x2, weight, weight_scale, bias):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def _fp8_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not _triton_ok(x) or x.dtype != torch.bfloat16:
        return False  # rowwise-scaled _scaled_mm writes bf16 only
    major, _ = torch.cuda.get_device_capability(x.device)
    return major >= 9 and weight.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    if not _fp8_supported(x, weight):
        return reference.fp8_linear(x, weight, weight_scale, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    bias = None if bias is None else bias.to(x.dtype)
    if torch.compiler.is_compiling():  # as in w8a8_linear: inductor fuses the quantization into the producer
        xq, xs = reference.act_quant_fp8(x2)
        out = _a8w8_gemm_op(xq, xs.contiguous(), weight, weight_scale.float(), bias, x.dtype)
    else:
        out = _fp8_op(x2, weight, weight_scale.float(), bias)
    return out.reshape(*shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- gated (SiLU-mul) inputs

@torch.library.custom_op("quantarena::a8w8_silu_mul_linear", mutates_args=())
def _a8w8_silu_mul_op(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: torch.Tensor | None, smooth: torch.Tensor | None, bias: torch.Tensor | None,
                      fp8: bool) -> torch.Tensor:
    from .triton_act_quant import act_quant

    xq, xs = act_quant(gate_up.contiguous(), fp8=fp8, input_scale=input_scale, smooth=smooth, gated=True)
    return _a8w8_gemm(xq, xs, weight, weight_scale, bias, gate_up.dtype)


@_a8w8_silu_mul_op.register_fake
def _(gate_up, weight, weight_scale, input_scale, smooth, bias, fp8):
    return gate_up.new_empty((gate_up.shape[0], weight.shape[0]))


def w8a8_silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``w8a8_linear(silu(gate) * up)`` for ``gate_up = [gate | up]`` (last dim 2 x in_features): an MLP's
    down projection with the SiLU-mul computed (in float32) inside the activation-quant kernel, one launch
    where inductor makes three. ``reference.w8a8_silu_mul_linear`` is the same arithmetic."""
    if not _triton_ok(gate_up):
        return reference.w8a8_silu_mul_linear(gate_up, weight, weight_scale, input_scale, smooth, bias)
    shape = gate_up.shape
    smooth = None if smooth is None else smooth.float()
    bias = None if bias is None else bias.to(gate_up.dtype)
    out = _a8w8_silu_mul_op(gate_up.reshape(-1, shape[-1]), weight, weight_scale.float(), input_scale, smooth, bias,
                            False)
    return out.reshape(*shape[:-1], weight.shape[0])


def fp8_silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`w8a8_silu_mul_linear` for the FP8 scheme."""
    if not _fp8_supported(gate_up, weight):
        return reference.fp8_silu_mul_linear(gate_up, weight, weight_scale, bias)
    shape = gate_up.shape
    out = _a8w8_silu_mul_op(gate_up.reshape(-1, shape[-1]), weight, weight_scale.float(), None, None,
                            None if bias is None else bias.to(gate_up.dtype), True)
    return out.reshape(*shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- decode attention

@torch.library.custom_op("quantarena::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                         scale: float) -> torch.Tensor:
    from .triton_decode_attention import decode_attention as triton_decode_attention

    return triton_decode_attention(q, k_cache, v_cache, length, scale)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, length, scale):
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One decode step's attention: q [B, Hq, D] over positions ``< length`` (1-element device int tensor) of
    the static caches k/v [B, Hkv, L, D]; the split-KV Triton kernels on CUDA, the reference elsewhere."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not _triton_ok(q):
        return reference.decode_attention(q, k_cache, v_cache, length, scale)
    from .triton_decode_attention import unsupported_reason

    if unsupported_reason(q, k_cache, v_cache) is not None:
        return reference.decode_attention(q, k_cache, v_cache, length, scale)
    return _decode_attention_op(q, k_cache, v_cache, length, scale)


@torch.library.custom_op("quantarena::decode_rope_attention", mutates_args=("k_cache", "v_cache"))
def _decode_rope_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, length: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    if qkv.device.type != "cuda":  # the op is also traced and run on CPU (tests of the compiled graph)
        return reference.decode_rope_attention(qkv, cos, sin, k_cache, v_cache, length, heads, scale)
    from .triton_decode_attention import decode_rope_attention as triton_decode_rope_attention

    return triton_decode_rope_attention(qkv, cos, sin, k_cache, v_cache, length, heads, scale)


@_decode_rope_attention_op.register_fake
def _(qkv, cos, sin, k_cache, v_cache, length, heads, scale):
    return qkv.new_empty((qkv.shape[0], heads, k_cache.shape[-1]))


def decode_rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, length: torch.Tensor, heads: int,
                          scale: float | None = None) -> torch.Tensor:
    """One decode step from the fused q/k/v row ``qkv`` [B, (Hq + 2 Hkv) D]: RoPE on q and k with the new
    position's ``cos``/``sin`` rows [D], k and v written at position ``length - 1`` of the caches [B, Hkv, L, D]
    (in place), attention over positions ``< length``; returns [B, Hq, D]. One Triton launch on CUDA, the
    reference elsewhere."""
    scale = k_cache.shape[-1] ** -0.5 if scale is None else float(scale)
    if not _triton_ok(qkv):
        return reference.decode_rope_attention(qkv, cos, sin, k_cache, v_cache, length, heads, scale)
    from .triton_decode_attention import rope_unsupported_reason

    if rope_unsupported_reason(qkv, cos, sin, k_cache, v_cache, heads) is not None:
        return reference.decode_rope_attention(qkv, cos, sin, k_cache, v_cache, length, heads, scale)
    return _decode_rope_attention_op(qkv, cos, sin, k_cache, v_cache, length, heads, scale)
