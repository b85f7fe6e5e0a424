"""Primitives bit-exact against plain (element-by-element) reference implementations."""
import math

import pytest
import torch

from quantarena import primitives as P


def plain_int4(w, g, symmetric):
    """Loop reference of the int4 convention in primitives' docstring."""
    out, inp = w.shape
    q = torch.zeros(out, inp, dtype=torch.int8)
    s = torch.zeros(out, inp // g)
    z = torch.zeros(out, inp // g, dtype=torch.int8)
    for r in range(out):
        for j in range(inp // g):
            vals = [float(v) for v in w[r, j * g:(j + 1) * g]]
            lo, hi = min(vals), max(vals)
            if symmetric:
                scale = max(abs(lo), abs(hi), 1e-12) / 7.5
                scale = float(torch.tensor(scale).to(torch.bfloat16).float())
                zero = 0
            else:
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                scale = float(torch.tensor(max(hi - lo, 1e-12) / 15.0).to(torch.bfloat16).float())
                zero = int(min(max(round(-lo / scale) - 8, -8), 7))
            s[r, j], z[r, j] = scale, zero
            for k, v in enumerate(vals):
                # torch.round is round-half-to-even, like Python's round
                q[r, j * g + k] = int(min(max(round(float(torch.tensor(v) / torch.tensor(scale))) + zero, -8), 7))
    return q, s, z


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_bit_exact(group_size, symmetric):
    torch.manual_seed(group_size)
    w = torch.randn(6, 256) * torch.rand(6, 1) * 3
    w[0, :group_size] = 0.0  # an all-zero group
    q, s, z = P.quantize_int4(w, group_size, symmetric)
    rq, rs, rz = plain_int4(w, group_size, symmetric)
    assert torch.equal(s, rs)
    assert torch.equal(z, rz)
    assert torch.equal(q, rq)
    assert q.min() >= -8 and q.max() <= 7


def test_int4_dequant_matches_formula():
    w = torch.randn(4, 128)
    q, s, z = P.quantize_int4(w, 64, symmetric=False)
    deq = P.int4_dequantize(q, s, z, 64)
    for r in range(4):
        for k in range(128):
            g = k // 64
            assert deq[r, k].item() == (q[r, k].item() - z[r, g].item()) * s[r, g].item()


def test_pack_unpack_round_trip_and_layout():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = P.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert torch.equal(P.unpack_int4(packed), q)
    # element j of each word sits in bits 4j..4j+3, stored as q + 8
    word = packed[2, 3].item() & 0xFFFFFFFF
    for j in range(8):
        assert (word >> (4 * j)) & 0xF == q[2, 3 * 8 + j].item() + 8
    rows = P.pack_int4_rows(q[:, :8].repeat(8, 1)[:40])
    assert torch.equal(P.unpack_int4_rows(rows, 40), q[:, :8].repeat(8, 1)[:40])


def test_int8_bit_exact():
    torch.manual_seed(1)
    x = torch.randn(7, 33) * 5
    for gran in ["channel", "token", "tensor"]:
        q, s = P.quantize_int8(x, gran)
        for r in range(7):
            amax = float(x.abs().max()) if gran == "tensor" else float(x[r].abs().max())
            scale = torch.tensor(amax, dtype=torch.float32) / 127
            for c in range(33):
                ref = max(-128, min(127, round(float(x[r, c] / scale))))
                assert q[r, c].item() == ref


def test_fp8_bit_exact():
    x = torch.randn(4, 16) * 100
    for gran in ["tensor", "row"]:
        q, s = P.quantize_fp8(x, gran)
        ref = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
        rel = ((P.dequantize_fp8(q, s) - x).abs() / x.abs().clamp(min=1e-3)).max()
        assert rel < 2 ** -3  # 3 mantissa bits


def test_zero_range_gives_finite_scales():
    w = torch.zeros(3, 64)
    q, s, z = P.quantize_int4(w, 32)
    assert torch.isfinite(s).all() and (s > 0).all() and (q == 0).all()
    q8, s8 = P.quantize_int8(w, "channel")
    assert torch.isfinite(s8).all() and (q8 == 0).all()


def test_bad_group_size_and_nan():
    with pytest.raises(P.QuantizationError, match="does not divide"):
        P.quantize_int4(torch.randn(4, 96), 64)
    w = torch.randn(4, 64)
    w[1, 1] = math.inf
    with pytest.raises(P.QuantizationError, match="NaN/Inf"):
        P.quantize_int4(w, 32)


def test_scales_are_correctly_rounded_divisions():
    # the same float32 scale on every device: CUDA would otherwise multiply by a rounded reciprocal
    absmax = torch.rand(4096, 1) * 300 + 1e-3
    assert torch.equal(P.int8_scale(absmax, "token"), (absmax.double() / 127).float())
    assert torch.equal(P.fp8_scale(absmax, "token"), (absmax.double() / 448).float())
    assert torch.equal(P.div_exact(absmax, 7.5), (absmax.double() / 7.5).float())
