"""gpus: table lookups, device-name matching, measured ceilings from benchmark rows."""
import json

import pytest

from quantarena.gpus import (DEFAULT_EFFICIENCY, GPUError, apply_kernel_benchmark, benchmark_files,
                             ceilings_from_kernel_rows, effective, get_gpu, known_gpus, load_json,
                             match_device_name, with_measured)

REQUIRED = ["H100-SXM", "H100-PCIe", "H200", "A100-40GB", "A100-80GB", "L40S", "A10", "L4", "RTX-4090", "RTX-3090"]


def test_table_covers_the_issue_list_with_sane_figures():
    for name in REQUIRED:
        g = get_gpu(name)
        assert g.memory_gb >= 16 and 0.2 < g.bandwidth_tbs < 6
        assert g.int8_tops >= g.bf16_tflops > 0          # int8 never slower than bf16 on tensor cores
        assert g.has_fp8 == (g.arch in ("ada", "hopper"))


@pytest.mark.parametrize("alias,name", [("H100", "H100-SXM"), ("h100 pcie", "H100-PCIe"), ("a100", "A100-80GB"),
                                        ("A100 40GB", "A100-40GB"), ("rtx 4090", "RTX-4090"), ("l40s", "L40S")])
def test_aliases(alias, name):
    assert get_gpu(alias).name == name


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(GPUError, match="known GPUs: .*H100-SXM.*RTX-3090"):
        get_gpu("Voodoo 5")
    assert set(REQUIRED) <= set(known_gpus())


@pytest.mark.parametrize("device,memory,name", [
    ("NVIDIA H100 80GB HBM3", 80e9, "H100-SXM"), ("NVIDIA H100 PCIe", 80e9, "H100-PCIe"),
    ("NVIDIA H200", 141e9, "H200"), ("NVIDIA A100-SXM4-40GB", 40e9, "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", 80e9, "A100-80GB"), ("NVIDIA A10", 24e9, "A10"), ("NVIDIA A10G", 24e9, "A10"),
    ("NVIDIA L4", 24e9, "L4"), ("NVIDIA L40S", 48e9, "L40S"), ("NVIDIA GeForce RTX 4090", 24e9, "RTX-4090")])
def test_device_names(device, memory, name):
    assert match_device_name(device, int(memory)).name == name


def test_unknown_device_name_is_none():
    assert match_device_name("Some Other Accelerator") is None


def test_measured_ceilings_override_datasheet_times_efficiency():
    g = get_gpu("H100")
    e = effective(g)
    assert e["bandwidth"] == pytest.approx(3.35e12 * DEFAULT_EFFICIENCY.memory)
    m = with_measured(g, bandwidth_tbs=3.02, bf16_tflops=714)
    em = effective(m)
    assert em["bandwidth"] == pytest.approx(3.02e12) and em["bf16"] == pytest.approx(714e12)
    assert em["int8"] == e["int8"] and set(m.measured) == {"bandwidth_tbs", "bf16_tflops"}


def _kernel_rows():
    k, n = 4096, 14336
    return [{"op": "bf16", "impl": "cublas", "K": k, "N": n, "M": 1, "us": 2 * k * n / 3.0e12 * 1e6},
            {"op": "bf16", "impl": "cublas", "K": k, "N": n, "M": 4096, "us": 2 * 4096 * k * n / 700e12 * 1e6},
            {"op": "w8a8", "impl": "quantarena", "K": k, "N": n, "M": 4096, "us": 2 * 4096 * k * n / 1100e12 * 1e6},
            {"op": "w8a8", "impl": "int_mm", "K": k, "N": n, "M": 4096, "us": 2 * 4096 * k * n / 900e12 * 1e6},
            {"op": "w4a16", "impl": "quantarena", "K": k, "N": n, "M": 1, "us": 30.0}]


def test_ceilings_from_kernel_rows_take_the_best_contender():
    c = ceilings_from_kernel_rows(_kernel_rows())
    assert c["bandwidth_tbs"] == pytest.approx(3.0) and c["bf16_tflops"] == pytest.approx(700)
    assert c["int8_tops"] == pytest.approx(1100) and "fp8_tflops" not in c


def test_benchmark_files_found_by_gpu_name(tmp_path):
    data = {"device": "NVIDIA H100 80GB HBM3", "rows": _kernel_rows()}
    (tmp_path / "h100-kernels.json").write_text(json.dumps(data))
    (tmp_path / "a100-decode.json").write_text(json.dumps({"rows": []}))
    found = benchmark_files(get_gpu("H100"), tmp_path)
    assert set(found) == {"kernels"}
    g = apply_kernel_benchmark(get_gpu("H100"), load_json(found["kernels"]))
    assert g.bf16_tflops == pytest.approx(700) and "bf16_tflops" in g.measured


def test_bad_benchmark_file_is_one_line_error(tmp_path):
    with pytest.raises(GPUError, match="not found"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(GPUError, match="not valid JSON"):
        load_json(tmp_path / "x.json")


def test_kernel_table_picks_one_impl_per_op_and_interpolates():
    from quantarena.gpus import interpolate, kernel_table
    rows = [{"op": "w4a16", "impl": "quantarena", "K": 8, "N": 8, "M": m, "us": us} for m, us in ((1, 10.0), (4, 40.0))]
    rows += [{"op": "w4a16", "impl": "tinygemm", "K": 8, "N": 8, "M": 1, "us": 1.0}]
    table = kernel_table(rows)
    assert table.seconds("w4a16", 8, 8, 1) == pytest.approx(10e-6)
    assert table.seconds("w4a16", 8, 8, 2) == pytest.approx(20e-6)   # log-log between M=1 and M=4
    assert table.seconds("w4a16", 8, 8, 8) is None and table.seconds("bf16", 8, 8, 1) is None
    assert kernel_table(rows, {"w4a16": "tinygemm"}).seconds("w4a16", 8, 8, 1) == pytest.approx(1e-6)
    assert interpolate([(1, 2.0), (4, 8.0)], 2) == pytest.approx(4.0)
