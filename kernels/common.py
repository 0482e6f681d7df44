"""Pieces shared by the fused attention forward and backward kernels.

* `sequence_bounds`: where a program's (sample or packed sequence, head) lives and which keys it sees;
* `adapter_probs`: the adapter tile's softmax recomputed from its saved log-sum-exp;
* `cause_bits`: one (BLOCK_M, BLOCK_N) tile of the bit-packed CausalMask;
* `tile_summary`: the per-tile "any cause bit set" table that lets kernels skip empty mask tiles;
* `TileConfig` / `tile_config`: block sizes and warps per head dim, dtype and direction.

Units: scores are kept in base 2 (`s2 = scale * log2(e) * q.k`), so the kernels use exp2/log2; the
log-sum-exp handed to users is converted back to natural log (`lse = lse2 * ln 2`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Globals read inside @triton.jit code must be constexpr (host code uses `.value`).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_config(head_dim: int, direction: str, dtype: torch.dtype) -> TileConfig:
    """Block sizes for `direction` in {"fwd", "bwd"}.

    Under the interpreter the cost is per program x loop iteration, so the largest tiles win (64-wide
    tiles run ~10x faster than 16-wide ones). On sm_90 the forward follows FlashAttention-2's Triton
    choices (128 x 64, 8 warps at d = 128; smaller above 128 so that K/V stages fit in 227 KB of shared
    memory); the backward keeps 64 x 64 so dK, dV and the recomputed P stay in registers. fp32 tiles
    take twice the bytes: compiled for sm_90 the fp32 forward at d = 80..128 needs 240 KB with the
    half-precision tiles, so fp32 halves BLOCK_M and keeps two stages (tests/compile_kernels.py checks
    every variant against the limit). BLOCK_N is a multiple of 32 so a key tile covers whole words of
    the bit-packed mask.
    """
    if interpreting():
        return TileConfig(64, 64, 4, 1)
    if direction == "fwd":
        if head_dim <= 64:
            config = TileConfig(128, 64, 4, 3)
        elif head_dim <= 128:
            config = TileConfig(128, 64, 8, 3)
        else:
            config = TileConfig(64, 32, 8, 2)
    elif head_dim <= 128:
        config = TileConfig(64, 64, 4 if head_dim <= 64 else 8, 2)
    else:
        config = TileConfig(32, 32, 8, 1)
    if dtype == torch.float32:
        config = TileConfig(max(32, config.block_m // 2), config.block_n, config.num_warps, min(2, config.num_stages))
    return config


def tile_summary(bits: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """(B, ceil(N/block_m), ceil(N/block_n)) int8: 1 where the mask tile has any cause bit set.

    Vectorised over the packed words (N^2/32 int32 reads), on the mask's device, once per call.
    """
    batch, n, words = bits.shape
    words_per_tile = block_n // 32
    row_tiles, col_tiles = triton.cdiv(n, block_m), triton.cdiv(words, words_per_tile)
    padded = torch.nn.functional.pad(bits, (0, col_tiles * words_per_tile - words, 0, row_tiles * block_m - n))
    nonzero = padded.view(batch, row_tiles, block_m, col_tiles, words_per_tile) != 0
    return nonzero.any(dim=4).any(dim=2).to(torch.int8).contiguous()


@triton.jit
def sequence_bounds(CuSeqlens, KeyLengths, s, n_q, n_k, VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr):
    """(batch index, first row in the packed layout, query length, key length, causal offset).

    Without packing, program `s` is batch item `s`; with packing it is sequence `s` of batch item 0.
    Causal rows see keys j <= i + offset (bottom-right alignment when Nq < Nk).
    """
    if VARLEN:
        b = s * 0
        row0 = tl.load(CuSeqlens + s)
        len_q = tl.load(CuSeqlens + s + 1) - row0
        len_k = len_q
        offset = 0
    else:
        b = s
        row0 = 0
        len_q = n_q
        len_k = n_k
        offset = n_k - n_q
        if HAS_KEY_LENGTHS:
            len_k = tl.load(KeyLengths + s)
    return b, row0, len_q, len_k, offset


@triton.jit
def adapter_probs(q, ka, La2, scale_log2, adapter_len, BLOCK_A: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pa (BLOCK_M, BLOCK_A) fp32 from the saved adapter log-sum-exp (base 2); padded slots are 0."""
    slots = tl.arange(0, BLOCK_A)
    logits = tl.dot(q, tl.trans(ka), input_precision=DOT_PRECISION) * scale_log2
    probs = tl.exp2(logits - La2[:, None])
    return tl.where(slots[None, :] < adapter_len, probs, 0.0)


@triton.jit
def cause_bits(MaskBits, rows, cols, row_ok, col_ok, mask_words):
    """A[rows, cols] as fp32 0/1 from one sample's packed words (bit t of word w is column 32 w + t)."""
    words = tl.load(MaskBits + rows[:, None] * mask_words + (cols[None, :] >> 5),
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
    return ((words >> (cols[None, :] & 31)) & 1).to(tl.float32)
