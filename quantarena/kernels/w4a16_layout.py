"""The W4A16 kernels' weight layouts, in torch only (no Triton): built from the canonical packed codes, and back.

Canonical: ``[N, K/8]`` int32, nibble j of word w holds the code of column ``k = 8w + j`` (compressed-tensors'
``pack-quantized``). The tensor-core kernel's UNPACK=3 layout permutes the nibbles within each row's 128-wide
K steps (``dot_layout_words``); its TILED copy stores them in blocks of ``tile_rows`` rows x one K step
(``dot_tiled_words``). Every layout is a permutation of the same bytes (plus zero rows of padding), so
``canonical_from_dot_tiled`` gives the canonical codes back bit for bit: a weight held only in the kernel
layout loses nothing.
"""
from __future__ import annotations

import torch

from .. import primitives as P

DOT_TILE_ROWS = 16    # rows per block of the TILED layout: one layout serves every BLOCK_N (a multiple of it)
DOT_PAD_ROWS = 128    # the TILED layout's rows are padded to a multiple of the largest BLOCK_N
_DOT_AXES = (0, 1, 5, 2, 6, 3, 4)   # [n, step, jp, jj, h, t, e] -> [n, step, t, jp, e, jj, h]


def tile_words(words: torch.Tensor, block_n: int, block_kw: int) -> torch.Tensor:
    """Words [N, KW] -> every (N tile, K step) tile of [block_n, block_kw] words contiguous, the tiles of one
    N tile in K order, N zero-padded to a multiple of block_n."""
    n, kw = words.shape
    pad = -n % block_n
    if pad:
        words = torch.cat([words, words.new_zeros(pad, kw)])
    t = words.reshape((n + pad) // block_n, block_n, kw // block_kw, block_kw).permute(0, 2, 1, 3)
    return t.contiguous().reshape(n + pad, kw)


def untile_words(tiled: torch.Tensor, n: int, block_n: int, block_kw: int) -> torch.Tensor:
    """The inverse of ``tile_words``: the first ``n`` rows in row order."""
    rows, kw = tiled.shape
    t = tiled.reshape(rows // block_n, kw // block_kw, block_n, block_kw).permute(0, 2, 1, 3)
    return t.reshape(rows, kw)[:n].contiguous()


def _check_k(kw: int) -> None:
    if kw % 16:
        raise ValueError(f"the UNPACK=3 layout needs K % 128 == 0, got K = {kw * 8}")


def dot_layout_words(canonical: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """The canonical ``[N, K/8]`` words in the UNPACK=3 order (K % 128 == 0): a permutation of the nibbles
    within each row's 128-wide K steps, so the bytes a K step reads stay the same 64 contiguous bytes per row.
    Word ``c = 4t + jp`` of a step holds in nibble ``4e + 2jj + h`` the code of ``k = 32jp + 16jj + 8h + 2t + e``.
    Built in row chunks (the unpacked nibbles take 8x the words)."""
    n, kw = canonical.shape
    _check_k(kw)
    out = torch.empty_like(canonical)
    for r0 in range(0, n, rows_per_chunk):
        q = P.unpack_int4(canonical[r0:r0 + rows_per_chunk])                      # [n, K]: k = 8w + j
        q = q.reshape(q.shape[0], kw // 16, 4, 2, 2, 4, 2)                        # [n, K/128, jp, jj, h, t, e]
        out[r0:r0 + rows_per_chunk] = P.pack_int4(q.permute(*_DOT_AXES).reshape(q.shape[0], kw * 8))
    return out


def canonical_from_dot_words(dot: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """The inverse of ``dot_layout_words``."""
    n, kw = dot.shape
    _check_k(kw)
    inverse = tuple(_DOT_AXES.index(i) for i in range(len(_DOT_AXES)))
    out = torch.empty_like(dot)
    for r0 in range(0, n, rows_per_chunk):
        q = P.unpack_int4(dot[r0:r0 + rows_per_chunk])
        q = q.reshape(q.shape[0], kw // 16, 4, 4, 2, 2, 2)                        # [n, K/128, t, jp, e, jj, h]
        out[r0:r0 + rows_per_chunk] = P.pack_int4(q.permute(*inverse).reshape(q.shape[0], kw * 8))
    return out


def dot_tiled_words(dot_words: torch.Tensor, tile_rows: int = DOT_TILE_ROWS) -> torch.Tensor:
    """UNPACK=3 words ``[N, K/8]`` -> the TILED order: the [tile_rows, 16] words of every (row block, 128-wide
    K step) contiguous, the blocks of one row block in K order, N zero-padded to a multiple of
    ``max(DOT_PAD_ROWS, tile_rows)`` (so a BLOCK_N tile of up to that many rows never reads past the end)."""
    n = dot_words.shape[0]
    pad = -n % max(DOT_PAD_ROWS, tile_rows)
    if pad:
        dot_words = torch.cat([dot_words, dot_words.new_zeros(pad, dot_words.shape[1])])
    return tile_words(dot_words, tile_rows, 16)


def dot_tiled_from_canonical(canonical: torch.Tensor, tile_rows: int = DOT_TILE_ROWS) -> torch.Tensor:
    """The canonical ``[N, K/8]`` words in the TILED UNPACK=3 order: ``dot_tiled_words(dot_layout_words(.))``."""
    return dot_tiled_words(dot_layout_words(canonical), tile_rows)


def canonical_from_dot_tiled(tiled: torch.Tensor, n: int, tile_rows: int = DOT_TILE_ROWS) -> torch.Tensor:
    """The canonical ``[n, K/8]`` words of a TILED UNPACK=3 weight of ``n`` rows (the inverse of
    ``dot_tiled_from_canonical``)."""
    rows, kw = tiled.shape
    _check_k(kw)
    if rows % tile_rows or rows < n:
        raise ValueError(f"a TILED weight of {rows} rows in blocks of {tile_rows} cannot hold {n} rows")
    return canonical_from_dot_words(untile_words(tiled, n, tile_rows, 16))
