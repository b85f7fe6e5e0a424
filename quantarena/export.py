"""``save(model, folder, format=...)``: write a (quantized) model as compressed-tensors or GGUF, atomically;
``quantize_and_save``: load, quantize and save in one call (what ``quantarena quantize --out`` runs).

A scheme the format cannot express is refused before any slow work and before anything is written; the
output is written to a temporary name in the same folder and renamed when complete.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path
from .formats import FORMATS, FormatError
from .formats import compressed_tensors as ct
from .formats import gguf as gg
from .schemes import Scheme, parse_scheme

DEFAULT_IGNORE = ("lm_head",)


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise FormatError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    return format


def check_scheme(scheme: str | Scheme, format: str) -> Scheme:
    """Refuse, from the scheme string alone, what ``format`` cannot express (before loading anything)."""
    scheme = parse_scheme(scheme)
    _check_format(format)
    if format == "gguf":
        if scheme.family == "fp8":
            raise FormatError(f"GGUF has no FP8 type, so scheme {scheme.name!r} cannot be exported to it; "
                              f"supported: {gg.SUPPORTED}")
        if scheme.rotation is not None:
            raise FormatError(f"llama.cpp has no online Hadamard rotation of a layer's input, so {scheme.name!r} "
                              f"has no GGUF form; export it to compressed-tensors")
        if scheme.family == "w4a16" and scheme.group_size != -1 and scheme.group_size % gg.QK:
            raise FormatError(f"GGUF int4 blocks hold 32 weights; group size {scheme.group_size} of "
                              f"{scheme.name!r} is not a multiple of 32; supported: {gg.SUPPORTED}")
    return scheme


def matches(name: str, pattern: str) -> bool:
    """An ignore pattern: ``re:REGEX``, an exact module name, or a name suffix such as ``mlp.down_proj``."""
    if pattern.startswith("re:"):
        return bool(re.match(pattern[3:], name))
    return name == pattern or name.endswith("." + pattern)


def save(model: nn.Module, path: str | Path, format: str = "compressed-tensors", tokenizer=None,
         ignore: list[str] | tuple[str, ...] = (), dtype: torch.dtype = torch.bfloat16,
         gguf_type: str = "q8_0") -> Path:
    """Write ``model`` (quantized in place by :func:`quantarena.quantize`, or not) to ``path``.

    compressed-tensors: a folder with config.json (``quantization_config``), generation config, safetensors
    weights (unquantized tensors as ``dtype``) and the tokenizer. GGUF: one ``.gguf`` file; floating layers
    (embeddings, or every Linear of an unquantized model) become ``gguf_type``.
    ``ignore``: Linears that must stay unquantized; a quantized module among them is an error (quantize with
    ``ignore`` instead, see :func:`quantize_and_save`).
    """
    _check_format(format)
    for name, module in model.named_modules():
        if any(matches(name, p) for p in ignore) and not isinstance(module, nn.Linear) \
                and hasattr(module, "dequantize") and type(module).__name__ != "BF16Linear":
            raise FormatError(f"layer {name} is in the ignore list but is quantized; pass ignore to the "
                              f"quantize step so it stays in floating point")
    if format == "compressed-tensors":
        ct.check(model)
        return atomic_path(Path(path), lambda tmp: ct.write(model, tmp, tokenizer, dtype), is_dir=True)
    gg.check(model, gguf_type)
    return atomic_path(Path(path), lambda tmp: gg.write(model, tmp, tokenizer, gguf_type), is_dir=False)


def quantize_and_save(source: str, scheme: str | Scheme, out: str | Path, format: str = "compressed-tensors",
                      ignore: list[str] | tuple[str, ...] = DEFAULT_IGNORE, settings=None, progress: bool = True,
                      gguf_type: str = "q8_0", dtype: torch.dtype = torch.bfloat16) -> dict:
    """Load ``source``, quantize it with ``scheme`` (keeping the ``ignore`` Linears in floating point) and
    save it to ``out``. Returns a JSON-able summary."""
    from .compare import EvalSettings, make_windows
    from .models import load_model, set_module
    from .quantize import CalibrationOptions, quantize, validate
    scheme = check_scheme(scheme, format)
    if format == "gguf" and gguf_type not in gg.FLOAT_TYPES:
        raise FormatError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(gg.FLOAT_TYPES)}")
    settings = settings or EvalSettings()
    lm = load_model(source, device=settings.device)
    validate(lm.model, lm.arch, scheme)
    if format == "gguf":
        gg.check(lm.model, gguf_type)                    # architecture, before the slow part
    kept = {name: module for name, module in lm.model.named_modules()
            if isinstance(module, nn.Linear) and any(matches(name, p) for p in ignore)}
    calibration = make_windows(lm, settings)[1] if scheme.needs_calibration else None
    if scheme.family != "bf16":
        # neither format holds a run-time SmoothQuant divisor: Linears no op can absorb 1/s stay unsmoothed
        quantize(lm.model, scheme, calibration, device=settings.device, progress=progress,
                 options=CalibrationOptions(runtime_smoothing=False))
    else:
        lm.model.quantarena_scheme = scheme.name
    for name, module in kept.items():
        set_module(lm.model, name, module)
    lm.model.to("cpu")
    path = save(lm.model, out, format, lm.tokenizer, dtype=dtype, gguf_type=gguf_type)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {"model": lm.name, "scheme": scheme.name, "format": format, "path": str(path), "bytes": size,
            "ignore": sorted(kept)}


def evaluate_folder(folder: str | Path, settings=None, progress: bool = True) -> dict:
    """Perplexity of a saved compressed-tensors folder as it is stored (our modules, no re-quantizing)."""
    from .compare import EvalSettings, make_windows
    from .evaluate import evaluate
    from .models import load_model
    settings = settings or EvalSettings()
    lm = load_model(str(folder), device=settings.device)
    windows = make_windows(lm, settings)[0]
    result, _ = evaluate(lm.model, lm.arch, windows, progress=progress, desc=lm.name)
    return {"model": lm.name, "source": str(folder), "scheme": getattr(lm.model, "quantarena_scheme", None),
            "format": "compressed-tensors", **result.as_dict()}
