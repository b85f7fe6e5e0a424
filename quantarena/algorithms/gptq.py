"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), in the paper's notation.

The layer's weights ``W [out, in]`` are rounded one input column at a time; the rounding error of
column ``i`` is spread over the columns not yet rounded through the inverse Hessian
``H = 2 X^T X / n`` of the layer's calibration inputs, so ``||X W^T - X Q^T||`` stays small.
Lazy block updates (``block_size`` columns at a time) keep the work in matrix products.

Options: int4 groups (``group_size``, -1 per channel) or int8 per channel, symmetric or asymmetric,
act-order (columns in order of decreasing ``diag(H)``) with *static* groups: group scales come from
the original weight in natural column order, so the result needs no ``g_idx`` and exports keep the
plain layout. Columns that never saw an activation (``H_ii = 0``) are rounded to nearest and pass no
error on. When the Cholesky factorisation of the dampened Hessian fails, the dampening grows tenfold
and the retry is logged.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import primitives as P

log = logging.getLogger("quantarena.gptq")


@dataclass
class GPTQResult:
    codes: torch.Tensor          # int8 [out, in]: int4 codes in [-8, 7] or int8 codes
    scales: torch.Tensor         # float32 [out, in/g] (int4, bf16-rounded) or [out, 1] (int8)
    zeros: torch.Tensor | None   # int8 [out, in/g] (int4 asymmetric) or None
    loss: float                  # sum over output rows of the GPTQ objective (weighted squared error)
    percdamp: float              # dampening that made H positive definite (fraction of mean diag(H))
    dead_columns: int            # input columns that never saw an activation


def _qparams(W: torch.Tensor, bits: int, group_size: int, symmetric: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros ``[out, n_groups]`` from ``W [out, in]`` (float32, int8)."""
    if bits == 4:
        return P.int4_qparams(W, group_size, symmetric)
    scales = P.int8_scale(W, "channel")  # [out, 1]
    return scales, torch.zeros_like(scales, dtype=torch.int8)


def _searched_qparams(W: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                      grid: int = 20, max_shrink: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Static group qparams whose range is shrunk per (row, group) to minimise the rounding error weighted
    by ``weight [in]`` (the Hessian diagonal: how much each input column matters), as GPTQ's ``mse`` option."""
    if bits != 4:
        return _qparams(W, bits, group_size, symmetric)
    rows, columns = W.shape
    g = columns if group_size == -1 else group_size
    wg = W.reshape(rows, columns // g, g)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    best_s, best_z = P.int4_qparams(W, group_size, symmetric)
    best_err = torch.full_like(best_s, float("inf"))
    col_weight = weight.reshape(1, columns // g, g)
    for i in range(int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        s, z = P.int4_qparams(W, group_size, symmetric, wmin=wmin * p, wmax=wmax * p)
        dq = P.int4_dequantize(P.int4_quantize(W, s, z, group_size), s, z, group_size).reshape(wg.shape)
        err = ((dq - wg) ** 2 * col_weight).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One column ``w [out]`` -> (codes [out], dequantized [out])."""
    qmin, qmax = (P.INT4_MIN, P.INT4_MAX) if bits == 4 else (P.INT8_MIN, P.INT8_MAX)
    q = (torch.round(w / scale) + zero).clamp(qmin, qmax)
    return q, (q - zero) * scale


def _inverse_hessian(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; the dampening grows tenfold until it factorises."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_tries):
        damp = percdamp * max(mean_diag, 1e-8)
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U, percdamp
        log.warning("GPTQ: Hessian not positive definite with dampening %.3g; retrying with %.3g",
                    percdamp, percdamp * 10)
        percdamp *= 10
    raise P.QuantizationError(f"GPTQ: Hessian still not positive definite with dampening {percdamp / 10:.3g}; "
                              f"use more calibration windows")


@contextmanager
def _one_thread(device: torch.device):
    """GPTQ's column loop is thousands of small ops: on CPU, extra OpenMP threads only add synchronisation
    (measured 14x slower with 2 threads than with 1 on a busy 2-core machine), so it runs on one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
         act_order: bool = True, block_size: int = 128, percdamp: float = 0.01,
         search_scales: bool = True) -> GPTQResult:
    """Quantize ``W [out, in]`` given the Hessian ``H [in, in]`` of its inputs.

    ``bits`` 4 (int4 groups, ``group_size`` -1 for per channel) or 8 (int8 per channel, symmetric).
    ``search_scales``: static int4 group ranges shrunk to minimise the diag(H)-weighted rounding error.
    """
    P.check_finite(W, "weight")
    if bits not in (4, 8):
        raise P.QuantizationError(f"GPTQ supports 4 or 8 bits, got {bits}")
    if bits == 8:
        group_size, symmetric = -1, True
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, columns = W.shape
    P.check_group_size(columns, group_size)
    group = columns if group_size == -1 else group_size

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # never-activated columns: rounded to nearest, no error passed on

    # Static groups: qparams from the original weight in natural column order (so no g_idx is needed).
    if search_scales:
        scales, zeros = _searched_qparams(W, torch.diag(H), bits, group_size, symmetric)  # [rows, n_groups]
    else:
        scales, zeros = _qparams(W, bits, group_size, symmetric)
    zeros_f = zeros.float()
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(columns, device=W.device)
    group_of = perm // group  # group of each (permuted) column

    Hinv, percdamp = _inverse_hessian(H, percdamp)
    # Groups are refreshed lazily (GPTQ's "find params at the first column of a group") only without
    # act-order; with it, the static qparams above stand.
    refresh = not act_order and bits == 4 and group_size != -1
    block_size = max(block_size // group * group, group) if refresh else block_size

    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    with _one_thread(W.device):  # thousands of small ops
        for i1 in range(0, columns, block_size):
            i2 = min(i1 + block_size, columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                col = i1 + i
                if refresh and col % group == 0:
                    s, z = _qparams(W1[:, i:i + group], bits, -1, symmetric)  # W1 holds the updated weights
                    scales[:, col // group], zeros_f[:, col // group] = s[:, 0], z[:, 0].float()
                g = group_of[col]
                w = W1[:, i]
                d = Hinv1[i, i]
                q, dq = _round(w, scales[:, g], zeros_f[:, g], bits)
                Q1[:, i] = q
                Losses1[:, i] = (w - dq) ** 2 / d ** 2
                err1 = (w - dq) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            Losses[:, i1:i2] = Losses1 / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    zeros_out = None if symmetric else zeros_f.to(torch.int8)
    return GPTQResult(codes=codes.to(torch.int8), scales=scales, zeros=zeros_out, loss=Losses.sum().item(),
                      percdamp=percdamp, dead_columns=int(dead.sum().item()))
