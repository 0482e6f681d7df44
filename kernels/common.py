"""Pieces shared by the fused attention forward and backward kernels.

* `sequence_bounds`: where a program's (sample or packed sequence, head) lives and which keys it sees;
* `adapter_probs`: the adapter tile's softmax recomputed from its saved log-sum-exp;
* `slot_segments` / `segment_slot_lse`: adapter segments (SPEC §7), each slot's segment and LSE;
* `cause_bits`: one (BLOCK_M, BLOCK_N) tile of the bit-packed CausalMask;
* `tile_summary`: the per-tile "any cause bit set" table that lets kernels skip empty mask tiles;
* `query_tile_flags`: the per-query-tile "any mass gradient" table of the dK/dV sweep;
* `TileConfig` / `tile_config`: block sizes, warps and stages per kernel, head dim and dtype;
* `launch_tuned`: the dK/dV and dQ launches, optionally timed over a few candidate tiles on CUDA
  (CAUSALATTN_AUTOTUNE=1), the winner cached in memory and in a JSON file per Triton version.

Units: scores are kept in base 2 (`s2 = scale * log2(e) * q.k`), so the kernels use exp2/log2; the
log-sum-exp handed to users is converted back to natural log (`lse = lse2 * ln 2`).
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import weakref
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

# Globals read inside @triton.jit code must be constexpr (host code uses `.value`).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# sm_90 tiles per kernel, keyed by the largest head dim they serve (first match wins). Why these:
# * fwd: FlashAttention-2's Triton choice, 128 queries x 64 keys; 8 warps at d = 128 keep two
#   warpgroups on 64 query rows each; above 128 smaller tiles so K/V stages fit 227 KB.
# * dkdv: keys as rows (128 keys x 32 queries, 8 warps): Pt = exp2(K Qt - lse) is computed directly
#   in the orientation dV += Pt dO and dK += dSt Q need, so Pt and dSt stay in registers as the A
#   operand of wgmma; with 64 x 64 and queries as rows, both warpgroups computed the same S and dP
#   (40 wgmma per iteration where 24 do) and Pt, dSt went through shared memory (5 barriers). 32
#   queries per step, not 64: at d = 128 the dK, dV accumulators alone take 128 of the 255
#   registers, and the 64-query Pt, dPt tiles (32 registers each) spilled 88 B (d = 128) and 4 B
#   (d = 64); 32 x 128 compiles at 252 / 201 registers without a spill. Two stages: a third fits
#   the plain kernel (255 registers) but spills 96 B with all features; the autotuner tries it.
# * rows: 32 queries, 8 warps: with the adapter the tile holds q, dO, dz, Pa, dT and the dKa, dVa
#   accumulators; 64 rows spilled 116 B (adapter, bf16 d = 128) and 484 B (all features), 32 rows
#   compile at 224 registers without a spill and 244 B (M x d dots of 32 rows run on mma.sync).
# * dq: 128 queries x 64 keys, 8 warps: each warpgroup owns 64 query rows, no duplicated wgmma
#   (36 -> 20 per iteration at d = 128 compared with 64 x 64).
# tests/compile_kernels.py prints registers, spills and shared bytes of each (benchmarks/results/).
_SM90_TILES = {
    "fwd": ((64, TileConfig(128, 64, 4, 3)), (128, TileConfig(128, 64, 8, 3)), (256, TileConfig(64, 32, 8, 2))),
    "rows": ((128, TileConfig(32, 64, 8, 3)), (256, TileConfig(32, 32, 8, 3))),
    "dkdv": ((128, TileConfig(32, 128, 8, 2)), (256, TileConfig(32, 32, 8, 1))),
    "dq": ((128, TileConfig(128, 64, 8, 2)), (256, TileConfig(32, 32, 8, 1))),
}
# What the autotuner times besides the table's choice (CAUSALATTN_AUTOTUNE=1, CUDA only), keyed like
# _SM90_TILES; each compiles for sm_90a within the shared memory (tests/compile_kernels.py). At d = 128:
# dkdv 64 x 128 does twice the work per wgmma but spills 88 B (outside the loops); 3 stages hide more
# of the q/dO load latency (255 registers, no spill, 115 KB); dq 64 x 64 x 4 warps gives twice the
# programs for short sequences (187 registers), 128 x 64 x 3 stages 253 registers, 160 KB. Above 128
# the alternatives tried (dkdv 32 x 64, dq 64 x 32) spill inside the loops, so the table stands alone.
_SM90_CANDIDATES = {
    "dkdv": ((128, (TileConfig(64, 128, 8, 2), TileConfig(32, 128, 8, 3))), (256, ())),
    "dq": ((128, (TileConfig(64, 64, 4, 2), TileConfig(128, 64, 8, 3))), (256, ())),
}
# Under the interpreter the cost is per program x loop iteration, so the largest tiles win (64-wide
# tiles run ~10x faster than 16-wide ones); dkdv and dq keep their sm_90 aspect ratios so that the
# tests cover tiles whose query and key extents differ.
_INTERPRETER_TILES = {"fwd": TileConfig(64, 64, 4, 1), "rows": TileConfig(64, 64, 4, 1),
                      "dkdv": TileConfig(64, 128, 4, 1), "dq": TileConfig(128, 64, 4, 1)}


def tile_overrides() -> dict[str, TileConfig]:
    """Tiles forced through CAUSALATTN_TILES, e.g. "dkdv=64x128x8x3,dq=128x64x8x2" (queries x keys x
    warps x stages per kernel): how the tile A/B benchmarks and the static table try other shapes."""
    spec = os.environ.get("CAUSALATTN_TILES", "")
    overrides = {}
    for item in filter(None, spec.split(",")):
        kernel, _, shape = item.partition("=")
        try:
            block_m, block_n, warps, stages = (int(x) for x in shape.split("x"))
        except ValueError:
            raise ValueError(f"CAUSALATTN_TILES: expected kernel=MxNxWARPSxSTAGES items, got {item!r}") from None
        if kernel not in _SM90_TILES:
            raise ValueError(f"CAUSALATTN_TILES: kernel must be one of {sorted(_SM90_TILES)}, got {kernel!r}")
        overrides[kernel] = TileConfig(block_m, block_n, warps, stages)
    return overrides


def tile_config(head_dim: int, kernel: str, dtype: torch.dtype) -> TileConfig:
    """Block sizes for `kernel` in {"fwd", "rows", "dkdv", "dq"} (block_m: queries, block_n: keys).

    fp32 tiles take twice the bytes: compiled for sm_90 the fp32 forward at d = 80..128 needs 240 KB
    with the half-precision tiles, so fp32 halves the larger block and keeps at most two stages
    (tests/compile_kernels.py checks every variant against the limit). BLOCK_N is a multiple of 32 so
    a key tile covers whole words of the bit-packed mask.
    """
    override = tile_overrides().get(kernel)
    if override is not None:
        return override
    if interpreting():
        return _INTERPRETER_TILES[kernel]
    return _for_dtype(next(config for limit, config in _SM90_TILES[kernel] if head_dim <= limit), dtype)


def _for_dtype(config: TileConfig, dtype: torch.dtype) -> TileConfig:
    if dtype != torch.float32:
        return config
    block_m, block_n = config.block_m, config.block_n
    if block_m >= block_n:
        block_m = max(32, block_m // 2)
    else:
        block_n = max(32, block_n // 2)
    return TileConfig(block_m, block_n, config.num_warps, min(2, config.num_stages))


def tile_candidates(head_dim: int, kernel: str, dtype: torch.dtype) -> list[TileConfig]:
    """The table's tiles for `kernel` ("dkdv" or "dq") first, then the alternatives the autotuner times."""
    others = next(configs for limit, configs in _SM90_CANDIDATES[kernel] if head_dim <= limit)
    candidates = [tile_config(head_dim, kernel, dtype)]
    for config in others:
        config = _for_dtype(config, dtype)
        if config not in candidates:
            candidates.append(config)
    return candidates


