"""One W4A16 GEMV and one int8 GEMM launch on Llama-3-8B gate/up (K=4096, N=14336), for Nsight Compute:

    ncu --kernel-name regex:"w4a16_gemv|int8_gemm" --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy --section LaunchStats python3 benchmarks/profile_gemv.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from quantarena.bench.kernels import make_layer, GROUP  # noqa: E402
from quantarena.kernels import ops  # noqa: E402

layer = make_layer(4096, 14336)
for m in (1, 1, 1, 4096, 4096):
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ops.w4a16_linear(x[:1], layer.packed, layer.scales, None, GROUP)
    ops.w8a8_linear(x, layer.w8, layer.w8_scale)
torch.cuda.synchronize()
