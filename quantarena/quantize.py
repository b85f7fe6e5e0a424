"""``quantize(model, scheme, calibration)``: the single entry point that turns a float model into a
quantized one, in place.

Round-to-nearest schemes need no data. Schemes that need calibration (static activation
scales, GPTQ, AWQ, SmoothQuant) run block by block through :mod:`.calibration.sequential`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import primitives as P
from .algorithms import awq, gptq, rotation, rtn, smoothquant
from .calibration.sequential import BlockContext, run_sequential
from .calibration.stats import InputStats, ModuleCalls, observe
from .models import ArchSpec, SmoothGroup, arch_for, blocks, set_module
from .nn import BF16Linear, FP8Linear, W4A16Linear, W8A8Linear
from .schemes import Scheme, parse_scheme

log = logging.getLogger("quantarena.quantize")


@dataclass(frozen=True)
class CalibrationOptions:
    """Knobs of the calibrated algorithms; the defaults are the ones measured in benchmarks/results."""
    act_order: bool = True          # GPTQ: columns by decreasing Hessian diagonal (static groups)
    percdamp: float = 0.01          # GPTQ: dampening, fraction of mean diag(H); grows if Cholesky fails
    block_size: int = 128           # GPTQ: lazy-update block
    awq_grid: int = 20              # AWQ: exponent grid points
    awq_windows: int = 4            # AWQ: windows whose module outputs measure each candidate's loss
    awq_duo_scaling: bool = True    # AWQ: s = x^r / w^(1-r) (llm-compressor's default) instead of s = x^r
    awq_clip: bool = True           # AWQ: weight-clipping search (not with GPTQ, which rounds itself)
    awq_clip_sweeps: int = 2        # AWQ clipping scored through X^T X of all tokens, with this many cross-group
                                    # coordinate-descent passes; -1: per (row, group) on sample rows (AutoAWQ's)
    awq_clip_grid: int = 100        # AWQ clipping: candidate bounds max|W| * (1 - i / grid), i < grid / 2
    sample_tokens: int = 512        # token rows kept per layer input for clipping / alpha searches
    alpha_search: bool = False      # SmoothQuant: per-group alpha on the watched output's error instead of scheme.alpha
    sq_alphas: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 19))  # alpha grid of that search
    smooth_rotated: bool = True     # SmoothQuant also smooths the Linears a -rot scheme rotates (then rotates)
    runtime_smoothing: bool = True  # SmoothQuant: where no op can absorb 1/s, divide at run time; False: leave
                                    # those Linears unsmoothed (checkpoint formats cannot express the divisor)


def make_linear(scheme: Scheme, linear: nn.Linear, input_scale: torch.Tensor | None = None,
                smooth_scale: torch.Tensor | None = None, rotation: int | None = None) -> nn.Module:
    """Round-to-nearest quantized replacement of ``linear`` for ``scheme`` (``rotation``: W8A8 Hadamard block)."""
    if scheme.family == "bf16":
        return BF16Linear.from_float(linear)
    if scheme.family == "w4a16":
        return W4A16Linear.from_float(linear, scheme.group_size, scheme.symmetric)
    if scheme.family == "w8a8":
        return W8A8Linear.from_float(linear, input_scale=input_scale, smooth_scale=smooth_scale, rotation=rotation)
    if scheme.family == "fp8":
        return FP8Linear.from_float(linear)
    raise P.QuantizationError(f"no module for scheme family {scheme.family!r}")


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Linear]:
    return {name: block.get_submodule(name) for name in arch.linears}


def rotation_of(scheme: Scheme, arch: ArchSpec, name: str, in_features: int) -> int | None:
    """The Hadamard block size of Linear ``name``'s online input rotation under ``scheme`` (None: not rotated)."""
    if scheme.rotation is None or name not in arch.rotated:
        return None
    return rotation.resolve_block(in_features, scheme.rotation, name)


def _input_rotation(block: int, smooth: torch.Tensor | None = None):
    """What a rotated W8A8 layer does to its input before quantizing it: ``x -> (x / smooth) R``."""
    H = rotation.hadamard(block)
    return lambda x: rotation.rotate(x if smooth is None else x / smooth.to(x.device), H)


