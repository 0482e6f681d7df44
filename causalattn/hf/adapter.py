"""Zero-init gated prompts on the top-L attention layers of a transformers model (docs/math.md §1).

    summary = add_adapters(model, AdapterConfig(length=10, layers=30))
    print(summary)   # trainable params: 1,229,760 || all params: ... (LLaMA-7B shapes)

Each adapted attention module gains a `causalattn_adapter` submodule (`GatedPrompt`) holding

    prompt (M, C)      learnable prompt tokens in the model's hidden space, N(0, 1) init
                       (the official LLaMA-Adapter embedding init; PEFT does the same)
    gate   (Hq,)       one per query head (default), or (1,) one per layer; zero init

The attention function (`causalattn.hf.attention`) projects the prompt through the layer's own key
path (`causalattn.hf.families`) at every call, so nothing here reads projection weights. The base model is frozen;
only prompts and gates train. State-dict keys stay the model's own
(`...layers.29.self_attn.causalattn_adapter.prompt`), so checkpoints of the whole model keep working.

Routed adapters (ICLM, docs/math.md §7; `domains=K >= 2`): each layer also holds a bank of K domain prompts
`bank (K, M_dom, C)` (N(0, 1) init) with zero-init gates `domain_gate (K, Hq)` or `(K, 1)`; the `prompt`
and `gate` above are the invariant mechanism. One `Router` on the model (`causalattn.hf.routed`) picks
each sample's domain from the hidden states entering the first adapted layer, and every adapted layer
reads its invariant prompt and the chosen domain prompt(s), each segment with its own softmax and gate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from causalattn.hf.contract import ADAPTER_ATTR, attention_modules, use_causalattn
from causalattn.hf.families import check_key_path, input_projection
from causalattn.hf.guards import guard_adapted_model
from causalattn.inputs import GATE_MODES, MAX_ADAPTER_TOKENS, XG_POOLS
from causalattn.losses import XG_SPACES
from causalattn.hf.routed import add_router, find_router
from causalattn.routing import DEFAULT_CODE_DIM, HARD_ROUTES, ROUTE_MODES

ROUTING_FIELDS = ("domains", "domain_length", "route", "router_dim")
DEFAULT_MAX_LAYERS = 30  # the official LLaMA-Adapter scripts adapt 30 of LLaMA-7B's 32 layers


@dataclass
class AdapterConfig:
    """What `add_adapters` builds.

    length         M, prompt tokens per adapted layer (<= 64)
    layers         L, adapt the top L attention layers; None: min(30, number of layers)
    xg_tokens      H_g, the first H_g prompt tokens are the XG tokens of the DCA regulariser (docs/math.md §3)
    gate           "tanh" (gamma = tanh(g), LLaMA-Adapter training code) or "raw" (gamma = g, PEFT)
    gate_per_head  one gate per query head, or one scalar per layer; None: per head for "tanh",
                   scalar for "raw" (PEFT's shape), as docs/math.md §1 pairs them
    xg_pool        "sample" (mean over each sample's tokens) or "position" (official code)
    xg_space       "output" (through o_proj, official) or "head"
    domains        K domain prompts chosen by a router (ICLM); 0: one unrouted prompt (the fields below
                   unused, and absent from saved configs, which stay as they were)
    domain_length  M_dom, prompt tokens of each domain prompt
    route          "vq" (ICLM), "vq-ste", "soft" or "oracle" (given domain ids), see causalattn.routing
    router_dim     the router's code dimension (64 in the official code)
    """

    length: int = 10
    layers: Optional[int] = None
    xg_tokens: int = 2
    gate: str = "tanh"
    gate_per_head: Optional[bool] = None
    xg_pool: str = "sample"
    xg_space: str = "output"
    domains: int = 0
    domain_length: int = 10
    route: str = "vq"
    router_dim: int = DEFAULT_CODE_DIM

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or not 1 <= self.length <= MAX_ADAPTER_TOKENS:
            raise ValueError(f"length: expected an int in [1, {MAX_ADAPTER_TOKENS}], got {self.length!r}")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            raise ValueError(f"layers: expected a positive int or None, got {self.layers!r}")
        if not isinstance(self.xg_tokens, int) or not 0 <= self.xg_tokens <= self.length:
            raise ValueError(f"xg_tokens: expected an int in [0, length={self.length}], got {self.xg_tokens!r}")
        if self.gate not in GATE_MODES:
            raise ValueError(f"gate: expected one of {GATE_MODES}, got {self.gate!r}")
        if self.gate_per_head is None:
            self.gate_per_head = self.gate == "tanh"
        if not isinstance(self.gate_per_head, bool):
            raise ValueError(f"gate_per_head: expected a bool or None, got {self.gate_per_head!r}")
        if self.xg_pool not in XG_POOLS:
            raise ValueError(f"xg_pool: expected one of {XG_POOLS}, got {self.xg_pool!r}")
        if self.xg_space not in XG_SPACES:
            raise ValueError(f"xg_space: expected one of {XG_SPACES}, got {self.xg_space!r}")
        if not isinstance(self.domains, int) or self.domains == 1 or self.domains < 0:
            raise ValueError(f"domains: expected 0 (unrouted) or an int >= 2, got {self.domains!r}")
        if self.routed:
            self._check_routing()

    @property
    def routed(self) -> bool:
        return self.domains > 0

    @property
    def total_slots(self) -> int:
        """Adapter slots one attention call reads: hard routes gather one domain prompt per sample,
        "soft"/"vq-ste" read all K (their gradient needs every domain's output)."""
        if not self.routed:
            return self.length
        return self.length + self.domain_length * (1 if self.route in HARD_ROUTES else self.domains)

    def _check_routing(self) -> None:
        if self.route not in ROUTE_MODES:
            raise ValueError(f"route: expected one of {ROUTE_MODES}, got {self.route!r}")
        if not isinstance(self.domain_length, int) or self.domain_length < 1:
            raise ValueError(f"domain_length: expected a positive int, got {self.domain_length!r}")
        if not isinstance(self.router_dim, int) or self.router_dim < 1:
            raise ValueError(f"router_dim: expected a positive int, got {self.router_dim!r}")
        if self.total_slots > MAX_ADAPTER_TOKENS:
            raise ValueError(f"domain_length: route {self.route!r} reads {self.total_slots} adapter slots (length "
                             f"{self.length} + domain_length {self.domain_length} x "
                             f"{1 if self.route in HARD_ROUTES else self.domains}); expected <= {MAX_ADAPTER_TOKENS}")

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if not self.routed:  # unrouted configs are saved exactly as before routing existed
            for name in ROUTING_FIELDS:
                values.pop(name)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"adapter config: unknown fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


class GatedPrompt(nn.Module):
    """One layer's adapter: `prompt (M, C)`, `gate (Hq,)` or `(1,)`, and how the attention uses them."""

    def __init__(self, hidden_size: int, num_heads: int, config: AdapterConfig, *,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(config.length, hidden_size, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(num_heads if config.gate_per_head else 1, device=device, dtype=dtype))
        self.gate_mode = config.gate
        self.xg_tokens = config.xg_tokens
        self.xg_pool = config.xg_pool
        self.xg_space = config.xg_space
        self.routing = None  # the RouteState shared with the model's router (causalattn.hf.routed), if routed
        if config.routed:
            self.bank = nn.Parameter(torch.randn(config.domains, config.domain_length, hidden_size,
                                                 device=device, dtype=dtype))
            self.domain_gate = nn.Parameter(torch.zeros(config.domains, self.gate.numel(), device=device, dtype=dtype))

    @property
    def routed(self) -> bool:
        return self.routing is not None

    def extra_repr(self) -> str:
        text = (f"length={self.prompt.shape[0]}, hidden={self.prompt.shape[1]}, gate={self.gate_mode} "
                f"x{self.gate.numel()}, xg_tokens={self.xg_tokens}")
        if self.routed:
            text += f", domains={self.bank.shape[0]}x{self.bank.shape[1]}"
        return text


@dataclass(frozen=True)
class AdapterSummary:
    """Where the adapters are and what trains."""

    layer_indices: tuple[int, ...]
    adapter_params: int
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
                f"trainable%: {share:.4f} || adapted layers: {list(self.layer_indices)}")


def adapted_layers(model: nn.Module) -> dict[int, GatedPrompt]:
    """{layer index: GatedPrompt} of every adapted attention layer of `model`."""
    return {m.layer_idx: getattr(m, ADAPTER_ATTR) for m in attention_modules(model)
            if getattr(m, ADAPTER_ATTR, None) is not None}


def add_adapters(model: nn.Module, config: Optional[AdapterConfig] = None) -> AdapterSummary:
    """Add zero-init gated prompts to the top-L attention layers of `model`, freeze everything else and
    route attention through causalattn (the adapters only exist there). Returns the parameter counts.

    The parameters are created on each layer's device in fp32 (fp64 for an fp64 model): the
    attention function casts them to the compute dtype, so they stay full-precision master weights.
    """
    config = config if config is not None else AdapterConfig()
    modules = attention_modules(model)
    if adapted_layers(model):
        raise ValueError("model: already has causalattn adapters; load or train those instead of adding more")
    count = config.layers if config.layers is not None else min(DEFAULT_MAX_LAYERS, len(modules))
    if count > len(modules):
        raise ValueError(f"layers: the model has {len(modules)} attention layers, got layers={count}")
    adapted = modules[len(modules) - count:]
    for module in adapted:  # before anything changes: a refused family leaves the model as it was
        check_key_path(module)
    use_causalattn(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in adapted:
        projection = input_projection(module)
        weight = projection.weight
        dtype = torch.promote_types(weight.dtype, torch.float32) if weight.dtype.is_floating_point else torch.float32
        setattr(module, ADAPTER_ATTR, GatedPrompt(
            projection.in_features, module.config.num_attention_heads, config, device=weight.device, dtype=dtype))
    if config.routed:
        add_router(model, config)
    guard_adapted_model(model)
    return summarize(model)


def summarize(model: nn.Module) -> AdapterSummary:
    """Parameter counts of `model` and its adapters."""
    layers = adapted_layers(model)
    params = list(model.parameters())  # each shared parameter once
    router = find_router(model)
    return AdapterSummary(
        layer_indices=tuple(sorted(layers)),
        adapter_params=sum(p.numel() for prompt in layers.values() for p in prompt.parameters())
        + (sum(p.numel() for p in router.parameters()) if router is not None else 0),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params))
