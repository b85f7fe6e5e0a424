"""Our GPTQ, AWQ and SmoothQuant against llm-compressor's, in one run: same model (the default Gemma 3
270M), same calibration windows, same evaluation windows, same unquantized reference for KLD.

llm-compressor pins other transformers / compressed-tensors versions than quantarena's environment,
so run this from a separate virtual environment that has both (quantarena from this checkout):

    python -m venv /work/llmc-venv && . /work/llmc-venv/bin/activate
    pip install torch==2.13.0 && pip install "llmcompressor==0.14.*" gguf sentencepiece protobuf tqdm
    PYTHONPATH=. python benchmarks/vs_llmcompressor.py [--threads 1] [--calib-windows 16]

Pairs (ours vs theirs): w4a16-gptq vs GPTQModifier(W4A16); w4a16-awq vs AWQModifier(W4A16; their
default is W4A16_ASYM, the ``awq-asym`` pair compares that against w4a16-awq-asym); w8a8-sq+gptq vs
SmoothQuantModifier(0.5) + GPTQModifier(W8A8); w8a8-sq vs SmoothQuantModifier(0.5) +
QuantizationModifier(W8A8). A contender that fails is recorded with its error.

CPU shim (llm-compressor only, see :func:`cpu_pin_memory_shim`): llm-compressor 0.14's AWQ pins its
cached block inputs in page-locked memory (``Tensor.pin_memory``) to speed up host-to-device copies;
without an accelerator torch raises ``Cannot access accelerator device``. Pinning changes no values,
so on a machine without an accelerator ``Tensor.pin_memory`` returns the tensor itself while their
``oneshot`` runs, and is restored afterwards. Nothing of their algorithm changes.

Rows are merged into the existing results file: rows of the pairs re-run here replace the earlier rows
of the same (method, tool); the others are kept.
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
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package that transformers probes for
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from quantarena.compare import EvalSettings, make_windows  # noqa: E402
from quantarena.evaluate import evaluate  # noqa: E402
from quantarena.models import load_model  # noqa: E402
from quantarena.quantize import quantize  # noqa: E402


@contextmanager
def cpu_pin_memory_shim():
    """``torch.Tensor.pin_memory`` as the identity while no accelerator exists (restored on exit).
    Page-locking only speeds up copies to an accelerator; the tensor's values are the same."""
    if torch.accelerator.is_available():
        yield
        return
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original


def llmc_recipe(kind: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    ignore = ["lm_head"]
    if kind == "gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if kind == "awq":
        from llmcompressor.modifiers.awq import AWQModifier
        return [AWQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if kind == "awq-asym":
        from llmcompressor.modifiers.awq import AWQModifier
        return [AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=ignore)]
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
    with cpu_pin_memory_shim():
        oneshot(model=model, dataset=ds, recipe=llmc_recipe(kind), max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)


PAIRS = [("w4a16-gptq", "gptq"), ("w4a16-awq", "awq"), ("w4a16-awq-asym", "awq-asym"),
         ("w8a8-sq+gptq", "sq+gptq"), ("w8a8-sq", "sq")]
DEFAULT_PAIRS = "gptq,awq,sq+gptq,sq"


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the rows whose (method, tool) ``new`` re-measured, then ``new``."""
    redone = {(r["method"], r["tool"]) for r in new}
    return [r for r in old if (r["method"], r["tool"]) not in redone] + new


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--only", default=DEFAULT_PAIRS,
                        help="comma-separated subset of: " + ",".join(k for _, k in PAIRS))
    parser.add_argument("--tools", default="quantarena,llm-compressor", help="which side(s) of each pair to run")
    parser.add_argument("--run", default=None, help="label stored in each new row's 'run' field")
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
    }
    print(f"unquantized ppl {ref.ppl:.3f}", flush=True)
    only = set(args.only.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if previous and abs(previous["reference"]["ppl"] - ref.ppl) > 1e-6 * ref.ppl:
        raise SystemExit(f"{out} holds rows for another reference (ppl {previous['reference']['ppl']:.4f}, "
                         f"now {ref.ppl:.4f}): use another --out")
    result = {**previous, **result, "notes": previous.get("notes", [])}
    old_rows, new_rows = previous.get("rows", []), []
    for ours, theirs in PAIRS:
        if theirs not in only:
            continue
        for who, fn in (("quantarena", lambda m: quantize(m, ours, calib_windows, progress=False)),
                        ("llm-compressor", lambda m: run_llmc(m, theirs, calib_windows))):
            if who not in args.tools.split(","):
                continue
            del lm
            gc.collect()
            lm = load_model("default")
            row = {"method": theirs, "tool": who, "scheme": ours if who == "quantarena" else theirs}
            if args.run:
                row["run"] = args.run
            row |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_threads": args.threads,
                    "load_average": round(os.getloadavg()[0], 1)}
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
            new_rows.append(row)
            result["rows"] = merge_rows(old_rows, new_rows)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, out)


if __name__ == "__main__":
    main()
