"""W4A16 GEMV v2: GPU correctness + tile tuning + every contender in one run (CUDA graphs, L2 flushed).

Writes $OUT/gemv2.json (schema of benchmarks/results/*-kernels.json) and $OUT/best.json (best v2 config
per (BLOCK_M, N, K)). Usage: python benchmarks/gemv2_tune.py [out_dir]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [1, 2, 4, 8, 16, 32, 64, 128]
TILES = {1: [(32, 128, 4), (64, 128, 4), (16, 128, 4), (32, 64, 4)],
         2: [(32, 128, 4), (64, 128, 4), (16, 128, 4)],
         4: [(32, 128, 4), (16, 128, 4), (8, 128, 4)],
         8: [(16, 128, 4), (8, 128, 4), (8, 128, 2)],
         16: [(16, 128, 4), (8, 128, 4), (8, 128, 2)]}
log = Logger()
sms = torch.cuda.get_device_properties(0).multi_processor_count


# ---- correctness on GPU: ragged shapes, zeros, bias, every BLOCK_M, poisoned outputs
def correctness():
  for (m, n, k, group, sym, bias) in [(1, 40, 384, 128, True, False), (3, 33, 256, 64, False, True),
                                      (7, 200, 1024, 32, False, True), (16, 1000, 4096, 128, True, True),
                                      (12, 96, 2048, 256, False, False), (2, 4096, 14336, 128, True, False)]:
      packed, s, z, sw = BK.random_w4(n, k, group, sym, seed=m * 7 + n)
      b = torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None
      x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
      ref = R.w4a16_linear(x, packed, s, z, group, b).float()
      for split in (1, 3, 8):
          for bn, bkw, nw in TILES[T4._gemv2_block_m(m)][:2]:
              bkw = T4._block_kw(k // 8, max(sw.stripe, 128), bkw)
              torch.full((m * n * 2,), float("nan"), device="cuda", dtype=torch.bfloat16)
              out = T4.w4a16_gemv2(x, sw, b, dict(BLOCK_M=T4._gemv2_block_m(m), BLOCK_N=bn, BLOCK_KW=bkw,
                                                  SPLIT_K=split, num_warps=nw))
              err = ((out.float() - ref).norm() / ref.norm()).item()
              assert err < 8e-3, (m, n, k, group, split, bn, err)
      assert int(T4.split_k_counters(x.device).abs().sum()) == 0
      log("correct", m, n, k, group, sym, bias)


try:
    correctness()
except Exception as exc:  # keep timing the other contenders
    import traceback
    traceback.print_exc()
    log('CORRECTNESS FAILED', exc)

# ---- timing
flush = L2Flush()
rows, best = [], {}
for model in ("llama-3-8b", "llama-3-70b"):
    for label, k, n in BK.SHAPES[model]:
        layer = BK.make_layer(k, n)
        sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
        tg = BK._tinygemm(layer)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cont = [("bf16", "cublas", None, lambda x: F.linear(x, layer.w_bf16)),
                    ("w4a16", "tinygemm", None, tg),
                    ("w4a16", "quantarena", ops.w4a16_path(m, n, k),
                     lambda x: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP))]
            if m <= 4:
                cont.append(("w4a16", "quantarena:gemv", "gemv",
                             lambda x: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP, path="gemv")))
            cont.append(("w4a16", "quantarena:dequant", "dequant",
                         lambda x: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP, path="dequant")))
            if 16 < m <= 64:
                cont.append(("w4a16", "quantarena:mma", "mma",
                             lambda x: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP, path="mma")))
            for op, impl, path, fn in cont:
                row = {"model": model, "layer": label, "op": op, "impl": impl, "K": k, "N": n, "M": m}
                if path:
                    row["path"] = path
                try:
                    row["us"] = round(time_fn(lambda: fn(x), flush, 20), 2)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
            if m <= 16:
                bm = T4._gemv2_block_m(m)
                cands = []
                for bn, bkw, nw in TILES[bm]:
                    bkw = T4._block_kw(k // 8, 128, bkw)
                    splits = sorted({T4._split_for(n // bn, k // 8 // bkw, t * sms) for t in (1, 2, 4)})
                    for split in splits:
                        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=nw)
                        try:
                            us = time_fn(lambda: T4.w4a16_gemv2(x, sw, None, cfg), flush, 20)
                            cands.append((us, cfg))
                        except Exception as exc:
                            log("fail", cfg, type(exc).__name__, str(exc)[:300])
                if not cands:
                    continue
                us, cfg = min(cands, key=lambda c: c[0])
                best[f"{bm},{n},{k}"] = dict(cfg, us=round(us, 2))
                out = T4.w4a16_gemv2(x, sw, None, cfg)
                ref = R.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP).float()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                rows.append({"model": model, "layer": label, "op": "w4a16", "impl": "quantarena:gemv2", "K": k,
                             "N": n, "M": m, "path": "gemv2", "us": round(us, 2), "rel_err": err,
                             "config": {kk: v for kk, v in cfg.items()}})
            for r in rows:
                if r["M"] == m and r["K"] == k and r["N"] == n:
                    BK.add_rates(r)
            mine = {r["impl"]: r["us"] for r in rows if r["M"] == m and r["K"] == k and r["N"] == n and "us" in r}
            log(model, label, m, {a: round(b, 1) for a, b in mine.items()})
        del layer, sw
        ops._W4A16_CACHE.clear()
        torch.cuda.empty_cache()
        res = BK._result(rows)
        with open(os.path.join(OUT, "gemv2.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(OUT, "best.json"), "w") as f:
            json.dump(best, f, indent=1)
log("done")
