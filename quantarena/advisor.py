"""The W4A16-vs-W8A8 decision for a model, a GPU and a traffic pattern, with its working.

For every scenario (a decode batch at a context length) the advisor keeps the schemes that the GPU
can run, that fit in its memory and that stay within the accuracy limit, and picks the fastest:
measured decode times when a decode benchmark of this model on this GPU exists, roofline
predictions (with measured kernel ceilings when a kernel benchmark exists) otherwise.
:func:`decide` is pure; :func:`advise` gathers the inputs (model shape, GPU, benchmark files, the
accuracy comparison) and calls it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from . import roofline as R
from .gpus import DEFAULT_EFFICIENCY, Efficiency, GPUSpec, apply_kernel_benchmark, benchmark_files, detect_gpu, \
    get_gpu, interpolate, kernel_table, known_gpus, load_json, probe_ceilings, with_measured
from .schemes import SchemeError, parse_scheme

DEFAULT_SCHEMES = ["bf16", "w4a16-gptq", "w4a16-awq", "w8a8-sq", "fp8"]
DEFAULT_BATCHES = [1, 8, 32, 128, 256]
DEFAULT_CONTEXT = 2048
BENCH_DIR = Path("benchmarks/results")
CURVE_BATCHES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
DEFAULT_MAX_PPL_INCREASE = 10.0  # percent, applied when accuracy was measured and no limit was given

EXPORTS = {
    "bf16": "safetensors (unquantized): any engine",
    "w4a16": "compressed-tensors pack-quantized -> vLLM / SGLang (Marlin, Machete on Hopper); GGUF Q4 -> llama.cpp",
    "w8a8": "compressed-tensors int-quantized -> vLLM / SGLang (CUTLASS int8 GEMM)",
    "fp8": "compressed-tensors float-quantized -> vLLM / SGLang (Ada or Hopper fp8 tensor cores)",
    "w4a8": "QServe / LMDeploy (quantarena does not export W4A8 yet)",
}


class AdviceError(ValueError):
    """Bad advisor input: unknown GPU, empty batch list, mismatched options."""


@dataclass
class Row:
    """One line of the decision table."""
    scenario: str
    batch: int
    context: int
    scheme: str | None
    why: str
    speedup: float | None          # step time of bf16 / step time of the scheme (None: bf16 does not fit)
    accuracy: str
    export: str
    source: str                    # measured | roofline
    ms_per_step: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class Advice:
    model: str
    gpu: GPUSpec
    context: int
    batches: list[int]
    schemes: list[str]
    rows: list[Row]
    crossovers: list[R.Crossover]
    ideal_crossovers: list[R.Crossover]
    memory: list[R.MemoryFit]
    accuracy: dict[str, dict[str, float]] | None
    accuracy_note: str
    source: str
    curve_batches: list[int]
    curves_ms: dict[str, list[float]]
    ideal_ms: dict[str, list[float]]
    measured_ms: dict[str, list[tuple[int, float]]]
    measured_crossover: Any = None
    roofline_crossovers: list[R.Crossover] | None = None   # without measured GEMM times, when those were used
    notes: list[str] = field(default_factory=list)
    outliers: list[dict] | None = None   # rows of outliers.outlier_stats

    def to_dict(self) -> dict:
        return {
            "model": self.model, "gpu": asdict(self.gpu), "context": self.context, "batches": self.batches,
            "schemes": self.schemes, "source": self.source, "accuracy_note": self.accuracy_note,
            "rows": [asdict(r) for r in self.rows],
            "crossover": {c.key: {"batch": c.batch, "faster_small": c.faster_small, "faster_large": c.faster_large}
                          for c in self.crossovers},
            "crossover_ideal": {c.key: c.batch for c in self.ideal_crossovers},
            "crossover_measured": self.measured_crossover,
            "crossover_roofline": None if self.roofline_crossovers is None else
            {c.key: c.batch for c in self.roofline_crossovers},
            "memory": [dict(asdict(m), total_gb=m.total_gb, fits=m.fits, gpus_needed=m.gpus_needed)
                       for m in self.memory],
            "accuracy": self.accuracy, "notes": self.notes,
        }


# -- inputs ----------------------------------------------------------------------------------------

def family(scheme: str) -> str:
    """``w4a16-gptq-g64`` -> ``w4a16``; families pass through."""
    if scheme in R.FORMATS:
        return scheme
    try:
        return parse_scheme(scheme).family
    except SchemeError:
        head = scheme.lower().split("-")[0]
        if head in R.FORMATS:
            return head
        raise


def accuracy_table(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per scheme: ppl, kld, bytes and ``ppl_increase_pct``: the row's ``delta_pct`` (vs the unquantized model)
    when present, else relative to the ``bf16`` row (or the lowest ppl)."""
    rows = [r for r in rows if r.get("ppl") is not None]
    if not rows:
        return {}
    base = next((r for r in rows if r["scheme"] == "bf16"), min(rows, key=lambda r: r["ppl"]))

    def increase(r: dict) -> float:   # compare() rows carry delta_pct against the unquantized model
        return float(r["delta_pct"]) if r.get("delta_pct") is not None else 100.0 * (r["ppl"] / base["ppl"] - 1.0)
    return {r["scheme"]: {"ppl": float(r["ppl"]), "kld": None if r.get("kld") is None else float(r["kld"]),
                          "bytes": r.get("bytes"), "ppl_increase_pct": increase(r)} for r in rows}


