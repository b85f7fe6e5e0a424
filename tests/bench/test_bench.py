"""Benchmark plumbing on the CPU: the decode runner's cache logic, the crossover, tables, CLI arguments.
(Timings themselves only come from GPU runs.)"""
from __future__ import annotations

import argparse

import pytest
import torch

from quantarena import nn as qnn
from quantarena.bench import cli_args, decode, kernels


def test_fused_linears_compute_the_same_block():
    torch.manual_seed(0)
    sep = decode.Block(decode.SHAPES["tiny"], "bf16", "cpu")
    fused = decode.Block(decode.SHAPES["tiny"], "bf16", "cpu", fuse=True)
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([sep.q.weight, sep.k.weight, sep.v.weight]))
        fused.gate_up.weight.copy_(torch.cat([sep.gate.weight, sep.up.weight]))
        fused.o.weight.copy_(sep.o.weight)
        fused.down.weight.copy_(sep.down.weight)
        x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
        cos, sin = torch.ones(5, 64, dtype=torch.bfloat16), torch.zeros(5, 64, dtype=torch.bfloat16)
        caches = [torch.zeros(2, 2, 8, 64, dtype=torch.bfloat16) for _ in range(4)]
        a, _ = sep(x, None, cos, sin, caches[0], caches[1], torch.arange(5), None)
        b, _ = fused(x, None, cos, sin, caches[2], caches[3], torch.arange(5), None)
    assert torch.equal(a, b)


def test_deferred_residual_is_the_same_model():
    """The MLP's residual added at the start of the next block (and before the final norm) is the same sum."""
    tokens = torch.randint(0, 1000, (2, 6))
    out = []
    for defer in (False, True):
        model = decode.LeanLlama("tiny", "bf16", device="cpu", max_len=16, defer_residual=defer)
        with torch.no_grad():
            out.append(model(tokens, torch.arange(6), model.new_cache(2), decode=False))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("scheme,attention,fuse", [(s, "quantarena", False) for s in decode.SCHEMES]
                         + [("bf16", "sdpa", False), ("w8a8-int8", "quantarena", True), ("fp8", "quantarena", True),
                            ("bf16", "quantarena", True), ("w4a16", "quantarena", True)])
def test_decode_step_matches_a_full_prefill(scheme, attention, fuse):
    """fuse with 8-bit schemes: the down projection takes [gate | up] (SiLU-mul inside its activation quant)."""
    model = decode.LeanLlama("tiny", scheme, device="cpu", max_len=32, attention=attention, fuse=fuse)
    run = decode.DecodeRun(model, 2, 8)
    with torch.no_grad():
        run.prefill()
        first = run.next.clone()
        step_logits = run.step()
        full = model(torch.cat([run.tokens, first], 1), torch.arange(9), model.new_cache(2), decode=False)
    assert int(run.pos) == 9  # prompt 0..7, then the first generated token at 8
    err = ((step_logits.float() - full.float()).norm() / full.float().norm()).item()
    # bf16 activations and two orders of summation; fp8's coarse rounding turns those ulps into larger steps
    assert err < (6e-2 if scheme == "fp8" else 2e-2)


def step_after_prefill(model, **options):
    """Set the runner ``options`` (LeanLlama attributes), prefill 2 x 8 tokens, run one decode step: (logits, cache)."""
    for name, value in options.items():
        setattr(model, name, value)
    run = decode.DecodeRun(model, 2, 8)
    with torch.no_grad():
        run.prefill()
        return run.step().float(), run.cache


def test_serve_w4a16_moves_and_links_only_w4a16():
    w4 = decode.LeanLlama("tiny", "w4a16", device="cpu", max_len=16, fuse=True, quantize_lm_head=True)
    assert decode.serve_w4a16(w4) == (9, 9)                           # 2 blocks x 4 linears + lm_head, circular
    assert decode.serve_w4a16(decode.LeanLlama("tiny", "bf16", device="cpu", max_len=16, fuse=True)) == (0, 0)


