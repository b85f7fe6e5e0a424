"""The block-by-block calibration runner.

1. Capture every decoder block's call arguments for each calibration window: each block is
   temporarily replaced by a catcher that records its inputs and passes the hidden states
   through, so the decoder runs only embeddings and rotary tables (no attention, no lm_head).
   Blocks of one kind (e.g. Gemma's sliding and global layers) share the same mask and rotary
   tensors, which are stored once.
2. For each block in order: move it to the compute device, let ``process`` collect statistics
   and replace its Linears (it may run the block over its inputs as often as it needs), then
   run the *quantized* block to produce the next block's inputs, and move it back.

Only one block and the current hidden states ([windows, T, hidden]) live on the compute
device; memory does not grow with depth.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import ArchSpec, blocks, get_module


class _Catcher(nn.Module):
    def __init__(self, index: int, store: list[list[dict]], first: list[torch.Tensor], offload: torch.device):
        super().__init__()
        self.index, self.store, self.first, self.offload = index, store, first, offload

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder blocks called with positional extras are not supported by the runner")
        if self.index == 0:
            self.first.append(hidden_states.detach().to(self.offload))
        kept = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache",
                                                             "output_attentions", "cache_position")}
        self.store[self.index].append(kept)
        return hidden_states


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _share(kwargs: list[dict], device: torch.device) -> list[dict]:
    """Move kwargs to ``device`` keeping identical tensors shared (moved once)."""
    moved: dict[int, torch.Tensor] = {}

    def move(obj):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in moved:
                moved[id(obj)] = obj.to(device)
            return moved[id(obj)]
        if isinstance(obj, (tuple, list)):
            return type(obj)(move(o) for o in obj)
        if isinstance(obj, dict):
            return {k: move(v) for k, v in obj.items()}
        return obj
    return [move(k) for k in kwargs]


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: ArchSpec, windows: torch.Tensor, offload: torch.device
                   ) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """First block's hidden states per window and every block's kwargs per window (on ``offload``)."""
    layers = blocks(model, arch)
    originals = list(layers)
    store: list[list[dict]] = [[] for _ in originals]
    first: list[torch.Tensor] = []
    decoder = get_module(model, arch.decoder)
    device = next(model.parameters()).device
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, store, first, offload)
        for ids in windows:
            decoder(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
    finally:
        for i, block in enumerate(originals):
            layers[i] = block
    return first, [_share(s, offload) for s in store]


def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], device: torch.device,
              keep: bool = True) -> list[torch.Tensor]:
    """Run ``block`` over every window; returns outputs on the inputs' device (or [] if not ``keep``)."""
    outs = []
    shared = _share(kwargs, device)
    for h, kw in zip(hidden, shared):
        out = block(h.to(device), **kw)
        out = out[0] if isinstance(out, tuple) else out
        if keep:
            outs.append(out.to(h.device))
    return outs


@dataclass
class BlockContext:
    """What ``process`` gets for one block."""
    index: int
    block: nn.Module
    hidden: list[torch.Tensor]       # inputs per window, [1, T, H] (offload device)
    kwargs: list[dict]
    device: torch.device

    def forward(self, block: nn.Module | None = None, keep: bool = True) -> list[torch.Tensor]:
        """Run the (current or given) block over this block's calibration inputs."""
        with torch.no_grad():
            return run_block(block or self.block, self.hidden, self.kwargs, self.device, keep)

    def inputs(self):
        """Yield ``(hidden [1, T, H], kwargs)`` per window, on the compute device (for callers that run
        the block themselves, e.g. to stop early once the layers they observe have run)."""
        shared = _share(self.kwargs, self.device)
        for h, kw in zip(self.hidden, shared):
            yield h.to(self.device), kw


@torch.no_grad()
def run_sequential(model: nn.Module, arch: ArchSpec, windows: torch.Tensor,
                   process: Callable[[BlockContext], dict | None], device: torch.device | str | None = None,
                   progress: bool = True, desc: str = "calibrate") -> list[dict]:
    """Apply ``process`` block by block (see module docstring). ``process`` may return a dict of
    per-block info (e.g. ``{"loss": ...}``), shown on the progress bar and returned per block."""
    offload = next(model.parameters()).device
    device = torch.device(device) if device is not None else offload
    hidden, all_kwargs = capture_inputs(model, arch, windows, offload)
    layers = blocks(model, arch)
    infos = []
    bar = tqdm(range(len(layers)), desc=desc, disable=not progress, unit="block")
    for i in bar:
        start = time.perf_counter()
        block = layers[i].to(device)
        info = process(BlockContext(i, block, hidden, all_kwargs[i], device)) or {}
        hidden = run_block(block, hidden, all_kwargs[i], device)  # the quantized block feeds the next
        layers[i] = block.to(offload)
        info = {"block": i, "seconds": round(time.perf_counter() - start, 2), **info}
        infos.append(info)
        if "loss" in info:
            bar.set_postfix(loss=f"{info['loss']:.3g}", s=info["seconds"])
    return infos
