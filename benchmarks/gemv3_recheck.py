"""W4A16 M=1 re-check: our op, our GEMV v3 called directly, cuBLAS bf16 and tinygemm, three rounds in one process
(median of 50 CUDA-graph replays, L2 flushed). Prints microseconds. Usage: python benchmarks/gemv3_recheck.py"""
import torch
from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, time_fn
from quantarena.kernels import ops, triton_w4a16_gemv as G3
flush = L2Flush()
out = []
for label, k, n in [("gate_up", 8192, 28672), ("down", 28672, 8192), ("q", 8192, 8192), ("gate_up8", 4096, 14336)]:
    layer = BK.make_layer(k, n)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
    cfg = G3.gemv3_config(n, k, sw.stripe, 132)
    fns = {"op": lambda: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP),
           "direct": lambda: G3.w4a16_gemv3(x, sw, None, cfg),
           "bf16": lambda: torch.nn.functional.linear(x, layer.w_bf16),
           "tinygemm": lambda f=BK._tinygemm(layer): f(x)}
    for rep in range(3):
        for name, fn in fns.items():
            us = time_fn(fn, flush, 50)
            out.append((label, rep, name, round(us, 2)))
            print(label, rep, name, round(us, 2), flush=True)
    print(label, cfg, flush=True)
