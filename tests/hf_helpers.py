"""Tiny LLaMA-family models and an independent eager adapter attention for the transformers tests.

`independent_attention` is the test's own reading of docs/math.md §1-§3, written without causalattn's op:
plain softmax attention over transformers' own boolean sdpa mask, plus, on adapted layers, a second
softmax over the adapter keys added through the gate. Registered as `"independent"`, it runs inside the
same model code, so logits, gradients and generations can be compared with `"causalattn"` layer for
layer. With `output_attentions=True` it returns the sequence probabilities P (adapter excluded), from
which the test computes the CAT mass; it also leaves each layer's XG read-out in `XG_READOUTS`.
"""
import copy

import torch
from transformers import (AttentionInterface, AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Phi3Config, Qwen2Config, Qwen3Config)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import causalattn.hf  # noqa: F401  (registers "causalattn")

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=None)
XG_READOUTS = {}  # layer index -> XG read-out (B, features) or (B, N, features) of the last forward


def llama_config(**overrides):
    return LlamaConfig(**{**TINY, **overrides})


def mistral_config(**overrides):
    return MistralConfig(**{**TINY, "sliding_window": None, **overrides})


def qwen2_config(**overrides):
    return Qwen2Config(**{**TINY, **overrides})  # q/k/v biases: the adapter keys get k_proj's bias too


def qwen3_config(**overrides):
    return Qwen3Config(**{**TINY, "head_dim": 16, **overrides})  # k_norm on the key path


def gemma3_config(**overrides):
    # a sliding layer and a full one; the window covers the test sequences (past it causalattn refuses).
    # query_pre_attn_scalar != head_dim, so a wrong attention scale would show
    return Gemma3TextConfig(**{**TINY, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 64,
                               "layer_types": ["sliding_attention", "full_attention"], **overrides})


def phi3_config(**overrides):
    return Phi3Config(**{**TINY, **overrides})  # one fused qkv_proj


CONFIGS = {"llama": llama_config, "mistral": mistral_config, "qwen2": qwen2_config}
# by model_type, as causalattn.hf.families names them
FAMILY_CONFIGS = {**CONFIGS, "qwen3": qwen3_config, "gemma3_text": gemma3_config, "phi3": phi3_config}


def build(config, implementation="causalattn", dtype=torch.float64, seed=0):
    """A tiny model with weights fixed by `seed`; each model gets its own copy of `config`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
    return model.to(dtype)


def twin(model, implementation):
    """The same weights (adapters included) under another attention implementation."""
    other = copy.deepcopy(model)
    other.set_attn_implementation(implementation)
    return other


def randomize_gates(model, seed=1, scale=0.5):
    """Nonzero gates (and fresh prompts): at zero init the adapter changes nothing, so parity tests need this."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prompt in causalattn.hf.adapted_layers(model).values():
            prompt.gate.copy_(torch.randn(prompt.gate.shape, generator=gen) * scale)
            prompt.prompt.copy_(torch.randn(prompt.prompt.shape, generator=gen))


def independent_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    group = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ keys.transpose(-1, -2) * scaling
    visible = attention_mask  # (B, 1, Nq, Nk) bool from sdpa_mask
    scores = torch.where(visible, scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * visible.any(-1, keepdim=True)  # rows that see nothing: 0
    out = probs @ values
    adapter = getattr(module, "causalattn_adapter", None)
    if adapter is not None:
        adapter_keys, adapter_values = (t.transpose(0, 1).repeat_interleave(group, 0) for t in independent_prompt_kv(
            module, adapter.prompt.to(query.dtype), key.shape[1], query.shape[-1]))
        adapter_probs = torch.softmax(query @ adapter_keys.transpose(-1, -2) * scaling, dim=-1)  # never masked
        gate = torch.tanh(adapter.gate) if adapter.gate_mode == "tanh" else adapter.gate
        gamma = gate.to(query.dtype).expand(query.shape[1]).view(1, -1, 1, 1)
        out = out + gamma * (adapter_probs @ adapter_values)
        if "real_tokens" in kwargs and adapter.xg_tokens:  # the test asks for the XG read-out (docs/math.md §3)
            g = adapter.xg_tokens
            z = gamma * (adapter_probs[..., :g] @ adapter_values[:, :g])  # (B, Hq, N, d)
            if adapter.xg_pool == "sample":
                real = kwargs["real_tokens"].to(z.dtype)  # (B, N)
                features = ((z * real[:, None, :, None]).sum(2) / real.sum(1)[:, None, None]).flatten(1)
            else:
                features = z.transpose(1, 2).flatten(2)  # (B, N, Hq * d)
            if adapter.xg_space == "output":
                features = features @ module.o_proj.weight.t()
            XG_READOUTS[module.layer_idx] = features
    return out.transpose(1, 2), probs


def independent_prompt_kv(module, prompt, heads_kv, dim):
    """(M, Hkv, d) keys and values of the prompt the way each family's forward makes its own, before RoPE."""
    if hasattr(module, "qkv_proj"):  # Phi3: [queries | keys | values] from one projection
        start = module.config.num_attention_heads * dim
        fused = module.qkv_proj(prompt)
        keys, values = fused[:, start:start + heads_kv * dim], fused[:, start + heads_kv * dim:]
    else:
        keys, values = module.k_proj(prompt), module.v_proj(prompt)
    keys, values = keys.view(len(prompt), heads_kv, dim), values.view(len(prompt), heads_kv, dim)
    if hasattr(module, "k_norm"):  # Qwen3, Gemma3: a per-head norm of the keys
        keys = module.k_norm(keys)
    return keys, values


def _independent_mask(*args, **kwargs):
    # Always a materialised boolean mask, never the "plain causal: no mask" shortcut.
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


independent_attention.causalattn_adapter_aware = True  # it reads module.causalattn_adapter itself
AttentionInterface.register("independent", independent_attention)
AttentionMaskInterface.register("independent", _independent_mask)


def padded_batch(batch=3, length=11, padding="left", seed=0, vocab=300):
    """Random token ids and a 0/1 attention mask with 0, 3 and 5 padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate((0, 3, 5)[:batch]):
        if padding == "left":
            mask[b, :pad] = 0
        else:
            mask[b, length - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def grads(model):
    """{name: grad} of the parameters that received one."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def labels_of(ids, mask):
    """Real tokens predicted from real tokens: after left padding the first real token is predicted from a
    padding row, whose output differs between backends (0 here, uniform attention in eager)."""
    keep = mask.bool().clone()
    keep[:, 1:] &= mask[:, :-1].bool()
    return ids.masked_fill(~keep, -100)


def forward_backward(model, ids, mask, **kwargs):
    """Logits and the gradients of the language-model loss over real tokens."""
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels_of(ids, mask), use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach(), grads(model)


def assert_close_dicts(actual, expected, **tol):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tol, msg=lambda m: f"{name}: {m}")
