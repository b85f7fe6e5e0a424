"""GPU timing: every contender is timed the same way, as the replay of a CUDA graph with L2 flushed.

Graph replay removes host launch overhead (which otherwise dominates small decode-size kernels);
reading a 2x-L2 buffer before each replay makes every run read its weights from device memory, as a decode
step does when each layer's weights were evicted by the previous layers (see ``L2Flush``). The flush is enqueued before
the start event, so the GPU is busy while the host enqueues the replay: no host gap is timed.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class L2Flush:
    """Evicts every cached line of the timed work before a replay by touching a buffer of 2x L2.

    ``mode="read"`` (default) reads the buffer, so L2 ends up full of clean lines, as in a decode step,
    where the previous layers read their weights and wrote little. ``mode="write"`` (a memset; what this
    harness used before 2026-11-24) leaves L2 full of dirty lines, which the timed kernel then has to write
    back as it reads: extra DRAM traffic of up to the L2 size that the kernel did not cause, and a larger
    share of the time of a kernel that reads fewer bytes (it penalised W4A16 against bf16)."""

    def __init__(self, device: torch.device | str = "cuda", mode: str = "read"):
        if mode not in ("read", "write"):
            raise ValueError(f"L2Flush mode must be 'read' or 'write', got {mode!r}")
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        self.buf = torch.zeros(max(2 * l2, 128 * 2**20) // 8, dtype=torch.int64, device=device)
        self.out = torch.zeros((), dtype=torch.int64, device=device)
        self.mode = mode

    def __call__(self) -> None:
        if self.mode == "write":
            self.buf.zero_()
        else:
            torch.sum(self.buf, dim=0, out=self.out)


class Logger:
    """``print`` with the seconds since this logger was made, as ``[   12.3s] ...``, flushed at once.

    The benchmark scripts make one at start-up (``log = Logger()``) and call it as ``log(...)``. ``start``
    (a ``time.time()`` value) sets the origin instead: a script that also checks a time budget against its
    own ``started`` passes it, so both count from the same instant."""

    def __init__(self, start: float | None = None):
        self.started = time.time() if start is None else start

    def __call__(self, *a) -> None:
        print(f"[{time.time() - self.started:6.1f}s]", *a, flush=True)


def capture(fn: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream (compiles kernels, builds caches), then capture it in a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def time_graph(graph: torch.cuda.CUDAGraph, flush: L2Flush | None, reps: int = 20, warm_s: float = 0.005) -> float:
    """Median microseconds of one replay of ``graph`` (L2 flushed before each when ``flush`` is given).

    Replays (with flushes) for ``warm_s`` seconds first: after a pause (a kernel compile, host work) the GPU
    has lowered its clocks, and 20 replays of a 10 us graph end before they are back up."""
    graph.replay()  # first replay uploads the graph
    until = time.perf_counter() + warm_s
    while time.perf_counter() < until:
        if flush is not None:
            flush()
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def time_fn(fn: Callable[[], object], flush: L2Flush | None = None, reps: int = 20) -> float:
    """Capture ``fn`` in a CUDA graph and return the median microseconds of a replay."""
    graph = capture(fn)
    try:
        return time_graph(graph, flush, reps)
    finally:
        del graph
