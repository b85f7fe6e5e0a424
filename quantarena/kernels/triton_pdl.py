"""Programmatic dependent launch (Hopper) for the 8-bit linears: the GEMM starts while ``act_quant`` runs.

A W8A8 / FP8 linear is two launches: the activation quantization, then the GEMM. At decode sizes the GEMM is a
weight stream and the quantization a few microseconds of its own, during which the weights could already be
on their way. With PDL:

* ``act_quant`` calls ``griddepcontrol.launch_dependents`` first thing (:func:`trigger`), so the GEMM's grid
  is scheduled as soon as every quantization program has started, not after the last one has finished.
* The GEMM, launched with ``launch_pdl=True``, asks the L2 for the start of its weight slice
  (:func:`prefetch_rows`, ``cp.async.bulk.prefetch.L2``: one request per thread, no registers, no result; a
  budget of ``PREFETCH_BUDGET`` bytes over all programs, :func:`prefetch_row_bytes`), then waits for
  the quantization to finish (``griddepcontrol.wait``) before it reads anything a kernel writes: activation
  codes, scales, split-K workspace and counters, output. After the wait the weight loads hit the L2.

Correctness does not depend on the prefetch: it only moves lines into the L2, the point of coherence of the
GPU's global memory, and every load the kernel computes with is issued after the wait. A GEMM launched with
PDL behind any other kernel (one that never triggers) simply starts when that kernel ends, as without PDL.

:func:`prefetch_items` serves the W4A16 L2 chain (:mod:`.l2_chain`): a kernel, once done, asks the L2 for the
start of the next linear's weight slices.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import INTERPRETING

PREFETCH_ALIGN = 16   # cp.async.bulk: 16-byte aligned address, size a multiple of 16
PREFETCH_BUDGET = 8 << 20   # bytes of weights a GEMM asks the L2 for before it waits (prefetch_row_bytes)
# the default where the dispatch table has no measured choice: on the H100 (h100-pdl-8bit.json) PDL won 2-21%
# at M <= 32 on every shape but a few within 3% noise, and lost up to 25% from M = 128 on (the quantization is
# then bandwidth-bound and the prefetch delays it)
DEFAULT_MAX_M = 32


@triton.jit
def l2_prefetch(ptrs, nbytes):
    """Prefetch ``nbytes`` (int32, rounded down to a multiple of 16; nothing when <= 0) from each 16-byte aligned
    address of ``ptrs`` into the L2. Returns a dummy int32 tensor (the asm has a side effect and is kept)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, (nbytes // 16 * 16) + tl.zeros(ptrs.shape, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(base, row0, N, stride, nbytes, ROWS: tl.constexpr, LANES: tl.constexpr):
    """Prefetch ``nbytes`` (<= 0: nothing) from each of rows ``row0 .. row0 + ROWS - 1`` (those < N) of a
    row-major matrix of ``stride`` bytes per row; ``base`` is a byte pointer at row 0 of the slice (16-byte
    aligned, as ``stride``). Every line is asked for once: the rows are cut into ``LANES // ROWS`` chunks so
    that each of the program's LANES threads (32 x num_warps) issues one request (a tensor of LANES elements
    has one per thread), instead of Triton replicating a ROWS-long tensor over threads that would each
    repeat the same request (an L2 lookup per line per repeat)."""
    CHUNKS: tl.constexpr = LANES // ROWS if LANES > ROWS else 1
    i = tl.arange(0, ROWS * CHUNKS)
    r = i % ROWS
    c = i // ROWS
    chunk = tl.cdiv(tl.cdiv(nbytes, CHUNKS), 16) * 16
    off = c * chunk
    size = tl.where(row0 + r < N, tl.minimum(chunk, nbytes - off), 0)
    return l2_prefetch(base + (row0 + r).to(tl.int64) * stride + off, size)


@triton.jit
def prefetch_items(base, p, P, items, chunks, block_bytes, chunk_bytes, nbytes, LANES: tl.constexpr):
    """Program ``p`` of ``P`` asks the L2 for its share of ``items`` byte ranges of a weight (``base``: a byte
    pointer, 16-byte aligned): item ``i`` is ``nbytes`` from chunk ``i % chunks`` (``chunk_bytes`` apart) of block
    ``i // chunks`` (``block_bytes`` apart), cut at the block's end. One request per thread and round of LANES
    items (see :func:`prefetch_rows`); the sizes are 16-byte multiples (:func:`.l2_chain.tiled_plan`)."""
    per = tl.cdiv(items, P)
    lane = tl.arange(0, LANES)
    for j in range(0, per, LANES):
        i = p * per + j + lane
        start = (i % chunks) * chunk_bytes
        size = tl.where((i < items) & (j + lane < per), tl.minimum(nbytes, block_bytes - start), 0)
        l2_prefetch(base + (i // chunks).to(tl.int64) * block_bytes + start, size)


@triton.jit
def trigger():
    """Let the next kernel (launched with PDL) start now; it still waits for this one before reading."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait():
    """Wait for the previous kernel to finish and its writes to be visible."""
    tl.extra.cuda.gdc_wait()


def pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled kernels on Hopper or newer (not the interpreter)."""
    return device.type == "cuda" and not INTERPRETING and torch.cuda.get_device_capability(device)[0] >= 9


def prefetch_ok(weight: torch.Tensor) -> bool:
    """The weight rows can be bulk-prefetched: contiguous rows whose start and byte stride are 16-aligned."""
    row_bytes = weight.stride(0) * weight.element_size()
    return (weight.stride(-1) == 1 and row_bytes % PREFETCH_ALIGN == 0
            and weight.data_ptr() % PREFETCH_ALIGN == 0)


def prefetch_row_bytes(programs: int, rows: int) -> int:
    """Bytes per weight row each prefetching program asks for: ``PREFETCH_BUDGET`` shared by ``programs``
    programs of ``rows`` rows (16-byte multiple; the kernel also stops at the end of its K slice). The
    quantization before the GEMM lasts a few microseconds, in which the DRAM delivers ~10 MB; asking for more
    only evicts what was prefetched first (the L2 is 50 MB on an H100, and a 70B layer is up to 235 MB)."""
    return max(0, PREFETCH_BUDGET // max(1, programs * rows)) // PREFETCH_ALIGN * PREFETCH_ALIGN


def pdl_launch(cfg: dict, a: torch.Tensor, weight: torch.Tensor, programs: int, allowed: bool = True) -> dict:
    """The keywords an 8-bit GEMM launch adds for PDL: pops ``cfg["PDL"]`` (the dispatch table's measured choice;
    without one, on for M <= ``DEFAULT_MAX_M``; never where not ``allowed``, off the GPU or where the weight
    cannot be bulk-prefetched) and returns the kernel's ``PDL``, ``pf_bytes`` (``programs`` prefetching
    programs of ``cfg["BLOCK_N"]`` rows, :func:`prefetch_row_bytes`) and ``LANES``, plus Triton's
    ``launch_pdl`` option when on."""
    on = bool(cfg.pop("PDL", a.shape[0] <= DEFAULT_MAX_M)) and allowed and pdl_ok(a.device) and prefetch_ok(weight)
    out = dict(PDL=on, pf_bytes=prefetch_row_bytes(programs, cfg["BLOCK_N"]), LANES=32 * cfg["num_warps"])
    if on:
        out["launch_pdl"] = True
    return out

