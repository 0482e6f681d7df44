"""Validation of `causalattn.attention`'s arguments: every bad argument is reported once, by name,
with what was expected and what came, before any backend runs.

Every backend (reference, composed, Triton) receives inputs that passed `check_inputs`; the shapes
accepted are listed in `causalattn.inputs`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from causalattn.inputs import (FLOAT_DTYPES, GATE_MODES, MAX_ADAPTER_TOKENS, MAX_HEAD_DIM, MIN_HEAD_DIM, XG_POOLS,
                               Adapter, is_int, is_integer_dtype)
from causalattn.masks import CausalMask


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: Optional[float],
    key_lengths: Optional[Tensor],
    key_mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    adapter: Optional[Adapter],
    supervision: Optional["CausalMask"],
    xg_tokens: int,
    xg_pool: str,
    max_seqlen: Optional[int] = None,
) -> None:
    """Raise a ValueError/TypeError naming the first bad argument; return None when all is well.

    `max_seqlen` (packed sequences only) must cover the longest sequence of `cu_seqlens`: the kernels
    launch ceil(max_seqlen / BLOCK_M) row tiles per sequence, so a smaller value leaves rows unwritten.
    It is checked against the offsets already copied to the host, without another device sync."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, H, N, d), got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float16/bfloat16/float32/float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected the device of q ({q.device}), got k {k.device}, v {v.device}")
    batch, heads_q, n_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {_shape(k)}, got {_shape(v)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k: expected (B={batch}, Hkv, Nk, d={head_dim}), got {_shape(k)}")
    heads_kv, n_k = k.shape[1], k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"k: number of KV heads ({heads_kv}) must divide the query heads ({heads_q})")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if n_q > n_k:
        raise ValueError(f"q: expected at most as many queries as keys (Nk={n_k}), got Nq={n_q}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    _check_scale(scale)

    given = [n for n, t in (("key_lengths", key_lengths), ("key_mask", key_mask), ("cu_seqlens", cu_seqlens)) if t is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: give at most one way of masking keys, got {len(given)}")
    if key_lengths is not None:
        _require_tensor("key_lengths", key_lengths)
        if key_lengths.shape != (batch,) or not is_integer_dtype(key_lengths.dtype):
            raise ValueError(f"key_lengths: expected an integer tensor of shape ({batch},), got {key_lengths.dtype} {_shape(key_lengths)}")
        if key_lengths.device != q.device:
            raise ValueError(f"key_lengths: expected device {q.device}, got {key_lengths.device}")
        if bool(((key_lengths < 0) | (key_lengths > n_k)).any()):
            raise ValueError(f"key_lengths: values must lie in [0, {n_k}], got {key_lengths.tolist()}")
    if key_mask is not None:
        _require_tensor("key_mask", key_mask)
        if key_mask.dtype != torch.bool or key_mask.shape != (batch, n_k):
            raise ValueError(f"key_mask: expected a bool tensor of shape ({batch}, {n_k}), got {key_mask.dtype} {_shape(key_mask)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask: expected device {q.device}, got {key_mask.device}")
    if cu_seqlens is not None:
        _require_tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or not is_integer_dtype(cu_seqlens.dtype):
            raise ValueError(f"cu_seqlens: expected a 1-D integer tensor (S + 1,), got {cu_seqlens.dtype} {_shape(cu_seqlens)}")
        if batch != 1 or n_q != n_k:
            raise ValueError(f"cu_seqlens: packed sequences need B == 1 and Nq == Nk, got B={batch}, Nq={n_q}, Nk={n_k}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != n_k or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {n_k}, got {bounds}")
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if max_seqlen is not None and not (is_int(max_seqlen) and longest <= max_seqlen <= n_k):
            raise ValueError(f"max_seqlen: expected an int from the longest packed sequence ({longest}) to the "
                             f"token count ({n_k}), got {max_seqlen!r}")
    elif max_seqlen is not None:
        raise ValueError(f"max_seqlen: describes packed sequences and needs cu_seqlens, got max_seqlen={max_seqlen!r} "
                         f"without cu_seqlens")

    if adapter is not None:
        _check_adapter(adapter, q, heads_kv)
    if supervision is not None:
        if not isinstance(supervision, CausalMask):
            raise TypeError(f"supervision: expected a causalattn.CausalMask, got {type(supervision).__name__}")
        if not causal:
            raise ValueError("supervision: the causal mask supervises causal attention; got causal=False")
        if n_q != n_k:
            raise ValueError(f"supervision: needs Nq == Nk (training), got Nq={n_q}, Nk={n_k}")
        if supervision.batch_size != batch or supervision.seq_len != n_q:
            raise ValueError(f"supervision: expected a CausalMask for batch {batch} and length {n_q}, "
                             f"got batch {supervision.batch_size} and length {supervision.seq_len}")
        if supervision.bits.device != q.device:
            raise ValueError(f"supervision: expected device {q.device}, got {supervision.bits.device} (use mask.to(device))")
        packed_mask = supervision.cu_seqlens
        if (packed_mask is None) != (cu_seqlens is None) or (
                cu_seqlens is not None and not torch.equal(packed_mask.cpu(), cu_seqlens.cpu().to(packed_mask.dtype))):
            raise ValueError("supervision: the CausalMask must be built with the same cu_seqlens as the attention call "
                             "(CausalMask.from_dense/from_spans(..., cu_seqlens=...))")
    if not is_int(xg_tokens) or xg_tokens < 0:
        raise ValueError(f"xg_tokens: expected a non-negative int, got {xg_tokens!r}")
    if xg_tokens:
        if adapter is None:
            raise ValueError(f"xg_tokens: the XG statistic reads adapter tokens, but adapter is None (xg_tokens={xg_tokens})")
        if xg_tokens > adapter.segment_sizes[0]:
            first = "adapter length" if adapter.num_segments == 1 else "first (invariant) segment's length"
            raise ValueError(f"xg_tokens: expected at most the {first} {adapter.segment_sizes[0]}, got {xg_tokens}")
        if n_q != n_k:
            raise ValueError(f"xg_tokens: the XG statistic needs Nq == Nk (training), got Nq={n_q}, Nk={n_k}")
    if xg_pool not in XG_POOLS:
        raise ValueError(f"xg_pool: expected one of {XG_POOLS}, got {xg_pool!r}")


def _check_scale(scale: Optional[float]) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite float or None, got {scale!r}")


def check_segment_inputs(q: Tensor, adapter: Adapter, scale: Optional[float]) -> None:
    """The checks of `check_inputs` that apply to `causalattn.routing.segment_outputs`: q (B, Hq, R, d)
    and an adapter that `attention` would accept with it (segments summing to M, one gate row per segment)."""
    _require_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dims (B, Hq, R, d), got shape {_shape(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected float16/bfloat16/float32/float64, got {q.dtype}")
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter: expected causalattn.Adapter, got {type(adapter).__name__}")
    keys = _require_tensor("adapter.keys", adapter.keys)
    heads_kv = keys.shape[-3] if keys.dim() in (3, 4) else 0
    if heads_kv == 0 or q.shape[1] % heads_kv:
        raise ValueError(f"adapter.keys: its number of KV heads ({heads_kv}) must divide the query heads "
                         f"({q.shape[1]}), got adapter.keys {_shape(keys)}")
    _check_adapter(adapter, q, heads_kv)
    _check_scale(scale)


def _check_adapter(adapter: Adapter, q: Tensor, heads_kv: int) -> None:
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter: expected causalattn.Adapter, got {type(adapter).__name__}")
    batch, heads_q, _, head_dim = q.shape
    for name in ("keys", "values", "gate"):
        t = _require_tensor(f"adapter.{name}", getattr(adapter, name))
        if t.device != q.device:
            raise ValueError(f"adapter.{name}: expected device {q.device}, got {t.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"adapter.{name}: expected a floating dtype, got {t.dtype}")
    keys, values = adapter.keys, adapter.values
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        raise TypeError(f"adapter.keys/values: expected dtype {q.dtype}, got {keys.dtype}/{values.dtype}")
    if keys.shape != values.shape:
        raise ValueError(f"adapter.values: expected the shape of adapter.keys {_shape(keys)}, got {_shape(values)}")
    shared = keys.dim() == 3 and keys.shape[0] == heads_kv and keys.shape[2] == head_dim
    per_sample = keys.dim() == 4 and tuple(keys.shape[:2]) == (batch, heads_kv) and keys.shape[3] == head_dim
    if not (shared or per_sample):
        raise ValueError(f"adapter.keys: expected ({heads_kv}, M, {head_dim}) or ({batch}, {heads_kv}, M, {head_dim}), "
                         f"got {_shape(keys)}")
    if not 1 <= adapter.num_tokens <= MAX_ADAPTER_TOKENS:
        raise ValueError(f"adapter.keys: adapter length M must be in [1, {MAX_ADAPTER_TOKENS}], got {adapter.num_tokens}")
    _check_segments(adapter)
    gate, segments = adapter.gate, adapter.num_segments
    one_segment = segments == 1 and gate.dim() <= 1 and gate.numel() in (1, heads_q)
    per_segment = gate.dim() == 2 and gate.shape[0] == segments and gate.shape[1] in (1, heads_q)
    per_sample = gate.dim() == 3 and gate.shape[:2] == (batch, segments) and gate.shape[2] in (1, heads_q)
    if not (one_segment or per_segment or per_sample):
        expected = f"({heads_q},) or a scalar, " if segments == 1 else ""
        raise ValueError(f"adapter.gate: expected shape {expected}({segments}, {heads_q}), ({segments}, 1), "
                         f"({batch}, {segments}, {heads_q}) or ({batch}, {segments}, 1) for {segments} segment(s), "
                         f"got {_shape(gate)}")
    if adapter.gate_mode not in GATE_MODES:
        raise ValueError(f"adapter.gate_mode: expected one of {GATE_MODES}, got {adapter.gate_mode!r}")


def _check_segments(adapter: Adapter) -> None:
    if adapter.segments is None:
        return
    sizes = adapter.segments
    if not isinstance(sizes, tuple) or not sizes or not all(is_int(size) and size >= 1 for size in sizes):
        raise ValueError(f"adapter.segments: expected a non-empty tuple of positive slot counts, got {sizes!r}")
    if sum(sizes) != adapter.num_tokens:
        raise ValueError(f"adapter.segments: expected slot counts summing to the adapter length "
                         f"{adapter.num_tokens}, got {sizes} (sum {sum(sizes)})")
