"""The ICLM router: which domain prompt each sample reads (docs/math.md §7, arXiv 2402.02636).

    router = Router(hidden_size=C, domains=K, mode="vq")
    route = router(hidden, token_mask)            # hidden (B, N, C) adapter-free, token_mask (B, N)
    route.weights (B, K), route.index (B,), route.vq_loss (), route.distances (B, K)

The router reads the model's own hidden states below the first adapted layer, so it needs no second
model and no second forward (the official code runs a whole LM copy as the router). Every mode
projects each valid token with `Linear(C -> code_dim)` + `BatchNorm1d` (the official layers, code_dim 64)
and measures its squared L2 distance to K codewords; a sample's distance to codeword k is the sum over
its valid tokens (padding excluded, also from the batch-norm statistics).

    "vq"      ICLM exactly: one-hot of the argmin, no gradient through the route; the projection and the
              codebook learn only from the VQ loss 0.25 * ||sg(e_r) - z||^2 + ||e_r - sg(z)||^2
    "vq-ste"  the same one-hot forward; the gradient flows through softmax(-distance) (straight through)
    "soft"    weights softmax(-distance): every domain prompt read, weighted; VQ loss as for "vq"
    "oracle"  the given domain ids, one-hot; no router parameters are used and the VQ loss is 0

The softmax of "vq-ste"/"soft" takes the per-token mean distance rather than the sum: the argmin is the
same, and a sum over ~100 tokens of 64-dim distances makes the softmax one-hot and its gradient vanish.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from causalattn.inputs import Adapter, is_int, is_integer_dtype
from causalattn.validation import check_segment_inputs

ROUTE_MODES = ("vq", "vq-ste", "soft", "oracle")
HARD_ROUTES = ("vq", "oracle")  # each sample reads only its chosen domain prompt: no gradient needs the others
DEFAULT_CODE_DIM = 64       # the official router's Linear(H -> 64)
COMMITMENT = 0.25           # the official VQ loss: 0.25 * commitment + codebook MSE


@dataclass(frozen=True)
class Route:
    """One forward's routing: weights (B, K) (one-hot for hard modes), index (B,) the chosen domain,
    vq_loss () and distances (B, K) summed over each sample's valid tokens (zeros for "oracle")."""


    weights: Tensor
    index: Tensor
    vq_loss: Tensor
    distances: Tensor
    hard: bool  # each sample reads only its chosen domain prompt ("vq", "oracle"): no gradient needs the others


