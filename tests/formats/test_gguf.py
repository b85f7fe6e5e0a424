"""GGUF: our block packers agree with the ``gguf`` package's dequantizers, and a whole exported Gemma 3 file
reads back (names, metadata, values) as llama.cpp's converter would have written it."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from quantarena import export
from quantarena import primitives as P
from quantarena.formats import FormatError
from quantarena.formats import gguf as gg
from quantarena.nn import W4A16Linear
from quantarena.quantize import quantize

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def _dequant(data: np.ndarray, kind) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, kind).astype(np.float32))


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_q4_0_is_exact(group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.05
    q, s, z = P.quantize_int4(w, group_size, symmetric=True)
    g = 256 if group_size == -1 else group_size
    got = _dequant(gg.pack_q4_0(q, s.to(torch.bfloat16), g).numpy(), T.Q4_0)
    assert torch.equal(got, P.int4_dequantize(q, s, None, group_size))


def test_q4_1_matches_to_fp16_offset():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.05 + 0.01
    q, s, z = P.quantize_int4(w, 64, symmetric=False)
    got = _dequant(gg.pack_q4_1(q, s.to(torch.bfloat16), z, 64).numpy(), T.Q4_1)
    ours = P.int4_dequantize(q, s, z, 64)
    assert (got - ours).abs().max() <= 1e-3 * ours.abs().max()


def test_q8_0_same_codes_fp16_scale():
    torch.manual_seed(0)
    q, s = P.quantize_int8(torch.randn(8, 128), "channel")
    got = _dequant(gg.pack_q8_0(q, s).numpy(), T.Q8_0)
    assert torch.equal(got, q.float() * s.to(torch.float16).float())


def test_q4_k_reads_back():
    torch.manual_seed(0)
    w = torch.randn(8, 512) * 0.05
    data = gg.quantize_q4_k(w)
    assert data.shape == (8, 2 * 144)
    got = _dequant(data.numpy(), T.Q4_K)
    step = (w.amax(-1) - w.amin(-1)).max() / 15                # a sub-block step is at most range / 15
    assert (got - w).abs().max() <= step
    assert (got - w).pow(2).mean().sqrt() < 0.25 * step


def test_gemma3_file_reads_back(small_default, tmp_path):
    lm = small_default()
    quantize(lm.model, "w4a16-rtn", progress=False)
    path = export.save(lm.model, tmp_path / "m.gguf", format="gguf", tokenizer=lm.tokenizer)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.block_count"].contents() == 2
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == lm.config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == T.Q8_0
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == T.Q4_0
    ours = lm.model.model.layers[1].self_attn.q_proj
    assert isinstance(ours, W4A16Linear)
    assert torch.equal(_dequant(q.data, q.tensor_type).reshape(ours.out_features, -1), ours.dequantize())
    norm = tensors["blk.0.attn_norm.weight"]
    assert torch.equal(torch.from_numpy(np.array(norm.data)), lm.model.model.layers[0].input_layernorm.weight + 1)


@pytest.mark.parametrize("scheme, match", [("fp8", "FP8"), ("w4a16-rtn-g16", "multiple of 32")])
def test_unsupported_scheme_fails_before_writing(scheme, match, tmp_path):
    with pytest.raises(FormatError, match=match):
        export.quantize_and_save("default", scheme, tmp_path / "x.gguf", format="gguf")
    assert os.listdir(tmp_path) == []


def test_other_architecture_is_refused(tmp_path):
    from quantarena.models import load_model
    lm = load_model("preset:tiny-llama")
    with pytest.raises(FormatError, match="gemma3 only"):
        export.save(lm.model, tmp_path / "t.gguf", format="gguf")
    assert os.listdir(tmp_path) == []
