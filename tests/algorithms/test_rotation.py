"""Online Hadamard rotation: the matrices, the rotated layer against the unrotated one, the -rot schemes on
tiny random models of every architecture whose table names a layer to rotate."""
import copy

import pytest
import torch
from torch import nn

from quantarena import primitives as P
from quantarena.algorithms import rotation as R
from quantarena.kernels import reference
from quantarena.models import ARCHS, blocks
from quantarena.nn import W8A8Linear
from quantarena.quantize import quantize
from quantarena.schemes import SchemeError, parse_scheme

from .test_folding import CONFIGS, tiny_model


@pytest.mark.parametrize("size", [2, 8, 128])
def test_hadamard_orthonormal_symmetric(size):
    H = R.hadamard(size, torch.float64)
    assert torch.equal(H, H.t()) and set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.t(), size * torch.eye(size, dtype=torch.float64))
    Q = R.rotate(torch.eye(size, dtype=torch.float64), H, torch.float64)  # the normalized matrix itself
    assert torch.allclose(Q @ Q.t(), torch.eye(size, dtype=torch.float64), atol=1e-12)


def test_same_matrix_as_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.transform.utils.hadamard")
    for size in (2, 16, 256):
        assert torch.equal(R.hadamard(size, torch.float64), ct.deterministic_hadamard_matrix(size, torch.float64))


def test_block_diagonal_and_layer_equivalence():
    torch.manual_seed(0)
    x, W = torch.randn(5, 3, 64, dtype=torch.float64), torch.randn(24, 64, dtype=torch.float64)
    H = R.hadamard(16, torch.float64)
    full = torch.block_diag(*[H / 4.0] * 4)
    assert torch.allclose(R.rotate(x, H, torch.float64), x @ full, atol=1e-12)
    for block in (16, 64):
        Hb = R.hadamard(block, torch.float64)
        rotated = R.rotate(x, Hb, torch.float64) @ R.rotate(W, Hb, torch.float64).t()
        assert torch.allclose(rotated, x @ W.t(), atol=1e-10)


def test_bad_blocks_are_one_line_errors():
    with pytest.raises(P.QuantizationError, match="power of two"):
        R.check_block(64, 24)
    with pytest.raises(P.QuantizationError, match="does not divide"):
        R.check_block(96, 64)
    with pytest.raises(P.QuantizationError, match="block-diagonal"):
        R.resolve_block(96, -1)
    assert R.resolve_block(96, 32) == 32 and R.resolve_block(128, -1) == 128
    assert parse_scheme("w8a8-sq-rot").rotation == -1 and parse_scheme("w8a8-sq+gptq-rot128").name == "w8a8-sq+gptq-rot128"
    for bad in ("w8a8-sq-rot100", "w4a16-rtn-rot", "fp8-rot"):
        with pytest.raises(SchemeError):
            parse_scheme(bad)


def test_rotated_w8a8_layer():
    """Same function as the float layer; the outlier channel costs far less than without rotation; the
    module's forward equals the reference kernel on its own stored codes."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=True)
    x = torch.randn(4, 9, 256)
    x[..., 7] *= 50.0
    ref = lin(x)
    plain, rotated = W8A8Linear.from_float(lin), W8A8Linear.from_float(lin, rotation=-1)
    err = lambda m: ((m(x) - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(rotated) < 0.4 * err(plain)
    assert ((rotated.dequantize() - lin.weight).norm() / lin.weight.norm()).item() < 0.01
    assert rotated.weight_bytes() == plain.weight_bytes()          # the +-1 block is not checkpoint data
    again = reference.w8a8_linear(R.rotate(x, R.hadamard(256)), rotated.weight, rotated.weight_scale, bias=lin.bias)
    assert torch.allclose(rotated(x), again, atol=1e-5)
    blockwise = W8A8Linear.from_float(lin, smooth_scale=torch.rand(256) + 0.5, rotation=32)
    assert blockwise.rotation == 32 and err(blockwise) < err(plain)


@pytest.mark.parametrize("arch_name", [a for a in CONFIGS if ARCHS[a].rotated])
def test_rot_schemes_on_every_arch(arch_name):
    model = tiny_model(arch_name)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        for scheme in ("w8a8-sq-rot", "w8a8-sq+gptq-rot64-static"):
            m = quantize(copy.deepcopy(model), scheme, ids, progress=False)
            rotated = {n for b in blocks(m, ARCHS[arch_name]) for n, mod in b.named_modules()
                       if isinstance(mod, W8A8Linear) and mod.rotation}
            assert rotated == set(ARCHS[arch_name].rotated)
            assert ((m(ids).logits - ref).norm() / ref.norm()).item() < 0.1, scheme


def test_rotation_that_does_not_divide_is_refused():
    model = tiny_model("llama")                                       # intermediate size 128
    with pytest.raises(P.QuantizationError, match="does not divide"):
        quantize(model, "w8a8-int8-rot256", progress=False)
