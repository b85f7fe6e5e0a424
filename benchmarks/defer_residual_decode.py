"""Decode steps with each block's MLP residual added at the end of the block (one inductor kernel) or deferred to the
start of the next block, where inductor fuses it into the RMSNorm (``LeanLlama(defer_residual=...)``), one model per
scheme, one process.

Per scheme and batch both variants are captured as decode-step graphs and timed over STEPS replays after a fresh
prefill, ROUNDS interleaved rounds (``decode.interleaved_step_ms``; fastest kept, all recorded). Check: the first
decode step's logits after the same prefill, both variants, eager (the same arithmetic: equal) and compiled (inductor
may keep the fused sum in fp32).
Writes $OUT/defer_residual.json. Usage: python benchmarks/defer_residual_decode.py [out_dir]
(env DR_SCHEMES=bf16,w4a16,w8a8-int8 DR_BATCHES=1,16,256 DR_ROUNDS=3 DR_STEPS=64)
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch

from quantarena import nn as qnn
from quantarena.bench import decode as D

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
SCHEMES = os.environ.get("DR_SCHEMES", "bf16,w4a16,w8a8-int8").split(",")
BATCHES = [int(v) for v in os.environ.get("DR_BATCHES", "1,16,256").split(",")]
ROUNDS = int(os.environ.get("DR_ROUNDS", "3"))
STEPS = int(os.environ.get("DR_STEPS", "64"))
VARIANTS = (False, True)
PROMPT = 128
started = time.time()


def log(*a):
    print(f"[{time.time() - started:6.1f}s]", *a, flush=True)


def first_step(model, defer: bool) -> torch.Tensor:
    model.defer_residual = defer
    with torch.no_grad():
        run = D.DecodeRun(model, 2, 16)
        run.prefill()
        return run.step().float()


def main() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "model": "preset:llama-3-8b (random weights)",
              "setup": "fused q/k/v and gate/up, quantized lm_head, W4A16 in the kernel layout with the default L2 "
                       "chain, blocks compiled, one CUDA graph per decode step",
              "prompt_len": PROMPT, "steps": STEPS, "rounds": ROUNDS, "rows": [], "checks": {}}
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()   # noqa: E731
    for scheme in SCHEMES:
        torch._dynamo.reset()
        model = D.LeanLlama("llama-3-8b", scheme, max_len=PROMPT + STEPS + 8, fuse=True, quantize_lm_head=True)
        if scheme == "w4a16":
            qnn.to_kernel_layout(model)
            qnn.chain_l2_prefetch(model.linears(), int(D.DEFAULT_L2_PREFETCH_MB * 2**20))
        eager = [first_step(model, v) for v in VARIANTS]
        model.compile()
        compiled = [first_step(model, v) for v in VARIANTS]
        again = first_step(model, False)
        result["checks"][scheme] = {"eager_rel_diff": rel(eager[1], eager[0]),
                                    "compiled_rel_diff": rel(compiled[1], compiled[0]),
                                    "compiled_repeat_rel_diff": rel(again, compiled[0])}
        log(scheme, result["checks"][scheme])
        for batch in BATCHES:
            run = D.DecodeRun(model, batch, PROMPT)
            times = D.interleaved_step_ms(run, VARIANTS, lambda v, m=model: setattr(m, "defer_residual", v),
                                          ROUNDS, STEPS)
            for v in VARIANTS:
                result["rows"].append({"scheme": scheme, "batch": batch, "defer_residual": v,
                                       "ms_per_step": min(times[v]), "rounds_ms": times[v]})
            log(scheme, batch, {str(v): min(t) for v, t in times.items()},
                f"{min(times[False]) / min(times[True]):.3f}x")
            del run
            torch.cuda.empty_cache()
            with open(os.path.join(OUT, "defer_residual.json"), "w") as f:
                json.dump(result, f, indent=1)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
