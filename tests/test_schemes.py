import pytest

from quantarena.schemes import BASES, SchemeError, parse_scheme, parse_schemes


def test_defaults_and_options():
    s = parse_scheme("w4a16-rtn")
    assert (s.family, s.method, s.group_size, s.symmetric) == ("w4a16", "rtn", 128, True)
    s = parse_scheme("w4a16-rtn-g64-asym")
    assert (s.group_size, s.symmetric, s.name) == (64, False, "w4a16-rtn-g64-asym")
    assert parse_scheme("w8a8-int8-static").static
    assert parse_scheme("w8a8-sq-a0.7").alpha == 0.7
    assert parse_scheme("w4a16-awq+gptq").method == "awq+gptq"
    assert not parse_scheme("fp8").needs_calibration and parse_scheme("w8a8-int8-static").needs_calibration


def test_names_round_trip():
    for base in BASES:
        assert parse_scheme(base).name == base


@pytest.mark.parametrize("bad", ["w4", "int4", "w4a16-rtn-g", "w8a8-int8-a0.5", "fp8-asym", "bf16-static",
                                 "w8a8-sq-a1.5", "w4a16-rtn-g0"])
def test_bad_schemes_list_valid_ones(bad):
    with pytest.raises(SchemeError) as e:
        parse_scheme(bad)
    assert "bf16" in str(e.value) or "alpha" in str(e.value) or "positive" in str(e.value)


def test_parse_list():
    assert [s.name for s in parse_schemes("bf16, fp8")] == ["bf16", "fp8"]
    with pytest.raises(SchemeError):
        parse_schemes(" , ")
