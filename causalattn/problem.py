"""`AttentionProblem`: what one `attention` call asks, derived once from its validated arguments.

Visibility (causal, bottom-right aligned; key padding; packed sequences), the rows' weights in the
pooled XG mean and the compute dtype. The reference and the composed backend both read it; the
Triton host side derives the same per-row weights with `xg_row_weights`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def key_validity(n_k: int, key_lengths: Optional[Tensor], key_mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, Nk) bool of real keys from either form of key padding, or None when nothing is masked."""
    if key_lengths is not None:
        return torch.arange(n_k, device=key_lengths.device) < key_lengths[:, None]
    return key_mask


def sequence_ids(cu_seqlens: Tensor) -> Tensor:
    """(T,) index of the packed sequence each token belongs to."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def xg_row_weights(batch: int, n_q: int, key_valid: Optional[Tensor], cu_seqlens: Optional[Tensor],
                   dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B, Nq) weight of each query row in its sample's XG mean: 1/|V_s| on the sample's valid rows
    (real tokens; every token of a packed sequence), 0 elsewhere."""
    if cu_seqlens is not None:
        segment = sequence_ids(cu_seqlens.to(device))
        counts = torch.bincount(segment, minlength=cu_seqlens.numel() - 1).clamp_min(1)
        return (1.0 / counts[segment].to(dtype))[None]
    valid = key_valid if key_valid is not None else torch.ones(batch, n_q, dtype=torch.bool, device=device)
    return valid.to(dtype) / valid.sum(-1, keepdim=True).clamp_min(1)


class AttentionProblem:
    """Per-call constants derived once from the arguments (visibility, row weights, compute dtype);
    shared by the reference and the composed backend."""

    def __init__(self, q, k, causal, scale, key_lengths, key_mask, cu_seqlens, adapter, supervision, xg_tokens, xg_pool,
                 upcast=True):
        self.batch, self.heads_q, self.n_q, self.head_dim = q.shape
        self.heads_kv, self.n_k = k.shape[1], k.shape[2]
        self.group = self.heads_q // self.heads_kv
        self.causal = causal
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.compute_dtype = q.dtype if q.dtype == torch.float64 or not upcast else torch.float32
        self.key_valid = key_validity(self.n_k, key_lengths, key_mask)  # (B, Nk) bool or None
        self.segment = sequence_ids(cu_seqlens.to(q.device)) if cu_seqlens is not None else None  # (Nk,)
        # Counted from the offsets, not the token ids: empty sequences (repeated offsets, also at the end)
        # still get their (zero) row in the pooled XG output.
        self.num_sequences = cu_seqlens.numel() - 1 if cu_seqlens is not None else self.batch
        self.cu_seqlens = cu_seqlens
        self.adapter = adapter
        self.supervision = supervision
        self.xg_tokens = xg_tokens
        self.xg_pool = xg_pool
        self.xg_weight = None  # (B, Nq) weight 1/|V_s| of each row in its sample's mean
        if xg_tokens and xg_pool == "sample":
            self.xg_weight = xg_row_weights(self.batch, self.n_q, self.key_valid, cu_seqlens, self.compute_dtype, q.device)

    def key_end(self, row_end: int) -> int:
        """Keys past this index are invisible to rows < row_end (causal, bottom-right aligned)."""
        return min(self.n_k, row_end + self.n_k - self.n_q) if self.causal else self.n_k

    def visibility(self, row_start: int, row_end: int, key_end: int, device) -> Tensor:
        """(B or 1, 1, 1, rows, keys) bool: which keys each query row of the block may attend to."""
        return self.rows_visibility(torch.arange(row_start, row_end, device=device), key_end)[:, None, None]

    def rows_visibility(self, rows: Tensor, key_end: int, sample: Optional[int] = None) -> Tensor:
        """(B or 1, R, keys) bool: which of the first `key_end` keys each query row in `rows` sees;
        (1, R, keys) for one `sample` only."""
        cols = torch.arange(key_end, device=rows.device)
        visible = torch.ones(1, len(rows), key_end, dtype=torch.bool, device=rows.device)
        if self.causal:
            visible = visible & (cols <= rows[:, None] + (self.n_k - self.n_q))
        if self.key_valid is not None:
            valid = self.key_valid if sample is None else self.key_valid[sample : sample + 1]
            visible = visible & valid[:, None, :key_end]
        if self.segment is not None:
            visible = visible & (self.segment[rows][:, None] == self.segment[:key_end])
        return visible
