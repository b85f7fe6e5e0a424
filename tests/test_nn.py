"""Each QuantLinear against a float reference within a stated relative error, and the reference kernels' exactness."""
import pytest
import torch
from torch import nn

from quantarena import nn as qn
from quantarena import primitives as P
from quantarena.kernels import reference as R


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def layer():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    x = torch.randn(2, 5, 256)
    return lin, x


# Stated tolerances (Gaussian weights and activations): the relative output error of each format.
TOL = {"bf16": 0.005, "w4a16": 0.12, "w4a16-asym": 0.12, "w8a8": 0.02, "w8a8-static": 0.03, "fp8": 0.06}


def test_quant_linears_vs_float(layer):
    lin, x = layer
    ref = lin(x)
    mods = {
        "bf16": qn.BF16Linear.from_float(lin),
        "w4a16": qn.W4A16Linear.from_float(lin, 64, True),
        "w4a16-asym": qn.W4A16Linear.from_float(lin, 128, False),
        "w8a8": qn.W8A8Linear.from_float(lin),
        "w8a8-static": qn.W8A8Linear.from_float(lin, input_scale=x.abs().amax() / 127),
        "fp8": qn.FP8Linear.from_float(lin),
    }
    for name, mod in mods.items():
        out = mod(x)
        assert out.shape == ref.shape and out.dtype == x.dtype
        assert rel_err(out, ref) < TOL[name], name
        # the module computes exactly with its own dequantized weights (up to float summation order)
        if name.startswith(("bf16", "w4a16")):
            assert rel_err(out, nn.functional.linear(x, mod.dequantize(), lin.bias)) < 1e-5


def test_modules_hold_real_codes(layer):
    lin, _ = layer
    w4 = qn.W4A16Linear.from_float(lin, 128, False)
    assert w4.weight_packed.dtype == torch.int32 and w4.weight_packed.shape == (96, 32)
    assert w4.weight_zero_point.dtype == torch.int8
    assert qn.W8A8Linear.from_float(lin).weight.dtype == torch.int8
    assert qn.FP8Linear.from_float(lin).weight.dtype == torch.float8_e4m3fn
    assert w4.weight_bytes() == 96 * 32 * 4 + 96 * 2 * 2 + 96 * 2


def test_int8_matmul_exact():
    torch.manual_seed(3)
    for m, k, n in [(1, 40, 24), (17, 64, 8), (33, 128, 40)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        assert torch.equal(R.int8_matmul(a, b), (a.long() @ b.long().t()).int())


def test_w8a8_reference_matches_formula(layer):
    lin, x = layer
    mod = qn.W8A8Linear.from_float(lin)
    x2 = x.reshape(-1, 256)
    xq, xs = P.quantize_int8(x2, "token")
    expect = (xq.long() @ mod.weight.long().t()).float() * xs * mod.weight_scale.t() + lin.bias
    assert torch.allclose(mod(x).reshape(-1, 96), expect, rtol=1e-6, atol=1e-6)


def test_smooth_scale_is_equivalent(layer):
    lin, x = layer
    s = torch.rand(256) + 0.5
    plain = qn.W8A8Linear.from_float(lin)
    smoothed = qn.W8A8Linear.from_float(lin, smooth_scale=s)
    assert rel_err(smoothed(x), lin(x)) < TOL["w8a8"]
    assert rel_err(smoothed.dequantize(), lin.weight) < 0.02 and rel_err(plain.dequantize(), lin.weight) < 0.02


def test_act_order_g_idx():
    torch.manual_seed(4)
    w = torch.randn(8, 64)
    q, s, z = P.quantize_int4(w, 32)
    perm = torch.randperm(64)
    g_idx = torch.arange(64) // 32
    # permuting columns together with g_idx gives the same dequantized weight, column-permuted
    deq = R.w4a16_dequant(P.pack_int4(q[:, perm]), s, None, 32, 64, g_idx[perm])
    assert torch.equal(deq, P.int4_dequantize(q, s, None, 32)[:, perm])


def test_w4a16_kernel_layout_is_lossless():
    """The serving layout drops the canonical codes and rebuilds them bit for bit: codes, dequantized weight,
    state_dict (what exports read), weight bytes and outputs are those of the canonical module."""
    torch.manual_seed(0)
    lin = nn.Linear(384, 40, bias=True)
    mod = qn.W4A16Linear.from_float(lin, 128, symmetric=False)
    x = torch.randn(3, 384)
    packed, out, nbytes = mod.weight_packed.clone(), mod(x), mod.weight_bytes()
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    assert mod.to_kernel_layout() is mod and mod.kernel_layout and mod.weight_packed is None
    assert mod.weight_tiled.shape == (128, 48)                   # 40 rows padded to the 128-row tiles
    assert torch.equal(mod.packed(), packed) and torch.equal(mod.codes(), P.unpack_int4(packed, 384))
    assert mod.weight_bytes() == nbytes and "weight_tiled" not in mod.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in mod.state_dict().items()) and set(mod.state_dict()) == set(state)
    assert torch.equal(mod(x), out)                             # CPU: the reference on the rebuilt codes
    other = qn.W4A16Linear.from_float(nn.Linear(384, 40, bias=True), 128, symmetric=False).to_kernel_layout()
    other.load_state_dict(state)                                # a canonical checkpoint into the kernel layout
    assert torch.equal(other.packed(), packed) and torch.equal(other(x), out)
    assert torch.equal(mod.to_canonical_layout().weight_packed, packed) and not hasattr(mod, "weight_tiled")


