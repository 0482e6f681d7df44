"""What an adapted model refuses instead of silently losing its adapters.

The adapters live inside the `"causalattn"` attention function (`causalattn.hf.attention`): transformers'
own implementations never read them, and transformers' own saving does not know them. So once
`add_adapters` has run, the model's

* `set_attn_implementation(name)` refuses any implementation that would ignore the adapters
  (after `"sdpa"` the model computed the base model exactly, adapters or not). An attention function
  that reads `module.causalattn_adapter` itself may say so with `fn.causalattn_adapter_aware = True`;
* `save_pretrained(directory)` refuses: it would write the frozen base and, on `from_pretrained`, come
  back without the adapters. `causalattn.hf.save_adapters` / `load_adapters` save and restore them
  (a few KB instead of the whole model), and `causalattn.hf.CausalTrainer` checkpoints do the same.

Both are methods bound to the instance (they survive `copy.deepcopy`, which rebinds them); the model's
class is untouched.
"""
from __future__ import annotations

import types
from typing import Any

from torch import nn

from causalattn.hf.contract import IMPLEMENTATION

ADAPTER_AWARE_ATTR = "causalattn_adapter_aware"


def _reads_adapters(implementation: Any) -> bool:
    if implementation == IMPLEMENTATION:
        return True
    from transformers import AttentionInterface

    function = AttentionInterface._global_mapping.get(implementation) if isinstance(implementation, str) else None
    return bool(getattr(function, ADAPTER_AWARE_ATTR, False))


def _set_attn_implementation(self: nn.Module, implementation: Any, *args, **kwargs):
    names = list(implementation.values()) if isinstance(implementation, dict) else [implementation]
    ignoring = [name for name in names if not _reads_adapters(name)]
    if ignoring:
        raise ValueError(f"attn_implementation: {ignoring[0]!r} would silently ignore this model's causalattn "
                         f"adapters (they run inside the {IMPLEMENTATION!r} attention function); keep "
                         f"{IMPLEMENTATION!r}, or load the base model again without adapters")
    return type(self).set_attn_implementation(self, implementation, *args, **kwargs)


def _save_pretrained(self: nn.Module, *args, **kwargs):
    raise ValueError("save_pretrained: this model has causalattn adapters, which save_pretrained / from_pretrained "
                     "would not restore; save them with causalattn.hf.save_adapters(model, directory) and load "
                     "them into the base model with causalattn.hf.load_adapters(model, directory) "
                     "(causalattn.hf.CausalTrainer checkpoints do this)")


def guard_adapted_model(model: nn.Module) -> None:
    """Install the refusals of the module docstring on `model` (idempotent)."""
    for name, method in (("set_attn_implementation", _set_attn_implementation),
                         ("save_pretrained", _save_pretrained)):
        if hasattr(type(model), name):
            object.__setattr__(model, name, types.MethodType(method, model))
