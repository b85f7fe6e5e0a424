"""W8A8 int8 and FP8 GEMMs: GPU correctness of the swap-AB kernel and the M <= 4 GEMV (plain and fused with
the activation quantization), tile search per (M, N, K) for the GEMM kernels (and the GEMV at M <= 4), against
cuBLAS bf16 and ``torch._scaled_mm``, in one run (CUDA graphs, L2 flushed).

The activation-quant kernel is the same for every GEMM, so the GEMMs are timed on already-quantized inputs
(ops ``w8a8`` / ``fp8``). At M <= 4 the fused GEMV (``a8w8_gemv_quant``, table name ``gemv_q``) does the
quantization itself, so it is timed from the bf16 activations, in rows of ops ``w8a8+quant`` / ``fp8+quant``
that all include the quantization: impl ``gemv_q`` (each GEMV tile) against ``act_quant+<impl>`` (act_quant
then the fastest tile of each GEMM-only kernel, timed as one graph) and ``act_quant`` alone.
benchmarks/w8a8_tuned_table.py picks ``gemv_q`` for a shape where its ``+quant`` row beats every act_quant+ row.
Writes $OUT/w8a8.json (rows as in benchmarks/results/*-kernels.json, ``impl`` naming the kernel and
``config`` its tile) and $OUT/tuned_w8a8.py (the dispatch table module).
Usage: python benchmarks/w8a8_tune.py [out_dir]
W8_CHECKS (``correctness``, ``gemv_correctness``, comma-separated; both by default) picks the GPU checks run
first. W8_MS (comma-separated M values) restricts the batch sizes: ``W8_MS=1,2,4`` re-tunes the decode sizes only
(GEMV included); merge its JSON with an earlier full run's with benchmarks/w8a8_tuned_table.py (a later
run's rows replace the earlier run's for every (M, N, K) it measured).
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

from quantarena import primitives as P
from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import reference as R, triton_a8w8_gemv as G8, triton_w4a16 as T4, triton_w8a8 as T8
from quantarena.kernels.triton_act_quant import act_quant

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("W8_MS", "1,2,4,8,16,32,64,128,256,512,1024,2048,4096").split(",")]
log = Logger()
sms = torch.cuda.get_device_properties(0).multi_processor_count
flush = L2Flush()


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


def poisoned(fn, m, n):
    """fn() (a float32 [m, n] output) with its output's memory poisoned first: the caching allocator hands the
    NaN-filled block to the next allocation of that size, so an element the kernel leaves unwritten reads NaN."""
    poison = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float32)
    del poison
    return fn()


def gemv_correctness():
    """The M <= 4 GEMV: every M, ragged N and K (K % 4 == 0), bias, a static stride-0 scale, SmoothQuant
    divisors, split-K 1 and 3, a few tiles, both prefetch modes, outputs poisoned. int8 must equal the tiled
    int8 GEMM bit for bit (exact int32 sums, the same epilogue) and the reference up to the bias fma; fp8
    (float32 accumulation) the float64 product to 1e-5. The fused GEMV (quantizing x itself) must equal
    act_quant + the GEMV bit for bit in int8 and match it to 1e-5 in fp8."""
    for (n, k, bias, static, smooth) in [(40, 384, False, False, False), (33, 4096, True, False, True),
                                         (1000, 14336, False, True, False), (200, 1000, True, True, True),
                                         (4096, 4096, False, False, True)]:
        gen = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=gen).cuda()
        b = torch.randn(n, device="cuda") if bias else None
        s = (torch.rand(k, generator=gen) + 0.5).cuda() if smooth else None
        isc = torch.tensor([0.02], device="cuda") if static else None
        wq, ws = P.quantize_int8(w, "channel")
        fq, fs = P.quantize_fp8(w, "row")
        for m in (1, 2, 3, 4):
            x = torch.randn(m, k, generator=gen).cuda().to(torch.bfloat16)
            xq, xs = act_quant(x, input_scale=isc, smooth=s)
            assert not static or m == 1 or xs.stride(0) == 0   # the expanded static scale
            gq, gs = act_quant(x, fp8=True)
            ref8 = R.int8_matmul(xq, wq).float() * xs * ws.reshape(1, -1) + (0 if b is None else b)
            reff = ((gq.double() @ fq.double().t()) * gs.double() * fs.double().reshape(1, -1)
                    + (0 if b is None else b.double()))
            for bn, bk, nw, pf, st in ((16, 512, 4, True, 1), (32, 256, 8, False, 3), (64, 512, 8, True, 1)):
                for split in (1, 3):
                    cfg = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=nw, num_stages=1, PREFETCH=pf,
                               STAGES=st)
                    gemv8 = poisoned(lambda: G8.a8w8_gemv(xq, xs, wq, ws, b, torch.float32, cfg), m, n)
                    assert torch.equal(gemv8, T8.int8_gemm(xq, xs, wq, ws, b, torch.float32)), ("gemv int8", m, n, k,
                                                                                                 cfg)
                    diff = (gemv8 - ref8).abs().max()
                    ok = torch.equal(gemv8, ref8) if b is None else diff <= 2e-7 * ref8.abs().max()
                    assert ok, ("gemv int8 vs reference", m, n, k, cfg)
                    gemvf = poisoned(lambda: G8.a8w8_gemv(gq, gs, fq, fs, b, torch.float32, cfg), m, n)
                    err = ((gemvf.double() - reff).norm() / reff.norm()).item()
                    assert err < 1e-5, ("gemv fp8", m, n, k, cfg, err)
                    out = poisoned(lambda: G8.a8w8_gemv_quant(x, wq, ws, b, s, isc, cfg, torch.float32), m, n)
                    assert torch.equal(out, gemv8), ("gemv_q int8", m, n, k, cfg)
                    out = poisoned(lambda: G8.a8w8_gemv_quant(x, fq, fs, b, None, None, cfg, torch.float32), m, n)
                    err = ((out - gemvf).norm() / gemvf.norm()).item()
                    assert err < 1e-5, ("gemv_q fp8", m, n, k, cfg, err)
        assert int(T4.split_k_counters(w.device).abs().sum()) == 0
        log("gemv correct", n, k, bias, static, smooth)


def t(fn):
    try:
        return time_fn(fn, flush, 15)
    except Exception as exc:
        log("fail", type(exc).__name__, str(exc)[:160])
        return float("inf")


def with_quant_rows(base, shape_rows, x, layer):
    """M <= 4, eager path: act_quant alone, and act_quant then the fastest tile of each GEMM-only kernel of
    the shape timed as one graph (ops ``w8a8+quant`` / ``fp8+quant``, the fused GEMV's competitors)."""
    out = []
    for op in ("w8a8", "fp8"):
        fp8 = op == "fp8"
        out.append(dict(base, op=op + "+quant", impl="act_quant", us=t(lambda: act_quant(x, fp8=fp8))))
        best = {}
        for r in shape_rows:
            if r["op"] == op and r["us"] < best.get(r["impl"], {"us": float("inf")})["us"]:
                best[r["impl"]] = r
        for impl, r in best.items():
            gemm = BK.a8w8_gemm_fn(op, impl, r.get("config"), layer)
            out.append(dict(base, op=op + "+quant", impl="act_quant+" + impl, config=r.get("config"),
                            us=t(lambda: gemm(*act_quant(x, fp8=fp8)))))
    return out


def splits(m, n, k, bm, bn, bk):
    tiles = -(-m // bm) * -(-n // bn)
    return sorted({T4._split_for(tiles, -(-k // bk), f * sms) for f in (1, 2, 4)})


for check in (correctness, gemv_correctness):
    if check.__name__ not in os.environ.get("W8_CHECKS", "correctness,gemv_correctness").split(","):
        continue
    try:
        check()
    except Exception as exc:
        import traceback
        traceback.print_exc()
        log("CORRECTNESS FAILED", check.__name__, exc)

SWAP_TILES = [(bn, bk, nw, ns) for bn, bk, nw, ns in itertools.product((64, 128), (128, 256), (4,), (4,))]
# GEMV (M <= 4): BLOCK_N x BLOCK_K codes per step, at most 32 words per thread (64 spill at M = 4 on sm_90)
GEMV_TILES = [(bn, bk, nw) for bn, bk, nw in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8))
              if bn * bk // 4 <= 32 * 32 * nw]
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
            if m <= G8.MAX_M and k % 4 == 0:
                for bn, bk, nw in GEMV_TILES:
                    for sp in splits(1, n, k, 1, bn, bk)[-2:]:
                        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sp, num_warps=nw, num_stages=1, PREFETCH=True)
                        rows.append(dict(base, op="w8a8", impl="gemv", config=cfg, us=t(
                            lambda: G8.a8w8_gemv(xq, xs, layer.w8, layer.w8_scale, None, torch.bfloat16, cfg))))
                        rows.append(dict(base, op="fp8", impl="gemv", config=cfg, us=t(
                            lambda: G8.a8w8_gemv(fq, fs, layer.wf8, layer.wf8_scale, None, torch.bfloat16, cfg))))
                        rows.append(dict(base, op="w8a8+quant", impl="gemv_q", config=cfg, us=t(
                            lambda: G8.a8w8_gemv_quant(x, layer.w8, layer.w8_scale, None, cfg=cfg))))
                        rows.append(dict(base, op="fp8+quant", impl="gemv_q", config=cfg, us=t(
                            lambda: G8.a8w8_gemv_quant(x, layer.wf8, layer.wf8_scale, None, cfg=cfg))))
                rows += with_quant_rows(base, [r for r in rows if r["M"] == m and r["K"] == k and r["N"] == n], x,
                                        layer)
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
