"""GEMV v3 with and without programmatic dependent launch, as a decode step runs it: a CUDA graph of
REPS x [a small kernel writing the activations, the GEMV on a different weight each time] (weights cycled so
that they come from HBM, not L2), time per pair from the replay. Prints us per (kernel + GEMV) pair.

    python3 benchmarks/pdl_gemv.py [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from quantarena import primitives as P  # noqa: E402
from quantarena.bench import kernels as BK  # noqa: E402
from quantarena.kernels import triton_w4a16 as T4, triton_w4a16_gemv as G3  # noqa: E402

REPS = 16
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]


def pair_us(ws, x, pdl: bool) -> float:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfgs = [dict(G3.gemv3_config(w.out_features, w.in_features, w.stripe, sms), PDL=pdl) for w in ws]
    src = torch.randn_like(x)
    for w, c in zip(ws, cfgs):
        G3.w4a16_gemv3(x, w, None, dict(c))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, c in zip(ws, cfgs):
            torch.mul(src, 1.0001, out=x)            # the producer of the activations
            G3.w4a16_gemv3(x, w, None, dict(c))
    graph.replay()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(ws))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for label, k, n in SHAPES:
        ws = []
        for _ in range(REPS):
            q, s, _ = P.quantize_int4(torch.randn(n, k, device="cuda") * 0.02, BK.GROUP, True)
            ws.append(T4.StripedWeight(P.pack_int4(q), s.to(torch.bfloat16), None, BK.GROUP))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"layer": label, "K": k, "N": n}
        for pdl in (False, True, False, True):
            row.setdefault(f"pdl={pdl}", []).append(round(pair_us(ws, x, pdl), 2))
        rows.append(row)
        print(row, flush=True)
        del ws
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
