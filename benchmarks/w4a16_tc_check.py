"""W4A16 tensor-core kernel: GPU correctness of a grid of tile options, each run three times on fresh inputs
with the output poisoned (a wrong or run-to-run varying error points at a race). Prints one line per tile.
Usage: python benchmarks/w4a16_tc_check.py
"""
from __future__ import annotations

import itertools

import torch

from quantarena.bench import kernels as BK
from quantarena.kernels import ops, reference as R, triton_w4a16 as T4, triton_w4a16_tc as TC

for (k, n), m in [((4096, 4096), 128), ((14336, 4096), 256), ((4096, 4096), 64)]:
    layer = BK.make_layer(k, n)
    sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
    for bm, bn, bk, nw, ns, split, tma, scw in itertools.product((64, 128), (64,), (64, 128), (4,), (3,), (1, 2, 4),
                                                                 (False, True), (False, True)):
        if bm > m:
            continue
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, UNPACK=2, SCALE_W=scw, TMA=tma,
                   num_warps=nw, num_stages=ns)
        errs, nonfinite = [], []
        for rep in range(3):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP)
            poison = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            del poison
            out = TC.w4a16_tc(x, sw, None, cfg)
            bad = ~torch.isfinite(out)
            nonfinite.append(int(bad.sum()))
            ok = ~bad
            errs.append(((out.float() - ref.float())[ok].norm() / ref.float()[ok].norm()).item())
        cnt = int(T4.split_k_counters(x.device).abs().sum())
        flag = "" if max(nonfinite) == 0 and max(errs) < 8e-3 and cnt == 0 else "  <-- WRONG"
        print(f"K={k} N={n} M={m} bm{bm} bn{bn} bk{bk} split{split} tma{int(tma)} sw{int(scw)}: "
              f"nonfinite {nonfinite} err(finite) {[f'{e:.1e}' for e in errs]} counters {cnt}{flag}", flush=True)
    del layer, sw
    ops._W4A16_CACHE.clear()
