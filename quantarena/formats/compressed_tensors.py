"""compressed-tensors checkpoints (what vLLM and SGLang load), also quantarena's own save format.

Our QuantLinear buffers already use compressed-tensors names and layouts (see :mod:`quantarena.nn`), so
writing is a copy plus a ``quantization_config`` that describes each group of layers:

* W4A16 -> ``pack-quantized``: ``weight_packed`` int32 [out, in/8], ``weight_scale`` bf16 [out, in/g],
  ``weight_shape`` int64 [2], asymmetric adds ``weight_zero_point`` int32 [out/8, in/g] (packed along out),
  act-order adds ``weight_g_idx``.
* W8A8 -> ``int-quantized``: ``weight`` int8 [out, in], ``weight_scale`` [out, 1]; static activations add
  ``input_scale`` [1]; dynamic per-token activations store nothing.
* FP8 -> ``float-quantized``: ``weight`` e4m3 [out, in], ``weight_scale`` [out, 1], dynamic per-token inputs.
* W8A8 with an online Hadamard rotation (``-rot``) -> the stored weight is already rotated (``W R``) and
  ``quantization_config.transform_config`` holds SpinQuant's "R4" form, which vLLM applies online: a
  ``"hadamard"`` scheme (Sylvester, not randomized; ``head_dim`` = block size, or null for the full size)
  with an ``input`` rotation and the inverse ``weight_input`` rotation (already fused) on the same layers,
  plus the +-1 matrix as ``<first layer>.R4_input.weight`` (one copy: readers share it across layers).
* BF16 (unquantized) -> a plain checkpoint without ``quantization_config``.

Reading (:func:`load`) builds the float skeleton without allocating its Linear weights and puts our modules
in place with the stored tensors: nothing is re-quantized.
"""
from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from .. import primitives as P
from ..nn import BF16Linear, FP8Linear, QuantLinearBase, W4A16Linear, W8A8Linear
from . import FormatError

FORMAT = "compressed-tensors"
SUPPORTED = ("w4a16 (pack-quantized: sym/asym, group/channel), w8a8 (int-quantized: dynamic per-token or "
             "static per-tensor activations, optionally an online Hadamard input rotation), fp8 (float-quantized), "
             "bf16 (plain weights)")
WEIGHTS_FILE = "model.safetensors"
META_FILE = "quantarena.json"
PROBE_TEXT = "Hello world, def f(x): return x"
ROTATION = "R4"  # SpinQuant's name for the online rotation of the down projection's input


# ----------------------------------------------------------------------------- describing modules

def _args(num_bits: int, kind: str, strategy: str, symmetric: bool = True, group_size: int | None = None,
          dynamic: bool = False, actorder: str | None = None, observer: str | None = "minmax") -> dict:
    """One compressed-tensors QuantizationArgs block, with only the keys every reader since 0.9 accepts."""
    return {"num_bits": num_bits, "type": kind, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": actorder,
            "observer": observer, "observer_kwargs": {}}


def scheme_of(name: str, module: nn.Module) -> dict:
    """The compressed-tensors scheme (``weights``, ``input_activations``, ``format``) of one quantized module."""
    if isinstance(module, W4A16Linear):
        channel = module.group_size == module.in_features
        weights = _args(4, "int", "channel" if channel else "group", module.symmetric,
                        None if channel else module.group_size,
                        actorder="group" if module.weight_g_idx is not None else None)
        return {"weights": weights, "input_activations": None, "format": "pack-quantized"}
    if isinstance(module, W8A8Linear):
        if module.smooth_scale is not None:
            raise FormatError(
                f"layer {name} carries a SmoothQuant scale that was not folded into a preceding op "
                f"(smooth_scale); compressed-tensors cannot express it. Export a scheme whose smoothing folds "
                f"(w8a8-sq folds into norms and Linears where the architecture allows) or use w8a8-int8")
        acts = (_args(8, "int", "tensor", observer="minmax") if module.static
                else _args(8, "int", "token", dynamic=True, observer=None))
        return {"weights": _args(8, "int", "channel"), "input_activations": acts, "format": "int-quantized"}
    if isinstance(module, FP8Linear):
        return {"weights": _args(8, "float", "channel"),
                "input_activations": _args(8, "float", "token", dynamic=True, observer=None),
                "format": "float-quantized"}
    raise FormatError(f"layer {name} is a {type(module).__name__}, which {FORMAT} cannot store; supported: {SUPPORTED}")


