"""Tile table of the fused-attention kernels: block sizes, warps and stages per kernel.

* `TileConfig`: (block_m queries, block_n keys, warps, stages) of one launch;
* `tile_config`: the measured sm_90 choice per kernel ("fwd", "rows", "dkdv", "dq"), head dim and
  dtype, or the interpreter's (largest tiles win there), or a CAUSALATTN_TILES override;
* `tile_candidates`: what the autotuner (`causalattn.kernels.autotune`) times besides the table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
