"""The `"causalattn"` attention backend for Hugging Face transformers (5.x).

Two functions are registered under the name `"causalattn"`:

* `key_padding_mask` with `AttentionMaskInterface`: transformers calls it once per forward to build
  the mask every layer receives. It returns a `(B, Nk_used)` bool key mask (True = a real token) or
  None when no key is masked, the way FlashAttention's mask function hands over the 2D padding mask.
* `attention_forward` with `AttentionInterface`: every layer calls it with
  `query (B, Hq, Nq, d)`, `key`/`value (B, Hkv, Nk, d)` (RoPE applied, GQA not repeated) and returns
  `(out (B, Nq, Hq, d), None)` computed by `causalattn.attention`.

What `attention_forward` adds on top of plain attention, all read from the call:

* the layer's adapter prompt: `module.causalattn_adapter` (see `causalattn.hf.adapter`) or a prompt
  handed in through the `causalattn_prompt` keyword (the PEFT bridge). Its keys/values come out of the
  layer's own key path (`causalattn.hf.families`), without RoPE: `(Hkv, M, d)`;
* CAT supervision: the `supervision=CausalMask` keyword of `model(...)`, which transformers forwards
  to every layer unchanged;
* a statistics collector: the `causalattn_stats` keyword that `causalattn.hf.collect` injects;
* routed adapters (ICLM, `causalattn.hf.routed`): the invariant prompt and the route's domain prompt(s)
  as segments; with a collector and `causalattn_label_rows=(B,)` rows, each segment's read-out there.

Cases mapped onto `causalattn.attention`'s key masking:

* padding (left or right): the 2D mask from `key_padding_mask` -> `key_mask`;
* KV cache (Nq < Nk): causal attention is bottom-right aligned, as a DynamicCache needs. A static
  cache holds unwritten slots past the last query; the mask function returns a mask only as wide as
  the written keys and the keys beyond it are dropped here;
* packed sequences (padding-free batches, no key padded): `cu_seq_lens_q` from the keywords when the
  collator sends them, otherwise sequence starts where `position_ids` do not increase by one
  (transformers' rule). As with FlashAttention, an all-ones attention mask counts as no mask.

The op's backend is "auto" unless `set_backend(model, ...)` (`causalattn.hf.contract`) pins it per layer.
The keyword and attribute names are `causalattn.hf.contract`'s; packing detection is
`causalattn.hf.packing`'s; the routed layers' segmented adapter is assembled in `causalattn.hf.routed`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from causalattn.hf.contract import (ADAPTER_ATTR, BACKEND_ATTR, IMPLEMENTATION, LABEL_ROWS_KWARG, PROMPT_KWARG,
                                   STATS_KWARG, SUPERVISION_KWARG, LayerPrompt, StatisticsSink)
from causalattn.hf.families import FAMILIES, prompt_keys_values, refuse_unsupported
from causalattn.hf.packing import packed_sequences
from causalattn.hf.routed import routed_adapter, segment_readouts
from causalattn.inputs import Adapter
from causalattn.masks import CausalMask
from causalattn.ops import attention

# ------------------------------------------------------------------------------ mask function
def key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[Tensor] = None,
    **kwargs,
) -> Optional[Tensor]:
    """The mask every layer receives: a `(B, K)` bool key mask, or None when all `kv_length` keys are real.

    `K = min(kv_length, q_offset + q_length)` keys are in use: with a static cache the slots past the
    last query are empty and must not be attended to. `mask_function` (transformers' causal/packing
    overlay) is not materialised: causality is the op's own, packing is read from `position_ids`.
    """
    if kwargs.get("use_vmap"):  # transformers' sign of an or/and mask overlay (e.g. bidirectional image tokens)
        raise NotImplementedError("causalattn: custom mask overlays (or_mask_function / and_mask_function) are not "
                                  "supported; only causal attention with padding or packed sequences")
    if kv_offset:
        family = FAMILIES.get(getattr(kwargs.get("config"), "model_type", None), "this model")
        raise NotImplementedError(
            f"causalattn: {family} sliding-window attention is not supported past the window (a sliding KV cache "
            f"dropped its first {kv_offset} keys); keep prompt + generation within config.sliding_window or use "
            "another attn_implementation")
    used = min(kv_length, int(q_offset) + q_length)
    if attention_mask is None:
        if used == kv_length:
            return None
        return torch.ones(batch_size, used, dtype=torch.bool, device=kwargs.get("device"))
    mask = attention_mask.bool()
    if mask.shape[-1] < used:  # keys written in this call but not yet covered by the mask: transformers pads with 0
        mask = torch.nn.functional.pad(mask, (0, used - mask.shape[-1]))
    mask = mask[:, :used]
    if used == kv_length and bool(mask.all()):
        return None
    return mask


# ------------------------------------------------------------------------------ attention function
def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract on top of `causalattn.attention`.

    query (B, Hq, Nq, d); key, value (B, Hkv, Nk, d); attention_mask: what `key_padding_mask` built.
    Returns (out (B, Nq, Hq, d), None): attention probabilities are never materialised.
    """
    batch, _, n_q, _ = query.shape
    key_mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            got = f"{attention_mask.dtype} {tuple(attention_mask.shape)}" if isinstance(attention_mask, Tensor) \
                else type(attention_mask).__name__
            raise ValueError(f"attention_mask: causalattn expects the (B, Nk) bool key mask its registered mask function "
                             f"builds, got {got}; custom 4D masks cannot be mapped to key padding")
        used = attention_mask.shape[-1]
        if used > key.shape[2]:
            raise ValueError(f"attention_mask: covers {used} keys but the layer has {key.shape[2]}")
        key, value = key[:, :, :used], value[:, :, :used]  # drop unwritten static-cache slots
        key_mask = attention_mask
    n_k = key.shape[2]
    _refuse_unsupported(module, n_k, dropout, kwargs)

    prompt = _layer_prompt(module, kwargs)
    adapter = _adapter(module, prompt, query, key.shape[1]) if prompt is not None else None
    stats: Optional[StatisticsSink] = kwargs.get(STATS_KWARG)
    supervision = kwargs.get(SUPERVISION_KWARG)
    if supervision is not None:
        if not isinstance(supervision, CausalMask):
            raise TypeError(f"{SUPERVISION_KWARG}: expected a causalattn.CausalMask, got {type(supervision).__name__}")
        if stats is None:
            raise ValueError(f"{SUPERVISION_KWARG}: the CAT mass has nowhere to go; run the forward inside "
                             "`with causalattn.hf.collect(model) as stats:` and use stats.cat_loss()")
    # XG is a training statistic over whole sequences: none during cached decoding.
    xg_tokens = prompt.xg_tokens if stats is not None and prompt is not None and n_q == n_k else 0

    packed = packed_sequences(kwargs, batch, n_q, query.device) if key_mask is None and n_q == n_k > 1 else None
    if packed is not None and supervision is not None and batch != 1:
        raise ValueError(f"{SUPERVISION_KWARG}: supervised packed sequences must come as one row (B == 1) with a "
                         f"CausalMask built over that row with the same cu_seqlens, got B={batch}")
    cu_seqlens, max_seqlen = packed if packed is not None else (None, None)
    q, k, v = query, key, value
    if packed is not None and batch > 1:  # one long row: the op packs sequences only along B == 1
        q, k, v = (t.transpose(0, 1).reshape(1, t.shape[1], batch * n_q, t.shape[3]) for t in (q, k, v))

    causal = kwargs.get("is_causal")
    result = attention(
        q, k, v, causal=getattr(module, "is_causal", True) if causal is None else bool(causal), scale=scaling,
        key_mask=key_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, adapter=adapter, supervision=supervision,
        xg_tokens=xg_tokens, xg_pool=prompt.xg_pool if prompt is not None else "sample",
        backend=getattr(module, BACKEND_ATTR, "auto"))
    out, xg = result.out, result.xg
    if packed is not None and batch > 1:
        out = out.view(out.shape[1], batch, n_q, out.shape[3]).transpose(0, 1)
        if xg is not None and xg.dim() == 4:  # per-position XG: back to (B, Hq, N, d)
            xg = xg.view(xg.shape[1], batch, n_q, xg.shape[3]).transpose(0, 1)
    if stats is not None:
        if xg is not None and prompt.xg_space == "output":
            xg = _through_o_proj(module, xg, query.dtype)
        stats.record(module.layer_idx, mass=result.mass, xg=xg, supervision=supervision)
        rows = kwargs.get(LABEL_ROWS_KWARG)
        if rows is not None and adapter is not None and adapter.num_segments > 1 and packed is None:
            invariant, domain = segment_readouts(module, query, adapter, rows, scaling)
            stats.record_readouts(module.layer_idx, invariant=invariant, domain=domain)
    return out.transpose(1, 2), None


