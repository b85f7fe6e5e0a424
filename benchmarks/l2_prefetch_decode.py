"""W4A16 decode with and without the L2 prefetch chain (``kernels/l2_chain.py``), one model, one process.

Llama-3-8B shapes (random weights), fused q/k/v and gate/up, quantized lm_head, the weights held only in the
tensor-core kernel's layout, blocks compiled: the decode benchmark's W4A16 setup. For each batch, every budget
(MB of the next linear's weight each kernel asks the L2 for; 0 = no chain) is captured as a decode-step graph and
timed over STEPS replays after a fresh prefill, in ROUNDS interleaved rounds (``decode.interleaved_step_ms``);
the fastest round is kept and every round recorded. The check is per linear: each of the first block's linears and
lm_head, at every batch's M, with and without the chain to its real next linear (eager, fresh inputs), must
give the same output (``max_rel_err``: 0, except where an ATOMIC split-K tile adds fp32 partials in another order,
as it may between any two launches; ``ok`` below 1e-3).
The step's logits are no check here: with random weights the first greedy token and so the step's logits
change between two runs of the same graph (the prefill's ATOMIC tiles, amplified over 32 random layers).
Writes $OUT/l2_prefetch.json. Usage: python benchmarks/l2_prefetch_decode.py [out_dir]
(env L2_BUDGETS_MB=0,8,16,32,64 L2_BATCHES=1,4,16 L2_ROUNDS=3 L2_STEPS=64 L2_SHAPE=llama-3-8b)
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import triton

from quantarena import nn as qnn
from quantarena.bench import decode as D
from quantarena.bench.timing import Logger

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
BUDGETS = [float(v) for v in os.environ.get("L2_BUDGETS_MB", "0,8,16,32,64").split(",")]
BATCHES = [int(v) for v in os.environ.get("L2_BATCHES", "1,4,16").split(",")]
ROUNDS = int(os.environ.get("L2_ROUNDS", "3"))
STEPS = int(os.environ.get("L2_STEPS", "64"))
SHAPE = os.environ.get("L2_SHAPE", "llama-3-8b")
PROMPT = 128
log = Logger()


def check(linears: list, batch: int) -> float:
    """Largest relative difference, over the first block's linears and lm_head, of the output with the chain to
    the real next linear (each budget) vs without. Leaves the chain of the last budget."""
    picks = linears[:4] + linears[-1:]
    xs = [torch.randn(batch, lin.in_features, dtype=torch.bfloat16, device="cuda") for lin in picks]
    outs = {}
    for budget in [0.0] + BUDGETS:
        qnn.chain_l2_prefetch(linears, int(budget * 2**20))
        outs[budget] = [lin(x).float() for lin, x in zip(picks, xs)]
    return max(((out - plain).norm() / plain.norm()).item()
               for budget in BUDGETS for out, plain in zip(outs[budget], outs[0.0]))


def main() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model = D.LeanLlama(SHAPE, "w4a16", max_len=PROMPT + STEPS + 8, fuse=True, quantize_lm_head=True)
    qnn.to_kernel_layout(model)
    model.compile()
    linears = model.linears()
    log(f"built {SHAPE}, {len(linears)} linears, {torch.cuda.memory_allocated() / 1e9:.1f} GB")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(), "model": f"preset:{SHAPE} (random weights)",
              "setup": "W4A16 g128 sym, fused q/k/v and gate/up, quantized lm_head, kernel layout only, "
                       "blocks compiled, one CUDA graph per decode step",
              "prompt_len": PROMPT, "steps": STEPS, "rounds": ROUNDS, "rows": []}
    for batch in BATCHES:
        run = D.DecodeRun(model, batch, PROMPT)
        links = {}
        with torch.no_grad():
            err = check(linears, batch)
        log(f"B={batch}: chained vs plain outputs, largest relative difference {err:.2e}")

        def chain(budget: float) -> None:
            links[budget] = qnn.chain_l2_prefetch(linears, int(budget * 2**20))

        times = D.interleaved_step_ms(run, BUDGETS, chain, ROUNDS, STEPS)
        log(f"B={batch}: ms/step per round {times}")
        for budget in BUDGETS:
            result["rows"].append({"batch": batch, "budget_mb": budget, "links": links[budget],
                                   "ms_per_step": min(times[budget]), "rounds_ms": times[budget],
                                   "check": {"max_rel_err": err, "ok": err < 1e-3}})
        del run
        torch.cuda.empty_cache()
        with open(os.path.join(OUT, "l2_prefetch.json"), "w") as f:
            json.dump(result, f, indent=1)
    qnn.chain_l2_prefetch(linears, 0)
    for row in result["rows"]:
        base = next(r for r in result["rows"] if r["batch"] == row["batch"] and r["budget_mb"] == BUDGETS[0])
        log(f"B={row['batch']:4d} {row['budget_mb']:5.0f} MB: {row['ms_per_step']:.4f} ms "
            f"({base['ms_per_step'] / row['ms_per_step']:.3f}x) check {row['check']['ok']}")


if __name__ == "__main__":
    main()