def validate(model: nn.Module, arch: ArchSpec, scheme: Scheme) -> None:
    """Fail before touching anything: non-finite weights, group sizes that do not divide, Hadamard blocks."""
    if scheme.rotation is not None and not arch.rotated:
        raise P.QuantizationError(f"scheme {scheme.name!r} rotates the down projection's input, but the {arch.name} "
                                  f"table names no Linear to rotate; drop -rot")
    for i, block in enumerate(blocks(model, arch)):
        for name, lin in block_linears(block, arch).items():
            if not isinstance(lin, nn.Linear):
                raise P.QuantizationError(f"layer {i}.{name} is already quantized ({type(lin).__name__})")
            P.check_finite(lin.weight, f"weight of layer {i}.{name}")
            if scheme.family == "w4a16":
                P.check_group_size(lin.in_features, scheme.group_size, f"layer {i}.{name}")
            if scheme.rotation is not None and name in arch.rotated:
                rotation.resolve_block(lin.in_features, scheme.rotation, f"layer {i}.{name}")


def _static_rtn(scheme: Scheme, arch: ArchSpec):
    """Per block: observe each Linear's per-tensor input absmax, then quantize with that static scale."""
    def process(ctx: BlockContext) -> dict:
        linears = block_linears(ctx.block, arch)
        blocks_ = {name: rotation_of(scheme, arch, name, lin.in_features) for name, lin in linears.items()}
        stats = {name: InputStats(transform=None if blocks_[name] is None else _input_rotation(blocks_[name]))
                 for name in linears}
        observe(ctx, {name: (lin, stats[name]) for name, lin in linears.items()})
        for name, lin in linears.items():
            input_scale = P.div_exact(stats[name].absmax.max().clamp(min=1e-12), P.INT8_MAX)
            set_module(ctx.block, name, make_linear(scheme, lin, input_scale=input_scale, rotation=blocks_[name]))
        return {}
    return process


def block_groups(arch: ArchSpec) -> list[SmoothGroup]:
    """The architecture's smooth groups, plus a group with no ``prev`` for any Linear they miss."""
    covered = {n for g in arch.groups for n in g.linears}
    return list(arch.groups) + [SmoothGroup(None, "none", (n,)) for n in arch.linears if n not in covered]


def _prev(block: nn.Module, group: SmoothGroup) -> nn.Module | None:
    return block.get_submodule(group.prev) if group.prev else None


class _Fixed(nn.Module):
    """A Linear that computes with a given (candidate) weight; used only while scoring candidates."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


@dataclass
class _Watch:
    """Where a group's candidates are scored: the module the group feeds (attention, MLP), replayed on its
    recorded calls, or, when ``single``, the group's Linears alone on the inputs recorded at the first one."""
    module: nn.Module
    calls: ModuleCalls
    single: bool


def _common_parent(names: tuple[str, ...]) -> str:
    parents = {n.rpartition(".")[0] for n in names}
    return parents.pop() if len(parents) == 1 else ""


def _watch(ctx: BlockContext, group: SmoothGroup) -> _Watch:
    parent = _common_parent(group.linears) if group.prev_kind != "linear" else ""
    return _Watch(ctx.block.get_submodule(parent or group.linears[0]), ModuleCalls(), not parent)


def _scorer(ctx: BlockContext, watch: _Watch, names: tuple[str, ...]):
    """``loss(candidates)``: mean squared error of the watched output when the Linears ``names`` are replaced
    by the ``candidates`` modules, summed over the recorded windows."""
    originals = [ctx.block.get_submodule(n) for n in names]
    if watch.single:
        xs = [a[0] for a in watch.calls.args]
        refs = [[lin(x) for lin in originals] for x in xs]
    else:
        refs = watch.calls.outputs

    def loss(candidates: list[nn.Module]) -> float:
        if watch.single:
            return sum((c(x) - r).float().pow(2).mean().item()
                       for x, rs in zip(xs, refs) for c, r in zip(candidates, rs))
        for n, c in zip(names, candidates):
            set_module(ctx.block, n, c)
        try:
            return sum((o - r).float().pow(2).mean().item()
                       for o, r in zip(watch.calls.replay(watch.module), refs))
        finally:
            for n, lin in zip(names, originals):
                set_module(ctx.block, n, lin)
    return loss


