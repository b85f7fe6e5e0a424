"""W8A8 int8 and FP8 GEMMs: GPU correctness of the swap-AB kernel, tile search per (M, N, K) for both GEMM
kernels, against cuBLAS bf16 and ``torch._scaled_mm``, in one run (CUDA graphs, L2 flushed).

The activation-quant kernel is the same for every candidate, so the GEMMs are timed on already-quantized
inputs. Writes $OUT/w8a8.json (rows as in benchmarks/results/*-kernels.json, ``impl`` naming the kernel and
``config`` its tile) and $OUT/tuned_w8a8.py (the dispatch table module).
Usage: python benchmarks/w8a8_tune.py [out_dir]
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from quantarena import primitives as P
from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, time_fn
from quantarena.kernels import reference as R, triton_w4a16 as T4, triton_w8a8 as T8
from quantarena.kernels.triton_act_quant import act_quant

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("W8_MS", "1,2,4,8,16,32,64,128,256,512,1024,2048,4096").split(",")]
started = time.time()
sms = torch.cuda.get_device_properties(0).multi_processor_count
flush = L2Flush()


def log(*a):
    print(f"[{time.time() - started:6.1f}s]", *a, flush=True)


def correctness():
    for (m, n, k, split, bias) in [(1, 40, 384, 1, False), (3, 33, 4096, 4, True), (20, 1000, 14336, 8, False),
                                   (130, 4096, 4096, 1, True)]:
        gen = torch.Generator().manual_seed(m + n)
        w = torch.randn(n, k, generator=gen).cuda()
        x = torch.randn(m, k, generator=gen).cuda().to(torch.bfloat16)
        b = torch.randn(n, device="cuda") if bias else None
        wq, ws = P.quantize_int8(w, "channel")
        xq, xs = act_quant(x)
        for bm, bn, bk in ((16, 64, 128), (32, 128, 256)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=3)
            out = T8.a8w8_swap_gemm(xq, xs, wq, ws, b, torch.float32, cfg)
            ref = R.int8_matmul(xq, wq).float() * xs * ws.reshape(1, -1) + (0 if b is None else b)
            # exact int32 sums; with a bias the GPU contracts acc * scales + bias into one fma (one ulp)
            ok = torch.equal(out, ref) if b is None else (out - ref).abs().max() <= 2e-7 * ref.abs().max()
            assert ok, ("int8", m, n, k, cfg)
        fq, fs = P.quantize_fp8(w, "row")
        xq, xs = act_quant(x, fp8=True)
        for bm, bn, bk in ((16, 64, 128), (32, 128, 256)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=3)
            out = T8.a8w8_swap_gemm(xq, xs, fq, fs, b, torch.float32, cfg)
            ref = (xq.float() @ fq.float().t()) * xs * fs.reshape(1, -1) + (0 if b is None else b)
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 1e-3, ("fp8", m, n, k, cfg, err)  # Hopper fp8 MMA accumulates with reduced precision
        assert int(T4.split_k_counters(x.device).abs().sum()) == 0
        log("correct", m, n, k, split, bias)


def t(fn):
    try:
        return time_fn(fn, flush, 15)
    except Exception as exc:
        log("fail", type(exc).__name__, str(exc)[:160])
        return float("inf")


def splits(m, n, k, bm, bn, bk):
    tiles = -(-m // bm) * -(-n // bn)
    return sorted({T4._split_for(tiles, -(-k // bk), f * sms) for f in (1, 2, 4)})


try:
    correctness()
except Exception as exc:
    import traceback
    traceback.print_exc()
    log("CORRECTNESS FAILED", exc)

SWAP_TILES = [(bn, bk, nw, ns) for bn, bk, nw, ns in itertools.product((64, 128), (128, 256), (4,), (4,))]
STD_TILES = [(64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 256, 128, 8, 3),
             (128, 128, 64, 4, 4), (64, 64, 256, 4, 4)]
rows = []
for model in os.environ.get("TUNE_MODELS", "llama-3-8b,llama-3-70b").split(","):
    for label, k, n in BK.SHAPES[model]:
        layer = BK.make_layer(k, n)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = act_quant(x)
            fq, fs = act_quant(x, fp8=True)
            base = {"model": model, "layer": label, "K": k, "N": n, "M": m}
            rows.append(dict(base, op="bf16", impl="cublas", us=t(lambda: F.linear(x, layer.w_bf16))))
            rows.append(dict(base, op="fp8", impl="scaled_mm", us=t(lambda: torch._scaled_mm(
                fq, layer.wf8.t(), scale_a=fs, scale_b=layer.wf8_scale.reshape(1, -1), out_dtype=torch.bfloat16))))
            default = T8.int8_config(m, n, k, sms)
            rows.append(dict(base, op="w8a8", impl="std", config=default,
                             us=t(lambda: T8.int8_gemm(xq, xs, layer.w8, layer.w8_scale, None, torch.bfloat16, default))))
            if m >= 64:
                for bm, bn, bk, nw, ns in STD_TILES:
                    for sp in splits(m, n, k, bm, bn, bk)[:2]:
                        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, SPLIT_K=sp,
                                   GROUP_M=8)
                        rows.append(dict(base, op="w8a8", impl="std", config=cfg, us=t(
                            lambda: T8.int8_gemm(xq, xs, layer.w8, layer.w8_scale, None, torch.bfloat16, cfg))))
            if m <= 256:
                bm = max(16, min(128, 1 << (m - 1).bit_length()))
                for bn, bk, nw, ns in SWAP_TILES:
                    for sp in splits(m, n, k, bm, bn, bk)[-2:]:
                        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sp, num_warps=nw, num_stages=ns)
                        rows.append(dict(base, op="w8a8", impl="swap", config=cfg, us=t(
                            lambda: T8.a8w8_swap_gemm(xq, xs, layer.w8, layer.w8_scale, None, torch.bfloat16, cfg))))
                        rows.append(dict(base, op="fp8", impl="swap", config=cfg, us=t(
                            lambda: T8.a8w8_swap_gemm(fq, fs, layer.wf8, layer.wf8_scale, None, torch.bfloat16, cfg))))
            mine = [r for r in rows if r["M"] == m and r["K"] == k and r["N"] == n]
            best = {}
            for r in mine:
                key = (r["op"], r["impl"])
                best[key] = min(best.get(key, float("inf")), r["us"])
            log(model, label, m, {f"{a}/{b}": round(v, 1) for (a, b), v in best.items()})
        del layer
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "w8a8.json"), "w") as f:
            json.dump(BK._result(rows), f, indent=1)

sys.path.insert(0, os.path.dirname(__file__))
from w8a8_tuned_table import build  # noqa: E402

with open(os.path.join(OUT, "tuned_w8a8.py"), "w") as f:
    f.write(build(BK._result(rows), "h100-w8a8-tune.json"))
log("done")
