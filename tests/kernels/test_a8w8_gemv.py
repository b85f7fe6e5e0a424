"""The W8A8 INT8 / FP8 GEMV (M <= 4) against the int8 GEMM and the float product, under TRITON_INTERPRET=1
at small ragged shapes (natively on a GPU machine: then the inline PTX runs).

int8 must equal :func:`.triton_w8a8.int8_gemm` bit for bit (exact int32 sums, the same epilogue); fp8 is
float32 accumulation of exact products, so it must match the float product to float32 rounding. The fused
variant (:func:`.triton_a8w8_gemv.a8w8_gemv_quant`, quantizing bf16 activations itself) must equal
act_quant + the GEMV bit for bit in int8, and match it (and the float product of act_quant's codes) in fp8.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")
import triton.language as tl  # noqa: E402

from quantarena import primitives as P  # noqa: E402
from quantarena.kernels import ops, reference as R  # noqa: E402
from quantarena.kernels import triton_a8w8_gemv as G, triton_w4a16 as T4, triton_w8a8 as T8  # noqa: E402
from quantarena.kernels.triton_act_quant import act_quant  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by tests/kernels/conftest.py) or a GPU")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
FP8_TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def cfg_of(block_n: int, block_k: int, split: int, prefetch: bool = True, stages: int = 1) -> dict:
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=1, PREFETCH=prefetch,
                STAGES=stages)


def int8_operands(m: int, n: int, k: int, bias: bool, static: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    wq, ws = P.quantize_int8(torch.randn(n, k, generator=gen), "channel")
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    a_scale = torch.rand(m, 1, generator=gen).to(DEVICE)
    if static:   # as act_quant returns a static scale: one value, expanded (stride 0)
        a_scale = torch.tensor([[0.0173]], device=DEVICE).expand(m, 1)
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    return a.to(DEVICE), a_scale, wq.to(DEVICE), ws.to(DEVICE), b


def fp8_float_product(xq, xs, fq, fs, b):
    """The fp8 GEMM in float64: exact products of the e4m3 codes, then the scales (and bias)."""
    ref = (xq.double() @ fq.double().t()) * xs.double() * fs.double().reshape(1, -1)
    return ref if b is None else ref + b.double()


def counters_are_zero() -> bool:
    return int(T4.split_k_counters(torch.device(DEVICE)).abs().sum()) == 0


@pytest.mark.parametrize("m,n,k,block_n,block_k,split,bias,static,prefetch", [
    (1, 33, 64, 16, 256, 1, False, False, True),      # K shorter than a step (masked), ragged N
    (2, 100, 200, 32, 64, 2, True, False, True),      # ragged K and split, bias
    (3, 33, 4096, 16, 512, 4, False, True, True),     # static stride-0 scale, even split-K
    (4, 100, 200, 16, 128, 1, True, False, False),    # four rows, no prefetch
    (4, 40, 512, 32, 64, 2, False, False, False),     # even K, split-K, no prefetch (cp.async stages on a GPU)
])
def test_int8_gemv_equals_the_int8_gemm(m, n, k, block_n, block_k, split, bias, static, prefetch):
    a, a_scale, wq, ws, b = int8_operands(m, n, k, bias, static, seed=m * n + k)
    assert not static or a_scale.stride(0) == 0
    out = G.a8w8_gemv(a, a_scale, wq, ws, b, torch.float32,
                      cfg_of(block_n, block_k, split, prefetch, 1 if prefetch else 3))
    gemm = T8.int8_gemm(a, a_scale, wq, ws, b, torch.float32)
    assert torch.equal(out, gemm)
    if b is None:   # and the reference's exact product (with a bias the GPU fuses one fma)
        assert torch.equal(out, R.int8_matmul(a, wq).float() * a_scale * ws.reshape(1, -1))
    assert counters_are_zero()


def test_int8_gemv_default_config_and_bf16_output():
    a, a_scale, wq, ws, b = int8_operands(3, 72, 1024, True, False, seed=3)
    b = b.to(torch.bfloat16)
    out = G.a8w8_gemv(a, a_scale, wq, ws, b, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, T8.int8_gemm(a, a_scale, wq, ws, b, torch.bfloat16))
    assert counters_are_zero()


@pytest.mark.parametrize("m,n,k,block_k,split,bias,prefetch", [
    (1, 33, 64, 256, 1, False, True),
    (2, 100, 200, 64, 2, True, True),
    (3, 33, 4096, 512, 4, False, True),
    (4, 100, 200, 128, 1, True, False),
    (4, 40, 512, 64, 2, False, False),
])
def test_fp8_gemv_matches_the_float_product(m, n, k, block_k, split, bias, prefetch):
    gen = torch.Generator().manual_seed(m + n + k)
    fq, fs = P.quantize_fp8(torch.randn(n, k, generator=gen), "row")
    xq, xs = P.quantize_fp8(torch.randn(m, k, generator=gen), "row")
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    fq, fs, xq, xs = fq.to(DEVICE), fs.to(DEVICE), xq.to(DEVICE), xs.to(DEVICE)
    out = G.a8w8_gemv(xq, xs, fq, fs, b, torch.float32, cfg_of(16, block_k, split, prefetch, 1 if prefetch else 3))
    assert rel_err(out, fp8_float_product(xq, xs, fq, fs, b)) < FP8_TOL
    assert counters_are_zero()


def test_fp8_gemv_ragged_k_reads_stay_in_the_row():
    """Past K the activation index is clamped, not masked: a read past row 0's end would meet row 1's codes
    (here NaN, whose product with the zero-filled weight words is NaN) and poison row 0."""
    gen = torch.Generator().manual_seed(12)
    fq, fs = P.quantize_fp8(torch.randn(33, 200, generator=gen), "row")
    xq, xs = P.quantize_fp8(torch.randn(2, 200, generator=gen), "row")
    xq.view(torch.uint8)[1] = 0x7F                                            # row 1: all NaN codes
    fq, fs, xq, xs = fq.to(DEVICE), fs.to(DEVICE), xq.to(DEVICE), xs.to(DEVICE)
    out = G.a8w8_gemv(xq, xs, fq, fs, None, torch.float32, cfg_of(16, 64, 1))   # 50 words: the last step ragged
    assert rel_err(out[:1], fp8_float_product(xq[:1], xs[:1], fq, fs, None)) < FP8_TOL and bool(out[1].isnan().all())


@triton.jit
def _word_kernel(e_ptr, f_ptr, w_ptr, x_ptr, d_ptr, BLOCK: tl.constexpr, ASM: tl.constexpr):
    """f[4i + j] = e4m3 code j of word e[i]; d[i] = dp4a(d[i], w[i], x[i])."""
    r = tl.arange(0, BLOCK)
    f0, f1, f2, f3 = G._e4m3_floats(tl.load(e_ptr + r), ASM)
    tl.store(f_ptr + 4 * r, f0)
    tl.store(f_ptr + 4 * r + 1, f1)
    tl.store(f_ptr + 4 * r + 2, f2)
    tl.store(f_ptr + 4 * r + 3, f3)
    tl.store(d_ptr + r, G._dp4a(tl.load(d_ptr + r), tl.load(w_ptr + r), tl.load(x_ptr + r), ASM))


def test_word_helpers_decode_every_e4m3_code_and_dp4a_is_exact():
    """Every e4m3 code (NaNs included) decodes to torch's value (byte order = K order); dp4a on random words
    and on the extremes (-128 * -128 four times) adds the exact dot product of the signed bytes."""
    fp8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(9)
    wb = torch.randint(-128, 128, (256,), dtype=torch.int8, generator=gen)
    xb = torch.randint(-128, 128, (256,), dtype=torch.int8, generator=gen)
    wb[:4] = -128
    xb[:4] = -128
    acc = torch.randint(-2**20, 2**20, (64,), dtype=torch.int32, generator=gen)
    floats = torch.empty(256, dtype=torch.float32, device=DEVICE)
    d = acc.clone().to(DEVICE)
    _word_kernel[(1,)](fp8.view(torch.int32).to(DEVICE), floats, wb.view(torch.int32).to(DEVICE),
                       xb.view(torch.int32).to(DEVICE), d, BLOCK=64, ASM=not T4.INTERPRETING)
    assert torch.equal(floats.cpu().nan_to_num(), fp8.float().nan_to_num())
    assert torch.equal(floats.cpu().isnan(), fp8.float().isnan())
    ref = acc + (wb.int().reshape(64, 4) * xb.int().reshape(64, 4)).sum(1).int()
    assert torch.equal(d.cpu(), ref)
    assert int(ref[0] - acc[0]) == 4 * 128 * 128


def test_gemv_rejects_unsupported_shapes():
    a = torch.zeros(2, 66, dtype=torch.int8, device=DEVICE)
    w = torch.zeros(32, 66, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(2, 1, device=DEVICE)
    with pytest.raises(ValueError, match="K % 4"):
        G.a8w8_gemv(a, ones, w, torch.ones(32, device=DEVICE), None, torch.float32)
    a5 = torch.zeros(5, 64, dtype=torch.int8, device=DEVICE)
    w64 = torch.zeros(32, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        G.a8w8_gemv(a5, torch.ones(5, 1, device=DEVICE), w64, torch.ones(32, device=DEVICE), None, torch.float32)
    with pytest.raises(ValueError, match="both int8 or both fp8"):
        G.a8w8_gemv(a[:, :64], ones, w64.to(torch.float8_e4m3fn), torch.ones(32, device=DEVICE), None, torch.float32)
    with pytest.raises(ValueError, match="powers of two"):
        G.a8w8_gemv(a[:, :64].contiguous(), ones, w64, torch.ones(32, device=DEVICE), None, torch.float32,
                    cfg_of(16, 96, 1))
    assert not G.gemv_supported(a, w) and not G.gemv_supported(a5, w64) and G.gemv_supported(a[:, :64], w64)


def test_dispatch_routes_gemv_rows_to_the_gemv(monkeypatch):
    """A table entry ``gemv`` calls the GEMV with its tile where the GEMV takes the shape, else the defaults."""
    calls = []
    real = G.a8w8_gemv

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    cfg = cfg_of(16, 64, 2)
    monkeypatch.setattr(G, "a8w8_gemv", spy)
    monkeypatch.setattr(ops, "_a8w8_choice", lambda op, m, n, k, tuned=True: ("gemv", cfg))
    a, a_scale, wq, ws, _ = int8_operands(3, 40, 256, False, False, seed=4)
    out = ops._a8w8_gemm(a, a_scale, wq, ws, None, torch.float32)
    assert calls == [cfg] and torch.equal(out, T8.int8_gemm(a, a_scale, wq, ws, None, torch.float32))
    a, a_scale, wq, ws, _ = int8_operands(6, 40, 256, False, False, seed=5)  # M > 4: the tiled int8 default
    out = ops._a8w8_gemm(a, a_scale, wq, ws, None, torch.float32)
    assert calls == [cfg] and torch.equal(out, T8.int8_gemm(a, a_scale, wq, ws, None, torch.float32))
    assert counters_are_zero()


# ----------------------------------------------------------------------------- fused activation quantization

def fused_operands(m: int, n: int, k: int, fp8: bool, bias: bool, smooth: bool, static: bool, seed: int):
    """bf16 activations, int8 or fp8 weight codes and scales, float32 bias, smooth divisors, static scale
    (each or None). Row 0 holds ties: unsmoothed, its absmax 127 gives scale 1 and 2.5, -3.5, ... round to
    even; with the static scale 0.03, 0.375 / 0.03 is 12.5 only when divided correctly (x times the
    reciprocal rounds away)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    wq, ws = P.quantize_fp8(w, "row") if fp8 else P.quantize_int8(w, "channel")
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16)
    x[0, :8] = torch.tensor([127.0, 2.5, -3.5, 0.5, -126.5, 0.375, 1.875, -3.375])
    b = torch.randn(n, generator=gen) if bias else None
    s = torch.rand(k, generator=gen) + 0.5 if smooth else None
    input_scale = torch.tensor([0.03]) if static else None
    return tuple(None if t is None else t.to(DEVICE) for t in (x, wq, ws, b, s, input_scale))