def _smoothquant(ctx: BlockContext, arch: ArchSpec, groups: list[SmoothGroup], scheme: Scheme,
                 opts: CalibrationOptions, runtime_smooth: dict[str, torch.Tensor],
                 absmax: dict[str, torch.Tensor]) -> dict:
    """SmoothQuant for every group of the block from one float pass: scales from ``scheme.alpha``, or with
    ``opts.alpha_search`` the alpha (or no smoothing) whose W8A8 layers, as they will run, give the smallest
    error of the watched output (the module the group feeds, after its output norm). Linears the scheme
    rotates are smoothed first (``opts.smooth_rotated``) or left alone."""
    stats = {g: InputStats() for g in groups}
    watches = {g: _watch(ctx, g) for g in groups} if opts.alpha_search else {}
    observe(ctx, {g.linears[0]: (ctx.block.get_submodule(g.linears[0]), stats[g]) for g in groups},
            calls={g.linears[0] + "#": (w.module, w.calls) for g, w in watches.items()},
            call_windows=opts.awq_windows)
    alphas = []
    for g in groups:
        linears = [ctx.block.get_submodule(n) for n in g.linears]
        blocks_ = [rotation_of(scheme, arch, n, lin.in_features) for n, lin in zip(g.linears, linears)]
        w_absmax = smoothquant.weight_absmax(linears)
        prev = _prev(ctx.block, g)
        foldable = smoothquant.can_fold(prev, g.prev_kind, linears[0].in_features)
        if (not opts.smooth_rotated and None not in blocks_) or (not foldable and not opts.runtime_smoothing):
            alphas.append(None)  # rotation alone flattens these inputs, or the divisor could not be exported
            absmax.update({n: stats[g].absmax for n in g.linears})
            continue
        if opts.alpha_search:
            score = _scorer(ctx, watches[g], g.linears)

            def loss_fn(s: torch.Tensor) -> float:
                x_absmax = stats[g].absmax / s
                return score([_w8a8_module(lin, *rtn.rtn_int8(_rotated(lin.weight.detach().float() * s, b)), scheme,
                                           x_absmax, s, b) for lin, b in zip(linears, blocks_)])
            s, alpha, _ = smoothquant.search_alpha(stats[g].absmax, w_absmax, loss_fn, opts.sq_alphas)
        else:
            alpha = scheme.alpha
            s = smoothquant.smooth_scales(stats[g].absmax, w_absmax, alpha)
        alphas.append(alpha)
        if foldable:
            smoothquant.fold_into_prev(prev, g.prev_kind, s)
            smoothquant.scale_inputs(linears, s)
        else:  # nothing can absorb 1/s: the W8A8 layer divides its input at run time
            runtime_smooth.update({n: s for n in g.linears})
        absmax.update({n: stats[g].absmax / s for n in g.linears})
    return {"alpha": alphas} if opts.alpha_search else {}


_NO_CLIP = ("q_proj", "k_proj", "qkv_proj")  # AWQ leaves query/key ranges alone (attention logits are sensitive)


def _awq(ctx: BlockContext, groups: list[SmoothGroup], scheme: Scheme, opts: CalibrationOptions) -> dict:
    """AWQ scale search per foldable group (loss on the output of the module the group feeds: attention,
    MLP, or the Linear itself), folding, then the clipping search."""
    foldable = [g for g in groups if smoothquant.can_fold(_prev(ctx.block, g), g.prev_kind,
                                                        ctx.block.get_submodule(g.linears[0]).in_features)]
    clip = opts.awq_clip and not scheme.method.endswith("gptq")
    full_clip = clip and opts.awq_clip_sweeps >= 0
    stats = {g: InputStats(sample_tokens=0 if full_clip else opts.sample_tokens, hessian=full_clip) for g in groups}
    watches = {g: _watch(ctx, g) for g in foldable}
    observe(ctx, {g.linears[0]: (ctx.block.get_submodule(g.linears[0]), stats[g]) for g in groups},
            calls={g.linears[0] + "#": (w.module, w.calls) for g, w in watches.items()}, call_windows=opts.awq_windows)
    total = 0.0
    for g in foldable:
        linears = [ctx.block.get_submodule(n) for n in g.linears]
        originals = [lin.weight.detach().clone() for lin in linears]
        score = _scorer(ctx, watches[g], g.linears)

        def loss_fn(s: torch.Tensor) -> float:
            return score([_Fixed((rtn.fake_int4(W.float() * s, scheme.group_size, scheme.symmetric) / s).to(W.dtype),
                                 lin.bias) for W, lin in zip(originals, linears)])
        s, _ratio, loss = awq.search_scales(stats[g].mean_abs, awq.weight_mean(originals, scheme.group_size),
                                            loss_fn, n_grid=opts.awq_grid, duo_scaling=opts.awq_duo_scaling)
        total += loss
        smoothquant.fold_into_prev(_prev(ctx.block, g), g.prev_kind, s)
        smoothquant.scale_inputs(linears, s)
        stats[g].samples = [x / s for x in stats[g].samples]
        if stats[g].H is not None:  # the Linears now see x / s
            stats[g].H = stats[g].H / s.unsqueeze(0) / s.unsqueeze(1)
    if clip:
        for g in groups:
            x = None if full_clip else stats[g].sample()
            for n in g.linears:
                lin = ctx.block.get_submodule(n)
                if not n.endswith(_NO_CLIP):
                    if full_clip:
                        max_val = awq.search_clip_full(lin.weight.detach(), stats[g].hessian, scheme.group_size,
                                                       scheme.symmetric,
                                                       n_grid=opts.awq_clip_grid, sweeps=opts.awq_clip_sweeps)
                    else:
                        max_val = awq.search_clip(lin.weight.detach(), x, scheme.group_size, scheme.symmetric,
                                                  n_grid=opts.awq_clip_grid)
                    lin.weight.data = awq.apply_clip(lin.weight.detach(), max_val)
    return {"loss": total}


