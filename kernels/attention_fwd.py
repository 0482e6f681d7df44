"""Fused attention forward: FlashAttention-2 online softmax + zero-init gated adapter + CAT mass + XG.

One program per (query tile, sample-or-sequence x query head). In one pass over the key tiles it
produces (SPEC §4):

    Out   (B, Hq, Nq, d)  P V + sum_s gamma_s Pa^s Va   P over visible keys, Pa^s over the slots of segment s
    Lse   (B, Hq, Nq)     natural-log LSE of the sequence scores; +inf where a row sees no key
    AdapterLse2 (B, Hq, Nq)  base-2 LSE of the adapter scores (saved for the backward only);
                      (S, B, Hq, Nq) with S > 1 segments (SPEC §7), one per segment
    Mass  (B, Hq, Nq)     m_i = sum_j P_ij A_ij: one more fp32 accumulator rescaled like the softmax sum
    XgPartial (S*Hq, row tiles, BLOCK_D)  per-tile weighted sums of z_i (pooled XG, first level)
    XgRows (B, Hq, Nq, d) z_i per row (xg_pool="position")

GQA reads KV head h // G (never repeated). Packed sequences (cu_seqlens) give each sequence its own
programs; q/k/v/out rows are then offset by the sequence start. Gates are (1 or B, S, Hq): per
segment and query head, optionally per sample. Feature flags are constexpr: with all of them off this
is plain FlashAttention-2, and one segment compiles to the single-softmax adapter of SPEC §1.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from causalattn.kernels.jit_helpers import LN2, LOG2E, adapter_block, cause_bits, sequence_bounds, tile_summary
from causalattn.kernels.tiles import tile_config


@triton.jit
def _fwd_key_tiles(
    acc, row_sum, row_max, mass_acc, q, K, V, KeyMask, MaskBits, MaskTiles,
    row0, rows, row_ok, dims, dim_ok, lo, hi, len_k, offset, mask_words, tile_flags_row, key_mask_row,
    stride_kn, stride_vn, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, SUPERVISION: tl.constexpr, TILE_SKIP: tl.constexpr, ALIGNED_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi). MASKED tiles apply the causal / length mask per element;
    the others are entirely visible and skip it."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        kv_ok = dim_ok[None, :]  # visible tiles lie inside the keys: only padded head dims need a mask
        if MASKED:
            kv_ok = col_ok[:, None] & kv_ok
        k = tl.load(K + cols[:, None] * stride_kn + dims[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + dims[None, :], mask=kv_ok, other=0.0)
        # Raw scores: the scale (> 0, checked by the caller) is folded into the max and into one FMA
        # in the exponent, instead of one more multiply per element before the max.
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + offset)
            scores = tl.where(visible, scores, float("-inf"))
        if HAS_KEY_MASK:
            real = tl.load(KeyMask + key_mask_row + cols, mask=col_ok, other=0)
            scores = tl.where(real[None, :] != 0, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * scale_log2)
        # A row that has seen no key yet keeps max = -inf; exponentiate against 0 instead (no NaN).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - safe_max)
        p = tl.exp2(scores * scale_log2 - safe_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if SUPERVISION:
            mass_acc = mass_acc * rescale
            has_bits = 1
            if TILE_SKIP:
                has_bits = tl.load(MaskTiles + tile_flags_row + n0 // BLOCK_N)
            if has_bits != 0:
                causes = cause_bits(MaskBits, row0 + rows, row_ok, row0 + n0, mask_words, BLOCK_M, BLOCK_N,
                                    False, ALIGNED_BITS)
                mass_acc += tl.sum(p * causes, 1)
        row_max = new_max
    return acc, row_sum, row_max, mass_acc


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, AdapterLse2, Mass, XgPartial, XgRows,
    KeyLengths, KeyMask, CuSeqlens, AdapterKeys, AdapterValues, Gamma, SlotSegment, MaskBits, MaskTiles, XgWeight,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    n_q, n_k, heads_q, group, scale_log2, adapter_len, adapter_batch_stride, segment_stride, mask_words,
    n_row_tiles, n_col_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr, NUM_SEGMENTS: tl.constexpr, GATE_PER_SAMPLE: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, ADAPTER: tl.constexpr, SUPERVISION: tl.constexpr, TILE_SKIP: tl.constexpr,
    XG_TOKENS: tl.constexpr, XG_POOLED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Query tiles on the slower grid axis: with causal masking the last tiles see the most keys, so
    # every head's longest tiles launch first and the short ones fill the tail of the last wave.
    tile = tl.program_id(1)
    if CAUSAL:
        tile = tl.num_programs(1) - 1 - tile
    s = tl.program_id(0) // heads_q
    h = tl.program_id(0) % heads_q
    kv_head = h // group
    b, row0, len_q, len_k, offset = sequence_bounds(CuSeqlens, KeyLengths, s, n_q, n_k, VARLEN, HAS_KEY_LENGTHS)
    m0 = tile * BLOCK_M
    if m0 >= len_q:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + (row0 + rows)[:, None] * stride_qn + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    K += b64 * stride_kb + kv_head * stride_kh + row0 * stride_kn
    V += b64 * stride_vb + kv_head * stride_vh + row0 * stride_vn
    stat = (b64 * heads_q + h) * n_q + row0 + rows

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    mass_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Key tiles [0, full_end) are visible to every row of this query tile; [full_end, hi) need masks.
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + offset)
    full_end = (len_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_end = tl.minimum(full_end, ((m0 + offset + 1) // BLOCK_N) * BLOCK_N)
    full_end = tl.maximum(full_end, 0)
    MaskBits += b64 * n_q * mask_words
    tile_flags_row = (b * n_row_tiles + tile) * n_col_tiles
    key_mask_row = b64 * n_k
    acc, row_sum, row_max, mass_acc = _fwd_key_tiles(
        acc, row_sum, row_max, mass_acc, q, K, V, KeyMask, MaskBits, MaskTiles,
        row0, rows, row_ok, dims, dim_ok, 0, full_end, len_k, offset, mask_words, tile_flags_row, key_mask_row,
        stride_kn, stride_vn, scale_log2,
        BLOCK_M, BLOCK_N, False, CAUSAL, HAS_KEY_MASK, SUPERVISION, TILE_SKIP, not VARLEN, DOT_PRECISION)
    acc, row_sum, row_max, mass_acc = _fwd_key_tiles(
        acc, row_sum, row_max, mass_acc, q, K, V, KeyMask, MaskBits, MaskTiles,
        row0, rows, row_ok, dims, dim_ok, full_end, hi, len_k, offset, mask_words, tile_flags_row, key_mask_row,
        stride_kn, stride_vn, scale_log2,
        BLOCK_M, BLOCK_N, True, CAUSAL, HAS_KEY_MASK, SUPERVISION, TILE_SKIP, not VARLEN, DOT_PRECISION)

    # Not "> 0": a NaN sum (a +inf or NaN score) must give NaN out and LSE, not a row that saw no key.
    seen = row_sum != 0.0
    inv_sum = tl.where(seen, 1.0 / tl.where(seen, row_sum, 1.0), 0.0)
    out = acc * inv_sum[:, None]
    tl.store(Lse + stat, tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("inf")),
             mask=row_ok)
    if SUPERVISION:
        tl.store(Mass + stat, mass_acc * inv_sum, mask=row_ok)

    if ADAPTER:
        # The adapter tile: M <= 64 prompt slots, its own softmax, never masked (SPEC §1).
        slots = tl.arange(0, BLOCK_A)
        slot_ok = slots < adapter_len
        adapter_base = b64 * adapter_batch_stride + kv_head * adapter_len * HEAD_DIM
        adapter_ptrs = adapter_base + slots[:, None] * HEAD_DIM + dims[None, :]
        ka = tl.load(AdapterKeys + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        va = tl.load(AdapterValues + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        logits = tl.dot(q, tl.trans(ka), input_precision=DOT_PRECISION) * scale_log2
        logits = tl.where(slot_ok[None, :], logits, float("-inf"))
        gate_row = 0
        if GATE_PER_SAMPLE:
            gate_row = b64 * NUM_SEGMENTS * heads_q
        if NUM_SEGMENTS == 1:
            adapter_max = tl.max(logits, 1)
            pa = tl.exp2(logits - adapter_max[:, None])
            adapter_sum = tl.sum(pa, 1)
            pa = pa / adapter_sum[:, None]
            tl.store(AdapterLse2 + stat, adapter_max + tl.log2(adapter_sum), mask=row_ok)
            gamma = tl.load(Gamma + gate_row + h)
            out += gamma * tl.dot(pa.to(va.dtype), va, input_precision=DOT_PRECISION)
        else:
            # Segments (SPEC §7): one softmax per segment of consecutive slots, each with its own gate;
            # slot_lse holds each slot's segment LSE, so Pa^s = exp2(logits - slot_lse) in one pass.
            slot_segment = tl.load(SlotSegment + slots)
            slot_lse = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
            for segment in tl.static_range(NUM_SEGMENTS):
                in_segment = (slot_segment == segment)[None, :]
                segment_logits = tl.where(in_segment, logits, float("-inf"))
                segment_max = tl.max(segment_logits, 1)
                segment_lse = segment_max + tl.log2(tl.sum(tl.exp2(segment_logits - segment_max[:, None]), 1))
                tl.store(AdapterLse2 + segment * segment_stride + stat, segment_lse, mask=row_ok)
                slot_lse = tl.where(in_segment, segment_lse[:, None], slot_lse)
            slot_gamma = tl.load(Gamma + gate_row + slot_segment * heads_q + h, mask=slot_segment < NUM_SEGMENTS, other=0.0)
            gated = tl.exp2(logits - slot_lse) * slot_gamma[None, :]  # gamma_s Pa^s: 0 on padded slots
            out += tl.dot(gated.to(va.dtype), va, input_precision=DOT_PRECISION)
        if XG_TOKENS > 0:
            if NUM_SEGMENTS == 1:
                pa_general = tl.where(slots[None, :] < XG_TOKENS, pa, 0.0)
                z = gamma * tl.dot(pa_general.to(va.dtype), va, input_precision=DOT_PRECISION)
            else:  # the XG slots lie in the first segment
                z = tl.dot(tl.where(slots[None, :] < XG_TOKENS, gated, 0.0).to(va.dtype), va,
                           input_precision=DOT_PRECISION)
            if XG_POOLED:
                weight = tl.load(XgWeight + b64 * n_q + row0 + rows, mask=row_ok, other=0.0)
                partial = tl.sum(z * weight[:, None], 0)
                tl.store(XgPartial + ((s * heads_q + h) * n_row_tiles + tile) * BLOCK_D + dims, partial)
            else:
                tl.store(XgRows + stat[:, None] * HEAD_DIM + dims[None, :], z, mask=row_ok[:, None] & dim_ok[None, :])

    o_ptrs = Out + b64 * stride_ob + h * stride_oh + (row0 + rows)[:, None] * stride_on + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
    key_lengths: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int, adapter_keys: Optional[torch.Tensor], adapter_values: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor], mask_bits: Optional[torch.Tensor], xg_tokens: int,
    xg_weight: Optional[torch.Tensor], xg_pooled: bool, num_samples: int, slot_segment: Optional[torch.Tensor] = None,
):
    """Launch the forward kernel. Inputs are validated by the caller; k/v/q/out keep their strides
    (last dim contiguous); small side tensors are contiguous. `gamma` (1 or B, S, Hq) fp32 for S
    segments; with S > 1, `slot_segment` maps each adapter slot to its segment (`slot_segments`).
    Returns (out, lse, adapter_lse2 | None, mass | None, xg | None); adapter_lse2 is (S, B, Hq, Nq)
    with segments, (B, Hq, Nq) without."""
    batch, heads_q, n_q, head_dim = q.shape
    heads_kv, n_k = k.shape[1], k.shape[2]
    config = tile_config(head_dim, "fwd", q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    device = q.device
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads_q, n_q, device=device, dtype=torch.float32)
    has_adapter = adapter_keys is not None
    supervision = mask_bits is not None
    num_segments = gamma.shape[-2] if has_adapter else 1
    adapter_lse2 = None
    if has_adapter:
        adapter_lse2 = torch.empty_like(lse) if num_segments == 1 else lse.new_empty(num_segments, *lse.shape)
    mass = torch.empty_like(lse) if supervision else None
    n_row_tiles = triton.cdiv(max_seqlen, config.block_m)
    xg_partial = xg_rows = None
    if xg_tokens and xg_pooled:
        xg_partial = torch.zeros(num_samples * heads_q, n_row_tiles, block_d, device=device, dtype=torch.float32)
    elif xg_tokens:
        xg_rows = torch.empty(batch, heads_q, n_q, head_dim, device=device, dtype=torch.float32)
    varlen = cu_seqlens is not None
    tile_skip = supervision and not varlen
    tiles = tile_summary(mask_bits, config.block_m, config.block_n) if tile_skip else None
    adapter_len = adapter_keys.shape[-2] if has_adapter else 0
    dummy = lse  # stands in for absent optional pointers; never dereferenced (constexpr-guarded)
    grid = (num_samples * heads_q, n_row_tiles)
    _fwd_kernel[grid](
        q, k, v, out, lse, adapter_lse2 if has_adapter else dummy, mass if supervision else dummy,
        xg_partial if xg_partial is not None else dummy, xg_rows if xg_rows is not None else dummy,
        key_lengths if key_lengths is not None else dummy, key_mask if key_mask is not None else dummy,
        cu_seqlens if varlen else dummy, adapter_keys if has_adapter else dummy,
        adapter_values if has_adapter else dummy, gamma if has_adapter else dummy,
        slot_segment if num_segments > 1 else dummy, mask_bits if supervision else dummy, tiles if tile_skip else dummy,
        xg_weight if xg_weight is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n_q, n_k, heads_q, heads_q // heads_kv, scale * LOG2E.value, adapter_len,
        heads_kv * adapter_len * head_dim if has_adapter and adapter_keys.dim() == 4 else 0, lse.numel(),
        mask_bits.shape[2] if supervision else 0,
        n_row_tiles, tiles.shape[2] if tile_skip else 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_A=adapter_block(adapter_len), NUM_SEGMENTS=num_segments,
        GATE_PER_SAMPLE=has_adapter and gamma.shape[0] > 1, CAUSAL=causal, VARLEN=varlen,
        HAS_KEY_LENGTHS=key_lengths is not None, HAS_KEY_MASK=key_mask is not None, ADAPTER=has_adapter,
        SUPERVISION=supervision, TILE_SKIP=tile_skip, XG_TOKENS=xg_tokens, XG_POOLED=xg_pooled,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    xg = None
    if xg_partial is not None:
        xg = xg_partial.sum(1)[:, :head_dim].view(num_samples, heads_q, head_dim)
    elif xg_rows is not None:
        xg = xg_rows
    return out, lse, adapter_lse2, mass, xg