def test_w4a16_forward_gated_in_both_layouts():
    """Rows interleaving gate and up: forward_gated is silu(gate) * up of the layer's output, in either layout."""
    torch.manual_seed(0)
    mod = qn.W4A16Linear.from_float(nn.Linear(256, 96, bias=False), 128)
    x = torch.randn(3, 256).to(torch.bfloat16)
    want = R.silu_mul_interleaved(mod(x)).to(torch.bfloat16)
    assert torch.equal(mod.forward_gated(x), want)
    got = mod.to_kernel_layout().forward_gated(x)
    assert got.shape == (3, 48)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    with pytest.raises(ValueError, match="even number of outputs"):
        qn.W4A16Linear.from_float(nn.Linear(256, 95, bias=False), 128).forward_gated(x)


@pytest.mark.parametrize("with_delta", [False, True])
def test_w4a16_forward_normed_in_both_layouts(with_delta):
    """forward_normed: (layer(rms_norm(x + delta) * w), x + delta), in either layout; bad shapes are clear errors."""
    torch.manual_seed(0)
    mod = qn.W4A16Linear.from_float(nn.Linear(256, 96, bias=True), 128)
    x, d = torch.randn(2, 3, 256).to(torch.bfloat16), torch.randn(2, 3, 256).to(torch.bfloat16)
    nw = torch.rand(256).to(torch.bfloat16) + 0.5
    delta = d if with_delta else None
    y, x_new = R.add_rms_norm(x, delta, nw, 1e-5)
    for gated in (False, True):
        want = mod.forward_gated(y) if gated else mod(y)
        for layout in ("canonical", "kernel"):
            out, got_x = mod.forward_normed(x, delta, nw, 1e-5, gated=gated)
            assert torch.equal(out, want) and torch.equal(got_x, x_new)   # the CPU runs the reference ops
            assert got_x is x or with_delta
            mod.to_kernel_layout()
        mod.to_canonical_layout()
    mod.to_kernel_layout()
    with pytest.raises(ValueError, match="norm weight must be 256 wide"):
        mod.forward_normed(x, delta, nw[:-1])
    with pytest.raises(ValueError, match="residual delta must have the input's shape"):
        mod.forward_normed(x, d[:, :2], nw)


def test_w4a16_kernel_layout_refuses_what_it_cannot_hold():
    lin = nn.Linear(256, 16)
    with pytest.raises(ValueError, match="divisible by 128"):
        qn.W4A16Linear.from_float(lin, 64).to_kernel_layout()
    g_idx = torch.randperm(256) // 128
    q, s, _ = P.quantize_int4(lin.weight.detach(), 128, True)
    with pytest.raises(ValueError, match="act-order"):
        qn.W4A16Linear(q, s, None, 128, g_idx=g_idx).to_kernel_layout()
    model = nn.Sequential(qn.W4A16Linear.from_float(lin, 64), qn.W4A16Linear.from_float(lin, 128))
    assert qn.to_kernel_layout(model) == 1 and not model[0].kernel_layout and model[1].kernel_layout


def test_w4a16_layout_round_trips():
    from quantarena.kernels import w4a16_layout as L

    packed = torch.randint(-2 ** 31, 2 ** 31, (150, 48), dtype=torch.int64).to(torch.int32)
    dot = L.dot_layout_words(packed, rows_per_chunk=64)
    assert torch.equal(L.canonical_from_dot_words(dot, rows_per_chunk=64), packed)
    for rows in (16, 32, 256):
        assert torch.equal(L.canonical_from_dot_tiled(L.dot_tiled_words(dot, rows), 150, rows), packed)
    with pytest.raises(ValueError, match="cannot hold"):
        L.canonical_from_dot_tiled(L.dot_tiled_words(dot), 300)
