"""The next linear's weights into the L2 while the GPU is between linears (batch-1 decode).

At batch 1 a decode step is a chain of weight streams (q/k/v, o, gate/up, down, ..., lm_head) with small kernels
between them: RoPE and the cache write, attention, norms, SiLU. During those, and while a linear's last programs
drain, the DRAM is mostly idle; the next linear then starts cold and ramps up. With a chain, each W4A16 linear's
programs, once their own work is done, ask the L2 (``cp.async.bulk.prefetch.L2``, no registers, no result) for
the start of the next linear's weight slices, up to a byte budget, so the next kernel's first reads hit the L2.

Only the L2 is touched: the prefetch changes no value, and a line evicted before use is simply read again.

The plan is pure Python (:func:`tiled_plan`, tested on the CPU); the kernel side is
:func:`.triton_pdl.prefetch_items`.
"""
from __future__ import annotations

BLOCK_BYTES_PER_STEP = 1024   # one TILED block: 16 rows x one 128-wide K step of 4-bit codes
ALIGN = 16                    # cp.async.bulk: 16-byte aligned addresses and sizes


def tiled_plan(rows: int, k: int, split: int, budget: int) -> dict:
    """What a finishing kernel asks the L2 for, of a next weight held in the TILED layout
    (``w4a16_layout.dot_tiled_words``: ``rows`` padded rows, blocks of 16 rows x 128 K, 1 KB, along K).

    The next kernel runs its programs at once (one wave at decode sizes), each reading its 16-row blocks from the
    start of its K slice (``split`` slices). So every slice of every block gets the same first share: the budget
    spread evenly, rather than whole slices for a few programs that would then finish early while the others, cold,
    set the kernel's time. Returns the keywords of :func:`.triton_pdl.prefetch_items`: ``pf_items`` (blocks x
    slices), ``pf_chunks``, ``pf_block_bytes``, ``pf_chunk_bytes``, ``pf_bytes`` (per item, a 16-byte multiple;
    0 when the budget is below one 16-byte request per item)."""
    if rows % 16 or k % 128:
        raise ValueError(f"a TILED weight has rows divisible by 16 and K by 128, got {rows} and {k}")
    if budget < 0 or split < 1:
        raise ValueError(f"budget must be >= 0 and split >= 1, got {budget} and {split}")
    steps = k // 128
    split = min(split, steps)
    per_split = -(-steps // split)
    chunks = -(-steps // per_split)                       # slices that hold at least one step
    block_bytes = steps * BLOCK_BYTES_PER_STEP
    chunk_bytes = per_split * BLOCK_BYTES_PER_STEP
    items = rows // 16 * chunks
    nbytes = min(chunk_bytes, budget // items // ALIGN * ALIGN)
    return dict(pf_items=items, pf_chunks=chunks, pf_block_bytes=block_bytes, pf_chunk_bytes=chunk_bytes,
                pf_bytes=nbytes)


def requested_bytes(plan: dict) -> int:
    """Bytes the plan asks for in all (each item cut at its block's end)."""
    per_block = sum(min(plan["pf_bytes"], plan["pf_block_bytes"] - c * plan["pf_chunk_bytes"])
                    for c in range(plan["pf_chunks"]))
    return plan["pf_items"] // plan["pf_chunks"] * per_block
