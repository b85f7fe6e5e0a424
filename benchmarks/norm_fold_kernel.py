"""The W4A16 tensor-core linear with the residual add + RMSNorm before it as separate launches or folded into it
(``triton_w4a16_tc.w4a16_tc_norm``), one kernel at a time: every contender in one run, each a CUDA-graph replay
with the L2 flushed (median of REPS).

Per shape (the 8B decode runner's fused q/k/v, gated gate/up and lm_head) and M:
* ``linear``: the tensor-core kernel alone on the normed input (the dispatch table's tile);
* ``norm``: the add + RMSNorm alone, as inductor compiles it in the runner;
* ``norm+linear``: both, one graph;
* ``fold/tma``, ``fold/ptr``: one launch, x and the delta through tensor descriptors or pointer loads.
Each fold is checked against norm+linear first (relative difference, x + delta bit for bit).
Writes $OUT/norm_fold_kernel.json. Usage: python benchmarks/norm_fold_kernel.py [out_dir]
(env NK_M=1,4,16 NK_REPS=50)
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch

from quantarena import primitives as P
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4, triton_w4a16_tc as TC
from quantarena.kernels.w4a16_layout import dot_tiled_from_canonical

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("NK_M", "1,4,16").split(",")]
REPS = int(os.environ.get("NK_REPS", "50"))
SHAPES = {"qkv": (6144, 4096, False), "gate_up": (28672, 4096, True), "lm_head": (128256, 4096, False)}
log = Logger()


def weight(n: int, k: int) -> T4.StripedWeight:
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
    s = (torch.rand(n, k // 128, device="cuda") * 0.02 + 0.01).bfloat16()
    return T4.StripedWeight.from_dot_tiled(dot_tiled_from_canonical(P.pack_int4(q)), n, s, None, 128)


def main() -> None:
    flush = L2Flush()
    norm = torch.compile(lambda x, d, nw: R.add_rms_norm(x, d, nw, 1e-5), dynamic=False)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "reps": REPS, "rows": []}
    for name, (n, k, gated) in SHAPES.items():
        w = weight(n, k)
        for m in MS:
            x, d = torch.randn(m, k, device="cuda").bfloat16(), torch.randn(m, k, device="cuda").bfloat16()
            nw = (1 + 0.2 * torch.randn(k, device="cuda")).bfloat16()
            _, cfg = ops.w4a16_tiled_config(m, n, k, 128, x)
            y, xs = norm(x, d, nw)
            row = {"shape": name, "N": n, "K": k, "M": m, "gated": gated,
                   "cfg": {a: b for a, b in cfg.items() if not a.startswith("pf")}}
            sep = TC.w4a16_tc(y, w, None, dict(cfg), gated=gated)
            for tma in (True, False):
                out, xn = TC.w4a16_tc_norm(x, d, nw, 1e-5, w, None, dict(cfg, TMA=tma), gated=gated)
                torch.cuda.synchronize()
                tag = "fold/" + ("tma" if tma else "ptr")
                row[tag + "_rel_diff"] = ((out.float() - sep.float()).norm() / sep.float().norm()).item()
                row[tag + "_x_equal"] = bool(torch.equal(xn, xs))
            row["split_k_dirty"] = T4.split_k_dirty(x.device)
            fns = {"linear": lambda: TC.w4a16_tc(y, w, None, dict(cfg), gated=gated),
                   "norm": lambda: norm(x, d, nw),
                   "norm+linear": lambda: TC.w4a16_tc(norm(x, d, nw)[0], w, None, dict(cfg), gated=gated),
                   "fold/tma": lambda: TC.w4a16_tc_norm(x, d, nw, 1e-5, w, None, dict(cfg, TMA=True), gated=gated),
                   "fold/ptr": lambda: TC.w4a16_tc_norm(x, d, nw, 1e-5, w, None, dict(cfg, TMA=False), gated=gated)}
            for _ in range(2):   # two rounds, the faster kept
                for tag, fn in fns.items():
                    us = round(time_fn(fn, flush, REPS), 2)
                    row[tag + "_us"] = min(us, row.get(tag + "_us", us))
            log(name, m, {a: b for a, b in row.items() if a.endswith("_us") or a.endswith("diff")})
            result["rows"].append(row)
            with open(os.path.join(OUT, "norm_fold_kernel.json"), "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
