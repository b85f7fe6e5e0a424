"""Every bad input gets a one-line error and exit code 2, no traceback."""
import pytest

from quantarena.cli import main

from .conftest import make_hf_folder


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line(code, err, match):
    assert code == 2
    lines = [l for l in err if l.startswith("quantarena: error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert not any("Traceback" in l for l in err)


def test_unknown_scheme(capsys):
    assert_one_line(*run_cli(capsys, "compare", "--schemes", "bf16,w3a7"), "valid schemes: bf16")


def test_missing_path(capsys):
    assert_one_line(*run_cli(capsys, "eval", "--model", "/no/such/model"), "does not exist")


def test_unsupported_architecture(capsys, tmp_path):
    folder = make_hf_folder(tmp_path / "gpt2", "gpt2")
    assert_one_line(*run_cli(capsys, "eval", "--model", str(folder)), "supported: ")


def test_group_size_does_not_divide(capsys, tmp_path):
    folder = make_hf_folder(tmp_path / "odd", hidden_size=96, intermediate_size=192)
    assert_one_line(*run_cli(capsys, "eval", "--model", str(folder), "--scheme", "w4a16-rtn-g64"),
                    "does not divide the 96 input features")


def test_nan_weights(capsys, tmp_path):
    folder = make_hf_folder(tmp_path / "nan", nan=True)
    assert_one_line(*run_cli(capsys, "eval", "--model", str(folder), "--scheme", "w8a8-int8"), "NaN/Inf")


def test_empty_and_short_text(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert_one_line(*run_cli(capsys, "eval", "--text", str(tmp_path / "empty.txt")), "is empty")
    (tmp_path / "short.txt").write_text("Hello there.")
    assert_one_line(*run_cli(capsys, "eval", "--text", str(tmp_path / "short.txt")), "too short")


def test_preset_compare_runs(capsys):
    code = main(["compare", "--model", "preset:tiny-llama", "--schemes", "bf16,w4a16-rtn-g64,w8a8-int8,fp8",
                 "--tokens", "64", "--seq-len", "32", "--quiet", "--json"])
    assert code == 0
    import json
    result = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in result["rows"]] == ["bf16", "w4a16-rtn-g64", "w8a8-int8", "fp8"]
    for row in result["rows"]:
        assert {"scheme", "ppl", "kld", "bytes"} <= set(row) and row["kld"] >= 0
