"""Where one decode step's time goes: the lean runner's CUDA graph replayed under torch.profiler, kernels
grouped into linears / attention / lm_head / other, against the step's wall time (the rest is launch gaps).

    python3 benchmarks/profile_decode.py --schemes bf16,w4a16 --batch 1,256 [--fuse] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from quantarena.bench import decode  # noqa: E402

CATEGORIES = (  # first match wins; patterns on the kernel name
    ("attention", r"fmha|flash|attention|attn|sdpa|softmax|bmm|decode_partial|decode_combine"),
    ("linear", r"gemv|gemm|a8w8|w4a16|w8a8|fp8|int8|nvjet|xmma|cutlass|sm90|wgmma|ampere|act_quant|scaled_mm|"
               r"_int_mm|splitk|int4pack|tinygemm"),
    ("cache_write", r"index_copy|index_put|scatter"),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def kernel_table(events, steps: int) -> dict:
    """Per-kernel-name device time per step (us) and launch count per step from profiler key averages."""
    out = {}
    for e in events:
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t <= 0 or e.count <= 0:
            continue
        out[e.key] = {"us": t / steps, "launches": e.count / steps, "cat": category(e.key)}
    return out


def summarize(table: dict, step_ms: float) -> dict:
    by = defaultdict(float)
    n = 0.0
    for v in table.values():
        by[v["cat"]] += v["us"]
        n += v["launches"]
    busy = sum(by.values())
    return {"step_us": round(step_ms * 1000, 1), "kernel_us": round(busy, 1), "idle_us": round(step_ms * 1000 - busy, 1),
            "launches": round(n, 1), **{k: round(v, 1) for k, v in sorted(by.items())}}


def profile(model, batch: int, prompt_len: int, steps: int) -> tuple[dict, dict]:
    run = decode.DecodeRun(model, batch, prompt_len)
    run.prefill()
    graph, total_ms = run.timed_graph(steps)
    step_ms = total_ms / steps
    run.prefill()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    table = kernel_table(prof.key_averages(), steps)
    return summarize(table, step_ms), table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--schemes", default="bf16,w4a16,w8a8-int8,fp8")
    ap.add_argument("--batch", default="1,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fuse", action="store_true")
    ap.add_argument("--quantize-lm-head", action="store_true")
    ap.add_argument("--attention", default="quantarena")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "fused_linears": args.fuse, "quantize_lm_head": args.quantize_lm_head, "attention": args.attention,
              "runs": []}
    for scheme in args.schemes.split(","):
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        model = decode.LeanLlama(args.model, scheme, max_len=args.prompt_len + args.steps + 72, fuse=args.fuse,
                                 quantize_lm_head=args.quantize_lm_head, attention=args.attention)
        decode.serve_w4a16(model)  # W4A16 as `bench decode` serves it (no-op for the others)
        model.compile()
        with torch.no_grad():
            for b in batches:
                summary, table = profile(model, b, args.prompt_len, args.steps)
                result["runs"].append({"scheme": scheme, "batch": b, "summary": summary, "kernels": table})
                print(f"\n== {scheme} batch {b}: {summary}", flush=True)
                for name, v in sorted(table.items(), key=lambda kv: -kv[1]["us"])[:args.top]:
                    print(f"  {v['us']:9.1f} us  x{v['launches']:5.1f}  {v['cat']:11s} {name[:110]}")
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("\nscheme     batch  step_us  kernel_us  idle_us  linear  attention  other  launches")
    for r in result["runs"]:
        s = r["summary"]
        print(f"{r['scheme']:10s} {r['batch']:5d} {s['step_us']:8.1f} {s['kernel_us']:10.1f} {s['idle_us']:8.1f} "
              f"{s.get('linear', 0):7.1f} {s.get('attention', 0):10.1f} {s.get('other', 0):6.1f} {s['launches']:9.1f}")


if __name__ == "__main__":
    main()