@pytest.mark.parametrize("m,n,k,block_n,block_k,split,bias,smooth,static,prefetch", [
    (1, 33, 200, 16, 64, 1, False, False, False, True),    # ragged K (50 words, steps of 16) and N
    (2, 40, 200, 32, 64, 3, True, True, False, True),      # ragged split-K, bias, smooth
    (3, 33, 264, 16, 128, 2, False, True, True, True),     # static scale with smooth
    (2, 24, 128, 16, 64, 1, False, False, True, True),     # static scale: the ties of row 0
    (4, 17, 1000, 16, 256, 2, True, False, False, False),  # four rows, the scale's pass over four blocks
    (4, 40, 512, 16, 128, 4, False, False, False, True),   # even split-K
])
def test_fused_int8_gemv_equals_act_quant_then_the_gemv(m, n, k, block_n, block_k, split, bias, smooth, static,
                                                         prefetch):
    x, wq, ws, b, s, input_scale = fused_operands(m, n, k, False, bias, smooth, static, seed=m * n + k)
    cfg = cfg_of(block_n, block_k, split, prefetch)
    out = G.a8w8_gemv_quant(x, wq, ws, b, s, input_scale, cfg, out_dtype=torch.float32)
    xq, xs = act_quant(x, input_scale=input_scale, smooth=s)
    assert torch.equal(out, G.a8w8_gemv(xq, xs, wq, ws, b, torch.float32, cfg))
    rq, rs = R.act_quant_int8(x, input_scale, s)
    ref = R.int8_matmul(rq, wq).float() * rs * ws.reshape(1, -1)
    if b is None:
        assert torch.equal(out, ref)
    else:   # a GPU fuses the bias add into one fma
        assert (out - (ref + b)).abs().max() <= 2e-7 * (ref + b).abs().max()
    assert counters_are_zero()


