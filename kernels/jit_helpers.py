"""Pieces shared by the fused attention forward and backward kernels.

* `sequence_bounds`: where a program's (sample or packed sequence, head) lives and which keys it sees;
* `tile_ptrs`: the pointers to a (rows, head dim) tile of a (B, H, N, d) tensor;
* `adapter_probs`: the adapter tile's softmax recomputed from its saved log-sum-exp;
* `slot_segments` / `segment_slot_lse`: adapter segments (docs/math.md §7), each slot's segment and LSE;
* `cause_bits`: one (BLOCK_M, BLOCK_N) tile of the bit-packed CausalMask;
* `tile_summary`: the per-tile "any cause bit set" table that lets kernels skip empty mask tiles;
* `query_tile_flags`: the per-query-tile "any mass gradient" table of the dK/dV sweep.

Units: scores are kept in base 2 (`s2 = scale * log2(e) * q.k`), so the kernels use exp2/log2; the
log-sum-exp handed to users is converted back to natural log (`lse = lse2 * ln 2`).
"""
from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

# Globals read inside @triton.jit code must be constexpr (host code uses `.value`).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# (block_m, block_n) -> (weak reference to the mask words, their version, the summary): every layer
# of a forward and its backward read the same CausalMask, so each tile shape is summarised once per
# batch instead of once per layer and direction (five kernels, a padded copy of the words each).
_summaries: dict[tuple[int, int], tuple[weakref.ref, int, torch.Tensor]] = {}


