"""Split-K by atomic adds (``ATOMIC`` tiles): tile search at the decode batch sizes, every dispatch choice in the
same run (CUDA graphs, L2 flushed).

With ordinary split-K the last program of an output tile reads SPLIT_K partial tiles from the workspace; with
``ATOMIC`` every program adds its partial into one zeroed workspace and the last reads one tile
(``triton_w4a16.split_k_reduce``). Per (M, N, K) this times, in one run:

* bf16 cuBLAS;
* W4A16: the current table's choice (``quantarena:tc`` with its tile, or ``quantarena:dequant``), the same tile
  with ``ATOMIC``, and a grid of ATOMIC tensor-core tiles (BLOCK_N 32/64/128, split 2-16);
* int8 and fp8 (GEMM only, on quantized activations, as in w8a8_tune.py): the current table's kernel and tile,
  ``torch._scaled_mm``, and ATOMIC ``swap`` / ``std`` tiles.

Every ATOMIC candidate is checked on poisoned output memory before it may win: W4A16 against the reference
(relative error <= 8e-3), int8 bit for bit against the table's kernel (exact int32 sums), fp8 to 1e-5 of the same
tile without ATOMIC (Hopper's fp8 MMA accumulates with reduced precision: tiles of different splits differ by ~1e-3).
Writes $OUT/atomic.json (rows as in benchmarks/results/*-kernels.json, ``config`` naming each tile) after each
shape; merge it into the dispatch tables with w4a16_tuned_table.py / w8a8_tuned_table.py (a later run's rows
replace the earlier ones of every (M, N, K) it measured, so each point here carries every earlier winner too).
Usage: python benchmarks/splitk_atomic_tune.py [out_dir]   (env ATOMIC_MS, ATOMIC_SHAPES=model:layer,...,
ATOMIC_BUDGET_S: stop starting new shapes after this many seconds)
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
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4, triton_w4a16_tc as TC, triton_w8a8 as T8
from quantarena.kernels import tuned_w4a16
from quantarena.kernels.triton_act_quant import act_quant

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("ATOMIC_MS", "8,16,32,64,128,256").split(",")]
SHAPES = os.environ.get("ATOMIC_SHAPES", "llama-3-8b:kv_proj,llama-3-70b:kv_proj,llama-3-8b:q_proj,llama-3-8b:down,"
                        "llama-3-8b-decode:qkv,llama-3-70b:q_proj,llama-3-70b-decode:qkv,llama-3-70b:down").split(",")
BUDGET_S = float(os.environ.get("ATOMIC_BUDGET_S", "500"))
started = time.time()
log = Logger(started)
flush = L2Flush()
SMS = torch.cuda.get_device_properties(0).multi_processor_count


def t(fn) -> float:
    try:
        return round(time_fn(fn, flush, 15), 2)
    except Exception as exc:
        log("fail", type(exc).__name__, str(exc)[:160])
        return float("inf")


def block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))


def w4_candidates(m: int, n: int, k: int, table_cfg: dict | None) -> list[dict]:
    if m * n > T4.ATOMIC_WS_WORDS:   # the launcher would fall back to the slot-per-split workspace
        return []
    out = [] if table_cfg is None or table_cfg.get("SPLIT_K", 1) == 1 else [dict(table_cfg, ATOMIC=True)]
    bm = block_m(m)
    for bn in (32, 64, 128):
        for split in BK.atomic_splits(m, n, k, bm, bn, 128, SMS):
            for ns in (3, 4):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=m > 64,
                                TMA=True, num_warps=4, num_stages=ns, TILED=True, ATOMIC=True))
    return out


def a8_fn(op: str, impl: str, cfg: dict | None, layer, xq, xs):
    """The GEMM of a table row bound to these quantized activations, as a function of nothing."""
    gemm = BK.a8w8_gemm_fn(op, impl, cfg, layer)
    return lambda: gemm(xq, xs)


def poisoned(fn, m: int, n: int) -> torch.Tensor:
    BK.poison((m, n))
    return fn()


rows: list[dict] = []
for spec in SHAPES:
    if time.time() - started > BUDGET_S:
        log("budget spent; not starting", spec)
        break
    model, label, k, n = BK.layer_shape(spec)
    layer = BK.make_layer(k, n)
    sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
    for m in MS:
        base = {"model": model, "layer": label, "K": k, "N": n, "M": m}
        here: list[dict] = []
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        here.append(dict(base, op="bf16", impl="cublas", us=t(lambda: F.linear(x, layer.w_bf16))))
        # W4A16: the table's choice, then ATOMIC tiles, each checked against the reference
        ref = R.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP)
        entry = tuned_w4a16.lookup(m, n, k)
        table_cfg = entry[1] if entry and entry[0] == "tc" else None
        here.append(dict(base, op="w4a16", impl="quantarena:dequant", path="dequant", us=t(
            lambda: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP, path="dequant"))))
        for cfg in ([table_cfg] if table_cfg else []) + w4_candidates(m, n, k, table_cfg):
            try:
                err = BK.rel_err(poisoned(lambda: TC.w4a16_tc(x, sw, None, cfg), m, n), ref)
            except Exception as exc:   # a tile this Triton cannot compile
                log("fail", cfg, type(exc).__name__, str(exc)[:160])
                continue
            ok = err <= 8e-3
            us = t(lambda: TC.w4a16_tc(x, sw, None, cfg)) if ok else float("inf")
            here.append(dict(base, op="w4a16", impl="quantarena:tc" if ok else "quantarena:tc-wrong", path="tc",
                             config=cfg, us=us, rel_err=err))
        # int8 / fp8 GEMMs on quantized activations
        for op in ("w8a8", "fp8"):
            xq, xs = act_quant(x, fp8=op == "fp8")
            impl, cfg = ops._a8w8_choice(op, m, n, k)
            if impl == "gemv":   # not at M >= 8; the defaults
                impl, cfg = ("std" if op == "w8a8" else "scaled_mm"), None
            if impl == "std" and cfg is None:   # the default tile, named, so that the table records what ran
                cfg = T8.int8_config(m, n, k, SMS)
            check = poisoned(a8_fn(op, impl, cfg, layer, xq, xs), m, n).float()
            here.append(dict(base, op=op, impl=impl, config=cfg, us=t(a8_fn(op, impl, cfg, layer, xq, xs)),
                             table=True))
            if op == "fp8" and impl != "scaled_mm":
                here.append(dict(base, op=op, impl="scaled_mm", us=t(a8_fn(op, "scaled_mm", None, layer, xq, xs))))
            for cimpl, ccfg in BK.atomic_a8_tiles(m, n, k, SMS):
                if op == "fp8" and cimpl == "std":   # the tiled kernel is int8 only
                    continue
                fn = a8_fn(op, cimpl, ccfg, layer, xq, xs)
                try:
                    out = poisoned(fn, m, n).float()
                    if op == "fp8":   # the same tile summing its splits slot by slot: only the fp32 order differs
                        check = a8_fn(op, cimpl, dict(ccfg, ATOMIC=False), layer, xq, xs)().float()
                except Exception as exc:
                    log("fail", op, cimpl, ccfg, type(exc).__name__, str(exc)[:160])
                    continue
                err = BK.rel_err(out, check)
                # int8: exact int32 sums and the same epilogue as the table's kernel. fp8 against the same tile
                # without ATOMIC (Hopper's fp8 MMA accumulates with reduced precision, so tiles of another split
                # differ from each other by ~1e-3 whatever the reduction)
                ok = torch.equal(out, check) if op == "w8a8" else err <= 1e-5
                here.append(dict(base, op=op, impl=cimpl if ok else cimpl + "-wrong", config=ccfg,
                                 us=t(fn) if ok else float("inf"), rel_err=err))
        dirty = T4.split_k_dirty(x.device)
        assert dirty is None, f"{dirty} left non-zero"
        rows += here
        summary = {}
        for r in here:
            key = r["op"] + "/" + r["impl"] + ("+A" if (r.get("config") or {}).get("ATOMIC") else "")
            summary[key] = min(summary.get(key, float("inf")), r["us"])
        log(model, label, m, {key: v for key, v in summary.items()})
    ops._W4A16_CACHE.clear()   # the next shape's layer replaces this one
    torch.cuda.empty_cache()
    with open(os.path.join(OUT, "atomic.json"), "w") as f:
        json.dump(BK._result(rows), f, indent=1)
log("done")
