"""The causal-training losses, in plain PyTorch on the attention op's small statistics.

The kernels never know which loss is used: they return the CAT mass `m` and the XG statistic, and
autograd brings `dL/dm`, `dL/dxg` back into their backward pass (docs/math.md §2-§4).

Shapes
------
cat_loss     mass: (B, Hq, N) of one layer, or a sequence of them / (L, B, Hq, N) for L layers;
             heads="mean" scores the layer/head-mean mass (B, N), heads="each" every (layer, head) mass
xg_variance  xg:   (B, Hq, d) pooled or (B, Hq, N, d) per position, one per layer (or a sequence)
             o_proj_weight: (C, Hq * d), one for all layers or one per layer
mutual_information  invariant, domain: (B, F) read-outs at label rows (ICLM, docs/math.md §7)
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from causalattn.masks import CausalMask

CAT_LOSS_KINDS = ("div", "div2", "nll", "hinge", "mass")
# How the per-head masses meet the row loss: "mean" (CAT's) takes the loss of the layer/head-mean mass, so one
# head may keep its attention elsewhere at little cost; "each" averages the loss of every (layer, head) mass,
# so every head must attend to the causes (-log is convex: "each" >= "mean" for kind="mass").
CAT_HEAD_REDUCTIONS = ("mean", "each")
MI_KINDS = ("code", "textbook")
XG_SPACES = ("output", "head")

TensorOrLayers = Union[Tensor, Sequence[Tensor]]


def _stack_layers(value: TensorOrLayers, per_layer_dims: int, name: str) -> Tensor:
    """(L, ...) from one layer's tensor, a list of them, or an already stacked tensor."""
    if isinstance(value, Tensor):
        if value.dim() == per_layer_dims:
            return value.unsqueeze(0)
        if value.dim() == per_layer_dims + 1:
            return value
        raise ValueError(f"{name}: expected {per_layer_dims} dims (one layer) or {per_layer_dims + 1} (stacked layers), "
                         f"got shape {tuple(value.shape)}")
    layers = list(value)
    if not layers:
        raise ValueError(f"{name}: expected at least one layer, got an empty sequence")
    shapes = {tuple(t.shape) for t in layers}
    if len(shapes) != 1 or layers[0].dim() != per_layer_dims:
        raise ValueError(f"{name}: expected layers of one {per_layer_dims}-dim shape, got shapes {sorted(shapes)}")
    return torch.stack(layers)


def _check_mask(mask: object) -> CausalMask:
    if not isinstance(mask, CausalMask):
        raise TypeError(f"mask: expected a causalattn.CausalMask, got {type(mask).__name__}")
    return mask


def _check_mass(mass: Tensor, name: str) -> None:
    """Raise when a mass is NaN or outside [0, 1] by more than rounding: such a row would otherwise be
    dropped (NaN compares false) or cost 0, and the loss would look fine. Eager: a ValueError after one
    host sync; under torch.compile: an asynchronous assert (RuntimeError, same message start)."""
    if not isinstance(mass, Tensor) or not mass.dtype.is_floating_point:
        got = mass.dtype if isinstance(mass, Tensor) else type(mass).__name__
        raise TypeError(f"{name}: expected a floating tensor of attention masses, got {got}")
    # A mass is a sum of probabilities: 1e-3 is far above its fp32 rounding; 4 eps covers fp16/bf16 masses.
    slack = max(1e-3, 4 * torch.finfo(mass.dtype).eps)
    inside = (mass >= -slack) & (mass <= 1 + slack)  # False for NaN
    if torch.compiler.is_compiling():  # a host check would break the graph
        torch._assert_async(inside.all(), f"{name}: expected attention masses in [0, 1], got NaN or a value outside")
        return
    if not bool(inside.all()):
        bad = mass.detach()[~inside]
        raise ValueError(f"{name}: expected attention masses in [0, 1], got {bad.numel()} value(s) outside "
                         f"(e.g. {bad[0].item()}); NaN comes from NaN/inf attention inputs")


