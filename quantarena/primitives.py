"""Quantization primitives: qparams, quantize, dequantize, int4 packing.

Conventions (shared by every algorithm, kernel and export in quantarena):

* int4 group-wise weights ``w: [out, in]``: codes ``q`` are int8 in ``[-8, 7]``;
  ``scales`` and ``zeros`` are ``[out, in // group_size]``; dequant is
  ``(q - zero) * scale``. Symmetric: ``scale = absmax / 7.5``, ``zero = 0``.
  Asymmetric: ``scale = (max - min) / 15``, ``zero = round(-min / scale) - 8``
  (so ``zero`` is in ``[-8, 7]`` too, as compressed-tensors stores it).
  int4 scales are rounded to bfloat16 *before* the codes are computed, so the
  codes are exactly consistent with the bf16 scales that kernels and exports use.
* int4 packing is the compressed-tensors ``pack-quantized`` layout: int32 words,
  eight consecutive input elements per word, element ``j`` in bits ``4j..4j+3``,
  each stored as ``q + 8``. Zero points pack the same way along the output dim.
* int8: symmetric, ``scale = absmax / 127``, codes clamped to ``[-128, 127]``.
* fp8 e4m3: ``scale = absmax / 448``, codes are ``torch.float8_e4m3fn``.

Zero ranges (all-zero rows, never-activated channels) get a tiny positive scale so
nothing divides by zero and the codes are 0.
"""
from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7
INT8_MIN, INT8_MAX = -128, 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-12  # floor for absmax so an all-zero range gets a finite, positive scale


class QuantizationError(ValueError):
    """Input that cannot be quantized as asked (bad group size, NaN/Inf, ...)."""



def div_exact(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor``, correctly rounded on every device. (CUDA PyTorch turns division by a Python number
    into a multiplication by its reciprocal, one ulp off at times; a scale one ulp off flips codes at
    rounding ties, so the GPU reference would not match the CPU reference or our kernels bit for bit.)"""
    return x / torch.tensor(divisor, dtype=x.dtype, device=x.device)

def check_finite(w: torch.Tensor, name: str = "tensor") -> None:
    """Raise QuantizationError if ``w`` holds NaN or Inf."""
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise QuantizationError(f"{name} contains {bad} NaN/Inf values; fix the checkpoint before quantizing")


def check_group_size(in_features: int, group_size: int, name: str = "layer") -> None:
    """Raise QuantizationError unless ``group_size`` divides ``in_features`` (-1 means per-channel)."""
    if group_size == -1:
        return
    if group_size <= 0 or in_features % group_size != 0:
        raise QuantizationError(
            f"group size {group_size} does not divide the {in_features} input features of {name}; "
            f"choose a divisor such as 32, 64 or 128 (or -1 for per-channel)")


# ----------------------------------------------------------------------------- int4

def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    # w: [out, in] -> [out, in // g, g]
    out_features, in_features = w.shape
    group_size = in_features if group_size == -1 else group_size  # -1: one group per row (per-channel)
    check_group_size(in_features, group_size)
    return w.reshape(out_features, in_features // group_size, group_size)


def int4_qparams(w: torch.Tensor, group_size: int, symmetric: bool = True,
                 wmin: torch.Tensor | None = None, wmax: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (bf16-rounded, float32 dtype) and zero points (int8) ``[out, in // g]``.

    ``wmin``/``wmax`` override the per-group range (used by clipping searches).
    """
    wg = _grouped(w.float(), group_size)
    if wmin is None:
        wmin = wg.amin(dim=-1)
    if wmax is None:
        wmax = wg.amax(dim=-1)
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs()).clamp(min=_TINY)
        scales = div_exact(absmax, 7.5).to(torch.bfloat16).float()
        zeros = torch.zeros_like(scales, dtype=torch.int8)
    else:
        wmin = wmin.clamp(max=0.0)
        wmax = wmax.clamp(min=0.0)
        scales = div_exact((wmax - wmin).clamp(min=_TINY), 15.0).to(torch.bfloat16).float()
        zeros = (torch.round(-wmin / scales) + INT4_MIN).clamp(INT4_MIN, INT4_MAX).to(torch.int8)
    return scales, zeros


def int4_quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes int8 ``[out, in]`` in ``[-8, 7]`` for given group ``scales``/``zeros``."""
    wg = _grouped(w.float(), group_size)
    q = torch.round(wg / scales.float().unsqueeze(-1)) + zeros.float().unsqueeze(-1)
    return q.clamp(INT4_MIN, INT4_MAX).to(torch.int8).reshape(w.shape)


def int4_dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` as ``dtype`` ``[out, in]``."""
    qg = _grouped(q.float(), group_size)
    if zeros is not None:
        qg = qg - zeros.float().unsqueeze(-1)
    return (qg * scales.float().unsqueeze(-1)).reshape(q.shape).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4: ``(codes [out,in] int8, scales [out,in/g], zeros [out,in/g] int8)``."""
    check_finite(w, "weight")
    scales, zeros = int4_qparams(w, group_size, symmetric)
    return int4_quantize(w, scales, zeros, group_size), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes ``[rows, cols]`` (cols % 8 == 0) into int32 ``[rows, cols // 8]`` along the last dim."""
    rows, cols = q.shape
    if cols % 8:
        raise QuantizationError(f"cannot pack {cols} int4 columns: need a multiple of 8")
    u = (q.to(torch.int32) - INT4_MIN).reshape(rows, cols // 8, 8)  # stored as q + 8, in [0, 15]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return torch.sum(u << shifts, dim=-1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[rows, cols // 8]`` -> int8 codes ``[rows, cols]``."""
    rows, words = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF
    q = (u + INT4_MIN).to(torch.int8).reshape(rows, words * 8)
    return q if cols is None else q[:, :cols]


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Pack ``[rows, cols]`` along the first dim (compressed-tensors zero points): int32 ``[rows // 8, cols]``."""
    return pack_int4(q.t().contiguous()).t().contiguous()


def unpack_int4_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_rows`."""
    return unpack_int4(packed.t().contiguous(), rows).t().contiguous()


# ----------------------------------------------------------------------------- int8

_AXES = {"channel": -1, "token": -1, "tensor": None}


def int8_scale(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """Symmetric int8 scale: per ``channel`` (weight rows) / ``token`` (activation rows) -> ``[rows, 1]``;
    per ``tensor`` -> scalar. float32."""
    if granularity not in _AXES:
        raise QuantizationError(f"unknown int8 granularity {granularity!r}; use channel, token or tensor")
    xf = x.float()
    if granularity == "tensor":
        absmax = xf.abs().amax()
    else:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    return div_exact(absmax.clamp(min=_TINY), INT8_MAX)


def int8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / scale), -128, 127)`` as int8."""
    return torch.round(x.float() / scale).clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def quantize_int8(x: torch.Tensor, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8, scale float32)`` with the scale shaped for broadcasting against ``x``."""
    scale = int8_scale(x, granularity)
    return int8_quantize(x, scale), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


# ----------------------------------------------------------------------------- fp8

def fp8_scale(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """fp8 e4m3 scale per ``tensor`` (scalar) or per ``row``/``token``/``channel`` (``[rows, 1]``), float32."""
    xf = x.float()
    if granularity == "tensor":
        absmax = xf.abs().amax()
    elif granularity in ("row", "token", "channel"):
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        raise QuantizationError(f"unknown fp8 granularity {granularity!r}; use tensor or row")
    return div_exact(absmax.clamp(min=_TINY), FP8_MAX)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes float8_e4m3fn, scale float32)``."""
    scale = fp8_scale(x, granularity)
    return fp8_quantize(x, scale), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)
