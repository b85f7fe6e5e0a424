"""Triton kernels against the torch reference, under TRITON_INTERPRET=1 at small ragged shapes.

Integer accumulation must match exactly; bf16 outputs within REL_TOL (relative Frobenius error), which
covers the final bf16 rounding of both sides (one bf16 ulp is 2^-8 relative). Speed is measured on the GPU
by ``quantarena bench kernels``, never here.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

from quantarena import primitives as P  # noqa: E402
from quantarena.kernels import ops, reference as R  # noqa: E402
from quantarena.kernels import triton_act_quant as AQ, triton_w4a16 as T4, triton_w8a8 as T8  # noqa: E402
from quantarena.kernels import triton_a8w8_gemv as GV  # noqa: E402
from quantarena.kernels import triton_w4a16_gemv as G3, triton_w4a16_tc as TC  # noqa: E402

REL_TOL = 8e-3

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by tests/kernels/conftest.py) or a GPU")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def same_bf16(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Bit for bit on the GPU; within one bf16 step under the interpreter, whose float32 -> bf16 conversion
    truncates where the GPU rounds to nearest even."""
    if DEVICE == "cuda":
        return torch.equal(out, ref)
    return torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=0)


def make_w4(n: int, k: int, group: int, symmetric: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    q, s, z = P.quantize_int4(w, group, symmetric)
    return P.pack_int4(q).to(DEVICE), s.to(torch.bfloat16).to(DEVICE), (None if symmetric else z.to(DEVICE))


def make_x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(DEVICE)


# ----------------------------------------------------------------------------- W4A16

@pytest.mark.parametrize("group", [32, 64, 128])
def test_striped_layout_is_a_permutation_of_the_codes(group):
    packed, _, _ = make_w4(6, 256, group, True)
    striped = T4.repack_striped(packed, 256, T4.stripe_size(group))
    codes = P.unpack_int4(striped)                      # [N, K] in striped order
    s = T4.stripe_size(group)
    k = torch.arange(256).reshape(256 // s, 8, s // 8).transpose(1, 2).reshape(-1)  # striped position -> k
    assert torch.equal(codes, P.unpack_int4(packed)[:, k])


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,group,symmetric,bias", [
    (40, 384, 128, True, False),    # ragged N, K not a multiple of the widest tile
    (33, 256, 64, False, True),     # asymmetric, bias, odd N
    (16, 512, 32, True, True),
])
def test_w4a16_gemv_matches_reference(m, n, k, group, symmetric, bias):
    packed, scales, zeros = make_w4(n, k, group, symmetric)
    x = make_x(m, k)
    b = torch.randn(n).to(torch.bfloat16).to(DEVICE) if bias else None
    ref = R.w4a16_linear(x, packed, scales, zeros, group, b)
    w = T4.StripedWeight(packed, scales, zeros, group)
    out = T4.w4a16_gemv(x, w, b)
    assert rel_err(out, ref) < REL_TOL


def test_w4a16_gemv_split_k_leaves_counters_zero():
    packed, scales, zeros = make_w4(40, 512, 128, True)
    x = make_x(1, 512)
    w = T4.StripedWeight(packed, scales, zeros, 128)
    cfg = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_KW=16, SPLIT_K=4, num_warps=4, num_stages=1)
    out = T4.w4a16_gemv(x, w, None, cfg)
    assert rel_err(out, R.w4a16_linear(x, packed, scales, zeros, 128)) < REL_TOL
    assert int(T4.split_k_counters(x.device).abs().sum()) == 0


@pytest.mark.parametrize("m,n,k,group,symmetric,bias,cfg", [
    (1, 40, 384, 128, True, False, None),     # ragged N, default config
    (3, 33, 256, 64, False, True, None),      # asymmetric, bias, odd N, BLOCK_M 4
    (16, 16, 512, 32, True, True, None),      # 16 rows, small groups (several groups per step)
    (9, 40, 512, 128, False, False, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_KW=16, SPLIT_K=4, num_warps=4)),
    (5, 24, 1024, 256, True, True, dict(BLOCK_M=8, BLOCK_N=8, BLOCK_KW=16, SPLIT_K=3, num_warps=4)),  # group > step
])
def test_w4a16_gemv2_matches_reference(m, n, k, group, symmetric, bias, cfg):
    packed, scales, zeros = make_w4(n, k, group, symmetric)
    x = make_x(m, k)
    b = torch.randn(n).to(torch.bfloat16).to(DEVICE) if bias else None
    w = T4.StripedWeight(packed, scales, zeros, group)
    out = T4.w4a16_gemv2(x, w, b, cfg)
    assert rel_err(out, R.w4a16_linear(x, packed, scales, zeros, group, b)) < REL_TOL
    assert_split_k_state_clean(x.device)


@pytest.mark.parametrize("n,k,group,symmetric,bias,cfg", [
    (40, 384, 128, True, False, None),   # ragged N, default config (tiled layout)
    (33, 256, 64, False, True, dict(BLOCK_N=16, SUB=4, BLOCK_KW=16, SPLIT_K=3, num_warps=4, PREFETCH=True)),
    (200, 1024, 32, False, True, dict(BLOCK_N=64, SUB=2, BLOCK_KW=32, SPLIT_K=2, num_warps=4, PREFETCH=False,
                                      STAGES=2, TILED=True)),      # several groups per step, cp.async pipeline
    (96, 2048, 256, True, False, dict(BLOCK_N=32, SUB=1, BLOCK_KW=16, SPLIT_K=8, num_warps=4, PREFETCH=True,
                                      TILED=True)),                # group spans several steps
])
def test_w4a16_gemv3_matches_reference(n, k, group, symmetric, bias, cfg):
    packed, scales, zeros = make_w4(n, k, group, symmetric)
    x = make_x(1, k)
    b = torch.randn(n).to(torch.bfloat16).to(DEVICE) if bias else None
    w = T4.StripedWeight(packed, scales, zeros, group)
    out = G3.w4a16_gemv3(x, w, b, cfg)
    assert rel_err(out, R.w4a16_linear(x, packed, scales, zeros, group, b)) < REL_TOL
    assert_split_k_state_clean(x.device)


@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic dependent launch and CUDA graphs need a GPU")
@pytest.mark.parametrize("pdl", [True, False])
def test_w4a16_gemv3_pdl_waits_for_the_kernel_writing_its_input(pdl):
    """Launched as a dependent launch right after the kernels that write x (and re-zero the output of the
    previous replay), inside a CUDA graph: every replay must see this replay's x."""
    n, k = 4096, 4096
    packed, scales, _ = make_w4(n, k, 128, True)
    w = T4.StripedWeight(packed, scales, None, 128)
    cfg = dict(G3.gemv3_config(n, k, w.stripe, torch.cuda.get_device_properties(0).multi_processor_count),
               PDL=pdl)
    src = torch.randn(8, 1, k, device=DEVICE).to(torch.bfloat16)
    i = torch.zeros((), dtype=torch.long, device=DEVICE)
    x = torch.empty(1, k, device=DEVICE, dtype=torch.bfloat16)
    G3.w4a16_gemv3(x.copy_(src[0]), w, None, dict(cfg))        # compile and build the tiled layout
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(torch.index_select(src, 0, i.view(1))[0] * 2.0)   # kernels that write x right before the GEMV
        out = G3.w4a16_gemv3(x, w, None, dict(cfg))
    for step in range(8):
        i.fill_(step)
        graph.replay()
        ref = R.w4a16_linear(src[step] * 2.0, packed, scales, None, 128)
        assert rel_err(out, ref) < REL_TOL, step


