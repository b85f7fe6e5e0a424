"""W4A16 decode steps with each residual add + RMSNorm in its own inductor kernel, inside the next linear's
tensor-core kernel (``LeanLlama(norm_fold=True)``), or split across two kernels' epilogues (``norm_split``), one
model, one process.

Checks first, at the model's shapes on fresh random inputs:
* the folded kernel (``w4a16_tc_norm``) against the separate ops (``reference.add_rms_norm`` then the same
  kernel) for fused q/k/v and gated gate/up at each batch: relative difference of the outputs, x + delta bit for
  bit, split-K slots left zero;
* the o -> gate/up pair with the norm split across their epilogues against the separate ops;
* the model: first decode-step logits and GREEDY greedy tokens of batch 1, each variant against separate.

Then per batch every variant is captured as decode-step graphs and timed over STEPS replays after a fresh
prefill, ROUNDS interleaved rounds (``decode.interleaved_step_ms``; fastest kept, all recorded). The fold and
split are allowed at every batch measured (``NORM_FOLD_MAX_BATCH`` raised for the run) to place the threshold.
Writes $OUT/norm_fold.json. Usage: python benchmarks/norm_fold_decode.py [out_dir]
(env NF_BATCHES=1,4,16,32,64 NF_ROUNDS=3 NF_STEPS=64 NF_SHAPE=llama-3-8b)
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch

from quantarena.bench import decode as D
from quantarena.bench.timing import Logger
from quantarena.kernels import reference as R, triton_w4a16 as T4, triton_w4a16_tc as TC

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
BATCHES = [int(v) for v in os.environ.get("NF_BATCHES", "1,4,16,32,64").split(",")]
ROUNDS = int(os.environ.get("NF_ROUNDS", "3"))
STEPS = int(os.environ.get("NF_STEPS", "64"))
SHAPE = os.environ.get("NF_SHAPE", "llama-3-8b")
GREEDY = 16
PROMPT = 128
VARIANTS = {"separate": (False, False), "fold": (True, False), "fold+split": (True, True)}   # norm_fold, norm_split
log = Logger()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def kernel_check(model: D.LeanLlama, batch: int) -> dict:
    """The first block's q/k/v and gate/up linears, folded against the separate ops at ``batch`` rows."""
    block = model.blocks[0]
    gen = torch.Generator(device="cuda").manual_seed(batch)
    h = model.s["hidden"]
    x = torch.randn(batch, h, device="cuda", generator=gen).bfloat16()
    d = torch.randn(batch, h, device="cuda", generator=gen).bfloat16()
    nw = (1 + 0.2 * torch.randn(h, device="cuda", generator=gen)).bfloat16()
    out = {"o+gate_up split": split_check(block, x, d, nw, batch)}
    for name, lin, gated in (("qkv", block.qkv, False), ("gate_up", block.gate_up, True)):
        w = T4.StripedWeight.from_dot_tiled(lin.weight_tiled, lin.out_features, lin.weight_scale,
                                            lin.weight_zero_point, lin.group_size)
        path, cfg = D.ops.w4a16_tiled_config(batch, lin.out_features, h, lin.group_size, x)
        y, ref_x = R.add_rms_norm(x, d, nw, 1e-5)
        sep = TC.w4a16_tc(y, w, None, dict(cfg), gated=gated)
        fold, x_new = TC.w4a16_tc_norm(x, d, nw, 1e-5, w, None, dict(cfg), gated=gated)
        torch.cuda.synchronize()
        out[name] = {"path": path, "cfg": {k: v for k, v in cfg.items() if not k.startswith("pf")},
                     "out_rel_diff": rel(fold, sep), "x_equal": bool(torch.equal(x_new, ref_x)),
                     "nan": bool(fold.isnan().any()), "split_k_dirty": T4.split_k_dirty(x.device)}
    return out


