"""Quantization schemes as small frozen, versioned dataclasses, and the scheme-string grammar.

Grammar: ``BASE[-OPTION...]`` where BASE is one of :data:`BASES` and options are
``-g32|-g64|-g128|-gN`` (group size; ``-ch`` for per-channel), ``-asym``/``-sym``,
``-static`` (calibrated per-tensor activation scale), ``-a0.5`` (SmoothQuant alpha) and ``-rot``/``-rotN``
(W8A8: online Hadamard rotation of the down projection's input, full or block-diagonal with N-blocks).
Examples: ``w4a16-rtn``, ``w4a16-rtn-g64-asym``, ``w8a8-int8-static``, ``w8a8-sq-a0.6``, ``w8a8-sq-rot``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

SCHEME_VERSION = 1


class SchemeError(ValueError):
    """Unknown or malformed scheme string."""


@dataclass(frozen=True)
class Scheme:
    """What to do to every Linear of a model.

    family: ``bf16`` | ``w4a16`` | ``w8a8`` | ``fp8``  (the storage/compute format)
    method: ``none`` | ``rtn`` | ``gptq`` | ``awq`` | ``awq+gptq`` | ``sq`` | ``sq+gptq`` (how weights are found)
    """
    base: str
    family: str
    method: str
    weight_bits: int
    activation_bits: int
    group_size: int | None = None   # int4 only; -1 = per-channel
    symmetric: bool = True
    static: bool = False            # w8a8: calibrated per-tensor activation scale instead of dynamic per-token
    alpha: float | None = None      # SmoothQuant migration strength
    rotation: int | None = None     # w8a8: online Hadamard of the ArchSpec's rotated Linears; -1 = full, N = blocks
    version: int = SCHEME_VERSION

    @property
    def name(self) -> str:
        """Canonical scheme string (round-trips through :func:`parse_scheme`)."""
        parts = [self.base]
        default = BASES[self.base]
        if self.group_size != default.group_size:
            parts.append("ch" if self.group_size == -1 else f"g{self.group_size}")
        if self.symmetric != default.symmetric:
            parts.append("sym" if self.symmetric else "asym")
        if self.static:
            parts.append("static")
        if self.alpha != default.alpha:
            parts.append(f"a{self.alpha:g}")
        if self.rotation is not None:
            parts.append("rot" if self.rotation == -1 else f"rot{self.rotation}")
        return "-".join(parts)

    @property
    def needs_calibration(self) -> bool:
        return self.static or self.method not in ("none", "rtn")

    def __str__(self) -> str:
        return self.name


BASES: dict[str, Scheme] = {
    s.base: s for s in [
        Scheme("bf16", "bf16", "none", 16, 16),
        Scheme("w4a16-rtn", "w4a16", "rtn", 4, 16, group_size=128),
        Scheme("w4a16-gptq", "w4a16", "gptq", 4, 16, group_size=128),
        Scheme("w4a16-awq", "w4a16", "awq", 4, 16, group_size=128),
        Scheme("w4a16-awq+gptq", "w4a16", "awq+gptq", 4, 16, group_size=128),
        Scheme("w8a8-int8", "w8a8", "rtn", 8, 8),
        Scheme("w8a8-sq", "w8a8", "sq", 8, 8, alpha=0.5),
        Scheme("w8a8-sq+gptq", "w8a8", "sq+gptq", 8, 8, alpha=0.5),
        Scheme("fp8", "fp8", "rtn", 8, 8),
    ]
}

# Which families accept which options.
_ALLOWED = {
    "bf16": set(),
    "w4a16": {"group", "sym"},
    "w8a8": {"static", "alpha", "rotation"},
    "fp8": set(),
}


def valid_schemes() -> str:
    """A one-line description of valid scheme strings, for error messages."""
    return ", ".join(BASES) + " (options: -g32/-g64/-g128/-ch, -asym, -static, -a0.5, -rot/-rot128)"


def parse_scheme(text: str | Scheme) -> Scheme:
    """Parse a scheme string such as ``w4a16-rtn-g64-asym`` into a :class:`Scheme`."""
    if isinstance(text, Scheme):
        return text
    text = text.strip().lower()
    base = max((b for b in BASES if text == b or text.startswith(b + "-")), key=len, default=None)
    if base is None:
        raise SchemeError(f"unknown scheme {text!r}; valid schemes: {valid_schemes()}")
    scheme = BASES[base]
    allowed = _ALLOWED[scheme.family]
    rest = text[len(base):].split("-")[1:]
    for opt in rest:
        if m := re.fullmatch(r"g(\d+)", opt):
            kind, scheme = "group", replace(scheme, group_size=int(m.group(1)))
        elif opt == "ch":
            kind, scheme = "group", replace(scheme, group_size=-1)
        elif opt in ("asym", "sym"):
            kind, scheme = "sym", replace(scheme, symmetric=(opt == "sym"))
        elif opt == "static":
            kind, scheme = "static", replace(scheme, static=True)
        elif m := re.fullmatch(r"rot(\d*)", opt):
            kind, scheme = "rotation", replace(scheme, rotation=int(m.group(1)) if m.group(1) else -1)
        elif m := re.fullmatch(r"a(\d*\.?\d+)", opt):
            kind, scheme = "alpha", replace(scheme, alpha=float(m.group(1)))
        else:
            raise SchemeError(f"unknown option {opt!r} in scheme {text!r}; valid schemes: {valid_schemes()}")
        if kind not in allowed or (kind == "alpha" and BASES[base].alpha is None):
            raise SchemeError(f"option {opt!r} does not apply to {base!r}; valid schemes: {valid_schemes()}")
    if scheme.group_size is not None and scheme.group_size != -1 and scheme.group_size <= 0:
        raise SchemeError(f"group size must be positive in {text!r}")
    if scheme.rotation not in (None, -1) and (scheme.rotation < 2 or scheme.rotation & (scheme.rotation - 1)):
        raise SchemeError(f"Hadamard block must be a power of two >= 2, got {scheme.rotation} in {text!r}")
    if scheme.alpha is not None and not 0.0 <= scheme.alpha <= 1.0:
        raise SchemeError(f"SmoothQuant alpha must be in [0, 1], got {scheme.alpha} in {text!r}")
    return scheme


def parse_schemes(text: str) -> list[Scheme]:
    """Comma-separated list of scheme strings."""
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise SchemeError(f"no scheme given; valid schemes: {valid_schemes()}")
    return [parse_scheme(t) for t in items]