def test_w4a16_gemv3_tiled_layout_is_a_permutation():
    words = torch.arange(40 * 24, dtype=torch.int32).reshape(40, 24)
    t = G3.tile_words(words, 16, 8)                       # N padded 40 -> 48 with zero words
    assert t.shape == (48, 24)
    tiles = t.reshape(3, 3, 16, 8)                        # [N tile, K step, row, word]
    assert torch.equal(tiles[1, 2], words[16:32, 16:24]) and torch.equal(tiles[2, 0, :8], words[32:, :8])
    assert int(tiles[2, 0, 8:].abs().sum()) == 0


def test_w4a16_gemv3_nibble_asm_decodes_every_code():
    """The PTX that builds f = 1 + u/128 (GPU only) emulated bit by bit: lop3 (a & b) | c, shr, prmt."""
    import re
    import struct

    asm = G3._asm_nibble_floats()
    regs = {}

    def val(tok):
        return int(tok, 16) if tok.startswith("0x") else regs[tok]
    word = 0x89ABCDEF ^ 0x13572468
    regs["$8"] = word
    for ins in asm.replace("\n", ";").split(";"):
        parts = re.findall(r"[$\w]+", ins)
        if not parts or parts[0] not in ("mov", "lop3", "shr", "prmt"):
            continue
        op, args = parts[0], parts[2:] if parts[1] in ("b32", "u32") else parts[1:]
        if op == "mov":
            regs[args[0]] = val(args[1])
        elif op == "lop3":
            assert args[4] == "0xEA"
            regs[args[0]] = (val(args[1]) & val(args[2])) | val(args[3])
        elif op == "shr":
            regs[args[0]] = val(args[1]) >> int(args[2])
        else:
            src = [(val(args[1]) >> 8 * i) & 0xFF for i in range(4)] + [(val(args[2]) >> 8 * i) & 0xFF for i in range(4)]
            sel = val(args[3])
            regs[args[0]] = sum(src[(sel >> 4 * i) & 7] << 8 * i for i in range(4))
    for j in range(8):
        f = struct.unpack("<f", struct.pack("<I", regs[f"${j}"]))[0]
        assert f == 1 + ((word >> 4 * j) & 0xF) / 128, j


def test_w4a16_dispatch_by_m():
    assert ops.w4a16_path(1, 1024, 4096) == "gemv3"       # the GEMV where the table says so at one row
    assert ops.w4a16_path(1, 4096, 4096) == "tc"           # the tensor-core tile where it won there
    assert ops.w4a16_path(1, 96, 256) == "gemv3"           # untuned shape at one row: the GEMV
    assert ops.w4a16_path(3, 4096, 4096) == "tc" and ops.w4a16_path(16, 4096, 14336) == "tc"
    assert ops.w4a16_path(100, 96, 256) == "tc"          # untuned shape: the default by M
    assert ops.w4a16_path(5000, 4096, 4096) == "dequant"
    assert ops.w4a16_path(512, 4096, 4096, tuned_table=False) == "dequant"   # non-Hopper GPUs: defaults only
    assert ops.w4a16_path(512, 4096, 4096) == "tc"          # the table overrides the default by M
    assert ops.w4a16_path(512, 1024, 4096) == "dequant" and ops.w4a16_path(256, 1024, 4096) == "tc"


def test_w4a16_tuned_table_is_consistent():
    from quantarena.kernels import tuned_w4a16 as TW

    assert TW.TABLE, "the dispatch table is empty"
    for (m, n, k), (path, cfg) in TW.TABLE.items():
        assert m in TW.BUCKETS and path in ("gemv2", "gemv3", "tc", "dequant") and (m == 1 or "gemv" not in path)
        if path == "tc":
            assert 128 % cfg["BLOCK_K"] == 0 and k % cfg["BLOCK_K"] == 0 and cfg["UNPACK"] in (1, 2, 3)
            assert cfg["UNPACK"] != 3 or (cfg["BLOCK_K"] == 128 and cfg["BLOCK_N"] % 16 == 0)
            assert not cfg.get("TILED") or cfg["UNPACK"] == 3
            # an ATOMIC tile's whole output fits the shared workspace (else it would silently run the slot sums)
            assert not cfg.get("ATOMIC") or (cfg["SPLIT_K"] > 1 and m * n <= T4.ATOMIC_WS_WORDS)
    assert TW.lookup(3, 4096, 4096) == TW.TABLE.get((4, 4096, 4096)) and TW.lookup(3, None, 4096) is None


@pytest.mark.parametrize("path", ["gemv3", "gemv2", "tc", "dequant", "gemv"])
def test_w4a16_every_path_runs_through_the_op(path):
    packed, scales, zeros = make_w4(24, 256, 64, False)
    x = make_x(1 if path in ("gemv2", "gemv3") else 3, 256)
    out = ops._w4a16_op(x, packed, scales, zeros, 64, None, None, path)
    assert rel_err(out, R.w4a16_linear(x, packed, scales, zeros, 64)) < REL_TOL


def test_w4a16_kernel_layout_cache_frees_with_the_weight():
    """The cache keyed on a packed weight must not keep it alive (it leaked whole models before)."""
    import gc

    before = len(ops._W4A16_CACHE)
    packed, scales, zeros = make_w4(24, 256, 64, True)
    ops._w4a16_op(make_x(3, 256), packed, scales, zeros, 64, None, None, "tc")
    assert len(ops._W4A16_CACHE) == before + 1
    del packed
    gc.collect()
    assert len(ops._W4A16_CACHE) == before


@pytest.mark.parametrize("m,n,split,block_k,group,symmetric,unpack,scale_w,tma", [
    (1, 72, 1, 128, 128, True, 1, False, False),     # ragged N, one row
    (5, 72, 2, 64, 128, False, 1, False, False),     # asymmetric, split-K, nibble planes joined
    (17, 40, 4, 32, 64, True, 2, False, False),      # ragged M across two row tiles, small groups (PTX on a GPU)
    (33, 64, 1, 64, 64, False, 1, False, False),
    (5, 72, 2, 64, 128, False, 2, True, False),      # scale folded into the bf16 weight, the dot accumulates
    (17, 40, 1, 32, 64, True, 2, True, False),
    (3, 40, 2, 64, 64, False, 1, True, False),
    (17, 72, 2, 64, 128, False, 2, False, True),     # tiles through tensor descriptors, zero-filled past M, N
    (5, 40, 1, 32, 64, True, 2, True, True),
])
def test_w4a16_tc_matches_reference(m, n, split, block_k, group, symmetric, unpack, scale_w, tma):
    check_tc(m, n, group, symmetric, True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, SPLIT_K=split,
                                                UNPACK=unpack, SCALE_W=scale_w, TMA=tma))


def check_tc(m: int, n: int, group: int, symmetric: bool, bias: bool, cfg: dict, k: int = 512) -> None:
    """The tc kernel with tile ``cfg`` (4 warps, 1 stage) against the reference; split-K counters left at 0."""
    packed, scales, zeros = make_w4(n, k, group, symmetric)
    x = make_x(m, k)
    b = torch.randn(n).to(torch.bfloat16).to(DEVICE) if bias else None
    w = T4.StripedWeight(packed, scales, zeros, group)
    out = TC.w4a16_tc(x, w, b, dict(cfg, num_warps=4, num_stages=1))
    assert rel_err(out, R.w4a16_linear(x, packed, scales, zeros, group, b)) < REL_TOL
    assert_split_k_state_clean(x.device)


