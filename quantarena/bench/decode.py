"""End-to-end generation speed across batch sizes: a lean Llama runner with a static KV cache and one
CUDA graph per decode step, so every scheme is timed on the same code path with no host overhead.

The model has the real shapes of the named preset and random weights (the 8B and 70B checkpoints cannot
ship here); its Linear layers are replaced by quantarena's modules (RTN, group 128 symmetric for W4A16;
per-channel int8 with dynamic per-token activations; fp8 e4m3 rows x tokens); embeddings, norms and
attention stay bf16 in every scheme, and so does lm_head unless ``quantize_lm_head``. Speed does not depend on weight values.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as qnn
from ..kernels import ops, reference
from .timing import capture

# Llama shapes (hidden, layers, heads, kv heads, head dim, intermediate, vocab, rope theta)
SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, inter=14336, vocab=128256,
                       rope_theta=500000.0),
    "llama-3-70b-4l": dict(hidden=8192, layers=4, heads=64, kv_heads=8, head_dim=128, inter=28672, vocab=128256,
                           rope_theta=500000.0),
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, inter=512, vocab=1000, rope_theta=10000.0),
}
SCHEMES = ("bf16", "w4a16", "w8a8-int8", "fp8")
# W4A16 decode batches up to this run a residual add + RMSNorm inside the next linear's tensor-core kernel where
# its tile makes that pay (LeanLlama(norm_fold=True), W4A16Linear.norm_fold_pays; on the H100 the q/k/v linear at
# batch 1 only)
NORM_FOLD_MAX_BATCH = 16
NORM_EPS = 1e-5   # the runner's RMSNorm epsilon (reference.rms_norm's default)
ATTENTION = ("quantarena", "sdpa")  # decode attention: our split-KV kernel, or masked SDPA over the whole cache


# MB of the next linear's weight each W4A16 kernel asks the L2 for (``nn.chain_l2_prefetch``): the best of 0-64 MB
# on the H100 (h100-l2-prefetch.json: 1.5-2.8% faster steps at batch 1-16, within 0.3% at 64; 12 MB and more slower)
DEFAULT_L2_PREFETCH_MB = 4.0


def quant_linear(linear: nn.Linear, scheme: str) -> nn.Module:
    if scheme == "bf16":
        return qnn.BF16Linear.from_float(linear)
    if scheme == "w4a16":
        return qnn.W4A16Linear.from_float(linear, group_size=128, symmetric=True)
    if scheme == "w8a8-int8":
        return qnn.W8A8Linear.from_float(linear)
    if scheme == "fp8":
        return qnn.FP8Linear.from_float(linear)
    raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [T, D] (or [B, 1, T, D])
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    """One Llama decoder block. ``fuse``: q/k/v as one linear and gate/up as one (what serving engines load:
    vLLM's QKV and merged gate-up layers); the same arithmetic, fewer and larger GEMMs/GEMVs."""

    def __init__(self, s: dict, scheme: str, device: str, fuse: bool = False):
        super().__init__()
        h, d, inter = s["hidden"], s["head_dim"], s["inter"]
        self.heads, self.kv_heads, self.head_dim, self.fuse = s["heads"], s["kv_heads"], d, fuse
        self.splits = [s["heads"] * d, s["kv_heads"] * d, s["kv_heads"] * d]

        def make(n_in: int, n_out: int) -> nn.Module:
            lin = nn.Linear(n_in, n_out, bias=False, device=device, dtype=torch.bfloat16)
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(n_in))
            return quant_linear(lin, scheme)

        # W4A16 with fused gate/up: the rows read as interleaved (2j gate j, 2j+1 up j; random weights, so no
        # permutation is needed), which lets the tensor-core kernel's epilogue apply the SiLU gate (forward_gated)
        self.interleaved = fuse and scheme == "w4a16"
        if fuse:
            self.qkv, self.gate_up = make(h, sum(self.splits)), make(h, 2 * inter)
        else:
            self.q, self.k, self.v = (make(h, n) for n in self.splits)
            self.gate, self.up = make(h, inter), make(h, inter)
        self.o, self.down = make(s["heads"] * d, h), make(inter, h)
        self.norm1 = nn.Parameter(torch.ones(h, device=device, dtype=torch.bfloat16), requires_grad=False)
        self.norm2 = nn.Parameter(torch.ones(h, device=device, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x, delta, cos, sin, k_cache, v_cache, pos, mask, length=None, defer: bool = False,
                rope_attention: bool = False, gated: bool = False, norm_fold: bool = False,
                norm_split: bool = False):
        """x: [B, T, H] residual stream, ``delta`` (or None) the previous block's MLP output still to be added.
        Writes this step's keys/values at positions pos[0] .. pos[0]+T-1 of the caches.
        Attention: ``length`` (decode, a 1-element device tensor) -> quantarena's split-KV kernel over the
        cache positions < length (with ``rope_attention`` and fused q/k/v, the kernel that also applies RoPE and
        writes the caches: one launch for what is otherwise four); else ``mask`` (decode) -> SDPA over the whole
        cache; neither -> causal prefill. ``gated`` (W4A16, fused gate/up): the SiLU gate in the gate/up kernel.
        ``norm_fold`` (W4A16 in the kernel layout, decode with the one-launch attention, batch up to
        ``NORM_FOLD_MAX_BATCH``): the first residual add + RMSNorm inside the q/k/v kernel (``forward_normed``)
        where that pays (``W4A16Linear.norm_fold_pays``). ``norm_split`` (same conditions, with ``gated``): the
        second split between the o kernel's epilogue (residual add, squares) and the gate/up kernel's (rsqrt).
        Returns ``(x, mlp_out)`` with ``defer`` (the next block adds it, where inductor fuses the add into its norm:
        one kernel fewer per block), else ``(x + mlp_out, None)``."""
        b, t, _ = x.shape
        if length is not None and rope_attention and self.fuse and t == 1:
            if norm_fold and self.foldable(self.qkv, x):
                qkv, x = self.qkv.forward_normed(x, delta, self.norm1)
            else:
                x = x if delta is None else x + delta
                qkv = self.qkv(reference.rms_norm(x, self.norm1))
            attn = ops.decode_rope_attention(qkv.reshape(b, -1), cos[0], sin[0], k_cache, v_cache, length, self.heads)
            split = norm_split and gated and self.interleaved and b <= NORM_FOLD_MAX_BATCH \
                and self.o.kernel_layout and self.gate_up.kernel_layout
            return self._rest(x, attn.unsqueeze(2), defer, gated, split)
        if delta is not None:
            x = x + delta
        y = reference.rms_norm(x, self.norm1)
        q, k, v = self.qkv(y).split(self.splits, -1) if self.fuse else (self.q(y), self.k(y), self.v(y))
        q = q.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        if length is not None:
            attn = ops.decode_attention(q[:, :, 0], k_cache, v_cache, length).unsqueeze(2)
        elif mask is None:  # prefill from an empty cache: plain causal attention over the new tokens
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self._rest(x, attn, defer, gated)

    def foldable(self, linear: nn.Module, x: torch.Tensor) -> bool:
        """The norm before ``linear`` runs inside its W4A16 kernel: fused linears in the kernel layout, a decode
        batch of at most ``NORM_FOLD_MAX_BATCH``, and a tile for which the fold pays (``norm_fold_pays``)."""
        return self.interleaved and x.shape[0] <= NORM_FOLD_MAX_BATCH and linear.norm_fold_pays(x)

    def _rest(self, x, attn, defer: bool, gated: bool, norm_split: bool = False):
        """The block after attention (attn [B, Hq, T, D]): o projection, residual, MLP. ``norm_split``: the residual
        add and the RMSNorm's squares in the o kernel's epilogue, the rsqrt in the gate/up kernel's."""
        b, t, _ = x.shape
        if norm_split:
            y, x, ss = self.o.forward_res_norm(attn.transpose(1, 2).reshape(b, t, -1), x, self.norm2)
            out = self.down(self.gate_up.forward_gated(y, row_ss=(ss, NORM_EPS)))
            return (x, out) if defer else (x + out, None)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        y = reference.rms_norm(x, self.norm2)
        if self.fuse and hasattr(self.down, "forward_silu_mul"):  # 8-bit: SiLU-mul inside the activation quant
            out = self.down.forward_silu_mul(self.gate_up(y))
        elif self.interleaved:  # the gate in the kernel's epilogue for decode steps (the tensor-core path); a
            # prefill's M takes dequantize + cuBLAS, where inductor fuses the gate instead
            h = (self.gate_up.forward_gated(y) if gated and t == 1
                 else reference.silu_mul_interleaved(self.gate_up(y)).to(y.dtype))
            out = self.down(h)
        else:
            gate, up = self.gate_up(y).chunk(2, -1) if self.fuse else (self.gate(y), self.up(y))
            out = self.down(F.silu(gate) * up)
        return (x, out) if defer else (x + out, None)


class LeanLlama(nn.Module):
    def __init__(self, shape: str, scheme: str, device: str = "cuda", max_len: int = 512, fuse: bool = False,
                 quantize_lm_head: bool = False, attention: str = "quantarena", defer_residual: bool = True,
                 rope_attention: bool = True, gated_mlp: bool = True, norm_fold: bool = True,
                 norm_split: bool = True):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTION)}")
        s = SHAPES[shape]
        self.s, self.max_len, self.attention = s, max_len, attention
        self.defer_residual = defer_residual   # each block's MLP residual added by the next block (Block.forward)
        self.rope_attention = rope_attention   # decode: RoPE + cache writes inside the attention kernel (fused q/k/v)
        self.gated_mlp = gated_mlp             # W4A16, fused gate/up: the SiLU gate in the gate/up kernel's epilogue
        self.norm_fold = norm_fold             # W4A16 kernel layout, small decode batches: norm 1 inside q/k/v
        self.norm_split = norm_split           # ... and norm 2 across the o and gate/up kernels' epilogues
        torch.manual_seed(0)
        self.embed = torch.randn(s["vocab"], s["hidden"], device=device, dtype=torch.bfloat16)
        self.blocks = nn.ModuleList(Block(s, scheme, device, fuse) for _ in range(s["layers"]))
        self.norm = torch.ones(s["hidden"], device=device, dtype=torch.bfloat16)
        self.lm_head = torch.randn(s["vocab"], s["hidden"], device=device, dtype=torch.bfloat16) / math.sqrt(s["hidden"])
        self.lm_head_q = None  # the output projection in the scheme's format (gpt-fast's int4 quantizes it too)
        if quantize_lm_head and scheme != "bf16":
            lin = nn.Linear(s["hidden"], s["vocab"], bias=False, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(self.lm_head)
            self.lm_head_q, self.lm_head = quant_linear(lin, scheme), None
        inv = 1.0 / (s["rope_theta"] ** (torch.arange(0, s["head_dim"], 2, device=device).float() / s["head_dim"]))
        freqs = torch.outer(torch.arange(max_len, device=device).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        self.block_fn = _run_block

    def linears(self) -> list[nn.Module]:
        """The linears in the order a step runs them, lm_head last (when quantized)."""
        names = ("qkv", "o", "gate_up", "down") if self.blocks[0].fuse else ("q", "k", "v", "o", "gate", "up", "down")
        order = [getattr(b, n) for b in self.blocks for n in names]
        return order + ([self.lm_head_q] if self.lm_head_q is not None else [])

    def new_cache(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.s
        shape = (batch, s["kv_heads"], self.max_len, s["head_dim"])
        return [(torch.zeros(shape, device=self.embed.device, dtype=torch.bfloat16),
                 torch.zeros(shape, device=self.embed.device, dtype=torch.bfloat16)) for _ in range(s["layers"])]

    def compile(self) -> None:
        """Fuse each block's non-linear work (norms, RoPE, cache writes, SiLU, residuals) with torch.compile;
        the quantized linears stay our custom ops. One compiled graph (dynamic in batch and length) serves
        every block."""
        self.block_fn = torch.compile(_run_block, dynamic=True)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, cache, decode: bool) -> torch.Tensor:
        """tokens [B, T]; pos [T] int64 positions. Returns the last position's logits [B, vocab]."""
        x = self.embed[tokens]
        cos, sin = self.cos[pos], self.sin[pos]
        mask = length = None
        if decode and self.attention == "quantarena":
            length = pos[-1:] + 1
        elif decode:
            mask = (torch.arange(self.max_len, device=tokens.device) <= pos[-1]).view(1, 1, 1, -1)
        delta = None
        for block, (kc, vc) in zip(self.blocks, cache):
            x, delta = self.block_fn(block, x, delta, cos, sin, kc, vc, pos, mask, length, self.defer_residual,
                                     self.rope_attention, self.gated_mlp, self.norm_fold, self.norm_split)
        x, delta = x[:, -1], (None if delta is None else delta[:, -1])
        if (self.norm_fold and decode and isinstance(self.lm_head_q, qnn.W4A16Linear)
                and x.shape[0] <= NORM_FOLD_MAX_BATCH and self.lm_head_q.norm_fold_pays(x)):
            return self.lm_head_q.forward_normed(x, delta, self.norm)[0]
        y = reference.rms_norm(x if delta is None else x + delta, self.norm)
        return F.linear(y, self.lm_head) if self.lm_head_q is None else self.lm_head_q(y)


def serve_w4a16(model: LeanLlama, l2_prefetch_mb: float = DEFAULT_L2_PREFETCH_MB) -> tuple[int, int]:
    """Hold the model's W4A16 linears as ``bench decode`` serves them: in the kernel layout alone, then linked by
    the L2 chain (``l2_prefetch_mb`` 0: no chain). A no-op for the other schemes. Returns (linears moved to the
    kernel layout, chain links)."""
    moved = qnn.to_kernel_layout(model)
    links = qnn.chain_l2_prefetch(model.linears(), int(l2_prefetch_mb * 2**20)) if l2_prefetch_mb > 0 else 0
    return moved, links


def _run_block(block: Block, x, delta, cos, sin, k_cache, v_cache, pos, mask, length, defer, rope_attention, gated,
               norm_fold=False, norm_split=False):
    return block(x, delta, cos, sin, k_cache, v_cache, pos, mask, length, defer, rope_attention, gated, norm_fold,
                 norm_split)


GREEDY_TWO_STAGE_MAX_BATCH = 32  # two-stage argmax up to this batch (H100, 128256 wide: h100-argmax.json)


def greedy_tokens(logits: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``logits.argmax(-1, keepdim=True)``; at small batches in two stages where the vocabulary splits into
    ``chunk``-wide pieces: each piece's max and its index, then the first piece holding the overall max (the same
    first-occurrence index). A small batch's argmax over a 128256-wide row runs on a few blocks (26 us at batch 1
    on an H100, 10.5 us in two stages); from a few dozen rows on it fills the GPU by itself and the two stages
    only add work (batch 256: 47 -> 86 us)."""
    b, v = logits.shape
    if b > GREEDY_TWO_STAGE_MAX_BATCH or v % chunk or v < 4 * chunk:
        return logits.argmax(-1, keepdim=True)
    return two_stage_argmax(logits, chunk)


def two_stage_argmax(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmax over the last dim of [B, V] (V a multiple of ``chunk``) as the max of each ``chunk``-wide piece, then
    the first piece holding the overall max: the same first-occurrence index as ``argmax``, [B, 1]."""
    b, v = logits.shape
    vals, idx = logits.view(b, v // chunk, chunk).max(-1)            # [B, V / chunk]: first max of each piece
    piece = vals.argmax(-1, keepdim=True)                             # the first piece with the overall max
    return piece * chunk + idx.gather(-1, piece)


@contextlib.contextmanager
def reference_kernels():
    """Route the quantized modules through the torch reference kernels (for the output check)."""
    names = ("w4a16_linear", "w8a8_linear", "fp8_linear", "w8a8_silu_mul_linear", "fp8_silu_mul_linear")
    saved = {name: getattr(ops, name) for name in names}
    for name in names[1:]:
        setattr(ops, name, getattr(reference, name))
    ops.w4a16_linear = lambda x, *a, path=None, **k: reference.w4a16_linear(x, *a, **k)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


@dataclass
class DecodeRun:
    """A captured decode step: replaying the graph appends one greedy token for every sequence."""
    model: LeanLlama
    batch: int
    prompt_len: int

    def __post_init__(self):
        dev = self.model.embed.device
        self.cache = self.model.new_cache(self.batch)
        gen = torch.Generator(device="cpu").manual_seed(1234)  # the same prompts for every scheme and kernel path
        self.tokens = torch.randint(0, self.model.s["vocab"], (self.batch, self.prompt_len), generator=gen).to(dev)
        self.next = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)

    def prefill(self) -> torch.Tensor:
        pos = torch.arange(self.prompt_len, device=self.tokens.device)
        logits = self.model(self.tokens, pos, self.cache, decode=False)
        self.next.copy_(greedy_tokens(logits))
        self.pos.fill_(self.prompt_len)
        return logits

    def step(self) -> torch.Tensor:
        logits = self.model(self.next, self.pos, self.cache, decode=True)
        self.next.copy_(greedy_tokens(logits))
        self.pos.add_(1)
        return logits

    def capture(self) -> torch.cuda.CUDAGraph:
        """The decode step as a graph (two warm-up steps first: compile kernels, build weight layouts); the
        position is reset after, the captured step's logits kept in ``self.logits``."""
        def step():
            self.logits = self.step()

        graph = capture(step, warmup=2)
        self.pos.fill_(self.prompt_len)
        return graph

    def timed_graph(self, steps: int) -> tuple[torch.cuda.CUDAGraph, float]:
        """Capture the decode step, upload it, and time ``steps`` replays after a fresh prefill: (graph,
        total ms). The cache and position are left after those steps; prefill again to start over."""
        graph = self.capture()
        self.prefill()
        graph.replay()  # upload
        self.prefill()
        return graph, _events_ms(graph.replay, steps)


def interleaved_step_ms(run: DecodeRun, variants: list, apply, rounds: int, steps: int) -> dict:
    """Decode-step ms of each of ``variants`` in one process (an A/B of a runner or kernel option): per round, each
    variant is set up by ``apply(variant)``, captured and timed over ``steps`` replays (:meth:`DecodeRun.timed_graph`),
    the variants' order rotated every round so that none always runs first. Returns every round's ms per variant."""
    variants = list(variants)
    times = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            apply(v)
            with torch.no_grad():
                graph, ms = run.timed_graph(steps)
            del graph
            times[v].append(round(ms / steps, 4))
    return times


def prefill_graph_ms(run: DecodeRun, reps: int = 5) -> float:
    """Median time of the prefill captured as one CUDA graph (after an eager warm-up of the same shapes), so
    that, as for the decode step, kernels are timed and not the host's launch loop (an eager 8B prefill of a
    few hundred tokens is launch-bound: its time varied 2x between runs of the same code)."""
    graph = capture(run.prefill, warmup=1)
    graph.replay()
    times = sorted(_events_ms(graph.replay) for _ in range(reps))
    del graph
    return times[len(times) // 2]


def _events_ms(fn, reps: int = 1) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _greedy(model: LeanLlama, steps: int) -> tuple[torch.Tensor, list[int]]:
    """The first logits and ``steps`` greedy tokens of batch 1 after a 16-token prompt."""
    with torch.no_grad():
        run = DecodeRun(model, 1, 16)
        first = run.prefill().float()
        toks = [run.next.item()]
        for _ in range(steps - 1):
            run.step()
            toks.append(run.next.item())
    return first, toks


def _agreement(fast: tuple[torch.Tensor, list[int]], ref: tuple[torch.Tensor, list[int]], prefix: str = "") -> dict:
    return {f"{prefix}logits_rel_err": ((fast[0] - ref[0]).norm() / ref[0].norm()).item(),
            f"{prefix}greedy_agree": sum(a == b for a, b in zip(fast[1], ref[1])), f"{prefix}greedy_steps": len(ref[1])}


def check_outputs(model: LeanLlama, steps: int = 8) -> tuple[dict, tuple[torch.Tensor, list[int]]]:
    """Fast kernels vs the reference kernels of the same scheme, batch 1: relative error of the first
    logits and how many of ``steps`` greedy tokens agree; and the reference run, to check a later layout."""
    fast = _greedy(model, steps)
    with reference_kernels():
        ref = _greedy(model, steps)
    return _agreement(fast, ref), ref


def bench_scheme(shape: str, scheme: str, batches: list[int], prompt_len: int, gen_len: int, log=print,
                 compile: bool = True, fuse: bool = False, quantize_lm_head: bool = False,
                 attention: str = "quantarena", kernel_layout: bool = True,
                 l2_prefetch_mb: float = DEFAULT_L2_PREFETCH_MB) -> tuple[list, dict]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = LeanLlama(shape, scheme, max_len=prompt_len + gen_len + 8, fuse=fuse, quantize_lm_head=quantize_lm_head,
                      attention=attention)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    log(f"{scheme}: model built in {time.time() - t0:.0f}s, {weights_gb:.1f} GB")
    check, ref = check_outputs(model)
    log(f"{scheme}: check {check}")
    if kernel_layout and scheme == "w4a16":   # serve from the kernel layout alone, as a server would
        check["kernel_layout_linears"] = qnn.to_kernel_layout(model)
        gc.collect()
        torch.cuda.empty_cache()
        weights_gb = torch.cuda.memory_allocated() / 1e9
        check.update(_agreement(_greedy(model, len(ref[1])), ref, "kernel_layout_"))
        log(f"{scheme}: kernel layout only, {weights_gb:.1f} GB; check {check}")
    if l2_prefetch_mb > 0 and scheme == "w4a16" and kernel_layout:
        check["l2_prefetch_links"] = qnn.chain_l2_prefetch(model.linears(), int(l2_prefetch_mb * 2**20))
        check.update(_agreement(_greedy(model, len(ref[1])), ref, "l2_prefetch_"))
        log(f"{scheme}: L2 prefetch chain of {check['l2_prefetch_links']} links, {l2_prefetch_mb} MB each; {check}")
    if compile:
        torch._dynamo.reset()                            # each scheme compiles its own block graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        model.compile()
        check["compiled_vs_eager_logits_rel_err"] = _compiled_vs_eager(model)
        log(f"{scheme}: compiled vs eager {check['compiled_vs_eager_logits_rel_err']:.2e}")
    rows = []
    for batch in batches:
        # the peak of this batch's serving alone (cache, prefill, graph), not of building, checking or compiling
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            run = DecodeRun(model, batch, prompt_len)
            run.prefill()  # warm-up (kernels, weight layouts)
            prefill_ms = prefill_graph_ms(run)
            graph, decode_ms = run.timed_graph(gen_len)
        ms_tok = decode_ms / gen_len
        peak = torch.cuda.max_memory_allocated()
        del graph, run
        torch.cuda.empty_cache()
        rows.append({"scheme": scheme, "batch": batch, "decode_tok_s": round(batch * 1000.0 / ms_tok, 1),
                     "prefill_tok_s": round(batch * prompt_len * 1000.0 / prefill_ms, 1),
                     "ms_per_token": round(ms_tok, 3), "gpu_mem_gb": round(peak / 1e9, 2),
                     "weights_gb": round(weights_gb, 2),
                     "resident_gb": round(torch.cuda.memory_allocated() / 1e9, 2)})
        log(f"{scheme} B={batch}: {rows[-1]}")
    del model
    return rows, check


def _compiled_vs_eager(model: LeanLlama) -> float:
    """Relative difference of the first logits (batch 1, 16-token prompt) with and without torch.compile."""
    compiled, model.block_fn = model.block_fn, _run_block
    with torch.no_grad():
        eager = DecodeRun(model, 1, 16).prefill().float()
        model.block_fn = compiled
        fused = DecodeRun(model, 1, 16).prefill().float()
    return ((fused - eager).norm() / eager.norm()).item()


def crossover(rows: list[dict]) -> dict:
    """Smallest batch at which each 8-bit scheme's decode throughput passes W4A16's (None if never)."""
    by = {(r["scheme"], r["batch"]): r["decode_tok_s"] for r in rows}
    batches = sorted({r["batch"] for r in rows})
    out = {}
    for scheme in ("w8a8-int8", "fp8"):
        out[scheme] = next((b for b in batches if (scheme, b) in by and ("w4a16", b) in by
                            and by[(scheme, b)] > by[("w4a16", b)]), None)
    return out


def run(shape: str, schemes: list[str], batches: list[int], prompt_len: int = 128, gen_len: int = 64,
        log=print, compile: bool = True, fuse: bool = False, quantize_lm_head: bool = False,
        attention: str = "quantarena", kernel_layout: bool = True,
        l2_prefetch_mb: float = DEFAULT_L2_PREFETCH_MB) -> dict:
    rows, checks = [], {}
    for scheme in schemes:
        r, c = bench_scheme(shape, scheme, batches, prompt_len, gen_len, log, compile, fuse, quantize_lm_head,
                            attention, kernel_layout, l2_prefetch_mb)
        rows += r
        checks[scheme] = c
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "model": f"preset:{shape} (random weights)",
            "prompt_len": prompt_len, "gen_len": gen_len, "fused_linears": fuse,
            "lm_head": "the scheme's format (bf16 in the bf16 run)" if quantize_lm_head else "bf16 in every scheme",
            "attention": ("quantarena split-KV decode kernel over the valid cache positions"
                          + ("; RoPE, the cache writes and the chunk merge in the same launch" if fuse else "")
                          if attention == "quantarena" else "masked SDPA over the whole static cache"),
            "method": "lean Llama runner, static KV cache, one CUDA graph per decode step, greedy; "
                      + ("block non-linear work fused by torch.compile (linears are our custom ops); " if compile else "")
                      + ("q/k/v and gate/up fused into one linear each; " if fuse else "")
                      + "prefill (one forward of batch x prompt_len tokens) timed as a CUDA graph too, median of 5",
            "w4a16_weights": ("held only in the tensor-core kernel's TILED layout after the output check (the "
                              "canonical packed codes dropped; the GEMVs, which need layouts of their own, unused)"
                              if kernel_layout else "canonical packed codes plus the kernel layouts built from them"),
            "w4a16_l2_prefetch_mb": l2_prefetch_mb if kernel_layout and "w4a16" in schemes else 0.0,
            "w4a16_norm_fold": f"decode batch <= {NORM_FOLD_MAX_BATCH}: each block's first residual add + RMSNorm "
                               "inside the q/k/v kernel where W4A16Linear.norm_fold_pays (at most "
                               f"{ops.NORM_FOLD_MAX_STEPS} K steps per program), the second split across the o and "
                               "gate/up kernels' epilogues" if kernel_layout and "w4a16" in schemes else "off",
            "memory": "gpu_mem_gb: peak allocated while serving that batch (KV cache, prefill, decode graph; "
                      "building, checking and compiling excluded); weights_gb: allocated after building the model "
                      "(for W4A16 in the kernel layout: after the conversion); resident_gb: allocated after that "
                      "batch, i.e. the weights plus any kernel weight layouts built so far",
            "crossover": crossover(rows), "checks": checks, "rows": rows}