def _linears(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """(quantized modules by name, names of Linears kept in floating point)."""
    quantized, floating = {}, []
    for name, module in model.named_modules():
        if isinstance(module, BF16Linear) or isinstance(module, nn.Linear):
            floating.append(name)
        elif isinstance(module, QuantLinearBase):
            quantized[name] = module
    return quantized, floating


def matches(name: str, pattern: str) -> bool:
    """compressed-tensors target matching: ``re:REGEX`` (re.match) or an exact module name."""
    return bool(re.match(pattern[3:], name)) if pattern.startswith("re:") else name == pattern


def quantization_config(model: nn.Module) -> dict | None:
    """The ``quantization_config`` block of config.json for ``model`` (None if nothing is quantized).

    Layers with the same scheme share a config group; one group targets ``Linear`` and lists every Linear
    kept in floating point (``lm_head`` at least) under ``ignore``.
    """
    quantized, floating = _linears(model)
    if not quantized:
        return None
    groups: list[tuple[dict, list[str]]] = []
    for name, module in quantized.items():
        scheme = scheme_of(name, module)
        for known, names in groups:
            if known == scheme:
                names.append(name)
                break
        else:
            groups.append((scheme, [name]))
    single = len(groups) == 1
    config_groups = {f"group_{i}": {"targets": ["Linear"] if single else names, **scheme,
                                    "output_activations": None}
                     for i, (scheme, names) in enumerate(groups)}
    formats = {scheme["format"] for scheme, _ in groups}
    try:
        version = metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        version = "0.12.0"
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed",
            "config_groups": config_groups, "ignore": sorted(floating), "kv_cache_scheme": None,
            "quantization_status": "compressed", "global_compression_ratio": None, "version": version}


def _rotations(model: nn.Module) -> dict[str, tuple[int | None, list[str]]]:
    """Transform scheme name -> (``head_dim``: the Hadamard block, None for a layer's full input; layers)."""
    quantized, _ = _linears(model)
    by_size: dict[int | None, list[str]] = {}
    for name, module in quantized.items():
        if isinstance(module, W8A8Linear) and module.rotation is not None:
            head_dim = None if module.rotation == module.in_features else module.rotation
            by_size.setdefault(head_dim, []).append(name)
    return {(ROTATION if len(by_size) == 1 else f"{ROTATION}_{size or 'full'}"): (size, names)
            for size, names in by_size.items()}


def transform_config(model: nn.Module) -> dict | None:
    """The ``transform_config`` of ``model``'s online input rotations (None if it has none)."""
    rotations = _rotations(model)
    if not rotations:
        return None
    groups = {}
    for key, (head_dim, names) in rotations.items():
        apply = [{"targets": names, "location": "input", "inverse": False, "ignore": []},
                 {"targets": names, "location": "weight_input", "inverse": True, "ignore": []}]
        groups[key] = {"type": "hadamard", "apply": apply, "randomize": False, "requires_grad": False,
                       "head_dim": head_dim, "precision": "torch.float32"}
    return {"config_groups": groups}


def check(model: nn.Module) -> None:
    """Raise FormatError (before anything is written) if ``model`` holds a layer this format cannot express."""
    quantized, _ = _linears(model)
    for name, module in quantized.items():
        scheme_of(name, module)
        if isinstance(module, W4A16Linear) and module.weight_zero_point is not None and module.out_features % 8:
            raise FormatError(f"layer {name}: asymmetric int4 zero points pack 8 rows per int32 word, "
                              f"but it has {module.out_features} output features")


