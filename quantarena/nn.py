"""Quantized Linear modules. Each holds the real codes and scales (never fake-quantized floats)
and computes through :mod:`quantarena.kernels.ops`.

Buffer names follow compressed-tensors (``weight_packed``, ``weight_scale``, ``weight_zero_point``,
``weight_g_idx``, ``input_scale``) so export is a rename-free copy.
"""
from __future__ import annotations

import torch
from torch import nn

from . import primitives as P
from .algorithms.rotation import hadamard, resolve_block, rotate, rotate_weight
from .kernels import ops, reference


class QuantLinearBase(nn.Module):
    """Common parts: shapes, optional bias, byte accounting."""

    in_features: int
    out_features: int

    def _init_common(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight_bytes(self) -> int:
        """Bytes of weights and their quantization parameters (what a checkpoint stores)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers()
                   if b is not None and n != "bias" and n not in self._non_persistent_buffers_set)

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BF16Linear(QuantLinearBase):
    """Weights stored in bfloat16; compute in the activation dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._init_common(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "BF16Linear":
        return cls(linear.weight, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


class W4A16Linear(QuantLinearBase):
    """int4 group-wise weights (canonical packed layout, bf16 scales), 16-bit activations."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = codes.shape
        group_size = in_features if group_size == -1 else group_size
        P.check_group_size(in_features, group_size)
        self._init_common(in_features, out_features, bias)
        self.group_size = group_size
        self.symmetric = zeros is None  # symmetric weights carry no zero points
        self.register_buffer("weight_packed", P.pack_int4(codes))                  # [out, in/8] int32
        self.register_buffer("weight_scale", scales.detach().to(torch.bfloat16))   # [out, in/g]
        self.register_buffer("weight_zero_point", None if self.symmetric else zeros.to(torch.int8))
        self.register_buffer("weight_g_idx", None if g_idx is None else g_idx.to(torch.int32))
        self.register_buffer("l2_next_words", None, persistent=False)   # the next linear's TILED words and
        self.l2_next_meta = (0, 0, 0)   # its (out_features, group size, L2 budget): see chain_l2_prefetch

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True) -> "W4A16Linear":
        """Round-to-nearest."""
        q, s, z = P.quantize_int4(linear.weight.detach(), group_size, symmetric)
        return cls(q, s, None if symmetric else z, group_size, linear.bias)

    # --- the serving layout: the weight held only in the tensor-core kernel's TILED words

    @property
    def kernel_layout(self) -> bool:
        """True after ``to_kernel_layout``: the canonical codes are not held, only the kernel's words."""
        return self.weight_packed is None

    def to_kernel_layout(self) -> "W4A16Linear":
        """Hold the weight only in the W4A16 tensor-core kernel's TILED layout (``weight_tiled``, not saved) and
        drop the canonical ``weight_packed``: a server keeps one copy of the 4-bit weights instead of two (the
        canonical codes plus the layout the fast kernels build from them). Lossless: ``packed()``, ``codes()``,
        ``dequantize()``, ``state_dict()`` and ``to_canonical_layout()`` rebuild the canonical codes bit for bit, and
        ``load_state_dict`` takes a canonical checkpoint.
        Needs K and the group size divisible by 128 and no act-order ``g_idx``."""
        from .kernels.w4a16_layout import dot_tiled_from_canonical

        if self.kernel_layout:
            return self
        if self.in_features % 128 or self.group_size % 128:
            raise ValueError(f"the kernel layout needs in_features and group_size divisible by 128, got "
                             f"{self.in_features} and {self.group_size}")
        if ops.act_order_perm(self.weight_g_idx, self.group_size, self.in_features) is not None:
            raise ValueError("the kernel layout has no act-order (g_idx) support; keep the canonical layout")
        tiled = dot_tiled_from_canonical(self.weight_packed)
        self._buffers["weight_packed"] = None
        self.register_buffer("weight_tiled", tiled, persistent=False)
        return self

    def to_canonical_layout(self) -> "W4A16Linear":
        """Undo ``to_kernel_layout`` (and drop this linear's L2 chain link, see ``chain_l2_prefetch``)."""
        self.l2_next_words, self.l2_next_meta = None, (0, 0, 0)
        if self.kernel_layout:
            self._buffers["weight_packed"] = self.packed()
            del self._buffers["weight_tiled"]
        return self

    def packed(self) -> torch.Tensor:
        """The canonical packed codes ``[out, in/8]`` (rebuilt from the kernel layout when that is all it holds)."""
        if not self.kernel_layout:
            return self.weight_packed
        from .kernels.w4a16_layout import canonical_from_dot_tiled

        return canonical_from_dot_tiled(self.weight_tiled, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:   # a checkpoint always holds the canonical codes
            destination[prefix + "weight_packed"] = self.packed()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_packed"
        if self.kernel_layout and key in state_dict:   # a checkpoint's canonical codes, into the kernel layout
            from .kernels.w4a16_layout import dot_tiled_from_canonical

            packed = state_dict.pop(key)
            if packed.shape != (self.out_features, self.in_features // 8):
                raise RuntimeError(f"{key}: shape {tuple(packed.shape)} does not match "
                                   f"{(self.out_features, self.in_features // 8)}")
            self.weight_tiled.copy_(dot_tiled_from_canonical(packed.to(self.weight_tiled.device)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_bytes(self) -> int:
        return super().weight_bytes() + (self.out_features * self.in_features // 2 if self.kernel_layout else 0)

    def codes(self) -> torch.Tensor:
        return P.unpack_int4(self.packed(), self.in_features)

    def dequantize(self) -> torch.Tensor:
        return reference.w4a16_dequant(self.packed(), self.weight_scale, self.weight_zero_point,
                                       self.group_size, self.in_features, self.weight_g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_layout:
            return ops.w4a16_linear_tiled(x, self.weight_tiled, self.weight_scale, self.weight_zero_point,
                                          self.group_size, self.out_features, self.bias, self._l2_next())
        return ops.w4a16_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                self.group_size, self.bias, self.weight_g_idx)

    def forward_gated(self, x: torch.Tensor, row_ss: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """``silu(gate) * up`` for a layer whose output rows interleave an MLP's gate and up projections (row 2j
        gate j, 2j+1 up j; ``reference.interleave_gate_up``): [..., out_features / 2]. In the kernel layout the
        tensor-core kernel's epilogue computes it from the float32 sums (one launch, one rounding); otherwise the
        layer's output, then the gate in float32. ``row_ss`` (kernel layout only): x is the first output of the
        previous linear's :meth:`forward_res_norm`, and ``(ss, eps)`` finishes that RMSNorm here."""
        if self.kernel_layout:
            return ops.w4a16_linear_tiled(x, self.weight_tiled, self.weight_scale, self.weight_zero_point,
                                          self.group_size, self.out_features, self.bias, self._l2_next(),
                                          gated=True, row_ss=row_ss)
        if row_ss is not None:
            raise ValueError("row_ss (the second half of a split RMSNorm) needs the kernel layout")
        return reference.silu_mul_interleaved(self(x)).to(x.dtype)

    def forward_res_norm(self, x: torch.Tensor, residual: torch.Tensor,
                         norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This layer's output added to ``residual``, with the first half of the RMSNorm that follows (kernel
        layout only): ``(x_new * norm_weight, x_new, ss)``, ``ss`` the float32 squares of x_new per column tile.
        The next W4A16 linear finishes the norm with ``row_ss=(ss, eps)`` (``ops.w4a16_res_norm_linear_tiled``)."""
        if not self.kernel_layout:
            raise ValueError("forward_res_norm needs the kernel layout (to_kernel_layout())")
        return ops.w4a16_res_norm_linear_tiled(x, residual, norm_weight, self.weight_tiled, self.weight_scale,
                                               self.weight_zero_point, self.group_size, self.out_features, self.bias,
                                               self._l2_next())

    def _l2_next(self) -> tuple | None:
        """The next linear's weight and plan for the L2 chain (see :func:`chain_l2_prefetch`), or None."""
        return None if self.l2_next_words is None else (self.l2_next_words, *self.l2_next_meta)

    def forward_normed(self, x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor,
                       eps: float = 1e-5, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block's residual add, RMSNorm and this linear: returns ``(out, x + delta)`` where ``out`` is
        this layer (``gated``: :meth:`forward_gated`) applied to ``rms_norm(x + delta) * norm_weight`` (``delta``
        None: x itself). In the kernel layout on CUDA, at the tensor-core kernel's M, one launch
        (``ops.w4a16_norm_linear_tiled``); otherwise the separate ops."""
        if self.kernel_layout:
            return ops.w4a16_norm_linear_tiled(x, delta, norm_weight, eps, self.weight_tiled, self.weight_scale,
                                               self.weight_zero_point, self.group_size, self.out_features, self.bias,
                                               self._l2_next(), gated=gated)
        y, x = reference.add_rms_norm(x, delta, norm_weight, eps)
        return (self.forward_gated(y) if gated else self(y)), x

    def norm_fold_pays(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_normed` on an input shaped like ``x`` is one launch that beats the separate norm
        and linear (the kernel layout, and ``ops.w4a16_norm_fold_pays`` for its rows)."""
        return self.kernel_layout and ops.w4a16_norm_fold_pays(x.numel() // self.in_features, self.out_features,
                                                              self.in_features, self.group_size, x)

    def extra_repr(self) -> str:
        layout = ", layout=kernel" if self.kernel_layout else ""
        return super().extra_repr() + f", group_size={self.group_size}, symmetric={self.symmetric}{layout}"


def chain_l2_prefetch(linears: list[nn.Module], budget: int) -> int:
    """In the order the linears run (a decode step; the last one followed by the first, as the step repeats),
    let each W4A16 linear in the kernel layout ask the L2 for up to ``budget`` bytes of the next one's weight
    once its kernel is done (:mod:`.kernels.l2_chain`). ``budget`` 0 removes the chain. Values are unchanged.
    Returns the number of linked pairs. Call it again after changing a linear's layout or moving the model
    (a move copies each buffer on its own)."""
    if budget < 0:
        raise ValueError(f"the L2 prefetch budget must be >= 0 bytes, got {budget}")
    linked = 0
    for this, nxt in zip(linears, linears[1:] + linears[:1]):
        if not isinstance(this, W4A16Linear):
            continue
        ok = budget > 0 and isinstance(nxt, W4A16Linear) and this.kernel_layout and nxt.kernel_layout and nxt is not this
        # the next weight as a non-persistent buffer (shared storage, not saved; a buffer, not a submodule, as the
        # chain is circular), so one compiled graph serves every block
        this.l2_next_words = nxt.weight_tiled if ok else None
        this.l2_next_meta = (nxt.out_features, nxt.group_size, budget) if ok else (0, 0, 0)
        linked += ok
    return linked


def to_kernel_layout(model: nn.Module) -> int:
    """Put every ``W4A16Linear`` of ``model`` that allows it in the serving layout (``to_kernel_layout``);
    returns how many were converted. The others keep the canonical layout."""
    done = 0
    for module in model.modules():
        if isinstance(module, W4A16Linear) and not module.kernel_layout:
            try:
                module.to_kernel_layout()
            except ValueError:
                continue
            done += 1
    return done


class W8A8Linear(QuantLinearBase):
    """Per-channel int8 weights; int8 activations, dynamic per-token or static per-tensor (``input_scale``).

    ``smooth_scale`` [in] is an optional SmoothQuant divisor applied to activations inside the
    activation-quant step, for layers whose smoothing cannot be folded into a preceding op.
    ``rotation`` (a Hadamard block size): the stored weight is ``(W s) R`` and the input is rotated online,
    ``(x / s) R``, before it is quantized (:mod:`quantarena.algorithms.rotation`); ``hadamard`` holds the
    +-1 block (not saved: the checkpoint's config describes it).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, smooth_scale: torch.Tensor | None = None,
                 rotation: int | None = None):
        super().__init__()
        self._init_common(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.to(torch.int8))                           # [out, in]
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))       # [out, 1]
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        self.register_buffer("smooth_scale", None if smooth_scale is None else smooth_scale.float())
        self.rotation = None if rotation is None else resolve_block(self.in_features, rotation)
        self.register_buffer("hadamard", None if rotation is None else hadamard(self.rotation, device=weight.device),
                             persistent=False)                                          # [b, b] +-1

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: torch.Tensor | None = None,
                   smooth_scale: torch.Tensor | None = None, rotation: int | None = None) -> "W8A8Linear":
        """Round-to-nearest; ``rotation`` (block size, -1 = full) rotates the weight first."""
        w = linear.weight.detach()
        P.check_finite(w, "weight")
        if smooth_scale is not None:
            w = w * smooth_scale.to(w.dtype)  # the activation is divided by s, so the weight carries s
        if rotation is not None:
            w = rotate_weight(w, resolve_block(w.shape[1], rotation))
        q, s = P.quantize_int8(w, "channel")
        return cls(q, s, linear.bias, input_scale, smooth_scale, rotation)

    @property
    def static(self) -> bool:
        return self.input_scale is not None

    def dequantize(self) -> torch.Tensor:
        """The float weight the layer computes with, in the input's own basis (rotation and smoothing undone)."""
        w = P.dequantize_int8(self.weight, self.weight_scale)
        if self.hadamard is not None:
            w = rotate(w.double(), self.hadamard, torch.float64).float()  # R is symmetric and orthonormal
        return w if self.smooth_scale is None else w / self.smooth_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.w8a8_linear(x, self.weight, self.weight_scale, self.input_scale, self.smooth_scale, self.bias,
                               self.hadamard)

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``self(silu(gate) * up)`` for ``gate_up = [gate | up]``, the SiLU-mul fused into the activation
        quantization (float32, not rounded to the activation dtype first)."""
        if self.hadamard is not None:  # the online rotation has no fused kernel
            return self(reference.silu_mul(gate_up).to(gate_up.dtype))
        return ops.w8a8_silu_mul_linear(gate_up, self.weight, self.weight_scale, self.input_scale,
                                        self.smooth_scale, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static={self.static}" + (f", rotation={self.rotation}" if self.rotation else "")


class FP8Linear(QuantLinearBase):
    """Per-row fp8 e4m3 weights, dynamic per-token fp8 activations."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._init_common(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.to(P.FP8_DTYPE))
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "FP8Linear":
        w = linear.weight.detach()
        P.check_finite(w, "weight")
        q, s = P.quantize_fp8(w, "row")
        return cls(q, s, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return P.dequantize_fp8(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``self(silu(gate) * up)`` for ``gate_up = [gate | up]``, fused as in :class:`W8A8Linear`."""
        return ops.fp8_silu_mul_linear(gate_up, self.weight, self.weight_scale, self.bias)


QUANT_LINEARS = (BF16Linear, W4A16Linear, W8A8Linear, FP8Linear)
