"""End-to-end decode sweep on the GPU (the same as `quantarena bench decode`), JSON to --out."""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quantarena.bench import decode  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--model", default="llama-3-8b")
ap.add_argument("--schemes", default="bf16,w4a16,w8a8-int8,fp8")
ap.add_argument("--batch", default="1,4,16,64,128,256")
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--gen-len", type=int, default=64)
ap.add_argument("--fuse", action="store_true")
ap.add_argument("--quantize-lm-head", action="store_true")
ap.add_argument("--attention", default="quantarena")
ap.add_argument("--keep-canonical-w4a16", action="store_true")
ap.add_argument("--l2-prefetch-mb", type=float, default=decode.DEFAULT_L2_PREFETCH_MB)
args = ap.parse_args()
result = decode.run(args.model, args.schemes.split(","), [int(b) for b in args.batch.split(",")],
                    args.prompt_len, args.gen_len, log=lambda s: print(s, flush=True), fuse=args.fuse,
                    quantize_lm_head=args.quantize_lm_head, attention=args.attention,
                    kernel_layout=not args.keep_canonical_w4a16, l2_prefetch_mb=args.l2_prefetch_mb)
with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps(result["crossover"]), json.dumps(result["checks"]))
for r in result["rows"]:
    print(r)
