"""Command line: parses arguments into library calls, prints results. Nothing else lives here."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__

# Errors that are the user's input, not our bug: printed as one line, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from .calibration.data import TextError
    from .models import ModelError
    from .primitives import QuantizationError
    from .schemes import SchemeError
    from .gpus import GPUError
    from .roofline import RooflineError
    from .advisor import AdviceError
    return (SchemeError, ModelError, TextError, QuantizationError, FileNotFoundError, NotADirectoryError,
            GPUError, RooflineError, AdviceError)


def _add_eval_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="default | HF folder | file.gguf | preset:NAME")
    p.add_argument("--text", default=None, help="evaluation text: pydoc (default), .txt, .jsonl[:field], datasets folder[:field]")
    p.add_argument("--calib-text", default=None, help="calibration text (default: same source as --text, other half)")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (default 4096)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens, BOS included (default 512)")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _settings(args):
    from .compare import EvalSettings
    if args.tokens < 1 or args.seq_len < 2 or args.calib_windows < 1:
        from .calibration.data import TextError
        raise TextError("--tokens and --calib-windows must be positive and --seq-len at least 2")
    return EvalSettings(text=args.text, calib_text=args.calib_text, seq_len=args.seq_len, tokens=args.tokens,
                        calib_windows=args.calib_windows, calib_seq_len=args.seq_len, device=args.device)


def cmd_compare(args) -> int:
    from .compare import compare, format_table
    from .schemes import parse_schemes
    schemes = parse_schemes(args.schemes)
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    result = compare(args.model, schemes, _settings(args), progress=not args.quiet, log=log)
    print(json.dumps(result, indent=2) if args.json else "\n" + format_table(result))
    return 0


def cmd_eval(args) -> int:
    from .compare import compare, format_table
    from .formats.compressed_tensors import is_compressed_tensors_folder
    from .schemes import parse_scheme
    if is_compressed_tensors_folder(args.model):  # a saved quantized folder: evaluate it as stored
        from .export import evaluate_folder
        result = evaluate_folder(args.model, _settings(args), progress=not args.quiet)
        print(json.dumps(result, indent=2) if args.json else
              f"{result['model']} ({result['scheme']}, as stored): ppl {result['ppl']:.3f} on {result['tokens']} "
              f"tokens, {result['bytes'] / 1e6:.1f} MB, {result['bits_per_weight']:.2f} bits/weight")
        return 0
    result = compare(args.model, [parse_scheme(args.scheme)], _settings(args), progress=not args.quiet,
                     log=(lambda s: print(s, file=sys.stderr)) if args.json else print)
    print(json.dumps(result, indent=2) if args.json else "\n" + format_table(result))
    return 0


def cmd_quantize(args) -> int:
    from .export import quantize_and_save
    ignore = [t.strip() for t in args.ignore.split(",") if t.strip()]
    info = quantize_and_save(args.model, args.scheme, args.out, format=args.format, ignore=ignore,
                             settings=_settings(args), progress=not args.quiet, gguf_type=args.gguf_type)
    print(json.dumps(info, indent=2) if args.json else
          f"wrote {info['path']} ({info['scheme']}, {info['format']}, {info['bytes'] / 1e6:.1f} MB)")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_advise(args) -> int:
    from .advisor import advise_model, format_table
    from .report import write_report
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    advice = advise_model(args.model, settings=_settings(args), measure_accuracy=not args.no_accuracy,
                          progress=not args.quiet, log=log, gpu=args.gpu, batch=args.batch,
                          concurrency=args.concurrency, context=args.context,
                          max_ppl_increase=args.max_ppl_increase,
                          schemes=[s.strip() for s in args.schemes.split(",")] if args.schemes else None,
                          kernels_file=args.kernels, decode_file=args.decode, bench_dir=args.bench_dir)
    paths = write_report(advice, args.out) if args.out else {}
    if args.json:
        print(json.dumps(advice.to_dict() | {"files": {k: str(v) for k, v in paths.items()}}, indent=2, default=str))
    else:
        print(format_table(advice))
        for name, path in paths.items():
            print(f"wrote {path}")
    return 0


def cmd_outliers(args) -> int:
    from .calibration import data
    from .compare import _quiet_transformers
    from .models import load_model
    from .outliers import format_table, outlier_stats, plot
    _quiet_transformers()
    lm = load_model(args.model, device=args.device)
    if lm.tokenizer is None:
        windows = data.random_windows(lm.config.vocab_size, args.seq_len, args.calib_windows, seed=2)
    else:
        same = args.calib_text is None or args.calib_text == args.text
        text = data.load_text(args.calib_text or args.text)
        windows = data.windows(lm.tokenizer, text, args.seq_len, args.calib_windows, "calib" if same else "all")
    rows = outlier_stats(lm.model, lm.arch, windows, alpha=args.alpha, progress=not args.quiet)
    png = plot(rows, args.png, f"{lm.name}: activation outliers, SmoothQuant alpha {args.alpha:g}") if args.png else None
    if args.json:
        print(json.dumps({"model": lm.name, "alpha": args.alpha, "windows": int(windows.shape[0]), "png": png,
                          "rows": rows}, indent=2))
    else:
        print(format_table(rows))
        if png:
            print(f"wrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantarena", description="Quantize an LLM every way and measure what each costs.")
    parser.add_argument("--version", action="version", version=f"quantarena {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="quantize one way and measure perplexity, KL divergence and size")
    _add_eval_settings(p)
    p.add_argument("--scheme", default="bf16", help="scheme string, e.g. w4a16-rtn, w8a8-int8, fp8")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    for command in ("quantize", "export"):
        p = sub.add_parser(command, help="quantize and save as compressed-tensors (vLLM, SGLang) or GGUF (llama.cpp)")
        _add_eval_settings(p)
        p.add_argument("--scheme", required=True, help="scheme string, e.g. w4a16-gptq, w8a8-sq, fp8")
        p.add_argument("--out", required=True, help="output folder (compressed-tensors) or .gguf file")
        p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gguf"])
        p.add_argument("--ignore", default="lm_head",
                       help="comma-separated Linears kept unquantized (names, suffixes or re:REGEX; default lm_head)")
        p.add_argument("--gguf-type", default="q8_0", help="GGUF type of floating layers: q8_0, q4_0, q4_k, f16, f32")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("compare", help="quantize several ways and print a table (ppl, Δ%%, KLD, size)")
    _add_eval_settings(p)
    p.add_argument("--schemes", default="bf16,w4a16-rtn,w8a8-int8,w8a8-int8-static,fp8",
                   help="comma-separated scheme strings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("advise", help="recommend a scheme per traffic scenario for a GPU (roofline, benchmarks, accuracy)")
    _add_eval_settings(p)
    p.add_argument("--gpu", default=None, help="GPU name, e.g. H100, A100-40GB, RTX-4090 (default: the local GPU)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--batch", type=_int_list, default=None, help="decode batch sizes, e.g. 1,8,32,128")
    group.add_argument("--concurrency", type=int, default=None, help="concurrent requests (decode batch)")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence for the KV cache (default 2048)")
    p.add_argument("--max-ppl-increase", type=float, default=None, help="reject schemes above this perplexity increase, in %%")
    p.add_argument("--schemes", default=None, help="comma-separated schemes (default: best available method per family)")
    p.add_argument("--kernels", default=None, help="a <gpu>-kernels.json benchmark file (measured ceilings)")
    p.add_argument("--decode", default=None, help="a <gpu>-decode.json benchmark file (measured decode times)")
    p.add_argument("--bench-dir", default="benchmarks/results", help="where to look for benchmark files of the GPU")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy comparison (roofline only)")
    p.add_argument("--out", default="quantarena-advise", help="folder for report.html, summary.md, advice.json ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("outliers", help="per-layer activation outliers (max/median channel, kurtosis) before and after smoothing")
    _add_eval_settings(p)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    p.add_argument("--png", default="outliers.png", help="plot file ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_outliers)

    from .bench.cli_args import add_bench_parser, run_bench
    add_bench_parser(sub).set_defaults(func=run_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"quantarena: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantarena: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