def tile_summary(bits: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """(B, ceil(N/block_m), ceil(N/block_n)) int8: 1 where the mask tile has any cause bit set.

    Vectorised over the packed words (N^2/32 int32 reads), on the mask's device; cached on the
    identity and version of `bits` (see `_summaries`)."""
    cached = _summaries.get((block_m, block_n))
    if cached is not None and cached[0]() is bits and cached[1] == bits._version:
        return cached[2]
    batch, n, words = bits.shape
    words_per_tile = block_n // 32
    row_tiles, col_tiles = triton.cdiv(n, block_m), triton.cdiv(words, words_per_tile)
    padded = torch.nn.functional.pad(bits, (0, col_tiles * words_per_tile - words, 0, row_tiles * block_m - n))
    nonzero = padded.view(batch, row_tiles, block_m, col_tiles, words_per_tile) != 0
    summary = nonzero.any(dim=4).any(dim=2).to(torch.int8).contiguous()
    _summaries[(block_m, block_n)] = (weakref.ref(bits), bits._version, summary)
    return summary


def query_tile_flags(grad_mass: torch.Tensor, block_m: int) -> torch.Tensor:
    """(B, H, ceil(N/block_m)) int8: 1 where a query tile has a row with a mass gradient c != 0.

    Lets the dK/dV sweep skip the mask of rows without a CAT gradient with one scalar load per tile
    instead of a cross-warp max over |c| every iteration."""
    batch, heads, n = grad_mass.shape
    padded = torch.nn.functional.pad(grad_mass, (0, triton.cdiv(n, block_m) * block_m - n))
    return (padded.view(batch, heads, -1, block_m) != 0).any(dim=3).to(torch.int8)


@triton.jit
def sequence_bounds(packing, s, sizes):
    """(batch index, first row in the packed layout, query length, key length, causal offset).

    Without packing, program `s` is batch item `s`; with packing it is sequence `s` of batch item 0.
    Causal rows see keys j <= i + offset (bottom-right alignment when Nq < Nk).
    """
    if packing.cu_seqlens is not None:
        b = s * 0
        row0 = tl.load(packing.cu_seqlens + s)
        len_q = tl.load(packing.cu_seqlens + s + 1) - row0
        len_k = len_q
        offset = 0
    else:
        b = s
        row0 = 0
        len_q = sizes.n_q
        len_k = sizes.n_k
        offset = sizes.n_k - sizes.n_q
        if packing.key_lengths is not None:
            len_k = tl.load(packing.key_lengths + s)
    return b, row0, len_q, len_k, offset


@triton.jit
def tile_ptrs(base, strides, b64, h, rows, dims):
    """Pointers to the (rows, dims) tile of head h of sample b in a (B, H, N, d) tensor at `base` with
    `strides` (batch, head, row; the last dim is contiguous). Added to the pointer term by term, so
    the per-element offsets stay 32-bit (only the scalar batch term is 64-bit)."""
    return base + b64 * strides[0] + h * strides[1] + rows[:, None] * strides[2] + dims[None, :]


@triton.jit
def adapter_probs(q, ka, La2, scale_log2, adapter, DOT_PRECISION: tl.constexpr):
    """Pa (BLOCK_M, BLOCK_A) fp32 from the saved adapter log-sum-exp (base 2); padded slots are 0."""
    slots = tl.arange(0, adapter.BLOCK_A)
    logits = tl.dot(q, tl.trans(ka), input_precision=DOT_PRECISION) * scale_log2
    probs = tl.exp2(logits - La2[:, None])
    return tl.where(slots[None, :] < adapter.length, probs, 0.0)


# Segments are unrolled (tl.static_range): each costs a masked row max and sum over the adapter tile.
MAX_SEGMENTS = 8


def adapter_block(adapter_len: int) -> int:
    """BLOCK_A: the adapter slots padded to a power of two (at least 16, the smallest dot extent)."""
    return max(16, triton.next_power_of_2(adapter_len))


@functools.lru_cache(maxsize=64)
def slot_segments(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(BLOCK_A,) int32: the segment of each adapter slot (segments are consecutive slot ranges of the
    given sizes); padded slots get len(sizes), which matches no segment. Cached: one small upload per
    segment layout and device, not per layer call."""
    segment = torch.full((adapter_block(sum(sizes)),), len(sizes), dtype=torch.int32)
    segment[:sum(sizes)] = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(sizes))
    return segment.to(device)


@triton.jit
def segment_slot_lse(adapter, stat, row_ok, slot_segment, BLOCK_M: tl.constexpr):
    """(BLOCK_M, BLOCK_A): the saved base-2 LSE of each slot's segment, so that Pa^s = exp2(logits - it)."""
    slot_lse = tl.zeros([BLOCK_M, adapter.BLOCK_A], dtype=tl.float32)
    for segment in tl.static_range(adapter.NUM_SEGMENTS):
        lse = tl.load(adapter.lse2 + segment * adapter.segment_stride + stat, mask=row_ok, other=0.0)
        slot_lse = tl.where((slot_segment == segment)[None, :], lse[:, None], slot_lse)
    return slot_lse


@triton.jit
def cause_bits(MaskBits, query, query_ok, key0, mask_words, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               KEYS_AS_ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """A[query, key0 : key0 + BLOCK_N] as fp32 0/1 from one sample's packed words (bit t of word w is
    column 32 w + t): (BLOCK_M, BLOCK_N), or its transpose (BLOCK_N, BLOCK_M) with KEYS_AS_ROWS.

    One (BLOCK_M, BLOCK_N / 32) tile of words is loaded and its bits expanded with shifts: a
    per-element gather of the words landed in a layout other than P's and cost a conversion through
    shared memory every iteration, plus 32 redundant loads per word. ALIGNED: key0 is a multiple of
    32 (tiles of one sample); packed sequences start anywhere, so their tile straddles words and
    takes bits from two neighbouring words."""
    WORDS: tl.constexpr = BLOCK_N // 32
    word0 = key0 >> 5
    word = word0 + tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    if KEYS_AS_ROWS:  # (words, bits, queries)
        offsets = query[None, :] * mask_words + word[:, None]
        load_ok = query_ok[None, :] & (word < mask_words)[:, None]
        shape: tl.constexpr = (BLOCK_N, BLOCK_M)
        low = tl.load(MaskBits + offsets, mask=load_ok, other=0)[:, None, :]
        position = bit[None, :, None]
    else:  # (queries, words, bits)
        offsets = query[:, None] * mask_words + word[None, :]
        load_ok = query_ok[:, None] & (word < mask_words)[None, :]
        shape: tl.constexpr = (BLOCK_M, BLOCK_N)
        low = tl.load(MaskBits + offsets, mask=load_ok, other=0)[:, :, None]
        position = bit[None, None, :]
    if ALIGNED:
        bits = (low >> position) & 1
    else:
        if KEYS_AS_ROWS:
            high = tl.load(MaskBits + offsets + 1, mask=query_ok[None, :] & (word + 1 < mask_words)[:, None],
                           other=0)[:, None, :]
        else:
            high = tl.load(MaskBits + offsets + 1, mask=query_ok[:, None] & (word + 1 < mask_words)[None, :],
                           other=0)[:, :, None]
        position = position + (key0 & 31)
        bits = (tl.where(position < 32, low, high) >> (position & 31)) & 1
    return tl.reshape(bits, shape).to(tl.float32)
