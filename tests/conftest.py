"""Shared fixtures: tiny random Hugging Face model folders (no download) for fast CLI and loader tests."""
from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when a kernel module is first imported,
# which may happen while collecting any test file: set it here, before all of them, on CPU-only machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_hf_folder(path, model_type: str = "llama", nan: bool = False, **overrides):
    """Write a tiny random model of ``model_type`` as a safetensors folder (+ the default model's tokenizer
    is not needed: these folders have none)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    if model_type == "gpt2":
        shapes = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256)
    shapes.update(overrides)
    config = AutoConfig.for_model(model_type, **shapes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if nan:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    return make_hf_folder(tmp_path / "tiny-llama")