def measured_points(decode: dict) -> dict[str, list[tuple[int, float]]]:
    """``{scheme: [(batch, ms per step), ...]}`` from a ``<gpu>-decode.json`` benchmark."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in decode.get("rows", []):
        try:
            batch, ms = int(row["batch"]), float(row.get("ms_per_token") or 1e3 * row["batch"] / row["decode_tok_s"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue
        out.setdefault(str(row["scheme"]), []).append((batch, ms))
    return {k: sorted(v) for k, v in out.items()}


def for_schemes(points: dict[str, list[tuple[int, float]]], schemes: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Measured points per requested scheme: its own, else those of a measured scheme of the same family
    (speed depends on the storage format, not on how the weights were found)."""
    out = {}
    for s in schemes:
        same = [m for m in points if _family_or_none(m) == family(s)]
        pick = s if s in points else (same[0] if same else None)
        if pick is not None:
            out[s] = points[pick]
    return out


def measured_crossover(points: dict[str, list[tuple[int, float]]], small: str = "w4a16",
                       large: str = "w8a8") -> int | None:
    """First measured batch where the best ``large``-family scheme is faster than the best ``small`` one."""
    def best(fam: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for scheme, pts in points.items():
            if _family_or_none(scheme) == fam:
                for b, t in pts:
                    out[b] = min(out.get(b, math.inf), t)
        return out
    a, b = best(small), best(large)
    return next((m for m in sorted(set(a) & set(b)) if b[m] < a[m]), None)


def _family_or_none(scheme: str) -> str | None:
    try:
        return family(scheme)
    except SchemeError:
        return None


def _same_model(bench_model: str, model: str) -> bool:
    """``preset:llama-3-8b (random weights)`` and ``llama-3-8b`` name the same model."""
    norm = lambda s: "".join(ch for ch in s.lower().split("(")[0].split(":")[-1].split("/")[-1] if ch.isalnum())
    return bool(bench_model) and norm(bench_model) == norm(model)


# -- the decision ----------------------------------------------------------------------------------

def _why(shape: R.ModelShape, scheme: str, gpu: GPUSpec, batch: int, context: int, eff: Efficiency) -> str:
    parts = R.decode_step(shape, scheme, gpu, batch, context, eff)
    total = parts["total"]
    kind, ratio = R.bound(parts["linears"])
    fmt = R.weight_format(scheme)
    lin = (f"Linears memory-bound {ratio:.1f}x (weight reads vs {fmt.math} math)" if kind == "memory"
           else f"Linears compute-bound {ratio:.1f}x ({fmt.math} math vs weight reads)")
    shares = {"weights": (parts["linears"].memory_s + parts["lm_head"].memory_s),
              "KV cache": parts["attention"].memory_s, "launch overhead": total.overhead_s}
    denom = sum(shares.values()) + parts["linears"].compute_s
    detail = ", ".join(f"{k} {100 * v / denom:.0f}%" for k, v in shares.items() if v / denom >= 0.1)
    if total.overhead_s / total.seconds >= 0.5:
        lin = (f"launch-bound: kernel launches are {100 * total.overhead_s / total.seconds:.0f}% of the step, "
               f"so fewer bytes buy little; {lin}")
    head_share = parts["lm_head"].bytes / max(total.bytes, 1)
    extra = f"; bf16 lm_head is {100 * head_share:.0f}% of bytes" if head_share >= 0.25 else ""
    return f"{lin}; step: {detail}{extra}" if detail else lin + extra


def decide(shape: R.ModelShape, gpu: GPUSpec, batches: list[int], context: int, schemes: list[str],
           accuracy: dict[str, dict[str, float]] | None = None, max_ppl_increase: float | None = None,
           measured: dict[str, list[tuple[int, float]]] | None = None, eff: Efficiency = DEFAULT_EFFICIENCY,
           accuracy_note: str = "", source: str = "roofline", scenario_names: list[str] | None = None) -> Advice:
    """The decision table for ``shape`` on ``gpu``; pure (no I/O)."""
    if not batches or any(b < 1 for b in batches):
        raise AdviceError(f"batch sizes must be positive integers, got {batches}")
    measured = measured or {}
    defaulted_limit = bool(accuracy) and max_ppl_increase is None
    if defaulted_limit:
        max_ppl_increase = DEFAULT_MAX_PPL_INCREASE
    runnable = [s for s in schemes if R.supported(s, gpu)]
    rows = []
    for i, batch in enumerate(batches):
        name = scenario_names[i] if scenario_names else f"batch {batch}, context {context}"
        rows.append(_decide_one(shape, gpu, batch, context, schemes, runnable, accuracy, max_ppl_increase,
                                measured, eff, name))
    families = list(dict.fromkeys(family(s) for s in runnable))
    crossovers = R.crossovers(shape, families, gpu, context, eff)
    ideal = R.crossovers(shape, families, gpu, context, R.IDEAL)
    plain = R.crossovers(shape, families, gpu, context, replace(eff, kernels=None)) if eff.kernels else None
    fit_batch = max(batches)
    memory = [R.memory_fit(shape, s, gpu, fit_batch, context) for s in families]
    notes = []
    if not gpu.has_fp8 and any(family(s) == "fp8" for s in schemes):
        notes.append(f"{gpu.name} has no fp8 tensor cores: fp8 left out.")
    if defaulted_limit:
        notes.append(f"schemes costing more than {max_ppl_increase:g}% perplexity are rejected (default; "
                     "change with --max-ppl-increase P).")
    return Advice(model=shape.name, gpu=gpu, context=context, batches=list(batches), schemes=list(schemes), rows=rows,
                  crossovers=crossovers, ideal_crossovers=ideal, memory=memory, accuracy=accuracy or None,
                  accuracy_note=accuracy_note, source=source, curve_batches=CURVE_BATCHES,
                  curves_ms={f: [1e3 * t for t in ts] for f, ts in R.curve(shape, families, gpu, CURVE_BATCHES,
                                                                           context, eff).items()},
                  ideal_ms={f: [1e3 * t for t in ts] for f, ts in R.curve(shape, families, gpu, CURVE_BATCHES,
                                                                          context, R.IDEAL).items()},
                  measured_ms=measured, measured_crossover=measured_crossover(measured) if measured else None,
                  roofline_crossovers=plain, notes=notes)


def _decide_one(shape: R.ModelShape, gpu: GPUSpec, batch: int, context: int, schemes: list[str],
                runnable: list[str], accuracy: dict | None, max_ppl_increase: float | None,
                measured: dict[str, list[tuple[int, float]]], eff: Efficiency, name: str) -> Row:
    rejected = {s: f"{gpu.name} has no {R.weight_format(s).math} tensor cores" for s in schemes if s not in runnable}
    times: dict[str, float] = {}
    sources: dict[str, str] = {}
    predicted = {s: 1e3 * R.step_seconds(shape, s, gpu, batch, context, eff) for s in runnable}
    for s in runnable:
        meas = interpolate(measured.get(s, []), batch)
        if meas is not None:
            times[s], sources[s] = meas, "measured"
    ratios = sorted(times[s] / predicted[s] for s in times)
    scale = ratios[len(ratios) // 2] if ratios else 1.0   # put unmeasured schemes on the measured scale
    for s in runnable:
        if s not in times:
            times[s] = predicted[s] * scale
            sources[s] = "roofline" if not ratios else f"roofline x {scale:.2f} (measured/predicted here)"
    candidates = []
    for s in runnable:
        fit = R.memory_fit(shape, s, gpu, batch, context)
        acc = (accuracy or {}).get(s)
        if not fit.fits:
            rejected[s] = f"needs {fit.total_gb:.1f} GB > {fit.usable_gb:.1f} GB usable"
        elif max_ppl_increase is not None and acc and acc["ppl_increase_pct"] > max_ppl_increase:
            rejected[s] = f"+{acc['ppl_increase_pct']:.1f}% perplexity > {max_ppl_increase:g}% limit"
        else:
            candidates.append(s)
    ms = {s: round(t, 4) for s, t in times.items()}
    if not candidates:
        fits = [R.memory_fit(shape, s, gpu, batch, context) for s in runnable]
        smallest = min(fits, key=lambda f: f.total_gb, default=None)
        why = "nothing fits" if smallest is None else (
            f"nothing fits: smallest is {smallest.scheme} at {smallest.total_gb:.1f} GB (weights "
            f"{smallest.weights_gb:.1f} + KV {smallest.kv_gb:.1f} + runtime {smallest.overhead_gb:.1f}) > "
            f"{smallest.usable_gb:.1f} GB usable; needs {smallest.gpus_needed} x {gpu.name} (tensor parallel), "
            "a shorter context or fewer bits")
        return Row(name, batch, context, None, why, None, "-", "-", "roofline", ms, rejected)
    acc_rank = lambda s: (accuracy or {}).get(s, {}).get("ppl_increase_pct", 0.0)
    # ties (same bytes, memory-bound) go to the more accurate scheme, then to fp8 over int8: on H100,
    # torch._int_mm fell behind bf16 at M=256-1024 while fp8 _scaled_mm stayed 1.6-1.8x ahead
    # (benchmarks/results/h100-roofline-check.json)
    best = min(candidates, key=lambda s: (round(times[s], 6), acc_rank(s), family(s) != "fp8"))
    base = "bf16" if "bf16" in candidates else None
    speedup = times[base] / times[best] if base else None
    why = _why(shape, best, gpu, batch, context, eff)
    if sources[best] != "roofline":
        why = f"fastest as measured; model view: {why}"
    if base is None and "bf16" in rejected:
        why += f"; bf16 {rejected['bf16']}"
    runner_up = min((s for s in candidates if family(s) != family(best)), key=lambda s: times[s], default=None)
    if runner_up:
        why += f"; {times[runner_up] / times[best]:.2f}x faster than {runner_up}"
    return Row(name, batch, context, best, why, speedup, _accuracy_text(best, accuracy),
               EXPORTS[family(best)], sources[best], ms, rejected)


def _accuracy_text(scheme: str, accuracy: dict | None) -> str:
    if accuracy is None:
        return "not measured"
    acc = accuracy.get(scheme)
    if acc is None:
        return "not measured for this scheme"
    kld = "" if acc.get("kld") is None else f", KLD {acc['kld']:.4f}"
    return f"ppl {acc['ppl']:.2f} ({acc['ppl_increase_pct']:+.1f}%{kld})"


# -- gathering inputs ------------------------------------------------------------------------------

def resolve_gpu(name: str | None) -> tuple[GPUSpec, str]:
    """The GPU asked for, else the local one; a one-line error listing known GPUs otherwise."""
    if name:
        return get_gpu(name), "named"
    local = detect_gpu()
    if local is None:
        raise AdviceError(f"no GPU given and none detected; pass --gpu NAME (known: {', '.join(known_gpus())})")
    return local, "detected"


def scenarios(batch: list[int] | None, concurrency: int | None, context: int) -> tuple[list[int], list[str]]:
    """Batches and scenario names from ``--batch LIST`` or ``--concurrency N`` (not both)."""
    if batch and concurrency:
        raise AdviceError("give --batch or --concurrency, not both")
    if concurrency is not None:
        if concurrency < 1:
            raise AdviceError(f"--concurrency must be >= 1, got {concurrency}")
        return [1, concurrency] if concurrency > 1 else [1], (
            [f"single user, context {context}"] +
            ([f"{concurrency} concurrent requests (decode batch {concurrency}), context {context}"]
             if concurrency > 1 else []))
    batches = sorted(set(batch or DEFAULT_BATCHES))
    return batches, [f"batch {b}, context {context}" for b in batches]


def advise(shape: R.ModelShape, gpu: str | GPUSpec | None = None, batch: list[int] | None = None,
           concurrency: int | None = None, context: int = DEFAULT_CONTEXT, max_ppl_increase: float | None = None,
           schemes: list[str] | None = None, accuracy_rows: list[dict] | None = None, accuracy_note: str = "",
           kernels_file: str | Path | None = None, decode_file: str | Path | None = None,
           bench_dir: str | Path | None = BENCH_DIR, eff: Efficiency = DEFAULT_EFFICIENCY,
           probe: bool = True) -> Advice:
    """Decision table for a model shape, with benchmark files found or given and accuracy rows precomputed.
    On the GPU it advises for (and with no kernel benchmark), ``probe`` measures bandwidth and matmul ceilings."""
    spec, how = resolve_gpu(gpu) if not isinstance(gpu, GPUSpec) else (gpu, "named")
    if context < 1:
        raise AdviceError(f"--context must be >= 1, got {context}")
    schemes = schemes or DEFAULT_SCHEMES
    for s in schemes:
        family(s)
    batches, names = scenarios(batch, concurrency, context)
    found = benchmark_files(spec, bench_dir) if bench_dir else {}
    kernels_path = Path(kernels_file) if kernels_file else found.get("kernels")
    decode_path = Path(decode_file) if decode_file else found.get("decode")
    source = f"roofline: {spec.name} datasheet x efficiency measured on H100 (gpus.Efficiency)"
    if kernels_path:
        kernels = load_json(kernels_path)
        spec = apply_kernel_benchmark(spec, kernels, source=str(kernels_path))
        eff = replace(eff, kernels=kernel_table(kernels["rows"], source=str(kernels_path)))
        source = (f"GEMM times measured in {kernels_path} ({', '.join(f'{o}: {i}' for o, i in eff.kernels.impls.items())})"
                  f" where they cover the model's shapes, else roofline with ceilings measured there "
                  f"({', '.join(spec.measured)})")
    elif probe and _is_local(spec):
        spec = with_measured(spec, **probe_ceilings(), source="probed on this GPU")
        source = f"roofline with ceilings probed on this GPU ({', '.join(spec.measured)})"
    measured: dict[str, list[tuple[int, float]]] = {}
    notes = []
    if decode_path:
        decode = load_json(decode_path)
        if _same_model(str(decode.get("model", "")), shape.name):
            measured = for_schemes(measured_points(decode), schemes)
            source = f"measured decode times from {decode_path} where batch is in range; " + source
        else:
            notes.append(f"{decode_path} measured {decode.get('model')!r}, not {shape.name!r}: "
                         "its decode times are not used")
        if decode.get("crossover") is not None:
            notes.append(f"crossover reported by {decode_path}: {decode['crossover']}")
    if how == "detected":
        notes.append(f"GPU detected: {spec.name}")
    accuracy = accuracy_table(accuracy_rows) if accuracy_rows else None
    advice = decide(shape, spec, batches, context, schemes, accuracy, max_ppl_increase, measured, eff,
                    accuracy_note or ("" if accuracy else "accuracy not measured"), source, names)
    advice.notes = notes + advice.notes + kernel_gaps(shape, spec, advice, eff)
    return advice


def kernel_gaps(shape: R.ModelShape, gpu: GPUSpec, advice: Advice, eff: Efficiency, worse: float = 1.5) -> list[str]:
    """Notes for scheme families whose measured GEMMs run ``worse`` times slower than the roofline: there,
    an engine with roofline-speed kernels (Marlin, Machete, CUTLASS) would change the answer."""
    if eff.kernels is None:
        return []
    plain = replace(eff, kernels=None)
    notes = []
    for fam in dict.fromkeys(family(s) for s in advice.schemes if R.supported(s, gpu)):
        gaps = []
        for batch in advice.batches:
            measured = R.measured_linears(shape, fam, gpu, batch, eff)
            if measured is not None:
                gaps.append((measured.seconds / R.decode_step(shape, fam, gpu, batch, advice.context, plain)
                             ["linears"].seconds, batch))
        ratio, batch = max(gaps, default=(0.0, 0))
        if ratio >= worse:
            notes.append(f"measured {fam} GEMMs run {ratio:.1f}x slower than the roofline at batch {batch}; "
                         f"with roofline-speed kernels the crossovers would be: " + "; ".join(
                             c.describe() for c in advice.roofline_crossovers or [] if fam in c.pair and c.batch))
    return notes


def _is_local(spec: GPUSpec) -> bool:
    local = detect_gpu()
    return local is not None and local.name == spec.name


# preference per family for the accuracy comparison: every available method of the first tier is measured
# (one method per family keeps `advise` on the default model within minutes on 2 CPU cores; bf16 is the
# unquantized reference itself: on the default model bf16 weights measured -0.0% perplexity, KLD 0.0000)
ACCURACY_TIERS = {"w4a16": [["w4a16-gptq"], ["w4a16-awq"], ["w4a16-rtn"]],
                  "w8a8": [["w8a8-sq"], ["w8a8-int8"]], "fp8": [["fp8"]]}


def available_schemes(schemes: list[str], model_type: str) -> tuple[list[str], list[str]]:
    """(schemes the quantizer can run now, those it cannot), asking :func:`quantize.block_processor`."""
    from .models import arch_for
    from .quantize import block_processor
    arch = arch_for(model_type)
    ok, missing = [], []
    for s in schemes:
        scheme = parse_scheme(s)
        try:
            if scheme.needs_calibration:
                block_processor(scheme, arch)
            ok.append(s)
        except ValueError:
            missing.append(s)
    return ok, missing


def accuracy_schemes(model_type: str, families: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Per family, the first method the quantizer can run (GPTQ, then AWQ, then RTN; SmoothQuant, then plain
    int8); returns (schemes to measure, schemes passed over because they are not available)."""
    chosen, skipped = [], []
    for fam in families or list(ACCURACY_TIERS):
        for tier in ACCURACY_TIERS[fam]:
            ok, missing = available_schemes(tier, model_type)
            skipped += missing
            if ok:
                chosen += ok
                break
    return chosen, skipped


def _config_of(source: str):
    """The model's config without loading weights where possible."""
    from transformers import AutoConfig
    from . import models
    if source == models.DEFAULT_MODEL:
        return AutoConfig.from_pretrained(models.default_model_dir()), models.DEFAULT_NAME
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return AutoConfig.from_pretrained(path), path.name
    loaded = models.load_model(source)
    return loaded.config, loaded.name


def advise_model(source: str = "default", settings: Any = None, measure_accuracy: bool = True,
                 progress: bool = False, log: Callable[[str], None] = print, **kwargs: Any) -> Advice:
    """:func:`advise` for a model source: shapes from its config, accuracy from :func:`compare.compare` on
    the model (the best available method per family, unless ``schemes`` or ``accuracy_rows`` are given).
    Presets have random weights, so their accuracy is skipped and the table says so."""
    from . import models
    if source.startswith("preset:"):
        name = source.split(":", 1)[1]
        shape = R.shape_from_config(models.preset_config(name), name)
        kwargs.pop("accuracy_rows", None)
        return advise(shape, accuracy_note=f"skipped: preset:{name} has random weights, so accuracy means nothing",
                      **kwargs)
    config, name = _config_of(source)
    shape = R.shape_from_config(config, name)
    if kwargs.get("accuracy_rows") is not None or not measure_accuracy:
        return advise(shape, accuracy_note="" if measure_accuracy else "not measured (--no-accuracy)", **kwargs)
    from .compare import EvalSettings, compare
    if kwargs.get("schemes"):
        schemes, skipped = available_schemes(kwargs["schemes"], config.model_type)
    else:
        schemes, skipped = accuracy_schemes(config.model_type)
        kwargs["schemes"] = ["bf16"] + schemes
    settings = settings or EvalSettings()
    log(f"advise: measuring accuracy of {', '.join(schemes)} on {name} ({settings.tokens} tokens)")
    result = compare(source, schemes, settings, progress=progress, log=log)
    ref = result["reference"]
    rows = list(result["rows"])
    note = f"measured on {result['model']}: perplexity vs the unquantized model on {ref['tokens']} tokens " \
           f"(unquantized {ref['ppl']:.2f})"
    if "bf16" not in schemes:
        rows.append({"scheme": "bf16", "ppl": ref["ppl"], "delta_pct": 0.0, "kld": 0.0, "bytes": ref.get("bytes")})
        note += "; bf16 taken as the unquantized reference"
    if skipped:
        note += f"; not available in the quantizer yet: {', '.join(skipped)}"
    advice = advise(shape, accuracy_rows=rows, accuracy_note=note, **kwargs)
    from .compare import make_windows
    from .outliers import outlier_stats
    lm = models.load_model(source, device=settings.device)
    advice.outliers = outlier_stats(lm.model, lm.arch, make_windows(lm, settings)[1][:2], progress=progress)
    return advice


# -- output ----------------------------------------------------------------------------------------

def gpu_line(g: GPUSpec) -> str:
    fp8 = f"{g.fp8_tflops:.0f}" if g.fp8_tflops else "-"
    return (f"{g.name} ({g.memory_gb:g} GB, {g.bandwidth_tbs:.2f} TB/s, dense bf16 {g.bf16_tflops:.0f} / int8 "
            f"{g.int8_tops:.0f} / fp8 {fp8} T/s, {g.source})")


def format_table(advice: Advice) -> str:
    """The decision table and the crossovers as plain text."""
    g = advice.gpu
    lines = [f"quantarena advise: {advice.model} on {gpu_line(g)}",
             f"numbers: {advice.source}", f"accuracy: {advice.accuracy_note}", ""]
    for r in advice.rows:
        speed = f"{r.speedup:.2f}x vs bf16" if r.speedup else "bf16 does not fit"
        lines += [f"* {r.scenario}: {r.scheme or 'NO SCHEME FITS'}" + (f"  [{speed}, {r.source}]" if r.scheme else ""),
                  f"    why: {r.why}"]
        if r.scheme:
            lines += [f"    accuracy: {r.accuracy}", f"    export: {r.export}"]
        for s, reason in r.rejected.items():
            lines.append(f"    not {s}: {reason}")
    lines += ["", "crossover (model as used for the decision; ideal: ceilings with no overheads):"]
    ideal = {c.key: c.batch for c in advice.ideal_crossovers}
    for c in advice.crossovers:
        lines.append(f"  {c.describe()}" + (f" (ideal roofline: {ideal[c.key] or 'never'})" if c.batch else ""))
    if advice.roofline_crossovers:
        lines.append("  roofline alone (datasheet x efficiency, no measured GEMM times): " + "; ".join(
            c.describe() for c in advice.roofline_crossovers if c.batch))
    if advice.measured_crossover is not None:
        lines.append(f"  measured decode w4a16 -> w8a8: {advice.measured_crossover}")
    lines += ["", f"memory at context {advice.context} (usable {advice.memory[0].usable_gb:.1f} GB):"
              if advice.memory else ""]
    for m in advice.memory:
        lines.append(f"  {m.scheme:6s} weights {m.weights_gb:6.1f} GB, max batch {m.max_batch}"
                     + ("" if m.max_batch else f"  (needs {m.gpus_needed} GPUs)"))
    lines += [f"note: {n}" for n in advice.notes]
    return "\n".join(lines)
