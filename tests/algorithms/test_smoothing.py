"""SmoothQuant and AWQ scale math: finite scales for never-activated channels, searches that never do worse
than not transforming, and the calibrated schemes end to end on a tiny random model."""
import pytest
import torch

from quantarena.algorithms import awq, smoothquant
from quantarena.algorithms.rtn import fake_int4, fake_int8
from quantarena.calibration.data import random_windows
from quantarena.evaluate import evaluate
from quantarena.models import load_model
from quantarena.nn import W4A16Linear, W8A8Linear
from quantarena.quantize import CalibrationOptions, quantize


def test_smooth_scales_finite_for_dead_channels():
    x_absmax = torch.tensor([0.0, 1.0, 50.0, 2.0])
    w_absmax = torch.tensor([0.3, 0.0, 0.1, 0.2])
    s = smoothquant.smooth_scales(x_absmax, w_absmax, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0] == 1.0 and s[1] == 1.0  # never activated / all-zero weights: nothing to migrate
    assert torch.allclose(s[2], torch.tensor(50.0 ** 0.5 / 0.1 ** 0.5))


def test_awq_scales_finite_for_dead_channels():
    x_mean = torch.tensor([0.0, 0.5, 30.0, 1.0])
    w_mean = torch.tensor([0.4, 0.0, 0.2, 0.3])
    for ratio in (0.0, 0.5, 0.95):
        s = awq.candidate_scales(x_mean, w_mean, ratio)
        assert torch.isfinite(s).all() and (s > 0).all()


def test_awq_search_never_worse_than_identity():
    calls = []

    def loss_fn(s):
        calls.append(s)
        return float((s - 1).abs().sum()) + 1.0  # identity is best
    s, ratio, loss = awq.search_scales(torch.rand(16) + 0.1, torch.rand(16) + 0.1, loss_fn, n_grid=5)
    assert torch.equal(s, torch.ones(16)) and loss == 1.0 and len(calls) == 6


def test_awq_scale_search_helps_outlier_channels():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    X[:, :2] *= 30.0
    W = torch.randn(32, 64, generator=g) * 0.1
    ref = X @ W.t()

    def loss_fn(s):
        return ((X @ (fake_int4(W * s, 32) / s).t() - ref) ** 2).mean().item()
    s, ratio, loss = awq.search_scales(X.abs().mean(0), awq.weight_mean([W], 32), loss_fn, n_grid=10)
    assert loss < 0.9 * loss_fn(torch.ones(64))


def test_awq_clip_lowers_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    W = torch.randn(32, 64, generator=g) * 0.1
    W[0, 3] = 2.0  # one weight outlier widens its group's range
    max_val = awq.search_clip(W, X, 32, True)
    Wc = awq.apply_clip(W, max_val)
    err = lambda w: ((X @ fake_int4(w, 32).t() - X @ W.t()) ** 2).mean().item()
    assert err(Wc) <= err(W)
    assert max_val.shape == (32, 2) and (max_val <= W.abs().reshape(32, 2, 32).amax(-1) + 1e-7).all()


def test_awq_full_clip_uses_cross_group_terms():
    """Scored through X^T X with cross-group passes, the clipping lowers the whole output error at least as
    much as the per-group search on the same statistics, and a row-chunked run gives the same bounds."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, generator=g) * torch.rand(256, generator=g) * 3
    X = X + torch.randn(2048, 1, generator=g) * torch.rand(256, generator=g)  # correlated channels
    W = torch.randn(64, 256, generator=g)
    H = X.t() @ X / X.shape[0]
    err = lambda m: ((X @ (fake_int4(awq.apply_clip(W, m), 128) - W).t()) ** 2).mean().item()
    per_group = awq.search_clip_full(W, H, 128, sweeps=0)
    full = awq.search_clip_full(W, H, 128, sweeps=2)
    assert err(full) <= err(per_group) < err(W.abs().reshape(64, 2, 128).amax(-1))
    assert full.shape == (64, 2)
    assert torch.equal(torch.cat([awq.search_clip_full(W[:40], H, 128), awq.search_clip_full(W[40:], H, 128)]), full)


def test_finer_clip_grid_never_worse_per_group():
    """Grid 100 holds every bound of grid 20, so group by group (no cross passes) it can only do better."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(1024, 256, generator=g) * torch.rand(256, generator=g) * 3
    W = torch.randn(32, 256, generator=g) * 0.1
    W[:, 7] *= 8.0
    H = X.t() @ X / X.shape[0]
    err = lambda m: ((X @ (fake_int4(awq.apply_clip(W, m), 128) - W).t()) ** 2).sum(0)  # per row
    coarse = awq.search_clip_full(W, H, 128, n_grid=20, sweeps=0)
    fine = awq.search_clip_full(W, H, 128, n_grid=100, sweeps=0)
    assert err(fine).sum() < err(coarse).sum()


