"""Packed sequences (padding-free batches) as transformers hands them to an attention layer.

A collator that packs several sequences into one row sends `cu_seq_lens_q` (FlashAttention's
offsets) or only `position_ids` that restart at 0 where a sequence begins (transformers' rule). Both
become the op's `cu_seqlens` over the B*N flattened tokens; the router hook asks the same question.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor


# (weak reference to the tensor the packing was read from, its key, the result): every layer of one
# forward receives the same position_ids / cu_seq_lens_q tensor, so its boundaries, and the
# device-to-host syncs that find them, are computed once per forward instead of 3-4 times per layer.
_last_packing: Optional[tuple[weakref.ref, tuple, Optional[tuple[Tensor, Optional[int]]]]] = None


def packed_sequences(kwargs: dict, batch: int, n: int, device: torch.device) -> Optional[tuple[Tensor, Optional[int]]]:
    """(cu_seqlens over the B*N flattened tokens, max length or None) for a padding-free batch, else
    None; cached on the identity and version of the tensor it is read from (see `_last_packing`)."""
    global _last_packing
    source = kwargs.get("cu_seq_lens_q")
    if source is None:
        source = kwargs.get("position_ids")
    if not isinstance(source, Tensor):
        return None
    key = (source._version, batch, n, device, kwargs.get("max_length_q"), id(kwargs.get("cu_seq_lens_k")))
    if _last_packing is not None and _last_packing[0]() is source and _last_packing[1] == key:
        return _last_packing[2]
    packed = _find_packed_sequences(kwargs, batch, n, device)
    _last_packing = (weakref.ref(source), key, packed)
    return packed


def _find_packed_sequences(kwargs: dict, batch: int, n: int, device: torch.device) -> Optional[tuple[Tensor, Optional[int]]]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu_k.to(cu.device), cu):
            raise ValueError("cu_seq_lens_k: causalattn packs self-attention only; expected cu_seq_lens_q")
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q: packed sequences come as one row (B == 1), got B={batch}")
        max_len = kwargs.get("max_length_q")
        return cu.to(device=device, dtype=torch.int32), int(max_len) if max_len is not None else None
    positions = kwargs["position_ids"].to(device).expand(batch, n)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    first_tokens = starts.flatten().nonzero().flatten()  # the one sync that finds the sequences
    if first_tokens.numel() == batch:  # one sequence per row: plain causal attention
        return None
    bounds = torch.cat([first_tokens, torch.tensor([batch * n], device=device)]).to(torch.int32)
    # the longest sequence now (a second sync, once per forward) rather than in the op for every layer
    return bounds, int((bounds[1:] - bounds[:-1]).max())
