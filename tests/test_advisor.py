"""advisor: the decision per scenario from shapes, GPU, accuracy rows and measured decode times."""
import json

import pytest

from quantarena import advisor as A
from quantarena.gpus import GPUError
from quantarena.models import preset_config
from quantarena.roofline import shape_from_config

LLAMA3_8B = shape_from_config(preset_config("llama-3-8b"), "llama-3-8b")
LLAMA3_70B = shape_from_config(preset_config("llama-3-70b"), "llama-3-70b")

ROWS = [dict(scheme="bf16", ppl=10.0, kld=0.0, bytes=100), dict(scheme="w4a16-gptq", ppl=10.8, kld=0.05, bytes=30),
        dict(scheme="w4a16-awq", ppl=10.6, kld=0.04, bytes=30), dict(scheme="w8a8-sq", ppl=10.1, kld=0.01, bytes=55),
        dict(scheme="fp8", ppl=10.05, kld=0.008, bytes=55)]


def _advise(**kw):
    kw.setdefault("bench_dir", None)
    return A.advise(LLAMA3_8B, **kw)


def test_small_batch_takes_4bit_large_batch_takes_8bit_on_a100():
    adv = _advise(gpu="A100", batch=[1, 128], context=1024, accuracy_rows=ROWS)
    small, large = adv.rows
    assert A.family(small.scheme) == "w4a16" and small.speedup > 2
    assert "memory-bound" in small.why
    assert A.family(large.scheme) == "w8a8" and "compute-bound" in large.why
    assert "fp8" in small.rejected and "tensor cores" in small.rejected["fp8"]
    assert small.scheme == "w4a16-awq"            # same speed as gptq, lower perplexity
    assert "+6.0%" in small.accuracy and "compressed-tensors" in small.export
    assert all(r.source == "roofline" for r in adv.rows)


def test_accuracy_limit_rejects_schemes():
    adv = _advise(gpu="A100", batch=[1], accuracy_rows=ROWS, max_ppl_increase=2.0)
    row = adv.rows[0]
    assert A.family(row.scheme) == "w8a8"
    assert "limit" in row.rejected["w4a16-gptq"] and "limit" in row.rejected["w4a16-awq"]


def test_memory_case_70b_on_24gb():
    adv = A.advise(LLAMA3_70B, gpu="RTX 4090", batch=[1], bench_dir=None)
    row = adv.rows[0]
    assert row.scheme is None and "nothing fits" in row.why and "2 x RTX-4090" in row.why
    assert "w4a16" in row.why


def test_memory_decides_when_bf16_does_not_fit():
    adv = _advise(gpu="RTX 4090", batch=[16], context=2048)
    row = adv.rows[0]
    assert row.scheme is not None and row.speedup is None and "bf16 needs" in row.why


def test_json_has_crossover_per_pair_and_is_serializable():
    adv = _advise(gpu="H100", batch=[1, 64])
    d = json.loads(json.dumps(adv.to_dict()))
    assert "w4a16 vs w8a8" in d["crossover"] and d["crossover"]["w4a16 vs w8a8"]["batch"] > 1
    assert set(d["crossover"]) == set(d["crossover_ideal"])
    assert d["accuracy"] is None and d["accuracy_note"] == "accuracy not measured"


def test_measured_decode_times_win_over_roofline(tmp_path):
    decode = {"device": "NVIDIA H100 80GB HBM3", "model": "llama-3-8b", "crossover": {"w4a16 vs w8a8": 64},
              "rows": [{"scheme": s, "batch": b, "ms_per_token": t} for s, pts in {
                  "bf16": [(1, 7.0), (64, 12.0)], "w4a16-gptq": [(1, 3.0), (64, 15.0)],
                  "w8a8-sq": [(1, 5.0), (64, 10.0)]}.items() for b, t in pts]}
    path = tmp_path / "h100-decode.json"
    path.write_text(json.dumps(decode))
    adv = _advise(gpu="H100", batch=[1, 32, 64, 512], decode_file=path)
    by_batch = {r.batch: r for r in adv.rows}
    assert by_batch[1].source == "measured" and by_batch[1].ms_per_step["w4a16-gptq"] == 3.0
    assert by_batch[64].scheme == "w8a8-sq" and by_batch[64].source == "measured"
    assert by_batch[512].source == "roofline"
    assert adv.measured_crossover == 64 and "measured decode times" in adv.source
    other = _advise(gpu="H100", batch=[1], decode_file=path, schemes=["bf16", "w4a16-gptq"])
    assert other.rows[0].source == "measured"
    mismatch = A.advise(LLAMA3_70B, gpu="H100", batch=[1], decode_file=path, bench_dir=None)
    assert mismatch.rows[0].source == "roofline" and any("not used" in n for n in mismatch.notes)


def test_benchmark_folder_is_searched_for_the_gpu(tmp_path):
    k, n = 4096, 14336
    rows = [{"op": "bf16", "impl": "cublas", "K": k, "N": n, "M": 1, "us": 2 * k * n / 2.0e12 * 1e6}]
    (tmp_path / "h100-kernels.json").write_text(json.dumps({"rows": rows}))
    adv = _advise(gpu="H100", batch=[1], bench_dir=tmp_path)
    assert "measured" in adv.source and adv.gpu.bandwidth_tbs == pytest.approx(2.0)


