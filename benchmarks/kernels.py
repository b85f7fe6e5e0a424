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


def tune_gemv(models: list[str], rows: int = 1, log=print) -> dict:
    flush = L2Flush()
    shapes = sorted({(n, k) for m in models for _, k, n in K.SHAPES[m]})
    layers = {s: K.make_layer(s[1], s[0]) for s in shapes}
    best: dict = {}
    tiles = [(16, 64, 4), (32, 64, 4), (32, 32, 4), (64, 32, 4), (32, 64, 8), (64, 64, 8)] if rows == 1 else \
        [(16, 32, 4), (16, 64, 4), (32, 32, 4), (16, 32, 8), (32, 32, 8), (16, 16, 4)]
    for (bn, bkw, warps), split in itertools.product(tiles, [1, 2, 4, 8, 16]):
        cfg = dict(BLOCK_M=1 if rows == 1 else 4, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=warps,
                   num_stages=3)
        for (n, k), layer in layers.items():
            w = T4.StripedWeight(layer.packed, layer.scales, None, K.GROUP)
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            try:
                us = time_fn(lambda: T4.w4a16_gemv(x, w, None, cfg), flush, 10)
            except Exception as exc:
                log(f"tune {cfg} {n}x{k}: {type(exc).__name__} {str(exc)[:80]}")
                continue
            if (n, k) not in best or us < best[(n, k)][0]:
                best[(n, k)] = (us, cfg)
    table = T4.TUNED_GEMV if rows == 1 else T4.TUNED_GEMV_M4
    for (n, k), (us, cfg) in best.items():
        log(f"gemv M={rows} best N={n} K={k}: {us:.1f} us {cfg}")
        table[(n, k)] = {key: v for key, v in cfg.items() if key != "BLOCK_M"}
    return {f"{n}x{k}": dict(us=us, **cfg) for (n, k), (us, cfg) in best.items()}


def tune_int8(log=print) -> dict:
    """Best tile per M bucket by total time over the Llama-3-8B shapes (split-K by the heuristic)."""
    from quantarena.kernels import triton_w8a8 as T8
    flush = L2Flush()
    layers = [K.make_layer(k, n) for _, k, n in K.SHAPES["llama-3-8b"]]
    tiles = [(16, 64, 256, 4, 4), (16, 128, 256, 4, 4), (32, 64, 256, 4, 4), (64, 64, 256, 4, 4),
             (64, 128, 128, 4, 4), (64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
             (128, 128, 64, 4, 4), (256, 128, 128, 8, 3)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {}
    for bucket in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        best = None
        for bm, bn, bk, warps, stages in tiles:
            if bm > max(16, bucket) or (bucket >= 1024 and bm < 64):
                continue
            total = 0.0
            for layer in layers:
                a = torch.randint(-128, 128, (bucket, layer.k), device="cuda", dtype=torch.int8)
                xs = torch.rand(bucket, 1, device="cuda")
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, GROUP_M=8)
                tiles_n = -(-bucket // bm) * -(-layer.n // bn)
                split = 1
                while tiles_n * split < 2 * sms and split * 2 <= layer.k // bk and split < 16:
                    split *= 2
                cfg["SPLIT_K"] = split
                try:
                    total += time_fn(lambda: T8.int8_gemm(a, xs, layer.w8, layer.w8_scale, None, torch.bfloat16, cfg),
                                     flush, 10)
                except Exception as exc:
                    log(f"int8 tune {cfg}: {type(exc).__name__} {str(exc)[:80]}")
                    total = float("inf")
                    break
            if best is None or total < best[0]:
                best = (total, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
        log(f"int8 M<={bucket} best {best}")
        T8.TUNED_INT8[bucket] = best[1]
        result[bucket] = dict(us_sum=best[0], **best[1])
    return result


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
        tuned = {"gemv_m1": tune_gemv(models), "gemv_m4": tune_gemv(models, rows=4), "int8": tune_int8()}
        with open(os.path.join(args.out, "tuned.json"), "w") as f:
            json.dump(tuned, f, indent=1)
        print(f"tuning took {time.time() - t0:.0f}s", flush=True)
    for model in models:
        result = K.sweep([model], [int(b) for b in args.batch.split(",")], with_gemlite=not args.no_gemlite,
                         budget_s=args.budget_s, log=lambda s: print(s, flush=True),
                         partial_path=os.path.join(args.out, f"kernels-{model}.json"))
        from quantarena.kernels import triton_w8a8 as T8
        result["tuned"] = {"gemv_m1": {f"{n}x{k}": v for (n, k), v in T4.TUNED_GEMV.items()},
                           "gemv_m4": {f"{n}x{k}": v for (n, k), v in T4.TUNED_GEMV_M4.items()},
                           "int8": {str(b): v for b, v in T8.TUNED_INT8.items()}}
        K.write(result, os.path.join(args.out, f"kernels-{model}.json"))
        with open(os.path.join(args.out, f"table-{model}.txt"), "w") as f:
            f.write(K.table(result))


if __name__ == "__main__":
    main()
