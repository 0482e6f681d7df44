"""The argument and result types of `causalattn.attention` (validated in `causalattn.validation`).

Shapes
------
q            (B, Hq, Nq, d)
k, v         (B, Hkv, Nk, d)           Hq = G * Hkv (GQA)
key_lengths  (B,) int                  keys j >= key_lengths[b] are padding
key_mask     (B, Nk) bool              True marks a real token (left or right padding)
cu_seqlens   (S + 1,) int              packed sequences, B == 1, Nq == Nk == cu_seqlens[-1]
Adapter.keys / .values  (Hkv, M, d) shared, or (B, Hkv, M, d) per sample;  M <= 64
                        (packed: B == 1, so one adapter for every sequence of the row)
Adapter.gate            (Hq,) per query head, or () / (1,) one scalar            (one segment)
                        (S, Hq) / (S, 1) per segment, or (B, S, Hq) / (B, S, 1) per sample too
Adapter.segments        (M_0, ..., M_{S-1}) slot counts summing to M, or None: one segment of M
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

GATE_MODES = ("tanh", "raw")
XG_POOLS = ("sample", "position")
MAX_ADAPTER_TOKENS = 64
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Adapter:
    """Zero-init gated adapter prompt of one layer (docs/math.md §1), optionally in segments (docs/math.md §7).

    `keys`/`values` are the layer's frozen k/v projections of its prompt (no RoPE). The output gains
    `sum_s gamma_{s,h} softmax_s(scale * q Ka_s^T) Va_s`: each segment s (consecutive slots, sizes in
    `segments`) has its own softmax and its own gate, `gamma = tanh(gate)` by default
    (`gate_mode="raw"`: `gamma = gate`, PEFT's form). One segment is LLaMA-Adapter exactly.

    Routed adapters (ICLM): an invariant segment shared by every sample and a domain segment gathered
    per sample from a bank give per-sample keys (B, Hkv, M, d) and a per-sample gate (B, S, Hq); soft
    routing puts every domain prompt in its own segment and scales its gate by the route weight.
    """

    keys: Tensor
    values: Tensor
    gate: Tensor
    gate_mode: str = "tanh"
    segments: Optional[tuple[int, ...]] = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[-2]

    @property
    def segment_sizes(self) -> tuple[int, ...]:
        return tuple(self.segments) if self.segments is not None else (self.num_tokens,)

    @property
    def num_segments(self) -> int:
        return len(self.segment_sizes)

    def segment_bounds(self) -> list[tuple[int, int]]:
        """[(start, end)) slot range of each segment, in order."""
        ends = list(itertools.accumulate(self.segment_sizes))
        return list(zip([0] + ends[:-1], ends))

    def gamma(self) -> Tensor:
        """The gate value multiplying the adapter branch, differentiable in `gate` (the gate's shape)."""
        return gate_values(self.gate, self.gate_mode)

    def gammas(self, heads_q: int) -> Tensor:
        """(1 or B, S, Hq) gate value of every (sample, segment, query head), differentiable in `gate`."""
        return segment_gammas(self.gate, self.gate_mode, heads_q)


def gate_values(gate: Tensor, gate_mode: str) -> Tensor:
    """gamma = tanh(gate) ("tanh", zero-init LLaMA-Adapter) or the gate itself ("raw", PEFT)."""
    return torch.tanh(gate) if gate_mode == "tanh" else gate


def segment_gammas(gate: Tensor, gate_mode: str, heads_q: int) -> Tensor:
    """(1 or B, S, Hq) gate values from any accepted gate shape (see `Adapter.gate`)."""
    gamma = gate_values(gate, gate_mode)
    if gamma.dim() <= 1:  # one segment: a scalar or one gate per query head
        gamma = gamma.reshape(1, 1, -1)
    elif gamma.dim() == 2:  # (S, Hq or 1) shared by the batch
        gamma = gamma.unsqueeze(0)
    return gamma.expand(gamma.shape[0], gamma.shape[1], heads_q)


class AttentionOutput(NamedTuple):
    """out (B, Hq, Nq, d); lse (B, Hq, Nq) fp32, +inf on rows that see no key;
    mass (B, Hq, Nq) or None; xg (S, Hq, d) pooled / (B, Hq, Nq, d) per row, or None."""

    out: Tensor
    lse: Tensor
    mass: Optional[Tensor] = None
    xg: Optional[Tensor] = None


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Integer dtypes only: bool (a mask, not a count), float and complex are not offsets or lengths."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def is_int(value: object) -> bool:
    """A Python int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
