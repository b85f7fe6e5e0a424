"""Accuracy, run time and peak memory of every calibrated scheme on the default model, on CPU.

Calibrates on the first half of the pydoc corpus and evaluates on the second half (or on --text),
with the defaults of ``quantarena compare``. Peak memory: the process RSS is sampled during each
``quantize`` call; ``calib_peak_mb`` is that peak minus the RSS just before (what calibration adds
on top of the model). ``quantize_cpu_s`` is the process CPU time (all threads): on a shared, loaded
machine wall time overstates what an idle 2-core machine needs, and CPU time bounds it from above. Merges its rows into benchmarks/results/cpu-calibration.json after every
scheme: a row replaces an earlier one of the same scheme and run label, every other row is kept.

    python benchmarks/cpu_calibration.py [--schemes a,b,...] [--threads 2] [--run LABEL]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from quantarena.compare import EvalSettings, make_windows
from quantarena.evaluate import evaluate
from quantarena.models import load_model
from quantarena.quantize import CalibrationOptions, quantize

SCHEMES = ("bf16,w4a16-rtn,w4a16-gptq,w4a16-awq,w4a16-awq+gptq,w8a8-int8,w8a8-sq,w8a8-int8-static,"
           "w8a8-sq-static,w8a8-sq+gptq")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples RSS every 20 ms in a thread while the ``with`` body runs."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def _rtn_of(scheme: str) -> str:
    """The RTN scheme with the same group size and symmetry as a w4a16 scheme."""
    _, _, options = scheme.partition(" ")[0].partition("-")[2].partition("-")
    return "w4a16-rtn" + ("-" + options if options else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", default=SCHEMES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--no-duo-scaling", action="store_true", help="AWQ: s = x^r instead of x^r / w^(1-r)")
    parser.add_argument("--alpha-search", action="store_true", help="SmoothQuant: per-layer alpha search")
    parser.add_argument("--no-smooth-rotated", action="store_true",
                        help="-rot schemes: rotate the down projection's input without smoothing it first")
    parser.add_argument("--no-runtime-smoothing", action="store_true",
                        help="SmoothQuant: leave Linears unsmoothed where no op can absorb 1/s (as export does)")
    parser.add_argument("--run", default=None, help="label stored in each new row's 'run' field")
    parser.add_argument("--out", default="benchmarks/results/cpu-calibration.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = EvalSettings(tokens=args.tokens, calib_windows=args.calib_windows)
    options = CalibrationOptions(awq_duo_scaling=not args.no_duo_scaling, alpha_search=args.alpha_search,
                                 smooth_rotated=not args.no_smooth_rotated,
                                 runtime_smoothing=not args.no_runtime_smoothing)
    lm = load_model("default")
    eval_windows, calib_windows = make_windows(lm, settings)
    t0 = time.perf_counter()
    ref, ref_states = evaluate(lm.model, lm.arch, eval_windows, progress=False)
    result = {
        "what": "quantarena calibrated schemes on the default model (Gemma 3 270M), CPU",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_threads": args.threads, "platform": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "settings": {"calibration": f"pydoc first half, {calib_windows.shape[0]} windows x {settings.calib_seq_len}",
                     "evaluation": f"pydoc second half, {eval_windows.shape[0]} windows x {settings.seq_len}",
                     "tokens": ref.tokens},
        "reference": {"scheme": "unquantized (fp32)", "ppl": ref.ppl, "eval_s": round(time.perf_counter() - t0, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if previous and abs(previous["reference"]["ppl"] - ref.ppl) > 1e-6 * ref.ppl:
        raise SystemExit(f"{out} holds rows for another reference (ppl {previous['reference']['ppl']:.4f}, "
                         f"now {ref.ppl:.4f}): use another --out")
    result = {**previous, **result, "notes": previous.get("notes", []), "rows": previous.get("rows", [])}
    print(f"unquantized ppl {ref.ppl:.3f}", flush=True)
    for scheme in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        del lm
        gc.collect()
        lm = load_model("default")
        for param in lm.model.parameters():  # page in the memory-mapped weights, so the peak is calibration's
            param.detach().sum()
        with PeakRSS() as mem:
            t1, c1 = time.perf_counter(), time.process_time()
            quantize(lm.model, scheme, calib_windows, progress=False, options=options)
            quantize_s, quantize_cpu_s = time.perf_counter() - t1, time.process_time() - c1
        res, _ = evaluate(lm.model, lm.arch, eval_windows, reference=ref_states, progress=False)
        variant = (" (no duo scaling)" if not options.awq_duo_scaling and "awq" in scheme else "") + \
            (" (alpha search)" if options.alpha_search and "sq" in scheme else "") + \
            (" (rotated layers not smoothed)" if not options.smooth_rotated and "rot" in scheme else "") + \
            (" (no run-time smoothing)" if not options.runtime_smoothing and "sq" in scheme else "")
        row = {"scheme": scheme + variant,
               "ppl": res.ppl, "delta_pct": 100 * (res.ppl / ref.ppl - 1), "kld": res.kld,
               "quantize_s": round(quantize_s, 1), "quantize_cpu_s": round(quantize_cpu_s, 1),
               "load_average": round(os.getloadavg()[0], 1), "calib_peak_mb": round(mem.peak - mem.start),
               "process_peak_rss_mb": round(mem.peak), "bits_per_weight": round(res.bits_per_weight, 3)}
        blocks = getattr(lm.model, "quantarena_calibration", None)
        if blocks:
            row["block_seconds"] = [b["seconds"] for b in blocks]
        rtn_ppl = next((r["ppl"] for r in result["rows"] if r["scheme"] == _rtn_of(scheme)), None)
        if "w4a16" in scheme and rtn_ppl is not None and "rtn" not in scheme:
            row["recovered_pct_of_rtn_loss"] = round(100 * (rtn_ppl - res.ppl) / (rtn_ppl - ref.ppl), 1)
        row |= {"run": args.run} if args.run else {}
        row |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_threads": args.threads}
        result["rows"] = [r for r in result["rows"] if (r["scheme"], r.get("run")) != (row["scheme"], row.get("run"))]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
