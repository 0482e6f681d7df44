"""Hugging Face transformers integration: `attn_implementation="causalattn"`, adapters, CAT + XG losses.

    import causalattn.hf as cah
    model = AutoModelForCausalLM.from_config(config, attn_implementation="causalattn")
    cah.add_adapters(model, cah.AdapterConfig(length=10, layers=30))
    with cah.collect(model) as stats:
        out = model(**batch, labels=labels, supervision=mask)
    (out.loss + stats.cat_loss() + 0.1 * stats.xg_loss()).backward()

Families: Llama, Mistral, Qwen2, Qwen3, Gemma3 (text) and Phi3 (`causalattn.hf.families`: each one's
key path for the adapter prompts, and what is refused). `save_adapters` / `load_adapters` keep our own
folder format; `export_adaption_prompt` writes PEFT's AdaptionPrompt format where PEFT computes the same.

Importing this package registers the attention and mask functions with transformers.
`bridge_adaption_prompt` (PEFT) and `CausalTrainer` / `CausalCollator` (the HF Trainer) are imported
on first use, so PEFT stays optional and this import stays cheap.
"""
from causalattn.hf.adapter import AdapterConfig, AdapterSummary, GatedPrompt, adapted_layers, add_adapters, summarize
from causalattn.hf.attention import attention_forward, key_padding_mask, register
from causalattn.hf.contract import (
    DOMAINS_KWARG,
    IMPLEMENTATION,
    LABEL_ROWS_KWARG,
    ROUTE_TOKENS_KWARG,
    SUPERVISION_KWARG,
    attention_modules,
    set_backend,
    use_causalattn,
)
from causalattn.hf.io import load_adapters, save_adapters
from causalattn.hf.peft_export import export_adaption_prompt
from causalattn.hf.routed import find_router, invariant_only
from causalattn.hf.stats import Statistics, collect

register()


# Imported on first use: PEFT stays optional, and the Trainer's import (accelerate) costs seconds.
_LAZY = {"bridge_adaption_prompt": "causalattn.hf.peft_bridge", "CausalCollator": "causalattn.hf.trainer",
         "CausalTrainer": "causalattn.hf.trainer", "CausalLossMixin": "causalattn.hf.trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'causalattn.hf' has no attribute {name!r}")


__all__ = [
    "DOMAINS_KWARG",
    "IMPLEMENTATION",
    "LABEL_ROWS_KWARG",
    "ROUTE_TOKENS_KWARG",
    "SUPERVISION_KWARG",
    "AdapterConfig",
    "AdapterSummary",
    "CausalCollator",
    "CausalLossMixin",
    "CausalTrainer",
    "GatedPrompt",
    "Statistics",
    "adapted_layers",
    "add_adapters",
    "attention_forward",
    "attention_modules",
    "bridge_adaption_prompt",
    "collect",
    "export_adaption_prompt",
    "find_router",
    "invariant_only",
    "key_padding_mask",
    "load_adapters",
    "register",
    "save_adapters",
    "set_backend",
    "summarize",
    "use_causalattn",
]
