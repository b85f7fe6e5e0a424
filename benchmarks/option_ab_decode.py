"""Same-process A/B of one boolean option of the lean decode runner (a ``LeanLlama`` attribute read per step:
``defer_residual``, ``rope_attention``, ``gated_mlp``), one model per scheme.

Per scheme and batch both values are captured as decode-step graphs and timed over STEPS replays after a fresh
prefill, ROUNDS interleaved rounds (``decode.interleaved_step_ms``; fastest kept, all recorded). Check: the first
decode step's logits after the same prefill with both values, eager and compiled (relative difference recorded:
random weights amplify last-bit differences over 32 layers, so it is a record, not a pass/fail).
Writes $OUT/<option>.json. Usage: python benchmarks/option_ab_decode.py [out_dir]
(env AB_OPTION=gated_mlp AB_SCHEMES=w4a16 AB_BATCHES=1,16,256 AB_ROUNDS=3 AB_STEPS=64)
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch

from quantarena.bench import decode as D
from quantarena.bench.timing import Logger

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
OPTION = os.environ.get("AB_OPTION", "gated_mlp")
SCHEMES = os.environ.get("AB_SCHEMES", "w4a16").split(",")
BATCHES = [int(v) for v in os.environ.get("AB_BATCHES", "1,16,256").split(",")]
ROUNDS = int(os.environ.get("AB_ROUNDS", "3"))
STEPS = int(os.environ.get("AB_STEPS", "64"))
VARIANTS = (False, True)
PROMPT = 128
log = Logger()


def first_step(model, value: bool) -> torch.Tensor:
    setattr(model, OPTION, value)
    with torch.no_grad():
        run = D.DecodeRun(model, 2, 16)
        run.prefill()
        return run.step().float()


def main() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    probe = D.LeanLlama("tiny", "bf16", device="cpu", max_len=16)
    if not isinstance(getattr(probe, OPTION, None), bool):
        raise SystemExit(f"AB_OPTION={OPTION!r} is not a boolean option of LeanLlama")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "model": "preset:llama-3-8b (random weights)",
              "option": OPTION,
              "setup": "fused q/k/v and gate/up, quantized lm_head, W4A16 in the kernel layout with the default L2 "
                       "chain, blocks compiled, one CUDA graph per decode step; every other option at its default",
              "prompt_len": PROMPT, "steps": STEPS, "rounds": ROUNDS, "rows": [], "checks": {}}
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()   # noqa: E731
    for scheme in SCHEMES:
        torch._dynamo.reset()
        model = D.LeanLlama("llama-3-8b", scheme, max_len=PROMPT + STEPS + 8, fuse=True, quantize_lm_head=True)
        D.serve_w4a16(model)  # W4A16 as `bench decode` serves it (no-op for the others)
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
            times = D.interleaved_step_ms(run, VARIANTS, lambda v, m=model: setattr(m, OPTION, v), ROUNDS, STEPS)
            for v in VARIANTS:
                result["rows"].append({"scheme": scheme, "batch": batch, OPTION: v,
                                       "ms_per_step": min(times[v]), "rounds_ms": times[v]})
            log(scheme, batch, {str(v): min(t) for v, t in times.items()},
                f"{min(times[False]) / min(times[True]):.3f}x")
            del run
            torch.cuda.empty_cache()
            with open(os.path.join(OUT, f"{OPTION}.json"), "w") as f:
                json.dump(result, f, indent=1)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
