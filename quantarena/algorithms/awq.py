"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Two searches, both pure functions here (the caller supplies the model-aware loss):

* :func:`search_scales`: per-input-channel scales ``s = x_mean^r / w_mean^(1-r)`` (``duo_scaling``, as
  llm-compressor; ``s = x_mean^r`` otherwise) for ``r`` on a grid in [0, 1); the loss of each candidate is
  the error of the group's output when its Linears compute with ``Q(W s) / s``. Salient channels
  (large activations) get larger weights, so rounding hurts them less. ``s`` is then folded into the
  preceding op (see :mod:`.smoothquant`).
* :func:`search_clip`: per (output row, group) the clipping range ``max|W| * ratio`` that minimises the
  error of ``X Q(clip(W))^T`` against ``X W^T`` on sample inputs; :func:`search_clip_full` the same
  grid, scored through ``H = X^T X / n`` over all calibration tokens with the cross-group terms of each
  row's output error (coordinate descent over the groups). The latter is the default in ``quantize``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import primitives as P
from . import rtn


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AWQ's weight magnitude per input channel: ``|W|`` normalised by its group max, averaged over the
    output rows of every Linear in the group -> [in]."""
    rows = []
    for W in weights:
        out_features, in_features = W.shape
        g = in_features if group_size == -1 else group_size
        wg = W.detach().float().abs().reshape(out_features, in_features // g, g)
        wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-12)
        rows.append(wg.reshape(out_features, in_features))
    return torch.cat(rows).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo_scaling: bool = True
                     ) -> torch.Tensor:
    """Scales for one grid point, normalised so that ``max * min = 1``; finite for dead channels."""
    x = x_mean.float().clamp(min=1e-4)
    if duo_scaling:
        s = x.pow(ratio) / w_mean.float().clamp(min=1e-4).pow(1.0 - ratio)
    else:
        s = x.pow(ratio)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@torch.no_grad()
def search_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, loss_fn: Callable[[torch.Tensor], float],
                  n_grid: int = 20, duo_scaling: bool = True) -> tuple[torch.Tensor, float, float]:
    """Grid search over the exponent ``r = i / n_grid``. ``loss_fn(s)`` returns the group-output error when
    the Linears use ``Q(W s) / s``. Returns ``(s [in], ratio, loss)``; ``s = 1`` (ratio ``nan``) is always a
    candidate, so the search never does worse than plain rounding on its data."""
    best_s = torch.ones_like(x_mean, dtype=torch.float32)
    best_ratio, best_loss = float("nan"), loss_fn(best_s)
    for i in range(n_grid):
        ratio = i / n_grid
        s = candidate_scales(x_mean, w_mean, ratio, duo_scaling)
        loss = loss_fn(s)
        if loss < best_loss:
            best_s, best_ratio, best_loss = s, ratio, loss
    return best_s, best_ratio, best_loss


@torch.no_grad()
def search_clip(W: torch.Tensor, x: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Best clipping bound per (row, group) ``[out, in/g]`` for ``W [out, in]`` on sample inputs ``x [tokens, in]``."""
    out_features, in_features = W.shape
    g = in_features if group_size == -1 else group_size
    P.check_group_size(in_features, g)
    n_groups = in_features // g
    W = W.float()
    xg = x.float().reshape(-1, n_groups, g).transpose(0, 1)        # [groups, tokens, g]
    wg = W.reshape(out_features, n_groups, g).permute(1, 2, 0)       # [groups, g, out]
    ref = torch.bmm(xg, wg)                                          # [groups, tokens, out]
    org_max = W.abs().reshape(out_features, n_groups, g).amax(dim=-1)  # [out, groups]
    best_max = org_max.clone()
    best_err = torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1.0 - i / n_grid)
        bound = max_val.repeat_interleave(g, dim=1)                  # [out, in]
        Wq = rtn.fake_int4(torch.maximum(torch.minimum(W, bound), -bound), group_size, symmetric)
        out = torch.bmm(xg, Wq.reshape(out_features, n_groups, g).permute(1, 2, 0))
        err = (out - ref).pow(2).mean(dim=1).t()                     # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


@torch.no_grad()
def search_clip_full(W: torch.Tensor, H: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                     n_grid: int = 20, max_shrink: float = 0.5, sweeps: int = 2) -> torch.Tensor:
    """Clipping bounds ``[out, in/g]`` for ``W [out, in]`` that minimise each row's whole output error
    ``d H d^T`` (``d`` the row's rounding error, ``H [in, in]`` the input second moments over every
    calibration token). First each (row, group) on its own (``d_g H_gg d_g^T``, what :func:`search_clip`
    measures on sample rows), then ``sweeps`` passes of coordinate descent over the groups with the
    cross-group terms included, so a group's choice can offset the others' rounding error."""
    out_features, in_features = W.shape
    g = in_features if group_size == -1 else group_size
    P.check_group_size(in_features, g)
    n_cand = int(max_shrink * n_grid)
    W, H = W.float(), H.float().to(W.device)
    rows = max(1, min(out_features, (1 << 26) // max(n_cand * in_features, 1)))  # rows are independent
    return torch.cat([_clip_rows(W[r:r + rows], H, g, symmetric, n_grid, n_cand, sweeps)
                      for r in range(0, out_features, rows)])


def _clip_rows(W: torch.Tensor, H: torch.Tensor, g: int, symmetric: bool, n_grid: int, n_cand: int,
               sweeps: int) -> torch.Tensor:
    out_features, in_features = W.shape
    n_groups = in_features // g
    org_max = W.abs().reshape(out_features, n_groups, g).amax(dim=-1)               # [out, G]
    maxes = torch.stack([org_max * (1.0 - i / n_grid) for i in range(n_cand)])      # [C, out, G]
    cands = torch.stack([rtn.fake_int4(apply_clip(W, m), g, symmetric) - W for m in maxes])  # [C, out, in]
    choice = torch.zeros(out_features, n_groups, dtype=torch.long, device=W.device)
    rows = torch.arange(out_features, device=W.device)
    D = None  # rounding error of the current choice [out, in]
    for sweep in range(sweeps + 1):
        for j in range(n_groups):
            sl = slice(j * g, (j + 1) * g)
            Hjj = H[sl, sl]
            dj = cands[:, :, sl]                                                   # [C, out, g]
            err = ((dj @ Hjj) * dj).sum(-1)                                        # [C, out]
            if D is not None:  # cross terms with the other groups' current errors
                err = err + 2.0 * (dj * (D @ H[:, sl] - D[:, sl] @ Hjj)).sum(-1)
            choice[:, j] = err.argmin(dim=0)
            if D is not None:
                D[:, sl] = dj[choice[:, j], rows]
        if D is None:
            D = cands.gather(0, choice.repeat_interleave(g, dim=1).unsqueeze(0)).squeeze(0)
    return maxes.gather(0, choice.unsqueeze(0)).squeeze(0)


def apply_clip(W: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``W`` clamped to ``[-max_val, max_val]`` per (row, group)."""
    g = W.shape[1] // max_val.shape[1]
    bound = max_val.repeat_interleave(g, dim=1).to(W.dtype)
    return torch.maximum(torch.minimum(W, bound), -bound)
