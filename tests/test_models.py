import pytest
import torch

from quantarena import models
from quantarena.atomic import atomic_path
from quantarena.models import ARCHS, ModelError, arch_for, load_model

from .conftest import make_hf_folder


def test_arch_table_covers_the_issue():
    for model_type in ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "opt"]:
        spec = arch_for(model_type)
        for group in spec.groups:
            assert set(group.linears) <= set(spec.linears)
    assert arch_for("gemma3_text").groups[0].prev_kind == "rmsnorm_1p"


def test_unsupported_architecture_names_supported():
    with pytest.raises(ModelError, match="supported: .*llama"):
        arch_for("gpt2")


def test_hf_folder_and_unsupported_folder(tmp_path):
    lm = load_model(str(make_hf_folder(tmp_path / "llama")))
    assert lm.arch.name == "llama" and lm.tokenizer is None
    assert len(models.blocks(lm.model, lm.arch)) == 2
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        load_model(str(make_hf_folder(tmp_path / "gpt2", "gpt2")))


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ModelError, match="not .gguf"):
        load_model(str(tmp_path / "x.bin"))


def test_presets():
    lm = load_model("preset:tiny-llama")
    assert lm.arch.name == "llama" and lm.tokenizer is None
    cfg = models.preset_config("llama-3-8b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads) == (4096, 14336, 8)
    assert models.preset_config("llama-3-70b", num_layers=2).num_hidden_layers == 2
    for name in ["qwen2.5-7b", "mistral-7b"]:
        assert models.preset_config(name).num_hidden_layers > 20
    with pytest.raises(ModelError, match="presets: "):
        load_model("preset:gpt-5")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    def fail(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        atomic_path(tmp_path / "out", fail, is_dir=True)
    assert list(tmp_path.iterdir()) == []
