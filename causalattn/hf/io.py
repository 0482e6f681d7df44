"""Save and load causalattn adapters: safetensors weights plus a JSON config, written atomically.

    save_adapters(model, "run/adapter")      # run/adapter/adapter_model.safetensors + causalattn_adapter.json
    load_adapters(fresh_model, "run/adapter") # adds the adapters (if absent) and loads the weights

The config has its own name: PEFT and transformers take a folder with an `adapter_config.json` for a
PEFT adapter, and ours is not one. Folders written before the rename (our format under that name) still
load; `causalattn.hf.export_adaption_prompt` writes a real PEFT AdaptionPrompt folder where one can hold
the adapters.

Weights are keyed by layer index (`layers.29.prompt`, `layers.29.gate`), not by module path, so a
checkpoint loads into the same architecture however it is wrapped. Each file is written to a temporary
file in the same directory and moved into place with `os.replace`, so a crash leaves either the old
or the new file, never a torn one. The config is also stored in the safetensors metadata; loading
checks that both agree, which catches a save interrupted between the two files. Both are listed, with
their sizes and SHA-256, in a manifest written last (`causalattn.checkpoint_files`); loading verifies it,
so a truncated, emptied or altered file is named, never loaded (folders saved before manifests load
unverified, and a file that cannot be parsed is still named).
Inference needs no merge step: the adapters run inside the attention function as in training.
Routed adapters add `layers.29.bank`, `layers.29.domain_gate` and the router's state (`router.codebook`,
`router.project.weight`, ..., batch-norm running statistics included); unrouted files are as before.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from causalattn.checkpoint_files import is_sealed, seal, unseal, verify
from causalattn.hf.adapter import AdapterConfig, AdapterSummary, adapted_layers, add_adapters, summarize
from causalattn.hf.contract import attention_modules
from causalattn.hf.families import input_projection
from causalattn.hf.routed import find_router

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "causalattn_adapter.json"
LEGACY_CONFIG_NAME = "adapter_config.json"  # PEFT's name, ours until PEFT and transformers mistook our folders
FORMAT = "causalattn-adapter"
FORMAT_VERSION = 1
ROUTER_PREFIX = "router."

PathLike = Union[str, os.PathLike]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Run `write(temporary path)` then move the result onto `path` in one step. The temporary file sits in
    the same directory (os.replace is atomic within one file system) and is created by `write` itself,
    so it gets the usual permissions rather than mkstemp's owner-only ones."""
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _describe(model: nn.Module, config: AdapterConfig, layer_indices: list[int]) -> dict:
    first = attention_modules(model)[0]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": config.to_dict(),
        "layer_indices": layer_indices,
        "hidden_size": input_projection(first).in_features,
        "num_attention_heads": first.config.num_attention_heads,
        "model_type": getattr(first.config, "model_type", None),
    }


def _config_of(model: nn.Module) -> tuple[AdapterConfig, dict]:
    """The AdapterConfig the adapters of `model` were built with, read back from the modules."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model: has no causalattn adapters to save (use causalattn.hf.add_adapters)")
    prompts = list(layers.values())
    first = prompts[0]
    routing = {}
    router = find_router(model)
    if first.routed and router is not None:
        routing = dict(domains=first.bank.shape[0], domain_length=first.bank.shape[1], route=router.mode,
                       router_dim=router.project.out_features)
    config = AdapterConfig(length=first.prompt.shape[0], layers=len(layers), xg_tokens=first.xg_tokens,
                           gate=first.gate_mode, gate_per_head=first.gate.numel() > 1,
                           xg_pool=first.xg_pool, xg_space=first.xg_space, **routing)
    return config, layers


def _tensor_names(config: AdapterConfig) -> tuple[str, ...]:
    return ("prompt", "gate") + (("bank", "domain_gate") if config.routed else ())


def save_adapters(model: nn.Module, directory: PathLike, state_dict: Optional[Mapping[str, Tensor]] = None) -> Path:
    """Write `model`'s adapters to `directory` (created if needed); returns the directory.

    `state_dict`: the model's full state dict, when its parameters are shards (FSDP, DeepSpeed ZeRO-3: the
    Trainer gathers one and saves on the main process only); the adapter tensors are read from it by path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unseal(directory)  # the old manifest no longer describes the files about to be replaced
    config, layers = _config_of(model)
    description = json.dumps(_describe(model, config, sorted(layers)), indent=2, sort_keys=True)
    paths = {module: path for path, module in model.named_modules()}

    def value(owner: nn.Module, name: str, own: Tensor) -> Tensor:
        full = own if state_dict is None else state_dict[f"{paths[owner]}.{name}"]
        return full.detach().contiguous().cpu()

    tensors = {}
    for index, prompt in layers.items():
        for name in _tensor_names(config):
            tensors[f"layers.{index}.{name}"] = value(prompt, name, getattr(prompt, name))
    if config.routed:
        router = find_router(model)
        for name, own in router.state_dict().items():
            tensors[ROUTER_PREFIX + name] = value(router, name, own)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"config": description}))

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(description + "\n")

    _atomic_write(directory / CONFIG_NAME, write_config)
    seal(directory, [WEIGHTS_NAME, CONFIG_NAME])
    return directory


