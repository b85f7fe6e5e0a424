"""A truncated default model (2 decoder blocks, real vocabulary and tokenizer), loaded once per session:
format tests are about layouts, not depth. ``fresh_blocks`` restores the float blocks before each scheme."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantarena.models import load_model

LAYERS = 2


@pytest.fixture(scope="session")
def small_default():
    lm = load_model("default")
    model = lm.model
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    model.config.layer_types = model.config.layer_types[:LAYERS]
    originals = [copy.deepcopy(block) for block in model.model.layers]

    def fresh():
        model.model.layers = nn.ModuleList(copy.deepcopy(b) for b in originals)
        return lm
    return fresh


@pytest.fixture(scope="session")
def windows(small_default):
    tok = small_default().tokenizer
    text = ["The capital of France is Paris, a city on the Seine.",
            "def f(x):\n    return x * 2  # doubles its argument"]
    ids = [torch.tensor([tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids[:13]) for t in text]
    return torch.stack(ids)  # [2, 14]
