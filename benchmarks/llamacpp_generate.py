"""Export the default model to GGUF in several ways and let llama.cpp (llama-cpp-python) generate from it.

Greedy continuation of a prompt for each export and for the original Q4_K_M file that ships the model,
written to benchmarks/results/llamacpp_generate.json. Runs on CPU:

    pip install llama-cpp-python==0.3.36     # builds llama.cpp from source (~4 min on 2 cores)
    python benchmarks/llamacpp_generate.py
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

from quantarena.export import quantize_and_save
from quantarena.formats.gguf import template_path

EXPORTS = [  # (scheme, GGUF type for floating layers, what llama.cpp sees)
    ("w4a16-rtn", "q8_0", "Q4_0 Linears (our int4 codes, g128), Q8_0 embeddings"),
    ("w4a16-rtn-g32-asym", "q8_0", "Q4_1 Linears (our asymmetric int4 codes, g32), Q8_0 embeddings"),
    ("w8a8-int8", "q8_0", "Q8_0 Linears (our int8 codes, fp16 row scales), Q8_0 embeddings"),
    ("bf16", "q4_k", "Q4_K Linears where rows are multiples of 256, Q5_0 elsewhere, Q8_0 embeddings"),
]


def generate(path: Path, prompt: str, tokens: int) -> dict:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0)
    start = time.perf_counter()
    out = llm(prompt, max_tokens=tokens, temperature=0.0, top_k=1)
    seconds = time.perf_counter() - start
    return {"text": out["choices"][0]["text"], "generate_s": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--out", default="benchmarks/results/llamacpp_generate.json")
    args = parser.parse_args()
    rows = [{"export": "original gemma-3-270m-q4_k_m.gguf (reference)", "scheme": None, "bytes":
             template_path().stat().st_size, **generate(template_path(), args.prompt, args.tokens)}]
    print(rows[-1])
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, gguf_type, what in EXPORTS:
            start = time.perf_counter()
            info = quantize_and_save("default", scheme, Path(tmp) / f"{scheme}.gguf", format="gguf",
                                     gguf_type=gguf_type, progress=False)
            export_s = time.perf_counter() - start
            rows.append({"export": what, "scheme": scheme, "gguf_type": gguf_type, "bytes": info["bytes"],
                         "export_s": round(export_s, 1), **generate(Path(info["path"]), args.prompt, args.tokens)})
            print(rows[-1])
    result = {"prompt": args.prompt, "max_tokens": args.tokens, "sampling": "greedy", "date": str(date.today()),
              "machine": platform.machine(), "python": platform.python_version(),
              "versions": {p: metadata.version(p) for p in ("llama-cpp-python", "gguf", "torch", "transformers")},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