def split_check(block: D.Block, x: torch.Tensor, res: torch.Tensor, nw: torch.Tensor, batch: int) -> dict:
    """The o -> gate/up pair with the norm split across their epilogues against o, add + RMSNorm, gate/up."""
    attn = x[:, : block.o.in_features].contiguous()
    o = block.o(attn)
    y, ref_x = R.add_rms_norm(res, o, nw, D.NORM_EPS)
    sep = block.gate_up.forward_gated(y)
    y2, x_new, ss = block.o.forward_res_norm(attn, res, nw)
    out = block.gate_up.forward_gated(y2, row_ss=(ss, D.NORM_EPS))
    torch.cuda.synchronize()
    return {"out_rel_diff": rel(out, sep), "x_equal": bool(torch.equal(x_new, ref_x)), "ss_tiles": ss.shape[0],
            "nan": bool(out.isnan().any()), "split_k_dirty": T4.split_k_dirty(x.device)}


def apply(model: D.LeanLlama, variant: str) -> None:
    model.norm_fold, model.norm_split = VARIANTS[variant]


def model_check(model: D.LeanLlama) -> dict:
    """Batch 1 (eager): GREEDY greedy tokens of each variant against the separate ops, and the logits of the first
    decode step from the same prefilled cache and token (the prefill itself never folds); and the separate ops'
    tokens again, the control for how far run-to-run rounding alone takes a random-weight model's greedy path."""
    runs, steps = {}, {}
    for v in VARIANTS:
        apply(model, v)
        runs[v] = D._greedy(model, GREEDY)
        run = D.DecodeRun(model, 1, 16)
        with torch.no_grad():
            run.prefill()
            steps[v] = run.step().float()
    apply(model, "separate")   # the control: the separate ops against themselves (split-K sums in arrival order)
    runs["separate again"] = D._greedy(model, GREEDY)
    out = {}
    for v in list(VARIANTS)[1:] + ["separate again"]:
        out[v] = D._agreement(runs[v], runs["separate"])
        if v in steps:
            out[v]["step_logits_rel_err"] = rel(steps[v], steps["separate"])
    return out


def main() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    D.NORM_FOLD_MAX_BATCH = max(BATCHES)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "model": f"preset:{SHAPE} (random weights)",
              "setup": "W4A16, fused q/k/v and gate/up, quantized lm_head, kernel layout with the default L2 chain, "
                       "deferred residual, RoPE + attention in one launch, gate in the gate/up epilogue, blocks "
                       "compiled, one CUDA graph per decode step",
              "variants": {"separate": "residual add + RMSNorm fused by inductor, then the linear",
                           "fold": "the first norm inside the q/k/v kernel where norm_fold_pays (and lm_head's)",
                           "fold+split": "and the second split across the o and gate/up kernels' epilogues"},
              "prompt_len": PROMPT, "steps": STEPS, "rounds": ROUNDS, "rows": [], "checks": {}}
    model = D.LeanLlama(SHAPE, "w4a16", max_len=PROMPT + STEPS + 8, fuse=True, quantize_lm_head=True)
    D.serve_w4a16(model)
    for batch in BATCHES:
        result["checks"][f"kernels_batch_{batch}"] = kernel_check(model, batch)
        log("kernel check", batch, result["checks"][f"kernels_batch_{batch}"])
    result["checks"]["model_batch_1"] = model_check(model)
    log("model check", result["checks"]["model_batch_1"])
    model.compile()
    path = os.path.join(OUT, "norm_fold.json")
    for batch in BATCHES:
        run = D.DecodeRun(model, batch, PROMPT)
        times = D.interleaved_step_ms(run, list(VARIANTS), lambda v: apply(model, v), ROUNDS, STEPS)
        for v in VARIANTS:
            result["rows"].append({"batch": batch, "variant": v, "ms_per_step": min(times[v]),
                                   "rounds_ms": times[v]})
        log(batch, {v: min(t) for v, t in times.items()},
            {v: f"{min(times['separate']) / min(times[v]):.3f}x" for v in list(VARIANTS)[1:]})
        del run
        torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
