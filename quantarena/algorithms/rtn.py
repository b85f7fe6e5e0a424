"""Round-to-nearest: the baseline every calibrated algorithm is measured against, and the rounding
step AWQ and SmoothQuant use when GPTQ is not asked for.

Pure tensor functions on a weight ``W: [out, in]``; conventions are those of :mod:`quantarena.primitives`.
"""
from __future__ import annotations

import torch

from .. import primitives as P


def rtn_int4(W: torch.Tensor, group_size: int = 128, symmetric: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in], scales [out, in/g], zeros int8 [out, in/g])``."""
    return P.quantize_int4(W, group_size, symmetric)


def fake_int4(W: torch.Tensor, group_size: int = 128, symmetric: bool = True) -> torch.Tensor:
    """RTN int4 then dequantize: the float weight a W4A16 layer would compute with (float32 [out, in])."""
    codes, scales, zeros = P.quantize_int4(W, group_size, symmetric)
    return P.int4_dequantize(codes, scales, zeros, group_size)


def rtn_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(codes int8 [out, in], scale float32 [out, 1])``."""
    P.check_finite(W, "weight")
    return P.quantize_int8(W, "channel")


def fake_int8(W: torch.Tensor) -> torch.Tensor:
    """RTN int8 per channel, dequantized (float32 [out, in])."""
    codes, scale = rtn_int8(W)
    return P.dequantize_int8(codes, scale)
