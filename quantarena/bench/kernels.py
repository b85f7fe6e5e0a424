"""Kernel sweep: every contender for each (op, K, N, M), timed the same way (CUDA graph, L2 flushed).

Contenders: bf16 ``F.linear`` (cuBLAS); W4A16 ours (dispatched, and each path), tinygemm
(``torch._weight_int4pack_mm``), gemlite; W8A8 ours (activation quantization included), ``torch._int_mm``
with torch activation quantization and scaling, gemlite; FP8 ours, ``torch._scaled_mm`` with torch
activation quantization, gemlite. Our outputs are checked on the full shapes against the reference, with
the output memory poisoned (NaN) first.
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import primitives as P
from ..kernels import ops, reference
from .timing import L2Flush, time_fn

# linear shapes (K = in_features, N = out_features) of one decoder layer
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "llama-3-8b": [("q_proj", 4096, 4096), ("kv_proj", 4096, 1024), ("gate_up", 4096, 14336), ("down", 14336, 4096)],
    "llama-3-70b": [("q_proj", 8192, 8192), ("kv_proj", 8192, 1024), ("gate_up", 8192, 28672), ("down", 28672, 8192)],
    # the shapes a decode step with fused linears adds (`bench decode --fuse-linears`, a quantized lm_head)
    "llama-3-8b-decode": [("qkv", 4096, 6144), ("gate_up_fused", 4096, 28672), ("lm_head", 4096, 128256)],
    "llama-3-70b-decode": [("qkv", 8192, 10240), ("gate_up_fused", 8192, 57344), ("lm_head", 8192, 128256)],
}


def layer_shape(spec: str) -> tuple[str, str, int, int]:
    """``"model:layer"`` (a row of :data:`SHAPES`) -> (model, layer, K, N); a ValueError names the known ones."""
    model, _, label = spec.partition(":")
    for name, k, n in SHAPES.get(model, ()):
        if name == label:
            return model, label, k, n
    known = ", ".join(f"{m}:{name}" for m in SHAPES for name, _, _ in SHAPES[m])
    raise ValueError(f"unknown layer {spec!r}; use one of {known}")


DEFAULT_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
ERROR_AT_M = (1, 4, 16, 128, 4096)
GROUP = 128


@dataclass
class Layer:
    """One random linear layer in every format."""
    k: int
    n: int
    w_bf16: torch.Tensor
    packed: torch.Tensor
    scales: torch.Tensor
    w8: torch.Tensor
    w8_scale: torch.Tensor
    wf8: torch.Tensor
    wf8_scale: torch.Tensor
    extra: dict = field(default_factory=dict)


def random_w4(n: int, k: int, group: int, symmetric: bool, seed: int, device: str = "cuda"):
    """A random N x K weight (CPU generator ``seed``) as W4A16 ``(packed codes, bf16 scales, zero points or
    None)`` on ``device``, and the StripedWeight the kernels read: the tune scripts' correctness inputs."""
    from ..kernels import triton_w4a16 as T4

    q, s, z = P.quantize_int4(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), group, symmetric)
    packed, s = P.pack_int4(q).to(device), s.to(torch.bfloat16).to(device)
    z = None if symmetric else z.to(device)
    return packed, s, z, T4.StripedWeight(packed, s, z, group)


def make_layer(k: int, n: int, device: str = "cuda") -> Layer:
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    q, s, _ = P.quantize_int4(w, GROUP, True)
    w8, w8s = P.quantize_int8(w, "channel")
    wf8, wf8s = P.quantize_fp8(w, "row")
    return Layer(k, n, w, P.pack_int4(q), s.to(torch.bfloat16), w8, w8s.reshape(-1, 1), wf8, wf8s.reshape(-1, 1),
                 extra={"codes": q})


# ----------------------------------------------------------------------------- contenders