class Router(nn.Module):
    """Chooses a domain per sample from adapter-free hidden states; see the module docstring."""

    def __init__(self, hidden_size: int, domains: int, *, mode: str = "vq", code_dim: int = DEFAULT_CODE_DIM,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if mode not in ROUTE_MODES:
            raise ValueError(f"mode: expected one of {ROUTE_MODES}, got {mode!r}")
        if not is_int(hidden_size) or hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int (the width C of the hidden states), "
                             f"got {hidden_size!r}")
        if not is_int(domains) or domains < 2:
            raise ValueError(f"domains: expected an int >= 2 (K domain prompts to choose from), got {domains!r}")
        if not is_int(code_dim) or code_dim < 1:
            raise ValueError(f"code_dim: expected a positive int, got {code_dim!r}")
        self.mode, self.domains = mode, domains
        self.project = nn.Linear(hidden_size, code_dim, device=device, dtype=dtype)
        self.norm = nn.BatchNorm1d(code_dim, device=device, dtype=dtype)
        # VQ-VAE's codebook init U(-1/K, 1/K): the codewords start near the batch-normed tokens' mean
        self.codebook = nn.Parameter(torch.empty(domains, code_dim, device=device, dtype=dtype).uniform_(
            -1.0 / domains, 1.0 / domains))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, domains={self.domains}"

    def forward(self, hidden: Tensor, token_mask: Optional[Tensor] = None,
                domain_ids: Optional[Tensor] = None) -> Route:
        """Route a batch: hidden (B, N, C), token_mask (B, N) bool (True = a real token; None = all),
        domain_ids (B,) int, required by "oracle" and ignored otherwise."""
        if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
            raise TypeError(f"hidden: expected a floating-point torch.Tensor, got "
                            f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
        width = self.project.in_features
        if hidden.dim() != 3 or hidden.shape[-1] != width:
            raise ValueError(f"hidden: expected (B, N, {width}) hidden states (the router was built for width "
                             f"{width}), got shape {tuple(hidden.shape)}")
        batch, length, _ = hidden.shape
        if token_mask is None:
            token_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        if token_mask.shape != (batch, length):
            raise ValueError(f"token_mask: expected shape {(batch, length)}, got {tuple(token_mask.shape)}")
        if self.mode == "oracle":
            return self._oracle(domain_ids, batch, hidden.device)
        token_mask = token_mask.bool()
        real = token_mask.sum(dim=1).tolist()  # one device sync for both checks
        if not all(count >= 1 for count in real):
            raise ValueError("token_mask: every sample needs at least one real token to be routed")
        if self.training and sum(real) < 2:
            raise ValueError("token_mask: in training the router's batch norm takes its statistics over the batch's "
                             "real tokens and needs at least 2, got 1 (a bigger batch, or router.eval())")
        # in the router's own dtype (fp32 master weights) even under bf16 autocast: the argmin compares
        # sums of ~100 distances, where bf16's 3 significant digits would decide near-ties
        with torch.autocast(hidden.device.type, enabled=False):
            return self._route(hidden, token_mask)

    def _route(self, hidden: Tensor, token_mask: Tensor) -> Route:
        batch, length, _ = hidden.shape
        rows = token_mask.flatten().nonzero().squeeze(1)  # valid tokens only, batch-norm included
        owner = rows // length                           # (T,) the sample of each valid token
        z = self.norm(self.project(hidden.reshape(batch * length, -1)[rows].to(self.project.weight.dtype)))
        # (T, K) from the differences: cdist's matmul form loses digits and its sqrt has no gradient at 0;
        # T x K x code_dim is small (1,600 tokens x 6 x 64 = 0.6 M values)
        token_distances = (z[:, None, :] - self.codebook[None]).square().sum(-1)
        distances = torch.zeros(batch, self.domains, dtype=z.dtype, device=z.device).index_add(0, owner, token_distances)
        index = distances.argmin(dim=1)
        chosen = self.codebook[index[owner]]              # (T, code_dim) the chosen codeword of each token
        vq_loss = COMMITMENT * F.mse_loss(z, chosen.detach()) + F.mse_loss(chosen, z.detach())
        one_hot = F.one_hot(index, self.domains).to(z.dtype)
        if self.mode == "vq":
            weights = one_hot
        else:
            counts = token_mask.sum(dim=1, keepdim=True).to(z.dtype)
            soft = torch.softmax(-distances / counts, dim=1)
            weights = soft if self.mode == "soft" else one_hot + (soft - soft.detach())  # exactly one-hot forward
        return Route(weights, index, vq_loss, distances, hard=self.mode in HARD_ROUTES)

    def _oracle(self, domain_ids: Optional[Tensor], batch: int, device: torch.device) -> Route:
        if domain_ids is None:
            raise ValueError('domain_ids: route mode "oracle" needs the (B,) domain id of every sample, got None')
        ids = torch.as_tensor(domain_ids, device=device)
        if not is_integer_dtype(ids.dtype):
            raise TypeError(f"domain_ids: expected integer domain ids, got {ids.dtype} (a float id would be "
                            f"truncated)")
        ids = ids.long().reshape(-1)
        if ids.shape != (batch,) or bool(((ids < 0) | (ids >= self.domains)).any()):
            raise ValueError(f"domain_ids: expected {batch} ids in [0, {self.domains}), got {ids.tolist()}")
        dtype = self.codebook.dtype
        return Route(F.one_hot(ids, self.domains).to(dtype), ids, torch.zeros((), dtype=dtype, device=device),
                     torch.zeros(batch, self.domains, dtype=dtype, device=device), hard=True)


def route_distribution(index: Tensor, domains: int) -> list[float]:
    """Fraction of samples routed to each of `domains` domains."""
    counts = torch.bincount(index.reshape(-1).long().cpu(), minlength=domains).double()
    return (counts / counts.sum().clamp_min(1)).tolist()


def normalized_mutual_information(route: Tensor, truth: Tensor) -> float:
    """NMI between two labelings of the same samples, I(R; D) / sqrt(H(R) H(D)) (1 = the route is the
    domain up to a renaming, 0 = independent); 1.0 when both are constant, 0.0 when one only is."""
    route, truth = route.reshape(-1).long().cpu(), truth.reshape(-1).long().cpu()
    if route.shape != truth.shape:
        raise ValueError(f"truth: expected {route.numel()} labels like route, got {truth.numel()}")
    _, r = torch.unique(route, return_inverse=True)
    _, t = torch.unique(truth, return_inverse=True)
    joint = torch.zeros(int(r.max()) + 1, int(t.max()) + 1, dtype=torch.float64)
    joint.index_put_((r, t), torch.ones(r.numel(), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    p_r, p_t = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint[nonzero] / (p_r[:, None] * p_t[None, :])[nonzero]).log()).sum()
    h_r, h_t = -(p_r * p_r.log()).sum(), -(p_t * p_t.log()).sum()
    if h_r == 0 or h_t == 0:
        return 1.0 if h_r == h_t else 0.0
    return float(mutual / (h_r * h_t).sqrt())


def segment_outputs(q: Tensor, adapter: Adapter, scale: Optional[float] = None) -> Tensor:
    """(B, S, Hq, R, d) what each adapter segment adds to the output of the query rows `q`
    (B, Hq, R, d): gamma_s softmax_s(scale q Ka_s^T) Va_s, in q's dtype, differentiable.

    The read-outs the ICLM mutual-information term compares (docs/math.md §7), for a few rows (the label
    positions) gathered by the caller: an R x M problem beside the fused pass, never N x N. The arguments
    are checked as `causalattn.attention` checks them (`causalattn.validation.check_segment_inputs`).
    """
    check_segment_inputs(q, adapter, scale)
    batch, heads_q, rows, head_dim = q.shape
    heads_kv = adapter.keys.shape[-3]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    keys = adapter.keys if adapter.keys.dim() == 4 else adapter.keys.unsqueeze(0)
    values = adapter.values if adapter.values.dim() == 4 else adapter.values.unsqueeze(0)
    grouped = q.unflatten(1, (heads_kv, heads_q // heads_kv))  # (B, Hkv, G, R, d)
    scores = grouped @ keys.unsqueeze(2).transpose(-1, -2) * scale
    gammas = adapter.gammas(heads_q).to(q.dtype)  # (1 or B, S, Hq)
    outputs = []
    for index, (start, end) in enumerate(adapter.segment_bounds()):
        read = torch.softmax(scores[..., start:end], dim=-1) @ values[:, :, start:end].unsqueeze(2)
        outputs.append(gammas[:, index, :, None, None] * read.flatten(1, 2))
    return torch.stack(outputs, dim=1)
