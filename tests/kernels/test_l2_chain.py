"""The L2 prefetch chain of W4A16 linears (``kernels/l2_chain.py``): the plan, the module links, and that it changes
no value. Whether it is faster is measured on the GPU (``benchmarks/l2_prefetch_decode.py``), never here."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from quantarena import nn as qnn
from quantarena.kernels import l2_chain as L2

triton = pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it")


@pytest.mark.parametrize("rows,k,split", [(6144, 4096, 8), (4096, 14336, 8), (28672, 4096, 1), (128, 384, 2),
                                          (256, 1280, 3)])   # 10 steps in slices of 4: the last slice is short
@pytest.mark.parametrize("budget", [0, 1000, 8 << 20, 1 << 30])
def test_tiled_plan_spreads_the_budget_over_every_slice_start(rows, k, split, budget):
    plan = L2.tiled_plan(rows, k, split, budget)
    steps = k // 128
    total = rows * k // 2
    assert plan["pf_block_bytes"] == steps * 1024 and plan["pf_block_bytes"] * rows // 16 == total
    assert plan["pf_chunk_bytes"] * (plan["pf_chunks"] - 1) < plan["pf_block_bytes"] <= \
        plan["pf_chunk_bytes"] * plan["pf_chunks"]                    # every slice holds at least one step
    assert plan["pf_items"] == rows // 16 * plan["pf_chunks"]
    assert plan["pf_bytes"] % 16 == 0 and 0 <= plan["pf_bytes"] <= plan["pf_chunk_bytes"]
    asked = L2.requested_bytes(plan)
    assert asked <= min(budget, total)
    if budget >= total:
        assert asked == total                                       # the whole next weight
    elif budget >= 32 * plan["pf_items"]:
        assert asked > budget // 2                                  # at most a 16-byte rounding per item lost


@pytest.mark.parametrize("args,match", [((100, 4096, 1, 0), "rows divisible by 16"),
                                        ((128, 100, 1, 0), "K by 128"), ((128, 256, 0, 0), "split >= 1"),
                                        ((128, 256, 1, -1), "budget must be >= 0")])
def test_tiled_plan_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        L2.tiled_plan(*args)


def _w4_linears(shapes, device="cpu"):
    torch.manual_seed(0)
    out = []
    for n_in, n_out in shapes:
        lin = nn.Linear(n_in, n_out, bias=False, dtype=torch.bfloat16, device=device)
        out.append(qnn.W4A16Linear.from_float(lin, group_size=128).to_kernel_layout())
    return out


def test_chain_links_each_w4a16_linear_to_the_next_and_back_to_the_first():
    a, b, c = _w4_linears([(256, 384), (384, 256), (256, 128)])
    bf16 = qnn.BF16Linear.from_float(nn.Linear(128, 256, bias=False, dtype=torch.bfloat16))
    assert qnn.chain_l2_prefetch([a, b, c, bf16], 4 << 20) == 2     # c -> bf16 and bf16 -> a are not links
    assert a.l2_next_words is b.weight_tiled and a.l2_next_meta == (256, 128, 4 << 20)
    assert b.l2_next_words is c.weight_tiled and c.l2_next_words is None
    assert qnn.chain_l2_prefetch([a, b, c], 1 << 20) == 3          # circular: the step repeats
    assert c.l2_next_words is a.weight_tiled
    state = a.state_dict()
    assert "l2_next_words" not in state and "weight_packed" in state   # not saved; the checkpoint stays canonical
    assert qnn.chain_l2_prefetch([a, b, c], 0) == 0 and a.l2_next_words is None and a.l2_next_meta == (0, 0, 0)
    with pytest.raises(ValueError, match=">= 0 bytes"):
        qnn.chain_l2_prefetch([a, b], -1)


def test_back_to_the_canonical_layout_drops_the_link():
    a, b = _w4_linears([(256, 256), (256, 256)])
    qnn.chain_l2_prefetch([a, b], 1 << 20)
    a.to_canonical_layout()
    assert a.l2_next_words is None and a.l2_next_meta == (0, 0, 0)
    assert qnn.chain_l2_prefetch([a, b], 1 << 20) == 0              # a canonical linear is no link either way


@pytest.mark.parametrize("m", [1, 5])
def test_chained_linears_compute_the_same_values(m):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = _w4_linears([(512, 384), (384, 256), (256, 512)], device)
    x = torch.randn(m, 512, dtype=torch.bfloat16, device=device)

    def run():
        y = x
        for lin in layers:
            y = lin(y)
        return y

    plain = run()
    for budget in (1 << 10, 1 << 20):    # part of the next weight, then all of it
        qnn.chain_l2_prefetch(layers, budget)
        assert torch.equal(run(), plain)


def test_the_op_takes_the_next_weight_and_its_fake_impl_agrees():
    from quantarena.kernels import ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = _w4_linears([(256, 72), (128, 40)], device)
    x = torch.randn(3, 256, dtype=torch.bfloat16, device=device)
    args = (x, a.weight_tiled, a.weight_scale, None, 128, 72, None)
    plain = ops._w4a16_tiled_op(*args)
    chained = ops._w4a16_tiled_op(*args, b.weight_tiled, 40, 128, 1 << 20)
    assert torch.equal(chained, plain)
    torch.library.opcheck(ops._w4a16_tiled_op, args + (b.weight_tiled, 40, 128, 1 << 20),
                          test_utils=("test_schema", "test_faketensor"))
