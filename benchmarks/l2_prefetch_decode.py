"""W4A16 decode with and without the L2 prefetch chain (``kernels/l2_chain.py``), one model, one process.

Llama-3-8B shapes (random weights), fused q/k/v and gate/up, quantized lm_head, the weights held only in the
tensor-core kernel's layout, blocks compiled: the decode benchmark's W4A16 setup. For each batch, every budget
(MB of the next linear's weight each kernel asks the L2 for; 0 = no chain) is captured as a decode-step graph and
timed over STEPS replays after a fresh prefill, in ROUNDS interleaved rounds (budget order rotated each round);
the fastest round is kept and every round recorded. Each budget's first step is checked against budget 0's:
greedy tokens equal and logits within 1e-2 relative (the chain changes no value; split-K fp32 partials of
ATOMIC tiles add in arrival order, so logits may differ in the last bits between any two runs).
Writes $OUT/l2_prefetch.json. Usage: python benchmarks/l2_prefetch_decode.py [out_dir]
(env L2_BUDGETS_MB=0,8,16,32,64 L2_BATCHES=1,4,16 L2_ROUNDS=3 L2_STEPS=64 L2_SHAPE=llama-3-8b)
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import triton

from quantarena import nn as qnn
from quantarena.bench import decode as D

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
BUDGETS = [float(v) for v in os.environ.get("L2_BUDGETS_MB", "0,8,16,32,64").split(",")]
BATCHES = [int(v) for v in os.environ.get("L2_BATCHES", "1,4,16").split(",")]
ROUNDS = int(os.environ.get("L2_ROUNDS", "3"))
STEPS = int(os.environ.get("L2_STEPS", "64"))
SHAPE = os.environ.get("L2_SHAPE", "llama-3-8b")
PROMPT = 128
started = time.time()


def log(*a):
    print(f"[{time.time() - started:6.1f}s]", *a, flush=True)


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
        times = {b: [] for b in BUDGETS}
        first = {}
        for r in range(ROUNDS):
            order = BUDGETS[r % len(BUDGETS):] + BUDGETS[:r % len(BUDGETS)]
            for budget in order:
                links = qnn.chain_l2_prefetch(linears, int(budget * 2**20))
                with torch.no_grad():
                    graph = run.capture()
                    run.prefill()
                    graph.replay()
                    if budget not in first:
                        first[budget] = (run.logits.float().clone(), run.next.clone(), links)
                    run.prefill()
                    graph.replay()   # upload done above; one more warm step
                    run.prefill()
                    ms = D._events_ms(graph.replay, STEPS) / STEPS
                del graph
                times[budget].append(round(ms, 4))
                log(f"B={batch} round {r} budget {budget} MB: {ms:.4f} ms/step ({links} links)")
        base_logits, base_next, _ = first[BUDGETS[0]]
        for budget in BUDGETS:
            logits, nxt, links = first[budget]
            rel = ((logits - base_logits).norm() / base_logits.norm()).item()
            result["rows"].append({"batch": batch, "budget_mb": budget, "links": links,
                                   "ms_per_step": min(times[budget]), "rounds_ms": times[budget],
                                   "check": {"logits_rel_err_vs_first": rel,
                                             "greedy_equal": bool(torch.equal(nxt, base_next)),
                                             "ok": rel < 1e-2 and bool(torch.equal(nxt, base_next))}})
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