@pytest.mark.parametrize("scheme", ["bf16", "w4a16"])
def test_rope_attention_is_the_same_step(scheme):
    """RoPE and the cache writes inside the attention op (fused q/k/v) give the step of the separate ops: the same
    caches and logits up to RoPE's rounding (float32 then one rounding, where the eager ops round twice)."""
    model = decode.LeanLlama("tiny", scheme, device="cpu", max_len=32, fuse=True)
    (l0, c0), (l1, c1) = (step_after_prefill(model, rope_attention=rope) for rope in (False, True))
    logits, caches = [l0, l1], [c0, c1]
    assert ((logits[0] - logits[1]).norm() / logits[0].norm()).item() < 1e-2
    for (k0, v0), (k1, v1) in zip(*caches):                           # the prefill's entries: the same path
        assert torch.equal(k0[:, :, :8], k1[:, :, :8]) and torch.equal(v0[:, :, :8], v1[:, :, :8])
    (k0, v0), (k1, v1) = caches[0][0], caches[1][0]                   # the step's first layer: same input
    assert torch.equal(v0, v1)
    assert torch.allclose(k0[:, :, 8].float(), k1[:, :, 8].float(), rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("kernel_layout", [False, True])
def test_gated_mlp_is_the_same_step(kernel_layout):
    """W4A16 with fused gate/up: the SiLU gate in the gate/up linear (forward_gated) or after it, the same step up
    to one rounding of the gate/up output."""
    model = decode.LeanLlama("tiny", "w4a16", device="cpu", max_len=32, fuse=True)
    if kernel_layout:
        qnn.to_kernel_layout(model)
    logits = [step_after_prefill(model, gated_mlp=gated)[0] for gated in (False, True)]
    assert ((logits[0] - logits[1]).norm() / logits[0].norm()).item() < 1e-2


def test_greedy_tokens_is_argmax_with_first_occurrence_ties():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 128256, generator=gen).to(torch.bfloat16)
    logits[1, 5000] = logits[1, 70000] = 100.0                         # a tie across pieces: the first index
    logits[2, 300] = logits[2, 301] = 100.0                            # a tie inside one piece
    assert torch.equal(decode.greedy_tokens(logits), logits.argmax(-1, keepdim=True))
    assert decode.greedy_tokens(logits)[1:].flatten().tolist() == [5000, 300]
    odd = torch.randn(2, 1000, generator=gen)                          # not a multiple of the piece: one argmax
    assert torch.equal(decode.greedy_tokens(odd), odd.argmax(-1, keepdim=True))


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        decode.LeanLlama("tiny", "bf16", device="cpu", max_len=16, attention="flash")


@pytest.mark.parametrize("scheme", ["bf16", "w4a16", "w8a8-int8"])
def test_quantized_lm_head_is_the_schemes_linear_of_the_same_weight(scheme):
    plain = decode.LeanLlama("tiny", scheme, device="cpu", max_len=16)
    quant = decode.LeanLlama("tiny", scheme, device="cpu", max_len=16, quantize_lm_head=True)
    assert (quant.lm_head_q is None) == (scheme == "bf16")  # bf16 keeps F.linear on the same tensor
    tokens = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():  # same seed: same blocks, same lm_head tensor
        a = plain(tokens, torch.arange(6), plain.new_cache(2), decode=False).float()
        b = quant(tokens, torch.arange(6), quant.new_cache(2), decode=False).float()
    err = ((a - b).norm() / a.norm()).item()
    assert err == 0.0 if scheme == "bf16" else 0.0 < err < 0.15  # int4 g128 / int8 rounding of one projection


def test_crossover_is_the_first_batch_where_8bit_beats_w4a16():
    rows = [{"scheme": s, "batch": b, "decode_tok_s": v} for s, b, v in [
        ("w4a16", 1, 100), ("w4a16", 16, 900), ("w4a16", 64, 2000),
        ("w8a8-int8", 1, 60), ("w8a8-int8", 16, 800), ("w8a8-int8", 64, 2500),
        ("fp8", 1, 50), ("fp8", 16, 700), ("fp8", 64, 1900)]]
    assert decode.crossover(rows) == {"w8a8-int8": 64, "fp8": None}


def test_kernel_table_reports_ratio_to_bf16():
    rows = [{"model": "m", "layer": "l", "op": "bf16", "impl": "cublas", "K": 8, "N": 8, "M": 1, "us": 10.0,
             "tb_s": 1.0, "tflop_s": 0.1},
            {"model": "m", "layer": "l", "op": "w4a16", "impl": "quantarena", "K": 8, "N": 8, "M": 1, "us": 5.0,
             "tb_s": 1.0, "tflop_s": 0.1},
            {"model": "m", "layer": "l", "op": "fp8", "impl": "gemlite", "K": 8, "N": 8, "M": 1, "error": "boom"}]
    text = kernels.table({"rows": rows})
    assert "2.00" in text and "boom" in text