def test_interpolate_is_log_linear_inside_range_only():
    pts = [(1, 2.0), (4, 8.0)]
    assert A.interpolate(pts, 2) == pytest.approx(4.0)
    assert A.interpolate(pts, 8) is None and A.interpolate(pts, 4) == 8.0


def test_scenarios_and_errors():
    assert A.scenarios(None, 32, 4096)[0] == [1, 32]
    assert A.scenarios([8, 1, 8], None, 512)[0] == [1, 8]
    with pytest.raises(A.AdviceError, match="not both"):
        A.scenarios([1], 4, 512)
    with pytest.raises(GPUError, match="known GPUs"):
        _advise(gpu="TPU v5")
    with pytest.raises(A.AdviceError, match="positive"):
        _advise(gpu="H100", batch=[0])


def test_accuracy_table_is_relative_to_bf16():
    t = A.accuracy_table(ROWS)
    assert t["bf16"]["ppl_increase_pct"] == 0 and t["w4a16-gptq"]["ppl_increase_pct"] == pytest.approx(8.0)


def test_format_table_mentions_everything():
    text = A.format_table(_advise(gpu="A100", batch=[1, 128], accuracy_rows=ROWS))
    for word in ("A100-80GB", "crossover", "memory", "w8a8 overtakes w4a16", "accuracy"):
        assert word in text


def test_preset_skips_accuracy_and_says_so():
    adv = A.advise_model("preset:llama-3-8b", gpu="H100", batch=[1], bench_dir=None)
    assert adv.accuracy is None and "random weights" in adv.accuracy_note
    assert adv.model == "llama-3-8b"


def test_tiny_model_is_launch_bound_and_default_limit_applies():
    from quantarena.roofline import ModelShape
    gemma = ModelShape("gemma-3-270m", 640, 2048, 18, 4, 1, 256, 262144, tied_embeddings=True,
                       sliding_window=512, sliding_layers=15)
    rows = [dict(scheme="bf16", ppl=12.9, delta_pct=0.0, kld=0.0),
            dict(scheme="w4a16-rtn", ppl=23.3, delta_pct=80.5, kld=0.68),
            dict(scheme="fp8", ppl=13.1, delta_pct=1.7, kld=0.02)]
    adv = A.advise(gemma, gpu="H100", batch=[1], accuracy_rows=rows, schemes=["bf16", "w4a16-rtn", "fp8"],
                   bench_dir=None, probe=False)
    row = adv.rows[0]
    assert "launch-bound" in row.why and "lm_head" in row.why
    assert "80.5% perplexity > 10% limit" in row.rejected["w4a16-rtn"]
    assert any("default" in n for n in adv.notes)


def test_measured_kernels_drive_the_decision_and_slow_kernels_are_flagged(tmp_path):
    rows = [{"op": op, "impl": "cublas" if op == "bf16" else "quantarena", "K": lin.in_features,
             "N": lin.out_features, "M": m, "us": us}
            for op, us in (("bf16", 40.0), ("w4a16", 200.0), ("w8a8", 25.0))
            for lin in LLAMA3_8B.linears(fused=False) for m in (1, 64)]
    path = tmp_path / "h100-kernels.json"
    path.write_text(json.dumps({"rows": rows}))
    adv = _advise(gpu="H100", batch=[1, 16], kernels_file=path, schemes=["bf16", "w4a16-gptq", "w8a8-sq"])
    assert all(A.family(r.scheme) == "w8a8" for r in adv.rows)          # the slow measured W4A16 loses
    assert "GEMM times measured" in adv.source
    assert any("w4a16 GEMMs run" in n and "roofline-speed kernels" in n for n in adv.notes)
    assert adv.to_dict()["crossover_roofline"]["w4a16 vs w8a8"] > 50     # the roofline alone disagrees


def test_advise_model_measures_accuracy_and_outliers_on_a_real_folder(tmp_path):
    from quantarena.compare import EvalSettings
    from quantarena.report import write_report
    from tests.conftest import make_hf_folder
    folder = tmp_path / "tiny"
    make_hf_folder(folder, hidden_size=128, intermediate_size=256)
    adv = A.advise_model(str(folder), settings=EvalSettings(tokens=64, seq_len=32, calib_windows=2, calib_seq_len=32),
                         gpu="A10", batch=[1, 32], schemes=["bf16", "w4a16-rtn", "w8a8-int8"], bench_dir=None,
                         log=lambda _: None)
    assert set(adv.accuracy) == {"bf16", "w4a16-rtn", "w8a8-int8"} and "measured on tiny" in adv.accuracy_note
    assert adv.outliers and {"block", "layers", "before", "after"} <= set(adv.outliers[0])
    assert all(r.accuracy.startswith("ppl ") for r in adv.rows)
    page = write_report(adv, tmp_path / "out")["report.html"].read_text()
    assert page.count("data:image/png;base64,") == 4
