"""Quantize a model several ways and measure each against the unquantized model on the same windows.

Memory stays at about one model: the unquantized model is evaluated once (keeping only its final
hidden states), then each scheme reloads the float weights from the local cache, quantizes in
place, is evaluated, and is freed before the next one.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from .calibration import data
from .evaluate import evaluate
from .models import LoadedModel, load_model
from .quantize import quantize, validate
from .schemes import Scheme, parse_scheme

DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_TOKENS = 4096
DEFAULT_CALIB_WINDOWS = 16


@dataclass(frozen=True)
class EvalSettings:
    text: str | None = None             # evaluation text source (default: pydoc, second half)
    calib_text: str | None = None       # calibration text source (default: pydoc, first half)
    seq_len: int = DEFAULT_SEQ_LEN
    tokens: int = DEFAULT_EVAL_TOKENS   # evaluation tokens (rounded up to whole windows)
    calib_windows: int = DEFAULT_CALIB_WINDOWS
    calib_seq_len: int = DEFAULT_SEQ_LEN
    device: str = "cpu"

    @property
    def eval_windows(self) -> int:
        return max(1, -(-self.tokens // self.seq_len))


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging
        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


def make_windows(lm: LoadedModel, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation windows, calibration windows). With one source for both, they come from its two halves;
    with different sources, each uses all of its own."""
    if lm.tokenizer is None:
        vocab = lm.config.vocab_size
        return (data.random_windows(vocab, settings.seq_len, settings.eval_windows, seed=1),
                data.random_windows(vocab, settings.calib_seq_len, settings.calib_windows, seed=2))
    same = settings.calib_text is None or settings.calib_text == settings.text
    eval_text = data.load_text(settings.text)
    calib_text = eval_text if same else data.load_text(settings.calib_text)
    ev = data.windows(lm.tokenizer, eval_text, settings.seq_len, settings.eval_windows, "eval" if same else "all")
    cal = data.windows(lm.tokenizer, calib_text, settings.calib_seq_len, settings.calib_windows,
                       "calib" if same else "all")
    return ev, cal


def _row(scheme: Scheme, result, ref_ppl: float, quantize_s: float, eval_s: float) -> dict:
    return {"scheme": scheme.name, "ppl": result.ppl, "delta_pct": 100.0 * (result.ppl / ref_ppl - 1.0),
            "kld": result.kld, "bytes": result.bytes, "linear_bytes": result.linear_bytes,
            "bits_per_weight": round(result.bits_per_weight, 3), "tokens": result.tokens,
            "quantize_s": round(quantize_s, 1), "eval_s": round(eval_s, 1)}


def compare(source: str, schemes: list[str | Scheme], settings: EvalSettings = EvalSettings(),
            progress: bool = True, log=print) -> dict:
    """Evaluate the unquantized model and each scheme on the same windows. Returns a JSON-able dict
    ``{"model", "settings", "reference": {...}, "rows": [{"scheme", "ppl", "delta_pct", "kld", "bytes", ...}]}``."""
    parsed = [parse_scheme(s) for s in schemes]  # fail on a bad scheme before any slow work
    _quiet_transformers()
    lm = load_model(source, device=settings.device)
    for scheme in parsed:
        validate(lm.model, lm.arch, scheme)  # NaN weights, group sizes: fail before the slow part
    eval_windows, calib_windows = make_windows(lm, settings)
    start = time.perf_counter()
    ref, ref_states = evaluate(lm.model, lm.arch, eval_windows, progress=progress, desc="unquantized")
    log(f"unquantized: ppl {ref.ppl:.3f} on {ref.tokens} tokens ({time.perf_counter() - start:.0f}s)")
    reference = {"scheme": "unquantized (fp32)", "ppl": ref.ppl, "kld": 0.0, "bytes": ref.bytes,
                 "tokens": ref.tokens}
    rows = []
    for i, scheme in enumerate(parsed):
        if i > 0:
            del lm
            gc.collect()
            lm = load_model(source, device=settings.device)
        t0 = time.perf_counter()
        quantize(lm.model, scheme, calib_windows if scheme.needs_calibration else None,
                 device=settings.device, progress=progress)
        t1 = time.perf_counter()
        result, _ = evaluate(lm.model, lm.arch, eval_windows, reference=ref_states, progress=progress,
                             desc=scheme.name)
        row = _row(scheme, result, ref.ppl, t1 - t0, time.perf_counter() - t1)
        log(f"{scheme.name}: ppl {row['ppl']:.3f} ({row['delta_pct']:+.1f}%), KLD {row['kld']:.4f}")
        rows.append(row)
    return {"model": lm.name, "source": source, "settings": settings.__dict__ | {
        "eval_windows": int(eval_windows.shape[0]), "calib_windows": int(calib_windows.shape[0])},
        "reference": reference, "rows": rows}


def format_table(result: dict) -> str:
    """Plain-text table: scheme, ppl, delta %, KLD, size."""
    ref = result["reference"]
    lines = [f"model {result['model']}: {ref['tokens']} evaluation tokens, unquantized perplexity {ref['ppl']:.3f}",
             f"{'scheme':<24} {'ppl':>9} {'Δ%':>8} {'KLD':>8} {'size MB':>9} {'bits/w':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['scheme']:<24} {r['ppl']:>9.3f} {r['delta_pct']:>+8.2f} {r['kld']:>8.4f} "
                     f"{r['bytes'] / 1e6:>9.1f} {r['bits_per_weight']:>7.2f}")
    return "\n".join(lines)
