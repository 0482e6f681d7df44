"""Tile autotuning of the backward launches: `launch_tuned` runs the dK/dV and dQ kernels with the
table's tiles, or on CUDA with CAUSALATTN_AUTOTUNE=1 with the fastest of a few candidates, timed on
the first launch of each key and cached in memory and in a JSON file per Triton version.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import astuple
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

from causalattn.kernels import tiles
from causalattn.kernels.tiles import TileConfig


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
    `tiles.tile_candidates` for the key (capability, kernel, dtype, head dim, features), timed on the first
    launch of that key and cached in memory and in `cache_path()`; else the table. `launch` must
    write all of its outputs on every call (the timing runs overwrite them, the last run is the
    winner's)."""
    config = tiles.tile_config(head_dim, kernel, dtype)
    tuned = (kernel not in tiles.tile_overrides() and device.type == "cuda" and not tiles.interpreting()
             and autotuning())
    candidates = tiles.tile_candidates(head_dim, kernel, dtype) if tuned else [config]
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