def _tinygemm(layer: Layer):
    if "tinygemm" not in layer.extra:
        u = (layer.extra["codes"].to(torch.int32) + 8).to(torch.uint8)                 # [N, K] in [0, 15]
        packed = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()                            # [N, K/2]
        w = torch._convert_weight_to_int4pack(packed, 8)
        # tinygemm: w = (q - 8) * scale + zero, scales_and_zeros [K/g, N, 2]
        sz = torch.stack([layer.scales.t(), torch.zeros_like(layer.scales.t())], dim=-1).contiguous()
        layer.extra["tinygemm"] = (w, sz)
    w, sz = layer.extra["tinygemm"]
    return lambda x: torch._weight_int4pack_mm(x, w, GROUP, sz)


def _int_mm(layer: Layer):
    w_t = layer.w8.t()
    w_s = layer.w8_scale.reshape(1, -1)

    def run(x):
        xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = torch.round(x.float() / xs).clamp(-128, 127).to(torch.int8)
        m = xq.shape[0]
        if m <= 16:  # torch._int_mm needs M > 16
            xq = F.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq, w_t)[:m]
        return (acc.float() * xs * w_s).to(torch.bfloat16)
    return run


def a8w8_gemm_fn(op: str, impl: str, cfg: dict | None, layer: Layer):
    """The int8 (``op`` ``w8a8``) or fp8 GEMM kernel ``impl`` of a dispatch-table row (``gemv``, ``swap``,
    ``std``, ``tma``, else ``torch._scaled_mm``) with tile ``cfg``, on ``layer``'s weight, as a function of the
    quantized activations ``(xq, xs)`` -> bf16: what the tune scripts time and check."""
    from ..kernels import triton_a8w8_gemv as G8, triton_w8a8 as T8

    w, ws = (layer.w8, layer.w8_scale) if op == "w8a8" else (layer.wf8, layer.wf8_scale)
    if impl == "gemv":
        return lambda xq, xs: G8.a8w8_gemv(xq, xs, w, ws, None, torch.bfloat16, cfg)
    if impl == "swap":
        return lambda xq, xs: T8.a8w8_swap_gemm(xq, xs, w, ws, None, torch.bfloat16, cfg)
    if impl == "std":
        return lambda xq, xs: T8.int8_gemm(xq, xs, w, ws, None, torch.bfloat16, cfg)
    if impl == "tma":
        return lambda xq, xs: T8.a8w8_tma_gemm(xq, xs, w, ws, None, torch.bfloat16, cfg)
    return lambda xq, xs: torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws.reshape(1, -1),
                                           out_dtype=torch.bfloat16)


ATOMIC_STD_TILES = ((16, 128, 256), (32, 64, 256), (64, 64, 256), (64, 128, 128))   # (BLOCK_M, BLOCK_N, BLOCK_K)


