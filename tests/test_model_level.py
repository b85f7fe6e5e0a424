"""Model-level bounds on the real default model (Gemma 3 270M): perplexity and KL divergence per scheme.

Small evaluation (3 windows of 256 tokens) to keep CI fast; bounds are relative to the unquantized
model on the same windows, with margin over what a full run measures (see README).
"""
import pytest

from quantarena.compare import EvalSettings, compare

# scheme -> (max perplexity increase in %, max KLD)
BOUNDS = {
    "bf16": (1.0, 0.01),
    "w8a8-int8": (8.0, 0.08),
    "fp8": (6.0, 0.05),
    "w8a8-int8-static": (80.0, 0.6),
    "w4a16-rtn": (150.0, 1.2),
}


@pytest.mark.slow
def test_default_model_bounds():
    settings = EvalSettings(seq_len=256, tokens=768, calib_windows=4)
    result = compare("default", list(BOUNDS), settings, progress=False, log=lambda s: None)
    ref = result["reference"]
    assert 5.0 < ref["ppl"] < 60.0  # a real pretrained model on Python documentation
    rows = {r["scheme"]: r for r in result["rows"]}
    for scheme, (max_delta, max_kld) in BOUNDS.items():
        assert rows[scheme]["delta_pct"] < max_delta, rows[scheme]
        assert 0.0 <= rows[scheme]["kld"] < max_kld, rows[scheme]
    # the orderings the README explains
    assert rows["w8a8-int8"]["kld"] < rows["w8a8-int8-static"]["kld"]
    assert max(rows["w8a8-int8"]["kld"], rows["fp8"]["kld"]) < rows["w4a16-rtn"]["kld"]
    assert rows["w4a16-rtn"]["bytes"] < rows["fp8"]["bytes"] < rows["bf16"]["bytes"]
