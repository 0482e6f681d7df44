"""Run an existing PEFT `AdaptionPrompt` model's adapter branch inside causalattn's fused op.

    peft_model = get_peft_model(model, AdaptionPromptConfig(adapter_len=10, adapter_layers=30, ...))
    bridge_adaption_prompt(peft_model)   # same outputs, one fused attention call per layer

PEFT's `AdaptedAttention` runs the wrapped attention, then recomputes the queries and adds a second,
separate attention over its prompt: `o_proj(gate * softmax(q Ka^T / sqrt(d)) Va)` with a scalar raw
gate. That is docs/math.md §1 with gate_mode="raw" and a (1,) gate, which the op computes in the same pass as
the sequence attention. The bridge switches the model to `attn_implementation="causalattn"` and
changes each active `AdaptedAttention`'s class to one whose forward hands its prompt and gate to the
wrapped attention module through a keyword instead of computing the branch itself. The parameters
stay PEFT's (same names, same state dict, PEFT's save/load unchanged).

PEFT keeps inactive adapters outside the module tree: after `set_adapter(...)` call the bridge again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peft.tuners.adaption_prompt.layer import AdaptedAttention
from torch import Tensor, nn

from causalattn.hf.contract import PROMPT_KWARG, use_causalattn


@dataclass(frozen=True)
class PeftPrompt:
    """A PEFT adapter seen as a causalattn LayerPrompt: scalar raw gate, no XG tokens."""

    prompt: Tensor  # (M, C)
    gate: Tensor    # (1,)
    gate_mode: str = "raw"
    xg_tokens: int = 0
    xg_pool: str = "sample"
    xg_space: str = "output"


class FusedAdaptedAttention(AdaptedAttention):
    """PEFT's AdaptedAttention whose adapter branch runs inside the wrapped layer's causalattn call."""

    def forward(self, **kwargs):
        if kwargs.get("output_attentions", False):
            raise NotImplementedError("output_attentions is not supported by the causalattn PEFT bridge")
        prompt = PeftPrompt(self.adaption_prompt[0], self.adaption_gate)
        output, *rest = self.model(**kwargs, **{PROMPT_KWARG: prompt})
        bias: Optional[Tensor] = self.model.o_proj.bias
        if bias is not None:
            # PEFT sends its branch through o_proj on its own, which adds o_proj's bias a second time;
            # keep the outputs of the models PEFT trained.
            output = output + bias
        return output, *rest


def bridge_adaption_prompt(model: nn.Module) -> int:
    """Make every active PEFT `AdaptedAttention` of `model` use the fused op; returns how many layers
    are bridged. Idempotent."""
    bridged = 0
    for module in model.modules():
        if isinstance(module, AdaptedAttention):
            module.__class__ = FusedAdaptedAttention
            bridged += 1
    if not bridged:
        raise ValueError(f"model: no active PEFT AdaptedAttention layers in {type(model).__name__} "
                         "(expected a model from peft.get_peft_model(..., AdaptionPromptConfig(...)))")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    use_causalattn(base)
    return bridged
