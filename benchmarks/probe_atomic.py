"""Probe (temporary): the int8 std kernel with ATOMIC split-K on the GPU, per element."""
import torch
from quantarena import primitives as P
from quantarena.kernels import reference as R, triton_w8a8 as T8

for (m, n, k, bm, bn, bk, split) in [(3, 40, 512, 16, 64, 64, 2), (70, 72, 384, 64, 64, 64, 4),
                                     (64, 1024, 4096, 16, 128, 256, 8), (32, 1024, 4096, 32, 64, 256, 8)]:
    gen = torch.Generator().manual_seed(5)
    wq, ws = P.quantize_int8(torch.randn(n, k, generator=gen), "channel")
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    a_scale = torch.rand(m, 1, generator=gen)
    wq, ws, a, a_scale = wq.cuda(), ws.cuda(), a.cuda(), a_scale.cuda()
    ref = R.int8_matmul(a, wq).float() * a_scale * ws.reshape(1, -1)
    for ns in (1, 4):
        for kern in ("std", "swap"):
            res = []
            for rep in range(4):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=ns, ATOMIC=True)
                try:
                    if kern == "std":
                        out = T8.int8_gemm(a, a_scale, wq, ws, None, torch.float32, dict(cfg, GROUP_M=8))
                    else:
                        out = T8.a8w8_swap_gemm(a, a_scale, wq, ws, None, torch.float32, cfg)
                except Exception as e:
                    res.append("compile-fail " + type(e).__name__)
                    break
                bad = out != ref
                ratio = (out[bad] / ref[bad]).float()
                res.append((int(bad.sum()), round(float(ratio.mean()), 3) if bad.any() else None))
            print(m, n, k, bm, bn, bk, split, "stages", ns, kern, res, flush=True)
