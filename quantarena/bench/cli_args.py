"""``quantarena bench kernels|decode|greedy`` arguments and runner, for cli.py to wire in:

    from .bench.cli_args import add_bench_parser, run_bench
    add_bench_parser(sub)            # in the parser setup
    ... if args.command == "bench": return run_bench(args)
"""
from __future__ import annotations

import argparse
import json
import sys


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="GPU benchmarks: kernel sweep or end-to-end decode")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    k = bench_sub.add_parser("kernels", help="every kernel contender across batch sizes (CUDA graphs, L2 flushed)")
    k.add_argument("--shapes", default="llama-3-8b,llama-3-70b", help="comma-separated: llama-3-8b, llama-3-70b")
    k.add_argument("--batch", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096")
    k.add_argument("--no-gemlite", action="store_true", help="skip gemlite (if it is not installed)")
    k.add_argument("--json", default=None, metavar="OUT", help="write the results object to OUT")
    d = bench_sub.add_parser("decode", help="generation speed per scheme and batch; crossover batch")
    d.add_argument("--model", default="preset:llama-3-8b", help="preset:llama-3-8b | preset:llama-3-70b-4l")
    d.add_argument("--schemes", default="bf16,w4a16,w8a8-int8,fp8")
    d.add_argument("--batch", default="1,4,16,64,128,256")
    d.add_argument("--prompt-len", type=int, default=128)
    d.add_argument("--gen-len", type=int, default=64)
    d.add_argument("--fuse-linears", action="store_true",
                   help="q/k/v as one linear and gate/up as one, as serving engines load them (default: separate)")
    d.add_argument("--quantize-lm-head", action="store_true",
                   help="the output projection in each scheme's format too (default: bf16 in every scheme)")
    d.add_argument("--attention", default="quantarena", choices=["quantarena", "sdpa"],
                   help="decode attention: quantarena's split-KV kernel over the valid positions (default) or "
                        "masked SDPA over the whole static cache")
    d.add_argument("--no-compile", action="store_true",
                   help="run the blocks' non-linear work eagerly instead of fused by torch.compile")
    d.add_argument("--keep-canonical-w4a16", action="store_true",
                   help="keep W4A16's canonical packed codes next to the kernel layouts (default: serve from the "
                        "tensor-core kernel's layout alone, one copy of the 4-bit weights)")
    d.add_argument("--l2-prefetch-mb", type=float, default=None, metavar="MB",
                   help="W4A16 (kernel layout): each linear's kernel, once done, asks the L2 for up to MB of the next "
                        "linear's weight (default 4, the H100's best; 0: off)")
    d.add_argument("--json", default=None, metavar="OUT", help="write the results object to OUT")
    d.add_argument("--plot", default=None, metavar="PNG", help="also draw tokens/s and speed-up vs batch to PNG")
    g = bench_sub.add_parser("greedy", help="greedy generations of a real model: our kernels vs the reference kernels")
    g.add_argument("--model", default="default", help="default | a Hugging Face folder | a .gguf file")
    g.add_argument("--schemes", default="w4a16,w8a8-int8,fp8")
    g.add_argument("--steps", type=int, default=32, help="greedy tokens per prompt")
    g.add_argument("--json", default=None, metavar="OUT", help="write the results object to OUT")
    return p


def run_bench(args) -> int:
    import torch

    if getattr(args, "l2_prefetch_mb", None) is not None and args.l2_prefetch_mb < 0:
        print(f"error: --l2-prefetch-mb must be >= 0, got {args.l2_prefetch_mb}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: quantarena bench needs a CUDA GPU; run it on a GPU machine", file=sys.stderr)
        return 2
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    if args.bench_command == "greedy":
        from . import greedy
        from ..models import ModelError
        try:
            result = greedy.check(args.model, args.schemes.split(","), args.steps, log=log)
        except (ValueError, ModelError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            _write_json(args.json, result)
        print(json.dumps({k: [p["agree_prefix"] for p in v] for k, v in result["schemes"].items()}))
        return 0
    batches = [int(b) for b in args.batch.split(",")]
    if args.bench_command == "kernels":
        from . import kernels
        unknown = [s for s in args.shapes.split(",") if s not in kernels.SHAPES]
        if unknown:
            print(f"error: unknown shapes {unknown}; use {', '.join(kernels.SHAPES)}", file=sys.stderr)
            return 2
        result = kernels.sweep(args.shapes.split(","), batches, with_gemlite=not args.no_gemlite, log=log)
        print(kernels.table(result), file=sys.stderr)
    else:
        from . import decode
        shape = args.model.removeprefix("preset:")
        l2_mb = decode.DEFAULT_L2_PREFETCH_MB if args.l2_prefetch_mb is None else args.l2_prefetch_mb
        if shape not in decode.SHAPES:
            print(f"error: unknown model {args.model!r}; use preset:{', preset:'.join(decode.SHAPES)}", file=sys.stderr)
            return 2
        result = decode.run(shape, args.schemes.split(","), batches, args.prompt_len, args.gen_len, log=log,
                            compile=not args.no_compile, fuse=args.fuse_linears,
                            quantize_lm_head=args.quantize_lm_head, attention=args.attention,
                            kernel_layout=not args.keep_canonical_w4a16, l2_prefetch_mb=l2_mb)
        if args.plot:
            from .plots import plot_decode
            plot_decode(result, args.plot)
    if args.json:
        _write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {"rows": len(result["rows"])}))
    return 0


def _write_json(path: str, result: dict) -> None:
    from ..atomic import atomic_path
    atomic_path(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)), is_dir=False)