def cat_row_losses(mean_mass: Tensor, mask: CausalMask, *, alpha: float = 2.0, kind: str = "div") -> tuple[Tensor, Tensor]:
    """Per-row CAT loss `l_i` (..., B, N) and the valid-row mask (B, N) for the layer/head-mean mass (B, N)
    (docs/math.md §2), or for any stack of masses (..., B, N) scored one by one.

    a1 = m / n1 is the mean attention on a cause, a0 = (1 - m) / n0 on a visible non-cause. Rows where
    a1 / a0 >= alpha already attend enough and cost 0. `kind="mass"` is not CAT's: l = -log m on every
    valid row (no alpha cut-off), so it keeps pulling until all the row's attention is on the causes.
    """
    _check_mask(mask)
    _check_mass(mean_mass, "mean_mass")
    if kind not in CAT_LOSS_KINDS:
        raise ValueError(f"kind: expected one of {CAT_LOSS_KINDS}, got {kind!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha: expected a positive finite number, got {alpha!r}")
    n1 = mask.cause_count.to(mean_mass.dtype)
    n0 = mask.non_cause_count.to(mean_mass.dtype)
    valid = mask.valid_rows()
    if kind == "mass":
        # m > 0 wherever a cause is visible; the floor only keeps invalid rows (m = 0) finite.
        safe = torch.where(valid, mean_mass, torch.ones_like(mean_mass))
        row = -torch.log(safe.clamp_min(torch.finfo(safe.dtype).tiny))
        return torch.where(valid, row, torch.zeros_like(row)), valid
    a1 = mean_mass / n1.clamp_min(1)
    a0 = (1 - mean_mass) / n0.clamp_min(1)
    active = valid & (a1 < alpha * a0)
    # Inactive rows must not put inf/NaN into the graph: evaluate the loss on harmless stand-ins.
    a1 = torch.where(active, a1, torch.ones_like(a1))
    a0 = torch.where(active, a0, torch.ones_like(a0))
    if kind == "div":
        row = -torch.log1p(a1) / torch.log1p(a0)
    elif kind == "div2":
        row = -torch.log1p(a1 / (1 + a0))
    elif kind == "nll":
        row = -a1 / (a1 + a0)
    else:
        row = alpha - a1 / a0
    return torch.where(active, row, torch.zeros_like(row)), valid


def cat_loss(mass: TensorOrLayers, mask: CausalMask, *, alpha: float = 2.0, kind: str = "div",
             heads: str = "mean") -> Tensor:
    """CAT Re-Attention loss: mean over valid rows of the micro-batch of the per-row loss of the mass
    averaged over all layers and query heads (docs/math.md §2), or with `heads="each"` of the per-row loss
    of every layer's every head, averaged. A scalar; 0 (still differentiable) when no row is valid."""
    _check_mask(mask)
    if heads not in CAT_HEAD_REDUCTIONS:
        raise ValueError(f"heads: expected one of {CAT_HEAD_REDUCTIONS}, got {heads!r}")
    stacked = _stack_layers(mass, 3, "mass")
    _check_mass(stacked, "mass")
    if stacked.shape[1] != mask.batch_size or stacked.shape[3] != mask.seq_len:
        raise ValueError(f"mass: expected (B={mask.batch_size}, Hq, N={mask.seq_len}) per layer to match the mask, "
                         f"got {tuple(stacked.shape[1:])}")
    if stacked.device != mask.device:
        raise ValueError(f"mask: expected device {stacked.device} (where mass is), got {mask.device}")
    stacked = stacked.to(torch.promote_types(stacked.dtype, torch.float32))
    if heads == "mean":
        rows, valid = cat_row_losses(stacked.mean(dim=(0, 2)), mask, alpha=alpha, kind=kind)
    else:  # (L, B, Hq, N) -> (L * Hq, B, N): one stack entry per (layer, head), each row scored alone
        per_head = stacked.transpose(1, 2).flatten(0, 1)
        rows, valid = cat_row_losses(per_head, mask, alpha=alpha, kind=kind)
        rows = rows.mean(dim=0)
    return rows.sum() / valid.sum().clamp_min(1)


