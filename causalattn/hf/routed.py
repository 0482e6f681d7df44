"""Routed adapters on a transformers model (ICLM, docs/math.md §7): the router, where it reads, what it hands on.

    add_adapters(model, AdapterConfig(length=6, domains=2, domain_length=6, route="vq"))
    with collect(model) as stats:
        out = model(input_ids, attention_mask=mask, labels=labels,
                    causalattn_label_rows=rows,        # (B,) row whose read-outs the MI term compares
                    causalattn_route_tokens=prompts,   # (B, N) bool: route from the prompt, not the answer
                    causalattn_domains=domain_ids)     # (B,) only for route="oracle"
    loss = out.loss + 0.1 * stats.vq_loss() + 0.01 * stats.mi_loss()
    with invariant_only(model): ...                    # the domain segments switched off

One `Router` (`causalattn.routing`) is added to the model as `model.causalattn_router`. A forward
pre-hook on the decoder layer holding the first adapted attention routes the batch from the hidden
states entering that layer: the base model's own, adapter-free states (no second model, no second
forward), from the real tokens or only those `causalattn_route_tokens` marks. Give it the prompt
tokens when the sequence holds the answer: a route read from the answer tokens would carry the label
(and scoring candidate answers would route each candidate its own way). The route goes into a `RouteState` shared by every adapted layer's `GatedPrompt`, whose
attention call then builds its segmented `Adapter` from it (`routed_adapter` below).

During cached decoding (the first adapted layer's cache already holds tokens) the route of the prompt
is kept: a sample's domain is decided once, from its prompt. Under gradient checkpointing the
recomputed first adapted layer routes again (same route in training mode: batch-norm uses batch
statistics) and `Statistics` keeps the first forward's route, the one in the loss's graph.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from causalattn.hf.contract import (ADAPTER_ATTR, DOMAINS_KWARG, LABEL_ROWS_KWARG, ROUTE_TOKENS_KWARG, STATS_KWARG,
                                   LayerPrompt, attention_modules)
from causalattn.hf.families import input_projection
from causalattn.hf.packing import packed_sequences
from causalattn.inputs import Adapter, gate_values
from causalattn.routing import Route, Router, segment_outputs

ROUTER_ATTR = "causalattn_router"  # the Router submodule of a model with routed adapters


class RouteState:
    """The current batch's route, shared by the router hook and every routed layer; `invariant_only`
    switches the domain segments off (the layers then read the invariant prompt alone)."""

    def __init__(self) -> None:
        self.route: Optional[Route] = None
        self.invariant_only = False


def find_router(model: nn.Module) -> Optional[Router]:
    """The model's Router, or None for unrouted (or no) adapters."""
    return next((m for m in model.modules() if isinstance(m, Router)), None)


def add_router(model: nn.Module, config) -> Router:
    """Add the Router of `config` (an AdapterConfig with domains >= 2) to `model`, whose adapted layers
    already hold their banks, and hook it in front of the first adapted decoder layer."""
    adapted = [m for m in attention_modules(model) if getattr(m, ADAPTER_ATTR, None) is not None]
    if not adapted:
        raise ValueError("model: has no causalattn adapters to route between (add_adapters adds both)")
    first = adapted[0]
    projection = input_projection(first)
    weight = projection.weight
    dtype = torch.promote_types(weight.dtype, torch.float32) if weight.dtype.is_floating_point else torch.float32
    router = Router(projection.in_features, config.domains, mode=config.route, code_dim=config.router_dim,
                    device=weight.device, dtype=dtype)
    router.routing = RouteState()  # a plain attribute: deep copies keep it shared with the copied layers
    if config.route == "oracle":  # the given ids route: untrained router weights (DDP needs every trainable one used)
        router.requires_grad_(False)
    model.add_module(ROUTER_ATTR, router)
    for module in adapted:
        getattr(module, ADAPTER_ATTR).routing = router.routing
    decoder_layer = _decoder_layer_of(model, first)
    decoder_layer.register_forward_pre_hook(functools.partial(_route_batch, router, first.layer_idx),
                                            with_kwargs=True)
    return router


def _decoder_layer_of(model: nn.Module, attention: nn.Module) -> nn.Module:
    for module in model.modules():
        if any(child is attention for child in module.children()) and module is not model:
            return module
    raise ValueError(f"model: found no decoder layer holding attention layer {attention.layer_idx}")


def _route_batch(router: Router, layer_idx: int, _layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the first adapted decoder layer: route the batch from its input states."""
    hidden = args[0] if args else kwargs["hidden_states"]
    state = router.routing
    cache = kwargs.get("past_key_values")
    if cache is not None and state.route is not None and cache.get_seq_length(layer_idx) > 0:
        return None  # decoding: keep the route of the prompt
    token_mask = kwargs.get("attention_mask")  # the (B, N) key mask of causalattn's mask function, or None
    # transformers' packing rule as the attention layers read it (cached: they reuse this very result)
    batch, length = hidden.shape[:2]
    if token_mask is None and length > 1 and packed_sequences(kwargs, batch, length, hidden.device) is not None:
        raise NotImplementedError("routed adapters: packed sequences (padding-free batches) are not supported; the "
                                  "router pools one route per row, which would mix the sequences of a packed row")
    if token_mask is not None and token_mask.shape[-1] != hidden.shape[1]:
        raise ValueError(f"attention_mask: routing reads one key mask per token, got width {token_mask.shape[-1]} "
                         f"for {hidden.shape[1]} tokens")
    chosen = kwargs.get(ROUTE_TOKENS_KWARG)
    if chosen is not None:
        if chosen.shape != hidden.shape[:2]:
            raise ValueError(f"{ROUTE_TOKENS_KWARG}: expected a (B, N) = {tuple(hidden.shape[:2])} bool mask, got "
                             f"shape {tuple(chosen.shape)}")
        chosen = chosen.to(hidden.device).bool()
        token_mask = chosen if token_mask is None else chosen & token_mask
    route = router(hidden, token_mask, kwargs.get(DOMAINS_KWARG))
    state.route = route
    stats = kwargs.get(STATS_KWARG)
    if stats is not None:
        stats.record_route(route)
    return None


def routed_adapter(prompt: LayerPrompt, route, batch: int, project: Callable) -> Adapter:
    """The segmented Adapter of a routed layer (docs/math.md §7): the invariant prompt, then either each sample's
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


def segment_readouts(module: nn.Module, query: Tensor, adapter: Adapter, rows: Tensor,
                      scaling: Optional[float]) -> tuple[Tensor, Tensor]:
    """(u, w) (B, C): what the invariant segment and the domain segments together add at each sample's
    row `rows[b]`, through o_proj (docs/math.md §7): a (B, Hq, 1, M) side problem beside the fused pass."""
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


@contextlib.contextmanager
def invariant_only(model: nn.Module) -> Iterator[None]:
    """Inside the block every routed layer reads only its invariant prompt: the invariant mechanism
    alone, as if every domain gate were zero (the router still runs, so statistics stay available)."""
    router = find_router(model)
    if router is None:
        raise ValueError("model: invariant_only needs routed adapters (AdapterConfig(domains=K >= 2))")
    before = router.routing.invariant_only
    router.routing.invariant_only = True
    try:
        yield
    finally:
        router.routing.invariant_only = before
