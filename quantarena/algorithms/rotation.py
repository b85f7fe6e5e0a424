"""Online Hadamard rotation of a Linear's input (QuaRot; SpinQuant's "R4" on the down projection).

For an orthonormal ``R``, ``x W^T = (x R)(W R)^T``. ``W R`` is computed once, before the weights are
quantized; ``x R`` is computed at run time, just before the per-token activation quantization. A Hadamard
``R`` spreads a few large channels over all channels, so one int8 scale per token resolves every channel.

``R`` is block-diagonal: ``in_features / block`` copies of the normalized Sylvester Hadamard matrix of size
``block`` (a power of two) on contiguous channel blocks; ``block = in_features`` is the full rotation. This
is exactly compressed-tensors' ``"hadamard"`` transform (``head_dim = block``) and vLLM's online Hadamard:
Sylvester order, not randomized, ``H / sqrt(block)``. Sylvester matrices are symmetric, so ``R = R^T`` and the
same function rotates activations and weights.

Matrices are kept unnormalized (entries +-1, exact in every dtype); :func:`rotate` divides by sqrt(block).
"""
from __future__ import annotations

import math

import torch

from ..primitives import QuantizationError


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_block(in_features: int, block: int, where: str = "layer") -> None:
    """Raise a one-line error unless a Hadamard block of size ``block`` tiles ``in_features``."""
    if not is_power_of_two(block) or block < 2:
        raise QuantizationError(f"{where}: Hadamard block size must be a power of two >= 2, got {block}")
    if in_features % block:
        raise QuantizationError(f"{where}: Hadamard block {block} does not divide its {in_features} input "
                                f"features; choose a power-of-two block that divides it (e.g. -rot128)")


def resolve_block(in_features: int, block: int, where: str = "layer") -> int:
    """The block size for a layer: ``block``, or ``in_features`` for -1 (the full rotation), checked."""
    size = in_features if block == -1 else block
    if block == -1 and not is_power_of_two(in_features):
        raise QuantizationError(f"{where}: a full Hadamard rotation needs a power-of-two input size, not "
                                f"{in_features}; use a block-diagonal one (e.g. -rot128)")
    check_block(in_features, size, where)
    return size


def hadamard(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard matrix ``[size, size]`` (entries +-1, symmetric, H H^T = size I)."""
    if not is_power_of_two(size):
        raise QuantizationError(f"a Sylvester Hadamard matrix needs a power-of-two size, not {size}")
    H = torch.ones(1, 1, dtype=dtype, device=device)
    while H.shape[0] < size:
        H = torch.cat([torch.cat([H, H], dim=1), torch.cat([H, -H], dim=1)], dim=0)
    return H


def rotate(x: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x R`` for x ``[..., in]`` and the block-diagonal ``R`` built from ``H [block, block]`` (unnormalized),
    computed in ``dtype``. Rotating a weight ``[out, in]`` gives ``W R``; in both cases blocks are contiguous."""
    block = H.shape[0]
    if x.shape[-1] % block:
        raise QuantizationError(f"Hadamard block {block} does not divide the {x.shape[-1]} input features")
    blocks = x.to(dtype).unflatten(-1, (x.shape[-1] // block, block))  # [..., in / block, block]
    return (blocks @ H.to(device=x.device, dtype=dtype)).flatten(-2) * (1.0 / math.sqrt(block))


def rotate_weight(W: torch.Tensor, block: int) -> torch.Tensor:
    """``W R`` for a weight ``[out, in]``, offline in float64 (as compressed-tensors fuses it), as float32."""
    return rotate(W.double(), hadamard(block, torch.float64, W.device), torch.float64).float()