def test_bytes_moved_counts_weights_scales_and_activations():
    assert kernels.bytes_moved("w4a16", 4096, 4096, 1) == 4096 * 4096 // 2 + 2 * 4096 * 32 + 2 * 4096 + 2 * 4096
    assert kernels.bytes_moved("bf16", 8, 8, 2) == 2 * 64 + 2 * 16 + 2 * 16


def test_bench_cli_arguments_and_missing_gpu_error(capsys):
    parser = argparse.ArgumentParser()
    cli_args.add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "decode", "--model", "preset:llama-3-8b", "--batch", "1,4"])
    assert args.bench_command == "decode" and args.batch == "1,4" and args.gen_len == 64
    if not torch.cuda.is_available():
        assert cli_args.run_bench(args) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    bad = parser.parse_args(["bench", "decode", "--l2-prefetch-mb", "-1"])
    assert cli_args.run_bench(bad) == 2                             # before any GPU is looked for
    assert "--l2-prefetch-mb must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_greedy_check_on_the_default_model_runs_both_kernel_paths():
    from quantarena.bench import greedy
    # on the CPU our ops take the reference path, so both runs must agree exactly; the GPU run is the real check
    result = greedy.check("default", ["bf16", "w8a8-int8"], steps=3, device="cpu", log=lambda s: None)
    assert list(result["schemes"]) == ["w8a8-int8"] and len(result["bf16_text"]) == len(greedy.PROMPTS)
    for p in result["schemes"]["w8a8-int8"]:
        assert p["agree_prefix"] == p["steps"] == 3 and p["first_logits_rel_err"] == 0.0
        assert 0 <= p["agree_with_bf16"] <= 3 and isinstance(p["text"], str)
    errs = result["layer_errors"]["w8a8-int8"]
    assert errs["max_prefill"] == errs["max_m1"] == 0.0 and len(errs["worst"]) == 5
    with pytest.raises(ValueError, match="unknown schemes"):
        greedy.check("default", ["w3a3"], device="cpu")


def test_greedy_compare_reports_the_divergence_margin():
    from quantarena.bench import greedy
    ref = ([1, 2, 3], [torch.tensor([0.0, 5.0, 1.0, 0.0])] * 3)
    fast = ([1, 2, 4], [torch.tensor([0.0, 5.0, 1.5, 0.0])] * 3)
    out = greedy.compare(fast, ref)
    assert out["agree_prefix"] == 2 and out["divergence_ref_margin"] == 4.0
    assert out["divergence_fast_vs_ref_max_abs"] == 0.5 and out["first_logits_rel_err"] > 0
    assert greedy.compare(ref, ref) == {"steps": 3, "agree_prefix": 3, "first_logits_rel_err": 0.0}


