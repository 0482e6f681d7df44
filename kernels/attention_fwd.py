"""Fused attention forward: FlashAttention-2 online softmax + zero-init gated adapter + CAT mass + XG.

One program per (query tile, sample-or-sequence x query head). In one pass over the key tiles it
produces (docs/math.md §4):

    Out   (B, Hq, Nq, d)  P V + sum_s gamma_s Pa^s Va   P over visible keys, Pa^s over the slots of segment s
    Lse   (B, Hq, Nq)     natural-log LSE of the sequence scores; +inf where a row sees no key
    AdapterLse2 (B, Hq, Nq)  base-2 LSE of the adapter scores (saved for the backward only);
                      (S, B, Hq, Nq) with S > 1 segments (docs/math.md §7), one per segment
    Mass  (B, Hq, Nq)     m_i = sum_j P_ij A_ij: one more fp32 accumulator rescaled like the softmax sum
    XgPartial (S*Hq, row tiles, BLOCK_D)  per-tile weighted sums of z_i (pooled XG, first level)
    XgRows (B, Hq, Nq, d) z_i per row (xg_pool="position")

GQA reads KV head h // G (never repeated). Packed sequences (cu_seqlens) give each sequence its own
programs; q/k/v/out rows are then offset by the sequence start. Gates are (1 or B, S, Hq): per
segment and query head, optionally per sample. Feature flags are constexpr: with all of them off this
is plain FlashAttention-2, and one segment compiles to the single-softmax adapter of docs/math.md §1.
The feature groups (`causalattn.kernels.arguments`) hold None when off: `adapter.ka is None` and
the like are decided at compile time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from causalattn.kernels.arguments import (
    AdapterArgs, OpFlags, OpInputs, OpOutputs, Packing, Sizes, Supervision, Xg, absent,
)
from causalattn.kernels.jit_helpers import (
    LN2, LOG2E, adapter_block, cause_bits, sequence_bounds, tile_ptrs, tile_summary,
)
from causalattn.kernels.tiles import tile_config


@triton.jit
def _fwd_key_tiles(
    state, q, K, V, k_strides, v_strides, packing, supervision, MaskBits, seq, tile, rows, row_ok, dims, dim_ok,
    lo, hi, sizes, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi); `state` is (acc, row sum, row max, mass accumulator).
    MASKED tiles apply the causal / length mask per element; the others are entirely visible and skip it."""
    acc, row_sum, row_max, mass_acc = state
    b, row0, len_q, len_k, offset = seq
    key_mask_row = b.to(tl.int64) * sizes.n_k
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        kv_ok = dim_ok[None, :]  # visible tiles lie inside the keys: only padded head dims need a mask
        if MASKED:
            kv_ok = col_ok[:, None] & kv_ok
        k = tl.load(K + cols[:, None] * k_strides[2] + dims[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + cols[:, None] * v_strides[2] + dims[None, :], mask=kv_ok, other=0.0)
        # Raw scores: the scale (> 0, checked by the caller) is folded into the max and into one FMA
        # in the exponent, instead of one more multiply per element before the max.
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + offset)
            scores = tl.where(visible, scores, float("-inf"))
        if packing.key_mask is not None:
            real = tl.load(packing.key_mask + key_mask_row + cols, mask=col_ok, other=0)
            scores = tl.where(real[None, :] != 0, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * scale_log2)
        # A row that has seen no key yet keeps max = -inf; exponentiate against 0 instead (no NaN).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - safe_max)
        p = tl.exp2(scores * scale_log2 - safe_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if supervision.bits is not None:
            mass_acc = mass_acc * rescale
            has_bits = 1
            if supervision.tiles is not None:
                has_bits = tl.load(supervision.tiles + (b * supervision.n_row_tiles + tile) * supervision.n_col_tiles
                                   + n0 // BLOCK_N)
            if has_bits != 0:
                causes = cause_bits(MaskBits, row0 + rows, row_ok, row0 + n0, supervision.words, BLOCK_M, BLOCK_N,
                                    False, packing.cu_seqlens is None)
                mass_acc += tl.sum(p * causes, 1)
        row_max = new_max
    return acc, row_sum, row_max, mass_acc


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, q_strides, k_strides, v_strides, out_strides, packing, adapter, supervision, xg, sizes,
    scale_log2, n_row_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Query tiles on the slower grid axis: with causal masking the last tiles see the most keys, so
    # every head's longest tiles launch first and the short ones fill the tail of the last wave.
    tile = tl.program_id(1)
    if CAUSAL:
        tile = tl.num_programs(1) - 1 - tile
    heads_q = sizes.heads_q
    n_q = sizes.n_q
    s = tl.program_id(0) // heads_q
    h = tl.program_id(0) % heads_q
    kv_head = h // sizes.group
    seq = sequence_bounds(packing, s, sizes)
    b, row0, len_q, len_k, offset = seq
    m0 = tile * BLOCK_M
    if m0 >= len_q:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(tile_ptrs(Q, q_strides, b64, h, row0 + rows, dims), mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)
    K += b64 * k_strides[0] + kv_head * k_strides[1] + row0 * k_strides[2]
    V += b64 * v_strides[0] + kv_head * v_strides[1] + row0 * v_strides[2]
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
    MaskBits = None
    if supervision.bits is not None:
        MaskBits = supervision.bits + b64 * n_q * supervision.words
    state = (acc, row_sum, row_max, mass_acc)
    state = _fwd_key_tiles(state, q, K, V, k_strides, v_strides, packing, supervision, MaskBits, seq, tile, rows,
                           row_ok, dims, dim_ok, 0, full_end, sizes, scale_log2, BLOCK_M, BLOCK_N, False, CAUSAL,
                           DOT_PRECISION)
    acc, row_sum, row_max, mass_acc = _fwd_key_tiles(
        state, q, K, V, k_strides, v_strides, packing, supervision, MaskBits, seq, tile, rows, row_ok, dims, dim_ok,
        full_end, hi, sizes, scale_log2, BLOCK_M, BLOCK_N, True, CAUSAL, DOT_PRECISION)

    # Not "> 0": a NaN sum (a +inf or NaN score) must give NaN out and LSE, not a row that saw no key.
    seen = row_sum != 0.0
    inv_sum = tl.where(seen, 1.0 / tl.where(seen, row_sum, 1.0), 0.0)
    out = acc * inv_sum[:, None]
    tl.store(Lse + stat, tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("inf")),
             mask=row_ok)
    if supervision.mass is not None:
        tl.store(supervision.mass + stat, mass_acc * inv_sum, mask=row_ok)

    if adapter.ka is not None:
        # The adapter tile: M <= 64 prompt slots, its own softmax, never masked (docs/math.md §1).
        NUM_SEGMENTS: tl.constexpr = adapter.NUM_SEGMENTS
        adapter_len = adapter.length
        slots = tl.arange(0, adapter.BLOCK_A)
        slot_ok = slots < adapter_len
        adapter_base = b64 * adapter.batch_stride + kv_head * adapter_len * HEAD_DIM
        adapter_ptrs = adapter_base + slots[:, None] * HEAD_DIM + dims[None, :]
        ka = tl.load(adapter.ka + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        va = tl.load(adapter.va + adapter_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        logits = tl.dot(q, tl.trans(ka), input_precision=DOT_PRECISION) * scale_log2
        logits = tl.where(slot_ok[None, :], logits, float("-inf"))
        gate_row = 0
        if adapter.GATE_PER_SAMPLE:
            gate_row = b64 * NUM_SEGMENTS * heads_q
        if NUM_SEGMENTS == 1:
            adapter_max = tl.max(logits, 1)
            pa = tl.exp2(logits - adapter_max[:, None])
            adapter_sum = tl.sum(pa, 1)
            pa = pa / adapter_sum[:, None]
            tl.store(adapter.lse2 + stat, adapter_max + tl.log2(adapter_sum), mask=row_ok)
            gamma = tl.load(adapter.gamma + gate_row + h)
            out += gamma * tl.dot(pa.to(va.dtype), va, input_precision=DOT_PRECISION)
        else:
            # Segments (docs/math.md §7): one softmax per segment of consecutive slots, each with its own gate;
            # slot_lse holds each slot's segment LSE, so Pa^s = exp2(logits - slot_lse) in one pass.
            slot_segment = tl.load(adapter.slot_segment + slots)
            slot_lse = tl.zeros([BLOCK_M, adapter.BLOCK_A], dtype=tl.float32)
            for segment in tl.static_range(NUM_SEGMENTS):
                in_segment = (slot_segment == segment)[None, :]
                segment_logits = tl.where(in_segment, logits, float("-inf"))
                segment_max = tl.max(segment_logits, 1)
                segment_lse = segment_max + tl.log2(tl.sum(tl.exp2(segment_logits - segment_max[:, None]), 1))
                tl.store(adapter.lse2 + segment * adapter.segment_stride + stat, segment_lse, mask=row_ok)
                slot_lse = tl.where(in_segment, segment_lse[:, None], slot_lse)
            slot_gamma = tl.load(adapter.gamma + gate_row + slot_segment * heads_q + h,
                                 mask=slot_segment < NUM_SEGMENTS, other=0.0)
            gated = tl.exp2(logits - slot_lse) * slot_gamma[None, :]  # gamma_s Pa^s: 0 on padded slots
            out += tl.dot(gated.to(va.dtype), va, input_precision=DOT_PRECISION)
        if xg.tensor is not None:
            if NUM_SEGMENTS == 1:
                pa_general = tl.where(slots[None, :] < xg.TOKENS, pa, 0.0)
                z = gamma * tl.dot(pa_general.to(va.dtype), va, input_precision=DOT_PRECISION)
            else:  # the XG slots lie in the first segment
                z = tl.dot(tl.where(slots[None, :] < xg.TOKENS, gated, 0.0).to(va.dtype), va,
                           input_precision=DOT_PRECISION)
            if xg.POOLED:
                weight = tl.load(xg.weight + b64 * n_q + row0 + rows, mask=row_ok, other=0.0)
                partial = tl.sum(z * weight[:, None], 0)
                tl.store(xg.tensor + ((s * heads_q + h) * n_row_tiles + tile) * BLOCK_D + dims, partial)
            else:
                tl.store(xg.tensor + stat[:, None] * HEAD_DIM + dims[None, :], z,
                         mask=row_ok[:, None] & dim_ok[None, :])

    o_ptrs = tile_ptrs(Out, out_strides, b64, h, row0 + rows, dims)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def forward_outputs(inputs: OpInputs, flags: OpFlags) -> OpOutputs:
    """The forward's outputs, allocated on q's device (None where a statistic is off): what the
    launcher fills, and on fake tensors the op's fake (meta) result."""
    q = inputs.q
    batch, heads_q, n_q, head_dim = q.shape
    lse = q.new_empty(batch, heads_q, n_q, dtype=torch.float32)
    adapter_lse2 = None
    if inputs.adapter_keys is not None:  # (S, B, Hq, Nq) with S > 1 segments
        num_segments = inputs.gamma.shape[-2]
        adapter_lse2 = torch.empty_like(lse) if num_segments == 1 else lse.new_empty(num_segments, *lse.shape)
    xg = None
    if flags.xg_tokens and flags.xg_pooled:
        xg = q.new_empty(flags.num_samples, heads_q, head_dim, dtype=torch.float32)
    elif flags.xg_tokens:
        xg = q.new_empty(batch, heads_q, n_q, head_dim, dtype=torch.float32)
    return OpOutputs(out=torch.empty_like(q, memory_format=torch.contiguous_format), lse=lse,
                     adapter_lse2=adapter_lse2, mass=torch.empty_like(lse) if inputs.mask_bits is not None else None,
                     xg=xg)


def adapter_args(inputs: OpInputs, lse2: torch.Tensor) -> AdapterArgs:
    """The adapter group of the forward, dQ and row kernels (`gamma`: (1 or B, S, Hq) fp32)."""
    keys = inputs.adapter_keys
    heads_kv, adapter_len, head_dim = keys.shape[-3:]
    num_segments = inputs.gamma.shape[-2]
    return AdapterArgs(
        ka=keys, va=inputs.adapter_values, gamma=inputs.gamma,
        slot_segment=inputs.slot_segment if num_segments > 1 else None, lse2=lse2, length=adapter_len,
        batch_stride=heads_kv * adapter_len * head_dim if keys.dim() == 4 else 0,
        segment_stride=inputs.q.shape[:3].numel(), BLOCK_A=tl.constexpr(adapter_block(adapter_len)),
        NUM_SEGMENTS=tl.constexpr(num_segments), GATE_PER_SAMPLE=tl.constexpr(inputs.gamma.shape[0] > 1))


def dot_precision(dtype: torch.dtype) -> str:
    """"ieee" for fp32 inputs: exact fp32 dots, not TF32 (fp16/bf16 dots do not read the setting)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(inputs: OpInputs, flags: OpFlags) -> OpOutputs:
    """Launch the forward kernel. Inputs are validated by the caller; k/v/q/out keep their strides
    (last dim contiguous); small side tensors are contiguous; with S > 1 adapter segments,
    `slot_segment` maps each adapter slot to its segment (`slot_segments`)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    batch, heads_q, n_q, head_dim = q.shape
    heads_kv, n_k = k.shape[1], k.shape[2]
    config = tile_config(head_dim, "fwd", q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    outputs = forward_outputs(inputs, flags)
    n_row_tiles = triton.cdiv(flags.max_seqlen, config.block_m)
    supervision = absent(Supervision)
    if inputs.mask_bits is not None:
        # Packed sequences start anywhere in a mask tile: no per-tile summary to skip empty ones.
        tiles = tile_summary(inputs.mask_bits, config.block_m, config.block_n) if inputs.cu_seqlens is None else None
        supervision = Supervision(bits=inputs.mask_bits, tiles=tiles, words=inputs.mask_bits.shape[2],
                                  n_row_tiles=n_row_tiles, n_col_tiles=tiles.shape[2] if tiles is not None else 0,
                                  mass=outputs.mass, grad_mass=None, grad_tiles=None)
    xg, xg_partial = absent(Xg), None
    if flags.xg_tokens:
        written = outputs.xg
        if flags.xg_pooled:  # per-tile partial sums, reduced below
            written = xg_partial = q.new_zeros(flags.num_samples * heads_q, n_row_tiles, block_d, dtype=torch.float32)
        xg = Xg(tensor=written, weight=inputs.xg_weight if flags.xg_pooled else None,
                TOKENS=tl.constexpr(flags.xg_tokens), POOLED=tl.constexpr(flags.xg_pooled))
    grid = (flags.num_samples * heads_q, n_row_tiles)
    _fwd_kernel[grid](
        q, k, v, outputs.out, outputs.lse, q.stride()[:3], k.stride()[:3], v.stride()[:3], outputs.out.stride()[:3],
        Packing(inputs.cu_seqlens, inputs.key_lengths, inputs.key_mask),
        adapter_args(inputs, outputs.adapter_lse2) if inputs.adapter_keys is not None else absent(AdapterArgs),
        supervision, xg,
        Sizes(n_q, n_k, heads_q, heads_kv, heads_q // heads_kv), flags.scale * LOG2E.value, n_row_tiles,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=flags.causal,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if xg_partial is not None:
        outputs.xg.copy_(xg_partial.sum(1)[:, :head_dim].view(flags.num_samples, heads_q, head_dim))
    return outputs