def _config_path(directory: Path) -> Path:
    """The folder's causalattn config: ours, or a legacy `adapter_config.json` in our format (PEFT's own is
    not ours); otherwise where ours would be."""
    path, legacy = directory / CONFIG_NAME, directory / LEGACY_CONFIG_NAME
    if path.is_file() or not legacy.is_file():
        return path
    try:
        found = json.loads(legacy.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return legacy  # unreadable: loading names the file
    return legacy if isinstance(found, dict) and found.get("format") == FORMAT else path


def holds_adapters(directory: PathLike) -> bool:
    """Whether `directory` holds a causalattn adapter (under the current or the legacy config name)."""
    directory = Path(directory)
    return (directory / WEIGHTS_NAME).is_file() and _config_path(directory).is_file()


def load_adapters(model: nn.Module, directory: PathLike) -> AdapterSummary:
    """Load adapters saved by `save_adapters` into `model`: adds them first when the model has none
    (which freezes the base and routes attention through causalattn), then copies the weights."""
    directory = Path(directory)
    config_path, weights_path = _config_path(directory), directory / WEIGHTS_NAME
    if not config_path.is_file() and (directory / LEGACY_CONFIG_NAME).is_file():
        raise ValueError(f"{directory}: a PEFT adapter, not a causalattn one; load it with "
                         "peft.PeftModel.from_pretrained")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no causalattn adapter file here (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    if is_sealed(directory):
        verify(directory)
    try:
        description = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not a readable JSON config ({error})") from None
    found = description if isinstance(description, dict) else {}
    if found.get("format") != FORMAT or found.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: not a {FORMAT} v{FORMAT_VERSION} config "
                         f"(format={found.get('format')!r}, version={found.get('format_version')!r})")
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            stored = json.loads((weights.metadata() or {}).get("config", "null"))
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    if stored != description:
        raise ValueError(f"{directory}: {config_path.name} and {WEIGHTS_NAME} disagree (an interrupted save?)")

    config = AdapterConfig.from_dict(description["adapter"])
    if not adapted_layers(model):
        add_adapters(model, config)
    current = _describe(model, _config_of(model)[0], sorted(adapted_layers(model)))
    mismatched = sorted(k for k in ("adapter", "layer_indices", "hidden_size", "num_attention_heads", "model_type")
                        if current[k] != description[k])
    if mismatched:
        raise ValueError(f"{directory}: the adapters do not fit this model: "
                         + "; ".join(f"{k}: saved {description[k]!r}, model {current[k]!r}" for k in mismatched))

    layers = adapted_layers(model)
    names = _tensor_names(config)
    router = find_router(model) if config.routed else None
    expected = {f"layers.{i}.{name}" for i in layers for name in names}
    if router is not None:
        expected |= {ROUTER_PREFIX + name for name in router.state_dict()}
    if set(tensors) != expected:
        raise ValueError(f"{weights_path}: expected tensors {sorted(expected)}, got {sorted(tensors)}")
    if router is not None:
        router_state = {name[len(ROUTER_PREFIX):]: t for name, t in tensors.items() if name.startswith(ROUTER_PREFIX)}
        router.load_state_dict(router_state)
    with torch.no_grad():
        for index, prompt in layers.items():
            for name in names:
                target, source = getattr(prompt, name), tensors[f"layers.{index}.{name}"]
                if target.shape != source.shape:
                    raise ValueError(f"{weights_path}: layers.{index}.{name} has shape {tuple(source.shape)}, "
                                     f"the model expects {tuple(target.shape)}")
                target.copy_(source)
    return summarize(model)
