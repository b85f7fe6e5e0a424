"""``quantize(model, scheme, calibration)``: the single entry point that turns a float model into a
quantized one, in place.

Round-to-nearest schemes need no data. Schemes that need calibration (static activation
scales, GPTQ, AWQ, SmoothQuant) run block by block through :mod:`.calibration.sequential`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import primitives as P
from .calibration.sequential import BlockContext, run_sequential
from .models import ArchSpec, arch_for, blocks, set_module
from .nn import BF16Linear, FP8Linear, W4A16Linear, W8A8Linear
from .schemes import Scheme, parse_scheme


def make_linear(scheme: Scheme, linear: nn.Linear, input_scale: torch.Tensor | None = None,
                smooth_scale: torch.Tensor | None = None) -> nn.Module:
    """Round-to-nearest quantized replacement of ``linear`` for ``scheme``."""
    if scheme.family == "bf16":
        return BF16Linear.from_float(linear)
    if scheme.family == "w4a16":
        return W4A16Linear.from_float(linear, scheme.group_size, scheme.symmetric)
    if scheme.family == "w8a8":
        return W8A8Linear.from_float(linear, input_scale=input_scale, smooth_scale=smooth_scale)
    if scheme.family == "fp8":
        return FP8Linear.from_float(linear)
    raise P.QuantizationError(f"no module for scheme family {scheme.family!r}")


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Linear]:
    return {name: block.get_submodule(name) for name in arch.linears}


def validate(model: nn.Module, arch: ArchSpec, scheme: Scheme) -> None:
    """Fail before touching anything: non-finite weights, group sizes that do not divide."""
    for i, block in enumerate(blocks(model, arch)):
        for name, lin in block_linears(block, arch).items():
            if not isinstance(lin, nn.Linear):
                raise P.QuantizationError(f"layer {i}.{name} is already quantized ({type(lin).__name__})")
            P.check_finite(lin.weight, f"weight of layer {i}.{name}")
            if scheme.family == "w4a16":
                P.check_group_size(lin.in_features, scheme.group_size, f"layer {i}.{name}")


def _input_absmax_hooks(linears: dict[str, nn.Module], stats: dict[str, torch.Tensor]):
    def hook(name):
        def fn(_mod, args):
            x = args[0].detach()
            amax = x.abs().amax().float()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
        return fn
    return [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]


def _static_rtn(scheme: Scheme, arch: ArchSpec):
    """Per block: observe each Linear's per-tensor input absmax, then quantize with that static scale."""
    def process(ctx: BlockContext) -> dict:
        linears = block_linears(ctx.block, arch)
        stats: dict[str, torch.Tensor] = {}
        handles = _input_absmax_hooks(linears, stats)
        try:
            ctx.forward(keep=False)
        finally:
            for h in handles:
                h.remove()
        for name, lin in linears.items():
            input_scale = stats[name].clamp(min=1e-12) / P.INT8_MAX
            set_module(ctx.block, name, make_linear(scheme, lin, input_scale=input_scale))
        return {}
    return process


def block_processor(scheme: Scheme, arch: ArchSpec):
    """The per-block calibration step for ``scheme``."""
    if scheme.method == "rtn" and scheme.static:
        return _static_rtn(scheme, arch)
    raise P.QuantizationError(f"scheme {scheme.name!r} (method {scheme.method}) is not available yet")


def quantize(model: nn.Module, scheme: str | Scheme, calibration: torch.Tensor | None = None, *,
             device: str | torch.device | None = None, progress: bool = True) -> nn.Module:
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
        run_sequential(model, arch, calibration, block_processor(scheme, arch), device=device,
                       progress=progress, desc=f"calibrate {scheme.name}")
    else:
        for block in blocks(model, arch):
            for name, lin in block_linears(block, arch).items():
                set_module(block, name, make_linear(scheme, lin))
    model.quantarena_scheme = scheme.name
    return model
