"""The CAT mass m_i = sum_j P_ij A_ij of the composed backend (docs/math.md §2, §8), two ways.

* `CauseKeyMass`   (with the CPU flash kernel) m_i = sum_{j in A_i} exp(tau q_i.k_j - lse_i) from the
                   kernel's own lse: O(pairs x Hq x d) for the (row, cause key) pairs, whatever N is,
                   with sparse (CSR) x dense products for its gradient.
                   Its gradient reaches q and k on the pairs directly and the lse through
                   dL/dlse_i = -c_i m_i, which the kernel's backward folds into the one flash
                   backward it runs anyway (`composed._KernelAttention`): no second pass over N x N.
* `RowSoftmaxMass` (the portable path: public SDPA, e.g. CUDA) each supervised row's softmax over the
                   keys it sees, recomputed in row blocks: O(R x N x d) for R supervised rows. There
                   the lse is a recomputation whose gradient would cost a pass over every row.

At 100 % of rows supervised with 16 causes each (N = 4096, 8 heads, d = 64) the pairs are 65k: 34 M
multiply-adds against the row softmax's 8.6 G.

Shapes: q (B, Hq, Nq, d), k (B, Hkv, Nk, d), lse (B, Hq, Nq) -> mass (B, Hq, Nq), exact zeros off the
supervised rows.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from causalattn.masks import CausalMask, unpack_bits
from causalattn.problem import AttentionProblem

# Gathered cause rows per block: heads x rows x keys scores near 2**21 elements (8 MB fp32; two such
# tensors live at once). At N = 16k, 8 heads that is 16 rows per (16 x 64) @ (64 x 16k) product; 2**22
# raised the peak of a 16k fwd+bwd by ~60 MB for no measurable speed.
_MASS_ELEMENTS_PER_BLOCK = 1 << 21
# (row, cause key) pairs per gathered chunk: pairs x Hq x d elements near 2**21 (8 MB fp32 of gathered
# queries; the keys are G times smaller).
_PAIR_ELEMENTS_PER_CHUNK = 1 << 21


class CauseKeyMass(torch.autograd.Function):
    """(B, Hq, Nq) mass from the cause keys and the lse (see the module docstring).

    Forward: e_ij = exp(tau q_i.k_j - lse_i) on every pair (gathered dot products, in chunks), summed
    per row; e (pairs x Hq) is kept for backward, no recomputation. Backward, with c = dL/dm:
    dS_ij = tau c_i e_ij on the pairs, dq = dS K and dk = dS^T Q as sparse (CSR) x dense products per
    sample and head (the mask's pattern, built once per mask), and dL/dlse_i = -c_i m_i.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, lse: Tensor, p: AttentionProblem, mask: CausalMask) -> Tensor:
        samples, rows, keys = mask.cause_pairs()
        cause = q.new_empty(samples.numel(), p.heads_q, dtype=p.compute_dtype)  # e_ij, (pairs, Hq)
        per_chunk = max(1, _PAIR_ELEMENTS_PER_CHUNK // (p.heads_q * p.head_dim))
        for start in range(0, samples.numel(), per_chunk):
            b, i, j = (t[start : start + per_chunk] for t in (samples, rows, keys))
            queries = q[b, :, i].to(p.compute_dtype).view(-1, p.heads_kv, p.group, p.head_dim)
            scores = (queries * k[b, :, j].to(p.compute_dtype).unsqueeze(2)).sum(-1).flatten(1, 2)
            cause[start : start + per_chunk] = torch.exp(scores * p.scale - lse[b, :, i].to(p.compute_dtype))
        rows_first = torch.zeros(p.batch * p.n_q, p.heads_q, dtype=p.compute_dtype, device=q.device)
        mass = rows_first.index_add_(0, samples * p.n_q + rows, cause).view(p.batch, p.n_q, p.heads_q).transpose(1, 2)
        ctx.save_for_backward(q, k, lse, mass, cause)
        ctx.problem, ctx.mask = p, mask
        return mass

    @staticmethod
    def backward(ctx, grad_mass: Tensor):
        q, k, lse, mass, cause = ctx.saved_tensors
        p, mask = ctx.problem, ctx.mask
        samples, rows, _ = mask.cause_pairs()
        upstream = grad_mass.to(p.compute_dtype).transpose(1, 2)[samples, rows]  # (pairs, Hq)
        grad_scores = upstream * cause * p.scale
        dq = torch.zeros(q.shape, dtype=p.compute_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=p.compute_dtype, device=k.device)
        with warnings.catch_warnings():  # CSR tensors are "beta": stable for these two products since torch 2.0
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            _sparse_products(grad_scores, q, k, p, mask, dq, dk)
        grad_lse = -grad_mass.to(p.compute_dtype) * mass
        return dq.to(q.dtype), dk.to(k.dtype), grad_lse.to(lse.dtype), None, None


def _sparse_products(grad_scores: Tensor, q: Tensor, k: Tensor, p: AttentionProblem, mask: CausalMask,
                     dq: Tensor, dk: Tensor) -> None:
    """dq = dS K and dk += dS^T Q per sample and head, dS (pairs, Hq) on the mask's pattern."""
    for sample, pattern in enumerate(mask.cause_patterns()):
        if pattern is None:
            continue
        (row_starts, pair_keys), (key_starts, pair_rows), to_key_order, pairs = pattern
        for head in range(p.heads_q):
            values = grad_scores[pairs, head]
            by_row = torch.sparse_csr_tensor(row_starts, pair_keys, values, (p.n_q, p.n_k),
                                             check_invariants=False)
            by_key = torch.sparse_csr_tensor(key_starts, pair_rows, values[to_key_order], (p.n_k, p.n_q),
                                             check_invariants=False)
            dq[sample, head] = by_row @ k[sample, head // p.group].to(p.compute_dtype)
            dk[sample, head // p.group] += by_key @ q[sample, head].to(p.compute_dtype)


def _row_blocks(p: AttentionProblem, mask: CausalMask, device: torch.device):
    """(sample, rows) blocks of the supervised rows: int64 row indices on `device`, ascending, sized so
    one block's scores (Hq x rows x Nk) stay near _MASS_ELEMENTS_PER_BLOCK elements."""
    samples, rows = mask.supervised_rows()
    rows_per_block = max(1, _MASS_ELEMENTS_PER_BLOCK // (p.heads_q * p.n_k))
    for sample in torch.unique(samples).tolist():
        for block in rows[samples == sample].split(rows_per_block):
            yield sample, block.to(device)


def _block_probabilities(p: AttentionProblem, q: Tensor, k: Tensor, bits: Tensor, sample: int, rows: Tensor):
    """(probs (Hkv, G, R, K), causes (R, K), queries (Hkv, G, R, d), keys (Hkv, K, d)) of gathered rows:
    their exact softmax over the first K keys (all they can see), in the statistics dtype."""
    dt = p.compute_dtype
    key_end = p.key_end(int(rows[-1]) + 1)
    queries = q[sample, :, rows].to(dt).unflatten(0, (p.heads_kv, p.group))
    keys = k[sample, :, :key_end].to(dt)
    scores = queries @ keys.unsqueeze(1).transpose(-1, -2) * p.scale
    visible = p.rows_visibility(rows, key_end, sample)[0]
    probs = torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)  # causes are visible: no empty row
    causes = unpack_bits(bits[sample, rows], p.n_k)[:, :key_end]
    return probs, causes, queries, keys


class RowSoftmaxMass(torch.autograd.Function):
    """(B, Hq, Nq) mass from each supervised row's own softmax (exact zeros elsewhere): the portable
    path's, whose log-sum-exp has no cheap gradient (see the module docstring).

    Forward and backward walk the same row blocks and recompute each block's probabilities, so memory
    is one block of scores plus dq and dk, whatever the number of supervised rows. Backward:
    dm_i/dS_ij = P_ij (A_ij - m_i), so dS = c * P * (A - m) with c = dL/dm, dq = tau dS k, dk = tau dS^T q.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, p: AttentionProblem, mask: CausalMask) -> Tensor:
        mass = torch.zeros(p.batch, p.heads_q, p.n_q, dtype=p.compute_dtype, device=q.device)
        for sample, rows in _row_blocks(p, mask, q.device):
            probs, causes, _, _ = _block_probabilities(p, q, k, mask.bits, sample, rows)
            mass[sample, :, rows] = (probs * causes).sum(-1).flatten(0, 1)
        ctx.save_for_backward(q, k, mass)
        ctx.problem, ctx.mask = p, mask
        return mass

    @staticmethod
    def backward(ctx, grad_mass: Tensor):
        q, k, mass = ctx.saved_tensors
        p, mask = ctx.problem, ctx.mask
        dq = torch.zeros(q.shape, dtype=p.compute_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=p.compute_dtype, device=k.device)
        for sample, rows in _row_blocks(p, mask, q.device):
            probs, causes, queries, keys = _block_probabilities(p, q, k, mask.bits, sample, rows)
            shape = (p.heads_kv, p.group, len(rows), 1)
            upstream = grad_mass[sample, :, rows].to(p.compute_dtype).view(shape)
            grad_scores = (causes.to(probs.dtype) - mass[sample, :, rows].view(shape)).mul_(probs).mul_(upstream * p.scale)
            del probs
            dq[sample, :, rows] += (grad_scores @ keys.unsqueeze(1)).flatten(0, 1)
            dk[sample, :, : keys.shape[1]] += (grad_scores.transpose(-1, -2) @ queries).sum(1)
        return dq.to(q.dtype), dk.to(k.dtype), None, None
