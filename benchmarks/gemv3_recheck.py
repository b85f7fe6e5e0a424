"""W4A16 M=1 re-check: our op, our GEMV v3 called directly, cuBLAS bf16 and tinygemm, three rounds in one process
per L2-flush mode (median of 50 CUDA-graph replays each). Prints microseconds and writes $OUT/recheck.json.
Usage: python benchmarks/gemv3_recheck.py [out_dir]"""
import json
import os
import sys

import torch

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, time_fn
from quantarena.kernels import ops, triton_w4a16_gemv as G3

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
SHAPES = [("70B gate_up", 8192, 28672), ("70B down", 28672, 8192), ("70B q_proj", 8192, 8192),
          ("8B gate_up", 4096, 14336), ("8B q_proj", 4096, 4096), ("8B kv_proj", 4096, 1024)]
flushes = {mode: L2Flush(mode=mode) for mode in ("write", "read")}
sms = torch.cuda.get_device_properties(0).multi_processor_count
rows = []
for label, k, n in SHAPES:
    layer = BK.make_layer(k, n)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
    cfg = G3.gemv3_config(n, k, sw.stripe, sms)
    fns = {"ours_op": lambda: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP),
           "ours_direct": lambda: G3.w4a16_gemv3(x, sw, None, cfg),
           "bf16": lambda: torch.nn.functional.linear(x, layer.w_bf16),
           "tinygemm": lambda f=BK._tinygemm(layer): f(x)}
    for mode, flush in flushes.items():
        for rep in range(3):
            for name, fn in fns.items():
                us = round(time_fn(fn, flush, 50), 2)
                rows.append({"shape": label, "K": k, "N": n, "flush": mode, "round": rep, "impl": name, "us": us})
        mine = {r["impl"]: r["us"] for r in rows if r["shape"] == label and r["flush"] == mode and r["round"] == 2}
        print(label, mode, mine, f"bf16/ours {mine['bf16'] / mine['ours_op']:.2f}", flush=True)
    layer = sw = None
    ops._W4A16_CACHE.clear()
    torch.cuda.empty_cache()
with open(os.path.join(OUT, "recheck.json"), "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
