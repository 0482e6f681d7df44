"""The names and shapes the Hugging Face integration agrees on, and the model helpers every part uses.

The attention function (`causalattn.hf.attention`), the adapters (`causalattn.hf.adapter`), the
statistics collector (`causalattn.hf.stats`), routing (`causalattn.hf.routed`) and the PEFT bridge
talk through the keyword arguments transformers forwards from `model(...)` to every attention call
and through attributes of the attention modules; each name is defined once, here.
"""
from __future__ import annotations

from typing import Optional, Protocol

from torch import Tensor, nn

from causalattn.hf.families import is_attention_module
from causalattn.masks import CausalMask
from causalattn.ops import BACKENDS

IMPLEMENTATION = "causalattn"
ADAPTER_ATTR = "causalattn_adapter"  # the GatedPrompt submodule of an adapted attention module
BACKEND_ATTR = "causalattn_backend"  # per attention module; "auto" when unset
PROMPT_KWARG = "causalattn_prompt"   # a LayerPrompt handed to one attention call (PEFT bridge)
STATS_KWARG = "causalattn_stats"     # the Statistics collector injected by `collect`
SUPERVISION_KWARG = "supervision"    # the CausalMask given to model(...)
DOMAINS_KWARG = "causalattn_domains"          # (B,) domain ids given to model(...) for route="oracle"
LABEL_ROWS_KWARG = "causalattn_label_rows"    # (B,) the row of each sample whose read-outs MI compares
ROUTE_TOKENS_KWARG = "causalattn_route_tokens"  # (B, N) bool, the tokens the router reads (the prompts)


class LayerPrompt(Protocol):
    """What the attention function reads from a layer's adapter (GatedPrompt, or the PEFT bridge's)."""

    prompt: Tensor      # (M, C) learnable prompt tokens in the model's hidden space
    gate: Tensor        # (Hq,) one per query head, or (1,) one per layer
    gate_mode: str      # "tanh" or "raw"
    xg_tokens: int      # the first xg_tokens prompt tokens are the XG tokens (docs/math.md §3)
    xg_pool: str        # "sample" or "position"
    xg_space: str       # "output" (through o_proj) or "head"


class StatisticsSink(Protocol):
    def record(self, layer_idx: int, *, mass: Optional[Tensor], xg: Optional[Tensor],
               supervision: Optional[CausalMask]) -> None: ...

    def record_readouts(self, layer_idx: int, *, invariant: Tensor, domain: Tensor) -> None: ...


# ------------------------------------------------------------------------------ model helpers
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The LLaMA-family attention modules of `model` (q/k/v/o or fused qkv/o projections and a layer index),
    by layer index."""
    found = [m for m in model.modules() if is_attention_module(m)]
    if not found:
        raise ValueError(f"model: no LLaMA-family attention modules (q_proj/k_proj/v_proj/o_proj or qkv_proj/o_proj, "
                         f"and layer_idx) found in {type(model).__name__}")
    return sorted(found, key=lambda m: m.layer_idx)


def set_backend(model: nn.Module, backend: str) -> None:
    """Choose `causalattn.attention`'s backend ("auto", "triton", "reference") for every layer of `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for module in attention_modules(model):
        setattr(module, BACKEND_ATTR, backend)


def use_causalattn(model: nn.Module) -> None:
    """Route `model`'s attention through causalattn (`attn_implementation="causalattn"`)."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == IMPLEMENTATION:
        return
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    model.set_attn_implementation(IMPLEMENTATION)