@pytest.mark.parametrize("m,n,k,block_k,split,bias,smooth,static", [
    (1, 33, 200, 64, 1, False, False, False),
    (2, 40, 200, 64, 3, True, True, False),
    (4, 17, 1000, 256, 2, True, False, True),
])
def test_fused_fp8_gemv_matches_act_quant_then_the_gemv(m, n, k, block_k, split, bias, smooth, static):
    x, fq, fs, b, s, input_scale = fused_operands(m, n, k, True, bias, smooth, static, seed=m + n + k)
    cfg = cfg_of(16, block_k, split)
    out = G.a8w8_gemv_quant(x, fq, fs, b, s, input_scale, cfg, out_dtype=torch.float32)
    xq, xs = act_quant(x, fp8=True, input_scale=input_scale, smooth=s)
    assert rel_err(out, G.a8w8_gemv(xq, xs, fq, fs, b, torch.float32, cfg)) < FP8_TOL
    assert rel_err(out, fp8_float_product(xq, xs, fq, fs, b)) < FP8_TOL
    assert counters_are_zero()


def test_fused_gemv_rejects_unsupported_input():
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE)
    w = torch.zeros(32, 64, dtype=torch.int8, device=DEVICE)
    ws = torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        G.a8w8_gemv_quant(x.float(), w, ws, None)
    with pytest.raises(ValueError, match="int8 or fp8 e4m3 codes"):
        G.a8w8_gemv_quant(x, w.float(), ws, None)
    with pytest.raises(ValueError, match="one divisor per input feature"):
        G.a8w8_gemv_quant(x, w, ws, None, smooth=torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="one per-tensor scale"):
        G.a8w8_gemv_quant(x, w, ws, None, input_scale=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="1 to 4 rows"):
        G.a8w8_gemv_quant(torch.zeros(5, 64, dtype=torch.bfloat16, device=DEVICE), w, ws, None)
    with pytest.raises(ValueError, match="K % 4"):
        G.a8w8_gemv_quant(torch.zeros(2, 66, dtype=torch.bfloat16, device=DEVICE),
                          torch.zeros(32, 66, dtype=torch.int8, device=DEVICE), ws, None)


