"""The 8-bit linears with and without programmatic dependent launch (``triton_pdl``), same run, whole op.

A W8A8 / FP8 linear is ``act_quant`` then the GEMM. With PDL the GEMM's grid starts while the quantization
runs, prefetches its weight slice into the L2 and waits; without it the GEMM starts after the quantization
ends and reads its weights from DRAM. Per (shape, M) and op (int8, fp8) this times, CUDA graphs, L2 flushed:

* bf16 cuBLAS;
* the dispatch table's kernel and tile, whole op (act_quant + GEMM), PDL off and on (two rounds each, the
  fastest kept), and the GEMM alone on quantized codes (what the quantization adds);
* where the table names the fused GEMV (``gemv_q``, one launch): that, and act_quant + the same tile as a
  plain GEMV with PDL (whether two launches now win);
* ``ops.w8a8_linear`` / ``ops.fp8_linear`` (what the library runs now: PDL on by default).

``PDL_CANDIDATES=1``: at M = 8..256 also other skinny tiles (ATOMIC swap, and tiled int8 from M = 32), whole op
with PDL, each checked against the table tile's output (int8 bit for bit, fp8 to 5e-3) before it is timed.
Every PDL output is checked against the same launch without PDL on poisoned output memory: int8 bit for bit,
fp8 to 1e-5 (split-K fp32 partials add in arrival order). ``torch._scaled_mm`` rows (the fp8 table's cuBLAS
choice) have no Triton GEMM to launch early; they are timed through the op only.
Writes $OUT/pdl.json (rows as in benchmarks/results/*-kernels.json plus ``pdl`` and ``check``) after each shape.
Usage: python benchmarks/pdl_8bit.py [out_dir]   (env PDL_MS, PDL_SHAPES=model:layer,..., PDL_BUDGET_S,
PDL_CANDIDATES)
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, triton_w4a16 as T4, triton_w8a8 as T8
from quantarena.kernels.triton_act_quant import act_quant

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("PDL_MS", "1,2,4,8,16,32,64,128,256,512").split(",")]
SHAPES = os.environ.get("PDL_SHAPES", "llama-3-8b:kv_proj,llama-3-8b:q_proj,llama-3-70b:kv_proj,llama-3-8b:gate_up,"
                        "llama-3-8b:down,llama-3-70b:q_proj,llama-3-70b:gate_up,llama-3-70b:down").split(",")
BUDGET_S = float(os.environ.get("PDL_BUDGET_S", "400"))
CANDIDATES = os.environ.get("PDL_CANDIDATES") == "1"
started = time.time()
log = Logger(started)
flush = L2Flush()
SMS = torch.cuda.get_device_properties(0).multi_processor_count


def t(fn, rounds: int = 1) -> float:
    try:
        return round(min(time_fn(fn, flush, 15) for _ in range(rounds)), 2)
    except Exception as exc:
        log("fail", type(exc).__name__, str(exc)[:200])
        return float("inf")


def whole(op: str, impl: str, cfg: dict, layer, x, pdl: bool):
    """act_quant + the GEMM ``impl`` with tile ``cfg`` and PDL on or off, as a function of nothing."""
    gemm = BK.a8w8_gemm_fn(op, impl, dict(cfg, PDL=pdl), layer)
    return lambda: gemm(*act_quant(x, fp8=op == "fp8"))


def candidates(op: str, m: int, n: int, k: int) -> list[tuple[str, dict]]:
    """Skinny tiles to try behind act_quant with PDL: ATOMIC split-K swap tiles (int8 or fp8) and, for int8 at
    M >= 32, three tiled ones."""
    return BK.atomic_a8_tiles(m, n, k, SMS, BK.ATOMIC_STD_TILES[:3] if op == "w8a8" else ())


def checked(a, b, op: str) -> bool:
    return torch.equal(a, b) if op == "w8a8" else BK.rel_err(a, b) <= 1e-5


rows: list[dict] = []
for spec in SHAPES:
    if time.time() - started > BUDGET_S:
        log("budget spent; not starting", spec)
        break
    model, label, k, n = BK.layer_shape(spec)
    layer = BK.make_layer(k, n)
    for m in MS:
        base = {"model": model, "layer": label, "K": k, "N": n, "M": m}
        here: list[dict] = []
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        here.append(dict(base, op="bf16", impl="cublas", us=t(lambda: F.linear(x, layer.w_bf16), 2)))
        for op in ("w8a8", "fp8"):
            w, ws = (layer.w8, layer.w8_scale) if op == "w8a8" else (layer.wf8, layer.wf8_scale)
            lin = ops.w8a8_linear if op == "w8a8" else ops.fp8_linear
            here.append(dict(base, op=op, impl="quantarena", us=t(lambda: lin(x, w, ws), 2)))
            impl, cfg = ops._a8w8_choice(op, m, n, k)
            if impl == "gemv_q":
                here.append(dict(base, op=op, impl="gemv_q", config=cfg, us=t(lambda: lin(x, w, ws), 2)))
                impl = "gemv"   # the same tile as a plain GEMV behind act_quant
            if impl == "scaled_mm":
                continue
            if impl == "std" and cfg is None:
                cfg = T8.int8_config(m, n, k, SMS)   # the default tile, named
            cfg = {key: v for key, v in cfg.items() if key != "PDL"}   # the tile; this run sets the launch mode
            xq, xs = act_quant(x, fp8=op == "fp8")
            gemm = BK.a8w8_gemm_fn(op, impl, dict(cfg, PDL=False), layer)
            here.append(dict(base, op=op, impl=impl + ":gemm", config=cfg, us=t(lambda: gemm(xq, xs), 2)))
            BK.poison((m, n))
            off = whole(op, impl, cfg, layer, x, False)().float()
            BK.poison((m, n))
            on = whole(op, impl, cfg, layer, x, True)().float()
            ok = checked(on, off, op)
            us = {False: [], True: []}
            for _ in range(2):   # alternate, so that a slow stretch of the GPU does not fall on one side
                for pdl in (False, True):
                    us[pdl].append(t(whole(op, impl, cfg, layer, x, pdl)))
            for pdl in (False, True):
                here.append(dict(base, op=op, impl=impl, config=cfg, pdl=pdl, check=ok,
                                 us=min(us[pdl]) if ok or not pdl else float("inf")))
            if CANDIDATES and 8 <= m <= 256:   # other tiles, whole op with PDL, checked against the table's output
                for cimpl, ccfg in candidates(op, m, n, k):
                    if ccfg == cfg and cimpl == impl:
                        continue
                    try:
                        BK.poison((m, n))
                        out = whole(op, cimpl, ccfg, layer, x, True)().float()
                    except Exception as exc:   # a tile this Triton cannot compile
                        log("fail", op, cimpl, ccfg, type(exc).__name__, str(exc)[:160])
                        continue
                    # int8: exact int32 sums, the same epilogue; fp8: another split sums in another order, and
                    # Hopper's fp8 MMA accumulates with reduced precision (~1e-3 between tiles)
                    good = torch.equal(out, off) if op == "w8a8" else BK.rel_err(out, off) <= 5e-3
                    here.append(dict(base, op=op, impl=cimpl, config=ccfg, pdl=True, check=good, candidate=True,
                                     us=t(whole(op, cimpl, ccfg, layer, x, True), 2) if good else float("inf")))
        dirty = T4.split_k_dirty(x.device)
        assert dirty is None, f"{dirty} left non-zero"
        rows += here
        log(model, label, m, {f"{r['op']}/{r['impl']}" + ("" if "pdl" not in r else ("+pdl" if r["pdl"] else "-pdl")):
                              r["us"] for r in here})
    torch.cuda.empty_cache()
    with open(os.path.join(OUT, "pdl.json"), "w") as f:
        json.dump(BK._result(rows), f, indent=1)
log("done")
