"""Decode steps with the attention's neighbours in separate launches or in the attention kernel, one model per
scheme, one process. Three variants of the same step:

* ``separate/kernel``: RoPE and the two cache writes as inductor kernels, the split-KV partial kernel, then the
  combine kernel (the runner before this change);
* ``separate/inline``: the same, the chunks merged by the partial kernel's last program (no combine launch);
* ``rope/inline``: ``decode_rope_attention``: RoPE, the cache writes, the attention and the merge in one launch.

Per scheme and batch every variant is captured as a decode-step graph and timed over STEPS replays after a fresh
prefill, ROUNDS interleaved rounds (``decode.interleaved_step_ms``; fastest kept, all recorded). Check: the
attention output and the written caches of one layer's inputs, each variant against the separate/kernel one.
Writes $OUT/rope_attention.json. Usage: python benchmarks/rope_attention_decode.py [out_dir]
(env RA_SCHEMES=bf16,w4a16,w8a8-int8 RA_BATCHES=1,16,256 RA_ROUNDS=3 RA_STEPS=64)
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import sys

import torch

from quantarena.bench import decode as D
from quantarena.bench.timing import Logger
from quantarena.kernels import triton_decode_attention as DA

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
SCHEMES = os.environ.get("RA_SCHEMES", "bf16,w4a16,w8a8-int8").split(",")
BATCHES = [int(v) for v in os.environ.get("RA_BATCHES", "1,16,256").split(",")]
ROUNDS = int(os.environ.get("RA_ROUNDS", "3"))
STEPS = int(os.environ.get("RA_STEPS", "64"))
VARIANTS = ("separate/kernel", "separate/inline", "rope/inline")
PROMPT = 128
ORIGINAL = {name: getattr(DA, name) for name in ("decode_attention", "decode_rope_attention")}
log = Logger()


def apply(model, variant: str) -> None:
    """Set the runner's path and the kernels' finish (the op bodies look the Triton entry points up per call)."""
    path, finish = variant.split("/")
    model.rope_attention = path == "rope"
    for name, fn in ORIGINAL.items():
        setattr(DA, name, functools.partial(fn, finish=finish))


def layer_check(batch: int) -> dict:
    """One layer's attention from the same q/k/v row: each variant's output and caches against separate/kernel."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    hq, hkv, d, max_len, length = 32, 8, 128, PROMPT + STEPS + 8, PROMPT + 1
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, device="cuda", generator=gen).bfloat16()
    ang = torch.arange(d // 2, device="cuda").float() * 1e-2 * (length - 1)
    cos, sin = torch.cat((ang, ang)).cos().bfloat16(), torch.cat((ang, ang)).sin().bfloat16()
    k0 = torch.randn(batch, hkv, max_len, d, device="cuda", generator=gen).bfloat16()
    v0 = torch.randn_like(k0)
    n = torch.tensor([length], device="cuda")
    outs = {}
    for variant in VARIANTS:
        path, finish = variant.split("/")
        k, v = k0.clone(), v0.clone()
        if path == "rope":
            o = ORIGINAL["decode_rope_attention"](qkv, cos, sin, k, v, n, hq, finish=finish)
        else:  # the runner's separate ops: RoPE in torch, index_copy_, then the attention kernel
            q, kn, vn = qkv.view(batch, hq + 2 * hkv, 1, d).split([hq, hkv, hkv], 1)
            q, kn = D.rotate(q, cos, sin), D.rotate(kn, cos, sin)
            pos = n - 1
            k.index_copy_(2, pos, kn)
            v.index_copy_(2, pos, vn)
            o = ORIGINAL["decode_attention"](q[:, :, 0], k, v, n, finish=finish)
        outs[variant] = (o.float(), k, v)
    base = outs[VARIANTS[0]]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()   # noqa: E731
    return {variant: {"out_rel_diff": rel(o, base[0]), "k_rel_diff": rel(k.float(), base[1].float()),
                      "v_equal": bool(torch.equal(v, base[2]))} for variant, (o, k, v) in outs.items()}


def main() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "model": "preset:llama-3-8b (random weights)",
              "setup": "fused q/k/v and gate/up, quantized lm_head, W4A16 in the kernel layout with the default L2 "
                       "chain, deferred residual, blocks compiled, one CUDA graph per decode step",
              "variants": {"separate/kernel": "RoPE + cache writes by inductor, partial kernel, combine kernel",
                           "separate/inline": "RoPE + cache writes by inductor, partial kernel merging in place",
                           "rope/inline": "decode_rope_attention: one launch"},
              "prompt_len": PROMPT, "steps": STEPS, "rounds": ROUNDS, "rows": [], "checks": {}}
    for batch in sorted(set(BATCHES)):
        result["checks"][f"layer_batch_{batch}"] = layer_check(batch)
        log("layer check", batch, result["checks"][f"layer_batch_{batch}"])
    for scheme in SCHEMES:
        torch._dynamo.reset()
        model = D.LeanLlama("llama-3-8b", scheme, max_len=PROMPT + STEPS + 8, fuse=True, quantize_lm_head=True)
        D.serve_w4a16(model)  # W4A16 as `bench decode` serves it (no-op for the others)
        model.compile()
        for batch in BATCHES:
            run = D.DecodeRun(model, batch, PROMPT)
            times = D.interleaved_step_ms(run, VARIANTS, functools.partial(apply, model), ROUNDS, STEPS)
            for v in VARIANTS:
                result["rows"].append({"scheme": scheme, "batch": batch, "variant": v,
                                       "ms_per_step": min(times[v]), "rounds_ms": times[v]})
            log(scheme, batch, {v: min(t) for v, t in times.items()},
                f"{min(times[VARIANTS[0]]) / min(times[VARIANTS[-1]]):.3f}x")
            del run
            torch.cuda.empty_cache()
            with open(os.path.join(OUT, "rope_attention.json"), "w") as f:
                json.dump(result, f, indent=1)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