def xg_variance(
    xg: TensorOrLayers,
    o_proj_weight: Optional[TensorOrLayers] = None,
    *,
    space: str = "output",
) -> Tensor:
    """DCA's XG variance R: the unbiased variance over the micro-batch of what each sample reads from
    the XG adapter tokens, averaged over features (and positions) and layers (docs/math.md §3).

    `space="output"` maps concat_h(xg) through each layer's `o_proj` weight (C, Hq*d) first (the
    official choice); `space="head"` uses the head-space vectors as they are. With one sample the
    variance is undefined: R = 0 (differentiable) and a warning.
    """
    if space not in XG_SPACES:
        raise ValueError(f"space: expected one of {XG_SPACES}, got {space!r}")
    layers = [xg] if isinstance(xg, Tensor) and xg.dim() in (3, 4) else list(xg)
    if not layers:
        raise ValueError("xg: expected at least one layer, got an empty sequence")
    if any(t.dim() not in (3, 4) for t in layers):
        raise ValueError(f"xg: expected (B, Hq, d) or (B, Hq, N, d) per layer, got shapes {[tuple(t.shape) for t in layers]}")
    if space == "output":
        if o_proj_weight is None:
            raise ValueError("o_proj_weight: space='output' needs each layer's o_proj weight (C, Hq*d); got None")
        weights = [o_proj_weight] * len(layers) if isinstance(o_proj_weight, Tensor) else list(o_proj_weight)
        if len(weights) != len(layers):
            raise ValueError(f"o_proj_weight: expected one weight or one per layer ({len(layers)}), got {len(weights)}")
    batch = layers[0].shape[0]
    if batch < 2:
        warnings.warn("xg_variance: a micro-batch of one sample has no variance; returning 0", stacklevel=2)
        return sum(t.sum() for t in layers) * 0.0
    per_layer = []
    for index, stat in enumerate(layers):
        heads_last = stat.movedim(1, -2) if stat.dim() == 4 else stat  # (B, N, Hq, d) or (B, Hq, d)
        features = heads_last.flatten(-2)  # concat over heads: (B, [N,] Hq*d)
        if space == "output":
            weight = weights[index]
            if weight.dim() != 2 or weight.shape[1] != features.shape[-1]:
                raise ValueError(f"o_proj_weight[{index}]: expected (C, {features.shape[-1]}), got {tuple(weight.shape)}")
            features = features @ weight.to(features.dtype).t()
        per_layer.append(features.var(dim=0, unbiased=True).mean())
    return torch.stack(per_layer).mean()


def cat_amp(epoch: float, rate: float = 1.0) -> float:
    """Weight of the CAT loss at `epoch`: exp(-rate * epoch) (the official loss_decay_rate = 1)."""
    if rate < 0:
        raise ValueError(f"rate: expected a non-negative decay rate, got {rate}")
    return math.exp(-rate * epoch)


def mutual_information(invariant: Tensor, domain: Tensor, *, kind: str = "code") -> Tensor:
    """ICLM's MI term between the invariant and the domain read-outs at label rows (docs/math.md §7).

    Each row (B, F) is softmaxed into a categorical over the F features; P_X, P_Y are the batch means and
    P_XY the mean outer product, formed as one (F, B) @ (B, F) matmul (never a (B, F, F) tensor).
    kind "code": the official `KLDivLoss(log P_XY, log P_X P_Y, log_target=True).sum()`, i.e.
    sum P_X P_Y (log P_X P_Y - log P_XY) = KL(P_X P_Y || P_XY); "textbook": KL(P_XY || P_X P_Y), the
    mutual information itself. Both are >= 0 and 0 when the two read-outs are independent over the batch.
    """
    if kind not in MI_KINDS:
        raise ValueError(f"kind: expected one of {MI_KINDS}, got {kind!r}")
    if invariant.dim() != 2 or invariant.shape != domain.shape:
        raise ValueError(f"invariant, domain: expected two (B, F) read-outs of one shape, got "
                         f"{tuple(invariant.shape)} and {tuple(domain.shape)}")
    # the F x F joint of fp16/bf16 read-outs has entries near 1 / F^2: take the logs in at least fp32
    dtype = torch.promote_types(invariant.dtype, torch.float32)
    p_u = torch.softmax(invariant.to(dtype), dim=-1)
    p_w = torch.softmax(domain.to(dtype), dim=-1)
    joint = p_u.transpose(0, 1) @ p_w / p_u.shape[0]                     # (F, F) P_XY
    product = p_u.mean(dim=0)[:, None] * p_w.mean(dim=0)[None, :]        # (F, F) P_X P_Y
    log_joint, log_product = joint.log(), product.log()
    if kind == "code":
        return (product * (log_product - log_joint)).sum()
    return (joint * (log_joint - log_product)).sum()