def test_dispatch_routes_gemv_q_rows_to_the_fused_gemv(monkeypatch):
    """A table entry ``gemv_q``: the eager int8 and fp8 ops run the fused GEMV with its tile (M <= 4), the
    GEMM-only entry point (quantized codes, as under torch.compile) the plain GEMV with it; M > 4 quantizes
    first and gets the defaults."""
    fused, plain = [], []
    real_fused, real_plain = G.a8w8_gemv_quant, G.a8w8_gemv

    def spy_fused(*args):
        fused.append(args[-1])
        return real_fused(*args)

    def spy_plain(*args):
        plain.append(args[-1])
        return real_plain(*args)

    cfg = cfg_of(16, 64, 2)
    monkeypatch.setattr(G, "a8w8_gemv_quant", spy_fused)
    monkeypatch.setattr(G, "a8w8_gemv", spy_plain)
    monkeypatch.setattr(ops, "_a8w8_choice", lambda op, m, n, k, tuned=True: ("gemv_q", cfg))
    x, wq, ws, _, s, _ = fused_operands(3, 40, 256, False, False, True, False, seed=7)
    out = ops._w8a8_op(x, wq, ws, None, s, None)
    assert fused == [cfg] and not plain and out.dtype == torch.bfloat16
    xq, xs = act_quant(x, smooth=s)
    assert torch.equal(out, real_plain(xq, xs, wq, ws, None, torch.bfloat16, cfg))
    assert torch.equal(ops._a8w8_gemm(xq, xs, wq, ws, None, torch.bfloat16), out) and plain == [cfg]
    x5 = torch.cat([x, x[:2]])
    xq, xs = act_quant(x5, smooth=s)
    assert torch.equal(ops._w8a8_op(x5, wq, ws, None, s, None), T8.int8_gemm(xq, xs, wq, ws, None, torch.bfloat16))
    assert fused == [cfg] and plain == [cfg]
    _, fq, fs, _, _, _ = fused_operands(2, 40, 256, True, False, False, False, seed=8)
    out = ops._fp8_op(x[:2], fq, fs, None)
    xq, xs = act_quant(x[:2], fp8=True)
    assert fused == [cfg, cfg] and rel_err(out, real_plain(xq, xs, fq, fs, None, torch.bfloat16, cfg)) < 1e-2
    assert counters_are_zero()
