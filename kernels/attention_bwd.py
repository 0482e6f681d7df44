"""Fused attention backward: FlashAttention-2 sweeps with the adapter, CAT and XG fold-ins (docs/math.md §1-§4).

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
With segments (docs/math.md §7) each slot m uses its segment's gamma_s and Pa^s, Da^s_i sums over the slots of
s only, and dgamma_s over them (per sample with per-sample gates); XG slots lie in segment 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from causalattn.kernels.arguments import (
    AdapterArgs, AdapterGrads, InputGrads, OpFlags, OpGrads, OpInputs, OpOutputs, Packing, RowInputs, Sizes,
    Supervision, Xg, absent,
)
from causalattn.kernels.attention_fwd import adapter_args, dot_precision
from causalattn.kernels.autotune import launch_tuned
from causalattn.kernels.jit_helpers import (
    LOG2E, adapter_probs, cause_bits, query_tile_flags, segment_slot_lse, sequence_bounds, tile_ptrs, tile_summary,
)
from causalattn.kernels.tiles import tile_config

# Programs the row kernel aims for: a few waves of 132 SMs, while keeping the fp32 partials
# (chunks x samples x Hkv x M x d) at a few MB.
_ROW_PROGRAMS_TARGET = 528


@triton.jit
def _adapter_row_terms(q, do, dz, weight, ka, va, La2, gamma, scale_log2, adapter, xg, DOT_PRECISION: tl.constexpr):
    """(Pa, Pa restricted to the XG slots, dT, dO_i.O^a_i, dgamma per row) of one query tile.

    With e_im = (dO_i + [m < H_g] dz_i).va_m: dO_i.O^a_i = sum_m Pa_im dO_i.va_m and the row's dgamma
    dO_i.O^a_i + dz_i.O^{aG}_i = sum_m Pa_im e_im, so O^a and O^{aG} (two BLOCK_M x d fp32 tiles and
    their dots) are never formed; Da_i = gamma * that sum."""
    pa = adapter_probs(q, ka, La2, scale_log2, adapter, DOT_PRECISION)
    e = tl.dot(do, tl.trans(va), input_precision=DOT_PRECISION)
    do_dot_oa = tl.sum(pa * e, 1)
    pa_general = pa
    if xg.tensor is not None:
        slots = tl.arange(0, adapter.BLOCK_A)
        pa_general = tl.where(slots[None, :] < xg.TOKENS, pa, 0.0)
        dz_dot_va = _dz_dot_va(dz, weight, va, xg.POOLED, DOT_PRECISION)
        e += tl.where(slots[None, :] < xg.TOKENS, dz_dot_va, 0.0)
    dgamma_row = tl.sum(pa * e, 1)
    return pa, pa_general, gamma * pa * (e - dgamma_row[:, None]), do_dot_oa, dgamma_row


@triton.jit
def _segment_row_terms(q, do, dz, weight, ka, va, slot_lse, slot_gamma, slot_segment, scale_log2, adapter, xg,
                       DOT_PRECISION: tl.constexpr):
    """`_adapter_row_terms` with segments (docs/math.md §7): (G = gamma_s Pa^s, G on the XG slots, dT,
    sum_s gamma_s dO_i.O^{a,s}_i, Pa e per slot: summed over a segment's slots and rows it is dgamma_s).

    dT_im = gamma_s Pa_im (e_im - sum_{m' in s} Pa_im' e_im') for the segment s of slot m."""
    slots = tl.arange(0, adapter.BLOCK_A)
    logits = tl.dot(q, tl.trans(ka), input_precision=DOT_PRECISION) * scale_log2
    pa = tl.where(slots[None, :] < adapter.length, tl.exp2(logits - slot_lse), 0.0)
    gated = pa * slot_gamma[None, :]
    e = tl.dot(do, tl.trans(va), input_precision=DOT_PRECISION)
    gated_do_dot_oa = tl.sum(gated * e, 1)
    gated_general = gated
    if xg.tensor is not None:  # the XG slots lie in the first segment
        gated_general = tl.where(slots[None, :] < xg.TOKENS, gated, 0.0)
        dz_dot_va = _dz_dot_va(dz, weight, va, xg.POOLED, DOT_PRECISION)
        e += tl.where(slots[None, :] < xg.TOKENS, dz_dot_va, 0.0)
    pe = pa * e
    segment_sum = tl.zeros_like(pe)
    for segment in tl.static_range(adapter.NUM_SEGMENTS):
        in_segment = (slot_segment == segment)[None, :]
        segment_sum = tl.where(in_segment, tl.sum(tl.where(in_segment, pe, 0.0), 1)[:, None], segment_sum)
    return gated, gated_general, gated * (e - segment_sum), gated_do_dot_oa, pe


@triton.jit
def _load_dz(xg, xg_row, weight_row, stat, rows, row_ok, dims, dim_ok,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(dz, weight): dL/dz for the rows of a tile. Pooled, dz_i = weight_i dxg_s is rank one: dz is
    then the (BLOCK_D,) dxg_s and weight the (BLOCK_M,) row weights, and `_dz_dot_va`, `_dz_va_grad`
    use the factors instead of a BLOCK_M x d fp32 tile and two dots; per row, dz is that tile."""
    weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    dz = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if xg.tensor is not None:
        if xg.POOLED:
            weight = tl.load(xg.weight + weight_row + rows, mask=row_ok, other=0.0)
            dz = tl.load(xg.tensor + xg_row + dims, mask=dim_ok, other=0.0)
        else:
            dz = tl.load(xg.tensor + stat[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                         other=0.0)
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
    Q, Out, dOut, Lse, dLse, Delta, q_strides, out_strides, do_strides, packing, adapter, adapter_grads,
    supervision, xg, sizes, scale, scale_log2, tiles_per_chunk, num_samples,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    heads_q = sizes.heads_q
    heads_kv = sizes.heads_kv
    n_q = sizes.n_q
    s = tl.program_id(1) // heads_kv
    kv_head = tl.program_id(1) % heads_kv
    b, row0, len_q, len_k, offset = sequence_bounds(packing, s, sizes)
    b64 = b.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    first_tile = chunk * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(len_q, BLOCK_M))
    if adapter.ka is not None:
        NUM_SEGMENTS: tl.constexpr = adapter.NUM_SEGMENTS
        BLOCK_A: tl.constexpr = adapter.BLOCK_A
        adapter_len = adapter.length
        slots = tl.arange(0, BLOCK_A)
        slot_ok = slots < adapter_len
        adapter_ptrs = b64 * adapter.batch_stride + kv_head * adapter_len * HEAD_DIM + slots[:, None] * HEAD_DIM + dims[None, :]
        ka = tl.load(adapter.ka + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        va = tl.load(adapter.va + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        dka = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
        dva = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
        gate_row = 0
        if adapter.GATE_PER_SAMPLE:
            gate_row = b64 * NUM_SEGMENTS * heads_q
        if NUM_SEGMENTS > 1:
            slot_segment = tl.load(adapter.slot_segment + slots)
    for g in range(sizes.group):
        h = kv_head * sizes.group + g
        if adapter.ka is not None:
            if NUM_SEGMENTS == 1:
                dgamma = tl.zeros([BLOCK_M], dtype=tl.float32)  # per-row sums, reduced once per head
                gamma = tl.load(adapter.gamma + gate_row + h)
            else:
                dgamma = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)  # per row and slot, summed per segment
                slot_gamma = tl.load(adapter.gamma + gate_row + slot_segment * heads_q + h,
                                     mask=slot_segment < NUM_SEGMENTS, other=0.0)
        for tile in range(first_tile, last_tile):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < len_q
            tile_mask = row_ok[:, None] & dim_ok[None, :]
            stat = (b64 * heads_q + h) * n_q + row0 + rows
            out = tl.load(tile_ptrs(Out, out_strides, b64, h, row0 + rows, dims), mask=tile_mask,
                          other=0.0).to(tl.float32)
            do = tl.load(tile_ptrs(dOut, do_strides, b64, h, row0 + rows, dims), mask=tile_mask, other=0.0)
            delta = tl.sum(do.to(tl.float32) * out, 1)
            if supervision.grad_mass is not None:
                delta += tl.load(supervision.grad_mass + stat, mask=row_ok, other=0.0) \
                    * tl.load(supervision.mass + stat, mask=row_ok, other=0.0)
            if dLse is not None:
                lse = tl.load(Lse + stat, mask=row_ok, other=0.0)
                delta -= tl.where(lse == float("inf"), 0.0, tl.load(dLse + stat, mask=row_ok, other=0.0))
            if adapter.ka is not None:
                q = tl.load(tile_ptrs(Q, q_strides, b64, h, row0 + rows, dims), mask=tile_mask, other=0.0)
                if NUM_SEGMENTS == 1:
                    La2 = tl.load(adapter.lse2 + stat, mask=row_ok, other=0.0)
                dz, weight = _load_dz(xg, (s * heads_q + h) * HEAD_DIM, b64 * n_q + row0, stat, rows, row_ok, dims,
                                      dim_ok, HEAD_DIM, BLOCK_M, BLOCK_D)
                if NUM_SEGMENTS == 1:
                    pa, pa_general, dt, do_dot_oa, dgamma_row = _adapter_row_terms(
                        q, do, dz, weight, ka, va, La2, gamma, scale_log2, adapter, xg, DOT_PRECISION)
                    delta -= gamma * do_dot_oa
                    dgamma += dgamma_row
                    dka += tl.dot(tl.trans(dt).to(q.dtype), q, input_precision=DOT_PRECISION)
                    dva += gamma * tl.dot(tl.trans(pa).to(do.dtype), do, input_precision=DOT_PRECISION)
                    if xg.tensor is not None:
                        dva += gamma * _dz_va_grad(pa_general, dz, weight, xg.POOLED)
                else:
                    slot_lse = segment_slot_lse(adapter, stat, row_ok, slot_segment, BLOCK_M)
                    gated, gated_general, dt, gated_do_dot_oa, pe = _segment_row_terms(
                        q, do, dz, weight, ka, va, slot_lse, slot_gamma, slot_segment, scale_log2, adapter, xg,
                        DOT_PRECISION)
                    delta -= gated_do_dot_oa
                    dgamma += pe
                    dka += tl.dot(tl.trans(dt).to(q.dtype), q, input_precision=DOT_PRECISION)
                    dva += tl.dot(tl.trans(gated).to(do.dtype), do, input_precision=DOT_PRECISION)
                    if xg.tensor is not None:
                        dva += _dz_va_grad(gated_general, dz, weight, xg.POOLED)
            tl.store(Delta + stat, delta, mask=row_ok)
        if adapter.ka is not None:
            gamma_partial = adapter_grads.dgamma + (chunk * num_samples + s) * NUM_SEGMENTS * heads_q + h
            if NUM_SEGMENTS == 1:
                tl.store(gamma_partial, tl.sum(dgamma, 0))
            else:
                slot_sums = tl.sum(dgamma, 0)
                for segment in tl.static_range(NUM_SEGMENTS):
                    tl.store(gamma_partial + segment * heads_q, tl.sum(tl.where(slot_segment == segment, slot_sums, 0.0), 0))
    if adapter.ka is not None:
        partial = ((chunk * num_samples + s) * heads_kv + kv_head) * BLOCK_A * BLOCK_D
        partial_ptrs = partial + slots[:, None] * BLOCK_D + dims[None, :]
        tl.store(adapter_grads.dka + partial_ptrs, dka * scale)
        tl.store(adapter_grads.dva + partial_ptrs, dva)


@triton.jit
def _seq_probs(q, k, lse2, rows, cols, row_ok, col_ok, offset, KeyMask, key_mask_row, scale_log2,
               KEYS_AS_ROWS: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P of one (query tile, key tile) recomputed from the saved base-2 LSE, or with KEYS_AS_ROWS its
    transpose Pt = exp2(K Qt - lse) (keys x queries), the orientation in which dV += Pt dO and
    dK += dSt Q use it (no transpose through shared memory). Unmasked tiles are entirely visible;
    rows past the sequence need no mask either, since their LSE loads as +inf and P = 0 there.
    `KeyMask`: None without a key mask."""
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
    if KeyMask is not None:
        real = tl.load(KeyMask + key_mask_row + key, mask=key_ok, other=0)
        p = tl.where(real != 0, p, 0.0)
    return p


@triton.jit
def _seq_dscores(p, v, do, delta, c, rows, row_ok, supervision, MaskBits, has_bits, row0, n0,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEYS_AS_ROWS: tl.constexpr,
                 ALIGNED_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dS = P (dP + c A - D) (or dSt with KEYS_AS_ROWS, dPt = V dOt). `has_bits`: whether this tile
    may carry cause bits for rows with a mass gradient (else A is not loaded)."""
    if KEYS_AS_ROWS:
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta, c = delta[None, :], c[None, :]
    else:
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        delta, c = delta[:, None], c[:, None]
    if supervision.bits is not None:
        if has_bits:
            dp += c * cause_bits(MaskBits, row0 + rows, row_ok, row0 + n0, supervision.words, BLOCK_M, BLOCK_N,
                                 KEYS_AS_ROWS, ALIGNED_BITS)
    return p * (dp - delta)


@triton.jit
def _load_query_tile(row_inputs, supervision, b64, h, row0, rows, row_ok, dims, dim_ok, sizes,
                     BLOCK_M: tl.constexpr):
    """(q, dO, base-2 LSE (+inf past the sequence, so P = 0 there), D, c = dL/dm) of a query tile,
    and the tile's offsets into the (B, Hq, Nq) statistics."""
    tile_mask = row_ok[:, None] & dim_ok[None, :]
    stat = (b64 * sizes.heads_q + h) * sizes.n_q + row0 + rows
    q = tl.load(tile_ptrs(row_inputs.q, row_inputs.q_strides, b64, h, row0 + rows, dims), mask=tile_mask,
                other=0.0)
    do = tl.load(tile_ptrs(row_inputs.grad_out, row_inputs.grad_out_strides, b64, h, row0 + rows, dims),
                 mask=tile_mask, other=0.0)
    lse2 = tl.load(row_inputs.lse + stat, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(row_inputs.delta + stat, mask=row_ok, other=0.0)
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    if supervision.grad_mass is not None:
        c = tl.load(supervision.grad_mass + stat, mask=row_ok, other=0.0)
    return (q, do, lse2, delta, c), stat


@triton.jit
def _dkdv_query_tiles(
    dk, dv, k, v, row_inputs, packing, supervision, MaskBits, seq, h, lo, hi, cols, col_ok, key_tile, dims, dim_ok,
    sizes, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over the query tiles [lo, hi) of head h, keys as rows."""
    b, row0, len_q, len_k, offset = seq
    b64 = b.to(tl.int64)
    KeyMask = packing.key_mask
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < len_q
        query, _ = _load_query_tile(row_inputs, supervision, b64, h, row0, rows, row_ok, dims, dim_ok, sizes, BLOCK_M)
        q, do, lse2, delta, c = query
        has_bits = 1
        if supervision.bits is not None:
            if supervision.tiles is not None:  # scalar flags instead of a cross-warp max of |c| every iteration
                query_tile = m0 // BLOCK_M
                has_bits = tl.load(supervision.grad_tiles + (b64 * sizes.heads_q + h) * supervision.n_row_tiles
                                   + query_tile) \
                    & tl.load(supervision.tiles + (b * supervision.n_row_tiles + query_tile) * supervision.n_col_tiles
                              + key_tile)
        pt = _seq_probs(q, k, lse2, rows, cols, row_ok, col_ok, offset, KeyMask, b64 * sizes.n_k, scale_log2,
                        True, MASKED, CAUSAL, DOT_PRECISION)
        # dV before dPt: Pt's fp32 tile and dPt's are then not both live beside the dK, dV accumulators
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dst = _seq_dscores(pt, v, do, delta, c, rows, row_ok, supervision, MaskBits, has_bits, row0,
                           key_tile * BLOCK_N, BLOCK_M, BLOCK_N, True, packing.cu_seqlens is None, DOT_PRECISION)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    row_inputs, K, V, dK, dV, k_strides, v_strides, dk_strides, dv_strides, packing, supervision, sizes, scale,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    key_tile = tl.program_id(0)
    s = tl.program_id(1) // sizes.heads_kv
    kv_head = tl.program_id(1) % sizes.heads_kv
    seq = sequence_bounds(packing, s, sizes)
    b, row0, len_q, len_k, offset = seq
    n0 = key_tile * BLOCK_N
    # Padding keys past this sample's length get zero gradients; with packing the rows past a
    # sequence's end belong to the next sequence and must not be written.
    key_limit = sizes.n_k
    if packing.cu_seqlens is not None:
        key_limit = len_k
    if n0 >= len_k:
        if n0 < key_limit:
            cols = n0 + tl.arange(0, BLOCK_N)
            dims = tl.arange(0, BLOCK_D)
            zero_mask = (cols < key_limit)[:, None] & (dims < HEAD_DIM)[None, :]
            b64 = b.to(tl.int64)
            zeros = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            tl.store(tile_ptrs(dK, dk_strides, b64, kv_head, row0 + cols, dims), zeros.to(dK.dtype.element_ty),
                     mask=zero_mask)
            tl.store(tile_ptrs(dV, dv_strides, b64, kv_head, row0 + cols, dims), zeros.to(dV.dtype.element_ty),
                     mask=zero_mask)
        return
    b64 = b.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < len_k
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    k = tl.load(tile_ptrs(K, k_strides, b64, kv_head, row0 + cols, dims), mask=col_ok[:, None] & dim_ok[None, :],
                other=0.0)
    v = tl.load(tile_ptrs(V, v_strides, b64, kv_head, row0 + cols, dims), mask=col_ok[:, None] & dim_ok[None, :],
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    MaskBits = None
    if supervision.bits is not None:
        MaskBits = supervision.bits + b64 * sizes.n_q * supervision.words
    first_row = 0
    if CAUSAL:
        first_row = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
    # Query tiles [first_row, split) need the causal / length mask for this key tile; the tiles from
    # split on see all of it. A key tile that crosses the sample's length is masked throughout.
    diagonal_end = first_row
    if CAUSAL:
        diagonal_end = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1 - offset, BLOCK_M) * BLOCK_M, first_row), len_q)
    split = tl.where(n0 + BLOCK_N <= len_k, diagonal_end, len_q)
    for g in range(sizes.group):
        h = kv_head * sizes.group + g
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, row_inputs, packing, supervision, MaskBits, seq, h, first_row, split, cols, col_ok, key_tile,
            dims, dim_ok, sizes, scale_log2, BLOCK_M, BLOCK_N, True, CAUSAL, DOT_PRECISION)
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, row_inputs, packing, supervision, MaskBits, seq, h, split, len_q, cols, col_ok, key_tile,
            dims, dim_ok, sizes, scale_log2, BLOCK_M, BLOCK_N, False, CAUSAL, DOT_PRECISION)
    store_mask = (cols < key_limit)[:, None] & dim_ok[None, :]
    tl.store(tile_ptrs(dK, dk_strides, b64, kv_head, row0 + cols, dims), (dk * scale).to(dK.dtype.element_ty),
             mask=store_mask)
    tl.store(tile_ptrs(dV, dv_strides, b64, kv_head, row0 + cols, dims), dv.to(dV.dtype.element_ty),
             mask=store_mask)


@triton.jit
def _dq_key_tiles(
    dq, query, rows_have_grad, K, V, k_strides, v_strides, packing, supervision, MaskBits, seq, tile, rows, row_ok,
    lo, hi, dims, dim_ok, sizes, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query tile over the key tiles [lo, hi); `query` is the tile's
    (q, dO, base-2 LSE, D, c) from `_load_query_tile`."""
    q, do, lse2, delta, c = query
    b, row0, len_q, len_k, offset = seq
    b64 = b.to(tl.int64)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        kv_ok = dim_ok[None, :]  # visible tiles lie inside the keys: only padded head dims need a mask
        if MASKED:
            kv_ok = col_ok[:, None] & kv_ok
        k = tl.load(K + cols[:, None] * k_strides[2] + dims[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + cols[:, None] * v_strides[2] + dims[None, :], mask=kv_ok, other=0.0)
        has_bits = rows_have_grad
        if supervision.bits is not None:
            if supervision.tiles is not None:
                has_bits = has_bits & (tl.load(supervision.tiles + (b * supervision.n_row_tiles + tile)
                                               * supervision.n_col_tiles + n0 // BLOCK_N) != 0)
        p = _seq_probs(q, k, lse2, rows, cols, row_ok, col_ok, offset, packing.key_mask, b64 * sizes.n_k, scale_log2,
                       False, MASKED, CAUSAL, DOT_PRECISION)
        ds = _seq_dscores(p, v, do, delta, c, rows, row_ok, supervision, MaskBits, has_bits, row0, n0,
                          BLOCK_M, BLOCK_N, False, packing.cu_seqlens is None, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    row_inputs, K, V, dQ, k_strides, v_strides, dq_strides, packing, adapter, supervision, xg, sizes, scale,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Query tiles on the slower grid axis: with causal masking the last tiles see the most keys, so
    # every head's longest tiles launch first and the short ones fill the tail of the last wave.
    tile = tl.program_id(1)
    if CAUSAL:
        tile = tl.num_programs(1) - 1 - tile
    heads_q = sizes.heads_q
    s = tl.program_id(0) // heads_q
    h = tl.program_id(0) % heads_q
    kv_head = h // sizes.group
    seq = sequence_bounds(packing, s, sizes)
    b, row0, len_q, len_k, offset = seq
    m0 = tile * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    tile_mask = row_ok[:, None] & dim_ok[None, :]
    query, stat = _load_query_tile(row_inputs, supervision, b64, h, row0, rows, row_ok, dims, dim_ok, sizes, BLOCK_M)
    q, do, lse2, delta, c = query
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rows_have_grad = 1
    if supervision.grad_mass is not None:  # once per program: rows whose mass has no gradient skip the mask
        rows_have_grad = tl.max(tl.abs(c), 0) > 0.0
    if adapter.ka is not None:
        NUM_SEGMENTS: tl.constexpr = adapter.NUM_SEGMENTS
        adapter_len = adapter.length
        slots = tl.arange(0, adapter.BLOCK_A)
        adapter_ptrs = b64 * adapter.batch_stride + kv_head * adapter_len * HEAD_DIM + slots[:, None] * HEAD_DIM + dims[None, :]
        slot_mask = (slots < adapter_len)[:, None] & dim_ok[None, :]
        ka = tl.load(adapter.ka + adapter_ptrs, mask=slot_mask, other=0.0)
        va = tl.load(adapter.va + adapter_ptrs, mask=slot_mask, other=0.0)
        if NUM_SEGMENTS == 1:
            La2 = tl.load(adapter.lse2 + stat, mask=row_ok, other=0.0)
        dz, weight = _load_dz(xg, (s * heads_q + h) * HEAD_DIM, b64 * sizes.n_q + row0, stat, rows, row_ok,
                              dims, dim_ok, HEAD_DIM, BLOCK_M, BLOCK_D)
        gate_row = 0
        if adapter.GATE_PER_SAMPLE:
            gate_row = b64 * NUM_SEGMENTS * heads_q
        if NUM_SEGMENTS == 1:
            _, _, dt, _, _ = _adapter_row_terms(q, do, dz, weight, ka, va, La2, tl.load(adapter.gamma + gate_row + h),
                                                scale_log2, adapter, xg, DOT_PRECISION)
        else:
            slot_segment = tl.load(adapter.slot_segment + slots)
            slot_gamma = tl.load(adapter.gamma + gate_row + slot_segment * heads_q + h,
                                 mask=slot_segment < NUM_SEGMENTS, other=0.0)
            slot_lse = segment_slot_lse(adapter, stat, row_ok, slot_segment, BLOCK_M)
            _, _, dt, _, _ = _segment_row_terms(q, do, dz, weight, ka, va, slot_lse, slot_gamma, slot_segment,
                                                scale_log2, adapter, xg, DOT_PRECISION)
        dq = tl.dot(dt.to(ka.dtype), ka, input_precision=DOT_PRECISION)
    K += b64 * k_strides[0] + kv_head * k_strides[1] + row0 * k_strides[2]
    V += b64 * v_strides[0] + kv_head * v_strides[1] + row0 * v_strides[2]
    MaskBits = None
    if supervision.bits is not None:
        MaskBits = supervision.bits + b64 * sizes.n_q * supervision.words
    hi = len_k
    full_end = (len_k // BLOCK_N) * BLOCK_N  # key tiles [0, full_end) are visible to every row
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + offset)
        full_end = tl.maximum(tl.minimum(full_end, ((m0 + offset + 1) // BLOCK_N) * BLOCK_N), 0)
    dq = _dq_key_tiles(dq, query, rows_have_grad, K, V, k_strides, v_strides, packing, supervision, MaskBits, seq, tile,
                       rows, row_ok, 0, full_end, dims, dim_ok, sizes, scale_log2, BLOCK_M, BLOCK_N, False, CAUSAL,
                       DOT_PRECISION)
    dq = _dq_key_tiles(dq, query, rows_have_grad, K, V, k_strides, v_strides, packing, supervision, MaskBits, seq, tile,
                       rows, row_ok, full_end, hi, dims, dim_ok, sizes, scale_log2, BLOCK_M, BLOCK_N, True, CAUSAL,
                       DOT_PRECISION)
    tl.store(tile_ptrs(dQ, dq_strides, b64, h, row0 + rows, dims), (dq * scale).to(dQ.dtype.element_ty),
             mask=tile_mask)


def attention_backward(grads: OpGrads, inputs: OpInputs, outputs: OpOutputs, flags: OpFlags) -> InputGrads:
    """Launch the three backward kernels. `grads.grad_mass`/`grad_xg`/`grad_lse` may be None (no
    fold-in); `outputs` as `attention_forward` returned them (its `xg` is not read). Returns the
    gradients of q, k, v and, with an adapter, of its keys, values and gamma (else None)."""
    q, k, v, out, lse = inputs.q, inputs.k, inputs.v, outputs.out, outputs.lse
    batch, heads_q, n_q, head_dim = q.shape
    heads_kv, n_k = k.shape[1], k.shape[2]
    rows_config = tile_config(head_dim, "rows", q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    device = q.device
    max_seqlen, num_samples = flags.max_seqlen, flags.num_samples
    has_adapter = inputs.adapter_keys is not None
    supervised = inputs.mask_bits is not None and grads.grad_mass is not None
    xg_tokens = flags.xg_tokens if has_adapter and grads.grad_xg is not None else 0
    varlen = inputs.cu_seqlens is not None
    tile_skip = supervised and not varlen
    adapter = adapter_args(inputs, outputs.adapter_lse2) if has_adapter else absent(AdapterArgs)
    num_segments = inputs.gamma.shape[-2] if has_adapter else 1
    block_a = adapter.BLOCK_A.value if has_adapter else 0
    precision = dot_precision(q.dtype)
    grad_out = grads.grad_out if grads.grad_out.stride(-1) == 1 else grads.grad_out.contiguous()
    grad_mass = grads.grad_mass.contiguous() if supervised else None
    grad_lse = grads.grad_lse.float().contiguous() if grads.grad_lse is not None else None
    xg = absent(Xg)
    if xg_tokens:
        xg = Xg(tensor=grads.grad_xg.float().contiguous(), weight=inputs.xg_weight if flags.xg_pooled else None,
                TOKENS=tl.constexpr(xg_tokens), POOLED=tl.constexpr(flags.xg_pooled))
    sizes = Sizes(n_q, n_k, heads_q, heads_kv, heads_q // heads_kv)
    scale, scale_log2 = flags.scale, flags.scale * LOG2E.value
    delta = torch.empty(batch, heads_q, n_q, device=device, dtype=torch.float32)
    n_row_tiles = triton.cdiv(max_seqlen, rows_config.block_m)

    tiles_per_chunk = max(1, triton.cdiv(n_row_tiles * num_samples * heads_kv, _ROW_PROGRAMS_TARGET))
    chunks = triton.cdiv(n_row_tiles, tiles_per_chunk)
    adapter_grads = absent(AdapterGrads)
    if has_adapter:
        partial_shape = (chunks, num_samples, heads_kv, block_a, block_d)
        adapter_grads = AdapterGrads(
            dka=torch.empty(partial_shape, device=device, dtype=torch.float32),
            dva=torch.empty(partial_shape, device=device, dtype=torch.float32),
            dgamma=torch.empty(chunks, num_samples, num_segments, heads_q, device=device, dtype=torch.float32))
    row_supervision = absent(Supervision)
    if supervised:
        row_supervision = Supervision(bits=None, tiles=None, words=0, n_row_tiles=0, n_col_tiles=0,
                                      mass=outputs.mass, grad_mass=grad_mass, grad_tiles=None)
    _bwd_rows_kernel[(chunks, num_samples * heads_kv)](
        q, out, grad_out, lse, grad_lse, delta, q.stride()[:3], out.stride()[:3], grad_out.stride()[:3],
        Packing(inputs.cu_seqlens, None, None), adapter, adapter_grads, row_supervision, xg, sizes, scale, scale_log2,
        tiles_per_chunk, num_samples,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=rows_config.block_m, DOT_PRECISION=precision,
        num_warps=rows_config.num_warps,
    )

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    packing = Packing(inputs.cu_seqlens, inputs.key_lengths, inputs.key_mask)
    row_inputs = RowInputs(q, grad_out, lse, delta, q.stride()[:3], grad_out.stride()[:3])
    flags_kw = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=flags.causal, DOT_PRECISION=precision)
    max_keys = max_seqlen if varlen else n_k

    # The features that change the compiled dK/dV and dQ kernels: the autotuner's key.
    tuning_key = "+".join(name for name, on in (
        ("causal", flags.causal), ("varlen", varlen), ("adapter", has_adapter), ("segments", num_segments > 1),
        ("cat", supervised), ("xg", bool(xg_tokens)), ("key_lengths", inputs.key_lengths is not None),
        ("key_mask", inputs.key_mask is not None)) if on) or "none"

    def sweep_supervision(config, with_grad_tiles: bool):
        """The CAT group of the dK/dV (with the query-tile flags) or dQ sweep at these tiles."""
        if not supervised:
            return absent(Supervision)
        rows = triton.cdiv(max_seqlen, config.block_m)
        tiles = tile_summary(inputs.mask_bits, config.block_m, config.block_n) if tile_skip else None
        grad_tiles = query_tile_flags(grad_mass, config.block_m) if tile_skip and with_grad_tiles else None
        return Supervision(bits=inputs.mask_bits, tiles=tiles, words=inputs.mask_bits.shape[2], n_row_tiles=rows,
                           n_col_tiles=tiles.shape[2] if tile_skip else 0, mass=None, grad_mass=grad_mass,
                           grad_tiles=grad_tiles)

    def launch_dkdv(config):
        _bwd_dkdv_kernel[(triton.cdiv(max_keys, config.block_n), num_samples * heads_kv)](
            row_inputs, k, v, dk, dv, k.stride()[:3], v.stride()[:3], dk.stride()[:3], dv.stride()[:3], packing,
            sweep_supervision(config, True), sizes, scale, scale_log2,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
            num_stages=config.num_stages, **flags_kw,
        )

    def launch_dq(config):
        _bwd_dq_kernel[(num_samples * heads_q, triton.cdiv(max_seqlen, config.block_m))](
            row_inputs, k, v, dq, k.stride()[:3], v.stride()[:3], dq.stride()[:3], packing, adapter,
            sweep_supervision(config, False), xg, sizes, scale, scale_log2,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
            num_stages=config.num_stages, **flags_kw,
        )

    launch_tuned("dkdv", head_dim, q.dtype, device, tuning_key, launch_dkdv)
    launch_tuned("dq", head_dim, q.dtype, device, tuning_key, launch_dq)
    if not has_adapter:
        return InputGrads(dq, dk, dv, None, None, None)
    adapter_keys, adapter_values, gamma = inputs.adapter_keys, inputs.adapter_values, inputs.gamma
    adapter_len = adapter_keys.shape[-2]
    # Partials are per (chunk, sample or packed sequence); packed sequences share their row's adapter.
    reduce_dims = (0, 1) if adapter_keys.dim() == 3 or varlen else (0,)
    dka = adapter_grads.dka.sum(reduce_dims)[..., :adapter_len, :head_dim].reshape(adapter_keys.shape)
    dva = adapter_grads.dva.sum(reduce_dims)[..., :adapter_len, :head_dim].reshape(adapter_keys.shape)
    # Per-sample gates keep the sample axis (B = num_samples: packed sequences share one gate row).
    dgamma = adapter_grads.dgamma.sum(0) if adapter.GATE_PER_SAMPLE.value else adapter_grads.dgamma.sum((0, 1))
    return InputGrads(dq, dk, dv, dka.to(adapter_keys.dtype), dva.to(adapter_values.dtype), dgamma.reshape(gamma.shape))