def _refuse_unsupported(module: nn.Module, n_k: int, dropout: float, kwargs: dict) -> None:
    """Raise for attention variants the op does not compute, instead of silently computing another one."""
    if dropout and module.training:
        raise NotImplementedError(f"causalattn: attention dropout is not supported (dropout={dropout}); "
                                  "set config.attention_dropout = 0")
    refuse_unsupported(module, n_k, kwargs)  # the family's own: sliding windows, soft-capping
    if kwargs.get("output_attentions"):
        raise NotImplementedError("causalattn: output_attentions=True is not supported: the fused op never forms the "
                                  "attention probabilities (they would come back empty); for the CAT mass use "
                                  "causalattn.hf.collect(model), for the maps attn_implementation='eager' on a model "
                                  "without adapters")


def _layer_prompt(module: nn.Module, kwargs: dict) -> Optional[LayerPrompt]:
    own = getattr(module, ADAPTER_ATTR, None)
    handed = kwargs.get(PROMPT_KWARG)
    if own is not None and handed is not None:
        raise ValueError(f"layer {getattr(module, 'layer_idx', '?')}: has a causalattn adapter and was handed "
                         "a second prompt (PEFT bridge); use one of them")
    return handed if handed is not None else own


def _adapter(module: nn.Module, prompt: LayerPrompt, query: Tensor, heads_kv: int) -> Adapter:
    """Adapter K/V through the layer's own key path (`causalattn.hf.families`: k_proj or the fused qkv_proj,
    the key norm where the family has one; no RoPE)."""
    head_dim = query.shape[-1]

    def project(hidden: Tensor) -> tuple[Tensor, Tensor]:  # (M, C) -> (Hkv, M, d) twice
        keys, values = prompt_keys_values(module, hidden.to(query.dtype), heads_kv, head_dim)
        return keys.to(query.dtype), values.to(query.dtype)

    routing = getattr(prompt, "routing", None)
    if routing is None or routing.invariant_only:
        return Adapter(*project(prompt.prompt), prompt.gate, prompt.gate_mode)
    return routed_adapter(prompt, routing.route, query.shape[0], project)


def _through_o_proj(module: nn.Module, xg: Tensor, dtype: torch.dtype) -> Tensor:
    """XG read-out in the layer's output space (docs/math.md §3), through the o_proj module during the forward
    (FSDP-safe). (S, Hq, d) -> (S, 1, C); per position (B, Hq, N, d) -> (B, 1, N, C). The o_proj bias
    shifts every sample alike, so the batch variance is the one of `W z`."""
    features = xg.flatten(1) if xg.dim() == 3 else xg.transpose(1, 2).flatten(2)
    projected = module.o_proj(features.to(dtype))
    # a variance of tiny read-outs: take it in at least fp32 even when the model runs in bf16/fp16
    return projected.to(torch.promote_types(projected.dtype, torch.float32))[:, None]


def register() -> None:
    """Register the attention and mask functions under "causalattn" (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, key_padding_mask)
