"""What limits the W4A16 tensor-core kernel at small M: its memory stream, or its work per step?

The kernel moves ~1.4-1.5 TB/s on the large Llama shapes at M = 2..16 whatever the tile (see
``h100-w4a16-tc-probe.json``). This script times, on the same weights in one run (CUDA graphs, L2 flushed):

* ``copy``: ``torch.sum`` over the packed words (the plain read of the same bytes);
* ``stream``: a load-only Triton kernel that reads the words tile by tile exactly as the tc kernel's grid
  does (``[BN, BKW]`` word tiles along K, split-K programs) and only adds them up, for the canonical
  row-major ``[N, K/8]`` layout (each tile row a 64-128 byte segment, rows K/2 bytes apart) and for a tiled
  layout (each tile contiguous), with pointer loads (Triton's cp.async pipeline) or a tensor descriptor;
* ``real``: the tc kernel with the tuned tile;
* ``compute``: the same launch with the word descriptor cut to the first K step, so every later tile is the
  copy engine's zero fill: the kernel's work without the weight stream (scales and activations still load).

If ``stream`` reaches the copy rate while ``real`` does not, the loop's work (dequantization, MMA, the waits)
is the limiter; if ``stream`` on the row-major layout is as slow as ``real``, the access pattern is.
Writes $OUT/tc_limits.json. ``LIMITS_NCU=1`` instead launches only the real and the compute kernels a few
times, for Nsight Compute.
Usage: python benchmarks/w4a16_tc_limits.py [out_dir]
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, Logger, time_fn
from quantarena.kernels import ops, triton_w4a16 as T4, triton_w4a16_tc as TC
from quantarena.kernels.tuned_w4a16 import lookup

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
SHAPES = [(8192, 28672), (4096, 14336)]          # (K, N): 70B and 8B gate_up
MS = [int(v) for v in os.environ.get("LIMITS_MS", "16").split(",")]
log = Logger()


@triton.jit
def stream_kernel(w_ptr, w_desc, out_ptr, KW, steps_per_split, BN: tl.constexpr, BKW: tl.constexpr,
                  TILED: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr):
    """Sum of the [BN, BKW] word tiles of one row block over one K split (the tc kernel's reads, no math)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BKW)
    acc = tl.zeros((BN, BKW), dtype=tl.int32)
    s0 = pid_k * steps_per_split
    for s in tl.range(s0, s0 + steps_per_split, num_stages=STAGES):
        if TMA:
            acc += w_desc.load([pid_n * BN, s * BKW])
        elif TILED:   # tile (pid_n, s) is BN * BKW contiguous words
            acc += tl.load(w_ptr + (pid_n * (KW // BKW) + s) * (BN * BKW) + rn[:, None] * BKW + rk[None, :])
        else:
            acc += tl.load(w_ptr + (pid_n * BN + rn)[:, None] * KW + (s * BKW + rk)[None, :])
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.sum(tl.sum(acc, axis=1), axis=0))


def stream(words, tiled, bn, bkw, split, tma, stages):
    n, kw = words.shape
    steps = kw // bkw
    grid = (n // bn, split)
    out = torch.empty(grid[0] * split, dtype=torch.int32, device=words.device)
    desc = TensorDescriptor.from_tensor(words, [bn, bkw]) if tma else None
    src = tiled if tiled is not None else words

    def run():
        stream_kernel[grid](src, desc, out, kw, steps // split, BN=bn, BKW=bkw, TILED=tiled is not None,
                            TMA=tma, STAGES=stages, num_warps=4)
    return run, out


def tc_launch(x, sw, cfg, cut: bool):
    """The tc kernel as ``TC.w4a16_tc`` launches it (TMA tile); ``cut``: the word descriptor covers only the
    first K step's words, so later tiles are zero-filled by the copy engine instead of read."""
    m, n, k = x.shape[0], sw.out_features, sw.in_features
    cfg = dict(cfg, TMA=True)
    bk = cfg["BLOCK_K"]
    split = cfg["SPLIT_K"]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    words = sw.dot_words if cfg.get("UNPACK") == 3 else sw.canonical
    if cut:
        words = words[:, :bk // 8]
    x_desc = TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], bk])
    w_desc = TensorDescriptor.from_tensor(words, [cfg["BLOCK_N"], bk // 8])
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    cnt = T4.split_k_counters(x.device)

    def run():
        out.fill_(float("nan"))
        TC.w4a16_tc_kernel[grid](x, words, x_desc, w_desc, sw.scales, sw.scales, sw.scales, out, ws, cnt,
                                 m, n, k, k // 8, k // sw.group_size, x.stride(0), out.stride(0),
                                 GROUP=sw.group_size, HAS_ZERO=False, HAS_BIAS=False,
                                 INTERPRET=T4.INTERPRETING, **cfg)
    return run, out


def tuned_tile(m, n, k):
    tuned = lookup(m, n, k)
    cfg = dict(tuned[1]) if tuned and tuned[0] == "tc" else TC.tc_config(m, n, k, BK.GROUP, 132)
    cfg.setdefault("SCALE_W", False)
    return cfg


def main():
    flush = L2Flush()
    rows = []
    ncu = os.environ.get("LIMITS_NCU") == "1"
    for k, n in SHAPES:
        layer = BK.make_layer(k, n)
        sw = ops._prepared(layer.packed, layer.scales, None, BK.GROUP, None).striped
        words = sw.canonical
        nbytes = words.numel() * 4 + sw.scales.numel() * 2

        def rec(name, us, **extra):
            rows.append(dict(name=name, K=k, N=n, us=round(us, 2), tb_s=round(nbytes / us / 1e6, 3), **extra))
            log(k, n, name, round(us, 2), "us", round(nbytes / us / 1e6, 3), "TB/s", extra or "")

        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = tuned_tile(m, n, k)
            if os.environ.get("LIMITS_TILE"):   # e.g. "64,128,2,4,3,1": BN, BK, UNPACK, warps, stages, split
                bn, bk, unpack, nw, ns, split = (int(v) for v in os.environ["LIMITS_TILE"].split(","))
                cfg = dict(cfg, BLOCK_N=bn, BLOCK_K=bk, UNPACK=unpack, num_warps=nw, num_stages=ns, SPLIT_K=split,
                           SCALE_W=True)
            if ncu:
                for cut in (False, True):
                    run, _ = tc_launch(x, sw, cfg, cut)
                    for _ in range(3):
                        run()
                torch.cuda.synchronize()
                continue
            ref = ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP)
            # UNPACK 3 reads its words through pointers, not the descriptor: no "compute" row for it
            for name, cut in (("real", False), ("compute", True))[:1 if cfg.get("UNPACK") == 3 else 2]:
                run, out = tc_launch(x, sw, cfg, cut)
                run()
                err = BK.rel_err(out, ref)   # "real" must match the dispatch; "compute" cannot (zero tiles)
                rec(name, time_fn(run, flush, 30), M=m, config=cfg, rel_err_vs_dispatch=round(err, 6))
            rec("dispatch", time_fn(lambda: ops.w4a16_linear(x, layer.packed, layer.scales, None, BK.GROUP),
                                    flush, 30), M=m)
        if ncu:
            continue
        total = torch.zeros((), dtype=torch.int64, device="cuda")
        flat = words.view(-1)
        rec("copy", time_fn(lambda: torch.sum(flat, dim=0, dtype=torch.int64, out=total), flush, 30))
        for bn, bkw in ((64, 16), (128, 16), (64, 32), (128, 32)):
            tiled = words.view(n // bn, bn, words.shape[1] // bkw, bkw).permute(0, 2, 1, 3).contiguous()
            want = int(torch.sum(words, dtype=torch.int64)) % 2**32
            for layout, tma, split, stages in itertools.product(("row", "tiled"), (False, True), (1, 2, 4), (3, 5)):
                if layout == "tiled" and tma:
                    continue
                run, out = stream(words, tiled if layout == "tiled" else None, bn, bkw, split, tma, stages)
                try:
                    run()
                    us = time_fn(run, flush, 30)
                except Exception as exc:   # a tile the compiler rejects: recorded, not fatal
                    log("fail", bn, bkw, layout, tma, split, stages, type(exc).__name__, str(exc)[:160])
                    continue
                read_all = int(out.sum(dtype=torch.int64)) % 2**32 == want   # every word was read once
                rec("stream", us, BN=bn, BKW=bkw, layout=layout, TMA=tma, SPLIT_K=split, stages=stages,
                    read_all=read_all)
            del tiled
        del layer, sw, words
        ops._W4A16_CACHE.clear()
        torch.cuda.empty_cache()
    if not ncu:
        result = dict(BK._result(rows), what="W4A16 tc kernel limits at small M: copy, load-only stream, "
                      "real kernel, kernel without the weight stream (see benchmarks/w4a16_tc_limits.py)")
        with open(os.path.join(OUT, "tc_limits.json"), "w") as f:
            json.dump(result, f, indent=1)
    log("done")


if __name__ == "__main__":
    main()