def test_decode_plot_writes_a_png(tmp_path):
    from quantarena.bench.plots import plot_decode
    rows = [{"scheme": s, "batch": b, "decode_tok_s": v} for s, b, v in [
        ("bf16", 1, 100), ("bf16", 64, 5000), ("w4a16", 1, 180), ("w4a16", 64, 4000), ("fp8", 1, 120), ("fp8", 64, 6000)]]
    out = plot_decode({"rows": rows, "crossover": {"fp8": 64}, "model": "m", "device": "d", "date": "x"},
                      tmp_path / "d.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows"):
        plot_decode({"rows": []}, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_l2_flush_rejects_an_unknown_mode():
    from quantarena.bench.timing import L2Flush
    with pytest.raises(ValueError, match="read"):
        L2Flush(mode="bogus")


def test_rel_err_is_relative_and_nan_for_an_unwritten_output():
    ref = torch.tensor([3.0, 4.0])
    assert kernels.rel_err(torch.tensor([3.0, 4.0], dtype=torch.bfloat16), ref) == 0.0
    assert kernels.rel_err(torch.tensor([3.0, 3.0]), ref) == pytest.approx(0.2)
    assert torch.isnan(torch.tensor(kernels.rel_err(torch.tensor([3.0, float("nan")]), ref)))

@pytest.mark.parametrize("batch", [2, decode.NORM_FOLD_MAX_BATCH + 1])
def test_norm_fold_and_split_are_the_same_step(batch, monkeypatch):
    """W4A16 in the kernel layout: the first norm of each block and the final one handed to the next linear
    (forward_normed: bit for bit on the CPU, where both run the reference ops), the second split across the o and
    gate/up linears (forward_res_norm + row_ss: the same step up to where the roundings fall). Above
    NORM_FOLD_MAX_BATCH the separate ops run."""
    calls = {"fold": 0, "split": 0}
    fold, split = decode.ops.w4a16_norm_linear_tiled, decode.ops.w4a16_res_norm_linear_tiled

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(decode.ops, "w4a16_norm_linear_tiled", counted("fold", fold))
    monkeypatch.setattr(decode.ops, "w4a16_res_norm_linear_tiled", counted("split", split))
    model = decode.LeanLlama("tiny", "w4a16", device="cpu", max_len=32, fuse=True, quantize_lm_head=True)
    qnn.to_kernel_layout(model)
    out = {}
    small = batch <= decode.NORM_FOLD_MAX_BATCH
    for variant, (norm_fold, norm_split) in {"separate": (False, False), "fold": (True, False),
                                             "both": (True, True)}.items():
        model.norm_fold, model.norm_split = norm_fold, norm_split
        calls.update(fold=0, split=0)
        run = decode.DecodeRun(model, batch, 8)
        with torch.no_grad():
            run.prefill()
            out[variant] = (run.step().float(), run.cache)
        assert calls == {"fold": 2 + 1 if norm_fold and small else 0, "split": 2 if norm_split and small else 0}
    assert torch.equal(out["separate"][0], out["fold"][0])
    err = ((out["both"][0] - out["separate"][0]).norm() / out["separate"][0].norm()).item()
    assert err < (1e-2 if small else 0.0) or (not small and err == 0.0)
    (k0, v0), (k1, v1) = out["separate"][1][0], out["both"][1][0]     # the first layer's step: the same input
    assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_w4a16_decode_model_in_the_kernel_layout_generates_the_same_tokens():
    """The decode run's W4A16 switch to the kernel layout (canonical codes dropped) changes no output."""
    from quantarena import nn as qnn

    model = decode.LeanLlama("tiny", "w4a16", device="cpu", max_len=32, fuse=True, quantize_lm_head=True)
    check, ref = decode.check_outputs(model, steps=4)
    assert check["greedy_agree"] == 4 and check["logits_rel_err"] == 0.0   # CPU: fast = reference path
    assert qnn.to_kernel_layout(model) == 2 * 4 + 1                        # qkv, o, gate_up, down per block; lm_head
    again = decode._agreement(decode._greedy(model, 4), ref, "kernel_layout_")
    assert again == {"kernel_layout_logits_rel_err": 0.0, "kernel_layout_greedy_agree": 4,
                     "kernel_layout_greedy_steps": 4}


def test_atomic_a8_tiles_fit_the_pool_and_the_grid():
    from quantarena.kernels.triton_w4a16 import ATOMIC_WS_WORDS

    sms = 132
    tiles = kernels.atomic_a8_tiles(64, 1024, 4096, sms)
    assert {impl for impl, _ in tiles} == {"swap", "std"}
    for impl, cfg in tiles:
        grid = -(-64 // cfg["BLOCK_M"]) * -(-1024 // cfg["BLOCK_N"]) * cfg["SPLIT_K"]
        assert cfg["ATOMIC"] and 2 <= cfg["SPLIT_K"] <= 16 and grid <= 8 * sms
        assert cfg["SPLIT_K"] <= -(-4096 // cfg["BLOCK_K"])
    assert {impl for impl, _ in kernels.atomic_a8_tiles(16, 1024, 4096, sms)} == {"swap"}   # tiled from M = 32
    assert {impl for impl, _ in kernels.atomic_a8_tiles(64, 1024, 4096, sms, ())} == {"swap"}
    assert kernels.atomic_a8_tiles(128, ATOMIC_WS_WORDS // 64, 4096, sms) == []   # the output exceeds the pool


def test_layer_shape_reads_a_model_layer_spec():
    assert kernels.layer_shape("llama-3-8b:kv_proj") == ("llama-3-8b", "kv_proj", 4096, 1024)
    assert kernels.layer_shape("llama-3-70b-decode:qkv") == ("llama-3-70b-decode", "qkv", 8192, 10240)
    for bad in ("llama-3-8b:o_proj", "llama-2:q_proj", "q_proj"):
        with pytest.raises(ValueError, match="unknown layer .* use one of llama-3-8b:q_proj"):
            kernels.layer_shape(bad)


def test_interleaved_step_ms_rotates_the_variants_and_records_every_round():
    calls = []

    class FakeRun:
        current = None

        def timed_graph(self, steps):
            calls.append(self.current)
            return None, 10.0 * steps * (1 + len(calls))

    run = FakeRun()
    times = decode.interleaved_step_ms(run, ("a", "b", "c"), lambda v: setattr(run, "current", v), 3, 4)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times["a"] == [20.0, 70.0, 90.0] and len(times["b"]) == len(times["c"]) == 3   # ms per step, each round
