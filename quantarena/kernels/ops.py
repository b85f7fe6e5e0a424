"""Kernel dispatch: one function per quantized linear, chosen by device (and, on CUDA, by batch size).

CPU (and any device without a fast path) runs :mod:`quantarena.kernels.reference`.
"""
from __future__ import annotations

import torch

from . import reference


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    return reference.w4a16_linear(x, packed, scales, zeros, group_size, bias, g_idx)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    return reference.w8a8_linear(x, weight, weight_scale, input_scale, smooth, bias)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    return reference.fp8_linear(x, weight, weight_scale, bias)
