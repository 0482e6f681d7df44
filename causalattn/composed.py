"""The composed backend: PyTorch's own attention kernel for the sequence part, and every extra statistic
computed apart where it is cheap (docs/math.md §8). Same signature, outputs and gradients as the other backends.

    out  = SDPA(q, k, v)                        one call of the vendor kernel (CPU: PyTorch's flash kernel)
         + gamma * softmax(tau q Ka^T) Va       an (N x M) problem, M <= 64: plain tensor ops
    lse  from the same kernel call              differentiable (exact backward, see `_KernelAttention`)
    mass m_i = sum_j P_ij A_ij                  only on the R rows that have a cause, gathered: (R x N)
    xg   gamma * sum_{m < H_g} Pa_im va_m       from the adapter softmax above, pooled per sample

Why it is fast: the N x N work runs once, in the vendor kernel, and the statistics cost O(N M) or
O(R N) with R the supervised rows (a few percent of N in CAT data). Nothing N x N is kept: masked
variants run the kernel a block of query rows at a time with a (rows x keys) additive mask.

Shapes
------
q (B, Hq, Nq, d); k, v (B, Hkv, Nk, d); GQA is handed to the kernel as is (K/V never repeated).
_KernelAttention      q, k, v, bias (B or 1, 1, rows, keys) additive or None -> out (B, Hq, Nq, d), lse (B, Hq, Nq)
_adapter_branch       -> gated adapter output (B, Hq, Nq, d), xg (S, Hq, d) / (B, Hq, Nq, d) or None
_CauseMass            -> mass (B, Hq, Nq): exact zeros on rows without causes
Statistics are computed in fp32 (fp64 for fp64 input), as in `causalattn.reference`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from causalattn.inputs import Adapter, AttentionOutput
from causalattn.composed_mass import CauseKeyMass, RowSoftmaxMass
from causalattn.masks import CausalMask
from causalattn.problem import AttentionProblem

# PyTorch's CPU flash-attention kernel returns its log-sum-exp beside the output; the public SDPA does not.
_CPU_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_KERNEL_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Query rows per masked kernel call: rows x keys of fp32 bias stay near 2**22 elements (16 MB), small
# next to q/k/v at the lengths where it matters.
_MASK_ELEMENTS_PER_BLOCK = 1 << 22
# Query rows per block of the portable path's log-sum-exp: B x Hq x rows x Nk fp32 scores near 2**22
# elements (16 MB), recomputed under checkpointing in backward.
_LSE_ELEMENTS_PER_BLOCK = 1 << 22
# The composed mass switches from each supervised row's softmax to the cause keys at this fraction of
# supervised rows. Paired against SDPA (fwd+bwd, N = 1024, 8 heads, d = 64, fp32, 2-core Xeon, quiet):
# rows 1.40x / keys 1.58x at 3 % of rows, 2.15x / 1.83x at 30 %, 2.72x / 2.23x at 100 %.
_CAUSE_KEY_MIN_ROW_FRACTION = 0.1
# Packed sequences run one kernel call each (sum of L_s^2 work instead of N^2) up to this many; past
# it the per-call overhead (~50 us) outweighs the saving and one block-masked pass runs instead.
_MAX_SEQUENCE_CALLS = 64


def kernel_available(device: torch.device) -> bool:
    """Whether the LSE-returning vendor kernel runs on `device` (else the portable path is used)."""
    return device.type == "cpu" and _CPU_KERNEL is not None and _CPU_KERNEL_BACKWARD is not None


# ------------------------------------------------------------------------------ sequence attention
class _KernelAttention(torch.autograd.Function):
    """(out, lse) of PyTorch's CPU flash kernel, both differentiable, in one flash backward.

    dL/dlse_i = g_i adds dS_ij = g_i P_ij (d lse_i / d S_ij = P_ij), so the backward's row term
    dS_ij = P_ij (dP_ij - D_i) becomes P_ij (dP_ij - D_i + g_i). The kernel's backward is handed a
    value column of ones with g_i in the same column of dO (dP_ij gains g_i) and 0 in that column of
    out (D_i = dO_i . O_i is unchanged), q and k a zero column: one backward call at head dim d + 1
    instead of one more forward and backward for the lse (the CAT mass puts its gradient there).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], causal: bool, scale: float):
        out, lse = _CPU_KERNEL(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
        q, k, v, out, lse, bias = ctx.saved_tensors
        options = dict(attn_mask=bias, scale=ctx.scale)
        if grad_lse is None:
            dq, dk, dv = _CPU_KERNEL_BACKWARD(grad_out, q, k, v, out, lse, 0.0, ctx.causal, **options)
            return dq, dk, dv, None, None, None
        if grad_out is None:
            grad_out = torch.zeros_like(out)

        def widened(t: Tensor, column: Tensor | float) -> Tensor:
            extra = column.unsqueeze(-1) if isinstance(column, Tensor) else t.new_full((*t.shape[:-1], 1), column)
            return torch.cat([t, extra.to(t.dtype)], dim=-1)

        dq, dk, dv = _CPU_KERNEL_BACKWARD(widened(grad_out, grad_lse), widened(q, 0.0), widened(k, 0.0),
                                          widened(v, 1.0), widened(out, 0.0), lse, 0.0, ctx.causal, **options)
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None, None


def _portable_attention(q: Tensor, k: Tensor, v: Tensor, visible: Optional[Tensor], causal: bool,
                        scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) on devices without the LSE kernel: the public SDPA (the device's fastest backend) for
    out, and the lse from recomputed scores a block of query rows at a time (one more Q K^T pass).

    Each block is checkpointed, so neither pass holds more than one block of scores: a full (Nq x Nk)
    fp32 score matrix would be 8.6 GB per layer at 32 heads x 8k tokens, the block is at most 16 MB.
    """
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=causal and visible is None,
                                         scale=scale, enable_gqa=group > 1)
    rows_per_block = max(1, _LSE_ELEMENTS_PER_BLOCK // (q.shape[0] * q.shape[1] * k.shape[2]))
    blocks = []
    for start in range(0, q.shape[2], rows_per_block):
        end = min(q.shape[2], start + rows_per_block)
        seen = visible[..., start:end, :] if visible is not None else None
        diagonal = start + k.shape[2] - q.shape[2]  # causal, bottom-right aligned: row r sees keys <= r + diagonal
        arguments = (q[:, :, start:end], k, seen, diagonal, causal, scale)
        blocks.append(checkpoint(_block_lse, *arguments, use_reentrant=False) if torch.is_grad_enabled()
                      else _block_lse(*arguments))
    return out, torch.cat(blocks, dim=2)


def _block_lse(q: Tensor, k: Tensor, visible: Optional[Tensor], diagonal: int, causal: bool, scale: float) -> Tensor:
    """(B, Hq, rows) log-sum-exp of one block of query rows' scores over the keys they see: `visible`
    (B or 1, 1, rows, Nk), or causal (block row r sees keys j <= r + diagonal), or every key."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    # In place on the product (a matmul keeps its inputs for backward, not its output): one block of
    # scores alive instead of three.
    scores = (q.unflatten(1, (k.shape[1], -1)).to(dtype) @ k.to(dtype).unsqueeze(2).transpose(-1, -2)).mul_(scale)
    if visible is None and causal:
        rows = torch.arange(q.shape[2], device=q.device)
        visible = torch.arange(k.shape[2], device=q.device) <= rows[:, None] + diagonal
    if visible is not None:
        scores.masked_fill_(~visible.unsqueeze(-3), float("-inf"))
    return torch.logsumexp(scores, dim=-1).flatten(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, visible: Optional[Tensor], causal: bool, scale: float):
    """One kernel call. `visible` (B or 1, 1, rows, keys) bool, every row with at least one True, or None
    for plain (causal or full) attention."""
    if kernel_available(q.device):
        bias = None
        if visible is not None:
            bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        out, lse = _KernelAttention.apply(q, k, v, bias, causal and visible is None, scale)
    else:
        out, lse = _portable_attention(q, k, v, visible, causal, scale)
    # Every row here sees a key, so an lse of +inf comes from an infinite score: its row is NaN (inf - inf),
    # and so is its lse on every backend.
    return out, lse.masked_fill(lse == float("inf"), float("nan"))


def _sequence_attention(p: AttentionProblem, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of the sequence part over all rows: one plain call when nothing is masked, one call
    per packed sequence, or blocks of query rows with their visibility as an additive mask."""
    plain = p.key_valid is None and p.segment is None and (not p.causal or p.n_q == p.n_k)
    if plain:
        return _attend(q, k, v, None, p.causal, p.scale)
    if p.segment is not None and p.num_sequences <= _MAX_SEQUENCE_CALLS:
        return _per_sequence(p, q, k, v)
    rows_per_block = max(1, _MASK_ELEMENTS_PER_BLOCK // max(1, p.n_k))
    outs, lses = [], []
    for start in range(0, p.n_q, rows_per_block):
        end = min(p.n_q, start + rows_per_block)
        key_end = p.key_end(end)
        visible = p.visibility(start, end, key_end, q.device)[:, 0]  # (B or 1, 1, rows, keys)
        # A row that sees no key (left padding) reads key 0 in the kernel; its out and lse are replaced
        # below (0 and +inf), so no 0/0 reaches the kernel and no gradient flows from that row.
        seen = visible.any(-1, keepdim=True)
        visible = visible | (~seen & (torch.arange(key_end, device=q.device) == 0))
        out, lse = _attend(q[:, :, start:end], k[:, :, :key_end], v[:, :, :key_end], visible, p.causal, p.scale)
        seen = seen.squeeze(-1)  # (B or 1, 1, rows)
        outs.append(torch.where(seen.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)))
        lses.append(torch.where(seen, lse, torch.full((), float("inf"), dtype=lse.dtype, device=lse.device)))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _per_sequence(p: AttentionProblem, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Packed sequences (B == 1, Nq == Nk) as one plain call each, on views of the packed tensors."""
    bounds = p.cu_seqlens.tolist()  # only this path needs the offsets on the host
    outs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out, lse = _attend(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], None, p.causal, p.scale)
            outs.append(out)
            lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# ------------------------------------------------------------------------------ adapter and XG
def _adapter_branch(p: AttentionProblem, q: Tensor, adapter: Adapter) -> tuple[Tensor, Optional[Tensor]]:
    """sum_s gamma_s softmax_s(tau q Ka_s^T) Va_s (B, Hq, Nq, d) in the statistics dtype, and the XG
    statistic (pooled (S, Hq, d) or per row (B, Hq, Nq, d)) when `xg_tokens` > 0. The prompt is never
    masked; each segment has its own softmax and gate (one segment: LLaMA-Adapter)."""
    dt = p.compute_dtype
    keys, values = adapter.keys.to(dt), adapter.values.to(dt)
    if keys.dim() == 3:  # shared prompt: broadcast over the batch (a view)
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
    grouped = q.to(dt).unflatten(1, (p.heads_kv, p.group))  # (B, Hkv, G, Nq, d), a view for fp32 input
    scores = grouped @ keys.unsqueeze(2).transpose(-1, -2) * p.scale  # (B, Hkv, G, Nq, M)
    gammas = adapter.gammas(p.heads_q).to(dt)
    gammas = gammas.reshape(gammas.shape[0], gammas.shape[1], p.heads_kv, p.group, 1, 1)  # (1 or B, S, Hkv, G, 1, 1)
    bounds = adapter.segment_bounds()
    if len(bounds) == 1:
        probs = torch.softmax(scores, dim=-1)
        gated_probs = gammas[:, 0] * probs
    else:  # one softmax per segment, then one read-out of all the gated slots
        probs = torch.cat([torch.softmax(scores[..., start:end], dim=-1) for start, end in bounds], dim=-1)
        sizes = torch.tensor(adapter.segment_sizes, device=q.device)
        gated_probs = gammas.movedim(1, -1).squeeze(-2).repeat_interleave(sizes, dim=-1) * probs
    gated = gated_probs @ values.unsqueeze(2)
    if not p.xg_tokens:
        return gated.flatten(1, 2), None
    gamma = gammas[:, 0]  # XG reads the first H_g slots of the first (invariant) segment
    xg_probs, xg_values = probs[..., : p.xg_tokens], values[..., : p.xg_tokens, :].unsqueeze(2)
    if p.xg_weight is None:  # per row: z_i = gamma sum_{m < H_g} Pa_im va_m
        return gated.flatten(1, 2), ((gamma * xg_probs) @ xg_values).flatten(1, 2)
    # Pooled: the row mean commutes with the (linear) read-out, so average the H_g probabilities over
    # each sample's rows first and read the values once: O(N H_g) instead of a (B, Hq, N, d) z.
    weighted = xg_probs * p.xg_weight[:, None, None, :, None]
    if p.segment is None:
        mean_probs = weighted.sum(3, keepdim=True)  # (B, Hkv, G, 1, H_g)
    else:  # packed sequences (B == 1): one mean per sequence, as (1, Hkv, G, S, H_g)
        mean_probs = weighted.new_zeros(*weighted.shape[:3], p.num_sequences, p.xg_tokens)
        mean_probs = mean_probs.index_add(3, p.segment, weighted)
    pooled = (gamma * mean_probs) @ xg_values  # (B, Hkv, G, 1 or S, d)
    pooled = pooled.flatten(1, 2).squeeze(2) if p.segment is None else pooled[0].flatten(0, 1).transpose(0, 1)
    return gated.flatten(1, 2), pooled


# ------------------------------------------------------------------------------ entry point
def _cause_keys_pay(p: AttentionProblem, mask: CausalMask, device: torch.device) -> bool:
    """Whether the mass from the cause keys (its lse gradient widens the one flash backward: +0.19x of
    SDPA's fwd+bwd, whatever the density) beats each supervised row's own softmax (O(R N d)). Both scale
    with N^2 at a given density, so the choice is by density (see _CAUSE_KEY_MIN_ROW_FRACTION)."""
    if not kernel_available(device):  # the portable path's lse gradient would be a pass over every row
        return False
    supervised = mask.supervised_rows()[0].numel()
    return supervised >= _CAUSE_KEY_MIN_ROW_FRACTION * max(1, p.batch * p.n_q)



def _no_rows(p: AttentionProblem, q: Tensor, with_mass: bool, xg_pool: str) -> AttentionOutput:
    """Outputs for Nq == 0, still attached to q's graph; a pooled XG mean over no rows is 0."""
    stats = (q.sum(-1) * 0).to(p.compute_dtype)
    xg = None
    if p.xg_tokens:
        xg = q.new_zeros(p.num_sequences, p.heads_q, p.head_dim, dtype=p.compute_dtype) if xg_pool == "sample" \
            else (q * 0).to(p.compute_dtype)
    return AttentionOutput(q * 0, stats, stats.clone() if with_mass else None, xg)


def attention_composed(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
    key_lengths: Optional[Tensor] = None, key_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    adapter: Optional[Adapter] = None, supervision: Optional[CausalMask] = None,
    xg_tokens: int = 0, xg_pool: str = "sample",
) -> AttentionOutput:
    """docs/math.md §1-§3 with the vendor kernel plus side statistics; inputs already checked by `check_inputs`.
    Same outputs (and dtypes) as `causalattn.reference.attention_dense`."""
    p = AttentionProblem(q, k, causal, scale, key_lengths, key_mask, cu_seqlens, adapter, supervision, xg_tokens,
                         xg_pool)
    if p.n_q == 0:
        return _no_rows(p, q, supervision is not None, xg_pool)
    out, lse = _sequence_attention(p, q, k, v)
    lse = lse.to(p.compute_dtype)
    xg = None
    if adapter is not None:
        adapter_out, xg = _adapter_branch(p, q, adapter)
        # In place on the adapter's product (its matmul saved its inputs, not its output): one (B, Hq, N, d)
        # buffer less at the peak than `out + adapter_out` (8 MB per 4k tokens x 8 heads x d = 64, fp32).
        out = adapter_out.add_(out).to(q.dtype)
    mass = None
    if supervision is not None:
        mass = CauseKeyMass.apply(q, k, lse, p, supervision) if _cause_keys_pay(p, supervision, q.device) \
            else RowSoftmaxMass.apply(q, k, p, supervision)
    return AttentionOutput(out, lse, mass, xg)
