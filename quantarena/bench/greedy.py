"""Greedy generations of a real model (the default Gemma 3 270M unless told otherwise): each quantized
scheme's fast GPU kernels against the torch reference kernels of the same scheme, on the same codes.

The decode benchmark runs random weights of Llama shapes, where a wrong kernel can still produce
plausible-looking speed; this check runs the real weights and architecture through the same modules,
batch 1, with the prompt processed as one M=len(prompt) call and each new token as an M=1 call, so both
the skinny and the prefill kernel paths are exercised. A divergence is reported with the reference's
top-1/top-2 logit margin at that step: a near-tie that bf16 rounding flips is expected, a wide margin is not.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..models import load_model
from ..nn import QUANT_LINEARS
from ..quantize import quantize
from .decode import reference_kernels

# decode-benchmark scheme names -> quantarena scheme strings (RTN: the check is about kernels, not calibration)
SCHEMES = {"w4a16": "w4a16-rtn-g128", "w8a8-int8": "w8a8-int8", "fp8": "fp8"}
PROMPTS = ("def read_config(path):\n    \"\"\"Read a configuration file and return",
           "The history of the printing press begins in")


@torch.no_grad()
def greedy(model, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """``steps`` greedy tokens after ``ids`` [1, T] with the model's KV cache; returns tokens and each step's logits."""
    out = model(ids, use_cache=True)
    tokens, logits = [], []
    for i in range(steps):
        last = out.logits[:, -1].float()
        logits.append(last[0].cpu())
        nxt = last.argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        if i + 1 < steps:
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def compare(fast: tuple[list[int], list[torch.Tensor]], ref: tuple[list[int], list[torch.Tensor]]) -> dict:
    """Agreement of two greedy runs: tokens equal before the first divergence, the first logits' relative
    error, and at a divergence the reference's margin between its top two logits."""
    (ft, fl), (rt, rl) = fast, ref
    first = next((i for i, (a, b) in enumerate(zip(ft, rt)) if a != b), None)
    out = {"steps": len(rt), "agree_prefix": len(rt) if first is None else first,
           "first_logits_rel_err": float((fl[0] - rl[0]).norm() / rl[0].norm())}
    if first is not None:
        top2 = rl[first].topk(2).values
        out["divergence_ref_margin"] = float(top2[0] - top2[1])
        out["divergence_fast_vs_ref_max_abs"] = float((fl[first] - rl[first]).abs().max())
    return out


@torch.no_grad()
def layer_errors(model, ids: torch.Tensor) -> list[dict]:
    """Each quantized Linear, our kernel against the reference kernel on the real input it sees for ``ids``:
    relative error of the outputs for all prompt rows (``prefill``) and for the last row alone (``m1``)."""
    inputs = {}

    def capture(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))
        return hook

    mods = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LINEARS)}
    hooks = [m.register_forward_hook(capture(n)) for n, m in mods.items()]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, x in inputs.items():
        row = {"layer": name}
        for tag, xi in (("prefill", x), ("m1", x[-1:])):
            fast = mods[name](xi).float()
            with reference_kernels():
                ref = mods[name](xi).float()
            row[tag] = float((fast - ref).norm() / ref.norm().clamp_min(1e-30))
        rows.append(row)
    return rows


def check(source: str = "default", schemes: list[str] | None = None, steps: int = 32, device: str = "cuda",
          log=print) -> dict:
    """Run every scheme's greedy generation with our kernels and with the reference kernels; see the module doc."""
    schemes = list(SCHEMES) if schemes is None else [s for s in schemes if s != "bf16"]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown schemes {unknown}; the greedy check takes {', '.join(SCHEMES)}")
    lm = load_model(source, dtype=torch.bfloat16)
    if lm.tokenizer is None:
        raise ValueError(f"{source!r} has no tokenizer (random preset?); the greedy check needs a real model")
    bos = lm.tokenizer.bos_token_id
    ids = [lm.tokenizer(p).input_ids for p in PROMPTS]
    ids = [i if bos is None or i[:1] == [bos] else [bos] + i for i in ids]  # Gemma needs its BOS first
    prompts = [torch.tensor([i], device=device) for i in ids]
    base = lm.model.to(device)
    result = {"model": lm.name, "steps": steps, "prompts": list(PROMPTS), "schemes": {}}
    bf16 = [greedy(base, ids, steps) for ids in prompts]
    result["bf16_text"] = [lm.tokenizer.decode(t) for t, _ in bf16]
    for scheme in schemes:
        model = quantize(copy.deepcopy(base), SCHEMES[scheme], progress=False)
        runs = {}
        for name, ctx in (("fast", contextlib.nullcontext()), ("reference", reference_kernels())):
            with ctx:
                runs[name] = [greedy(model, ids, steps) for ids in prompts]
        layers = layer_errors(model, prompts[0])
        worst = sorted(layers, key=lambda r: -max(r["prefill"], r["m1"]))
        result.setdefault("layer_errors", {})[scheme] = {
            "max_prefill": max(r["prefill"] for r in layers), "max_m1": max(r["m1"] for r in layers),
            "worst": worst[:5]}
        per_prompt = [compare(f, r) | {"agree_with_bf16": compare(f, b)["agree_prefix"],
                                       "text": lm.tokenizer.decode(f[0])}
                      for f, r, b in zip(runs["fast"], runs["reference"], bf16)]
        result["schemes"][scheme] = per_prompt
        log(f"{scheme}: per-layer rel err max {result['layer_errors'][scheme]['max_prefill']:.1e} (prompt rows) / "
            f"{result['layer_errors'][scheme]['max_m1']:.1e} (one row); worst {worst[0]}")
        log(f"{scheme}: " + "; ".join(f"{p['agree_prefix']}/{p['steps']} agree, logits rel err "
                                       f"{p['first_logits_rel_err']:.1e}" for p in per_prompt))
        del model
        if device != "cpu":
            torch.cuda.empty_cache()
    return result
