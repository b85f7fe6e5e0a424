"""Merge decode runs of one scheme each (``benchmarks/decode.py --schemes S``, run one after another on one
machine, each in a fresh process so no scheme inherits another's allocator state) into one results file,
crossover recomputed. Usage: python benchmarks/merge_decode.py OUT.json RUN.json [RUN.json ...]"""
from __future__ import annotations

import json
import sys

from quantarena.bench import decode

out_path, paths = sys.argv[1], sys.argv[2:]
if not paths:
    sys.exit("usage: merge_decode.py OUT.json RUN.json [RUN.json ...]")
runs = [json.load(open(p)) for p in paths]
first = runs[0]
for run in runs[1:]:
    for key in ("device", "torch", "model", "prompt_len", "gen_len", "fused_linears", "lm_head", "attention"):
        if run[key] != first[key]:
            sys.exit(f"error: {key} differs between runs: {first[key]!r} vs {run[key]!r}")
merged = {k: v for k, v in first.items() if k not in ("rows", "checks", "crossover")}
merged["method"] = first["method"] + "; each scheme in its own process, one after another on one machine"
merged["rows"] = [row for run in runs for row in run["rows"]]
if any("w4a16_l2_prefetch_mb" in run for run in runs):   # recorded by each run; only the W4A16 one has a chain
    merged["w4a16_l2_prefetch_mb"] = max(run.get("w4a16_l2_prefetch_mb", 0.0) for run in runs)
merged["checks"] = {k: v for run in runs for k, v in run["checks"].items()}
merged["crossover"] = decode.crossover(merged["rows"])
with open(out_path, "w") as f:
    json.dump(merged, f, indent=1)
print(json.dumps(merged["crossover"]))
