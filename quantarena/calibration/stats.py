"""Statistics of Linear inputs, collected with hooks while a block runs over its calibration windows.

:class:`InputStats` accumulates what the algorithms need from a layer's input ``x [tokens, in]``
without keeping the activations: per-channel absmax (SmoothQuant, static scales, outlier tables),
mean |x| (AWQ), the Hessian ``2 X^T X / n`` (GPTQ), kurtosis moments, and a small seeded sample of
token rows (clipping and alpha searches). :func:`observe` runs the block and stops each window as
soon as every observed layer has seen its input, so observing an early layer is cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .sequential import BlockContext


class _Stop(Exception):
    """Raised by a hook to end a window's forward pass once nothing more is needed from it."""


class InputStats:
    """Running statistics of one layer input (float64 sums where precision matters)."""

    def __init__(self, hessian: bool = False, sample_tokens: int = 0, moments: bool = False, seed: int = 0,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``transform``: what the layer does to its input before the matmul (an online rotation); the
        statistics are those of the transformed input."""
        self.want_hessian, self.sample_tokens, self.want_moments = hessian, sample_tokens, moments
        self.transform = transform
        self.tokens = 0
        self.absmax: torch.Tensor | None = None   # [in]
        self.abssum: torch.Tensor | None = None   # [in]
        self.H: torch.Tensor | None = None        # [in, in] sum of x x^T
        self.moment: list[torch.Tensor] = []      # sums of x, x^2, x^3, x^4 per channel (kurtosis)
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
        if self.transform is not None:
            x = self.transform(x).float()
        absx = x.abs()
        amax, asum = absx.amax(dim=0), absx.sum(dim=0, dtype=torch.float64)
        if self.absmax is None:
            self.absmax, self.abssum = amax, asum
        else:
            self.absmax, self.abssum = torch.maximum(self.absmax, amax), self.abssum + asum
        if self.want_hessian:
            xx = x.t() @ x
            self.H = xx if self.H is None else self.H + xx
        if self.want_moments:
            xd = x.double()
            powers = [xd.sum(0), (xd ** 2).sum(0), (xd ** 3).sum(0), (xd ** 4).sum(0)]
            self.moment = powers if not self.moment else [a + b for a, b in zip(self.moment, powers)]
        if self.sample_tokens:
            taken = sum(s.shape[0] for s in self.samples)
            if taken < self.sample_tokens:
                idx = torch.randperm(x.shape[0], generator=self.generator)[: self.sample_tokens - taken]
                self.samples.append(x[idx.to(x.device)].cpu())
        self.tokens += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abssum / max(self.tokens, 1)).float()

    @property
    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` (GPTQ's H for the squared output error)."""
        return self.H * (2.0 / max(self.tokens, 1))

    def sample(self) -> torch.Tensor:
        """The kept token rows ``[k, in]`` (float32, CPU)."""
        return torch.cat(self.samples) if self.samples else torch.empty(0)

    def kurtosis(self) -> torch.Tensor:
        """Per-channel excess kurtosis ``[in]`` (0 for a Gaussian; large for outlier channels)."""
        n = max(self.tokens, 1)
        m1, m2, m3, m4 = (m / n for m in self.moment)
        var = (m2 - m1 ** 2).clamp(min=1e-30)
        m4c = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
        return (m4c / var ** 2 - 3.0).float()


@dataclass
class ModuleCalls:
    """Recorded calls of a module (args, kwargs, output) for the first few windows: AWQ re-runs the
    module with candidate weights and compares against ``outputs``."""
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def replay(self, module: nn.Module) -> list[torch.Tensor]:
        outs = []
        for args, kwargs in zip(self.args, self.kwargs):
            out = module(*args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


@torch.no_grad()
def observe(ctx: BlockContext, inputs: dict[str, tuple[nn.Module, InputStats]],
            calls: dict[str, tuple[nn.Module, ModuleCalls]] | None = None, call_windows: int = 0,
            stop_early: bool = True) -> None:
    """Run ``ctx.block`` over its windows, feeding each observed module's input to its :class:`InputStats`
    and recording ``calls`` (for the first ``call_windows`` windows). Without ``calls`` and with
    ``stop_early``, each window stops once every observed module has run."""
    calls = calls or {}
    fired: set[str] = set()
    window = [0]

    def stats_hook(name, stats):
        def fn(_mod, args):
            stats.update(args[0])
            fired.add(name)
            if stop_early and not calls and len(fired) == len(inputs):
                raise _Stop
        return fn

    def pre_call_hook(rec):
        def fn(_mod, args, kwargs):
            if window[0] < call_windows:
                rec.args.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
                rec.kwargs.append(dict(kwargs))
        return fn

    def call_hook(rec):
        def fn(_mod, _args, _kwargs, out):
            if window[0] < call_windows:
                rec.outputs.append((out[0] if isinstance(out, tuple) else out).detach())
        return fn

    handles = [mod.register_forward_pre_hook(stats_hook(n, st)) for n, (mod, st) in inputs.items()]
    for mod, rec in calls.values():
        handles.append(mod.register_forward_pre_hook(pre_call_hook(rec), with_kwargs=True))
        handles.append(mod.register_forward_hook(call_hook(rec), with_kwargs=True))
    try:
        for i, (h, kw) in enumerate(ctx.inputs()):
            window[0] = i
            fired.clear()
            try:
                ctx.block(h, **kw)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
