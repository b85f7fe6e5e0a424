"""Re-time single sweep points (3 rounds, median of 50 replays each, read flush) that looked like outliers.
Writes $OUT/pts.json. Usage: OUT=dir python benchmarks/recheck_points.py"""
import json, os, torch
from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, time_fn
from quantarena.kernels import ops
flush = L2Flush(); out = []
for label, k, n, m in [("70B kv_proj", 8192, 1024, 1), ("70B q_proj", 8192, 8192, 2)]:
    layer = BK.make_layer(k, n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fns = {"bf16": lambda: torch.nn.functional.linear(x, layer.w_bf16),
           "w4a16": lambda: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP),
           "tinygemm": lambda f=BK._tinygemm(layer): f(x)}
    for rep in range(3):
        for name, fn in fns.items():
            out.append({"shape": label, "M": m, "impl": name, "round": rep, "us": round(time_fn(fn, flush, 50), 2)})
            print(out[-1], flush=True)
json.dump(out, open(os.path.join(os.environ["OUT"], "pts.json"), "w"), indent=1)