def assert_split_k_state_clean(device: torch.device) -> None:
    """Between launches every split-K arrival counter and the ATOMIC workspace are zero again."""
    assert T4.split_k_dirty(device) is None


@pytest.mark.parametrize("m,n,split,block_m,block_n,tiled,scale_w", [
    (3, 72, 2, 16, 32, True, False),      # ragged N, exact codes
    (17, 48, 3, 16, 16, True, True),      # ragged M across two row tiles, three splits
    (5, 64, 4, 16, 64, False, True),      # the untiled words, one K step per split
])
def test_w4a16_tc_atomic_split_k_matches_reference(m, n, split, block_m, block_n, tiled, scale_w):
    # partials added into one zeroed workspace; run twice: the first launch must leave it zero for the second
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=scale_w, TMA=False,
               TILED=tiled, ATOMIC=True)
    for _ in range(2):
        check_tc(m, n, 128, False, True, cfg)


@pytest.mark.parametrize("m,n,split,block_n,tiled,atomic,bias", [
    (1, 72, 1, 32, True, False, False),     # one row, ragged N (the last tile holds 4 gate/up pairs)
    (5, 64, 2, 32, True, True, True),       # ATOMIC split-K: the gate applied by the last program, once
    (17, 48, 3, 16, False, False, False),   # ragged M over two row tiles, split-K slots
])
def test_w4a16_tc_gated_epilogue(m, n, split, block_n, tiled, atomic, bias):
    """Rows interleaving gate and up: the kernel writes silu(gate) * up [M, N/2] from its float32 sums."""
    k, group = 512, 128
    packed, scales, zeros = make_w4(n, k, group, False)
    x = make_x(m, k)
    b = torch.randn(n).to(torch.bfloat16).to(DEVICE) if bias else None
    w = T4.StripedWeight(packed, scales, zeros, group)
    cfg = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=False, TMA=False,
               TILED=tiled, ATOMIC=atomic, num_warps=4, num_stages=1)
    out = TC.w4a16_tc(x, w, b, cfg, gated=True)
    ref = R.silu_mul_interleaved(R.w4a16_linear(x, packed, scales, zeros, group, b).float())
    assert out.shape == (m, n // 2) and rel_err(out, ref) < REL_TOL
    assert_split_k_state_clean(x.device)
    with pytest.raises(ValueError, match="even number of outputs"):
        TC.w4a16_tc(x, T4.StripedWeight(*make_w4(n - 1, k, group, True), group), None, cfg, gated=True)


@pytest.mark.parametrize("m,n,split,block_n,tiled,atomic,delta,gated,scale_w,bias", [
    (1, 72, 1, 32, True, False, True, False, False, False),   # one row, ragged N, the residual add
    (1, 64, 4, 32, True, True, True, True, False, True),      # ATOMIC split-K: the sums of squares meet in slots
    (5, 72, 2, 16, False, False, False, False, True, True),   # split-K slots, no delta, the scale in the weight
    (17, 48, 3, 16, True, True, True, False, False, False),   # ragged M over two row tiles
])
def test_w4a16_tc_norm_prologue(m, n, split, block_n, tiled, atomic, delta, gated, scale_w, bias):
    """Residual add + RMSNorm folded into the tensor-core kernel: out equals linear(rms_norm(x + delta)) up to
    16-bit rounding, x + delta is written bit for bit, and every split-K slot is left zero."""
    k, group, eps = 512, 128, 1e-5
    packed, scales, zeros = make_w4(n, k, group, False)
    rows = torch.logspace(-2, 2, m).to(DEVICE)[:, None]                  # a different rsqrt per row
    x = (make_x(m, k).float() * rows).to(torch.bfloat16)
    d = (make_x(m, k, seed=7).float() * rows).to(torch.bfloat16) if delta else None
    nw = (1 + 0.5 * make_x(1, k, seed=3).float()[0]).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16).to(DEVICE) if bias else None
    w = T4.StripedWeight(packed, scales, zeros, group)
    cfg = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=scale_w, TMA=True,
               TILED=tiled, ATOMIC=atomic, num_warps=4, num_stages=1)
    for _ in range(2):   # the second launch needs the slots the first one used back at zero
        out, x_new = TC.w4a16_tc_norm(x, d, nw, eps, w, b, cfg, gated=gated)
        check_norm_linear(out, x_new, x, d, nw, eps, (packed, scales, zeros, group), b, gated, scale_w)
        assert_split_k_state_clean(x.device)
    with pytest.raises(ValueError, match="norm weight must have shape"):
        TC.w4a16_tc_norm(x, d, nw[:-1], eps, w, b, cfg)
    with pytest.raises(ValueError, match="residual delta"):
        TC.w4a16_tc_norm(x, x[:, :-1], nw, eps, w, b, cfg)


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 values as the kernels convert: rounded to nearest even on the GPU, truncated under the
    interpreter."""
    if DEVICE == "cuda":
        return t.to(torch.bfloat16).float()
    return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)


def check_norm_linear(out, x_new, x, d, nw, eps, weight, b, gated, scale_w: bool = False) -> None:
    """A folded add + RMSNorm + W4A16 linear: x + delta as the reference rounds it; out equal (up to float32
    summation order) to the fold's own arithmetic in torch (bf16(x * norm_weight) into the dot, the row's rsqrt on
    the float32 sums; ``scale_w``: the dequantized weight rounded to bf16 too); and on the GPU out as close to the float32 result as the separate bf16 ops are, or within
    REL_TOL (the fold rounds x * norm_weight where they round the normed x)."""
    packed, scales, zeros, group = weight
    y, ref_x = R.add_rms_norm(x, d, nw, eps)
    xf = ref_x.float() if DEVICE == "cuda" or d is None else to_bf16(x.float() + d.float())   # the kernel's x
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    wd = R.w4a16_dequant(packed, scales, zeros, group, x.shape[-1]).t()
    bias = 0 if b is None else b.float()
    fold = to_bf16(xf * nw.float()) @ (to_bf16(wd) if scale_w else wd) * rstd + bias
    exact = xf * rstd * nw.float() @ wd + bias
    ref = R.w4a16_linear(y, packed, scales, zeros, group, b).float()
    if gated:
        fold, exact, ref = (R.silu_mul_interleaved(t) for t in (fold, exact, ref))
    assert out.shape == exact.shape and rel_err(out, to_bf16(fold)) < 2e-3, rel_err(out, to_bf16(fold))
    if DEVICE == "cuda":
        assert rel_err(out, exact) < max(REL_TOL, 1.5 * rel_err(to_bf16(ref), exact))
    assert x_new is x if d is None else same_bf16(x_new, ref_x)


@pytest.mark.parametrize("m,split_o,split_g,block_n,bias", [
    (1, 1, 1, 32, False),     # one row
    (5, 2, 3, 16, True),      # split-K in both launches, bias on the delta's linear
    (17, 1, 2, 32, False),    # ragged M over two row tiles
])
def test_w4a16_tc_norm_across_two_launches(m, split_o, split_g, block_n, bias):
    """RES_NORM + ROW_SS: the delta's linear adds the residual and writes x * norm_weight and each column tile's
    squares; the next linear scales its sums by the rows' rsqrt. x bit for bit as the separate ops round it, the
    output as the fold's own arithmetic, every split-K slot left zero."""
    k1, h, n2, group, eps = 256, 384, 96, 128, 1e-5
    wo = T4.StripedWeight(*make_w4(h, k1, group, False), group)
    wg_packed, wg_scales, wg_zeros = make_w4(n2, h, group, True, seed=4)
    wg = T4.StripedWeight(wg_packed, wg_scales, wg_zeros, group)
    attn, res = make_x(m, k1), (make_x(m, h, seed=6).float() * 4).to(torch.bfloat16)
    nw = (1 + 0.5 * make_x(1, h, seed=3).float()[0]).to(torch.bfloat16)
    b = torch.randn(h).to(torch.bfloat16).to(DEVICE) if bias else None
    cfg = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, UNPACK=3, SCALE_W=False, TMA=True, TILED=True,
               num_warps=4, num_stages=1)   # split-K slots added in split order: the plain launch's o bit for bit
    for _ in range(2):
        y, x_new, parts = TC.w4a16_tc_res_norm(attn, res, nw, wo, b, dict(cfg, SPLIT_K=split_o))
        out = TC.w4a16_tc(y, wg, None, dict(cfg, SPLIT_K=split_g), gated=True, row_ss=(parts, eps))
        o = TC.w4a16_tc(attn, wo, b, dict(cfg, SPLIT_K=split_o))                  # the same linear, plain
        assert torch.equal(x_new.float(), to_bf16(res.float() + o.float()))
        assert parts.shape == (triton.cdiv(h, block_n), m)
        xf = x_new.float()
        assert torch.equal(y.float(), to_bf16(xf * nw.float()))
        assert torch.allclose(parts.sum(0), xf.pow(2).sum(-1), rtol=1e-5)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        fold = R.silu_mul_interleaved(y.float() @ R.w4a16_dequant(wg_packed, wg_scales, wg_zeros, group, h).t() * rstd)
        assert out.shape == (m, n2 // 2) and rel_err(out, to_bf16(fold)) < 2e-3
        assert_split_k_state_clean(attn.device)
    with pytest.raises(ValueError, match="the residual must be"):
        TC.w4a16_tc_res_norm(attn, res[:, :-1], nw, wo, b, dict(cfg, SPLIT_K=1))
    with pytest.raises(ValueError, match="row_ss must be"):
        TC.w4a16_tc(y, wg, None, dict(cfg, SPLIT_K=1), row_ss=(parts.double(), eps))


def test_w4a16_norm_linear_op_matches_reference_and_fake():
    n, k, group, eps = 72, 256, 128, 1e-6
    _, tiled, packed, scales, zeros = kernel_only(n, k, group, True)
    x, d = make_x(3, k), make_x(3, k, seed=5)
    nw = (1 + 0.5 * make_x(1, k, seed=3).float()[0]).to(torch.bfloat16)
    out, x_new = ops._w4a16_norm_tiled_op(x, d, nw, eps, tiled, scales, zeros, group, n, None)
    check_norm_linear(out, x_new, x, d, nw, eps, (packed, scales, zeros, group), None, False)
    out, empty = ops._w4a16_norm_tiled_op(x, None, nw, eps, tiled, scales, zeros, group, n, None, gated=True)
    assert empty.numel() == 0
    check_norm_linear(out, x, x, None, nw, eps, (packed, scales, zeros, group), None, True)
    for delta in (d, None):
        torch.library.opcheck(ops._w4a16_norm_tiled_op, (x, delta, nw, eps, tiled, scales, zeros, group, n, None),
                              test_utils=("test_schema", "test_faketensor"))


def test_w4a16_norm_fold_pays_only_for_short_k_loops(monkeypatch):
    """The fold is chosen where each program walks at most NORM_FOLD_MAX_STEPS K steps of the tensor-core tile."""
    x = make_x(1, 256)
    assert ops.w4a16_norm_fold_pays(1, 96, 256, 128, x)                       # the default tile: 2 steps
    assert not ops.w4a16_norm_fold_pays(300, 96, 256, 128, x)                 # dequantize + cuBLAS
    for split, pays in ((8, True), (4, False)):                               # 32 steps of 128 in 8 or 4 splits
        monkeypatch.setattr(ops, "w4a16_tiled_config", lambda *a, s=split: ("tc", {"BLOCK_K": 128, "SPLIT_K": s}))
        assert ops.w4a16_norm_fold_pays(1, 6144, 4096, 128, x) is pays


def test_interleave_gate_up_is_the_gated_layout():
    w = torch.arange(12.0).reshape(6, 2)                               # gate rows 0-2, up rows 3-5
    assert torch.equal(R.interleave_gate_up(w)[:, 0], torch.tensor([0.0, 6, 2, 8, 4, 10]))
    h = torch.randn(3, 8)
    gate, up = h.chunk(2, -1)
    inter = torch.stack((gate, up), -1).flatten(-2)                   # [g0, u0, g1, u1, ...]
    assert torch.equal(R.silu_mul_interleaved(inter), R.silu_mul(h))
    with pytest.raises(ValueError, match="even number of outputs"):   # the op's CPU and dequantize paths end here
        R.silu_mul_interleaved(torch.randn(2, 7))


def test_dot_layout_words_is_the_documented_permutation():
    packed, _, _ = make_w4(5, 384, 128, True)
    dot = TC.dot_layout_words(packed, rows_per_chunk=2)              # chunked like a large weight
    codes = P.unpack_int4(dot).reshape(5, 3, 4, 4, 2, 2, 2)          # [n, step, t, jp | e, jj, h]
    t, jp, e, jj, h = torch.meshgrid(*(torch.arange(v) for v in (4, 4, 2, 2, 2)), indexing="ij")
    k = 32 * jp + 16 * jj + 8 * h + 2 * t + e                         # the k each nibble holds
    want = P.unpack_int4(packed).reshape(5, 3, 128)[:, :, k.reshape(-1)].reshape(codes.shape)
    assert torch.equal(codes, want)


@pytest.mark.parametrize("m,n,split,symmetric,bias,block_n,block_m,tiled,scale_w", [
    (1, 72, 1, True, False, 32, 16, False, True),     # ragged N, one row
    (17, 72, 2, False, True, 32, 16, False, True),    # asymmetric, bias, split-K, ragged M across two row tiles
    (5, 64, 3, False, False, 64, 16, False, True),    # three K splits of four steps
    (40, 48, 1, True, True, 16, 32, False, True),     # the smallest tile: one 16-row block
    (3, 72, 2, False, True, 32, 16, True, True),      # words tile after tile: ragged N (zero-padded), split-K
    (17, 48, 3, True, False, 16, 16, True, True),
    (5, 72, 2, False, True, 32, 16, True, False),     # exact codes, the fp32 partial scaled per step
    (2, 40, 1, True, False, 16, 16, False, False),
    (3, 150, 2, False, False, 64, 16, 32, False),     # blocks of 32 rows under 64-row tiles (the last one padded)
])
def test_w4a16_tc_dot_layout_matches_reference(m, n, split, symmetric, bias, block_n, block_m, tiled, scale_w):
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=scale_w, TMA=False,
               TILED=bool(tiled))
    if tiled and tiled is not True:
        cfg["TILE_ROWS"] = tiled
    check_tc(m, n, 128, symmetric, bias, cfg)