def _rotated(W: torch.Tensor, block: int | None) -> torch.Tensor:
    return W if block is None else rotation.rotate_weight(W, block)


def _w8a8_module(linear: nn.Linear, codes: torch.Tensor, weight_scale: torch.Tensor, scheme: Scheme,
                 absmax: torch.Tensor | None, smooth: torch.Tensor | None, block: int | None = None) -> W8A8Linear:
    """``absmax``: per-channel absmax of the input as the layer quantizes it (smoothed, rotated)."""
    input_scale = None
    if scheme.static:
        input_scale = P.div_exact(absmax.amax().clamp(min=1e-12), P.INT8_MAX)
    return W8A8Linear(codes, weight_scale, linear.bias, input_scale, smooth, block)


def _group_rotation(scheme: Scheme, arch: ArchSpec, group: SmoothGroup, in_features: int) -> int | None:
    """The Hadamard block shared by every Linear of ``group`` (they share one input), or None."""
    blocks_ = {rotation_of(scheme, arch, n, in_features) for n in group.linears}
    if len(blocks_) > 1:
        raise P.QuantizationError(f"the {arch.name} table rotates only some of {group.linears}, which share one "
                                  f"input; rotate all of them or none")
    return blocks_.pop()


def _gptq_round(ctx: BlockContext, arch: ArchSpec, groups: list[SmoothGroup], scheme: Scheme,
                opts: CalibrationOptions, runtime_smooth: dict[str, torch.Tensor]) -> dict:
    """GPTQ, group after group: each group's Hessian comes from inputs produced by the already-quantized
    earlier layers of the block (the pass stops once the group's input is seen). A rotated group's
    statistics are those of its rotated (and smoothed) input, the one its layers quantize."""
    bits = 4 if scheme.family == "w4a16" else 8
    total = 0.0
    for g in groups:
        first = ctx.block.get_submodule(g.linears[0])
        block, s = _group_rotation(scheme, arch, g, first.in_features), runtime_smooth.get(g.linears[0])
        stats = InputStats(hessian=True, transform=None if block is None else _input_rotation(block, s))
        observe(ctx, {g.linears[0]: (first, stats)})
        H = stats.hessian
        for n in g.linears:
            linear = ctx.block.get_submodule(n)
            W, Hn, absmax = linear.weight.detach(), H, stats.absmax
            if s is not None:  # the layer computes (x / s) @ (W s)^T
                W = W.float() * s
                if block is None:  # (a rotated group's statistics are already of x / s)
                    Hn, absmax = H / s.unsqueeze(0) / s.unsqueeze(1), stats.absmax / s
            res = gptq.gptq(_rotated(W, block), Hn, bits, scheme.group_size or -1, scheme.symmetric,
                            opts.act_order, opts.block_size, opts.percdamp)
            total += res.loss
            if bits == 4:
                module = W4A16Linear(res.codes, res.scales, res.zeros, scheme.group_size, linear.bias)
            else:
                module = _w8a8_module(linear, res.codes, res.scales, scheme, absmax, s, block)
            set_module(ctx.block, n, module)
    return {"loss": total}


def _rtn_round(ctx: BlockContext, arch: ArchSpec, scheme: Scheme, runtime_smooth: dict[str, torch.Tensor],
               absmax: dict[str, torch.Tensor]) -> None:
    """Round every Linear of the block; a static scale of a rotated layer comes from its rotated input,
    observed once the layers before it are quantized."""
    for n, linear in block_linears(ctx.block, arch).items():
        if scheme.family == "w8a8":
            block, s = rotation_of(scheme, arch, n, linear.in_features), runtime_smooth.get(n)
            W = linear.weight.detach().float() * s if s is not None else linear.weight.detach()
            codes, scale = rtn.rtn_int8(_rotated(W, block))
            if block is not None and scheme.static:
                stats = InputStats(transform=_input_rotation(block, s))
                observe(ctx, {n: (linear, stats)})
                absmax[n] = stats.absmax
            module = _w8a8_module(linear, codes, scale, scheme, absmax.get(n), s, block)
        else:
            module = make_linear(scheme, linear)
        set_module(ctx.block, n, module)


