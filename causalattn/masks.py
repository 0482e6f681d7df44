"""`CausalMask`: the token-level causal adjacency supervision of CAT (docs/math.md §2), bit-packed.

`A[b, i, j] = 1` says: the prediction made at query row `i` (the token before an effect token) should
attend to key `j` (a cause token). Rows are lower-triangular and never point at padding.

Shapes
------
bits        (B, N, W) int32, W = ceil(N / 32); bit t of word w of row i is A[b, i, 32 w + t]
cause_count (B, N) int32   n1: number of cause keys in the row
visible     (B, N) int32   number of keys a causal row sees (padding excluded); n0 = visible - n1

Builders never allocate a dense B x N x N tensor: spans are written straight into words, dense input
is packed a block of rows at a time, and readers unpack a block of rows at a time.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from causalattn.inputs import is_int, is_integer_dtype

Span = tuple[int, int]  # half-open token interval [start, end)
EffectCauses = tuple[Span, Sequence[Span]]

BITS_PER_WORD = 32
# Rows packed or unpacked at once: 256 rows x 16k keys is 4 M bools / 32 MB of int64 scratch.
_ROW_BLOCK = 256
_BIT_WEIGHTS = torch.tensor([1 << t for t in range(BITS_PER_WORD)], dtype=torch.int64)


def _words(n: int) -> int:
    return (n + BITS_PER_WORD - 1) // BITS_PER_WORD


def pack_bits(dense: Tensor) -> Tensor:
    """Pack a bool (..., N) tensor into (..., ceil(N/32)) int32 words (bit t of word w = column 32w+t)."""
    n = dense.shape[-1]
    padded = torch.nn.functional.pad(dense.to(torch.int64), (0, _words(n) * BITS_PER_WORD - n))
    words = (padded.unflatten(-1, (-1, BITS_PER_WORD)) * _BIT_WEIGHTS.to(dense.device)).sum(-1)
    # Values >= 2**31 (bit 31 set) are stored as the int32 with the same bit pattern.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits(words: Tensor, n: int) -> Tensor:
    """Inverse of `pack_bits`: (..., W) int32 -> (..., n) bool."""
    shifts = torch.arange(BITS_PER_WORD, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :n].bool()


def _starts(sorted_index: Tensor, n: int) -> Tensor:
    """(n + 1,) CSR offsets of an ascending index: where each of the n values' entries begin."""
    return torch.nn.functional.pad(torch.bincount(sorted_index, minlength=n).cumsum(0), (1, 0))


