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
  handed in through the `causalattn_prompt` keyword (the PEFT bridge). Its keys/values are the layer's
  own `k_proj`/`v_proj` applied to the prompt, without RoPE: `(Hkv, M, d)`;
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

The op's backend is "auto" unless `set_backend(model, "reference" | "triton")` pins it per layer.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor, nn

from causalattn.inputs import Adapter, gate_values
from causalattn.masks import CausalMask
from causalattn.ops import BACKENDS, attention
from causalattn.reference import segment_outputs

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
    xg_tokens: int      # the first xg_tokens prompt tokens are the XG tokens (SPEC §3)
    xg_pool: str        # "sample" or "position"
    xg_space: str       # "output" (through o_proj) or "head"


class StatisticsSink(Protocol):
    def record(self, layer_idx: int, *, mass: Optional[Tensor], xg: Optional[Tensor],
               supervision: Optional[CausalMask]) -> None: ...

    def record_readouts(self, layer_idx: int, *, invariant: Tensor, domain: Tensor) -> None: ...


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
        raise NotImplementedError(
            f"causalattn: sliding-window KV caches are not supported (kv_offset={kv_offset}); "
            "use a full-attention cache or another attn_implementation")
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
            invariant, domain = _segment_readouts(module, query, adapter, rows, scaling)
            stats.record_readouts(module.layer_idx, invariant=invariant, domain=domain)
    return out.transpose(1, 2), None


def _segment_readouts(module: nn.Module, query: Tensor, adapter: Adapter, rows: Tensor,
                      scaling: Optional[float]) -> tuple[Tensor, Tensor]:
    """(u, w) (B, C): what the invariant segment and the domain segments together add at each sample's
    row `rows[b]`, through o_proj (SPEC §7): a (B, Hq, 1, M) side problem beside the fused pass."""
    batch = query.shape[0]
    rows = torch.as_tensor(rows, device=query.device).long().reshape(-1)
    if rows.shape != (batch,) or bool(((rows < 0) | (rows >= query.shape[2])).any()):
        raise ValueError(f"{LABEL_ROWS_KWARG}: expected {batch} row indices in [0, {query.shape[2]}), got {rows.tolist()}")
    picked = query[torch.arange(batch, device=query.device), :, rows]          # (B, Hq, d)
    parts = segment_outputs(picked[:, :, None], adapter, scaling)[:, :, :, 0]  # (B, S, Hq, d)
    features = torch.cat([parts[:, 0].flatten(1), parts[:, 1:].sum(1).flatten(1)])
    projected = module.o_proj(features.to(query.dtype))
    if getattr(module.o_proj, "bias", None) is not None:  # a read-out is W o: the bias is not the segment's
        projected = projected - module.o_proj.bias
    projected = projected.to(torch.promote_types(projected.dtype, torch.float32))
    return projected[:batch], projected[batch:]


def _refuse_unsupported(module: nn.Module, n_k: int, dropout: float, kwargs: dict) -> None:
    """Raise for attention variants the op does not compute, instead of silently computing another one."""
    if dropout and module.training:
        raise NotImplementedError(f"causalattn: attention dropout is not supported (dropout={dropout}); "
                                  "set config.attention_dropout = 0")
    window = kwargs.get("sliding_window")
    if window is not None and n_k > window:
        raise NotImplementedError(f"causalattn: sliding-window attention is not supported; {n_k} keys exceed "
                                  f"the window of {window} (set config.sliding_window = None)")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"causalattn: `{name}` attention is not supported")
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
    """Adapter K/V through the layer's own k_proj/v_proj (no RoPE): calling the modules, not reading their
    weights, keeps sharded (FSDP/ZeRO) or quantised projections working the normal way."""
    head_dim = query.shape[-1]

    def heads(projected: Tensor) -> Tensor:  # (M, Hkv * d) -> (Hkv, M, d)
        return projected.to(query.dtype).view(projected.shape[0], heads_kv, head_dim).transpose(0, 1)

    routing = getattr(prompt, "routing", None)
    if routing is None or routing.invariant_only:
        hidden = prompt.prompt.to(query.dtype)
        return Adapter(heads(module.k_proj(hidden)), heads(module.v_proj(hidden)), prompt.gate, prompt.gate_mode)
    return _routed_adapter(prompt, routing.route, query.shape[0], lambda hidden: (
        heads(module.k_proj(hidden.to(query.dtype))), heads(module.v_proj(hidden.to(query.dtype)))))


