"""Re-time whole sweep points (every contender of a (model, layer, M), three rounds) that a sweep recorded with
outliers, and write them in the sweep's row schema, each row marked ``recheck`` with its three round medians;
its ``us`` is the fastest of the three round medians, for every contender alike: the H100's slow replay series
only ever slow a round down (2-7x, any kernel, cuBLAS included), and two of three rounds were seen slow. benchmarks/results/h100-kernels.json keeps a point's sweep rows under
``replaced`` when a recheck replaces them.
Usage: OUT=dir python benchmarks/recheck_sweep.py points.json   (a list of [model, layer, M])
"""
from __future__ import annotations

import json
import os
import sys

import torch

from quantarena.bench import kernels as BK
from quantarena.bench.timing import L2Flush, time_fn


def main(points: list[list]) -> None:
    flush = L2Flush()
    try:
        import gemlite  # noqa: F401
        with_gemlite = True
    except ImportError:
        with_gemlite = False
    rows = []
    for model, label, m in points:
        _, k, n = next(s for s in BK.SHAPES[model] if s[0] == label)
        layer = BK.make_layer(k, n)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cont = BK.contenders(layer, m, with_gemlite and model == "llama-3-8b")
        rounds: dict[int, list[float]] = {i: [] for i in range(len(cont))}
        for _ in range(3):
            for i, (op, impl, path, fn) in enumerate(cont):
                try:
                    rounds[i].append(time_fn(lambda: fn(x), flush, 20))
                except Exception as exc:   # recorded as the sweep records it
                    rounds[i].append(float("nan"))
                    print(model, label, m, impl, type(exc).__name__, str(exc)[:120], flush=True)
        for i, (op, impl, path, fn) in enumerate(cont):
            row = {"model": model, "layer": label, "op": op, "impl": impl, "K": k, "N": n, "M": m, "recheck": True,
                   "rounds_us": [round(v, 2) for v in rounds[i]]}
            if path:
                row["path"] = path
            if all(v == v for v in rounds[i]):
                row["us"] = round(min(rounds[i]), 2)
                if impl == "quantarena" and m in BK.ERROR_AT_M:
                    row["rel_err"] = BK.check_error(op, fn, layer, m)
            BK.add_rates(row)
            rows.append(row)
        print(model, label, m, {r["impl"] + "/" + r["op"]: r.get("us") for r in rows[-len(cont):]}, flush=True)
        del layer
        torch.cuda.empty_cache()
        BK.write(BK._result(rows), os.path.join(os.environ.get("OUT", "."), "recheck.json"))   # after each point


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main(json.load(f))
