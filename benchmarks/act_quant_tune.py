"""Activation quantization launch shapes: one program per row either holds the whole row in registers (one
read) or walks it in BLOCK_K chunks (two reads, the second mostly from L2), at several warp counts.

With long rows (a down projection's 14336-28672 inputs) the one-read form needs so many registers that one
program fills an SM, which then alternates between loading a row and computing it. This times every launch
shape on the Llama-3 rows (plain and SiLU-gated) at decode and prefill M, CUDA graphs, L2 flushed, after
checking that its codes and scales equal the default launch's bit for bit.
Writes $OUT/act-quant-tune.json. Usage: [AQ_MS=1,16,256,4096] [AQ_KS=4096,8192,14336,28672] python benchmarks/act_quant_tune.py [out]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels.triton_act_quant import act_quant

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("AQ_MS", "1,16,256,4096").split(",")]
KS = [int(v) for v in os.environ.get("AQ_KS", "4096,8192,14336,28672").split(",")]
GATED_KS = (14336, 28672)  # the down projections' inputs, quantized from [gate | up]
CONFIGS = [{"BLOCK_K": bk, "num_warps": nw} for bk in (1024, 2048, 4096) for nw in (4, 8)] + \
          [{"BLOCK_K": "row", "num_warps": nw} for nw in (8, 16, 32)]
log = Logger()
flush = L2Flush()


rows = []
for k in KS:
    for gated in (False, True) if k in GATED_KS else (False,):
        for m in MS:
            x = torch.randn(m, 2 * k if gated else k, device="cuda", dtype=torch.bfloat16) * 3
            ref_q, ref_s = act_quant(x, gated=gated)
            base = {"K": k, "M": m, "gated": gated}
            default_us = time_fn(lambda: act_quant(x, gated=gated), flush)
            rows.append(dict(base, impl="default", config=None, us=default_us))
            for cfg in CONFIGS:
                cfg = dict(cfg, BLOCK_K=triton.next_power_of_2(k) if cfg["BLOCK_K"] == "row" else cfg["BLOCK_K"])
                try:
                    q, s = act_quant(x, gated=gated, cfg=cfg)
                    torch.cuda.synchronize()
                except Exception as exc:   # registers / shared memory: a launch Triton cannot build
                    rows.append(dict(base, impl="cfg", config=cfg, us=None, error=f"{type(exc).__name__}"))
                    continue
                if not (torch.equal(q, ref_q) and torch.equal(s, ref_s)):
                    raise AssertionError(("codes differ from the default launch", base, cfg))
                rows.append(dict(base, impl="cfg", config=cfg, us=time_fn(lambda: act_quant(x, gated=gated, cfg=cfg),
                                                                         flush)))
            mine = sorted((r for r in rows if r["K"] == k and r["M"] == m and r["gated"] == gated and r["us"]),
                          key=lambda r: r["us"])
            log(k, m, "gated" if gated else "", "default", round(default_us, 1),
                "best", [(round(r["us"], 1), r["config"]) for r in mine[:3]])
            with open(os.path.join(OUT, "act-quant-tune.json"), "w") as f:
                json.dump(BK._result(rows), f, indent=1)
log("done")