def state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Tensors to write: quantized modules verbatim (packed zero points, ``weight_shape`` added), every other
    floating tensor cast to ``dtype``; a tied ``lm_head`` is left out (the config ties it)."""
    quantized, _ = _linears(model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        module = quantized.get(module_name)
        if module is None or leaf == "bias":
            out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        elif leaf == "weight_zero_point":
            out[key] = P.pack_int4_rows(tensor)                                   # [out/8, in/g] int32
        elif leaf != "smooth_scale":
            out[key] = tensor
        if isinstance(module, W4A16Linear) and leaf == "weight_packed":
            out[f"{module_name}.weight_shape"] = torch.tensor([module.out_features, module.in_features])
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    for key, (_, names) in _rotations(model).items():   # the shared +-1 Hadamard block, once
        out[f"{names[0]}.{key}_input.weight"] = quantized[names[0]].hadamard.to(dtype)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- writing

def probe_ids(tokenizer) -> list[int]:
    return list(tokenizer(PROBE_TEXT).input_ids)


def write_tokenizer(tokenizer, folder: Path) -> None:
    """Save ``tokenizer`` and prove the saved files tokenize like the original (see FACTS: a tokenizer saved
    after a GGUF load can come back character by character)."""
    from transformers import AutoTokenizer
    tokenizer.save_pretrained(folder)
    expected = probe_ids(tokenizer)
    got = probe_ids(AutoTokenizer.from_pretrained(folder))
    if got != expected:
        raise FormatError(f"the saved tokenizer does not round-trip (got {got[:8]}..., expected {expected[:8]}...); "
                          f"load the model's tokenizer from its original files and export again")
    (folder / "quantarena_probe.json").write_text(json.dumps({"text": PROBE_TEXT, "ids": expected}))


def write(model: nn.Module, folder: Path, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a complete model folder (config, generation config, weights, tokenizer) into ``folder``,
    which must exist and be empty (callers pass a temporary folder and rename it)."""
    from safetensors.torch import save_file
    check(model)
    qconfig = quantization_config(model)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(dtype).removeprefix("torch.")
    if qconfig is not None:
        config["quantization_config"] = qconfig
        tconfig = transform_config(model)
        if tconfig is not None:
            qconfig["transform_config"] = tconfig
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file(state_dict(model, dtype), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        write_tokenizer(tokenizer, folder)
    meta = {"format": FORMAT, "scheme": getattr(model, "quantarena_scheme", None), "dtype": config["dtype"]}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------- reading

def is_compressed_tensors_folder(folder: Path) -> bool:
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    qconfig = json.loads(config.read_text()).get("quantization_config") or {}
    return qconfig.get("quant_method") == "compressed-tensors"


def read_rotations(qconfig: dict) -> list[tuple[str, int | None, list[str]]]:
    """``(scheme name, head_dim, targets)`` of each online input rotation in ``transform_config``; anything
    quantarena cannot run (other transform types, randomized or output rotations) is refused."""
    rotations = []
    for key, scheme in ((qconfig.get("transform_config") or {}).get("config_groups") or {}).items():
        apply = scheme.get("apply") or []
        kinds = sorted((a.get("location"), bool(a.get("inverse"))) for a in apply)
        targets = [a.get("targets") for a in apply]
        if (scheme.get("type") != "hadamard" or scheme.get("randomize") or
                kinds != [("input", False), ("weight_input", True)] or targets[0] != targets[1] or
                any(a.get("ignore") for a in apply)):
            raise FormatError(f"transform {key!r}: quantarena runs only online Hadamard rotations of a layer's "
                              f"input with the weight already rotated (SpinQuant R4 form); serve this folder "
                              f"with vLLM instead")
        rotations.append((key, scheme.get("head_dim"), list(targets[0])))
    return rotations


def _module_from(name: str, scheme: dict, tensors: dict[str, torch.Tensor], linear: nn.Linear,
                 rotation: int | None = None) -> nn.Module:
    """Our module for ``name`` from its stored tensors (pops what it uses from ``tensors``); ``rotation``:
    the Hadamard block of the layer's online input rotation."""
    weights, acts, fmt = scheme.get("weights") or {}, scheme.get("input_activations"), scheme.get("format")
    take = lambda leaf: tensors.pop(f"{name}.{leaf}", None)  # noqa: E731
    bias = take("bias")
    out_features, in_features = linear.out_features, linear.in_features
    kind, bits = weights.get("type"), weights.get("num_bits")
    try:
        if fmt == "pack-quantized" and kind == "int" and bits == 4 and acts is None:
            take("weight_shape")
            codes = P.unpack_int4(take("weight_packed"), in_features)
            zero_point = take("weight_zero_point")
            zeros = None if weights.get("symmetric", True) else P.unpack_int4_rows(zero_point, out_features)
            group = weights.get("group_size") if weights.get("strategy") == "group" else -1
            return W4A16Linear(codes, take("weight_scale"), zeros, group, bias, take("weight_g_idx"))
        if fmt == "int-quantized" and kind == "int" and bits == 8 and acts and acts.get("type") == "int" \
                and weights.get("strategy") == "channel" and acts.get("strategy") in ("token", "tensor"):
            module = W8A8Linear(take("weight"), take("weight_scale"), bias, take("input_scale"), rotation=rotation)
            if module.static != (acts["strategy"] == "tensor"):
                raise FormatError(f"layer {name}: input_scale does not match its {acts['strategy']} activations")
            return module
        if rotation is not None:
            raise FormatError(f"layer {name}: quantarena rotates the input of int8 W8A8 layers only")
        if fmt == "float-quantized" and kind == "float" and bits == 8 and weights.get("strategy") == "channel":
            return FP8Linear(take("weight"), take("weight_scale"), bias)
    except (AttributeError, TypeError, RuntimeError) as e:   # a tensor missing or of the wrong shape
        raise FormatError(f"layer {name}: stored tensors do not match its quantization config ({e})") from None
    raise FormatError(f"layer {name}: quantarena cannot run compressed-tensors scheme {scheme!r} on its own "
                      f"modules (it reads {SUPPORTED}); serve this folder with vLLM instead")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The float model with parameters on the meta device (buffers such as rotary tables stay real)."""
    from transformers import AutoModelForCausalLM
    try:
        from accelerate import init_empty_weights
    except ImportError:                                           # pragma: no cover - accelerate is optional
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Reload a compressed-tensors folder into our QuantLinear modules without re-quantizing.

    Returns ``(model, tokenizer or None)``; ``model.quantarena_scheme`` is restored when we wrote the folder.
    """
    from transformers import AutoConfig, AutoTokenizer
    from ..models import ModelError, _check_tokenizer, arch_for, set_module
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    qconfig = raw.get("quantization_config") or {}
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch_for(config.model_type)
    groups = list((qconfig.get("config_groups") or {}).values())
    ignore = qconfig.get("ignore") or []
    tensors = _read_tensors(folder)
    rotations = read_rotations(qconfig)
    for key, _, targets in rotations:
        for target in targets:
            tensors.pop(f"{target}.{key}_input.weight", None)   # the +-1 matrix: rebuilt from the config
    model = _skeleton(config, dtype)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(matches(name, p) for p in ignore):
            continue
        scheme = next((g for g in groups if any(t == "Linear" or matches(name, t) for t in g.get("targets", []))),
                      None)
        rotation = next((head_dim or module.in_features for _, head_dim, targets in rotations
                         if any(matches(name, t) for t in targets)), None)
        if scheme is None and rotation is not None:
            raise FormatError(f"layer {name}: transform_config rotates it, but it is not quantized")
        if scheme is not None:
            set_module(model, name, _module_from(name, scheme, tensors, module, rotation))
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ModelError(f"{folder} lacks tensors for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    model.eval()
    tokenizer = None
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        probe = folder / "quantarena_probe.json"
        if probe.exists():
            _check_tokenizer(tokenizer, json.loads(probe.read_text())["ids"])
    meta = folder / META_FILE
    if meta.exists():
        model.quantarena_scheme = json.loads(meta.read_text()).get("scheme")
    return model, tokenizer
