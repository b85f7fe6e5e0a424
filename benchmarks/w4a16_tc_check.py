"""W4A16 tensor-core kernel: GPU correctness of a grid of tile options, each run three times on fresh inputs
with the output poisoned (a wrong or run-to-run varying error points at a race). Prints one line per tile.

``CHECK_MODE=dot``: the UNPACK=3 tiles and the TMA + SCALE_W split-K tiles on 128 rows (which a launcher guard
used to run without TMA), each with and without ``MMA_WAIT`` (the unpack waits for the ``wgmma``s in flight).
Usage: python benchmarks/w4a16_tc_check.py
"""
from __future__ import annotations

import itertools
import os

import torch

from quantarena.bench import kernels as BK
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4, triton_w4a16_tc as TC


def tiles(m):
    if os.environ.get("CHECK_MODE") != "dot":
        for bm, bn, bk, nw, ns, split, tma, scw in itertools.product((64, 128), (64,), (64, 128), (4,), (3,),
                                                                     (1, 2, 4), (False, True), (False, True)):
            if bm <= m:
                yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, UNPACK=2, SCALE_W=scw, TMA=tma,
                           num_warps=nw, num_stages=ns)
        return
    for bm, (bn, nw), ns, split, tma, wait in itertools.product((64, 128), ((64, 4), (128, 8)), (3, 4), (1, 2, 4),
                                                                (False, True), (True, False)):
        if bm <= m:
            yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, UNPACK=3, SCALE_W=True, TMA=tma,
                       num_warps=nw, num_stages=ns, MMA_WAIT=wait)
    for split, wait in itertools.product((2, 4), (True, False)):   # the old race: TMA + SCALE_W, 128 rows
        yield dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, UNPACK=2, SCALE_W=True, TMA=True,
                   num_warps=4, num_stages=3, MMA_WAIT=wait)


for (k, n), m in [((4096, 4096), 128), ((14336, 4096), 256), ((4096, 4096), 64)]:
    layer = BK.make_layer(k, n)
    sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
    for cfg in tiles(m):
        errs, nonfinite = [], []
        for rep in range(3):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP)
            BK.poison((m, n))
            out = TC.w4a16_tc(x, sw, None, cfg)
            bad = ~torch.isfinite(out)
            nonfinite.append(int(bad.sum()))
            ok = ~bad
            errs.append(((out.float() - ref.float())[ok].norm() / ref.float()[ok].norm()).item())
        cnt = int(T4.split_k_counters(x.device).abs().sum())
        flag = "" if max(nonfinite) == 0 and max(errs) < 8e-3 and cnt == 0 else "  <-- WRONG"
        print(f"K={k} N={n} M={m} bm{cfg['BLOCK_M']} bn{cfg['BLOCK_N']} bk{cfg['BLOCK_K']} w{cfg['num_warps']} "
              f"s{cfg['num_stages']} split{cfg['SPLIT_K']} unpack{cfg['UNPACK']} tma{int(cfg['TMA'])} "
              f"sw{int(cfg['SCALE_W'])} wait{int(cfg.get('MMA_WAIT', True))}: nonfinite {nonfinite} "
              f"err(finite) {[f'{e:.1e}' for e in errs]} counters {cnt}{flag}", flush=True)
    del layer, sw
    ops._W4A16_CACHE.clear()
