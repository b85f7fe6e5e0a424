"""Roofline model of LLM decoding per quantization scheme: bytes, FLOPs and time per Linear and per
decode step across batch sizes, the crossover batch of each pair of schemes, and memory fit.

A decode step at batch M runs every Linear as an [M, K] x [K, N] GEMM (fused as serving engines do:
qkv, gate+up, o, down per layer, plus the lm_head), reads the KV cache of every sequence, and runs a
handful of small element-wise kernels. Each kernel takes max(bytes / bandwidth, FLOPs / peak) plus a
fixed launch cost. Weight formats differ only in bytes per weight, which tensor cores do the math,
and the extra work around it (int4 unpacking, activation quantization).

Analytic crossover (QServe, Lin et al. 2024): W4A16 is compute-bound on bf16 tensor cores once
2*M*N*K / P_bf16 exceeds W8A8's weight read N*K / BW, i.e. M* = P_bf16 / (2 * BW).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from .gpus import DEFAULT_EFFICIENCY, GB, Efficiency, GPUSpec, effective
from .schemes import Scheme, SchemeError, parse_scheme

ELEMENTWISE_KERNELS_PER_LAYER = 4   # norms, rotary, activation, residual (fused as vLLM fuses them)
ELEMENTWISE_PASSES_PER_LAYER = 8    # [M, hidden] bf16 reads + writes those kernels make, per layer
MEMORY_UTILIZATION = 0.90           # vLLM's default gpu_memory_utilization
RUNTIME_OVERHEAD_GB = 1.5           # CUDA context, cuBLAS workspace, activations, CUDA graphs


class RooflineError(ValueError):
    """Bad model shape or scheme for the roofline."""


@dataclass(frozen=True)
class WeightFormat:
    """How one scheme stores and computes a Linear."""
    family: str
    weight_bits: int
    math: str                      # tensor-core math: bf16 | int8 | fp8
    group_size: int | None = None  # per-group scales along K
    group_scale_bytes: float = 0.0  # bytes per group scale (and zero point)
    channel_scale_bytes: float = 0.0  # bytes per output channel
    act_quant: bool = False        # activations quantized on the fly (one extra pass + kernel)
    dequant: str | None = None     # Efficiency field with the int4-unpacking cost on the math

    def weight_bytes(self, k: int, n: int) -> float:
        groups = k / self.group_size if self.group_size else 0
        return k * n * self.weight_bits / 8 + n * groups * self.group_scale_bytes + n * self.channel_scale_bytes


FORMATS: dict[str, WeightFormat] = {
    "bf16": WeightFormat("bf16", 16, "bf16"),
    "w4a16": WeightFormat("w4a16", 4, "bf16", 128, 2.0, dequant="w4a16_dequant"),
    "w8a8": WeightFormat("w8a8", 8, "int8", channel_scale_bytes=4.0, act_quant=True),
    "fp8": WeightFormat("fp8", 8, "fp8", channel_scale_bytes=4.0, act_quant=True),
    # QServe W4A8: int4 weights, int8 group scales (g128) + per-channel scales, int8 tensor cores
    "w4a8": WeightFormat("w4a8", 4, "int8", 128, 1.0, channel_scale_bytes=4.0, act_quant=True, dequant="w4a8_dequant"),
}


def weight_format(scheme: str | Scheme | WeightFormat) -> WeightFormat:
    """The storage format of a scheme string (``w4a16-gptq-g64-asym``), family name (``w8a8``) or Scheme."""
    if isinstance(scheme, WeightFormat):
        return scheme
    if isinstance(scheme, str) and scheme.lower() in FORMATS:
        return FORMATS[scheme.lower()]
    try:
        parsed = parse_scheme(scheme)
    except SchemeError as e:
        raise RooflineError(f"{e}; or a family: {', '.join(FORMATS)}") from None
    fmt = FORMATS[parsed.family]
    if parsed.family == "w4a16" and parsed.group_size is not None:
        group = None if parsed.group_size == -1 else parsed.group_size
        zero_bytes = 0.0 if parsed.symmetric else 0.5
        fmt = WeightFormat("w4a16", 4, "bf16", group, 2.0 + zero_bytes,
                           channel_scale_bytes=2.0 if group is None else 0.0, dequant="w4a16_dequant")
    return fmt


@dataclass(frozen=True)
class LinearShape:
    """A (fused) Linear: y[M, N] = x[M, K] @ W[K, N], ``count`` of them in the model."""
    name: str
    in_features: int
    out_features: int
    count: int = 1
    after_norm: bool = False   # input comes from a norm, which can quantize it in the same kernel (as vLLM does)


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a decoder-only transformer."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    gated_mlp: bool = True
    sliding_window: int | None = None
    sliding_layers: int = 0        # layers whose KV cache stops at sliding_window tokens

    def linears(self, fused: bool = True) -> list[LinearShape]:
        """The quantized Linears of the decoder blocks, fused as serving engines run them (or one by one)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        mlp_in = 2 * self.intermediate if self.gated_mlp else self.intermediate
        if not fused:
            return ([LinearShape("q_proj", self.hidden, q, self.layers, True),
                     LinearShape("k_proj", self.hidden, kv, self.layers, True),
                     LinearShape("v_proj", self.hidden, kv, self.layers, True),
                     LinearShape("o_proj", q, self.hidden, self.layers)]
                    + [LinearShape(n, self.hidden, self.intermediate, self.layers, True)
                       for n in (("gate_proj", "up_proj") if self.gated_mlp else ("up_proj",))]
                    + [LinearShape("down_proj", self.intermediate, self.hidden, self.layers)])
        return [LinearShape("qkv_proj", self.hidden, q + 2 * kv, self.layers, after_norm=True),
                LinearShape("o_proj", q, self.hidden, self.layers),
                LinearShape("gate_up_proj", self.hidden, mlp_in, self.layers, after_norm=True),
                LinearShape("down_proj", self.intermediate, self.hidden, self.layers)]

    def lm_head(self) -> LinearShape:
        """Kept in bf16 by every scheme here (compressed-tensors ``ignore: [lm_head]``)."""
        return LinearShape("lm_head", self.hidden, self.vocab, 1)

    @property
    def linear_params(self) -> int:
        return sum(l.in_features * l.out_features * l.count for l in self.linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def kv_bytes_per_sequence(self, context: int, kv_bytes: float = 2.0) -> float:
        """K and V for every layer at ``context`` tokens; sliding-window layers stop at the window."""
        full = self.layers - self.sliding_layers
        windowed = min(context, self.sliding_window or context)
        tokens = full * context + self.sliding_layers * windowed
        return 2.0 * tokens * self.kv_heads * self.head_dim * kv_bytes


def shape_from_config(config: Any, name: str = "model") -> ModelShape:
    """A :class:`ModelShape` from a Hugging Face config (object or dict); multimodal configs use text_config."""
    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    if get("text_config") is not None and get("hidden_size") is None:
        return shape_from_config(get("text_config"), name)
    try:
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        layers, intermediate = int(get("num_hidden_layers")), int(get("intermediate_size"))
        vocab = int(get("vocab_size"))
    except (TypeError, ValueError):
        raise RooflineError("config lacks hidden_size/num_attention_heads/num_hidden_layers/"
                            "intermediate_size/vocab_size; is this a decoder-only LM?") from None
    layer_types = get("layer_types") or []
    sliding = sum(1 for t in layer_types if "sliding" in str(t))
    window = get("sliding_window")
    return ModelShape(name=name, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                      kv_heads=int(get("num_key_value_heads") or heads),
                      head_dim=int(get("head_dim") or hidden // heads), vocab=vocab,
                      tied_embeddings=bool(get("tie_word_embeddings", False)),
                      sliding_window=int(window) if window and sliding else None, sliding_layers=sliding)


# -- time ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    """Bytes, FLOPs and seconds of some work; ``memory_s`` and ``compute_s`` are the two roofs."""
    bytes: float = 0.0
    flops: float = 0.0
    memory_s: float = 0.0
    compute_s: float = 0.0
    overhead_s: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def scaled(self, factor: float) -> "Cost":
        return Cost(*(a * factor for a in self._tuple()))

    def _tuple(self) -> tuple[float, ...]:
        return (self.bytes, self.flops, self.memory_s, self.compute_s, self.overhead_s, self.seconds)


def _kernel(nbytes: float, flops: float, bandwidth: float, flops_rate: float, kernels: int,
            eff: Efficiency) -> Cost:
    memory_s, compute_s = nbytes / bandwidth, flops / flops_rate
    overhead_s = kernels * eff.kernel_overhead_us * 1e-6
    return Cost(nbytes, flops, memory_s, compute_s, overhead_s, max(memory_s, compute_s) + overhead_s)


def linear_cost(k: int, n: int, m: int, scheme: str | Scheme | WeightFormat, gpu: GPUSpec,
                eff: Efficiency = DEFAULT_EFFICIENCY, fused_act_quant: bool = False) -> Cost:
    """One [m, k] x [k, n] Linear in ``scheme`` on ``gpu``: weights + scales + activations in and out.
    ``fused_act_quant``: the preceding norm already wrote int8/fp8 activations (no extra pass or kernel)."""
    fmt = weight_format(scheme)
    ceil = effective(gpu, eff)
    if ceil[fmt.math] is None:
        raise RooflineError(f"{gpu.name} has no {fmt.math} tensor cores; scheme {fmt.family} cannot run on it")
    nbytes = fmt.weight_bytes(k, n) + 2.0 * m * n
    kernels = 1
    if fmt.act_quant and fused_act_quant:
        nbytes += 1.0 * m * k                # the GEMM reads int8 the norm wrote
    elif fmt.act_quant:
        nbytes += m * k * (2.0 + 1.0 + 1.0)  # quant pass reads bf16, writes int8; the GEMM reads int8
        kernels += 1
    else:
        nbytes += 2.0 * m * k
    slowdown = 1.0 + (getattr(eff, fmt.dequant) if fmt.dequant else 0.0)
    return _kernel(nbytes, 2.0 * m * n * k, ceil["bandwidth"], ceil[fmt.math] / slowdown, kernels, eff)


def decode_step(shape: ModelShape, scheme: str | Scheme | WeightFormat, gpu: GPUSpec, batch: int,
                context: int, eff: Efficiency = DEFAULT_EFFICIENCY, kv_bytes: float = 2.0) -> dict[str, Cost]:
    """Cost of one decode step (one new token for each of ``batch`` sequences at ``context`` tokens),
    by part: ``linears`` (quantized), ``lm_head`` (bf16), ``attention`` (KV cache), ``other``, ``total``."""
    if batch < 1 or context < 1:
        raise RooflineError(f"batch and context must be >= 1, got batch={batch}, context={context}")
    ceil = effective(gpu, eff)
    linears = measured_linears(shape, scheme, gpu, batch, eff)
    if linears is None:
        linears = Cost()
        for lin in shape.linears():
            cost = linear_cost(lin.in_features, lin.out_features, batch, scheme, gpu, eff, fused_act_quant=lin.after_norm)
            linears = linears + cost.scaled(lin.count)
    head = shape.lm_head()
    lm_head = linear_cost(head.in_features, head.out_features, batch, "bf16", gpu, eff)
    kv = shape.kv_bytes_per_sequence(context, kv_bytes) * batch
    token_layers = kv / (2.0 * kv_bytes * shape.kv_heads * shape.head_dim)  # cached tokens x layers, all sequences
    attn_flops = 4.0 * shape.heads * shape.head_dim * token_layers          # q.K and p.V for every query head
    attention = _kernel(kv, attn_flops, ceil["bandwidth"], ceil["bf16"], shape.layers, eff)
    other_bytes = ELEMENTWISE_PASSES_PER_LAYER * 2.0 * batch * shape.hidden * shape.layers
    other = _kernel(other_bytes, 0.0, ceil["bandwidth"], ceil["bf16"], ELEMENTWISE_KERNELS_PER_LAYER * shape.layers, eff)
    total = linears + lm_head + attention + other
    return {"linears": linears, "lm_head": lm_head, "attention": attention, "other": other, "total": total}


def measured_linears(shape: ModelShape, scheme: str | Scheme | WeightFormat, gpu: GPUSpec, batch: int,
                     eff: Efficiency) -> Cost | None:
    """The decoder Linears at ``batch`` from measured GEMM times (``eff.kernels``), one Linear at a time as
    they were measured; None unless every Linear shape of the model is covered at this batch."""
    if eff.kernels is None:
        return None
    fmt = weight_format(scheme)
    total = Cost()
    for lin in shape.linears(fused=False):
        seconds = eff.kernels.seconds(fmt.family, lin.in_features, lin.out_features, batch)
        if seconds is None:
            return None
        model = linear_cost(lin.in_features, lin.out_features, batch, scheme, gpu, eff, lin.after_norm)
        total = total + Cost(model.bytes, model.flops, model.memory_s, model.compute_s, 0.0, seconds).scaled(lin.count)
    return total


def step_seconds(shape: ModelShape, scheme: str | Scheme | WeightFormat, gpu: GPUSpec, batch: int, context: int,
                 eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    return decode_step(shape, scheme, gpu, batch, context, eff)["total"].seconds


def bound(cost: Cost) -> tuple[str, float]:
    """``('memory', x)`` when moving bytes takes x times the math, else ``('compute', x)``."""
    if cost.compute_s <= 0:
        return "memory", math.inf
    ratio = cost.memory_s / cost.compute_s
    return ("memory", ratio) if ratio >= 1 else ("compute", 1.0 / ratio)


def curve(shape: ModelShape, schemes: list[str], gpu: GPUSpec, batches: list[int], context: int,
          eff: Efficiency = DEFAULT_EFFICIENCY) -> dict[str, list[float]]:
    """Seconds per decode step for each scheme at each batch (schemes the GPU cannot run are left out)."""
    out: dict[str, list[float]] = {}
    for scheme in schemes:
        if supported(scheme, gpu):
            out[scheme] = [step_seconds(shape, scheme, gpu, b, context, eff) for b in batches]
    return out


def supported(scheme: str | Scheme | WeightFormat, gpu: GPUSpec) -> bool:
    return effective(gpu)[weight_format(scheme).math] is not None


# -- crossover -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Crossover:
    """``faster_small`` wins at batch 1 (``tie`` when within :data:`TIE`); ``faster_large`` is faster from
    ``batch`` on. ``batch`` is None when nothing changes up to the search limit."""
    pair: tuple[str, str]
    faster_small: str
    faster_large: str
    batch: int | None

    @property
    def key(self) -> str:
        return f"{self.pair[0]} vs {self.pair[1]}"

    def describe(self) -> str:
        a, b = self.pair
        if self.batch is None:
            return f"{a} and {b} equal at every batch" if self.faster_small == "tie" else \
                f"{self.faster_small} faster than {b if self.faster_small == a else a} at every batch"
        if self.faster_small == "tie":
            return f"{a} and {b} equal up to batch {self.batch - 1}, then {self.faster_large} faster"
        return f"{self.faster_large} overtakes {self.faster_small} at batch {self.batch}"


TIE = 0.005  # relative step-time difference below which two schemes count as equal


def crossover(shape: ModelShape, a: str, b: str, gpu: GPUSpec, context: int = 1,
              eff: Efficiency = DEFAULT_EFFICIENCY, max_batch: int = 16384) -> Crossover:
    """Smallest batch at which the scheme slower (or tied) at batch 1 becomes faster; bisection assumes the
    step-time difference changes sign at most once, which holds for the max(memory, compute) model."""
    def rel_gap(m: int) -> float:
        ta, tb = (step_seconds(shape, s, gpu, m, context, eff) for s in (a, b))
        return (ta - tb) / min(ta, tb)
    g1 = rel_gap(1)
    if abs(g1) < TIE:
        small, flipped = "tie", (lambda m: abs(rel_gap(m)) >= TIE)
    else:
        small = a if g1 < 0 else b
        flipped = (lambda m: rel_gap(m) > 0) if g1 < 0 else (lambda m: rel_gap(m) < 0)
    if not flipped(max_batch):
        return Crossover((a, b), small, small, None)
    lo, hi = 1, max_batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if flipped(mid) else (mid, hi)
    large = a if rel_gap(hi) < 0 else b
    return Crossover((a, b), small, large, hi)


def crossovers(shape: ModelShape, schemes: list[str], gpu: GPUSpec, context: int = 1,
               eff: Efficiency = DEFAULT_EFFICIENCY) -> list[Crossover]:
    """:func:`crossover` for every pair of the schemes the GPU can run."""
    runnable = [s for s in schemes if supported(s, gpu)]
    return [crossover(shape, a, b, gpu, context, eff) for a, b in combinations(runnable, 2)]


def analytic_crossover(gpu: GPUSpec) -> float:
    """QServe's M* = P_bf16 / (2 * BW): W8A8 overtakes W4A16 (datasheet figures, no overheads)."""
    return gpu.bf16_tflops / (2.0 * gpu.bandwidth_tbs)


IDEAL = Efficiency(memory=1.0, bf16=1.0, int8=1.0, fp8=1.0, w4a16_dequant=0.0, w4a8_dequant=0.0,
                   kernel_overhead_us=0.0)


# -- memory ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryFit:
    scheme: str
    weights_gb: float
    kv_gb: float
    overhead_gb: float
    usable_gb: float
    max_batch: int           # sequences of `context` tokens that fit next to the weights (0: weights alone do not fit)

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.kv_gb + self.overhead_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.usable_gb

    @property
    def gpus_needed(self) -> int:
        """How many such GPUs (tensor parallel, memory adds up) hold weights + KV cache + overhead each."""
        per_gpu = self.usable_gb - self.overhead_gb
        return max(1, math.ceil((self.weights_gb + self.kv_gb) / per_gpu)) if per_gpu > 0 else 0


def weight_bytes(shape: ModelShape, scheme: str | Scheme | WeightFormat) -> float:
    """Checkpoint bytes: quantized decoder Linears + bf16 embeddings (and lm_head when untied)."""
    fmt = weight_format(scheme)
    return (sum(fmt.weight_bytes(l.in_features, l.out_features) * l.count for l in shape.linears())
            + 2.0 * shape.embedding_params + 4.0 * shape.hidden * shape.layers)


def memory_fit(shape: ModelShape, scheme: str, gpu: GPUSpec, batch: int, context: int,
               kv_bytes: float = 2.0, utilization: float = MEMORY_UTILIZATION) -> MemoryFit:
    """Whether weights + KV cache for ``batch`` sequences of ``context`` tokens fit on ``gpu``."""
    weights = weight_bytes(shape, scheme) / GB
    per_seq = shape.kv_bytes_per_sequence(context, kv_bytes) / GB
    usable = gpu.memory_gb * utilization
    room = usable - RUNTIME_OVERHEAD_GB - weights
    return MemoryFit(str(scheme), weights, per_seq * batch, RUNTIME_OVERHEAD_GB, usable,
                     max(0, int(room // per_seq)) if per_seq > 0 else 0)