def atomic_splits(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int) -> list[int]:
    """Split-K factors 2-16 for a [bm, bn, bk] tile that fit K and keep the grid within 8 programs per SM."""
    tiles = -(-m // bm) * -(-n // bn)
    return [s for s in (2, 4, 8, 16) if s <= -(-k // bk) and tiles * s <= 8 * sms]


def atomic_a8_tiles(m: int, n: int, k: int, sms: int,
                    std_tiles: tuple = ATOMIC_STD_TILES) -> list[tuple[str, dict]]:
    """ATOMIC split-K candidate tiles for an 8-bit GEMM at skinny M, as (kernel, config): swap-AB tiles
    (BLOCK_N 64 / 128, BLOCK_K 128 / 256) and, from M = 32, the tiled int8 kernel's ``std_tiles``; none where the
    M x N output does not fit the atomic workspace pool (the launcher would fall back to slots)."""
    from ..kernels.triton_w4a16 import ATOMIC_WS_WORDS

    if m * n > ATOMIC_WS_WORDS:
        return []
    bm = max(16, min(128, 1 << (m - 1).bit_length()))
    out = [("swap", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=4, ATOMIC=True))
           for bn in (64, 128) for bk in (128, 256) for split in atomic_splits(m, n, k, bm, bn, bk, sms)]
    if m >= 32:
        out += [("std", dict(BLOCK_M=sbm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=4, GROUP_M=8,
                             ATOMIC=True))
                for sbm, bn, bk in std_tiles for split in atomic_splits(m, n, k, sbm, bn, bk, sms)]
    return out


def _scaled_mm(layer: Layer):
    w_t = layer.wf8.t()
    w_s = layer.wf8_scale.reshape(1, -1)

    def run(x):
        xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
        xq = (x.float() / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, w_t, scale_a=xs, scale_b=w_s, out_dtype=torch.bfloat16)
    return run


def _gemlite(layer: Layer, op: str):
    key = "gemlite_" + op
    if key not in layer.extra:
        from gemlite import helper as gemlite
        if op == "w4a16":
            u = (layer.extra["codes"].to(torch.int32) + 8).to(torch.uint8)
            zeros = torch.full_like(layer.scales, 8.0)
            mod = gemlite.A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
                u, layer.scales, zeros, W_nbits=4, group_size=GROUP)
        elif op == "w8a8":
            mod = gemlite.A8W8_int8_dynamic(device="cuda", dtype=torch.bfloat16).from_weights(
                layer.w8, scales=layer.w8_scale.reshape(1, -1).float())
        else:
            mod = gemlite.A8W8_fp8_dynamic(device="cuda", dtype=torch.bfloat16).from_weights(
                layer.wf8, scales=layer.wf8_scale.reshape(1, -1).float())
        layer.extra[key] = mod
    return layer.extra[key]


def contenders(layer: Layer, m: int, with_gemlite: bool) -> list[tuple[str, str, str | None, object]]:
    """(op, impl, path, fn(x)) for one layer and batch size."""
    out = [("bf16", "cublas", None, lambda x: F.linear(x, layer.w_bf16))]
    path = ops.w4a16_path(m, layer.n, layer.k)
    out.append(("w4a16", "quantarena", path,
                lambda x: ops.w4a16_linear(x, layer.packed, layer.scales, None, GROUP)))
    for other in ("gemv2", "tc", "dequant"):
        if other != path and (other != "gemv2" or m == 1) and (other != "tc" or m <= 1024):
            out.append(("w4a16", "quantarena:" + other, other,
                        lambda x, p=other: ops.w4a16_linear(x, layer.packed, layer.scales, None, GROUP, path=p)))
    if m <= 1024:
        out.append(("w4a16", "tinygemm", None, _tinygemm(layer)))
    out.append(("w8a8", "quantarena", None, lambda x: ops.w8a8_linear(x, layer.w8, layer.w8_scale)))
    out.append(("w8a8", "int_mm", None, _int_mm(layer)))
    out.append(("fp8", "quantarena", None, lambda x: ops.fp8_linear(x, layer.wf8, layer.wf8_scale)))
    out.append(("fp8", "scaled_mm", None, _scaled_mm(layer)))
    if with_gemlite:
        for op in ("w4a16", "w8a8", "fp8"):
            out.append((op, "gemlite", None, lambda x, op=op: _gemlite(layer, op)(x)))
    return out


def _reference(op: str, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    if op == "w4a16":
        return reference.w4a16_linear(x, layer.packed, layer.scales, None, GROUP)
    if op == "w8a8":
        return reference.w8a8_linear(x, layer.w8, layer.w8_scale)
    return reference.fp8_linear(x, layer.wf8, layer.wf8_scale)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32; NaN when ``out`` holds a NaN (an unwritten, poisoned element)."""
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm()).item()


def poison(shape: tuple[int, ...]) -> None:
    """Fill a freed block with NaN: the caching allocator hands it to the next bf16 allocation of ``shape``
    (a kernel's output), so an element the kernel leaves unwritten shows as NaN."""
    block = torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)
    del block


def check_error(op: str, fn, layer: Layer, m: int) -> float:
    """Relative error vs the reference on fresh inputs, output memory poisoned with NaN first (NaN if
    any output element was left unwritten)."""
    x = torch.randn(m, layer.k, device="cuda", dtype=torch.bfloat16)
    poison = torch.full((m * layer.n * 2,), float("nan"), device="cuda", dtype=torch.bfloat16)
    del poison  # the caching allocator hands this NaN-filled block to the next allocation of its size
    out = fn(x)
    return rel_err(out, _reference(op, layer, x))


def bytes_moved(op: str, k: int, n: int, m: int) -> int:
    weight = {"bf16": 2 * k * n, "w4a16": k * n // 2 + 2 * n * (k // GROUP), "w8a8": k * n + 4 * n,
              "fp8": k * n + 4 * n}[op]
    return weight + 2 * m * k + 2 * m * n


def add_rates(row: dict) -> None:
    """Achieved TB/s (weights, scales, activations in and out) and TFLOP/s of a timed row, in place."""
    if "us" in row:
        m, k, n = row["M"], row["K"], row["N"]
        row["tb_s"] = round(bytes_moved(row["op"], k, n, m) / row["us"] / 1e6, 3)
        row["tflop_s"] = round(2 * m * k * n / row["us"] / 1e6, 1)


def sweep(models: list[str], batches: list[int], with_gemlite: bool = True, reps: int = 20,
          budget_s: float | None = None, log=print, partial_path: str | None = None) -> dict:
    """Run the sweep; returns the results object (schema of benchmarks/results/<gpu>-kernels.json)."""
    started = time.time()
    flush = L2Flush()
    rows = []
    for model in models:
        for label, k, n in SHAPES[model]:
            layer = make_layer(k, n)
            for m in batches:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for op, impl, path, fn in contenders(layer, m, with_gemlite):
                    if budget_s is not None and time.time() - started > budget_s and impl == "gemlite":
                        continue
                    row = {"model": model, "layer": label, "op": op, "impl": impl, "K": k, "N": n, "M": m}
                    if path:
                        row["path"] = path
                    try:
                        row["us"] = round(time_fn(lambda: fn(x), flush, reps), 2)
                        if impl == "quantarena" and m in ERROR_AT_M:
                            row["rel_err"] = check_error(op, fn, layer, m)
                    except Exception as exc:  # a contender that cannot run this shape is recorded, not fatal
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    add_rates(row)
                    rows.append(row)
                log(f"{model} {label} M={m} done ({time.time() - started:.0f}s)")
            del layer
            torch.cuda.empty_cache()
            if partial_path:
                write(_result(rows), partial_path)
    return _result(rows)


def _result(rows: list[dict]) -> dict:
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": _triton_version(),
            "date": datetime.date.today().isoformat(), "group_size": GROUP,
            "timing": "median of CUDA-graph replays, L2 flushed before each", "rows": rows}


def _triton_version() -> str:
    import triton
    return triton.__version__


def table(result: dict) -> str:
    """Text table: time, achieved TB/s and TFLOP/s, and ratio to bf16 per row."""
    bf16 = {(r["K"], r["N"], r["M"]): r["us"] for r in result["rows"] if r["op"] == "bf16" and "us" in r}
    lines = [f"{'model':12} {'layer':8} {'M':>5} {'op':6} {'impl':18} {'us':>9} {'TB/s':>6} {'TFLOP/s':>8} {'x bf16':>7}"]
    for r in result["rows"]:
        if "us" not in r:
            lines.append(f"{r['model']:12} {r['layer']:8} {r['M']:>5} {r['op']:6} {r['impl']:18} {r.get('error', '')[:40]}")
            continue
        ratio = bf16.get((r["K"], r["N"], r["M"]), float("nan")) / r["us"]
        lines.append(f"{r['model']:12} {r['layer']:8} {r['M']:>5} {r['op']:6} {r['impl']:18} {r['us']:9.1f} "
                     f"{r['tb_s']:6.2f} {r['tflop_s']:8.1f} {ratio:7.2f}")
    return "\n".join(lines)


def write(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