def _calibrated(scheme: Scheme, arch: ArchSpec, opts: CalibrationOptions):
    """Transforms (SmoothQuant or AWQ scales folded into the previous op) then rounding (RTN or GPTQ)."""
    def process(ctx: BlockContext) -> dict:
        groups = block_groups(arch)
        runtime_smooth: dict[str, torch.Tensor] = {}   # Linear -> s it divides its input by (unfoldable SQ)
        absmax: dict[str, torch.Tensor] = {}           # Linear -> per-channel absmax of its smoothed input
        info: dict = {}
        if scheme.method.startswith("sq"):
            info |= _smoothquant(ctx, arch, groups, scheme, opts, runtime_smooth, absmax)
        if scheme.method.startswith("awq"):
            info |= _awq(ctx, groups, scheme, opts)
        if scheme.method.endswith("gptq"):
            info |= _gptq_round(ctx, arch, groups, scheme, opts, runtime_smooth)
        else:
            _rtn_round(ctx, arch, scheme, runtime_smooth, absmax)
        return info
    return process


def apply_transforms(model: nn.Module, scheme: str | Scheme, calibration: torch.Tensor,
                     options: CalibrationOptions | None = None, progress: bool = False) -> list[dict]:
    """Only the scheme's equivalence transforms, no rounding: SmoothQuant or AWQ scales folded into the
    previous ops (AWQ without clipping). The model stays float and computes the same function up to float
    error; SmoothQuant scales that nothing can absorb are reported per block (``runtime``), not applied."""
    scheme = parse_scheme(scheme)
    arch = arch_for(model.config.model_type)
    opts = options or CalibrationOptions()
    opts = replace(opts, awq_clip=False)
    if not (scheme.method.startswith("sq") or scheme.method.startswith("awq")):
        raise P.QuantizationError(f"scheme {scheme.name!r} has no transform (only SmoothQuant and AWQ do)")

    def process(ctx: BlockContext) -> dict:
        groups = block_groups(arch)
        runtime: dict[str, torch.Tensor] = {}
        if scheme.method.startswith("sq"):
            _smoothquant(ctx, arch, groups, scheme, opts, runtime, {})
        else:
            _awq(ctx, groups, scheme, opts)
        return {"runtime": sorted(runtime)}
    return run_sequential(model, arch, calibration, process, progress=progress, desc=f"transform {scheme.name}")


def block_processor(scheme: Scheme, arch: ArchSpec, options: CalibrationOptions | None = None):
    """The per-block calibration step for ``scheme``."""
    if scheme.method == "rtn" and scheme.static:
        return _static_rtn(scheme, arch)
    if scheme.method in ("gptq", "awq", "awq+gptq", "sq", "sq+gptq"):
        if scheme.method.startswith("awq") and scheme.family != "w4a16":
            raise P.QuantizationError(f"AWQ applies to 4-bit weights; {scheme.name!r} is {scheme.family}")
        return _calibrated(scheme, arch, options or CalibrationOptions())
    raise P.QuantizationError(f"scheme {scheme.name!r} (method {scheme.method}) is not available yet")


def quantize(model: nn.Module, scheme: str | Scheme, calibration: torch.Tensor | None = None, *,
             device: str | torch.device | None = None, progress: bool = True,
             options: CalibrationOptions | None = None) -> nn.Module:
    """Quantize every Linear of every decoder block of ``model`` in place (``lm_head`` and embeddings stay).

    ``calibration``: token windows ``[n, T]`` (BOS first), needed when ``scheme.needs_calibration``.
    ``device``: where each block is processed during calibration (default: where the model is).
    """
    scheme = parse_scheme(scheme)
    arch = arch_for(model.config.model_type)
    validate(model, arch, scheme)
    if scheme.needs_calibration:
        if calibration is None or len(calibration) == 0:
            raise P.QuantizationError(f"scheme {scheme.name!r} needs calibration windows")
        model.quantarena_calibration = run_sequential(
            model, arch, calibration, block_processor(scheme, arch, options), device=device,
            progress=progress, desc=f"calibrate {scheme.name}")
    else:
        for block in blocks(model, arch):
            for name, lin in block_linears(block, arch).items():
                set_module(block, name, make_linear(scheme, lin, rotation=rotation_of(scheme, arch, name,
                                                                                     lin.in_features)))
    model.quantarena_scheme = scheme.name
    return model
