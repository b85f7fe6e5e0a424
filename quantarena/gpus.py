"""GPU spec table (memory, bandwidth, dense tensor-core peaks), local detection, and measured ceilings.

Peaks are NVIDIA datasheet/whitepaper figures for *dense* math (no 2:4 sparsity). GeForce cards list
bf16 with fp32 accumulation (half the fp16-accumulate rate), which is what a GEMM uses. Datasheet
peaks are not reachable; :data:`DEFAULT_EFFICIENCY` holds the fractions measured on an H100 (FACTS.md),
and ceilings measured on the device (kernel benchmark JSON or :func:`probe_ceilings`) replace
datasheet x efficiency when present.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

TB = 1e12
GB = 1e9


class GPUError(ValueError):
    """Unknown GPU name or unusable benchmark file."""


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: memory in GB (1e9 bytes), bandwidth in TB/s, dense peaks in TFLOP/s (TOPS for int8).

    ``measured`` says the figures are device ceilings already (efficiency 1.0 applies to them).
    """
    name: str
    memory_gb: float
    bandwidth_tbs: float
    bf16_tflops: float
    int8_tops: float
    fp8_tflops: float | None        # None: no fp8 tensor cores
    arch: str
    aliases: tuple[str, ...] = ()
    measured: tuple[str, ...] = ()   # which fields come from measurements on the device
    source: str = "datasheet"

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tflops is not None

    def peak(self, math_kind: str) -> float:
        """Peak in FLOP/s for ``bf16`` | ``int8`` | ``fp8``."""
        value = {"bf16": self.bf16_tflops, "int8": self.int8_tops, "fp8": self.fp8_tflops}[math_kind]
        if value is None:
            raise GPUError(f"{self.name} has no {math_kind} tensor cores")
        return value * TB


@dataclass(frozen=True)
class Efficiency:
    """Reachable fraction of each datasheet peak. Defaults measured on H100 80GB (FACTS.md):
    memory 3.02/3.35 TB/s (device-to-device copy), bf16 714/989 (8192^3 matmul), int8 1122/1979
    (our tiled Triton int8 kernel; torch._int_mm reached 909), fp8 1273/1979 (torch._scaled_mm).
    A re-probe on 2026-11-23 (benchmarks/results/h100-roofline-check.json) gave 3.00 TB/s, bf16 803,
    int8 963 (_int_mm), fp8 1454: bf16 GEMM predictions landed within -14%..+31% (median +4%).

    ``w4a16_dequant``: extra time on the math of a W4A16 GEMM once it is compute-bound, for unpacking
    int4 on CUDA cores (QServe, Lin et al. 2024, sec. 3: W4A16 loses to W8A8 at large batch for this
    reason; 0.15 is an assumption, not a measurement). ``kernel_overhead_us``: fixed launch + tail
    cost per kernel under CUDA graph replay (assumption, a few microseconds on any recent GPU).
    """
    memory: float = 0.90
    bf16: float = 0.72
    int8: float = 0.57
    fp8: float = 0.64
    w4a16_dequant: float = 0.15
    w4a8_dequant: float = 0.10
    kernel_overhead_us: float = 3.0
    kernels: "KernelTable | None" = None   # measured GEMM times replace the roofline where they cover a shape

    def of(self, math_kind: str) -> float:
        return {"bf16": self.bf16, "int8": self.int8, "fp8": self.fp8}[math_kind]


def interpolate(points: list[tuple[int, float]], x: int) -> float | None:
    """Log-log interpolation in sorted ``(x, y)`` points; None outside their range."""
    exact = next((y for px, y in points if px == x), None)
    if exact is not None:
        return exact
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 < x < x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return None


DEFAULT_IMPLS = {"bf16": "cublas", "w4a16": "quantarena", "w8a8": "quantarena", "fp8": "quantarena"}


@dataclass(frozen=True)
class KernelTable:
    """GEMM times measured on one GPU: ``(op, K, N) -> [(M, microseconds)]``, one implementation per op
    (by default the path quantarena dispatches, and cuBLAS for bf16)."""
    times: dict[tuple[str, int, int], list[tuple[int, float]]]
    impls: dict[str, str]
    source: str = ""

    def seconds(self, op: str, k: int, n: int, m: int) -> float | None:
        us = interpolate(self.times.get((op, k, n), []), m)
        return None if us is None else us * 1e-6


