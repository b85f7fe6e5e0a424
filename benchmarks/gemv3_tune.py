"""W4A16 GEMV v3 (M = 1): GPU correctness, tile search, and every M = 1 contender in one run.

CUDA graphs, L2 flushed, median of 20 replays per point (quantarena.bench.timing). Contenders: cuBLAS bf16,
tinygemm, the current dispatch (``quantarena``), gemlite's W4A16 GEMV when importable, a device-to-device
copy of the same bytes (the bandwidth ceiling), and every v3 tile config. Writes $OUT/gemv3.json (schema of
benchmarks/results/*-kernels.json plus ``copy_tb_s`` and per-config rows) and $OUT/best3.json.
Usage: python benchmarks/gemv3_tune.py [out_dir]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4, triton_w4a16_gemv as G3

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
# (BLOCK_N, SUB, BLOCK_KW, num_warps); every one loads its scales without a layout conversion (sm_90 SASS)
TILES = [(64, 2, 32, 4), (32, 1, 32, 4), (128, 2, 32, 8), (64, 4, 32, 4), (128, 4, 32, 4), (256, 4, 32, 8)]
# (PREFETCH, STAGES, TILED): register double buffer; Triton's cp.async pipeline; tile-contiguous weights
MODES = [(True, 1, False), (True, 1, True), (False, 3, False), (False, 3, True), (True, 3, True)]
log = Logger()
sms = torch.cuda.get_device_properties(0).multi_processor_count


def correctness() -> list[dict]:
    """Ragged N, every group size, zeros, bias, SUB 1/2/4, with and without prefetch, split-K 1..8, on
    outputs poisoned with NaN; the split-K counters must be back to zero after."""
    out_rows = []
    for (n, k, group, sym, bias) in [(40, 384, 128, True, False), (33, 256, 64, False, True),
                                     (200, 1024, 32, False, True), (1000, 4096, 128, True, True),
                                     (96, 2048, 256, False, False), (4096, 14336, 128, True, False),
                                     (1024, 8192, 128, False, True)]:
        packed, s, z, sw = BK.random_w4(n, k, group, sym, seed=n + k)
        b = torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        ref = R.w4a16_linear(x, packed, s, z, group, b).float()
        worst = 0.0
        for bn, sub, bkw, nw in TILES[:3]:
            bkw = G3.block_kw(k // 8, sw.stripe, bkw)
            for pf, st, tiled in MODES:
                tw = G3.tile_words(sw.words, bn, bkw) if tiled else None
                for split in (1, 3):
                    poison = torch.full((n * 4,), float("nan"), device="cuda", dtype=torch.bfloat16)
                    del poison
                    out = G3.w4a16_gemv3(x, sw, b, dict(BLOCK_N=bn, SUB=sub, BLOCK_KW=bkw, SPLIT_K=split,
                                                        num_warps=nw, PREFETCH=pf, STAGES=st), tw)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    worst = max(worst, err if err == err else float("inf"))
                    assert err < 8e-3, (n, k, group, sym, bn, sub, bkw, pf, st, tiled, split, err)
        assert int(T4.split_k_counters(x.device).abs().sum()) == 0
        out_rows.append({"N": n, "K": k, "group": group, "sym": sym, "bias": bias, "max_rel_err": worst})
        log("correct", n, k, group, sym, bias, f"max rel err {worst:.2e}")
    return out_rows


def gemlite_fn(layer):
    try:
        fn = BK._gemlite(layer, "w4a16")
        return lambda x: fn(x)
    except Exception as exc:  # not installed here, or failed: the row records why
        log("gemlite unavailable:", type(exc).__name__, str(exc)[:200])
        return None


def main() -> None:
    result = {"checks": []}
    try:
        result["checks"] = correctness()
    except Exception as exc:  # keep timing; the JSON says the check failed
        import traceback
        traceback.print_exc()
        result["checks_failed"] = f"{type(exc).__name__}: {exc}"
    flush = L2Flush()
    rows, best = [], {}
    for model in os.environ.get("TUNE_MODELS", "llama-3-8b,llama-3-70b").split(","):
        for label, k, n in BK.SHAPES[model]:
            layer = BK.make_layer(k, n)
            sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            nbytes = BK.bytes_moved("w4a16", k, n, 1)
            src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            cont = [("bf16", "cublas", lambda x: F.linear(x, layer.w_bf16)),
                    ("w4a16", "tinygemm", BK._tinygemm(layer)),
                    ("w4a16", "quantarena", lambda x: ops.w4a16_linear(x, layer.packed, layer.scales, None,
                                                                       BK.GROUP)),
                    ("copy", "copy_", lambda x: dst.copy_(src)),
                    ("read", "sum", lambda x: src.view(torch.float32).sum())]
            gl = gemlite_fn(layer)
            if gl is not None:
                cont.append(("w4a16", "gemlite", gl))
            for op, impl, fn in cont:
                row = {"model": model, "layer": label, "op": op, "impl": impl, "K": k, "N": n, "M": 1}
                try:
                    row["us"] = round(time_fn(lambda: fn(x), flush, 20), 2)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if op in ("copy", "read") and "us" in row:  # a copy reads and writes: FACTS counts both
                    row["tb_s"] = round((2 if op == "copy" else 1) * nbytes / row["us"] / 1e6, 3)
                elif "us" in row:
                    BK.add_rates(row)
                rows.append(row)
            ref = R.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP).float()
            cands = []
            kw = k // 8
            for bn, sub, bkw, nw in TILES:
                bkw = G3.block_kw(kw, sw.stripe, bkw)
                tiles = -(-n // bn)
                splits = {T4._split_for(tiles, kw // bkw, t * sms) for t in (1, 2, 4)}
                for split in sorted(splits):
                    tw = None
                    for pf, st, tiled in MODES:
                        if tiled and tw is None:
                            tw = G3.tile_words(sw.words, bn, bkw)
                        cfg = dict(BLOCK_N=bn, SUB=sub, BLOCK_KW=bkw, SPLIT_K=split, num_warps=nw, PREFETCH=pf,
                                   STAGES=st)
                        try:
                            us = time_fn(lambda: G3.w4a16_gemv3(x, sw, None, cfg, tw if tiled else None), flush, 20)
                        except Exception as exc:
                            log("fail", cfg, type(exc).__name__, str(exc)[:300])
                            continue
                        cands.append((us, dict(cfg, TILED=tiled)))
                    del tw
            us, cfg = min(cands, key=lambda c: c[0])
            run_cfg = {a: b for a, b in cfg.items() if a != "TILED"}
            tw = G3.tile_words(sw.words, cfg["BLOCK_N"], cfg["BLOCK_KW"]) if cfg["TILED"] else None
            out = G3.w4a16_gemv3(x, sw, None, run_cfg, tw)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            best[f"{n},{k}"] = dict(cfg, us=round(us, 2))
            row = {"model": model, "layer": label, "op": "w4a16", "impl": "quantarena:gemv3", "K": k, "N": n,
                   "M": 1, "us": round(us, 2), "rel_err": err, "config": cfg,
                   "all": [dict(c, us=round(u, 2)) for u, c in sorted(cands, key=lambda c: c[0])[:12]]}
            BK.add_rates(row)
            rows.append(row)
            mine = {r["impl"]: r["us"] for r in rows if r["K"] == k and r["N"] == n and "us" in r}
            log(model, label, {a: round(b, 1) for a, b in mine.items()}, cfg)
            layer = sw = src = dst = tw = None  # free before the next shape
            ops._W4A16_CACHE.clear()
            torch.cuda.empty_cache()
            result.update(BK._result(rows))
            with open(os.path.join(OUT, "gemv3.json"), "w") as f:
                json.dump(result, f, indent=1)
            with open(os.path.join(OUT, "best3.json"), "w") as f:
                json.dump(best, f, indent=1)
    log("done")
    return result


if __name__ == "__main__":
    main()