def _routed_adapter(prompt: LayerPrompt, route, batch: int, project: Callable) -> Adapter:
    """The segmented Adapter of a routed layer (SPEC §7): the invariant prompt, then either each sample's
    chosen domain prompt (hard routes: per-sample keys, gate (B, 2, Hq)) or every domain prompt with its
    gamma scaled by the route weight ("soft", "vq-ste": shared keys, gate (B, 1 + K, Hq))."""
    if route is None:
        raise RuntimeError("layer: routed adapter without a route; the router hook in front of the first "
                           "adapted layer did not run (was the model called through its own forward?)")
    if route.index.shape[0] != batch:
        raise ValueError(f"route: has {route.index.shape[0]} samples, the attention call {batch}")
    length = prompt.prompt.shape[0]
    domains, domain_length = prompt.bank.shape[:2]
    # one projection of every prompt token: the invariant prompt and the whole bank
    keys, values = project(torch.cat([prompt.prompt, prompt.bank.flatten(0, 1)]))  # (Hkv, M + K M_dom, d)
    invariant_gamma = gate_values(prompt.gate, prompt.gate_mode)                  # (Hq or 1,)
    domain_gamma = gate_values(prompt.domain_gate, prompt.gate_mode)              # (K, Hq or 1)
    if route.hard:
        def gather(t: Tensor) -> Tensor:  # (Hkv, M + K M_dom, d) -> (B, Hkv, M + M_dom, d)
            bank = t[:, length:].unflatten(1, (domains, domain_length))[:, route.index].transpose(0, 1)
            return torch.cat([t[:, :length].expand(batch, -1, -1, -1), bank], dim=2)

        gate = torch.stack([invariant_gamma.expand(batch, -1), domain_gamma[route.index]], dim=1)
        return Adapter(gather(keys), gather(values), gate, "raw", (length, domain_length))
    weights = route.weights.to(domain_gamma.dtype)
    gate = torch.cat([invariant_gamma.expand(batch, 1, -1), domain_gamma[None] * weights[:, :, None]], dim=1)
    return Adapter(keys, values, gate, "raw", (length,) + (domain_length,) * domains)


# (weak reference to the tensor the packing was read from, its key, the result): every layer of one
# forward receives the same position_ids / cu_seq_lens_q tensor, so its boundaries, and the
# device-to-host syncs that find them, are computed once per forward instead of 3-4 times per layer.
_last_packing: Optional[tuple[weakref.ref, tuple, Optional[tuple[Tensor, Optional[int]]]]] = None


def packed_sequences(kwargs: dict, batch: int, n: int, device: torch.device) -> Optional[tuple[Tensor, Optional[int]]]:
    """(cu_seqlens over the B*N flattened tokens, max length or None) for a padding-free batch, else
    None; cached on the identity and version of the tensor it is read from (see `_last_packing`)."""
    global _last_packing
    source = kwargs.get("cu_seq_lens_q")
    if source is None:
        source = kwargs.get("position_ids")
    if not isinstance(source, Tensor):
        return None
    key = (source._version, batch, n, device, kwargs.get("max_length_q"), id(kwargs.get("cu_seq_lens_k")))
    if _last_packing is not None and _last_packing[0]() is source and _last_packing[1] == key:
        return _last_packing[2]
    packed = _find_packed_sequences(kwargs, batch, n, device)
    _last_packing = (weakref.ref(source), key, packed)
    return packed


def _find_packed_sequences(kwargs: dict, batch: int, n: int, device: torch.device) -> Optional[tuple[Tensor, Optional[int]]]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu_k.to(cu.device), cu):
            raise ValueError("cu_seq_lens_k: causalattn packs self-attention only; expected cu_seq_lens_q")
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q: packed sequences come as one row (B == 1), got B={batch}")
        max_len = kwargs.get("max_length_q")
        return cu.to(device=device, dtype=torch.int32), int(max_len) if max_len is not None else None
    positions = kwargs["position_ids"].to(device).expand(batch, n)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    first_tokens = starts.flatten().nonzero().flatten()  # the one sync that finds the sequences
    if first_tokens.numel() == batch:  # one sequence per row: plain causal attention
        return None
    bounds = torch.cat([first_tokens, torch.tensor([batch * n], device=device)]).to(torch.int32)
    # the longest sequence now (a second sync, once per forward) rather than in the op for every layer
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def _through_o_proj(module: nn.Module, xg: Tensor, dtype: torch.dtype) -> Tensor:
    """XG read-out in the layer's output space (SPEC §3), through the o_proj module during the forward
    (FSDP-safe). (S, Hq, d) -> (S, 1, C); per position (B, Hq, N, d) -> (B, 1, N, C). The o_proj bias
    shifts every sample alike, so the batch variance is the one of `W z`."""
    features = xg.flatten(1) if xg.dim() == 3 else xg.transpose(1, 2).flatten(2)
    projected = module.o_proj(features.to(dtype))
    # a variance of tiny read-outs: take it in at least fp32 even when the model runs in bf16/fp16
    return projected.to(torch.promote_types(projected.dtype, torch.float32))[:, None]


# ------------------------------------------------------------------------------ model helpers
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The LLaMA-family attention modules of `model` (q/k/v/o projections and a layer index), by layer index."""
    found = [m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int)
             and all(isinstance(getattr(m, name, None), nn.Module) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    if not found:
        raise ValueError(f"model: no LLaMA-family attention modules (q_proj/k_proj/v_proj/o_proj and layer_idx) "
                         f"found in {type(model).__name__}")
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


def register() -> None:
    """Register the attention and mask functions under "causalattn" (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, key_padding_mask)
