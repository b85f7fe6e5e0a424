"""GPU kernel sweep (run on the device): optional GEMV tuning, then every contender, JSON per model.

    python benchmarks/kernels.py --out DIR [--tune] [--models llama-3-8b,llama-3-70b] [--batch 1,2,...]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from quantarena.bench import kernels as K  # noqa: E402
from quantarena.bench.timing import L2Flush, time_fn  # noqa: E402
from quantarena.kernels import triton_w4a16 as T4  # noqa: E402


def tune_gemv(models: list[str], log=print) -> dict:
    flush = L2Flush()
    shapes = sorted({(n, k) for m in models for _, k, n in K.SHAPES[m]})
    layers = {s: K.make_layer(s[1], s[0]) for s in shapes}
    best: dict = {}
    for (bn, bkw, warps), split in itertools.product(
            [(16, 64, 4), (32, 64, 4), (32, 32, 4), (64, 32, 4), (32, 64, 8), (64, 64, 8)], [1, 2, 4, 8, 16]):
        cfg = dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=warps, num_stages=3)
        for (n, k), layer in layers.items():
            w = T4.StripedWeight(layer.packed, layer.scales, None, K.GROUP)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            try:
                us = time_fn(lambda: T4.w4a16_gemv(x, w, None, cfg), flush, 10)
            except Exception as exc:
                log(f"tune {cfg} {n}x{k}: {type(exc).__name__} {str(exc)[:80]}")
                continue
            if (n, k) not in best or us < best[(n, k)][0]:
                best[(n, k)] = (us, cfg)
    for (n, k), (us, cfg) in best.items():
        log(f"gemv best N={n} K={k}: {us:.1f} us {cfg}")
        T4.TUNED_GEMV[(n, k)] = {key: v for key, v in cfg.items() if key != "BLOCK_M"}
    return {f"{n}x{k}": dict(us=us, **cfg) for (n, k), (us, cfg) in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="llama-3-8b,llama-3-70b")
    ap.add_argument("--batch", default=",".join(map(str, K.DEFAULT_BATCHES)))
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--no-gemlite", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None, help="stop timing gemlite after this many seconds")
    args = ap.parse_args()
    models = args.models.split(",")
    t0 = time.time()
    if args.tune:
        tuned = tune_gemv(models)
        with open(os.path.join(args.out, "tuned_gemv.json"), "w") as f:
            json.dump(tuned, f, indent=1)
        print(f"tuning took {time.time() - t0:.0f}s", flush=True)
    for model in models:
        result = K.sweep([model], [int(b) for b in args.batch.split(",")], with_gemlite=not args.no_gemlite,
                         budget_s=args.budget_s, log=lambda s: print(s, flush=True),
                         partial_path=os.path.join(args.out, f"kernels-{model}.json"))
        result["tuned_gemv"] = {f"{n}x{k}": v for (n, k), v in T4.TUNED_GEMV.items()}
        K.write(result, os.path.join(args.out, f"kernels-{model}.json"))
        with open(os.path.join(args.out, f"table-{model}.txt"), "w") as f:
            f.write(K.table(result))


if __name__ == "__main__":
    main()
