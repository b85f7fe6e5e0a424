"""Skinny-M W8A8 / FP8 with the activation quantization fused into the swap-AB GEMM (``a8w8_swapq_gemm``)
against the two-launch path (act-quant kernel + the dispatched GEMM, i.e. ``ops.w8a8_linear`` /
``ops.fp8_linear``) and cuBLAS bf16, in one run (CUDA graphs, L2 flushed), M = 1..16 on the Llama-3 shapes.
Checks first that the fused int8 output equals the two-launch output bit for bit. Writes $OUT/w8a8-fused.json.
Usage: python benchmarks/w8a8_fused_check.py [out_dir]
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, time_fn
from quantarena.kernels import ops, triton_w8a8 as T8

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [1, 2, 4, 8, 16]
started = time.time()
flush = L2Flush()
rows = []
for model in ("llama-3-8b", "llama-3-70b"):
    for label, k, n in BK.SHAPES[model]:
        layer = BK.make_layer(k, n)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = {"model": model, "layer": label, "K": k, "N": n, "M": m}
            rows.append(dict(base, op="bf16", impl="cublas", us=time_fn(lambda: F.linear(x, layer.w_bf16), flush, 30)))
            for op, w, ws, fn in (("w8a8", layer.w8, layer.w8_scale, ops.w8a8_linear),
                                  ("fp8", layer.wf8, layer.wf8_scale, ops.fp8_linear)):
                kernel, cfg = ops._a8w8_choice(op, m, n, k)
                cfg = cfg if kernel == "swap" else None
                fused, _ = T8.a8w8_swapq_gemm(x, w, ws, None, None, cfg)
                two = fn(x, w, ws)
                err = float((fused.float() - two.float()).norm() / two.float().norm())
                if op == "w8a8" and kernel == "swap":
                    assert torch.equal(fused, two), (base, err)
                rows.append(dict(base, op=op, impl="two-launch", kernel=kernel, us=time_fn(lambda: fn(x, w, ws), flush, 30)))
                rows.append(dict(base, op=op, impl="fused", config=cfg, rel_err_vs_two_launch=err,
                                 us=time_fn(lambda: T8.a8w8_swapq_gemm(x, w, ws, None, None, cfg), flush, 30)))
            mine = {(r["op"], r["impl"]): r["us"] for r in rows if (r["M"], r["K"], r["N"]) == (m, k, n)}
            print(f"[{time.time() - started:5.1f}s]", model, label, m, {f"{a}/{b}": round(v, 1) for (a, b), v in mine.items()},
                  flush=True)
        del layer
        torch.cuda.empty_cache()
with open(os.path.join(OUT, "w8a8-fused.json"), "w") as f:
    json.dump(BK._result(rows), f, indent=1)
