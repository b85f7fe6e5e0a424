"""Greedy token choice over a Llama-3 vocabulary (128256 logits per row): one ``argmax`` against
``decode.two_stage_argmax`` (what ``decode.greedy_tokens`` uses up to ``GREEDY_TWO_STAGE_MAX_BATCH`` rows), each timed as 20 calls in a CUDA graph (10 replays after one warm), per batch.
Writes $OUT/argmax.json. Usage: python benchmarks/argmax_greedy.py [out_dir]
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch

from quantarena.bench import decode as D

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
VOCAB, CALLS, REPLAYS = 128256, 20, 10


def graph_us(fn) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / (CALLS * REPLAYS), 2)


def main() -> None:
    rows = []
    for b in (1, 4, 16, 32, 64, 128, 256):
        x = torch.randn(b, VOCAB, device="cuda").bfloat16()
        assert torch.equal(D.two_stage_argmax(x, 256), x.argmax(-1, keepdim=True))
        rows.append({"batch": b, "argmax_us": graph_us(lambda: x.argmax(-1, keepdim=True)),
                     "two_stage_us": graph_us(lambda: D.two_stage_argmax(x, 256))})
        print(rows[-1], flush=True)
    with open(os.path.join(OUT, "argmax.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "date": datetime.date.today().isoformat(), "vocab": VOCAB, "dtype": "bfloat16",
                   "method": f"{CALLS} calls per CUDA graph, {REPLAYS} replays after one, mean per call",
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
