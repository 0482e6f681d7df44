"""How `causalattn.attention` behaves under `torch.autocast` (mixed-precision training).

Inside an autocast region the model's projections come out in the autocast dtype while other tensors
stay fp32: LLaMA's RoPE multiplies q and k by fp32 cos/sin, so a bf16 run hands the op q, k in fp32 and
v in bf16. Like the matmuls autocast lowers, the op then takes every floating input in the autocast
dtype: q, k, v and the adapter keys/values are cast to it (fp64 tensors are left alone, as autocast
leaves them), and the op itself runs with autocast off, so its own fp32 statistics (LSE, CAT mass, XG
read-out, accumulated in fp32 by both backends) are not lowered a second time. The gate keeps its
dtype: it is a parameter whose fp32 master copy the optimizer updates. The output is in the autocast
dtype, as a lowered matmul's would be.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, TypeVar

import torch
from torch import Tensor

from causalattn.inputs import Adapter

F = TypeVar("F", bound=Callable)


def autocast_dtype(q: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast lowers to on `q`'s device, or None outside an autocast region."""
    if not isinstance(q, Tensor):
        return None  # not the op's input: its own checks report it
    device_type = q.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
    return t.to(dtype) if eligible else t


def cast_for_autocast(q: Tensor, k: Tensor, v: Tensor, adapter: Optional[Adapter],
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Optional[Adapter]]:
    """q, k, v and the adapter keys/values in `dtype` (floating, non-fp64 tensors only)."""
    if isinstance(adapter, Adapter):
        adapter = dataclasses.replace(adapter, keys=_cast(adapter.keys, dtype), values=_cast(adapter.values, dtype))
    return _cast(q, dtype), _cast(k, dtype), _cast(v, dtype), adapter


def follows_autocast(op: F) -> F:
    """Decorate `op(q, k, v, *, adapter=..., ...)` to follow an enclosing `torch.autocast` (module docstring)."""

    @functools.wraps(op)
    def wrapper(q: Tensor, k: Tensor, v: Tensor, *args, adapter: Optional[Adapter] = None, **kwargs):
        dtype = autocast_dtype(q)
        if dtype is None:
            return op(q, k, v, *args, adapter=adapter, **kwargs)
        q, k, v, adapter = cast_for_autocast(q, k, v, adapter, dtype)
        with torch.autocast(q.device.type, enabled=False):
            return op(q, k, v, *args, adapter=adapter, **kwargs)

    return wrapper  # type: ignore[return-value]
