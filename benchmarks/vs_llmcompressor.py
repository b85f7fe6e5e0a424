"""Our GPTQ, AWQ and SmoothQuant against llm-compressor's, in one run: same model (the default Gemma 3
270M), same calibration windows, same evaluation windows, same unquantized reference for KLD.

llm-compressor pins other transformers / compressed-tensors versions than quantarena's environment,
so run this from a separate virtual environment that has both (quantarena from this checkout):

    python -m venv /work/llmc-venv && . /work/llmc-venv/bin/activate
    pip install torch==2.13.0 && pip install "llmcompressor==0.14.*" gguf sentencepiece protobuf tqdm
    PYTHONPATH=. python benchmarks/vs_llmcompressor.py [--threads 1] [--calib-windows 16]

Pairs (ours vs theirs): w4a16-gptq vs GPTQModifier(W4A16); w4a16-awq vs AWQModifier(W4A16_ASYM is
their default; we ask for symmetric W4A16 to match); w8a8-sq+gptq vs SmoothQuantModifier(0.5) +
GPTQModifier(W8A8); w8a8-sq vs SmoothQuantModifier(0.5) + QuantizationModifier(W8A8). A contender
that fails is recorded with its error (llm-compressor's AWQ refuses to run without an accelerator).
Writes benchmarks/results/vs-llmcompressor-cpu.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from quantarena.compare import EvalSettings, make_windows  # noqa: E402
from quantarena.evaluate import evaluate  # noqa: E402
from quantarena.models import load_model  # noqa: E402
from quantarena.quantize import quantize  # noqa: E402


def llmc_recipe(kind: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    ignore = ["lm_head"]
    if kind == "gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if kind == "awq":
        from llmcompressor.modifiers.awq import AWQModifier
        return [AWQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if kind == "sq+gptq":
        return [SmoothQuantModifier(smoothing_strength=0.5),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if kind == "sq":
        return [SmoothQuantModifier(smoothing_strength=0.5),
                QuantizationModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    raise ValueError(kind)


def run_llmc(model, kind: str, calib: torch.Tensor) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=ds, recipe=llmc_recipe(kind), max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)


PAIRS = [("w4a16-gptq", "gptq"), ("w4a16-awq", "awq"), ("w8a8-sq+gptq", "sq+gptq"), ("w8a8-sq", "sq")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--only", default=None, help="comma-separated subset of: " + ",".join(k for _, k in PAIRS))
    parser.add_argument("--out", default="benchmarks/results/vs-llmcompressor-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llmcompressor
    import transformers
    settings = EvalSettings(tokens=args.tokens, calib_windows=args.calib_windows)
    lm = load_model("default")
    eval_windows, calib_windows = make_windows(lm, settings)
    ref, ref_states = evaluate(lm.model, lm.arch, eval_windows, progress=False)
    result = {
        "what": "quantarena vs llm-compressor on the default model (Gemma 3 270M), CPU, same windows",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_threads": args.threads, "platform": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "llmcompressor": llmcompressor.__version__},
        "settings": {"calibration": f"pydoc first half, {calib_windows.shape[0]} x {calib_windows.shape[1]}",
                     "evaluation": f"pydoc second half, {eval_windows.shape[0]} x {eval_windows.shape[1]}"},
        "reference": {"ppl": ref.ppl, "tokens": ref.tokens},
        "rows": [],
    }
    print(f"unquantized ppl {ref.ppl:.3f}", flush=True)
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for ours, theirs in PAIRS:
        if only and theirs not in only:
            continue
        for who, fn in (("quantarena", lambda m: quantize(m, ours, calib_windows, progress=False)),
                        ("llm-compressor", lambda m: run_llmc(m, theirs, calib_windows))):
            del lm
            gc.collect()
            lm = load_model("default")
            row = {"method": theirs, "tool": who, "scheme": ours if who == "quantarena" else theirs}
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                fn(lm.model)
                row |= {"quantize_s": round(time.perf_counter() - t0, 1),
                        "quantize_cpu_s": round(time.process_time() - c0, 1)}
                res, _ = evaluate(lm.model, lm.arch, eval_windows, reference=ref_states, progress=False)
                row |= {"ppl": res.ppl, "delta_pct": 100 * (res.ppl / ref.ppl - 1), "kld": res.kld}
            except Exception as e:  # noqa: BLE001 - a contender's failure is a result, recorded as such
                row |= {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                        "traceback_tail": traceback.format_exc().strip().splitlines()[-3:]}
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, out)


if __name__ == "__main__":
    main()
