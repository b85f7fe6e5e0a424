"""Outlier statistics: exact moments of x / s, smoothing flattens an outlier channel, CLI table + PNG."""
import json

import torch

from quantarena.calibration.data import random_windows
from quantarena.calibration.stats import InputStats
from quantarena.cli import main
from quantarena.models import load_model
from quantarena.outliers import _tensor_kurtosis, outlier_stats


def test_kurtosis_of_scaled_tensor_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) ** 3  # heavy-tailed
    s = torch.rand(8, generator=g) + 0.5
    stats = InputStats(moments=True)
    stats.update(x[:1000])
    stats.update(x[1000:])
    for scale in (None, s):
        y = (x if scale is None else x / scale).double().flatten()
        direct = (((y - y.mean()) ** 4).mean() / y.var(unbiased=False) ** 2 - 3).item()
        assert abs(_tensor_kurtosis(stats, scale) - direct) < 1e-6 * max(1.0, abs(direct))


def test_smoothing_flattens_an_outlier_channel():
    lm = load_model("preset:tiny-llama")
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.post_attention_layernorm.weight[7] = 40.0  # an outlier channel into gate/up
    rows = outlier_stats(lm.model, lm.arch, random_windows(lm.config.vocab_size, 32, 2), progress=False)
    assert len(rows) == 4 * lm.config.num_hidden_layers
    mlp = [r for r in rows if r["layers"] == "gate_proj,up_proj"]
    assert all(r["before"]["ratio"] > 10 and r["after"]["ratio"] < r["before"]["ratio"] / 3 for r in mlp)


def test_cli_outliers(tmp_path, capsys):
    png = tmp_path / "o.png"
    assert main(["outliers", "--model", "preset:tiny-llama", "--calib-windows", "1", "--seq-len", "32",
                 "--quiet", "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] and png.stat().st_size > 1000
