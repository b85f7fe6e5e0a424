"""Large-M W8A8 int8 / FP8 GEMMs: the persistent TMA kernel (``triton_w8a8.a8w8_tma_gemm``) against the kernel
the dispatch table picks now, cuBLAS bf16 and ``torch._scaled_mm``, in one run (CUDA graphs, L2 flushed).

First checks the TMA kernel on the GPU (int8 exact, fp8 within Hopper's fp8 accumulation), then times every
candidate on already-quantized inputs for M >= 128 on the Llama-3 8B / 70B shapes. Writes $OUT/w8a8-tma.json
(rows as in benchmarks/results/*-kernels.json, ``impl`` naming the kernel and ``config`` its tile).
Merge into the dispatch table with ``benchmarks/w8a8_tuned_table.py``: the rows of this run replace the
older run's rows for the (M, N, K) it measured.
Usage: [W8_MS=128,...] [W8_OPS=w8a8,fp8] [W8_TILES=BMxBNxBKxWARPSxSTAGES,...] python benchmarks/w8a8_tma_tune.py [out_dir]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from quantarena import primitives as P
from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, reference as R, triton_w8a8 as T8
from quantarena.kernels.triton_act_quant import act_quant

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("W8_MS", "128,256,512,1024,2048,4096").split(",")]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3),
         (64, 256, 128, 4, 4), (128, 256, 64, 8, 4), (64, 128, 256, 4, 4)]
if os.environ.get("W8_TILES"):  # e.g. 128x256x256x8x2,128x128x256x8x3
    TILES = [tuple(int(v) for v in t.split("x")) for t in os.environ["W8_TILES"].split(",")]
OPS = os.environ.get("W8_OPS", "w8a8,fp8").split(",")
log = Logger()
flush = L2Flush()


def correctness():
    for (m, n, k, bias) in [(130, 1000, 4096, True), (300, 4096, 14336, False), (2048, 1024, 4096, True),
                            (17, 256, 640, False)]:
        gen = torch.Generator().manual_seed(m + n)
        w = torch.randn(n, k, generator=gen).cuda()
        x = torch.randn(m, k, generator=gen).cuda().to(torch.bfloat16)
        b = torch.randn(n, device="cuda") if bias else None
        wq, ws = P.quantize_int8(w, "channel")
        xq, xs = act_quant(x)
        fq, fs = P.quantize_fp8(w, "row")
        f8, f8s = act_quant(x, fp8=True)
        for bm, bn, bk, nw, ns in TILES[:2] + TILES[-1:]:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns)
            out = T8.a8w8_tma_gemm(xq, xs, wq, ws, b, torch.float32, cfg)
            ref = R.int8_matmul(xq, wq).float() * xs * ws.reshape(1, -1)
            if b is not None:
                ref = ref + b
            ok = torch.equal(out, ref) if b is None else ((out - ref).abs() <= 1e-6 * ref.abs().max()).all()
            assert ok, ("int8", m, n, k, cfg, (out - ref).abs().max().item())
            out = T8.a8w8_tma_gemm(f8, f8s, fq, fs, b, torch.float32, cfg)
            ref = (f8.float() @ fq.float().t()) * f8s * fs.reshape(1, -1) + (0 if b is None else b)
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 3e-3, ("fp8", m, n, k, cfg, err)  # Hopper fp8 MMA: reduced-precision accumulation
        log("correct", m, n, k, bias)


def t(fn):
    try:
        return time_fn(fn, flush, 15)
    except Exception as exc:
        log("fail", type(exc).__name__, str(exc)[:160])
        return float("inf")


def current(op, m, n, k, xq, xs, layer):
    """The GEMM the committed dispatch table runs for this shape."""
    kernel, cfg = ops._a8w8_choice(op, m, n, k)
    if op == "w8a8":
        fn = {"swap": T8.a8w8_swap_gemm, "std": T8.int8_gemm, "tma": T8.a8w8_tma_gemm}[kernel]
        return kernel, cfg, lambda: fn(xq, xs, layer.w8, layer.w8_scale, None, torch.bfloat16, cfg)
    if kernel == "scaled_mm":
        return kernel, cfg, lambda: torch._scaled_mm(xq, layer.wf8.t(), scale_a=xs,
                                                     scale_b=layer.wf8_scale.reshape(1, -1), out_dtype=torch.bfloat16)
    fn = {"swap": T8.a8w8_swap_gemm, "tma": T8.a8w8_tma_gemm}[kernel]
    return kernel, cfg, lambda: fn(xq, xs, layer.wf8, layer.wf8_scale, None, torch.bfloat16, cfg)


correctness()
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
            for op, (aq, asc) in (("w8a8", (xq, xs)), ("fp8", (fq, fs))):
                kernel, cfg, fn = current(op, m, n, k, aq, asc, layer)
                if kernel != "scaled_mm":
                    rows.append(dict(base, op=op, impl=kernel, config=cfg, us=t(fn)))
            for bm, bn, bk, nw, ns in TILES:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns)
                if "w8a8" in OPS:
                    rows.append(dict(base, op="w8a8", impl="tma", config=cfg, us=t(
                        lambda: T8.a8w8_tma_gemm(xq, xs, layer.w8, layer.w8_scale, None, torch.bfloat16, cfg))))
                if "fp8" in OPS:
                    rows.append(dict(base, op="fp8", impl="tma", config=cfg, us=t(
                        lambda: T8.a8w8_tma_gemm(fq, fs, layer.wf8, layer.wf8_scale, None, torch.bfloat16, cfg))))
            mine = [r for r in rows if r["M"] == m and r["K"] == k and r["N"] == n]
            best = {}
            for r in mine:
                key = (r["op"], r["impl"])
                best[key] = min(best.get(key, float("inf")), r["us"])
            log(model, label, m, {f"{a}/{b}": round(v, 1) for (a, b), v in best.items()})
        del layer
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "w8a8-tma.json"), "w") as f:
            json.dump(BK._result(rows), f, indent=1)
log("done")
