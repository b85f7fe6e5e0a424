"""SmoothQuant and AWQ scales folded into the previous ops leave the float model's outputs unchanged, for
every architecture in the ArchSpec table (tiny random models with outlier channels)."""
import pytest
import torch

from quantarena.calibration.data import random_windows
from quantarena.models import ARCHS, blocks
from quantarena.quantize import CalibrationOptions, apply_transforms, block_groups

SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 16}),
    "phi3": ("phi3", {}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None}),
}


def tiny_model(arch_name: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, extra = CONFIGS[arch_name]
    shapes = {**SHAPES, **extra}
    shapes = {k: v for k, v in shapes.items() if v is not None}
    if model_type == "opt":
        shapes.pop("intermediate_size")
    config = AutoConfig.for_model(model_type, **shapes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    arch = ARCHS[arch_name]
    with torch.no_grad():  # norms with non-trivial weights and a few outlier channels, so folding matters
        for block in blocks(model, arch):
            for g in arch.groups:
                if g.prev and g.prev_kind != "linear":
                    norm = block.get_submodule(g.prev)
                    norm.weight.uniform_(0.5, 1.5)
                    norm.weight[:3] *= 20.0
                    if getattr(norm, "bias", None) is not None:
                        norm.bias.uniform_(-0.1, 0.1)
    return model


def test_every_arch_is_covered():
    assert set(CONFIGS) == set(ARCHS)


@pytest.mark.parametrize("method", ["w8a8-sq", "w8a8-sq alpha search", "w4a16-awq"])
@pytest.mark.parametrize("arch_name", sorted(ARCHS))
def test_fold_keeps_outputs(arch_name, method):
    model = tiny_model(arch_name)
    torch.manual_seed(1)
    calib = random_windows(model.config.vocab_size, 32, 4, seed=2)
    probe = random_windows(model.config.vocab_size, 32, 2, seed=3)
    with torch.no_grad():
        before = model(probe).logits
    norms_before = [p.detach().clone() for p in model.parameters()]
    scheme = method.split()[0] + ("-g32" if "awq" in method else "")
    alpha_search = "alpha search" in method  # alphas scored on the output of the module each group feeds
    infos = apply_transforms(model, scheme, calib, CalibrationOptions(awq_grid=5, awq_windows=2,
                                                                      alpha_search=alpha_search,
                                                                      sq_alphas=(0.3, 0.6)))
    with torch.no_grad():
        after = model(probe).logits
    changed = sum(not torch.equal(a, b) for a, b in zip(norms_before, model.parameters()))
    assert changed > 0, "nothing was folded"
    assert len(infos) == model.config.num_hidden_layers
    err = (after - before).abs().max() / before.abs().max()
    assert err < 1e-4, f"{arch_name} {method}: relative error {err:.2e}"


def test_groups_cover_every_linear():
    for arch in ARCHS.values():
        names = [n for g in block_groups(arch) for n in g.linears]
        assert sorted(names) == sorted(arch.linears)