def test_dot_tiled_words_puts_each_block_in_one_piece():
    packed, _, _ = make_w4(40, 512, 128, True)
    dot = TC.dot_layout_words(packed)
    tiled = TC.dot_tiled_words(dot, 16)                               # 40 rows padded to 128: 8 blocks of 16
    blocks = tiled.reshape(8, 4, 16, 16)                              # [row block, K step, row, word]
    assert torch.equal(blocks[1, 2], dot[16:32, 32:48])
    assert torch.equal(blocks[2, 3, :8], dot[32:40, 48:64]) and not blocks[2, :, 8:].any() and not blocks[3:].any()


def kernel_only(n: int, k: int, group: int, symmetric: bool):
    """A weight held only in the TILED tensor-core layout, and its canonical tensors."""
    from quantarena.kernels import w4a16_layout as L

    packed, scales, zeros = make_w4(n, k, group, symmetric)
    tiled = L.dot_tiled_from_canonical(packed)
    return T4.StripedWeight.from_dot_tiled(tiled, n, scales, zeros, group), tiled, packed, scales, zeros


@pytest.mark.parametrize("n,k,group,symmetric", [(40, 384, 128, True), (150, 256, 256, False), (16, 128, 128, False)])
def test_w4a16_dequant_from_the_tiled_layout_equals_the_canonical_dequant(n, k, group, symmetric):
    w, _, packed, scales, zeros = kernel_only(n, k, group, symmetric)
    dense = TC.w4a16_dequantize_tiled(w)
    assert torch.equal(dense, T4.w4a16_dequantize(T4.StripedWeight(packed, scales, zeros, group)))   # bit for bit
    assert torch.allclose(dense.float(), R.w4a16_dequant(packed, scales, zeros, group, k), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("m,bias", [(3, True), (300, False)])   # the tensor-core kernel; dequantize + matmul
def test_w4a16_kernel_only_weight_through_the_op(m, bias):
    n, k, group = 72, 256, 128
    w, tiled, packed, scales, zeros = kernel_only(n, k, group, False)
    x = make_x(m, k)
    b = torch.randn(n).to(torch.bfloat16).to(DEVICE) if bias else None
    assert ops.w4a16_tiled_config(m, n, k, group, x)[0] == ("tc" if m == 3 else "dequant")
    out = ops._w4a16_tiled_op(x, tiled, scales, zeros, group, n, b)
    assert rel_err(out, R.w4a16_linear(x, packed, scales, zeros, group, b)) < REL_TOL
    with pytest.raises(RuntimeError, match="only in the tensor-core kernel's layout"):
        w.canonical
    with pytest.raises(RuntimeError, match="only in the tensor-core kernel's layout"):   # another block height
        w.dot_tiled(32)


def test_w4a16_kernel_layout_custom_op_fake_impl():
    _, tiled, _, scales, zeros = kernel_only(72, 256, 128, False)
    torch.library.opcheck(ops._w4a16_tiled_op, (make_x(3, 256), tiled, scales, zeros, 128, 72, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops._w4a16_tiled_op, (make_x(3, 256), tiled, scales, zeros, 128, 72, None),
                          {"gated": True}, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("m", [3, 300])   # the tensor-core kernel's epilogue; dequantize + matmul, then the gate
def test_w4a16_kernel_only_weight_gated_through_the_op(m):
    n, k, group = 72, 256, 128
    _, tiled, packed, scales, zeros = kernel_only(n, k, group, True)
    x = make_x(m, k)
    ref = R.silu_mul_interleaved(R.w4a16_linear(x, packed, scales, zeros, group).float())
    out = ops.w4a16_linear_tiled(x, tiled, scales, zeros, group, n, gated=True)
    assert out.shape == (m, n // 2) and rel_err(out, ref) < REL_TOL


@pytest.mark.parametrize("m", [2, 70])
def test_w4a16_tc_hopper_default_tile_is_the_tiled_dot_layout(m):
    cfg = TC.tc_config(m, 72, 512, 128, 8, hopper=True)
    assert cfg["UNPACK"] == 3 and cfg["TILED"] and cfg["BLOCK_K"] == 128 and cfg["SCALE_W"] == (m > 64)
    assert TC.tc_config(m, 72, 512, 64, 8, hopper=True)["UNPACK"] == 2           # 64-wide groups: no UNPACK 3
    assert TC.tc_config(m, 72, 512, 128, 8)["UNPACK"] == 2                      # other GPUs: the earlier default
    check_tc(m, 72, 128, False, True, cfg)


@pytest.mark.parametrize("n,group,tile,match", [
    (64, 128, dict(BLOCK_N=48, BLOCK_K=128, UNPACK=3, TILED=True, TILE_ROWS=32),
     "TILED needs BLOCK_N a multiple of TILE_ROWS 32"),                          # tiles must hold whole row blocks
    (32, 128, dict(BLOCK_N=32, BLOCK_K=64, UNPACK=3), "UNPACK 3 needs BLOCK_K = 128"),   # the dot layout's step
    (32, 32, dict(BLOCK_N=32, BLOCK_K=64, UNPACK=1), "BLOCK_K 64 must divide"),          # a K step across groups
])
def test_w4a16_tc_rejects_a_bad_tile(n, group, tile, match):
    packed, scales, zeros = make_w4(n, 256, group, True)
    w = T4.StripedWeight(packed, scales, zeros, group)
    cfg = dict(BLOCK_M=16, SPLIT_K=1, num_warps=4, num_stages=1, **tile)
    with pytest.raises(ValueError, match=match):
        TC.w4a16_tc(make_x(2, 256), w, None, cfg)


@pytest.mark.parametrize("group,symmetric", [(128, True), (64, False)])
def test_w4a16_dequant_matches_reference(group, symmetric):
    packed, scales, zeros = make_w4(24, 256, group, symmetric)
    w = T4.StripedWeight(packed, scales, zeros, group)
    dense = T4.w4a16_dequantize(w, torch.bfloat16)
    ref = R.w4a16_dequant(packed, scales, zeros, group, 256)
    # the values (q - z) * s are exact in float32; the interpreter's float32 -> bf16 cast truncates where
    # the GPU rounds to nearest, so allow one bf16 ulp
    assert torch.allclose(dense.float(), ref, rtol=2 ** -7, atol=0)


def test_w4a16_act_order_permutes_columns():
    n, k, group = 24, 256, 64
    packed, scales, zeros = make_w4(n, k, group, False)
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(3)).to(DEVICE) // group  # equal groups
    x = make_x(3, k)
    ref = R.w4a16_linear(x, packed, scales, zeros, group, None, g_idx)
    out = ops._w4a16_op(x, packed, scales, zeros, group, None, g_idx, "gemv")
    assert rel_err(out, ref) < REL_TOL


def test_w4a16_custom_op_fake_impl():
    packed, scales, zeros = make_w4(16, 128, 64, True)
    x = make_x(2, 128)
    torch.library.opcheck(ops._w4a16_op, (x, packed, scales, zeros, 64, None, None, "gemv"),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- activation quantization

@pytest.mark.parametrize("fp8,smooth,two_pass", [(False, False, False), (False, True, True), (True, False, False)])
def test_act_quant_gated_quantizes_silu_gate_times_up(fp8, smooth, two_pass, monkeypatch):
    """[gate | up] rows -> the codes of silu(gate) * up (float32). On the GPU the kernel computes torch's
    float32 silu bit for bit (libdevice expf, correctly rounded divide): int8 codes are exact. The interpreter
    has numpy's exp, so there a code may move by one step where x / scale sits within an ulp of a boundary."""
    if two_pass:
        monkeypatch.setattr(AQ, "MAX_ONE_PASS", 128)
    gate_up = (make_x(4, 2 * 300) * 3).to(torch.bfloat16)
    s = (torch.rand(300, generator=torch.Generator().manual_seed(5)) + 0.5).to(DEVICE) if smooth else None
    with pytest.raises(ValueError, match="even width"):
        AQ.act_quant(gate_up[:, :599], gated=True)
    q, scale = AQ.act_quant(gate_up, fp8=fp8, smooth=s, gated=True)
    x = R.silu_mul(gate_up)
    q_ref, scale_ref = R.act_quant_fp8(x) if fp8 else R.act_quant_int8(x, smooth=s)
    assert q.shape == (4, 300) and torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)
    if fp8 and DEVICE == "cpu":  # the interpreter rounds float32 -> e4m3 wrongly (see the fp8 scales test)
        return
    if DEVICE == "cuda" and not fp8:
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    diff = (q.float() - q_ref.float()).abs()
    step = 1.0 if not fp8 else q_ref.float().abs() * 2 ** -3 + 2 ** -9   # one e4m3 step: 3 mantissa bits
    assert bool((diff <= step).all()) and float((diff > 0).float().mean()) < 0.01


@pytest.mark.parametrize("fp8", [False, True])
def test_silu_mul_linear_op_matches_reference(fp8):
    m, n, k = 5, 48, 256
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(n, k, generator=gen)
    wq, ws = P.quantize_fp8(w, "row") if fp8 else P.quantize_int8(w, "channel")
    wq, ws = wq.to(DEVICE), ws.to(DEVICE)
    gate_up = make_x(m, 2 * k)
    if fp8 and DEVICE == "cpu":
        pytest.skip("the fp8 GEMM falls back to torch._scaled_mm, which has no CPU kernel")
    out = ops._a8w8_silu_mul_op(gate_up, wq, ws.reshape(-1).float() if not fp8 else ws.float(), None, None, None, fp8)
    ref = (R.fp8_silu_mul_linear(gate_up, wq, ws) if fp8 else R.w8a8_silu_mul_linear(gate_up, wq, ws))
    # a code that lands on the other side of a rounding boundary (kernel sigmoid vs torch's) moves an int8
    # input by 1/127 of the row's absmax but an e4m3 one by up to 1/8 of itself, hence the wider fp8 bound
    assert rel_err(out, ref) < (3e-2 if fp8 else REL_TOL)
    if not fp8:  # opcheck's schema test multiplies the inputs, which torch cannot do for e4m3 tensors
        torch.library.opcheck(ops._a8w8_silu_mul_op, (gate_up, wq, ws.float(), None, None, None, fp8),
                              test_utils=("test_schema", "test_faketensor"))


def test_cpu_silu_mul_linear_is_the_reference():
    wq, ws = P.quantize_int8(torch.randn(16, 64), "channel")
    gate_up = torch.randn(3, 128).to(torch.bfloat16)
    assert torch.equal(ops.w8a8_silu_mul_linear(gate_up, wq, ws), R.w8a8_silu_mul_linear(gate_up, wq, ws))


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_act_quant_int8_dynamic_is_exact(smooth, two_pass, monkeypatch):
    if two_pass:  # rows longer than MAX_ONE_PASS are read twice, in blocks
        monkeypatch.setattr(AQ, "MAX_ONE_PASS", 128)
    x = (make_x(5, 300) * 3).to(torch.bfloat16)
    x[1] = 0  # an all-zero row gets the floor scale and zero codes
    s = (torch.rand(300, generator=torch.Generator().manual_seed(4)) + 0.5).to(DEVICE) if smooth else None
    q, scale = AQ.act_quant(x, smooth=s)
    q_ref, scale_ref = R.act_quant_int8(x, smooth=s)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_act_quant_launch_shape_follows_the_measured_rule():
    assert AQ.launch_shape(1, 4096) == (4096, 8)        # narrow rows: unchanged
    assert AQ.launch_shape(4096, 8192) == (8192, 8)
    assert AQ.launch_shape(1, 14336) == (16384, 32)     # a long row in registers, spread over 32 warps
    assert AQ.launch_shape(16, 8192) == (8192, 32)
    assert AQ.launch_shape(256, 14336) == (2048, 8)     # many long rows: walked in chunks
    assert AQ.launch_shape(4096, 28672) == (4096, 8)
    assert AQ.launch_shape(1, 65536) == (4096, 8)       # past MAX_ONE_PASS always in chunks
    x = make_x(2, 64).to(torch.bfloat16)
    for bad in ({"BLOCK_K": 96, "num_warps": 4}, {"BLOCK_K": 8, "num_warps": 4}, {"BLOCK_K": 64, "num_warps": 3}):
        with pytest.raises(ValueError, match="power-of-two BLOCK_K"):
            AQ.act_quant(x, cfg=bad)


@pytest.mark.parametrize("gated", [False, True])
def test_act_quant_chunked_launch_equals_whole_row(gated):
    """The launch shape (one read of the row, or chunks) never changes codes or scales: an absmax is order-free."""
    x = (make_x(4, 600 if gated else 300) * 3).to(torch.bfloat16)
    whole = AQ.act_quant(x, gated=gated)
    for block in (64, 128, 512):
        q, s = AQ.act_quant(x, gated=gated, cfg={"BLOCK_K": block, "num_warps": 8})
        assert torch.equal(q, whole[0]) and torch.equal(s, whole[1])


@pytest.mark.parametrize("two_pass", [False, True])
def test_act_quant_int8_static_is_exact(two_pass, monkeypatch):
    if two_pass:
        monkeypatch.setattr(AQ, "MAX_ONE_PASS", 64)
    x = (make_x(4, 200) * 5).to(torch.bfloat16)
    input_scale = torch.tensor([0.02], device=DEVICE)   # small: many values clamp at -128 / 127
    q, scale = AQ.act_quant(x, input_scale=input_scale)
    q_ref, scale_ref = R.act_quant_int8(x, input_scale=input_scale)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_act_quant_fp8_scales_are_exact():
    # The interpreter (triton 3.9) rounds float32 -> e4m3 wrongly, so only the scales are compared
    # here; the GPU run of `quantarena bench kernels` checks the fp8 codes through the fp8 linear.
    x = (make_x(3, 160) * 3).to(torch.bfloat16)
    _, scale = AQ.act_quant(x, fp8=True)
    _, scale_ref = R.act_quant_fp8(x)
    assert torch.equal(scale, scale_ref)


# ----------------------------------------------------------------------------- int8 GEMM

def _assert_exact_epilogue(out: torch.Tensor, ref: torch.Tensor, has_bias: bool) -> None:
    """The int32 sums are exact; with a bias the GPU contracts ``acc * scales + bias`` into one fma (one
    rounding instead of two), so allow that last ulp there."""
    if has_bias and out.is_cuda:
        assert (out - ref).abs().max() <= 2e-7 * ref.abs().max()
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("m,n,k,split,block_k,bias,atomic", [
    (3, 40, 300, 1, 64, False, False),     # ragged K (masked loads)
    (3, 40, 512, 2, 64, True, False),      # split-K, even K
    (20, 72, 384, 4, 64, False, False),    # split-K with a ragged last split
    (70, 33, 256, 1, 64, True, False),     # several M tiles, odd N
    (3, 40, 512, 2, 64, True, True),       # split-K partials added into one zeroed workspace: still exact
    (70, 72, 384, 4, 64, False, True),
])
def test_int8_gemm_is_exact(m, n, k, split, block_k, bias, atomic):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=gen)
    wq, ws = P.quantize_int8(w, "channel")
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    a_scale = torch.rand(m, 1, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    wq, ws, a, a_scale = wq.to(DEVICE), ws.to(DEVICE), a.to(DEVICE), a_scale.to(DEVICE)
    b = None if b is None else b.to(DEVICE)
    cfg = dict(T8.int8_config(m, n, k, 8), SPLIT_K=split, BLOCK_K=block_k, ATOMIC=atomic)
    ref = R.int8_matmul(a, wq).float() * a_scale * ws.reshape(1, -1)
    if b is not None:
        ref = ref + b
    for _ in range(2 if atomic else 1):   # the first launch leaves the workspace zero for the second
        out = T8.int8_gemm(a, a_scale, wq, ws, b, torch.float32, cfg)
        _assert_exact_epilogue(out, ref, b is not None)
        assert_split_k_state_clean(a.device)


@pytest.mark.parametrize("m,n,k,split,block_k,bias,atomic", [
    (1, 40, 300, 1, 64, False, False),     # one token, ragged K and N
    (5, 72, 512, 2, 64, True, False),      # split-K, even K
    (20, 72, 384, 4, 64, False, False),    # split-K with a ragged last split, two token tiles
    (20, 72, 384, 4, 64, True, True),      # the same, partials added into one zeroed workspace
])
def test_int8_swap_gemm_is_exact(m, n, k, split, block_k, bias, atomic):
    gen = torch.Generator().manual_seed(7)
    wq, ws = P.quantize_int8(torch.randn(n, k, generator=gen), "channel")
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    a_scale = torch.rand(m, 1, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    wq, ws, a, a_scale = wq.to(DEVICE), ws.to(DEVICE), a.to(DEVICE), a_scale.to(DEVICE)
    b = None if b is None else b.to(DEVICE)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=1, ATOMIC=atomic)
    out = T8.a8w8_swap_gemm(a, a_scale, wq, ws, b, torch.float32, cfg)
    ref = R.int8_matmul(a, wq).float() * a_scale * ws.reshape(1, -1)
    if b is not None:
        ref = ref + b
    _assert_exact_epilogue(out, ref, b is not None)
    assert_split_k_state_clean(a.device)


@pytest.mark.parametrize("k,atomic", [(256, False), (200, False), (256, True)])   # 200: the masked (uneven K) loads,
def test_fp8_swap_gemm_matches_the_float_product(k, atomic):                       # which must convert 0 to e4m3
    gen = torch.Generator().manual_seed(8)
    wq, ws = P.quantize_fp8(torch.randn(40, k, generator=gen), "row")
    xq, xs = P.quantize_fp8(torch.randn(3, k, generator=gen), "row")
    wq, ws, xq, xs = wq.to(DEVICE), ws.to(DEVICE), xq.to(DEVICE), xs.to(DEVICE)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=1, ATOMIC=atomic)
    out = T8.a8w8_swap_gemm(xq, xs, wq, ws, None, torch.float32, cfg)
    ref = (xq.float() @ wq.float().t()) * xs * ws.reshape(1, -1)
    assert rel_err(out, ref) < 1e-3   # Hopper's fp8 MMA accumulates with reduced precision
    assert_split_k_state_clean(xq.device)


@pytest.mark.parametrize("m,n,k,bias", [(40, 72, 96, False), (130, 64, 48, True), (5, 200, 160, False)])
def test_tma_gemm_int8_is_exact_and_fp8_matches(m, n, k, bias):
    # ragged M, N and K: the descriptors zero-fill what lies outside the operands
    gen = torch.Generator().manual_seed(m * n)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to(DEVICE)
    wq = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
    a_scale = (torch.rand(m, 1, generator=gen) + 0.5).to(DEVICE)
    ws = (torch.rand(n, generator=gen) + 0.5).to(DEVICE)
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
    out = T8.a8w8_tma_gemm(a, a_scale, wq, ws, b, torch.float32, cfg)
    ref = R.int8_matmul(a, wq).float() * a_scale * ws.reshape(1, -1)
    if b is not None:
        ref = ref + b
    _assert_exact_epilogue(out, ref, b is not None)
    xq, xs = P.quantize_fp8(torch.randn(m, k, generator=gen), "row")
    fq, fs = P.quantize_fp8(torch.randn(n, k, generator=gen), "row")
    xq, xs, fq, fs = xq.to(DEVICE), xs.to(DEVICE), fq.to(DEVICE), fs.to(DEVICE)
    out = T8.a8w8_tma_gemm(xq, xs, fq, fs, None, torch.float32, cfg)
    ref = (xq.float() @ fq.float().t()) * xs * fs.reshape(1, -1)
    assert rel_err(out, ref) < 1e-3   # Hopper's fp8 MMA accumulates with reduced precision
    with pytest.raises(ValueError, match="K % 16"):
        T8.a8w8_tma_gemm(a[:, :40], a_scale, wq[:, :40], ws, None, torch.float32, cfg)


_PDL_GEMMS = {   # kernel -> (launcher, tile, M); the tiles split K so that several programs wait per output tile
    "std": (lambda *a: T8.int8_gemm(*a), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, SPLIT_K=4,
                                              num_warps=4, num_stages=4, ATOMIC=True), 20),
    "swap": (lambda *a: T8.a8w8_swap_gemm(*a), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=8, num_warps=4,
                                                    num_stages=4, ATOMIC=True), 20),
    "tma": (lambda *a: T8.a8w8_tma_gemm(*a), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4,
                                                  num_stages=3), 130),
    "gemv": (lambda *a: GV.a8w8_gemv(*a), dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=4, num_warps=4, num_stages=1,
                                               PREFETCH=True), 3),
}


