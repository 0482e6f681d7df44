"""Fused attention backward: FlashAttention-2 sweeps with the adapter, CAT and XG fold-ins (SPEC §1-§4).

Three launches, no N x N tensor and no atomics (deterministic):

1. `_bwd_rows_kernel`, one program per (chunk of query tiles, sample x KV head), looping over the
   G query heads of the KV head: the row term
       D_i = dO_i.O_i - gamma dO_i.O^a_i + c_i m_i - dlse_i
   (c = dL/dm, the CAT fold-in; dlse makes the LSE output differentiable), and the adapter
   gradients dKa, dVa, dgamma summed over its rows in fp32 registers, written as per-chunk partials
   that one torch.sum reduces (over chunks, and over samples for shared adapters).
2. `_bwd_dkdv_kernel`, one program per (key tile, sample x KV head): dK, dV over the G query heads
   and all query tiles that see the key tile, recomputing P = exp2(S - lse) with dP += c_i A_ij,
   with keys as rows (Pt = exp2(K Qt - lse), dSt) so both products read them from registers.
3. `_bwd_dq_kernel`, one program per (query tile, sample x query head): dQ over the key tiles, plus
   the adapter part tau * dT Ka recomputed here (O(BLOCK_M x M x d), cheaper than storing it).

Adapter terms per row (XG fold-in: dz_i from dxg, pooled rows get dxg_s / |V_s|):
    e_im = (dO_i + [m < H_g] dz_i) . va_m,  dPa = gamma e,  Da_i = sum_m Pa_im dPa_im,
    dT_im = Pa_im (dPa_im - Da_i),  dQ_i += tau sum_m dT_im ka_m,  dKa_m = tau sum_i dT_im q_i,
    dVa_m = gamma sum_i Pa_im (dO_i + [m < H_g] dz_i),  dgamma = sum_i dO_i.O^a_i + dz_i.O^{aG}_i
With segments (SPEC §7) each slot m uses its segment's gamma_s and Pa^s, Da^s_i sums over the slots of
s only, and dgamma_s over them (per sample with per-sample gates); XG slots lie in segment 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from causalattn.kernels.autotune import launch_tuned
from causalattn.kernels.jit_helpers import (
    LOG2E, adapter_block, adapter_probs, cause_bits, query_tile_flags, segment_slot_lse, sequence_bounds, tile_summary,
)
from causalattn.kernels.tiles import tile_config

# Programs the row kernel aims for: a few waves of 132 SMs, while keeping the fp32 partials
# (chunks x samples x Hkv x M x d) at a few MB.
_ROW_PROGRAMS_TARGET = 528


@triton.jit
def _adapter_row_terms(q, do, dz, weight, ka, va, La2, gamma, scale_log2, adapter_len,
                       BLOCK_A: tl.constexpr, XG_TOKENS: tl.constexpr, XG_POOLED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """(Pa, Pa restricted to the XG slots, dT, dO_i.O^a_i, dgamma per row) of one query tile.

    With e_im = (dO_i + [m < H_g] dz_i).va_m: dO_i.O^a_i = sum_m Pa_im dO_i.va_m and the row's dgamma
    dO_i.O^a_i + dz_i.O^{aG}_i = sum_m Pa_im e_im, so O^a and O^{aG} (two BLOCK_M x d fp32 tiles and
    their dots) are never formed; Da_i = gamma * that sum."""
    pa = adapter_probs(q, ka, La2, scale_log2, adapter_len, BLOCK_A, DOT_PRECISION)
    e = tl.dot(do, tl.trans(va), input_precision=DOT_PRECISION)
    do_dot_oa = tl.sum(pa * e, 1)
    pa_general = pa
    if XG_TOKENS > 0:
        slots = tl.arange(0, BLOCK_A)
        pa_general = tl.where(slots[None, :] < XG_TOKENS, pa, 0.0)
        dz_dot_va = _dz_dot_va(dz, weight, va, XG_POOLED, DOT_PRECISION)
        e += tl.where(slots[None, :] < XG_TOKENS, dz_dot_va, 0.0)
    dgamma_row = tl.sum(pa * e, 1)
    return pa, pa_general, gamma * pa * (e - dgamma_row[:, None]), do_dot_oa, dgamma_row


@triton.jit
def _segment_row_terms(q, do, dz, weight, ka, va, slot_lse, slot_gamma, slot_segment, scale_log2, adapter_len,
                       BLOCK_A: tl.constexpr, XG_TOKENS: tl.constexpr, XG_POOLED: tl.constexpr,
                       NUM_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`_adapter_row_terms` with segments (SPEC §7): (G = gamma_s Pa^s, G on the XG slots, dT,
    sum_s gamma_s dO_i.O^{a,s}_i, Pa e per slot: summed over a segment's slots and rows it is dgamma_s).

    dT_im = gamma_s Pa_im (e_im - sum_{m' in s} Pa_im' e_im') for the segment s of slot m."""
    slots = tl.arange(0, BLOCK_A)
    logits = tl.dot(q, tl.trans(ka), input_precision=DOT_PRECISION) * scale_log2
    pa = tl.where(slots[None, :] < adapter_len, tl.exp2(logits - slot_lse), 0.0)
    gated = pa * slot_gamma[None, :]
    e = tl.dot(do, tl.trans(va), input_precision=DOT_PRECISION)
    gated_do_dot_oa = tl.sum(gated * e, 1)
    gated_general = gated
    if XG_TOKENS > 0:  # the XG slots lie in the first segment
        gated_general = tl.where(slots[None, :] < XG_TOKENS, gated, 0.0)
        dz_dot_va = _dz_dot_va(dz, weight, va, XG_POOLED, DOT_PRECISION)
        e += tl.where(slots[None, :] < XG_TOKENS, dz_dot_va, 0.0)
    pe = pa * e
    segment_sum = tl.zeros_like(pe)
    for segment in tl.static_range(NUM_SEGMENTS):
        in_segment = (slot_segment == segment)[None, :]
        segment_sum = tl.where(in_segment, tl.sum(tl.where(in_segment, pe, 0.0), 1)[:, None], segment_sum)
    return gated, gated_general, gated * (e - segment_sum), gated_do_dot_oa, pe