FAST = CalibrationOptions(awq_grid=4, awq_windows=1, sample_tokens=64)


@pytest.mark.parametrize("scheme, cls", [
    ("w4a16-gptq", W4A16Linear), ("w4a16-gptq-g64-asym", W4A16Linear), ("w4a16-awq", W4A16Linear),
    ("w4a16-awq+gptq", W4A16Linear), ("w8a8-sq", W8A8Linear), ("w8a8-sq-static", W8A8Linear),
    ("w8a8-sq+gptq", W8A8Linear), ("w8a8-sq-a0.8", W8A8Linear)])
def test_calibrated_schemes_end_to_end(scheme, cls):
    lm = load_model("preset:tiny-llama")
    calib = random_windows(lm.config.vocab_size, 64, 4, seed=2)
    probe = random_windows(lm.config.vocab_size, 64, 1, seed=3)
    ref, states = evaluate(lm.model, lm.arch, probe, progress=False)
    quantize(lm.model, scheme, calib, progress=False, options=FAST)
    layer = lm.model.model.layers[0]
    modules = [layer.get_submodule(n) for n in lm.arch.linears]
    assert all(isinstance(m, cls) for m in modules)
    if scheme.endswith("static"):
        assert all(m.input_scale is not None for m in modules)
    if scheme.startswith("w8a8-sq"):  # tiny-llama has GQA: o_proj cannot be folded into v_proj
        assert layer.self_attn.o_proj.smooth_scale is not None
        assert layer.self_attn.q_proj.smooth_scale is None
    res, _ = evaluate(lm.model, lm.arch, probe, reference=states, progress=False)
    assert res.kld < (0.05 if scheme.startswith("w8a8") else 0.2)
    assert "loss" in lm.model.quantarena_calibration[0] or not scheme.startswith("w4a16")


def test_sq_alpha_search_end_to_end():
    lm = load_model("preset:tiny-llama")
    calib = random_windows(lm.config.vocab_size, 64, 4, seed=2)
    probe = random_windows(lm.config.vocab_size, 64, 1, seed=3)
    ref, states = evaluate(lm.model, lm.arch, probe, progress=False)
    opts = CalibrationOptions(awq_windows=1, alpha_search=True, sq_alphas=(0.4, 0.6))
    quantize(lm.model, "w8a8-sq", calib, progress=False, options=opts)
    alphas = lm.model.quantarena_calibration[0]["alpha"]
    assert len(alphas) == len(lm.arch.groups) and set(alphas) <= {None, 0.4, 0.6}
    res, _ = evaluate(lm.model, lm.arch, probe, reference=states, progress=False)
    assert res.kld < 0.05


def test_alpha_search_picks_the_lowest_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, :3] *= 40.0
    w = torch.randn(48, 64, generator=g) * 0.05
    ref = x @ w.t()

    def loss(s):  # per-token int8 X / s, per-channel int8 W s
        return ((fake_int8(x / s) @ fake_int8(w * s).t() - ref) ** 2).mean().item()
    x_absmax, w_absmax = x.abs().amax(0), w.abs().amax(0)
    s, alpha, err = smoothquant.search_alpha(x_absmax, w_absmax, loss)
    assert alpha in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8) and err == loss(s)
    assert err <= min(loss(smoothquant.smooth_scales(x_absmax, w_absmax, a)) for a in (0.3, 0.5, 0.8))
    assert err < loss(torch.ones(64))  # no smoothing is a candidate, and loses on these outliers


def test_no_runtime_smoothing_leaves_unfoldable_layers_plain():
    """What export asks for: tiny-llama's GQA o_proj cannot absorb 1/s, so it is left unsmoothed."""
    lm = load_model("preset:tiny-llama")
    calib = random_windows(lm.config.vocab_size, 64, 2, seed=2)
    quantize(lm.model, "w8a8-sq", calib, progress=False, options=CalibrationOptions(runtime_smoothing=False))
    assert all(m.smooth_scale is None for m in lm.model.modules() if isinstance(m, W8A8Linear))
