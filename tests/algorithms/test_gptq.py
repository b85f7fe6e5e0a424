"""GPTQ: lower output error than RTN on its calibration inputs, valid codes, the Cholesky-failure path,
never-activated columns."""
import logging

import pytest
import torch

from quantarena import primitives as P
from quantarena.algorithms.gptq import gptq
from quantarena.algorithms.rtn import fake_int4, fake_int8


def layer(out_features=96, in_features=128, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few large channels, as in real activations
    mix = torch.randn(in_features, in_features, generator=g) / in_features ** 0.5 + torch.eye(in_features)
    X = torch.randn(tokens, in_features, generator=g) @ mix
    X[:, :4] *= 8.0
    W = torch.randn(out_features, in_features, generator=g) * 0.05
    return W, X, 2 * X.t() @ X / tokens


def dequant(res, group_size):
    return P.int4_dequantize(res.codes, res.scales, res.zeros, group_size)


def output_error(X, W, Wq):
    return ((X @ W.t() - X @ Wq.t()) ** 2).mean().item()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_beats_rtn(symmetric, act_order, group_size):
    W, X, H = layer()
    res = gptq(W, H, 4, group_size, symmetric, act_order)
    assert res.codes.dtype == torch.int8 and res.codes.min() >= -8 and res.codes.max() <= 7
    assert (res.zeros is None) == symmetric
    assert torch.equal(res.scales, res.scales.to(torch.bfloat16).float())  # bf16-exact scales
    err_gptq = output_error(X, W, dequant(res, group_size))
    err_rtn = output_error(X, W, fake_int4(W, group_size, symmetric))
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    assert res.loss > 0


def test_gptq_int8_beats_rtn():
    W, X, H = layer()
    res = gptq(W, H, bits=8)
    assert res.scales.shape == (W.shape[0], 1) and res.zeros is None
    Wq = P.dequantize_int8(res.codes, res.scales)
    assert output_error(X, W, Wq) < output_error(X, W, fake_int8(W))


def test_static_groups_need_no_g_idx():
    """With act-order the group scales are those of the natural column order (exports need no g_idx)."""
    W, X, H = layer()
    res = gptq(W, H, 4, 32, True, act_order=True, search_scales=False)
    scales, _ = P.int4_qparams(W, 32, True)
    assert torch.equal(res.scales, scales)


def test_searched_group_ranges_lower_error():
    W, X, H = layer()
    plain = gptq(W, H, 4, 32, search_scales=False)
    searched = gptq(W, H, 4, 32, search_scales=True)
    assert output_error(X, W, dequant(searched, 32)) < output_error(X, W, dequant(plain, 32))


def test_cholesky_failure_grows_dampening(caplog):
    W, X, H = layer(tokens=64)  # rank 64 < 128: singular
    H = H - 0.05 * H.diag().mean() * torch.eye(H.shape[0])  # and now indefinite: 1% dampening cannot fix it
    with caplog.at_level(logging.WARNING, logger="quantarena.gptq"):
        res = gptq(W, H, 4, 32)
    assert res.percdamp > 0.01
    assert any("not positive definite" in r.message for r in caplog.records)
    assert torch.isfinite(dequant(res, 32)).all()


def test_hopeless_hessian_is_a_clear_error():
    W, _, H = layer()
    with pytest.raises(P.QuantizationError, match="not positive definite"):
        gptq(W, -H, 4, 32)


def test_dead_columns_are_rounded_to_nearest():
    W, X, H = layer()
    X[:, 5] = 0.0  # a channel that never activates
    H = 2 * X.t() @ X / X.shape[0]
    res = gptq(W, H, 4, 32, act_order=True, search_scales=False)
    assert res.dead_columns == 1
    Wq = dequant(res, 32)
    assert torch.isfinite(Wq).all()
    assert torch.equal(Wq[:, 5], fake_int4(W, 32)[:, 5])  # static groups: same scale, no error fed in