@triton.jit
def _load_dz(dXg, XgWeight, xg_row, weight_row, stat, rows, row_ok, dims, dim_ok,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             XG_TOKENS: tl.constexpr, XG_POOLED: tl.constexpr):
    """(dz, weight): dL/dz for the rows of a tile. Pooled, dz_i = weight_i dxg_s is rank one: dz is
    then the (BLOCK_D,) dxg_s and weight the (BLOCK_M,) row weights, and `_dz_dot_va`, `_dz_va_grad`
    use the factors instead of a BLOCK_M x d fp32 tile and two dots; per row, dz is that tile."""
    weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    if XG_POOLED:
        weight = tl.load(XgWeight + weight_row + rows, mask=row_ok, other=0.0)
        dz = tl.load(dXg + xg_row + dims, mask=dim_ok, other=0.0)
    else:
        dz = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if XG_TOKENS > 0:
            dz = tl.load(dXg + stat[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    return dz, weight


@triton.jit
def _dz_dot_va(dz, weight, va, XG_POOLED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_A) dz_i . va_m."""
    if XG_POOLED:
        result = weight[:, None] * tl.sum(va.to(tl.float32) * dz[None, :], 1)[None, :]
    else:
        result = tl.dot(dz.to(va.dtype), tl.trans(va), input_precision=DOT_PRECISION)
    return result


@triton.jit
def _dz_va_grad(probs, dz, weight, XG_POOLED: tl.constexpr):
    """(BLOCK_A, BLOCK_D) sum_i probs_im dz_i."""
    if XG_POOLED:
        result = tl.sum(probs * weight[:, None], 0)[:, None] * dz[None, :]
    else:
        result = tl.dot(tl.trans(probs), dz, input_precision="ieee")
    return result


@triton.jit
def _bwd_rows_kernel(
    Q, Out, dOut, Lse, dLse, AdapterLse2, Mass, dMass, dXg, XgWeight, CuSeqlens, KeyLengths,
    AdapterKeys, AdapterValues, Gamma, SlotSegment, Delta, dKaPartial, dVaPartial, dGammaPartial,
    stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    n_q, n_k, heads_q, heads_kv, group, scale, scale_log2, adapter_len, adapter_batch_stride, segment_stride,
    tiles_per_chunk, num_samples,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, GATE_PER_SAMPLE: tl.constexpr, VARLEN: tl.constexpr, ADAPTER: tl.constexpr, SUPERVISION: tl.constexpr, HAS_DLSE: tl.constexpr,
    XG_TOKENS: tl.constexpr, XG_POOLED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    s = tl.program_id(1) // heads_kv
    kv_head = tl.program_id(1) % heads_kv
    b, row0, len_q, len_k, offset = sequence_bounds(CuSeqlens, KeyLengths, s, n_q, n_k, VARLEN, False)
    b64 = b.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    slots = tl.arange(0, BLOCK_A)
    slot_ok = slots < adapter_len
    first_tile = chunk * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(len_q, BLOCK_M))
    if ADAPTER:
        adapter_ptrs = b64 * adapter_batch_stride + kv_head * adapter_len * HEAD_DIM + slots[:, None] * HEAD_DIM + dims[None, :]
        ka = tl.load(AdapterKeys + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        va = tl.load(AdapterValues + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        dka = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
        dva = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
        gate_row = 0
        if GATE_PER_SAMPLE:
            gate_row = b64 * NUM_SEGMENTS * heads_q
        if NUM_SEGMENTS > 1:
            slot_segment = tl.load(SlotSegment + slots)
    for g in range(group):
        h = kv_head * group + g
        if NUM_SEGMENTS == 1:
            dgamma = tl.zeros([BLOCK_M], dtype=tl.float32)  # per-row sums, reduced once per head
        else:
            dgamma = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)  # per row and slot, summed per segment
        if ADAPTER:
            if NUM_SEGMENTS == 1:
                gamma = tl.load(Gamma + gate_row + h)
            else:
                slot_gamma = tl.load(Gamma + gate_row + slot_segment * heads_q + h, mask=slot_segment < NUM_SEGMENTS,
                                     other=0.0)
        for tile in range(first_tile, last_tile):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < len_q
            tile_mask = row_ok[:, None] & dim_ok[None, :]
            stat = (b64 * heads_q + h) * n_q + row0 + rows
            out = tl.load(Out + b64 * stride_ob + h * stride_oh + (row0 + rows)[:, None] * stride_on + dims[None, :],
                          mask=tile_mask, other=0.0).to(tl.float32)
            do = tl.load(dOut + b64 * stride_dob + h * stride_doh + (row0 + rows)[:, None] * stride_don + dims[None, :],
                         mask=tile_mask, other=0.0)
            delta = tl.sum(do.to(tl.float32) * out, 1)
            if SUPERVISION:
                delta += tl.load(dMass + stat, mask=row_ok, other=0.0) * tl.load(Mass + stat, mask=row_ok, other=0.0)
            if HAS_DLSE:
                lse = tl.load(Lse + stat, mask=row_ok, other=0.0)
                delta -= tl.where(lse == float("inf"), 0.0, tl.load(dLse + stat, mask=row_ok, other=0.0))
            if ADAPTER:
                q = tl.load(Q + b64 * stride_qb + h * stride_qh + (row0 + rows)[:, None] * stride_qn + dims[None, :],
                            mask=tile_mask, other=0.0)
                if NUM_SEGMENTS == 1:
                    La2 = tl.load(AdapterLse2 + stat, mask=row_ok, other=0.0)
                dz, weight = _load_dz(dXg, XgWeight, (s * heads_q + h) * HEAD_DIM, b64 * n_q + row0, stat, rows,
                                      row_ok, dims, dim_ok, HEAD_DIM, BLOCK_M, BLOCK_D, XG_TOKENS, XG_POOLED)
                if NUM_SEGMENTS == 1:
                    pa, pa_general, dt, do_dot_oa, dgamma_row = _adapter_row_terms(
                        q, do, dz, weight, ka, va, La2, gamma, scale_log2, adapter_len, BLOCK_A, XG_TOKENS, XG_POOLED,
                        DOT_PRECISION)
                    delta -= gamma * do_dot_oa
                    dgamma += dgamma_row
                    dka += tl.dot(tl.trans(dt).to(q.dtype), q, input_precision=DOT_PRECISION)
                    dva += gamma * tl.dot(tl.trans(pa).to(do.dtype), do, input_precision=DOT_PRECISION)
                    if XG_TOKENS > 0:
                        dva += gamma * _dz_va_grad(pa_general, dz, weight, XG_POOLED)
                else:
                    slot_lse = segment_slot_lse(AdapterLse2, stat, segment_stride, row_ok, slot_segment, NUM_SEGMENTS,
                                                BLOCK_M, BLOCK_A)
                    gated, gated_general, dt, gated_do_dot_oa, pe = _segment_row_terms(
                        q, do, dz, weight, ka, va, slot_lse, slot_gamma, slot_segment, scale_log2, adapter_len,
                        BLOCK_A, XG_TOKENS, XG_POOLED, NUM_SEGMENTS, DOT_PRECISION)
                    delta -= gated_do_dot_oa
                    dgamma += pe
                    dka += tl.dot(tl.trans(dt).to(q.dtype), q, input_precision=DOT_PRECISION)
                    dva += tl.dot(tl.trans(gated).to(do.dtype), do, input_precision=DOT_PRECISION)
                    if XG_TOKENS > 0:
                        dva += _dz_va_grad(gated_general, dz, weight, XG_POOLED)
            tl.store(Delta + stat, delta, mask=row_ok)
        if ADAPTER:
            gamma_partial = dGammaPartial + (chunk * num_samples + s) * NUM_SEGMENTS * heads_q + h
            if NUM_SEGMENTS == 1:
                tl.store(gamma_partial, tl.sum(dgamma, 0))
            else:
                slot_sums = tl.sum(dgamma, 0)
                for segment in tl.static_range(NUM_SEGMENTS):
                    tl.store(gamma_partial + segment * heads_q, tl.sum(tl.where(slot_segment == segment, slot_sums, 0.0), 0))
    if ADAPTER:
        partial = ((chunk * num_samples + s) * heads_kv + kv_head) * BLOCK_A * BLOCK_D
        tile_ptrs = partial + slots[:, None] * BLOCK_D + dims[None, :]
        tl.store(dKaPartial + tile_ptrs, dka * scale)
        tl.store(dVaPartial + tile_ptrs, dva)


@triton.jit
def _seq_probs(q, k, lse2, rows, cols, row_ok, col_ok, offset, KeyMask, key_mask_row, scale_log2,
               KEYS_AS_ROWS: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """P of one (query tile, key tile) recomputed from the saved base-2 LSE, or with KEYS_AS_ROWS its
    transpose Pt = exp2(K Qt - lse) (keys x queries), the orientation in which dV += Pt dO and
    dK += dSt Q use it (no transpose through shared memory). Unmasked tiles are entirely visible;
    rows past the sequence need no mask either, since their LSE loads as +inf and P = 0 there."""
    if KEYS_AS_ROWS:
        scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        query, key, query_ok, key_ok, lse2 = rows[None, :], cols[:, None], row_ok[None, :], col_ok[:, None], lse2[None, :]
    else:
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        query, key, query_ok, key_ok, lse2 = rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :], lse2[:, None]
    p = tl.exp2(scores * scale_log2 - lse2)
    if MASKED:
        visible = query_ok & key_ok
        if CAUSAL:
            visible = visible & (key <= query + offset)
        p = tl.where(visible, p, 0.0)
    if HAS_KEY_MASK:
        real = tl.load(KeyMask + key_mask_row + key, mask=key_ok, other=0)
        p = tl.where(real != 0, p, 0.0)
    return p


@triton.jit
def _seq_dscores(p, v, do, delta, c, rows, row_ok, MaskBits, has_bits, row0, n0, mask_words,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEYS_AS_ROWS: tl.constexpr,
                 SUPERVISION: tl.constexpr, ALIGNED_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dS = P (dP + c A - D) (or dSt with KEYS_AS_ROWS, dPt = V dOt). `has_bits`: whether this tile
    may carry cause bits for rows with a mass gradient (else A is not loaded)."""
    if KEYS_AS_ROWS:
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta, c = delta[None, :], c[None, :]
    else:
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        delta, c = delta[:, None], c[:, None]
    if SUPERVISION:
        if has_bits:
            dp += c * cause_bits(MaskBits, row0 + rows, row_ok, row0 + n0, mask_words, BLOCK_M, BLOCK_N,
                                 KEYS_AS_ROWS, ALIGNED_BITS)
    return p * (dp - delta)


@triton.jit
def _load_query_tile(Q, dOut, Lse, Delta, dMass, b64, h, row0, rows, row_ok, dims, dim_ok, n_q, heads_q,
                     stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                     BLOCK_M: tl.constexpr, SUPERVISION: tl.constexpr):
    """q, dO, base-2 LSE (+inf past the sequence, so P = 0 there), D and c = dL/dm of a query tile."""
    tile_mask = row_ok[:, None] & dim_ok[None, :]
    stat = (b64 * heads_q + h) * n_q + row0 + rows
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + (row0 + rows)[:, None] * stride_qn + dims[None, :],
                mask=tile_mask, other=0.0)
    do = tl.load(dOut + b64 * stride_dob + h * stride_doh + (row0 + rows)[:, None] * stride_don + dims[None, :],
                 mask=tile_mask, other=0.0)
    lse2 = tl.load(Lse + stat, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(Delta + stat, mask=row_ok, other=0.0)
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SUPERVISION:
        c = tl.load(dMass + stat, mask=row_ok, other=0.0)
    return q, do, lse2, delta, c, stat


@triton.jit
def _dkdv_query_tiles(
    dk, dv, k, v, Q, dOut, Lse, Delta, dMass, KeyMask, MaskBits, MaskTiles, GradTiles,
    b, b64, h, row0, lo, hi, len_q, offset, cols, col_ok, dims, dim_ok, key_tile, n_q, n_k, heads_q,
    stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
    mask_words, n_row_tiles, n_col_tiles, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, SUPERVISION: tl.constexpr, TILE_SKIP: tl.constexpr, ALIGNED_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over the query tiles [lo, hi) of head h, keys as rows."""
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < len_q
        q, do, lse2, delta, c, _ = _load_query_tile(
            Q, dOut, Lse, Delta, dMass, b64, h, row0, rows, row_ok, dims, dim_ok, n_q, heads_q,
            stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don, BLOCK_M, SUPERVISION)
        has_bits = 1
        if TILE_SKIP:  # scalar flags instead of a cross-warp max of |c| every iteration
            query_tile = m0 // BLOCK_M
            has_bits = tl.load(GradTiles + (b64 * heads_q + h) * n_row_tiles + query_tile) \
                & tl.load(MaskTiles + (b * n_row_tiles + query_tile) * n_col_tiles + key_tile)
        pt = _seq_probs(q, k, lse2, rows, cols, row_ok, col_ok, offset, KeyMask, b64 * n_k, scale_log2,
                        True, MASKED, CAUSAL, HAS_KEY_MASK, DOT_PRECISION)
        # dV before dPt: Pt's fp32 tile and dPt's are then not both live beside the dK, dV accumulators
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dst = _seq_dscores(pt, v, do, delta, c, rows, row_ok, MaskBits, has_bits, row0, key_tile * BLOCK_N, mask_words,
                           BLOCK_M, BLOCK_N, True, SUPERVISION, ALIGNED_BITS, DOT_PRECISION)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dMass, dK, dV, CuSeqlens, KeyLengths, KeyMask, MaskBits, MaskTiles, GradTiles,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    n_q, n_k, heads_q, heads_kv, group, scale, scale_log2, mask_words, n_row_tiles, n_col_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SUPERVISION: tl.constexpr, TILE_SKIP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    key_tile = tl.program_id(0)
    s = tl.program_id(1) // heads_kv
    kv_head = tl.program_id(1) % heads_kv
    b, row0, len_q, len_k, offset = sequence_bounds(CuSeqlens, KeyLengths, s, n_q, n_k, VARLEN, HAS_KEY_LENGTHS)
    n0 = key_tile * BLOCK_N
    # Padding keys past this sample's length get zero gradients; with packing the rows past a
    # sequence's end belong to the next sequence and must not be written.
    key_limit = n_k
    if VARLEN:
        key_limit = len_k
    if n0 >= len_k:
        if n0 < key_limit:
            cols = n0 + tl.arange(0, BLOCK_N)
            dims = tl.arange(0, BLOCK_D)
            zero_mask = (cols < key_limit)[:, None] & (dims < HEAD_DIM)[None, :]
            b64 = b.to(tl.int64)
            zeros = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            tl.store(dK + b64 * stride_dkb + kv_head * stride_dkh + (row0 + cols)[:, None] * stride_dkn + dims[None, :],
                     zeros.to(dK.dtype.element_ty), mask=zero_mask)
            tl.store(dV + b64 * stride_dvb + kv_head * stride_dvh + (row0 + cols)[:, None] * stride_dvn + dims[None, :],
                     zeros.to(dV.dtype.element_ty), mask=zero_mask)
        return
    b64 = b.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < len_k
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    key_ptrs = (row0 + cols)[:, None] * stride_kn + dims[None, :]
    k = tl.load(K + b64 * stride_kb + kv_head * stride_kh + key_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    v = tl.load(V + b64 * stride_vb + kv_head * stride_vh + (row0 + cols)[:, None] * stride_vn + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    MaskBits += b64 * n_q * mask_words
    first_row = 0
    if CAUSAL:
        first_row = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
    # Query tiles [first_row, split) need the causal / length mask for this key tile; the tiles from
    # split on see all of it. A key tile that crosses the sample's length is masked throughout.
    diagonal_end = first_row
    if CAUSAL:
        diagonal_end = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1 - offset, BLOCK_M) * BLOCK_M, first_row), len_q)
    split = tl.where(n0 + BLOCK_N <= len_k, diagonal_end, len_q)
    for g in range(group):
        h = kv_head * group + g
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, Q, dOut, Lse, Delta, dMass, KeyMask, MaskBits, MaskTiles, GradTiles,
            b, b64, h, row0, first_row, split, len_q, offset, cols, col_ok, dims, dim_ok, key_tile, n_q, n_k, heads_q,
            stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don, mask_words, n_row_tiles, n_col_tiles,
            scale_log2, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_KEY_MASK, SUPERVISION, TILE_SKIP, not VARLEN, DOT_PRECISION)
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, Q, dOut, Lse, Delta, dMass, KeyMask, MaskBits, MaskTiles, GradTiles,
            b, b64, h, row0, split, len_q, len_q, offset, cols, col_ok, dims, dim_ok, key_tile, n_q, n_k, heads_q,
            stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don, mask_words, n_row_tiles, n_col_tiles,
            scale_log2, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_KEY_MASK, SUPERVISION, TILE_SKIP, not VARLEN,
            DOT_PRECISION)
    store_mask = (cols < key_limit)[:, None] & dim_ok[None, :]
    tl.store(dK + b64 * stride_dkb + kv_head * stride_dkh + (row0 + cols)[:, None] * stride_dkn + dims[None, :],
             (dk * scale).to(dK.dtype.element_ty), mask=store_mask)
    tl.store(dV + b64 * stride_dvb + kv_head * stride_dvh + (row0 + cols)[:, None] * stride_dvn + dims[None, :],
             dv.to(dV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_key_tiles(
    dq, q, do, lse2, delta, c, rows_have_grad, K, V, KeyMask, MaskBits, MaskTiles, b, b64, tile, row0, rows, row_ok,
    lo, hi, len_k, offset, dims, dim_ok, n_k, stride_kn, stride_vn, mask_words, n_row_tiles, n_col_tiles, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, SUPERVISION: tl.constexpr, TILE_SKIP: tl.constexpr, ALIGNED_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query tile over the key tiles [lo, hi)."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        kv_ok = dim_ok[None, :]  # visible tiles lie inside the keys: only padded head dims need a mask
        if MASKED:
            kv_ok = col_ok[:, None] & kv_ok
        k = tl.load(K + cols[:, None] * stride_kn + dims[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + dims[None, :], mask=kv_ok, other=0.0)
        has_bits = rows_have_grad
        if TILE_SKIP:
            has_bits = has_bits & (tl.load(MaskTiles + (b * n_row_tiles + tile) * n_col_tiles + n0 // BLOCK_N) != 0)
        p = _seq_probs(q, k, lse2, rows, cols, row_ok, col_ok, offset, KeyMask, b64 * n_k, scale_log2,
                       False, MASKED, CAUSAL, HAS_KEY_MASK, DOT_PRECISION)
        ds = _seq_dscores(p, v, do, delta, c, rows, row_ok, MaskBits, has_bits, row0, n0, mask_words,
                          BLOCK_M, BLOCK_N, False, SUPERVISION, ALIGNED_BITS, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dMass, dQ, CuSeqlens, KeyLengths, KeyMask, MaskBits, MaskTiles,
    AdapterKeys, AdapterValues, AdapterLse2, Gamma, SlotSegment, dXg, XgWeight,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    n_q, n_k, heads_q, group, scale, scale_log2, adapter_len, adapter_batch_stride, segment_stride, mask_words,
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
    b64 = b.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tile_mask = row_ok[:, None] & dim_ok[None, :]
    q, do, lse2, delta, c, stat = _load_query_tile(
        Q, dOut, Lse, Delta, dMass, b64, h, row0, rows, row_ok, dims, dim_ok, n_q, heads_q,
        stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don, BLOCK_M, SUPERVISION)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rows_have_grad = 1
    if SUPERVISION:  # once per program: rows whose mass has no gradient skip the mask
        rows_have_grad = tl.max(tl.abs(c), 0) > 0.0
    if ADAPTER:
        slots = tl.arange(0, BLOCK_A)
        adapter_ptrs = b64 * adapter_batch_stride + kv_head * adapter_len * HEAD_DIM + slots[:, None] * HEAD_DIM + dims[None, :]
        slot_mask = (slots < adapter_len)[:, None] & dim_ok[None, :]
        ka = tl.load(AdapterKeys + adapter_ptrs, mask=slot_mask, other=0.0)
        va = tl.load(AdapterValues + adapter_ptrs, mask=slot_mask, other=0.0)
        if NUM_SEGMENTS == 1:
            La2 = tl.load(AdapterLse2 + stat, mask=row_ok, other=0.0)
        dz, weight = _load_dz(dXg, XgWeight, (s * heads_q + h) * HEAD_DIM, b64 * n_q + row0, stat, rows, row_ok,
                              dims, dim_ok, HEAD_DIM, BLOCK_M, BLOCK_D, XG_TOKENS, XG_POOLED)
        gate_row = 0
        if GATE_PER_SAMPLE:
            gate_row = b64 * NUM_SEGMENTS * heads_q
        if NUM_SEGMENTS == 1:
            _, _, dt, _, _ = _adapter_row_terms(q, do, dz, weight, ka, va, La2, tl.load(Gamma + gate_row + h),
                                                scale_log2, adapter_len, BLOCK_A, XG_TOKENS, XG_POOLED, DOT_PRECISION)
        else:
            slot_segment = tl.load(SlotSegment + slots)
            slot_gamma = tl.load(Gamma + gate_row + slot_segment * heads_q + h, mask=slot_segment < NUM_SEGMENTS,
                                 other=0.0)
            slot_lse = segment_slot_lse(AdapterLse2, stat, segment_stride, row_ok, slot_segment, NUM_SEGMENTS,
                                        BLOCK_M, BLOCK_A)
            _, _, dt, _, _ = _segment_row_terms(q, do, dz, weight, ka, va, slot_lse, slot_gamma, slot_segment,
                                                scale_log2, adapter_len, BLOCK_A, XG_TOKENS, XG_POOLED, NUM_SEGMENTS,
                                                DOT_PRECISION)
        dq = tl.dot(dt.to(ka.dtype), ka, input_precision=DOT_PRECISION)
    K += b64 * stride_kb + kv_head * stride_kh + row0 * stride_kn
    V += b64 * stride_vb + kv_head * stride_vh + row0 * stride_vn
    MaskBits += b64 * n_q * mask_words
    hi = len_k
    full_end = (len_k // BLOCK_N) * BLOCK_N  # key tiles [0, full_end) are visible to every row
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + offset)
        full_end = tl.maximum(tl.minimum(full_end, ((m0 + offset + 1) // BLOCK_N) * BLOCK_N), 0)
    dq = _dq_key_tiles(dq, q, do, lse2, delta, c, rows_have_grad, K, V, KeyMask, MaskBits, MaskTiles, b, b64, tile, row0, rows, row_ok,
                       0, full_end, len_k, offset, dims, dim_ok, n_k, stride_kn, stride_vn, mask_words, n_row_tiles,
                       n_col_tiles, scale_log2, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_KEY_MASK, SUPERVISION, TILE_SKIP,
                       not VARLEN, DOT_PRECISION)
    dq = _dq_key_tiles(dq, q, do, lse2, delta, c, rows_have_grad, K, V, KeyMask, MaskBits, MaskTiles, b, b64, tile, row0, rows, row_ok,
                       full_end, hi, len_k, offset, dims, dim_ok, n_k, stride_kn, stride_vn, mask_words, n_row_tiles,
                       n_col_tiles, scale_log2, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_KEY_MASK, SUPERVISION, TILE_SKIP,
                       not VARLEN, DOT_PRECISION)
    tl.store(dQ + b64 * stride_dqb + h * stride_dqh + (row0 + rows)[:, None] * stride_dqn + dims[None, :],
             (dq * scale).to(dQ.dtype.element_ty), mask=tile_mask)


def attention_backward(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], grad_mass: Optional[torch.Tensor],
    grad_xg: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, adapter_lse2: Optional[torch.Tensor], mass: Optional[torch.Tensor], *,
    causal: bool, scale: float, key_lengths: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], max_seqlen: int, adapter_keys: Optional[torch.Tensor],
    adapter_values: Optional[torch.Tensor], gamma: Optional[torch.Tensor], mask_bits: Optional[torch.Tensor],
    xg_tokens: int, xg_weight: Optional[torch.Tensor], xg_pooled: bool, num_samples: int,
    slot_segment: Optional[torch.Tensor] = None,
):
    """Launch the three backward kernels. `grad_mass`/`grad_xg`/`grad_lse` may be None (no fold-in);
    `gamma`, `slot_segment` and `adapter_lse2` as `attention_forward` takes and returns them.
    Returns (dq, dk, dv, d_adapter_keys | None, d_adapter_values | None, d_gamma | None)."""
    batch, heads_q, n_q, head_dim = q.shape
    heads_kv, n_k = k.shape[1], k.shape[2]
    rows_config = tile_config(head_dim, "rows", q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    device = q.device
    has_adapter = adapter_keys is not None
    supervision = mask_bits is not None and grad_mass is not None
    xg_tokens = xg_tokens if has_adapter and grad_xg is not None else 0
    varlen = cu_seqlens is not None
    tile_skip = supervision and not varlen
    adapter_len = adapter_keys.shape[-2] if has_adapter else 0
    block_a = adapter_block(adapter_len)
    num_segments = gamma.shape[-2] if has_adapter else 1
    gate_per_sample = has_adapter and gamma.shape[0] > 1
    adapter_batch_stride = heads_kv * adapter_len * head_dim if has_adapter and adapter_keys.dim() == 4 else 0
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_mass = grad_mass.contiguous() if supervision else None
    grad_xg = grad_xg.float().contiguous() if xg_tokens else None
    grad_lse = grad_lse.float().contiguous() if grad_lse is not None else None
    delta = torch.empty(batch, heads_q, n_q, device=device, dtype=torch.float32)
    dummy = delta  # stands in for absent optional pointers; never dereferenced (constexpr-guarded)
    n_row_tiles = triton.cdiv(max_seqlen, rows_config.block_m)

    tiles_per_chunk = max(1, triton.cdiv(n_row_tiles * num_samples * heads_kv, _ROW_PROGRAMS_TARGET))
    chunks = triton.cdiv(n_row_tiles, tiles_per_chunk)
    partial_shape = (chunks, num_samples, heads_kv, block_a, block_d)
    dka_partial = torch.empty(partial_shape, device=device, dtype=torch.float32) if has_adapter else None
    dva_partial = torch.empty_like(dka_partial) if has_adapter else None
    dgamma_partial = torch.empty(chunks, num_samples, num_segments, heads_q, device=device, dtype=torch.float32) \
        if has_adapter else None
    _bwd_rows_kernel[(chunks, num_samples * heads_kv)](
        q, out, grad_out, lse, grad_lse if grad_lse is not None else dummy,
        adapter_lse2 if has_adapter else dummy, mass if supervision else dummy,
        grad_mass if supervision else dummy, grad_xg if xg_tokens else dummy,
        xg_weight if xg_tokens and xg_pooled else dummy, cu_seqlens if varlen else dummy, dummy,
        adapter_keys if has_adapter else dummy, adapter_values if has_adapter else dummy,
        gamma if has_adapter else dummy, slot_segment if num_segments > 1 else dummy, delta,
        dka_partial if has_adapter else dummy, dva_partial if has_adapter else dummy,
        dgamma_partial if has_adapter else dummy,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        n_q, n_k, heads_q, heads_kv, heads_q // heads_kv, scale, scale * LOG2E.value, adapter_len, adapter_batch_stride,
        lse.numel(), tiles_per_chunk, num_samples,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=rows_config.block_m, BLOCK_A=block_a, NUM_SEGMENTS=num_segments,
        GATE_PER_SAMPLE=gate_per_sample, VARLEN=varlen,
        ADAPTER=has_adapter, SUPERVISION=supervision, HAS_DLSE=grad_lse is not None, XG_TOKENS=xg_tokens,
        XG_POOLED=xg_pooled, DOT_PRECISION=dot_precision, num_warps=rows_config.num_warps,
    )

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    key_lengths = key_lengths if key_lengths is not None else dummy
    key_mask = key_mask if key_mask is not None else dummy
    mask_words = mask_bits.shape[2] if supervision else 0
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, VARLEN=varlen,
                 HAS_KEY_LENGTHS=key_lengths is not dummy, HAS_KEY_MASK=key_mask is not dummy,
                 SUPERVISION=supervision, TILE_SKIP=tile_skip, DOT_PRECISION=dot_precision)
    max_keys = max_seqlen if varlen else n_k

    # The features that change the compiled dK/dV and dQ kernels: the autotuner's key.
    tuning_key = "+".join(name for name, on in (("causal", causal), ("varlen", varlen), ("adapter", has_adapter),
                                                ("segments", num_segments > 1), ("cat", supervision), ("xg", bool(xg_tokens)),
                                                ("key_lengths", key_lengths is not dummy), ("key_mask", key_mask is not dummy))
                          if on) or "none"

    def launch_dkdv(config):
        dkdv_rows = triton.cdiv(max_seqlen, config.block_m)
        dkdv_tiles = grad_tiles = dummy
        if tile_skip:
            dkdv_tiles = tile_summary(mask_bits, config.block_m, config.block_n)
            grad_tiles = query_tile_flags(grad_mass, config.block_m)
        _bwd_dkdv_kernel[(triton.cdiv(max_keys, config.block_n), num_samples * heads_kv)](
            q, k, v, grad_out, lse, delta, grad_mass if supervision else dummy, dk, dv,
            cu_seqlens if varlen else dummy, key_lengths, key_mask, mask_bits if supervision else dummy,
            dkdv_tiles, grad_tiles,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            n_q, n_k, heads_q, heads_kv, heads_q // heads_kv, scale, scale * LOG2E.value, mask_words, dkdv_rows,
            dkdv_tiles.shape[2] if tile_skip else 0,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
            num_stages=config.num_stages, **flags,
        )

    def launch_dq(config):
        dq_rows = triton.cdiv(max_seqlen, config.block_m)
        dq_tiles = tile_summary(mask_bits, config.block_m, config.block_n) if tile_skip else dummy
        _bwd_dq_kernel[(num_samples * heads_q, dq_rows)](
            q, k, v, grad_out, lse, delta, grad_mass if supervision else dummy, dq,
            cu_seqlens if varlen else dummy, key_lengths, key_mask, mask_bits if supervision else dummy, dq_tiles,
            adapter_keys if has_adapter else dummy, adapter_values if has_adapter else dummy,
            adapter_lse2 if has_adapter else dummy, gamma if has_adapter else dummy,
            slot_segment if num_segments > 1 else dummy, grad_xg if xg_tokens else dummy, xg_weight if xg_tokens and xg_pooled else dummy,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            n_q, n_k, heads_q, heads_q // heads_kv, scale, scale * LOG2E.value, adapter_len, adapter_batch_stride,
            lse.numel(), mask_words, dq_rows, dq_tiles.shape[2] if tile_skip else 0,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_A=block_a, NUM_SEGMENTS=num_segments,
            GATE_PER_SAMPLE=gate_per_sample, ADAPTER=has_adapter,
            XG_TOKENS=xg_tokens, XG_POOLED=xg_pooled, num_warps=config.num_warps, num_stages=config.num_stages,
            **flags,
        )

    launch_tuned("dkdv", head_dim, q.dtype, device, tuning_key, launch_dkdv)
    launch_tuned("dq", head_dim, q.dtype, device, tuning_key, launch_dq)
    if not has_adapter:
        return dq, dk, dv, None, None, None
    adapter_shape = adapter_keys.shape
    # Partials are per (chunk, sample or packed sequence); packed sequences share their row's adapter.
    reduce_dims = (0, 1) if adapter_keys.dim() == 3 or varlen else (0,)
    dka = dka_partial.sum(reduce_dims)[..., :adapter_len, :head_dim].reshape(adapter_shape)
    dva = dva_partial.sum(reduce_dims)[..., :adapter_len, :head_dim].reshape(adapter_shape)
    # Per-sample gates keep the sample axis (B = num_samples: packed sequences share one gate row).
    dgamma = dgamma_partial.sum(0) if gate_per_sample else dgamma_partial.sum((0, 1))
    dgamma = dgamma.reshape(gamma.shape)
    return dq, dk, dv, dka.to(adapter_keys.dtype), dva.to(adapter_values.dtype), dgamma
