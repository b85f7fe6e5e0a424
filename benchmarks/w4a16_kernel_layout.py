"""W4A16 served from the kernel layout alone (``W4A16Linear.to_kernel_layout``): GPU correctness on full shapes,
and the cost of dropping the canonical codes, in one run (CUDA graphs, L2 flushed, median of many replays).

Per shape and M, against the canonical module's dispatch (``ops.w4a16_linear``): the kernel-layout op
(``ops.w4a16_linear_tiled``), and for the large-M path the dense dequantize alone, from the canonical codes
(``w4a16_dequantize``) and from the TILED words (``w4a16_dequantize_tiled``). Outputs are checked with the
output memory poisoned with NaN first (``bench.kernels.poison``). Writes $OUT/w4a16-kernel-layout.json.
Usage: python benchmarks/w4a16_kernel_layout.py [out_dir]
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import triton

from quantarena import primitives as P
from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4, triton_w4a16_tc as TC
from quantarena.kernels import w4a16_layout as L

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("KL_MS", "1,16,128,4096").split(",")]
MODELS = os.environ.get("KL_MODELS", "llama-3-8b,llama-3-8b-decode,llama-3-70b").split(",")
log = Logger()
flush = L2Flush()


rows = []
for model in MODELS:
    for label, k, n in BK.SHAPES[model]:
        torch.manual_seed(0)
        q, s, _ = P.quantize_int4(torch.randn(n, k, device="cuda"), 128, True)
        packed, scales = P.pack_int4(q), s.to(torch.bfloat16)
        del q
        tiled = L.dot_tiled_from_canonical(packed)
        assert torch.equal(L.canonical_from_dot_tiled(tiled, n), packed)
        w_can = T4.StripedWeight(packed, scales, None, 128)
        w_til = T4.StripedWeight.from_dot_tiled(tiled, n, scales, None, 128)
        dense_can = T4.w4a16_dequantize(w_can)
        BK.poison((n, k))
        dense_til = TC.w4a16_dequantize_tiled(w_til)
        same = bool(torch.equal(dense_can, dense_til))
        del dense_til
        row = {"model": model, "layer": label, "K": k, "N": n, "dequant_bitexact": same,
               "dequant_canonical_us": round(time_fn(lambda: T4.w4a16_dequantize(w_can), flush), 2),
               "dequant_tiled_us": round(time_fn(lambda: TC.w4a16_dequantize_tiled(w_til), flush), 2)}
        row["dequant_tiled_TBps"] = round((n * k * 2.5) / row["dequant_tiled_us"] / 1e6, 3)   # 0.5 B read, 2 written
        del dense_can
        log(row)
        rows.append(row)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.w4a16_linear(x, packed, scales, None, 128) if m <= 128 else None
            path = ops.w4a16_path(m, n, k)
            BK.poison((m, n))
            out = ops.w4a16_linear_tiled(x, tiled, scales, None, 128, n)
            r = {"model": model, "layer": label, "K": k, "N": n, "M": m, "canonical_path": path,
                 "kernel_layout_path": ops.w4a16_tiled_config(m, n, k, 128, x)[0],
                 "canonical_us": round(time_fn(lambda: ops.w4a16_linear(x, packed, scales, None, 128), flush), 2),
                 "kernel_layout_us": round(time_fn(lambda: ops.w4a16_linear_tiled(x, tiled, scales, None, 128, n),
                                                   flush), 2),
                 "finite": bool(torch.isfinite(out).all())}
            if ref is not None:
                r["rel_err"] = BK.rel_err(out, ref)
            r["ratio"] = round(r["canonical_us"] / r["kernel_layout_us"], 3)
            log(r)
            rows.append(r)
        del packed, tiled, w_can, w_til
        torch.cuda.empty_cache()

result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
          "date": datetime.date.today().isoformat(),
          "method": "CUDA-graph replay, L2 flushed (read), median; canonical = ops.w4a16_linear on the packed codes "
                    "(its dispatch: GEMV/tc/dequant from the tuned table), kernel_layout = ops.w4a16_linear_tiled "
                    "on the TILED words alone; ratio = canonical_us / kernel_layout_us",
          "rows": rows}
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "w4a16-kernel-layout.json"), "w") as f:
    json.dump(result, f, indent=1)
log("done")
