"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

For a group of Linears that share one input ``X``, per input channel ``j``::

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

``X / s`` has flatter channels (easier per-token int8) and ``W * s`` absorbs them (per-channel int8
weights barely notice). ``1 / s`` is folded into the op that produced ``X`` (a norm's weight, or the
output rows of a preceding Linear), so inference costs nothing extra; where nothing can absorb it,
the Linear keeps ``s`` and divides its input at run time.

Also the folding itself (:func:`fold_into_prev`, :func:`scale_inputs`), shared with AWQ: pure
weight arithmetic on the modules named by an architecture's smooth groups.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_MIN_SCALE = 1e-5


@torch.no_grad()
def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``s [in]`` from per-channel activation absmax ``[in]`` and weight absmax ``[in]`` (over every Linear
    of the group). Channels that never activate or have all-zero weights get ``s = 1`` (nothing to migrate)."""
    x = x_absmax.float()
    w = w_absmax.float()
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    ok = (x > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=_MIN_SCALE), torch.ones_like(s))


def weight_absmax(linears: list[nn.Module]) -> torch.Tensor:
    """Per-input-channel max |W| over all ``linears`` -> [in]."""
    return torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears]).amax(dim=0)


def can_fold(prev: nn.Module | None, prev_kind: str, in_features: int) -> bool:
    """Whether ``prev`` can absorb a per-channel scale of length ``in_features``."""
    if prev is None or prev_kind == "none":
        return False
    if prev_kind == "linear":
        return prev.weight.shape[0] == in_features
    weight = getattr(prev, "weight", None)
    return weight is not None and weight.shape[-1] == in_features


@torch.no_grad()
def fold_into_prev(prev: nn.Module, prev_kind: str, s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` (in place)."""
    if prev_kind == "rmsnorm_1p":  # Gemma: x * (1 + weight)  ->  (1 + weight) / s - 1
        w = prev.weight
        w.copy_(((1.0 + w.float()) / s - 1.0).to(w.dtype))
    elif prev_kind in ("rmsnorm", "layernorm", "linear"):
        if prev_kind == "linear":
            prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))  # [out, in]: rows
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        raise ValueError(f"cannot fold a scale into a {prev_kind!r}")


@torch.no_grad()
def scale_inputs(linears: list[nn.Module], s: torch.Tensor) -> None:
    """Multiply every Linear's input columns by ``s`` (in place): ``W -> W diag(s)``."""
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


@torch.no_grad()
def search_alpha(x_absmax: torch.Tensor, w_absmax: torch.Tensor, loss_fn: Callable[[torch.Tensor], float],
                 alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
                 ) -> tuple[torch.Tensor, float | None, float]:
    """The smoothing of a group with the smallest ``loss_fn(s)`` (the caller's error of the group's output
    when its layers compute W8A8 with ``X / s`` and ``W s``) over ``s = 1`` (no smoothing, alpha ``None``)
    and :func:`smooth_scales` for each alpha. Returns ``(s [in], alpha, loss)``."""
    best_s = torch.ones_like(x_absmax, dtype=torch.float32)
    best_alpha, best_loss = None, loss_fn(best_s)
    for alpha in alphas:
        s = smooth_scales(x_absmax, w_absmax, alpha)
        loss = loss_fn(s)
        if loss < best_loss:
            best_s, best_alpha, best_loss = s, alpha, loss
    return best_s, best_alpha, best_loss
