"""W4A16 tensor-core kernel: a quick A/B of kernel options on the shapes and M that matter, in one run.

For each (shape, M) it times cuBLAS bf16, the current dispatch (the tuned table), the table's tile as it is,
with ``TMA`` and with ``TMA`` + ``SCALE_W``, and a few other tiles with those options (CUDA graphs, L2
flushed, median of 20), checking every variant's output against the reference with the output poisoned.
Writes $OUT/tc_probe.json and prints a line per (shape, M).
Usage: python benchmarks/w4a16_tc_probe.py [out_dir]   (PROBE_MS and TUNE_MODELS restrict it; PROBE_MODE=dot
times the UNPACK=3 tiles against the table instead; PROBE_MODE=tiled times the table's tile with its UNPACK=3
words tile after tile, and other TILED tiles; PROBE_MODE=rows the table's TILED tiles over TILED layouts of
several row blocks)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4, triton_w4a16_tc as TC
from quantarena.kernels.tuned_w4a16 import lookup

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
MS = [int(v) for v in os.environ.get("PROBE_MS", "4,16,64,128,256").split(",")]
MODELS = os.environ.get("TUNE_MODELS", "llama-3-8b,llama-3-70b,llama-3-8b-decode").split(",")
log = Logger()
sms = torch.cuda.get_device_properties(0).multi_processor_count
flush = L2Flush()


def _table_tile(m, n, k):
    """The dispatch table's tc tile for (M, N, K), else the kernel's default tile."""
    tuned = lookup(m, n, k)
    return dict(tuned[1]) if tuned and tuned[0] == "tc" else TC.tc_config(m, n, k, BK.GROUP, sms)


def _splits(m, n, bm, bn, steps, mults):
    """Split-K choices giving about ``mult`` programs per SM for each of ``mults`` (1 past MAX_TILES tiles)."""
    n_tiles = -(-m // bm) * -(-n // bn)
    return [T4._split_for(n_tiles, steps, mult * sms) if n_tiles <= T4.MAX_TILES else 1 for mult in mults]


def _add(out, name, cfg):
    """Append (name, cfg) unless the same config is already in ``out``."""
    if cfg not in [c for _, c in out]:
        out.append((name, cfg))


def variants(m, n, k):
    """(name, config) pairs: the table's tile as it is, with TMA, with TMA and SCALE_W, and other tiles with
    those options (names: BNxBK w warps s stages k split, +t TMA, +s SCALE_W)."""
    base = _table_tile(m, n, k)
    out = [("table", dict(base, SCALE_W=False, TMA=False)), ("table+t", dict(base, SCALE_W=False, TMA=True)),
           ("table+ts", dict(base, SCALE_W=True, TMA=True))]
    bm = base["BLOCK_M"]
    tiles = [(64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3), (64, 64, 4, 6)]
    opts = [(True, False), (True, True)]
    if m >= 128:
        tiles = [(64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
        opts = [(False, True), (True, True), (True, False)]
    for bn, bk, nw, ns in tiles:
        for split in _splits(m, n, bm, bn, k // bk, (1, 2)):
            for tma, sw in opts:
                _add(out, f"{bn}x{bk}w{nw}s{ns}k{split}{'+t' if tma else ''}{'+s' if sw else ''}",
                     dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, UNPACK=2, SCALE_W=sw, TMA=tma,
                          num_warps=nw, num_stages=ns))
    return out


def dot_variants(m, n, k):
    """``PROBE_MODE=dot``: the table's tile as it is (UNPACK 2), then UNPACK=3 tiles (the words in the dot
    operand's layout, scale folded in; BLOCK_K 128), x through a descriptor (+t) or pointer loads."""
    base = _table_tile(m, n, k)
    out = [("table", base)]
    bm = base["BLOCK_M"]
    tiles = [(64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 4, 3)] if m < 128 else [(64, 4, 3), (128, 8, 3), (64, 4, 4)]
    for bn, nw, ns in tiles:
        for split in _splits(m, n, bm, bn, k // 128, (1, 2)):
            for tma in (True, False):
                _add(out, f"d{bn}w{nw}s{ns}k{split}{'+t' if tma else ''}",
                     dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=True, TMA=tma,
                          num_warps=nw, num_stages=ns))
    return out