@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic dependent launch and CUDA graphs need a GPU")
@pytest.mark.parametrize("kernel", sorted(_PDL_GEMMS))
@pytest.mark.parametrize("fp8", [False, True])
def test_a8w8_pdl_gemm_reads_this_replays_codes(kernel, fp8):
    """act_quant (which lets the next kernel start at once) and the GEMM launched with PDL (which prefetches
    its weights, then waits) captured in a CUDA graph right after a kernel that writes the activations: every
    replay must equal the same launch without PDL on this replay's input (int8 bit for bit)."""
    if fp8 and (kernel == "std" or torch.cuda.get_device_capability()[0] < 9):
        pytest.skip("the tiled kernel is int8 only; fp8 Triton kernels need sm_90")
    launch, tile, m = _PDL_GEMMS[kernel]
    n, k = 1024, 4096
    gen = torch.Generator().manual_seed(11)
    wq, ws = (P.quantize_fp8 if fp8 else P.quantize_int8)(torch.randn(n, k, generator=gen),
                                                          "row" if fp8 else "channel")
    wq, ws = wq.to(DEVICE), ws.to(DEVICE)
    src = torch.randn(6, m, k, generator=gen).to(torch.bfloat16).to(DEVICE)
    i = torch.zeros((), dtype=torch.long, device=DEVICE)
    x = torch.empty(m, k, dtype=torch.bfloat16, device=DEVICE)

    def op(inp, pdl):
        xq, xs = AQ.act_quant(inp, fp8=fp8)
        return launch(xq, xs, wq, ws, None, torch.float32, dict(tile, PDL=pdl))

    op(x.copy_(src[0]), True)   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(torch.index_select(src, 0, i.view(1))[0] * 2.0)   # a kernel writing x right before act_quant
        out = op(x, True)
    for step in range(src.shape[0]):
        i.fill_(step)
        graph.replay()
        ref = op(src[step] * 2.0, False)
        if fp8:   # split-K fp32 partials add in arrival order
            assert rel_err(out, ref) < 1e-5, step
        else:
            assert torch.equal(out, ref), step
    assert_split_k_state_clean(x.device)


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    from quantarena.kernels import triton_pdl as PD

    w = torch.zeros(8, 48, dtype=torch.int8)
    assert PD.prefetch_ok(w) and not PD.prefetch_ok(w[:, 1:])
    assert not PD.prefetch_ok(torch.zeros(8, 40, dtype=torch.int8)[:, :32])   # 40-byte rows
    cfg = {"PDL": True, "BLOCK_N": 16, "num_warps": 4}
    kw = PD.pdl_launch(cfg, w, w, 64)
    assert not kw["PDL"] and cfg == {"BLOCK_N": 16, "num_warps": 4}   # CPU / interpreter: off, key consumed
    assert "launch_pdl" not in kw and kw["LANES"] == 128 and kw["pf_bytes"] == PD.prefetch_row_bytes(64, 16)
    monkeypatch.setattr(PD, "pdl_ok", lambda device: True)   # as on a Hopper GPU: on by default at small M
    assert PD.pdl_launch({"BLOCK_N": 16, "num_warps": 4}, w, w, 64)["launch_pdl"] is True
    assert not PD.pdl_launch({"BLOCK_N": 16, "num_warps": 4}, w, w, 64, allowed=False)["PDL"]
    assert not PD.pdl_launch({"PDL": False, "BLOCK_N": 16, "num_warps": 4}, w, w, 64)["PDL"]
    assert not PD.pdl_launch({"BLOCK_N": 16, "num_warps": 4}, torch.zeros(PD.DEFAULT_MAX_M + 1, 48), w, 64)["PDL"]
    assert PD.prefetch_row_bytes(64, 16) == PD.PREFETCH_BUDGET // 1024 and PD.prefetch_row_bytes(10 ** 9, 64) == 0
    assert PD.prefetch_row_bytes(3, 7) % PD.PREFETCH_ALIGN == 0