def autotuning() -> bool:
    """CAUSALATTN_AUTOTUNE=1: time the candidate tiles on the first CUDA launch of each key. Off by
    default: each candidate is one more compile per (kernel, dtype, head dim, features), tens of
    seconds over a test suite or a short benchmark session, and the table is the measured default."""
    return os.environ.get("CAUSALATTN_AUTOTUNE", "0") == "1"


def cache_path() -> Path:
    """The JSON file of tuned tiles: $XDG_CACHE_HOME/causalattn (or ~/.cache/causalattn), one file per
    Triton version since a compiler change can reorder the candidates."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "causalattn" / f"tiles-triton-{triton.__version__}.json"


def _capability(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def _time_launch(launch: Callable[[], None]) -> float:
    """Median milliseconds of `launch` (a few reps: the candidates differ by far more than the noise)."""
    from triton.testing import do_bench

    return do_bench(launch, warmup=5, rep=20, return_mode="median")


_tuned: dict[str, TileConfig] = {}  # memory cache; filled from cache_path() on first use
_loaded_from: list[Path] = []


def _read_cache(path: Path) -> dict[str, TileConfig]:
    try:
        entries = json.loads(path.read_text())
        return {key: TileConfig(*value) for key, value in entries.items()}
    except (OSError, ValueError, TypeError):  # absent, unreadable or from an incompatible writer
        return {}


def _write_cache(path: Path, key: str, config: TileConfig) -> None:
    """Read-merge-write through a temporary file and a rename, so that concurrent processes never
    leave a half-written file (the last writer of a key wins; both measured it)."""
    entries = {k: astuple(v) for k, v in _read_cache(path).items()}
    entries[key] = astuple(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
            json.dump(entries, file, indent=1, sort_keys=True)
        os.replace(file.name, path)
    except OSError:  # a read-only home: the choice still holds for this process
        pass


def launch_tuned(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device, features: str,
                 launch: Callable[[TileConfig], None]) -> TileConfig:
    """Run `launch(config)` once with the tiles for `kernel` and return them.

    CAUSALATTN_TILES wins; else, on CUDA with CAUSALATTN_AUTOTUNE=1, the fastest of
    `tile_candidates` for the key (capability, kernel, dtype, head dim, features), timed on the first
    launch of that key and cached in memory and in `cache_path()`; else the table. `launch` must
    write all of its outputs on every call (the timing runs overwrite them, the last run is the
    winner's)."""
    config = tile_config(head_dim, kernel, dtype)
    tuned = kernel not in tile_overrides() and device.type == "cuda" and not interpreting() and autotuning()
    candidates = tile_candidates(head_dim, kernel, dtype) if tuned else [config]
    if len(candidates) == 1:
        launch(config)
        return config
    path = cache_path()
    if path not in _loaded_from:
        _tuned.update(_read_cache(path))
        _loaded_from.append(path)
    key = "/".join((_capability(device), kernel, str(dtype).removeprefix("torch."), f"d{head_dim}", features))
    if key not in _tuned:
        times = {}
        for candidate in candidates:
            try:
                times[candidate] = _time_launch(lambda: launch(candidate))
            except OutOfResources:  # too much shared memory for this device
                continue
        _tuned[key] = min(times, key=times.get)
        _write_cache(path, key, _tuned[key])
    config = _tuned[key]
    launch(config)
    return config


# (block_m, block_n) -> (weak reference to the mask words, their version, the summary): every layer
# of a forward and its backward read the same CausalMask, so each tile shape is summarised once per
# batch instead of once per layer and direction (five kernels, a padded copy of the words each).
_summaries: dict[tuple[int, int], tuple[weakref.ref, int, torch.Tensor]] = {}


def tile_summary(bits: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """(B, ceil(N/block_m), ceil(N/block_n)) int8: 1 where the mask tile has any cause bit set.

    Vectorised over the packed words (N^2/32 int32 reads), on the mask's device; cached on the
    identity and version of `bits` (see `_summaries`)."""
    cached = _summaries.get((block_m, block_n))
    if cached is not None and cached[0]() is bits and cached[1] == bits._version:
        return cached[2]
    batch, n, words = bits.shape
    words_per_tile = block_n // 32
    row_tiles, col_tiles = triton.cdiv(n, block_m), triton.cdiv(words, words_per_tile)
    padded = torch.nn.functional.pad(bits, (0, col_tiles * words_per_tile - words, 0, row_tiles * block_m - n))
    nonzero = padded.view(batch, row_tiles, block_m, col_tiles, words_per_tile) != 0
    summary = nonzero.any(dim=4).any(dim=2).to(torch.int8).contiguous()
    _summaries[(block_m, block_n)] = (weakref.ref(bits), bits._version, summary)
    return summary


def query_tile_flags(grad_mass: torch.Tensor, block_m: int) -> torch.Tensor:
    """(B, H, ceil(N/block_m)) int8: 1 where a query tile has a row with a mass gradient c != 0.

    Lets the dK/dV sweep skip the mask of rows without a CAT gradient with one scalar load per tile
    instead of a cross-warp max over |c| every iteration."""
    batch, heads, n = grad_mass.shape
    padded = torch.nn.functional.pad(grad_mass, (0, triton.cdiv(n, block_m) * block_m - n))
    return (padded.view(batch, heads, -1, block_m) != 0).any(dim=3).to(torch.int8)


@triton.jit
def sequence_bounds(CuSeqlens, KeyLengths, s, n_q, n_k, VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr):
    """(batch index, first row in the packed layout, query length, key length, causal offset).

    Without packing, program `s` is batch item `s`; with packing it is sequence `s` of batch item 0.
    Causal rows see keys j <= i + offset (bottom-right alignment when Nq < Nk).
    """
    if VARLEN:
        b = s * 0
        row0 = tl.load(CuSeqlens + s)
        len_q = tl.load(CuSeqlens + s + 1) - row0
        len_k = len_q
        offset = 0
    else:
        b = s
        row0 = 0
        len_q = n_q
        len_k = n_k
        offset = n_k - n_q
        if HAS_KEY_LENGTHS:
            len_k = tl.load(KeyLengths + s)
    return b, row0, len_q, len_k, offset


@triton.jit
def adapter_probs(q, ka, La2, scale_log2, adapter_len, BLOCK_A: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Pa (BLOCK_M, BLOCK_A) fp32 from the saved adapter log-sum-exp (base 2); padded slots are 0."""
    slots = tl.arange(0, BLOCK_A)
    logits = tl.dot(q, tl.trans(ka), input_precision=DOT_PRECISION) * scale_log2
    probs = tl.exp2(logits - La2[:, None])
    return tl.where(slots[None, :] < adapter_len, probs, 0.0)


# Segments are unrolled (tl.static_range): each costs a masked row max and sum over the adapter tile.
MAX_SEGMENTS = 8


def adapter_block(adapter_len: int) -> int:
    """BLOCK_A: the adapter slots padded to a power of two (at least 16, the smallest dot extent)."""
    return max(16, triton.next_power_of_2(adapter_len))


@functools.lru_cache(maxsize=64)
def slot_segments(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(BLOCK_A,) int32: the segment of each adapter slot (segments are consecutive slot ranges of the
    given sizes); padded slots get len(sizes), which matches no segment. Cached: one small upload per
    segment layout and device, not per layer call."""
    segment = torch.full((adapter_block(sum(sizes)),), len(sizes), dtype=torch.int32)
    segment[:sum(sizes)] = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(sizes))
    return segment.to(device)


@triton.jit
def segment_slot_lse(AdapterLse2, stat, segment_stride, row_ok, slot_segment, NUM_SEGMENTS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr):
    """(BLOCK_M, BLOCK_A): the saved base-2 LSE of each slot's segment, so that Pa^s = exp2(logits - it)."""
    slot_lse = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
    for segment in tl.static_range(NUM_SEGMENTS):
        lse = tl.load(AdapterLse2 + segment * segment_stride + stat, mask=row_ok, other=0.0)
        slot_lse = tl.where((slot_segment == segment)[None, :], lse[:, None], slot_lse)
    return slot_lse


@triton.jit
def cause_bits(MaskBits, query, query_ok, key0, mask_words, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               KEYS_AS_ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """A[query, key0 : key0 + BLOCK_N] as fp32 0/1 from one sample's packed words (bit t of word w is
    column 32 w + t): (BLOCK_M, BLOCK_N), or its transpose (BLOCK_N, BLOCK_M) with KEYS_AS_ROWS.

    One (BLOCK_M, BLOCK_N / 32) tile of words is loaded and its bits expanded with shifts: a
    per-element gather of the words landed in a layout other than P's and cost a conversion through
    shared memory every iteration, plus 32 redundant loads per word. ALIGNED: key0 is a multiple of
    32 (tiles of one sample); packed sequences start anywhere, so their tile straddles words and
    takes bits from two neighbouring words."""
    WORDS: tl.constexpr = BLOCK_N // 32
    word0 = key0 >> 5
    word = word0 + tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    if KEYS_AS_ROWS:  # (words, bits, queries)
        offsets = query[None, :] * mask_words + word[:, None]
        load_ok = query_ok[None, :] & (word < mask_words)[:, None]
        shape: tl.constexpr = (BLOCK_N, BLOCK_M)
        low = tl.load(MaskBits + offsets, mask=load_ok, other=0)[:, None, :]
        position = bit[None, :, None]
    else:  # (queries, words, bits)
        offsets = query[:, None] * mask_words + word[None, :]
        load_ok = query_ok[:, None] & (word < mask_words)[None, :]
        shape: tl.constexpr = (BLOCK_M, BLOCK_N)
        low = tl.load(MaskBits + offsets, mask=load_ok, other=0)[:, :, None]
        position = bit[None, None, :]
    if ALIGNED:
        bits = (low >> position) & 1
    else:
        if KEYS_AS_ROWS:
            high = tl.load(MaskBits + offsets + 1, mask=query_ok[None, :] & (word + 1 < mask_words)[:, None],
                           other=0)[:, None, :]
        else:
            high = tl.load(MaskBits + offsets + 1, mask=query_ok[:, None] & (word + 1 < mask_words)[None, :],
                           other=0)[:, :, None]
        position = position + (key0 & 31)
        bits = (tl.where(position < 32, low, high) >> (position & 31)) & 1
    return tl.reshape(bits, shape).to(tl.float32)