def tiled_variants(m, n, k):
    """``PROBE_MODE=tiled``: the table's tile as it is, the same with ``TILED`` words (UNPACK=3 tiles only), and
    TILED UNPACK=3 tiles, x through a descriptor, with the scale folded into the weight (+s) or applied to each
    step's fp32 partial (names: tBN w warps s stages k split)."""
    base = _table_tile(m, n, k)
    out = [("table", base)]
    if base.get("UNPACK") == 3:
        out.append(("table+T", dict(base, TILED=True)))
    bm = base["BLOCK_M"]
    tiles = [(64, 4, 3), (64, 4, 4), (64, 4, 5), (128, 8, 3), (128, 4, 3), (128, 4, 4)] if m < 128 else \
        [(64, 4, 3), (128, 8, 3), (64, 4, 4), (128, 4, 3)]
    for bn, nw, ns in tiles:
        for split in _splits(m, n, bm, bn, k // 128, (1, 2, 4)):
            for sw in (True, False):
                _add(out, f"t{bn}w{nw}s{ns}k{split}{'+s' if sw else ''}",
                     dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=sw, TMA=True,
                          num_warps=nw, num_stages=ns, TILED=True))
    return out


def rows_variants(m, n, k):
    """``PROBE_MODE=rows``: the table's TILED tile with the TILED layout in blocks of 16, 32, 64 rows and of
    BLOCK_N rows (one block per tile, the layout the tile search timed)."""
    tuned = lookup(m, n, k)
    base = dict(tuned[1]) if tuned and tuned[0] == "tc" else None
    if not base or not base.get("TILED"):
        return []
    return [(f"rows{r}", dict(base, TILE_ROWS=r)) for r in sorted({16, 32, 64, base["BLOCK_N"]})
            if base["BLOCK_N"] % r == 0]


if os.environ.get("PROBE_MODE") == "dot":
    variants = dot_variants  # noqa: F811
elif os.environ.get("PROBE_MODE") == "tiled":
    variants = tiled_variants  # noqa: F811
elif os.environ.get("PROBE_MODE") == "rows":
    variants = rows_variants  # noqa: F811

rows = []
for model in MODELS:
    for label, k, n in BK.SHAPES[model]:
        if label == "lm_head":
            continue
        layer = BK.make_layer(k, n)
        sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
        for m in MS:
            if not variants(m, n, k):   # nothing to compare at this point (rows mode: no TILED tile in the table)
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP)
            res = {"bf16": time_fn(lambda: F.linear(x, layer.w_bf16), flush, 20),
                   "dispatch": time_fn(lambda: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP),
                                       flush, 20)}
            errs, cfgs = {}, {}
            for name, cfg in variants(m, n, k):
                try:
                    BK.poison((m, n))
                    errs[name] = BK.rel_err(TC.w4a16_tc(x, sw, None, cfg), ref)
                    res[name] = time_fn(lambda: TC.w4a16_tc(x, sw, None, cfg), flush, 20)
                    cfgs[name] = cfg
                except Exception as exc:   # a tile that does not compile or fit: recorded, not fatal
                    log("fail", name, type(exc).__name__, str(exc)[:160])
            best = min((v, kk) for kk, v in res.items() if kk not in ("bf16", "dispatch"))
            row = {"model": model, "layer": label, "K": k, "N": n, "M": m, "us": {a: round(b, 2) for a, b in res.items()},
                   "rel_err": {a: round(b, 5) for a, b in errs.items()}, "configs": cfgs, "best": best[1]}
            rows.append(row)
            log(f"{label:14s} M={m:4d} bf16 {res['bf16']:7.1f} dispatch {res['dispatch']:7.1f} "
                f"table {res.get('table', float('nan')):7.1f} +t {res.get('table+t', float('nan')):7.1f} "
                f"+ts {res.get('table+ts', float('nan')):7.1f} +T {res.get('table+T', float('nan')):7.1f} "
                f"best {best[0]:7.1f} ({best[1]}) x{res['bf16'] / best[0]:.2f} bf16, max err "
                f"{max(errs.values()):.2e}")
        del layer, sw
        ops._W4A16_CACHE.clear()
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "tc_probe.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)
log("done")