def kernel_table(rows: list[dict], impls: dict[str, str] | None = None, source: str = "") -> KernelTable:
    """A :class:`KernelTable` from ``<gpu>-kernels.json`` rows (median time when a shape repeats)."""
    impls = impls or DEFAULT_IMPLS
    samples: dict[tuple[str, int, int, int], list[float]] = {}
    for row in rows:
        try:
            op, impl, k, n, m, us = row["op"], row["impl"], int(row["K"]), int(row["N"]), int(row["M"]), float(row["us"])
        except (KeyError, TypeError, ValueError):
            continue
        if impls.get(op) == impl and us > 0:
            samples.setdefault((op, k, n, m), []).append(us)
    times: dict[tuple[str, int, int], list[tuple[int, float]]] = {}
    for (op, k, n, m), values in sorted(samples.items()):
        times.setdefault((op, k, n), []).append((m, sorted(values)[len(values) // 2]))
    return KernelTable(times, dict(impls), source)


DEFAULT_EFFICIENCY = Efficiency()
MEASURED_EFFICIENCY = Efficiency(memory=1.0, bf16=1.0, int8=1.0, fp8=1.0)

# name, memory GB, TB/s, bf16, int8, fp8, arch, aliases (substrings of torch.cuda.get_device_name, lower case)
_TABLE: tuple[GPUSpec, ...] = (
    GPUSpec("H100-SXM", 80, 3.35, 989, 1979, 1979, "hopper", ("h100", "h100 sxm", "h100 80gb hbm3", "h100-sxm")),
    GPUSpec("H100-PCIe", 80, 2.0, 756, 1513, 1513, "hopper", ("h100 pcie", "h100-pcie")),
    GPUSpec("H200", 141, 4.8, 989, 1979, 1979, "hopper", ("h200", "h200 sxm")),
    GPUSpec("A100-80GB", 80, 2.039, 312, 624, None, "ampere", ("a100", "a100 80gb", "a100-sxm4-80gb", "a100 80gb pcie")),
    GPUSpec("A100-40GB", 40, 1.555, 312, 624, None, "ampere", ("a100 40gb", "a100-sxm4-40gb", "a100-pcie-40gb")),
    GPUSpec("L40S", 48, 0.864, 362, 733, 733, "ada", ("l40s",)),
    GPUSpec("A10", 24, 0.6, 125, 250, None, "ampere", ("a10", "a10g")),
    GPUSpec("L4", 24, 0.3, 121, 242, 242, "ada", ("l4",)),
    GPUSpec("RTX-4090", 24, 1.008, 165, 661, 330, "ada", ("4090", "rtx 4090", "geforce rtx 4090")),
    GPUSpec("RTX-3090", 24, 0.936, 71, 284, None, "ampere", ("3090", "rtx 3090", "geforce rtx 3090")),
    GPUSpec("RTX-6000-Ada", 48, 0.96, 364, 729, 729, "ada", ("rtx 6000 ada",)),
    GPUSpec("RTX-A6000", 48, 0.768, 155, 310, None, "ampere", ("a6000", "rtx a6000")),
)


def known_gpus() -> list[str]:
    return [g.name for g in _TABLE]


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("nvidia", "").split())


def get_gpu(name: str | GPUSpec) -> GPUSpec:
    """Look up a GPU by table name or alias (case-insensitive): ``H100``, ``a100-40gb``, ``RTX 4090``."""
    if isinstance(name, GPUSpec):
        return name
    key = _norm(name)
    for gpu in _TABLE:
        if key in (_norm(gpu.name), _norm(gpu.name.replace("-", " "))) or key in gpu.aliases:
            return gpu
    raise GPUError(f"unknown GPU {name!r}; known GPUs: {', '.join(known_gpus())}")


def match_device_name(device_name: str, memory_bytes: int | None = None) -> GPUSpec | None:
    """Map a ``torch.cuda.get_device_name()`` string (and total memory) to a table entry, or None."""
    text = _norm(device_name)
    best: GPUSpec | None = None
    best_len = 0
    for gpu in _TABLE:
        for alias in gpu.aliases:
            hit = alias in text if len(alias) > 3 else alias in text.replace("-", " ").split()
            if hit and len(alias) > best_len:
                best, best_len = gpu, len(alias)
    if best is not None and best.name.startswith("A100") and memory_bytes:
        best = get_gpu("A100-40GB" if memory_bytes < 60 * GB else "A100-80GB")
    return best


def detect_gpu() -> GPUSpec | None:
    """The local CUDA GPU as a table entry, or None when there is no GPU or it is not in the table."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return match_device_name(props.name, props.total_memory)


def with_measured(gpu: GPUSpec, bandwidth_tbs: float | None = None, bf16_tflops: float | None = None,
                  int8_tops: float | None = None, fp8_tflops: float | None = None, source: str = "") -> GPUSpec:
    """A copy of ``gpu`` whose given ceilings are measured figures (they then take efficiency 1.0)."""
    given = {"bandwidth_tbs": bandwidth_tbs, "bf16_tflops": bf16_tflops, "int8_tops": int8_tops,
             "fp8_tflops": fp8_tflops}
    given = {k: v for k, v in given.items() if v is not None and v > 0 and math.isfinite(v)}
    if not given:
        return gpu
    return replace(gpu, **given, measured=tuple(sorted(set(gpu.measured) | set(given))),
                   source=source or "measured")


def effective(gpu: GPUSpec, eff: Efficiency = DEFAULT_EFFICIENCY) -> dict[str, float | None]:
    """Reachable ceilings: bytes/s and FLOP/s per math kind. Measured fields are used as they are."""
    def pick(field: str, value: float | None, fraction: float, unit: float) -> float | None:
        if value is None:
            return None
        return value * unit * (1.0 if field in gpu.measured else fraction)
    return {
        "bandwidth": pick("bandwidth_tbs", gpu.bandwidth_tbs, eff.memory, TB),
        "bf16": pick("bf16_tflops", gpu.bf16_tflops, eff.bf16, TB),
        "int8": pick("int8_tops", gpu.int8_tops, eff.int8, TB),
        "fp8": pick("fp8_tflops", gpu.fp8_tflops, eff.fp8, TB),
    }


# -- measured ceilings from benchmark files --------------------------------------------------------

_OP_MATH = {"bf16": "bf16_tflops", "w8a8": "int8_tops", "fp8": "fp8_tflops"}


def ceilings_from_kernel_rows(rows: list[dict]) -> dict[str, float]:
    """Best bandwidth (TB/s, from bf16 at M<=16, weight bytes only) and best math rates (TFLOP/s, at the
    largest M of each op) seen in ``<gpu>-kernels.json`` rows."""
    out: dict[str, float] = {}
    for row in rows:
        try:
            op, k, n, m, us = row["op"], int(row["K"]), int(row["N"]), int(row["M"]), float(row["us"])
        except (KeyError, TypeError, ValueError):
            continue
        if us <= 0:
            continue
        if op == "bf16" and m <= 16:
            out["bandwidth_tbs"] = max(out.get("bandwidth_tbs", 0.0), 2.0 * k * n / (us * 1e-6) / TB)
        if op in _OP_MATH and m >= 1024:
            out[_OP_MATH[op]] = max(out.get(_OP_MATH[op], 0.0), 2.0 * m * n * k / (us * 1e-6) / TB)
    return out


def load_json(path: str | Path) -> dict:
    """Read a benchmark JSON file with a one-line error when it is missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GPUError(f"benchmark file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise GPUError(f"benchmark file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise GPUError(f"benchmark file {path} has no 'rows' list")
    return data


def benchmark_files(gpu: GPUSpec, folder: str | Path) -> dict[str, Path]:
    """``{'kernels': path, 'decode': path}`` for the files under ``folder`` whose name matches ``gpu``."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        stem = path.stem.lower()
        for kind in ("kernels", "decode"):
            if stem.endswith("-" + kind) and _file_matches(stem[: -len(kind) - 1], gpu):
                found.setdefault(kind, path)
    return found


def _file_matches(prefix: str, gpu: GPUSpec) -> bool:
    try:
        return get_gpu(prefix).name == gpu.name
    except GPUError:
        hit = match_device_name(prefix.replace("-", " "))
        return hit is not None and hit.name == gpu.name


def apply_kernel_benchmark(gpu: GPUSpec, data: dict, source: str = "kernel benchmark") -> GPUSpec:
    """``gpu`` with ceilings measured in a kernels benchmark (only those the file shows)."""
    return with_measured(gpu, **ceilings_from_kernel_rows(data["rows"]), source=source)


def probe_ceilings(size: int = 8192, copy_mb: int = 1024) -> dict[str, float]:  # pragma: no cover - GPU only
    """Measure bandwidth (device-to-device copy) and matmul rates on the local GPU, in TB/s and TFLOP/s."""
    import torch
    if not torch.cuda.is_available():
        raise GPUError("probe_ceilings needs a CUDA GPU; pass --gpu NAME to use datasheet figures instead")

    def time_us(fn, reps: int = 20) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / reps

    out: dict[str, float] = {}
    src = torch.empty(copy_mb * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    out["bandwidth_tbs"] = 2 * src.numel() / (time_us(lambda: dst.copy_(src)) * 1e-6) / TB
    flops = 2.0 * size ** 3
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    out["bf16_tflops"] = flops / (time_us(lambda: a @ b) * 1e-6) / TB
    ai = torch.randint(-128, 127, (size, size), device="cuda", dtype=torch.int8)
    bi = torch.randint(-128, 127, (size, size), device="cuda", dtype=torch.int8).t()
    out["int8_tops"] = flops / (time_us(lambda: torch._int_mm(ai, bi)) * 1e-6) / TB
    if torch.cuda.get_device_capability() >= (8, 9):
        af = a.to(torch.float8_e4m3fn)
        bf = b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        out["fp8_tflops"] = flops / (time_us(
            lambda: torch._scaled_mm(af, bf, one, one, out_dtype=torch.bfloat16)) * 1e-6) / TB
    return out
