"""Reference (torch) kernels: the ground truth every fast kernel is tested against.

They run on any device. Integer GEMMs accumulate exactly in int32 (``torch._int_mm``
where the shape allows, else float64, which is exact for int8 products up to K = 2^37).
Outputs are computed in float32 and cast to the activation dtype.
"""
from __future__ import annotations

import torch

from .. import primitives as P
from ..algorithms.rotation import rotate


def w4a16_dequant(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  group_size: int, in_features: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical packed int4 ``[out, in/8]`` -> float32 weight ``[out, in]``.

    ``g_idx`` (act-order): input column ``k`` uses group ``g_idx[k]`` instead of ``k // group_size``.
    """
    q = P.unpack_int4(packed, in_features).float()  # [out, in]
    if g_idx is None:
        return P.int4_dequantize(q, scales, zeros, group_size)
    s = scales.float()[:, g_idx.long()]  # [out, in]
    z = zeros.float()[:, g_idx.long()] if zeros is not None else 0.0
    return (q - z) * s


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W).T + bias``; x: [..., in] -> [..., out]."""
    in_features = x.shape[-1]
    w = w4a16_dequant(packed, scales, zeros, group_size, in_features, g_idx)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Llama's RMSNorm: ``x * rsqrt(mean(x^2) + eps)`` in float32, rounded to x's dtype, times ``weight``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's input: ``x + delta`` (in x's dtype; x itself without delta) and its RMSNorm.
    Returns ``(normed, x + delta)``."""
    if delta is not None:
        x = x + delta
    return rms_norm(x, weight, eps), x


def act_quant_int8(x: torch.Tensor, input_scale: torch.Tensor | None = None,
                   smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation quantization: x [M, K] -> (int8 [M, K], float32 scale [M, 1]).

    Dynamic per-token absmax unless a static per-tensor ``input_scale`` is given.
    ``smooth`` [K]: SmoothQuant divisor applied before rounding (x / smooth).
    """
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    if input_scale is None:
        scale = P.int8_scale(xf, "token")
    else:
        scale = input_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    return P.int8_quantize(xf, scale), scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a [M, K] @ b [N, K].T`` for int8 inputs."""
    m, k = a.shape
    n = b.shape[0]
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        try:
            return torch._int_mm(a, b.t())
        except RuntimeError:
            pass
    return (a.double() @ b.double().t()).to(torch.int32)


def rotate_input(x: torch.Tensor, smooth: torch.Tensor | None, hadamard: torch.Tensor) -> torch.Tensor:
    """The online rotation of a W8A8 input: ``(x / smooth) R`` in float32, returned in ``x.dtype`` (what the
    activation quantization then sees; a serving engine rotates in the activation dtype too)."""
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    return rotate(xf, hadamard).to(x.dtype)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, hadamard: torch.Tensor | None = None) -> torch.Tensor:
    """INT8 W8A8: per-channel int8 weight [N, K] (scale [N, 1]) x int8 activations -> x.dtype.

    ``hadamard`` [b, b] (+-1): the weight holds ``W R`` and the input is rotated online (after ``smooth``)."""
    if hadamard is not None:
        x, smooth = rotate_input(x, smooth, hadamard), None
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = act_quant_int8(x2, input_scale, smooth)
    acc = int8_matmul(xq, weight)  # [M, N] int32
    out = acc.float() * xs * weight_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def act_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8 e4m3: x [M, K] -> (fp8 [M, K], float32 scale [M, 1])."""
    return P.quantize_fp8(x, "token")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8: per-row e4m3 weight [N, K] x dynamic per-token e4m3 activations, float32 accumulation."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = act_quant_fp8(x2)
    out = (xq.float() @ weight.float().t()) * xs * weight_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float32 for gate_up = [gate | up] along the last dim (what the gated
    activation-quant kernel quantizes: no rounding to the activation dtype in between)."""
    gate, up = gate_up.float().chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


def silu_mul_interleaved(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float32 for ``h`` whose last dim interleaves gate and up (2j gate j, 2j+1 up j): what a
    gated W4A16 linear (rows interleaved, ``interleave_gate_up``) returns, before its one rounding."""
    if h.shape[-1] % 2:
        raise ValueError(f"a gated W4A16 linear needs an even number of outputs (gate and up rows), got {h.shape[-1]}")
    gate, up = h.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.nn.functional.silu(gate) * up


def interleave_gate_up(w: torch.Tensor) -> torch.Tensor:
    """Rows ``[gate | up]`` (2I x ...) -> interleaved (row 2j gate j, 2j+1 up j), for a gated linear."""
    gate, up = w.chunk(2, 0)
    return torch.stack((gate, up), 1).flatten(0, 1)


def w8a8_silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    return w8a8_linear(silu_mul(gate_up), weight, weight_scale, input_scale, smooth, bias).to(gate_up.dtype)


def fp8_silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    return fp8_linear(silu_mul(gate_up), weight, weight_scale, bias).to(gate_up.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One decode step's attention: q [B, Hq, D] over cache positions ``< length`` of k/v [B, Hkv, L, D].

    Each KV head serves ``Hq / Hkv`` consecutive query heads (GQA). Float32 math, returned in q's dtype.
    Positions at or beyond ``length`` are masked (values there, NaN included, do not matter); no host sync."""
    b, hq, d = q.shape
    group = hq // k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    valid = torch.arange(k_cache.shape[2], device=q.device) < length.reshape(())  # [L]
    k = k_cache.float().repeat_interleave(group, dim=1)                           # [B, Hq, L, D]
    v = v_cache.float().repeat_interleave(group, dim=1).masked_fill(~valid[:, None], 0.0)
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k) * scale                  # [B, Hq, L]
    probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhl,bhld->bhd", probs, v).to(q.dtype)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half convention, in float32: ``x * cos + cat(-x2, x1) * sin`` over the last dim."""
    x = x.float()
    half = x.shape[-1] // 2
    return x * cos.float() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin.float()


def decode_rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, length: torch.Tensor, heads: int,
                          scale: float | None = None) -> torch.Tensor:
    """One decode step from the fused q/k/v row: qkv [B, (Hq + 2 Hkv) D] -> RoPE on q and k (cos/sin [D], float32,
    rounded once to the cache dtype), k and v written at position ``length - 1`` of the caches [B, Hkv, L, D]
    (in place), then :func:`decode_attention` over positions ``< length`` (``length`` in 1 .. L)."""
    b = qkv.shape[0]
    hkv, max_len, d = k_cache.shape[1:]
    q, k, v = qkv.split([heads * d, hkv * d, hkv * d], dim=-1)
    q = rope_rotate(q.reshape(b, heads, d), cos, sin).to(k_cache.dtype)
    k = rope_rotate(k.reshape(b, hkv, d), cos, sin).to(k_cache.dtype)
    pos = (length.reshape(1).long() - 1).clamp(0, max_len - 1).to(k_cache.device)
    k_cache.index_copy_(2, pos, k.unsqueeze(2))
    v_cache.index_copy_(2, pos, v.reshape(b, hkv, 1, d).to(v_cache.dtype))
    return decode_attention(q, k_cache, v_cache, length, scale)
