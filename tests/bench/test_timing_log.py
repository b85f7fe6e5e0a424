"""The benchmark scripts' timestamped logger (``quantarena.bench.timing.Logger``), on the CPU."""
from __future__ import annotations

from quantarena.bench import timing


def _clock(monkeypatch, values):
    values = iter(values)
    monkeypatch.setattr(timing.time, "time", lambda: next(values))


def test_logger_prints_seconds_since_it_was_made(monkeypatch, capsys):
    _clock(monkeypatch, [1000.0, 1012.34, 1234.56])
    log = timing.Logger()
    log("shape", 16, {"us": 1.5})
    log()
    assert capsys.readouterr().out == "[  12.3s] shape 16 {'us': 1.5}\n[ 234.6s]\n"


def test_logger_counts_from_a_given_start(monkeypatch, capsys):
    _clock(monkeypatch, [107.0])
    log = timing.Logger(100.0)
    assert log.started == 100.0
    log("budget")
    assert capsys.readouterr().out == "[   7.0s] budget\n"


def test_logger_flushes(monkeypatch):
    calls = []
    monkeypatch.setattr("builtins.print", lambda *a, **kw: calls.append((a, kw)))
    _clock(monkeypatch, [0.0, 1.0])
    timing.Logger()("x")
    assert calls == [(("[   1.0s]", "x"), {"flush": True})]