def test_w8a8_tuned_table_is_consistent():
    from quantarena.kernels import tuned_w8a8 as TW

    assert TW.TABLE, "the dispatch table is empty"
    for (op, m, n, k), (kernel, cfg) in TW.TABLE.items():
        assert op in ("w8a8", "fp8") and m in TW.BUCKETS
        assert kernel in (("std", "swap", "tma", "gemv", "gemv_q") if op == "w8a8" else
                          ("scaled_mm", "swap", "tma", "gemv", "gemv_q"))
        if kernel == "tma":
            assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"} <= set(cfg)
        elif kernel in ("gemv", "gemv_q"):
            assert m <= 4 and {"BLOCK_N", "BLOCK_K", "SPLIT_K"} <= set(cfg)
        elif kernel != "scaled_mm":
            assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"} <= set(cfg)
            assert not cfg.get("ATOMIC") or (cfg["SPLIT_K"] > 1 and m * n <= T4.ATOMIC_WS_WORDS)
    assert ops._a8w8_choice("w8a8", 3, 96, 256) == ("std", None)          # untuned shape: defaults
    assert ops._a8w8_choice("fp8", 3, 96, 256) == ("scaled_mm", None)
    assert ops._a8w8_choice("w8a8", 3, 4096, 4096) == TW.TABLE[("w8a8", 4, 4096, 4096)]
    assert ops._a8w8_choice("fp8", 3, 4096, 4096, tuned_table=False) == ("scaled_mm", None)


