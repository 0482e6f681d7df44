"""The model families causalattn runs, and how each family's attention module reaches its keys.

An adapter prompt (docs/math.md §1) lives in the model's hidden space; its keys and values must come out of
the layer exactly as the sequence's own do, up to (not including) RoPE, or the prompt is attended to
in another space than the one the layer was trained in. The key paths differ by family:

    family         projection                          key norm (per head, before RoPE)
    Llama          k_proj / v_proj                      -
    Mistral        k_proj / v_proj                      -
    Qwen2          k_proj / v_proj (with biases)        -
    Qwen3          k_proj / v_proj                      k_norm
    Gemma3 (text)  k_proj / v_proj                      k_norm (Gemma's 1 + weight RMSNorm)
    Phi3           fused qkv_proj: [queries | keys | values]; the key and value parts are sliced

The layer's modules are called, never their weights read, so sharded (FSDP) or quantised projections
work the normal way. A family outside the table with a key or query norm is refused: where that norm
sits (per head or over the whole projection) differs between families, and guessing would train the
prompt in the wrong space.

What a family's layers compute beyond causal attention is checked at every call (`refuse_unsupported`):
a sliding window is exact while every key lies inside it (a query sees at most `window` keys, so with
`Nk <= window` sliding and full attention are the same computation) and refused beyond; logit
soft-capping is refused. Gemma3's `query_pre_attn_scalar` arrives as the call's `scaling` and is used.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

# model_type -> the family's name in messages and in the support matrix
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma3",
            "phi3": "Phi3"}
KEY_NORM_FAMILIES = ("qwen3", "gemma3_text")  # k_norm applied per head on the (..., heads, head_dim) view
SEPARATE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FUSED_PROJECTIONS = ("qkv_proj", "o_proj")


def model_type(module: nn.Module) -> Optional[str]:
    return getattr(getattr(module, "config", None), "model_type", None)


def family_name(module: nn.Module) -> str:
    """The family of an attention module (or model) as messages name it."""
    kind = model_type(module)
    return FAMILIES.get(kind, kind or type(module).__name__)


def _has(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def is_attention_module(module: nn.Module) -> bool:
    """A decoder attention module: a layer index and either q/k/v/o projections or a fused qkv_proj + o_proj."""
    return isinstance(getattr(module, "layer_idx", None), int) and (
        _has(module, SEPARATE_PROJECTIONS) or _has(module, FUSED_PROJECTIONS))


def input_projection(module: nn.Module) -> nn.Linear:
    """The projection that reads the hidden states into keys: its `in_features` is the prompt width, its
    weight's device and dtype those the prompt is created with."""
    return module.k_proj if _has(module, ("k_proj",)) else module.qkv_proj


def check_key_path(module: nn.Module) -> None:
    """Refuse adapters on a layer whose key path is not known (see the module docstring)."""
    kind = model_type(module)
    if kind in FAMILIES:
        return
    norms = [name for name in ("k_norm", "q_norm") if getattr(module, name, None) is not None]
    if norms:
        raise NotImplementedError(
            f"causalattn adapters: {family_name(module)} layers normalise their keys ({', '.join(norms)}), and where "
            f"that norm applies is family-specific; supported families: {', '.join(FAMILIES.values())}")


def prompt_keys_values(module: nn.Module, hidden: Tensor, heads_kv: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Keys and values `(Hkv, M, d)` of prompt tokens `hidden (M, C)` through `module`'s own key path, without RoPE."""
    tokens = hidden.shape[0]
    width = heads_kv * head_dim
    if not _has(module, ("k_proj",)):
        fused = module.qkv_proj(hidden)  # the queries of the prompt are computed too: one call keeps FSDP's unit whole
        queries = fused.shape[-1] - 2 * width
        keys, values = fused[:, queries:queries + width], fused[:, queries + width:]
    else:
        keys, values = module.k_proj(hidden), module.v_proj(hidden)
    keys = keys.view(tokens, heads_kv, head_dim)
    if model_type(module) in KEY_NORM_FAMILIES:
        keys = module.k_norm(keys)
    return keys.transpose(0, 1), values.view(tokens, heads_kv, head_dim).transpose(0, 1)


def refuse_unsupported(module: nn.Module, n_k: int, kwargs: dict) -> None:
    """Raise for what the layer computes beyond causal attention when the op would compute something else."""
    window = kwargs.get("sliding_window")
    if window is not None and n_k > window:
        raise NotImplementedError(
            f"causalattn: {family_name(module)} sliding-window attention (layer {module.layer_idx}, window {window}) "
            f"is not supported beyond the window: {n_k} keys; sequences of up to {window} tokens are exact. Use "
            "shorter sequences, a config without sliding layers, or another attn_implementation")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            feature = "logit soft-capping" if name == "softcap" else "attention sinks"
            raise NotImplementedError(f"causalattn: {family_name(module)} {feature} (`{name}`) is not supported")
