"""Split-KV decode attention (Triton) against the float32 torch reference, under TRITON_INTERPRET=1 on CPU
and compiled on a GPU, at small ragged shapes.

Tolerance, relative Frobenius error of the whole output vs the float32 reference: bf16 < 1e-2, fp16 < 2e-3.
Both sides round the output to the 16-bit dtype (bf16: 2^-9 relative per element, fp16: 2^-12), and the
kernel also rounds the softmax weights to the 16-bit dtype before the P @ V product (as flash attention
does); measured errors are ~5e-3 for bf16 and ~3e-4 for fp16. A mask or rescaling bug (a chunk counted
twice or dropped, a position past ``length`` read) gives errors of order 1e-1 or NaN.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernel tests need it")

from quantarena.kernels import ops, reference as R  # noqa: E402
from quantarena.kernels import triton_decode_attention as DA  # noqa: E402
from quantarena.kernels.triton_w4a16 import split_k_dirty  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by tests/kernels/conftest.py) or a GPU")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_inputs(batch: int, kv_heads: int, group: int, head_dim: int, max_len: int, dtype: torch.dtype,
                seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen)
    return (t.to(dtype).to(DEVICE) for t in (q, k, v))


def run_poisoned(q, k, v, length, **kw) -> torch.Tensor:
    """The kernel's output, written over a NaN-filled tensor so that an element it skips shows."""
    out = torch.full_like(q, float("nan"))
    DA.decode_attention(q, k, v, length, out=out, **kw)
    return out


# batch, kv heads, group (Hq / Hkv), head dim, cache length L, forced splits, BLOCK_N, dtype
CASES = [
    (1, 2, 1, 64, 37, 1, 16, torch.bfloat16),     # one split, L not a multiple of BLOCK_N
    (3, 2, 4, 128, 37, 3, 16, torch.float16),     # chunks of 16: the last holds 5 positions
    (1, 2, 8, 64, 200, 5, 16, torch.bfloat16),    # chunks of 48, several tiles each
    (3, 1, 8, 128, 200, 3, 32, torch.bfloat16),   # chunks of 96
    (3, 2, 4, 64, 200, None, None, torch.float16),  # the default heuristic (4 chunks of 64 at 132 SMs)
    (1, 2, 1, 128, 200, 7, 16, torch.float16),    # chunks of 32
    (3, 2, 8, 64, 37, 1, 32, torch.bfloat16),     # one split of two tiles
    (1, 1, 20, 64, 37, 2, 16, torch.bfloat16),    # group above 16: rows padded to 32
]


