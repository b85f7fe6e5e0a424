"""The 8-bit GEMMs of a batch-256 decode step (Llama-3-8B, fused q/k/v and gate/up): where their time goes.

At decode batch 128-256 the int8 / FP8 GEMMs of the decode runner are neither at the memory nor at the
tensor-core roofline (fused gate/up at M=256: 65 us for 117 MB and 60 GFLOP). This probe times, in one run,
on already-quantized activations (CUDA graphs, L2 flushed by a read):
- the dispatch table's kernel (``table``), cuBLAS bf16, raw ``torch._int_mm`` and ``torch._scaled_mm``;
- the persistent TMA kernel over a tile list, with and without Triton's warp specialization (``WARP_SPEC``);
- the tiled int8 kernel over a tile list that includes whole-batch (256-row) tiles;
- the SiLU-gated activation quantization of the down projection's input against the plain one and a copy.
Every candidate is first checked on the GPU against the reference (int8 bit for bit, FP8 by relative error).
Writes $OUT/w8a8-decode-probe.json (rows as in benchmarks/results/*-kernels.json, ``impl`` plus ``config``).
Usage: [PROBE_MS=128,256] [PROBE_SHAPES=qkv,o,gate_up,down,lm_head | PROBE_MODEL=llama-3-70b] [PROBE_WS=0]
[PROBE_MIN_WARPS=8] [PROBE_ACT=0] [PROBE_TAG=name] python benchmarks/w8a8_decode_probe.py [out]
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, reference as R
from quantarena.kernels.triton_act_quant import act_quant

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("PROBE_MS", "128,256").split(",")]
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}
if os.environ.get("PROBE_MODEL"):  # the kernel sweep's shapes of one model instead (e.g. llama-3-70b)
    SHAPES = {label: (k, n) for label, k, n in BK.SHAPES[os.environ["PROBE_MODEL"]]}
PICK = os.environ.get("PROBE_SHAPES", ",".join(SHAPES)).split(",")
MIN_WARPS = int(os.environ.get("PROBE_MIN_WARPS", "4"))  # leave out tiles with fewer warps
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TMA_TILES = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (128, 256, 64, 8, 4),
             (64, 256, 128, 4, 4), (128, 128, 256, 8, 3), (64, 128, 256, 4, 4)]
STD_TILES = [(128, 128, 128, 8, 3), (256, 128, 128, 8, 3), (256, 64, 128, 8, 4), (256, 128, 64, 8, 4),
             (128, 256, 128, 8, 3)]
WS = [False, True] if os.environ.get("PROBE_WS", "1") == "1" else [False]
BUILD_S = int(os.environ.get("PROBE_BUILD_S", "90"))  # a candidate whose first call takes longer is dropped
log = Logger()
flush = L2Flush()


def candidates(m: int, n: int, k: int) -> list[tuple[str, str, dict | None]]:
    out = []
    for op in ("w8a8", "fp8"):
        kernel, cfg = ops._a8w8_choice(op, m, n, k)
        out.append((op, "table:" + kernel, cfg))
        for bm, bn, bk, nw, ns in (t for t in TMA_TILES if t[3] >= MIN_WARPS):
            for ws in WS if nw >= 8 else [False]:   # warp specialization with 4 warps hung the H100 (no result)
                out.append((op, "tma", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw,
                                            num_stages=ns, WARP_SPEC=ws)))
    for bm, bn, bk, nw, ns in (t for t in STD_TILES if t[3] >= MIN_WARPS):
        out.append(("w8a8", "std", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw,
                                        num_stages=ns, SPLIT_K=1)))
    return out


def checked(fn, op, impl, cfg, xq, xs, ref) -> str | None:
    """None when the candidate ``fn`` matches the reference, else why not."""
    if os.environ.get("PROBE_VERBOSE"):
        log("try", op, impl, cfg)
    t0 = time.time()
    signal.alarm(BUILD_S)
    try:
        out = fn(xq, xs).float()
        torch.cuda.synchronize()
    except Exception as exc:  # a tile Triton cannot build (registers, shared memory), or one too slow to build
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        signal.alarm(0)
    if time.time() - t0 > 10:
        log("built", op, impl, cfg, f"{time.time() - t0:.0f}s")
    if op == "w8a8":
        return None if torch.equal(out, ref) else f"int8 differs: {(out - ref).abs().max().item():.3g}"
    err = ((out - ref).norm() / ref.norm()).item()
    return None if err < 5e-3 else f"fp8 rel err {err:.2e}"


def save(rows: list[dict]) -> None:
    tag = os.environ.get("PROBE_TAG", "")
    with open(os.path.join(OUT, f"w8a8-decode-probe{'-' + tag if tag else ''}.json"), "w") as f:
        json.dump(BK._result(rows), f, indent=1)


def gemm_rows(rows: list[dict]) -> list[dict]:
    for name in PICK:
        k, n = SHAPES[name]
        layer = BK.make_layer(k, n)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q8, s8 = act_quant(x)
            f8, sf8 = act_quant(x, fp8=True)
            ref8 = (R.int8_matmul(q8, layer.w8).float() * s8 * layer.w8_scale.reshape(1, -1)).to(torch.bfloat16).float()
            reff = ((f8.float() @ layer.wf8.float().t()) * sf8 * layer.wf8_scale.reshape(1, -1))
            base = {"layer": name, "K": k, "N": n, "M": m}
            rows.append(dict(base, op="bf16", impl="cublas", us=time_fn(lambda: F.linear(x, layer.w_bf16), flush)))
            w_t = layer.w8.t()
            rows.append(dict(base, op="w8a8", impl="int_mm_raw", us=time_fn(lambda: torch._int_mm(q8, w_t), flush)))
            rows.append(dict(base, op="fp8", impl="scaled_mm", us=time_fn(lambda: torch._scaled_mm(
                f8, layer.wf8.t(), scale_a=sf8, scale_b=layer.wf8_scale.reshape(1, -1), out_dtype=torch.bfloat16),
                flush)))
            # whole ops as the layers run them (activation quantization + the table's GEMM), and the quantization
            rows.append(dict(base, op="w8a8", impl="whole_op", us=time_fn(
                lambda: ops.w8a8_linear(x, layer.w8, layer.w8_scale), flush)))
            rows.append(dict(base, op="fp8", impl="whole_op", us=time_fn(
                lambda: ops.fp8_linear(x, layer.wf8, layer.wf8_scale), flush)))
            rows.append(dict(base, op="act_quant", impl="act_quant", us=time_fn(lambda: act_quant(x), flush)))
            for op, impl, cfg in candidates(m, n, k):
                xq, xs, ref = (q8, s8, ref8) if op == "w8a8" else (f8, sf8, reff)
                fn = BK.a8w8_gemm_fn(op, impl.split(":")[-1], cfg, layer)
                why = checked(fn, op, impl, cfg, xq, xs, ref)
                row = dict(base, op=op, impl=impl, config=cfg)
                if why is not None:
                    log("skip", op, impl, cfg, why)
                    rows.append(dict(row, us=None, error=why))
                    continue
                rows.append(dict(row, us=time_fn(lambda: fn(xq, xs), flush)))
            mine = [r for r in rows if (r["layer"], r["M"]) == (name, m) and r["us"]]
            best = {}
            for r in mine:
                key = f"{r['op']}/{r['impl']}" + ("/ws" if (r.get("config") or {}).get("WARP_SPEC") else "")
                best[key] = min(best.get(key, 1e9), r["us"])
            log(name, m, {key: round(v, 1) for key, v in sorted(best.items())})
            save(rows)
        del layer
        torch.cuda.empty_cache()
    return rows


def act_quant_rows() -> list[dict]:
    rows = []
    for m in MS:
        g = torch.randn(m, 2 * 14336, device="cuda", dtype=torch.bfloat16)
        x = g[:, :14336].contiguous()
        dst = torch.empty_like(g)
        base = {"layer": "down_input", "K": 14336, "N": 0, "M": m}
        for impl, fn in (("act_quant_gated", lambda: act_quant(g, gated=True)), ("act_quant", lambda: act_quant(x)),
                         ("act_quant_gated_fp8", lambda: act_quant(g, fp8=True, gated=True)),
                         ("copy_gate_up", lambda: dst.copy_(g))):
            rows.append(dict(base, op="act_quant", impl=impl, us=time_fn(fn, flush)))
        log("act_quant", m, {r["impl"]: round(r["us"], 1) for r in rows if r["M"] == m})
    return rows


def _too_slow(*_):
    raise TimeoutError(f"no result within {BUILD_S} s")


signal.signal(signal.SIGALRM, _too_slow)
rows = act_quant_rows() if os.environ.get("PROBE_ACT", "1") == "1" else []
save(gemm_rows(rows))
log("done")
