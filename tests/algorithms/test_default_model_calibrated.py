"""The calibrated algorithms on the real default model, lean (2 calibration windows of 256 tokens, 768
evaluation tokens): GPTQ and AWQ beat RTN and SmoothQuant beats plain W8A8, by perplexity and by KLD.
The full-size numbers are in benchmarks/results/cpu-calibration.json."""
import pytest

from quantarena.compare import EvalSettings, compare


@pytest.mark.slow
def test_calibrated_beat_uncalibrated_on_default_model():
    settings = EvalSettings(seq_len=256, tokens=768, calib_windows=2)
    result = compare("default", ["w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a8-int8", "w8a8-sq"], settings,
                     progress=False, log=lambda s: None)
    rows = {r["scheme"]: r for r in result["rows"]}
    for better, worse in [("w4a16-gptq", "w4a16-rtn"), ("w4a16-awq", "w4a16-rtn"), ("w8a8-sq", "w8a8-int8")]:
        assert rows[better]["ppl"] < rows[worse]["ppl"], (rows[better], rows[worse])
        assert rows[better]["kld"] < rows[worse]["kld"], (rows[better], rows[worse])
    assert rows["w8a8-sq"]["delta_pct"] < 3.0
