"""The executable specification: plain PyTorch for every output of docs/math.md §1-§3.

Two entry points with one signature:

* `attention_dense`   one shot over all rows; clear, float64-capable; the truth every backend is
                      tested against (it holds B x Hq x Nq x Nk scores).
* `attention_chunked` the same math a block of query rows at a time, each block under activation
                      checkpointing, so neither forward nor backward ever holds more than one block of
                      scores: the CPU backend users get (N = 16k fits in a few hundred MB).

Both are differentiable in q, k, v, the adapter keys/values/gate, through `out`, `lse`, `mass` and
`xg`: the CAT and XG losses backpropagate through plain autograd here.

Shapes (see `causalattn.inputs` for the argument types)
------
q (B, Hq, Nq, d); k, v (B, Hkv, Nk, d); returns AttentionOutput:
  out  (B, Hq, Nq, d)  dtype of q
  lse  (B, Hq, Nq)     fp32 (fp64 for fp64 input); +inf on rows that see no key (their P is 0)
  mass (B, Hq, Nq)     m_i = sum_j P_ij A_ij                               (supervision given)
  xg   (S, Hq, d)      mean over each sample's valid rows of z_i            (xg_tokens > 0)
       (B, Hq, Nq, d)  z_i per row with xg_pool="position"
  z_i = gamma_0 * sum_{m < xg_tokens} Pa^0_im va_m (the first segment). S = B, or the number of packed
  sequences. With adapter segments (docs/math.md §7) each segment has its own softmax Pa^s and gate gamma_s.

A row that sees no key (left padding) gets 0 from the sequence branch, lse = +inf and no NaN anywhere;
the adapter prompt is never masked, so with an adapter such a row still reads gamma * Pa Va (as in
the official concatenated form [gamma Pa, P] [Va; V]).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from causalattn.inputs import Adapter, AttentionOutput, segment_gammas
from causalattn.problem import AttentionProblem
from causalattn.validation import check_inputs
from causalattn.masks import CausalMask

# Scores held per block in the chunked path: 2**24 fp32 elements = 64 MB, a few of them live at once.
_SCORES_PER_BLOCK = 1 << 24


def _attend_rows(problem: AttentionProblem, row_start: int, row_end: int, q: Tensor, k: Tensor, v: Tensor,
                 adapter_keys: Optional[Tensor], adapter_values: Optional[Tensor], gate: Optional[Tensor]):
    """Every output for query rows [row_start, row_end). Returns (out, lse, mass, z) in compute dtype,
    with z already reduced per sample when pooling; GQA by folding the query group into rows."""
    p = problem
    dt = p.compute_dtype
    rows = row_end - row_start
    key_end = p.key_end(row_end)
    q_rows = q[:, :, row_start:row_end].to(dt).reshape(p.batch, p.heads_kv, p.group * rows, p.head_dim)
    keys, values = k[:, :, :key_end].to(dt), v[:, :, :key_end].to(dt)

    scores = (q_rows @ keys.transpose(-1, -2) * p.scale).view(p.batch, p.heads_kv, p.group, rows, key_end)
    visible = p.visibility(row_start, row_end, key_end, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row sees a key when some score is above -inf (masked keys are -inf). A +inf or NaN score is not
    # a masked row: it must come out NaN (inf - inf), as in the Triton kernels, never as zeros.
    row_max = scores.amax(-1, keepdim=True) if key_end else scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    seen = row_max != float("-inf")
    weights = torch.exp(scores - torch.where(seen, row_max, torch.zeros_like(row_max)))
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(seen, denom, torch.ones_like(denom))
    safe_log = torch.log(torch.where(seen, denom, torch.ones_like(denom)))  # no 0/0 in backward
    lse = torch.where(seen, row_max + safe_log, torch.full_like(row_max, float("inf")))
    out = (probs.view(p.batch, p.heads_kv, p.group * rows, key_end) @ values).view(p.batch, p.heads_kv, p.group, rows, p.head_dim)

    mass = None
    if p.supervision is not None:
        causes = p.supervision.unpack_rows(row_start, row_end)[:, None, None, :, :key_end]
        mass = (probs * causes).sum(-1)

    z = None
    if adapter_keys is not None:
        ka = adapter_keys.to(dt).expand(p.batch, *adapter_keys.shape[-3:]) if adapter_keys.dim() == 3 else adapter_keys.to(dt)
        va = adapter_values.to(dt).expand(p.batch, *adapter_values.shape[-3:]) if adapter_values.dim() == 3 else adapter_values.to(dt)
        adapter_scores = q_rows @ ka.transpose(-1, -2) * p.scale  # never masked
        # (1 or B, S, Hkv, G, 1, 1): one gate per (sample, segment, query head)
        gammas = segment_gammas(gate, p.adapter.gate_mode, p.heads_q).to(dt)
        gammas = gammas.reshape(gammas.shape[0], gammas.shape[1], p.heads_kv, p.group, 1, 1)
        for index, (start, end) in enumerate(p.adapter.segment_bounds()):
            segment_probs = torch.softmax(adapter_scores[..., start:end], dim=-1)  # its own softmax
            segment_out = (segment_probs @ va[:, :, start:end]).view(p.batch, p.heads_kv, p.group, rows, p.head_dim)
            out = out + gammas[:, index] * segment_out
            if index == 0 and p.xg_tokens:  # XG reads the first H_g slots of the first (invariant) segment
                g = p.xg_tokens
                z = gammas[:, 0] * (segment_probs[..., :g] @ va[:, :, :g]).view(p.batch, p.heads_kv, p.group, rows, p.head_dim)
                z = z.reshape(p.batch, p.heads_q, rows, p.head_dim)
                if p.xg_weight is not None:
                    z = _pool_rows(p, z, row_start, row_end)

    def heads(t: Tensor) -> Tensor:  # (B, Hkv, G, rows, ...) -> (B, Hq, rows, ...)
        return t.reshape(p.batch, p.heads_q, rows, *t.shape[4:])

    return heads(out), heads(lse.squeeze(-1)), heads(mass) if mass is not None else None, z


def _pool_rows(p: AttentionProblem, z: Tensor, row_start: int, row_end: int) -> Tensor:
    """Weighted sum of per-row z (B, Hq, rows, d) into per-sample sums (S, Hq, d)."""
    weighted = z * p.xg_weight[:, None, row_start:row_end, None]
    if p.segment is None:
        return weighted.sum(2)
    pooled = torch.zeros(p.num_sequences, p.heads_q, p.head_dim, dtype=z.dtype, device=z.device)
    return pooled.index_add(0, p.segment[row_start:row_end], weighted[0].transpose(0, 1))


def _run(q, k, v, *, causal, scale, key_lengths, key_mask, cu_seqlens, adapter, supervision, xg_tokens, xg_pool,
         rows_per_block: Optional[int], upcast: bool) -> AttentionOutput:
    check_inputs(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask,
                 cu_seqlens=cu_seqlens, adapter=adapter, supervision=supervision, xg_tokens=xg_tokens, xg_pool=xg_pool)
    p = AttentionProblem(q, k, causal, scale, key_lengths, key_mask, cu_seqlens, adapter, supervision, xg_tokens, xg_pool, upcast)
    adapter_tensors = (adapter.keys, adapter.values, adapter.gate) if adapter is not None else (None, None, None)
    block = p.n_q if rows_per_block is None else rows_per_block
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, *adapter_tensors))
    outs, lses, masses, zs = [], [], [], []
    # Nq = 0 still runs one empty block, so every output keeps its shape (and pooled XG its zero rows).
    for start in range(0, max(p.n_q, 1), max(block, 1)):
        end = min(p.n_q, start + block)
        if rows_per_block is not None and needs_grad:
            # Recompute this block's scores in backward instead of keeping them: O(block x Nk) memory.
            result = checkpoint(_attend_rows, p, start, end, q, k, v, *adapter_tensors, use_reentrant=False)
        else:
            result = _attend_rows(p, start, end, q, k, v, *adapter_tensors)
        for store, value in zip((outs, lses, masses, zs), result):
            store.append(value)
    out = torch.cat(outs, dim=2).to(q.dtype)
    lse = torch.cat(lses, dim=2)
    mass = torch.cat(masses, dim=2) if supervision is not None else None
    xg = None
    if xg_tokens:
        xg = torch.stack(zs).sum(0) if xg_pool == "sample" else torch.cat(zs, dim=2)
    return AttentionOutput(out, lse, mass, xg)


def attention_dense(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
    key_lengths: Optional[Tensor] = None, key_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    adapter: Optional[Adapter] = None, supervision: Optional[CausalMask] = None,
    xg_tokens: int = 0, xg_pool: str = "sample", upcast: bool = True,
) -> AttentionOutput:
    """docs/math.md §1-§3 over all rows at once (holds B x Hq x Nq x Nk scores). See the module docstring.

    `upcast=False` computes in the input dtype instead of fp32 (fp16/bf16): the "plain PyTorch in
    the kernel's dtype" baseline of FlashAttention's tolerance rule (docs/math.md §5).
    """
    return _run(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens,
                adapter=adapter, supervision=supervision, xg_tokens=xg_tokens, xg_pool=xg_pool, rows_per_block=None,
                upcast=upcast)


def attention_chunked(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
    key_lengths: Optional[Tensor] = None, key_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    adapter: Optional[Adapter] = None, supervision: Optional[CausalMask] = None,
    xg_tokens: int = 0, xg_pool: str = "sample", rows_per_block: Optional[int] = None, upcast: bool = True,
) -> AttentionOutput:
    """Same result as `attention_dense`, a block of query rows at a time with checkpointed blocks.

    `rows_per_block` defaults to the largest power of two keeping one block's scores near 2**24
    elements (64 MB fp32), clamped to [16, 1024].
    """
    if rows_per_block is None:
        per_row = max(1, q.shape[0] * q.shape[1] * k.shape[2])
        rows_per_block = 1 << max(4, min(10, (_SCORES_PER_BLOCK // per_row).bit_length() - 1))
    elif not isinstance(rows_per_block, int) or rows_per_block < 1:
        raise ValueError(f"rows_per_block: expected a positive int or None, got {rows_per_block!r}")
    return _run(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens,
                adapter=adapter, supervision=supervision, xg_tokens=xg_tokens, xg_pool=xg_pool,
                rows_per_block=rows_per_block, upcast=upcast)