def test_a8w8_swap_gemm_rejects_mixed_codes():
    a = torch.zeros(2, 64, dtype=torch.int8, device=DEVICE)
    w = torch.zeros(32, 64, device=DEVICE).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="both int8 or both fp8"):
        T8.a8w8_swap_gemm(a, torch.ones(2, 1, device=DEVICE), w, torch.ones(32, device=DEVICE), None, torch.float32)


@pytest.mark.parametrize("static,smooth", [(False, False), (False, True), (True, False)])
def test_w8a8_op_matches_reference(static, smooth):
    m, n, k = 6, 48, 256
    gen = torch.Generator().manual_seed(6)
    wq, ws = P.quantize_int8(torch.randn(n, k, generator=gen), "channel")
    x = make_x(m, k)
    input_scale = torch.tensor([0.03], device=DEVICE) if static else None
    s = (torch.rand(k, generator=gen) + 0.5).to(DEVICE) if smooth else None
    wq, ws = wq.to(DEVICE), ws.to(DEVICE)
    out = ops._w8a8_op(x, wq, ws, input_scale, s, None)
    ref = R.w8a8_linear(x, wq, ws, input_scale, s)
    assert rel_err(out, ref) < REL_TOL


def test_w8a8_custom_op_fake_impl():
    wq, ws = P.quantize_int8(torch.randn(32, 128), "channel")
    torch.library.opcheck(ops._w8a8_op, (make_x(2, 128), wq.to(DEVICE), ws.to(DEVICE), None, None, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("static,smooth", [(False, False), (True, True)])
def test_compile_path_quantization_gives_the_same_codes_and_output(static, smooth):
    """Under torch.compile, w8a8_linear quantizes in torch ops and calls the GEMM-only op: eagerly that
    composition is the fused kernels' arithmetic bit for bit (inductor's own division may differ by an ulp)."""
    m, n, k = 5, 40, 256
    gen = torch.Generator().manual_seed(11)
    wq, ws = P.quantize_int8(torch.randn(n, k, generator=gen), "channel")
    wq, ws = wq.to(DEVICE), ws.to(DEVICE)
    x = make_x(m, k)
    input_scale = torch.tensor([0.03], device=DEVICE) if static else None
    s = (torch.rand(k, generator=gen) + 0.5).to(DEVICE) if smooth else None
    xq, xs = R.act_quant_int8(x, input_scale, s)
    fq, fs = AQ.act_quant(x, input_scale=input_scale, smooth=s)
    assert torch.equal(xq, fq) and torch.equal(xs.expand_as(fs), fs)
    out = ops._a8w8_gemm_op(xq, xs.contiguous(), wq, ws, None, torch.bfloat16)
    assert torch.equal(out, ops._w8a8_op(x, wq, ws, input_scale, s, None))
    torch.library.opcheck(ops._a8w8_gemm_op, (xq, xs.contiguous(), wq, ws, None, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_dispatch_is_the_reference():
    packed, scales, zeros = make_w4(16, 128, 64, True)
    x = make_x(2, 128).cpu()
    assert torch.equal(ops.w4a16_linear(x, packed.cpu(), scales.cpu(), None, 64),
                       R.w4a16_linear(x, packed.cpu(), scales.cpu(), None, 64))


def test_atomic_split_k_workspace_falls_back_where_the_output_does_not_fit(monkeypatch):
    monkeypatch.setattr(T4, "ATOMIC_WS_WORDS", 100)
    dev = torch.device("cpu")
    ws, atomic = T4.split_k_workspace(dev, 10, 10, 4, torch.int32, True)
    assert atomic and ws.dtype == torch.int32 and not ws.any()
    ws, atomic = T4.split_k_workspace(dev, 11, 10, 4, torch.float32, True)   # 110 sums: one slot per split
    assert not atomic and ws.shape == (4, 11, 10)
    assert not T4.split_k_workspace(dev, 10, 10, 1, torch.float32, True)[1]   # no split, no workspace