def popcount(words: Tensor) -> Tensor:
    """Number of set bits of each int32 word, summed over the last dim -> int32."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = (x * 0x01010101 & 0xFFFFFFFF) >> 24
    return x.sum(-1).to(torch.int32)


def _prefix_words(ends: Tensor, n_words: int) -> Tensor:
    """(R, W) int32 words with the bits of columns [0, ends[r]) set, for each row r."""
    word = torch.arange(n_words, device=ends.device)
    full, rest = ends[:, None] // BITS_PER_WORD, ends[:, None] % BITS_PER_WORD
    partial = (torch.ones_like(rest) << rest) - 1  # rest <= 31: fits int32 as it is
    words = torch.where(word < full, torch.full_like(partial, -1), torch.where(word == full, partial, 0))
    return words.to(torch.int32)


def _check_seq_len(seq_len: object) -> int:
    if not is_int(seq_len) or seq_len < 0:
        raise ValueError(f"seq_len: expected a non-negative int, got {seq_len!r}")
    return seq_len


def _key_valid(batch: int, n: int, key_mask: Optional[Tensor], device: torch.device) -> Tensor:
    if key_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if key_mask.dtype != torch.bool or key_mask.shape != (batch, n):
        raise ValueError(f"key_mask: expected a bool tensor of shape ({batch}, {n}), got {key_mask.dtype} {tuple(key_mask.shape)}")
    return key_mask.to(device)


class CausalMask:
    """Bit-packed causal adjacency mask for a batch; see the module docstring for the layout."""

    def __init__(self, bits: Tensor, seq_len: int, key_mask: Optional[Tensor] = None,
                 cu_seqlens: Optional[Tensor] = None, *, check_bits: bool = True):
        """`bits` (B, N, ceil(N/32)) int32 as laid out in the module docstring; any strides (stored
        contiguous: the kernels index rows as `row * W`). A bit above the diagonal, past N, on a
        padding key or (packed) in another sequence raises: it would make n0 = visible - n1 wrong.
        `check_bits=False` skips that check for bits visible by construction (`from_dense` masks them
        so; the check took 8 of the constructor's 31 s at N = 16k, B = 4 on a loaded 2-core machine)."""
        _check_seq_len(seq_len)
        if not isinstance(bits, Tensor) or bits.dtype != torch.int32 or bits.dim() != 3:
            got = f"{bits.dtype} {tuple(bits.shape)}" if isinstance(bits, Tensor) else type(bits).__name__
            raise ValueError(f"bits: expected an int32 tensor (B, N, ceil(N/32)), got {got}")
        if bits.shape[1] != seq_len or bits.shape[2] != _words(seq_len):
            raise ValueError(f"bits: expected shape (B, {seq_len}, {_words(seq_len)}) for seq_len={seq_len}, got {tuple(bits.shape)}")
        self.bits = bits.contiguous()
        self.seq_len = seq_len
        valid = _key_valid(bits.shape[0], seq_len, key_mask, bits.device)
        self.key_mask = key_mask.to(bits.device) if key_mask is not None else None
        self.cu_seqlens = None
        first_key = torch.zeros(seq_len, dtype=torch.int64, device=bits.device)
        self.visible = valid.to(torch.int32).cumsum(-1, dtype=torch.int32)
        if cu_seqlens is not None:
            # Packed sequences: a row sees only the keys of its own sequence.
            self.cu_seqlens = _check_packing(cu_seqlens, bits.shape[0], seq_len, key_mask).to(bits.device)
            first_key = self._sequence_starts().to(torch.int64)
            self.visible = torch.arange(1, seq_len + 1, dtype=torch.int32, device=bits.device) - first_key.to(torch.int32)[None]
        if check_bits:
            self._check_bits_visible(first_key, valid)
        self.cause_count = popcount(self.bits)

    def _check_bits_visible(self, first_key: Tensor, valid: Tensor) -> None:
        """Raise when a cause bit lies outside the keys its row sees: [first_key, row] and real keys.
        Word-level (N^2/32 int32 operations, a block of rows at a time), one host sync."""
        n, words = self.seq_len, self.bits.shape[2]
        valid_words = pack_bits(valid)[:, None]  # (B, 1, W)
        for start in range(0, n, _ROW_BLOCK):
            rows = torch.arange(start, min(n, start + _ROW_BLOCK), device=self.bits.device)
            seen = _prefix_words(rows + 1, words) & ~_prefix_words(first_key[rows], words)
            stray = self.bits[:, start : start + _ROW_BLOCK] & ~(seen & valid_words)
            if bool((stray != 0).any()):
                b, row, _ = (int(i) for i in (stray != 0).nonzero()[0])
                raise ValueError(f"bits: row {start + row} of sample {b} marks a cause it cannot see (above the "
                                 f"diagonal, past seq_len={n}, on padding or in another packed sequence)")

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dense(cls, dense: Tensor, key_mask: Optional[Tensor] = None,
                   cu_seqlens: Optional[Tensor] = None) -> "CausalMask":
        """From a bool (B, N, N) tensor; entries above the diagonal, on padding keys or (packed
        sequences, B = 1) in another sequence are dropped."""
        if not isinstance(dense, Tensor) or dense.dim() != 3 or dense.shape[1] != dense.shape[2]:
            got = tuple(dense.shape) if isinstance(dense, Tensor) else type(dense).__name__
            raise ValueError(f"dense: expected a (B, N, N) tensor, got {got}")
        if dense.dtype != torch.bool and bool(((dense != 0) & (dense != 1)).any()):  # NaN is neither
            raise ValueError(f"dense: expected a bool tensor or entries 0 and 1, got {dense.dtype} with other values "
                             f"(e.g. {dense[(dense != 0) & (dense != 1)][0].item()})")
        batch, n, _ = dense.shape
        valid = _key_valid(batch, n, key_mask, dense.device)
        first_key = torch.zeros(n, dtype=torch.int64, device=dense.device)
        if cu_seqlens is not None:
            starts = _check_packing(cu_seqlens, batch, n, key_mask).to(dense.device)
            first_key = torch.repeat_interleave(starts[:-1], starts[1:] - starts[:-1])
        bits = torch.empty(batch, n, _words(n), dtype=torch.int32, device=dense.device)
        cols = torch.arange(n, device=dense.device)
        for start in range(0, n, _ROW_BLOCK):
            rows = torch.arange(start, min(n, start + _ROW_BLOCK), device=dense.device)
            own_keys = (cols <= rows[:, None]) & (cols >= first_key[rows, None])
            block = dense[:, start : start + _ROW_BLOCK].bool() & own_keys & valid[:, None, :]
            bits[:, start : start + _ROW_BLOCK] = pack_bits(block)
        return cls(bits, n, key_mask, cu_seqlens, check_bits=False)

    @classmethod
    def from_spans(
        cls,
        spans: Sequence[Sequence[EffectCauses]],
        seq_len: int,
        key_mask: Optional[Tensor] = None,
        device: Optional[torch.device | str] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> "CausalMask":
        """From token spans: `spans[b]` lists `((e0, e1), [(c0, c1), ...])` for sample `b` (docs/math.md §2).

        Each effect span `[e0, e1)` makes rows `e0-1 .. e1-2` (the positions that predict the effect
        tokens) attend to every cause span, which must end before the effect starts with at least one
        token between (`c1 < e0`).
        """
        _check_seq_len(seq_len)
        batch = len(spans)
        if key_mask is not None and key_mask.shape[0] != batch:
            raise ValueError(f"key_mask: expected batch {batch} (len(spans)), got {tuple(key_mask.shape)}")
        valid = _key_valid(batch, seq_len, key_mask, torch.device("cpu"))
        sequence = torch.zeros(seq_len, dtype=torch.int64)
        if cu_seqlens is not None:
            starts = _check_packing(cu_seqlens, batch, seq_len, key_mask).cpu()
            sequence = torch.repeat_interleave(torch.arange(starts.numel() - 1), starts[1:] - starts[:-1])
        bits = torch.zeros(batch, seq_len, _words(seq_len), dtype=torch.int32)
        for b, pairs in enumerate(spans):
            for effect, causes in pairs:
                e0, e1 = _check_span(effect, seq_len, f"spans[{b}] effect")
                if e0 < 1:
                    raise ValueError(f"spans[{b}] effect {effect}: an effect at position 0 has no predicting row")
                columns = torch.zeros(seq_len, dtype=torch.bool)
                for cause in causes:
                    c0, c1 = _check_span(cause, seq_len, f"spans[{b}] cause")
                    if c1 >= e0:
                        raise ValueError(f"spans[{b}]: cause {cause} must end before effect {effect} starts "
                                         f"(with at least one token between, docs/math.md §2)")
                    # the effect's predicting rows e0-1 .. e1-2 and the cause all in one packed sequence
                    if len({int(sequence[t]) for t in (c0, c1 - 1, e0, max(e0 - 1, e1 - 2))}) > 1:
                        raise ValueError(f"spans[{b}]: cause {cause} and effect {effect} lie in different packed sequences")
                    columns[c0:c1] = True
                if bool((columns & ~valid[b]).any()):
                    raise ValueError(f"spans[{b}]: a cause of effect {effect} covers padding tokens")
                bits[b, e0 - 1 : e1 - 1] |= pack_bits(columns)
        mask = cls(bits, seq_len, key_mask.cpu() if key_mask is not None else None, cu_seqlens)
        return mask.to(device) if device is not None else mask

    # ------------------------------------------------------------------ readers
    @property
    def batch_size(self) -> int:
        return self.bits.shape[0]

    @property
    def device(self) -> torch.device:
        return self.bits.device

    @property
    def non_cause_count(self) -> Tensor:
        """n0 (B, N): visible keys that are not causes."""
        return self.visible - self.cause_count

    def valid_rows(self) -> Tensor:
        """(B, N) bool: rows with at least one cause and one non-cause key (docs/math.md §2)."""
        return (self.cause_count > 0) & (self.non_cause_count > 0)

    def _sequence_starts(self) -> Tensor:
        """(N,) position where each token's packed sequence starts."""
        starts = self.cu_seqlens.to(torch.int64)
        return torch.repeat_interleave(starts[:-1], starts[1:] - starts[:-1]).to(torch.int32)

    def supervised_rows(self) -> tuple[Tensor, Tensor]:
        """(samples, rows): int64 CPU indices of the rows with at least one cause, sample-major and
        ascending. Computed once per mask (one device sync) and reused by every layer."""
        if getattr(self, "_supervised_rows", None) is None:
            samples, rows = (self.cause_count > 0).nonzero(as_tuple=True)
            self._supervised_rows = (samples.cpu(), rows.cpu())
        return self._supervised_rows

    def cause_pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(samples, rows, keys): int64 indices on the mask's device of every (effect row, cause key) pair,
        sample-major. Unpacked a block of supervised rows at a time (never B x N x N), once per mask and
        reused by every layer: the composed backend's mass costs O(pairs) from them."""
        if getattr(self, "_cause_pairs", None) is None:
            samples, rows = self.supervised_rows()
            found = []
            for block_samples, block_rows in zip(samples.split(_ROW_BLOCK), rows.split(_ROW_BLOCK)):
                block_samples, block_rows = block_samples.to(self.device), block_rows.to(self.device)
                which, keys = unpack_bits(self.bits[block_samples, block_rows], self.seq_len).nonzero(as_tuple=True)
                found.append((block_samples[which], block_rows[which], keys))
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            self._cause_pairs = tuple(torch.cat(parts) if parts else empty for parts in zip(*found)) if found \
                else (empty, empty, empty)
        return self._cause_pairs

    def cause_patterns(self) -> list[Optional[tuple]]:
        """Per sample, the sparsity pattern of its (row, key) pairs in two CSR orders, or None without
        pairs: ((row starts (N+1,), keys by row), (key starts (N+1,), rows by key), the permutation from
        row order to key order, the sample's indices into `cause_pairs()`). Built once per mask."""
        if getattr(self, "_cause_patterns", None) is None:
            samples, rows, keys = self.cause_pairs()
            patterns = []
            for sample in range(self.batch_size):
                pairs = (samples == sample).nonzero().flatten()
                if pairs.numel() == 0:
                    patterns.append(None)
                    continue
                sample_rows, sample_keys = rows[pairs], keys[pairs]
                to_key_order = torch.argsort(sample_keys * self.seq_len + sample_rows)
                patterns.append(((_starts(sample_rows, self.seq_len), sample_keys),
                                 (_starts(sample_keys[to_key_order], self.seq_len), sample_rows[to_key_order]),
                                 to_key_order, pairs))
            self._cause_patterns = patterns
        return self._cause_patterns

    def unpack_rows(self, start: int, end: int) -> Tensor:
        """Dense bool (B, end - start, N) block of rows."""
        return unpack_bits(self.bits[:, start:end], self.seq_len)

    def to_dense(self) -> Tensor:
        """Dense bool (B, N, N); for small N (tests, plots)."""
        return self.unpack_rows(0, self.seq_len)

    def to(self, device: torch.device | str) -> "CausalMask":
        if torch.device(device) == self.device:
            return self
        moved = object.__new__(CausalMask)
        moved.bits = self.bits.to(device)
        moved.seq_len = self.seq_len
        moved.key_mask = self.key_mask.to(device) if self.key_mask is not None else None
        moved.cu_seqlens = self.cu_seqlens.to(device) if self.cu_seqlens is not None else None
        moved.cause_count = self.cause_count.to(device)
        moved.visible = self.visible.to(device)
        return moved

    def __repr__(self) -> str:
        rows = int(self.valid_rows().sum())
        return f"CausalMask(batch={self.batch_size}, seq_len={self.seq_len}, supervised_rows={rows}, device={self.device})"


def _check_packing(cu_seqlens: Tensor, batch: int, seq_len: int, key_mask: Optional[Tensor]) -> Tensor:
    """Validated packing offsets (S + 1,) int64: B == 1, from 0 to seq_len, non-decreasing."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or not is_integer_dtype(cu_seqlens.dtype):
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor of offsets, got {cu_seqlens!r}")
    if batch != 1 or key_mask is not None:
        raise ValueError(f"cu_seqlens: packed sequences need batch 1 and no key_mask, got batch {batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seq_len or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {seq_len}, got {bounds}")
    return cu_seqlens.to(torch.int64)


def _check_span(span: Iterable[int], seq_len: int, what: str) -> Span:
    try:  # operator.index takes ints and integer scalars only: int() would truncate a float position
        items = tuple(span)
        if any(isinstance(x, bool) for x in items):
            raise TypeError
        start, end = (operator.index(x) for x in items)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a (start, end) pair of ints, got {span!r}") from None
    if not 0 <= start < end <= seq_len:
        raise ValueError(f"{what} {tuple(span)}: expected 0 <= start < end <= seq_len={seq_len}")
    return start, end
