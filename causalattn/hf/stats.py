"""The statistics side channel: per-layer CAT mass and XG read-out of a model's last forward.

    with causalattn.hf.collect(model) as stats:
        out = model(**batch, labels=labels, supervision=mask)
    loss = out.loss + stats.cat_loss() + lam * stats.xg_loss()
    loss.backward()

`collect` hooks the model's `__call__` and adds a `causalattn_stats=<Statistics>` keyword to every
forward inside the block; transformers hands keywords to every attention call unchanged, so each
layer records what `causalattn.attention` returned:

    mass  (B, Hq, N)   CAT mass m_i (docs/math.md §2), every layer, when `supervision=` is given
    xg    (S, 1, C)    pooled XG read-out through the layer's o_proj (docs/math.md §3), adapted layers;
          (S, Hq, d)   with xg_space="head"; per position (B, 1, N, C) / (B, Hq, N, d)

Both are differentiable outputs of the op, so the losses below backpropagate into the fused backward.
With routed adapters (`causalattn.hf.routed`) it also keeps the batch's `route` (its VQ loss) and, when
`causalattn_label_rows=` is given, each routed layer's invariant and domain read-outs at those rows:

    readouts  {layer: (u (B, C), w (B, C))}   for `mi_loss` (ICLM's MI term, docs/math.md §7)

Gradient checkpointing: a checkpointed layer runs its forward again during backward with the same
keywords, so it calls `record` a second time. The collector keeps the first record of each layer per
forward (keyed by `layer_idx`, cleared when the next forward starts): the first forward's tensors are
the ones in the loss's graph, and keeping the recomputed ones would hold a second graph alive.
Only non-reentrant checkpointing (transformers' default) is supported: the reentrant kind runs the
first forward without autograd, so the statistics could not carry gradients.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

from torch import Tensor, nn

from causalattn.hf.contract import STATS_KWARG
from causalattn.losses import cat_loss, mutual_information, xg_variance
from causalattn.masks import CausalMask
from causalattn.routing import Route

XG_LAYER_SETS = ("adapted", "last")


class Statistics:
    """Per-layer statistics of the last forward run inside `collect`; see the module docstring."""

    def __init__(self) -> None:
        self._recorded: set[int] = set()
        self._mass: dict[int, Tensor] = {}
        self._xg: dict[int, Tensor] = {}
        self._supervision: Optional[CausalMask] = None
        self._readouts: dict[int, tuple[Tensor, Tensor]] = {}
        self._route: Optional[Route] = None

    def begin_forward(self) -> None:
        """Forget the previous forward's statistics (called by `collect` as each forward starts)."""
        self._recorded.clear()
        self._mass.clear()
        self._xg.clear()
        self._supervision = None
        self._readouts.clear()
        self._route = None

    def record_route(self, route: Route) -> None:
        """Store the batch's route (the first one of a forward, see the module docstring)."""
        if self._route is None:
            self._route = route

    def record_readouts(self, layer_idx: int, *, invariant: Tensor, domain: Tensor) -> None:
        """Store one routed layer's read-outs at the label rows (first record per forward)."""
        self._readouts.setdefault(layer_idx, (invariant, domain))

    @property
    def route(self) -> Optional[Route]:
        """The route of the last forward (routed adapters), or None."""
        return self._route

    @property
    def readouts(self) -> dict[int, tuple[Tensor, Tensor]]:
        """{layer index: (invariant, domain) read-outs (B, C) at the label rows} of the last forward."""
        return dict(self._readouts)

    def vq_loss(self) -> Tensor:
        """The router's VQ loss of the last forward (0 for route="oracle")."""
        if self._route is None:
            raise RuntimeError("vq_loss: no route was recorded; it needs routed adapters "
                               "(AdapterConfig(domains=K >= 2)) and a forward inside collect(model)")
        return self._route.vq_loss

    def mi_loss(self, *, kind: str = "code", layers: str = "last") -> Tensor:
        """ICLM's MI term of the last forward (`causalattn.mutual_information`) between the invariant and
        the domain read-outs at the label rows: of the top routed layer (`"last"`, the official code
        compares last-layer states) or averaged over every routed layer (`"adapted"`)."""
        if layers not in XG_LAYER_SETS:
            raise ValueError(f"layers: expected one of {XG_LAYER_SETS}, got {layers!r}")
        if not self._readouts:
            raise RuntimeError("mi_loss: no read-outs were recorded; they need routed adapters, "
                               "causalattn_label_rows=(B,) rows given to model(...) and a forward inside collect(model)")
        chosen = sorted(self._readouts)[-1:] if layers == "last" else sorted(self._readouts)
        values = [mutual_information(*self._readouts[i], kind=kind) for i in chosen]
        return sum(values) / len(values)

    def record(self, layer_idx: int, *, mass: Optional[Tensor], xg: Optional[Tensor],
               supervision: Optional[CausalMask]) -> None:
        """Store one layer's statistics; a second call for the same layer in one forward (a recompute
        under gradient checkpointing) is ignored."""
        if layer_idx in self._recorded:
            return
        self._recorded.add(layer_idx)
        if mass is not None:
            if self._supervision is not None and supervision is not self._supervision:
                raise ValueError(f"supervision: layer {layer_idx} got another CausalMask than the earlier layers")
            self._supervision = supervision
            self._mass[layer_idx] = mass
        if xg is not None:
            self._xg[layer_idx] = xg

    @property
    def mass(self) -> dict[int, Tensor]:
        """{layer index: CAT mass (B, Hq, N)} of the last forward."""
        return dict(self._mass)

    @property
    def xg(self) -> dict[int, Tensor]:
        """{layer index: XG read-out} of the last forward (shapes in the module docstring)."""
        return dict(self._xg)

    @property
    def supervision(self) -> Optional[CausalMask]:
        """The CausalMask the last forward was supervised with."""
        return self._supervision

    def cat_loss(self, *, alpha: float = 2.0, kind: str = "div", heads: str = "mean",
                 layers: Optional[Sequence[int]] = None) -> Tensor:
        """CAT loss of the last forward: the mass averaged over the layers (all, or the `layers` indices, 0 the
        first) and query heads (or, with `heads="each"`, every such layer's every head scored alone), then the
        per-row loss averaged over valid rows (docs/math.md §2, `causalattn.cat_loss`)."""
        return cat_loss(self.layer_masses(layers), self._supervision, alpha=alpha, kind=kind, heads=heads)

    def layer_masses(self, layers: Optional[Sequence[int]] = None) -> list[Tensor]:
        """The CAT masses (B, Hq, N) of every recorded layer in order, or of the `layers` indices (0 the first)."""
        if not self._mass:
            raise RuntimeError("cat_loss: no CAT mass was recorded; pass supervision=<CausalMask> to model(...) "
                               "inside `with causalattn.hf.collect(model)`")
        chosen = sorted(self._mass) if layers is None else list(layers)
        if not chosen or any(i not in self._mass for i in chosen):
            raise ValueError(f"layers: expected indices of layers that recorded a CAT mass ({sorted(self._mass)}), "
                             f"got {chosen}")
        return [self._mass[i] for i in chosen]

    def xg_loss(self, *, layers: str = "adapted") -> Tensor:
        """DCA's XG variance R of the last forward (docs/math.md §3, `causalattn.xg_variance`): the unbiased
        variance over the micro-batch of each sample's XG read-out, averaged over features and over the
        adapted layers (`layers="adapted"`) or only the top one (`"last"`, the official code)."""
        if layers not in XG_LAYER_SETS:
            raise ValueError(f"layers: expected one of {XG_LAYER_SETS}, got {layers!r}")
        if not self._xg:
            raise RuntimeError("xg_loss: no XG statistic was recorded; it needs adapters with xg_tokens > 0 "
                               "(causalattn.hf.add_adapters) and a full-sequence forward inside collect(model)")
        chosen = sorted(self._xg)[-1:] if layers == "last" else sorted(self._xg)
        # The recorded read-outs are already in the space the adapter chose (o_proj applied during the
        # forward), so the variance is taken on them as they are.
        return xg_variance([self._xg[i] for i in chosen], space="head")


def _reentrant_checkpointing(model: nn.Module) -> bool:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant") is True:
                return True
    return False


@contextlib.contextmanager
def collect(model: nn.Module) -> Iterator[Statistics]:
    """Collect the statistics of every forward of `model` run inside the block (the last one is kept).

    The statistics are requested by the keyword this adds: the CAT mass when `supervision=` is also
    given, the XG read-out on adapted layers. Call `model(...)` itself (its `__call__` is hooked).
    """
    if model.training and _reentrant_checkpointing(model):
        raise ValueError("collect: reentrant gradient checkpointing runs the forward without autograd, so the "
                         "statistics could not carry gradients; use model.gradient_checkpointing_enable("
                         "gradient_checkpointing_kwargs={'use_reentrant': False})")
    stats = Statistics()

    def add_keyword(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        stats.begin_forward()
        return args, {**kwargs, STATS_KWARG: stats}

    handle = model.register_forward_pre_hook(add_keyword, with_kwargs=True)
    try:
        yield stats
    finally:
        handle.remove()
