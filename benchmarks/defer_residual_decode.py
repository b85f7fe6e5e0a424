"""Decode steps with each block's MLP residual added at the end of the block (one inductor kernel) or deferred to the
start of the next block, where inductor fuses it into the RMSNorm (``LeanLlama(defer_residual=...)``): the
runner-option A/B of ``option_ab_decode.py`` with AB_OPTION=defer_residual (schemes bf16,w4a16,w8a8-int8 unless
AB_SCHEMES says otherwise). The committed h100-defer-residual.json came from this script's first form (its rows
carry the same keys), run before the other options existed.
Usage: python benchmarks/defer_residual_decode.py [out_dir]
"""
from __future__ import annotations

import os

os.environ.setdefault("AB_OPTION", "defer_residual")
os.environ.setdefault("AB_SCHEMES", "bf16,w4a16,w8a8-int8")

import option_ab_decode  # noqa: E402  (benchmarks/ is the script's own directory on sys.path)

if __name__ == "__main__":
    option_ab_decode.main()