@pytest.mark.parametrize("where", ["first", "middle", "all"])
@pytest.mark.parametrize("batch,kv_heads,group,head_dim,max_len,splits,block_n,dtype", CASES)
def test_decode_attention_matches_reference(batch, kv_heads, group, head_dim, max_len, splits, block_n, dtype,
                                            where):
    q, k, v = make_inputs(batch, kv_heads, group, head_dim, max_len, dtype)
    n = {"first": 1, "middle": max_len // 2 + 3, "all": max_len}[where]  # middle: not on a chunk boundary
    length = torch.tensor([n], device=DEVICE)
    out = run_poisoned(q, k, v, length, splits=splits, block_n=block_n)
    assert rel_err(out, R.decode_attention(q, k, v, length)) < REL_TOL[dtype]


@pytest.mark.parametrize("where", ["first", "middle", "all"])
@pytest.mark.parametrize("batch,kv_heads,group,head_dim,max_len,splits,block_n,dtype", CASES[1:6])
def test_combine_kernel_matches_reference(batch, kv_heads, group, head_dim, max_len, splits, block_n, dtype, where):
    """The two-launch form (``finish="kernel"``) kept for A/B timing; the one-launch form is tested above."""
    q, k, v = make_inputs(batch, kv_heads, group, head_dim, max_len, dtype)
    n = {"first": 1, "middle": max_len // 2 + 3, "all": max_len}[where]
    length = torch.tensor([n], device=DEVICE)
    out = run_poisoned(q, k, v, length, splits=splits, block_n=block_n, finish="kernel")
    assert rel_err(out, R.decode_attention(q, k, v, length)) < REL_TOL[dtype]
    assert split_k_dirty(q.device) is None


def test_inline_finish_leaves_counters_zero_and_is_deterministic():
    q, k, v = make_inputs(3, 2, 4, 64, 200, torch.bfloat16)
    length = torch.tensor([150], device=DEVICE)
    first = run_poisoned(q, k, v, length, splits=5, block_n=16)
    assert split_k_dirty(q.device) is None
    for _ in range(3):  # merged in chunk order: the same bits whatever order the chunks finish in
        assert torch.equal(run_poisoned(q, k, v, length, splits=5, block_n=16), first)
    with pytest.raises(ValueError, match="unknown finish"):
        DA.decode_attention(q, k, v, length, finish="tree")


@pytest.mark.parametrize("splits", [1, 4])
def test_cache_beyond_length_is_never_read(splits):
    q, k, v = make_inputs(2, 2, 4, 64, 100, torch.bfloat16)
    length = torch.tensor([45], device=DEVICE)
    clean = run_poisoned(q, k, v, length, splits=splits, block_n=16)
    k_bad, v_bad = k.clone(), v.clone()
    for cache in (k_bad, v_bad):
        cache[:, :, 45::2] = float("nan")
        cache[:, :, 46::2] = 3e4
    bad = run_poisoned(q, k_bad, v_bad, length, splits=splits, block_n=16)
    assert torch.equal(bad, clean)
    assert rel_err(bad, R.decode_attention(q, k, v, length)) < REL_TOL[torch.bfloat16]


def test_strided_inputs_and_int32_length():
    """Caches stored [B, L, Hkv, D] and viewed [B, Hkv, L, D]; q a view of a wider row; int32 length."""
    batch, kv_heads, group, head_dim, max_len = 3, 2, 4, 64, 50
    gen = torch.Generator().manual_seed(3)
    q_rows = torch.randn(batch, (kv_heads * group + 3) * head_dim, generator=gen).to(torch.bfloat16).to(DEVICE)
    q = q_rows[:, :kv_heads * group * head_dim].view(batch, kv_heads * group, head_dim)
    k = torch.randn(batch, max_len, kv_heads, head_dim, generator=gen).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    v = torch.randn(batch, max_len, kv_heads, head_dim, generator=gen).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    length = torch.tensor([29], device=DEVICE, dtype=torch.int32)
    out = run_poisoned(q, k, v, length, splits=3, block_n=16)
    assert rel_err(out, R.decode_attention(q, k, v, length)) < REL_TOL[torch.bfloat16]


def test_split_heuristic():
    # batch 1, 8 KV heads, L = 200 on 132 SMs: several splits, capped at one per 64-position tile
    assert DA.decode_splits(1, 8, 200, 132, 64) == (4, 64)
    assert DA.decode_splits(1, 8, 4096, 132, 64) == (32, 128)     # ~2 programs per SM: 8 * 32 = 256
    assert DA.decode_splits(16, 8, 200, 132, 64) == (2, 128)      # 128 programs, below 132
    assert DA.decode_splits(256, 8, 200, 132, 64) == (1, 256)     # B * Hkv fills the GPU alone
    for batch, max_len, block_n, forced in [(1, 37, 16, None), (2, 1000, 32, None), (1, 200, 64, 50)]:
        s, chunk = DA.decode_splits(batch, 8, max_len, 132, block_n, forced)
        assert chunk % block_n == 0 and (s - 1) * chunk < max_len <= s * chunk


def test_ops_on_cpu_is_the_reference():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 8, 64, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 30, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    length = torch.tensor([17])
    assert torch.equal(ops.decode_attention(q, k, v, length, 0.2), R.decode_attention(q, k, v, length, 0.2))


def test_unsupported_shapes_raise_clear_errors():
    q, k, v = make_inputs(1, 2, 2, 64, 16, torch.bfloat16)
    length = torch.tensor([8], device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        DA.decode_attention(q[..., :48], k[..., :48], v[..., :48], length)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        DA.decode_attention(q[:, :3], k, v, length)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_follows_length():
    q, k, v = make_inputs(2, 8, 4, 128, 200, torch.bfloat16)
    length = torch.tensor([1], device=DEVICE)
    ops.decode_attention(q, k, v, length)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_attention(q, k, v, length)
    for n in (1, 63, 64, 65, 200):
        length.fill_(n)
        graph.replay()
        assert rel_err(out, R.decode_attention(q, k, v, length)) < REL_TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- RoPE + cache write + attention

def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two 16-bit tensors (NaN included)."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def make_rope_inputs(batch: int, kv_heads: int, group: int, head_dim: int, max_len: int, dtype: torch.dtype,
                     position: int, seed: int = 0):
    """qkv rows, the position's cos/sin rows (rotate-half, theta 10000) and caches holding garbage from
    ``position`` on (NaN and a large value: the new entry must overwrite one, the rest must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.cat((position * inv, position * inv))
    k = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen)
    for cache in (k, v):
        cache[:, :, position::2] = float("nan")
        cache[:, :, position + 1::2] = 3e4
    return tuple(t.to(dtype).to(DEVICE) for t in (qkv, ang.cos(), ang.sin(), k, v))


ROPE_CASES = [  # batch, kv heads, group, head dim, L, forced splits, BLOCK_N, dtype, new position
    (1, 2, 4, 64, 37, 1, 16, torch.bfloat16, 0),        # the first token: one position to attend to
    (3, 2, 4, 128, 100, 3, 16, torch.float16, 47),      # chunks of 48: the new position ends chunk 0
    (1, 2, 8, 64, 200, 5, 16, torch.bfloat16, 48),      # ... and starts chunk 1
    (2, 1, 8, 128, 200, None, None, torch.bfloat16, 150),
    (1, 2, 1, 64, 37, 2, 16, torch.float16, 36),        # the last cache position
    (1, 1, 20, 64, 37, 2, 16, torch.bfloat16, 20),      # group above 16
]


@pytest.mark.parametrize("finish", ["inline", "kernel"])
@pytest.mark.parametrize("batch,kv_heads,group,head_dim,max_len,splits,block_n,dtype,position", ROPE_CASES)
def test_decode_rope_attention_matches_reference(batch, kv_heads, group, head_dim, max_len, splits, block_n, dtype,
                                                 position, finish):
    qkv, cos, sin, k, v = make_rope_inputs(batch, kv_heads, group, head_dim, max_len, dtype, position)
    heads = kv_heads * group
    length = torch.tensor([position + 1], device=DEVICE)
    k_ref, v_ref = k.clone(), v.clone()
    ref = R.decode_rope_attention(qkv, cos, sin, k_ref, v_ref, length, heads)
    out = torch.full((batch, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    DA.decode_rope_attention(qkv, cos, sin, k, v, length, heads, out=out, splits=splits, block_n=block_n,
                             finish=finish)
    assert rel_err(out, ref) < REL_TOL[dtype]
    # v is copied; k is RoPE'd in float32 and rounded once on both sides (an FMA may move the last bit)
    assert same_bits(v, v_ref)
    new_k, new_k_ref = k[:, :, position].float(), k_ref[:, :, position].float()
    assert torch.allclose(new_k, new_k_ref, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=0)
    others = torch.ones(max_len, dtype=torch.bool)
    others[position] = False
    assert same_bits(k[:, :, others], k_ref[:, :, others])
    assert split_k_dirty(qkv.device) is None


def test_decode_rope_attention_on_cpu_is_the_reference():
    qkv, cos, sin, k, v = (t.cpu() for t in make_rope_inputs(2, 2, 2, 64, 30, torch.bfloat16, 16))
    length = torch.tensor([17])
    k2, v2 = k.clone(), v.clone()
    out = ops.decode_rope_attention(qkv, cos, sin, k, v, length, 4, 0.2)
    assert torch.equal(out, R.decode_rope_attention(qkv, cos, sin, k2, v2, length, 4, 0.2))
    assert same_bits(k, k2) and same_bits(v, v2)


def test_decode_rope_attention_compiled_writes_the_caches():
    """The op mutates its caches: traced by torch.compile (CPU: the op's reference body) the caller's caches change."""
    qkv, cos, sin, k, v = (t.cpu() for t in make_rope_inputs(2, 2, 2, 64, 30, torch.bfloat16, 16))
    length = torch.tensor([17])
    k2, v2 = k.clone(), v.clone()
    ref = R.decode_rope_attention(qkv, cos, sin, k2, v2, length, 4)

    def step(qkv, k, v):
        return ops._decode_rope_attention_op(qkv * 1, cos, sin, k, v, length, 4, 64 ** -0.5)

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(qkv, k, v)
    assert torch.equal(out, ref)
    assert same_bits(k, k2) and same_bits(v, v2)


def test_decode_rope_attention_rejects_bad_shapes():
    qkv, cos, sin, k, v = make_rope_inputs(1, 2, 2, 64, 16, torch.bfloat16, 3)
    length = torch.tensor([4], device=DEVICE)
    with pytest.raises(ValueError, match="is not"):
        DA.decode_rope_attention(qkv[:, :-64], cos, sin, k, v, length, 4)
    with pytest.raises(ValueError, match="cos and sin"):
        DA.decode_rope_attention(qkv, cos[:32], sin[:32], k, v, length, 4)
    with pytest.raises(ValueError, match="is not"):
        DA.decode_rope_attention(qkv, cos, sin, k, v, length, 3)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_decode_rope_attention_graph_replay_follows_length():
    qkv, cos, sin, k, v = make_rope_inputs(2, 8, 4, 128, 200, torch.bfloat16, 199)
    k.zero_()
    v.zero_()
    length = torch.tensor([1], device=DEVICE)
    ops.decode_rope_attention(qkv, cos, sin, k, v, length, 32)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_rope_attention(qkv, cos, sin, k, v, length, 32)
    k_ref, v_ref = k.clone(), v.clone()
    for n in (1, 63, 64, 65, 200):
        length.fill_(n)
        graph.replay()
        ref = R.decode_rope_attention(qkv, cos, sin, k_ref, v_ref, length, 32)
        assert rel_err(out, ref) < REL_TOL[torch.bfloat16]
        assert same_bits(v, v_ref)
    assert split_k_dirty(qkv.device) is None
