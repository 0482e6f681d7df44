"""Export causalattn adapters as a PEFT `AdaptionPrompt` folder, where PEFT computes exactly the same model.

    export_adaption_prompt(model, "run/peft")                 # adapter_config.json + adapter_model.safetensors
    peft_model = PeftModel.from_pretrained(base, "run/peft")  # PEFT's own LLaMA-Adapter, same logits

PEFT's AdaptedAttention adds `o_proj(gate * softmax(q Ka^T / sqrt(d)) Va)` to the layer's output, with
`Ka, Va` the layer's k_proj/v_proj of its prompt `(1, M, C)` and one raw scalar gate per layer, on the
top `adapter_layers` layers. That is docs/math.md §1 for one unrouted segment with a scalar gate; the export
refuses, naming the reason, whatever PEFT would compute differently:

* per-head gates (PEFT has one scalar per layer); a scalar tanh gate is exported as its value tanh(g);
* routed adapters (PEFT has one prompt per layer, no domain segments, no router);
* families other than Llama and Mistral: PEFT's AdaptionPrompt knows those two (and GPT-2) only;
* an o_proj bias: PEFT sends its branch through o_proj separately, adding the bias a second time.

The XG tokens are a training statistic and change nothing in the forward: they are not exported.
Nothing here imports PEFT: the folder is written in PEFT's file format (the names and keys its
`save_pretrained` writes), and the test loads it with PEFT.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from causalattn.hf.adapter import adapted_layers
from causalattn.hf.contract import attention_modules
from causalattn.hf.families import family_name, model_type
from causalattn.hf.io import WEIGHTS_NAME, PathLike, _atomic_write, holds_adapters
from causalattn.hf.routed import find_router
from causalattn.inputs import gate_values

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_FAMILIES = ("llama", "mistral")  # PEFT's AdaptionPrompt model types whose key path is causalattn's
STATE_PREFIX = "base_model.model."    # where PeftModel keeps the wrapped model in its state dict


def export_adaption_prompt(model: nn.Module, directory: PathLike) -> Path:
    """Write `model`'s adapters as a PEFT AdaptionPrompt adapter in `directory`; returns the directory.
    Raises ValueError when PEFT would compute another model (module docstring)."""
    directory = Path(directory)
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model: has no causalattn adapters to export (use causalattn.hf.add_adapters)")
    modules = {m.layer_idx: m for m in attention_modules(model)}
    first = modules[min(layers)]
    _check_representable(model, first, layers)
    if holds_adapters(directory):
        raise ValueError(f"{directory}: holds a causalattn adapter, which the export would overwrite "
                         f"({WEIGHTS_NAME}); export into another folder")

    names = {module: name for name, module in model.named_modules()}
    tensors = {}
    for index, prompt in layers.items():
        path = STATE_PREFIX + names[modules[index]]
        tensors[f"{path}.adaption_prompt"] = prompt.prompt.detach()[None].contiguous().cpu()
        # PEFT's gate is raw: a tanh gate's value is what it multiplies by
        gate = gate_values(prompt.gate, prompt.gate_mode)
        tensors[f"{path}.adaption_gate"] = gate.detach().reshape(1).contiguous().cpu()
    config = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "target_modules": "self_attn",
              "adapter_len": layers[min(layers)].prompt.shape[0], "adapter_layers": len(layers),
              "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
              "inference_mode": True, "revision": None, "auto_mapping": None}
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    _atomic_write(directory / PEFT_CONFIG_NAME, write_config)
    return directory


def _check_representable(model: nn.Module, first: nn.Module, layers: dict) -> None:
    refuse = "export_adaption_prompt: PEFT's AdaptionPrompt cannot hold these adapters: "
    if model_type(first) not in PEFT_FAMILIES:
        raise ValueError(refuse + f"it supports Llama and Mistral, not {family_name(first)}")
    if find_router(model) is not None or any(prompt.routed for prompt in layers.values()):
        raise ValueError(refuse + "routed adapters (domain prompts and a router) have no AdaptionPrompt form")
    per_head = sorted(i for i, prompt in layers.items() if prompt.gate.numel() != 1)
    if per_head:
        raise ValueError(refuse + f"layers {per_head} have one gate per head, PEFT one scalar per layer "
                         "(train with AdapterConfig(gate_per_head=False))")
    if any(getattr(m.o_proj, "bias", None) is not None for m in attention_modules(model) if m.layer_idx in layers):
        raise ValueError(refuse + "the o_proj has a bias, which PEFT's separate adapter branch adds a second time")
