"""The fused op's arguments: flat, as the torch.library op takes them, and grouped, as the kernels do.

Op level (one definition: `causalattn.triton_backend` derives the ops' schemas, their fakes and the
saved-for-backward list from these fields, and the launchers take them as they are):

    OpInputs    q (B, Hq, Nq, d); k, v (B, Hkv, Nk, d); adapter_keys, adapter_values (Hkv, M, d) or
                (B, Hkv, M, d); gamma (1 or B, S, Hq) fp32; key_lengths (B,) int32; key_mask (B, Nk)
                uint8; cu_seqlens (S + 1,) int32; mask_bits (B, N, ceil(N/32)) int32; xg_weight
                (B, Nq) fp32 (pooled XG); slot_segment (BLOCK_A,) int32 (S > 1 segments)
    OpFlags     causal, scale, max_seqlen, xg_tokens, xg_pooled, num_samples
    OpOutputs   out (B, Hq, Nq, d); lse (B, Hq, Nq); adapter_lse2 (B, Hq, Nq) or (S, B, Hq, Nq);
                mass (B, Hq, Nq); xg (S', Hq, d) pooled or (B, Hq, Nq, d) per row
    OpGrads     the gradients of OpOutputs that the backward folds in (None: no fold-in)
    InputGrads  the gradients of the differentiable OpInputs, named after them

An absent tensor is None here and in the kernels (`x is None` is decided at compile time); only the
torch.library boundary, which cannot return None, carries it as an empty tensor.

Kernel level: `@triton.jit` functions take these NamedTuples (Triton flattens them); the launchers
build them, with the fields named in capitals wrapped in `tl.constexpr`. A feature that is off is its
group with every field None (`absent`), and kernels test the field they read (`adapter.keys is not
None`): inside @triton.jit, Triton 3.6 cannot compare a whole tuple that holds a None with None (its
unwrapping fails), so a group is never None itself. No field is named `values` or `type`: those are
attributes of Triton's own tuple and would shadow the field.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, TypeVar

from torch import Tensor

Group = TypeVar("Group", bound=tuple)


def absent(group: type[Group]) -> Group:
    """`group` for a feature that is off: every field None."""
    return group._make(None for _ in group._fields)


class OpInputs(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    adapter_keys: Optional[Tensor]
    adapter_values: Optional[Tensor]
    gamma: Optional[Tensor]
    key_lengths: Optional[Tensor]
    key_mask: Optional[Tensor]
    cu_seqlens: Optional[Tensor]
    mask_bits: Optional[Tensor]
    xg_weight: Optional[Tensor]
    slot_segment: Optional[Tensor]


class OpFlags(NamedTuple):
    causal: bool
    scale: float
    max_seqlen: int
    xg_tokens: int
    xg_pooled: bool
    num_samples: int


class OpOutputs(NamedTuple):
    out: Tensor
    lse: Tensor
    adapter_lse2: Optional[Tensor]
    mass: Optional[Tensor]
    xg: Optional[Tensor]


class OpGrads(NamedTuple):
    grad_out: Tensor
    grad_lse: Optional[Tensor]
    grad_mass: Optional[Tensor]
    grad_xg: Optional[Tensor]


class InputGrads(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    adapter_keys: Optional[Tensor]
    adapter_values: Optional[Tensor]
    gamma: Optional[Tensor]


# ------------------------------------------------------------------------------ kernel groups
class Sizes(NamedTuple):
    """The problem's extents: query rows and keys per sample (the packed total with cu_seqlens), heads."""
    n_q: int
    n_k: int
    heads_q: int
    heads_kv: int
    group: int  # query heads per KV head (GQA)


class Packing(NamedTuple):
    """Which rows and keys a program sees: packed sequences, or per-sample key lengths / key mask."""
    cu_seqlens: Optional[Tensor]
    key_lengths: Optional[Tensor]
    key_mask: Optional[Tensor]


class AdapterArgs(NamedTuple):
    """The gated adapter (docs/math.md §1), in segments with NUM_SEGMENTS > 1 (docs/math.md §7)."""
    ka: Tensor
    va: Tensor
    gamma: Tensor
    slot_segment: Optional[Tensor]
    lse2: Tensor  # the forward writes it, the backward reads it
    length: int  # M slots
    batch_stride: int  # 0: one adapter shared by the batch
    segment_stride: int  # elements between two segments' LSE planes
    BLOCK_A: int
    NUM_SEGMENTS: int
    GATE_PER_SAMPLE: bool


class AdapterGrads(NamedTuple):
    """The row kernel's fp32 partial sums of dKa, dVa and dgamma, one per (chunk, sample)."""
    dka: Tensor
    dva: Tensor
    dgamma: Tensor


class Supervision(NamedTuple):
    """CAT (docs/math.md §3): the bit-packed CausalMask, its per-tile summary and the mass statistic. A kernel
    gets the fields it reads; the others are None / 0."""
    bits: Optional[Tensor]
    tiles: Optional[Tensor]  # (B, n_row_tiles, n_col_tiles) int8 `tile_summary`; None with packing
    words: int  # int32 words per mask row
    n_row_tiles: int
    n_col_tiles: int
    mass: Optional[Tensor]
    grad_mass: Optional[Tensor]
    grad_tiles: Optional[Tensor]  # (B, Hq, n_row_tiles) int8 `query_tile_flags`


class Xg(NamedTuple):
    """DCA's XG statistic (docs/math.md §4): `tensor` is what the forward writes (pooled per-tile partials or
    per-row z) or the gradient the backward reads; `weight` the pooled rows' weights."""
    tensor: Tensor
    weight: Optional[Tensor]
    TOKENS: int
    POOLED: bool


class RowInputs(NamedTuple):
    """The per-row tensors the dK/dV and dQ sweeps load for a query tile, with their strides."""
    q: Tensor
    grad_out: Tensor
    lse: Tensor
    delta: Tensor
    q_strides: tuple
    grad_out_strides: tuple
