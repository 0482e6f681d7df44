"""Building and checking fused-attention problems for the kernel tests.

A `Case` describes one problem (shapes, flags, which outputs feed the loss); `check_case` runs a
backend on it (the Triton kernels with every output buffer poisoned, or the composed path) and
compares every output and gradient with the float64 reference under FlashAttention's rule (docs/math.md §5):
the backend's error may be at most twice that of plain PyTorch in its dtype, plus a small floor.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

import causalattn
from causalattn.reference import attention_chunked, attention_dense

FLOORS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
OUTPUT_NAMES = ("out", "lse", "mass", "xg")
GRAD_NAMES = ("dq", "dk", "dv", "d_adapter_keys", "d_adapter_values", "d_gate")


@dataclasses.dataclass
class Case:
    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 2
    seq_len: int = 100
    n_q: Optional[int] = None  # queries when fewer than keys (bottom-right causal)
    head_dim: int = 32
    causal: bool = True
    scale: Optional[float] = None  # None: 1 / sqrt(head_dim)
    dtype: torch.dtype = torch.float32
    adapter_len: int = 0  # 0: no adapter
    per_sample_adapter: bool = False
    gate: str = "head"  # "head", "scalar", "zero" or "sample" (per sample, segment and head)
    segments: Optional[tuple[int, ...]] = None  # adapter slot counts per segment (docs/math.md §7); None: one
    gate_mode: str = "tanh"
    padding: Optional[str] = None  # None, "lengths", "left"
    cu_seqlens: Optional[tuple[int, ...]] = None
    mask: Optional[str] = None  # CausalMask kind, see make_mask
    xg_tokens: int = 0
    xg_pool: str = "sample"
    use_out: bool = True  # the main loss; False checks the fold-ins alone
    use_lse: bool = False
    seed: int = 0

    def __str__(self) -> str:
        default = Case()
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != getattr(default, f.name)) or "default"


def make_mask(kind: str, batch: int, n: int, key_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
              gen: torch.Generator):
    """Supervision masks of several shapes: random densities, empty rows, full rows, a single cause,
    CAT-like rectangles, and rows whose causes straddle 32-bit word boundaries (bits 30-33, 63, 64)."""
    rows = torch.arange(n)
    if kind.startswith("random"):
        density = float(kind.split("-")[1])
        dense = torch.rand(batch, n, n, generator=gen) < density
        dense[:, ::5] = False  # some empty rows
    elif kind == "full":
        dense = torch.ones(batch, n, n, dtype=torch.bool)
    elif kind == "single":
        dense = torch.zeros(batch, n, n, dtype=torch.bool)
        dense[:, rows, (rows * 7) % (rows + 1)] = True
    elif kind == "rectangles":
        dense = torch.zeros(batch, n, n, dtype=torch.bool)
        for b in range(batch):
            for _ in range(4):
                r0 = int(torch.randint(2, n, (1,), generator=gen))
                c0 = int(torch.randint(0, r0 - 1, (1,), generator=gen))
                dense[b, r0 : r0 + 6, c0 : min(r0 - 1, c0 + 5)] = True
    elif kind == "word-edges":
        dense = torch.zeros(batch, n, n, dtype=torch.bool)
        for col in (0, 30, 31, 32, 33, 63, 64, 95, 96):
            if col < n:
                dense[:, col + 1 :, col] = True
    else:
        raise ValueError(kind)
    return causalattn.CausalMask.from_dense(dense, key_mask=key_mask, cu_seqlens=cu_seqlens)


def build_inputs(case: Case, device: str):
    """Leaf tensors (float64, CPU) and the keyword arguments of `causalattn.attention`."""
    gen = torch.Generator().manual_seed(case.seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    n_q = case.n_q or case.seq_len
    batch = case.batch if case.cu_seqlens is None else 1
    leaves = {
        "q": randn(batch, case.heads_q, n_q, case.head_dim),
        "k": randn(batch, case.heads_kv, case.seq_len, case.head_dim),
        "v": randn(batch, case.heads_kv, case.seq_len, case.head_dim),
    }
    kwargs = dict(causal=case.causal, scale=case.scale)
    key_mask = None
    if case.padding == "lengths":
        lengths = torch.tensor([case.seq_len - 3 * b for b in range(batch)][::-1])
        kwargs["key_lengths"] = lengths.to(device)
        key_mask = torch.arange(case.seq_len) < lengths[:, None]
    elif case.padding == "left":
        key_mask = torch.ones(batch, case.seq_len, dtype=torch.bool)
        for b in range(batch):
            key_mask[b, : 7 * b + 5] = False  # left padding: first rows see no key at all
        kwargs["key_mask"] = key_mask.to(device)
    if case.cu_seqlens is not None:
        kwargs["cu_seqlens"] = torch.tensor(case.cu_seqlens, dtype=torch.int32, device=device)
    if case.adapter_len:
        prefix = (batch,) if case.per_sample_adapter else ()
        leaves["adapter_keys"] = randn(*prefix, case.heads_kv, case.adapter_len, case.head_dim)
        leaves["adapter_values"] = randn(*prefix, case.heads_kv, case.adapter_len, case.head_dim)
        per_head = 1 if case.gate == "scalar" else case.heads_q
        if case.segments is None and case.gate != "sample":
            gate_shape = (per_head,) if per_head > 1 else ()
        else:
            segments = len(case.segments or (case.adapter_len,))
            gate_shape = (batch, segments, per_head) if case.gate == "sample" else (segments, per_head)
        leaves["gate"] = torch.zeros(gate_shape, dtype=torch.float64) if case.gate == "zero" else randn(*gate_shape)
        kwargs["xg_tokens"] = case.xg_tokens
        kwargs["xg_pool"] = case.xg_pool
    if case.mask is not None:
        packing = torch.tensor(case.cu_seqlens) if case.cu_seqlens is not None else None
        kwargs["supervision"] = make_mask(case.mask, batch, case.seq_len, key_mask, packing, gen).to(device)
    upstream = {
        "out": randn(batch, case.heads_q, n_q, case.head_dim),
        "lse": randn(batch, case.heads_q, n_q),
        "mass": randn(batch, case.heads_q, n_q),
    }
    return leaves, kwargs, upstream


def run_attention(fn, leaves, kwargs, upstream, case: Case, dtype, device):
    """Outputs and gradients (float64, CPU) of a loss that uses what the case asks for."""
    inputs = {name: t.detach().to(device=device, dtype=dtype).requires_grad_() for name, t in leaves.items()}
    adapter = None
    if "adapter_keys" in inputs:
        adapter = causalattn.Adapter(inputs["adapter_keys"], inputs["adapter_values"], inputs["gate"], case.gate_mode,
                                     case.segments)
    result = fn(inputs["q"], inputs["k"], inputs["v"], adapter=adapter, **kwargs)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    if case.use_out:
        loss = loss + (result.out.double() * upstream["out"].to(device)).sum()
    if case.use_lse:
        finite_lse = torch.where(torch.isinf(result.lse), 0.0, result.lse.double())
        loss = loss + (finite_lse * upstream["lse"].to(device)).sum()
    if result.mass is not None:
        loss = loss + (result.mass.double() * upstream["mass"].to(device)).sum()
    if result.xg is not None:
        loss = loss + 3.0 * (result.xg.double() ** 2).sum()
    loss.backward()
    outputs = [getattr(result, name) for name in OUTPUT_NAMES]
    grads = [inputs[name].grad if name in inputs else None
             for name in ("q", "k", "v", "adapter_keys", "adapter_values", "gate")]
    return [t.detach().double().cpu() if t is not None else None for t in outputs + grads]


def poisoned_allocations(monkeypatch) -> None:
    """Make every buffer the launchers allocate start as NaN (ints as -1), so an element a kernel
    forgets to write shows up in the comparison."""
    from causalattn.kernels import attention_bwd, attention_fwd

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def _poison(t):
            return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-1)

        def empty(self, *args, **kwargs):
            return self._poison(torch.empty(*args, **kwargs))

        def empty_like(self, *args, **kwargs):
            return self._poison(torch.empty_like(*args, **kwargs))

    for module in (attention_fwd, attention_bwd):
        monkeypatch.setattr(module, "torch", PoisonedTorch())


def check_case(case: Case, device: str = "cpu", backend: str = "triton") -> dict[str, float]:
    """Compare a backend of `causalattn.attention` with the float64 reference; returns the worst error
    ratio seen (error / allowed) per output and gradient. Raises AssertionError on a violation."""
    leaves, kwargs, upstream = build_inputs(case, device)
    fused = run_attention(lambda *a, **k: causalattn.attention(*a, backend=backend, **k),
                          leaves, kwargs, upstream, case, case.dtype, device)
    # Past 1k tokens the dense reference's N x N float64 tensors outgrow a GPU (17 GB per score tensor
    # at N = 8k, 32 heads); the chunked reference computes the same values (tested against the dense).
    reference = attention_dense if case.seq_len <= 1024 else attention_chunked
    truth = run_attention(reference, leaves, kwargs, upstream, case, torch.float64, device)
    plain = run_attention(lambda *a, **k: reference(*a, upcast=False, **k),
                          leaves, kwargs, upstream, case, case.dtype, device)
    ratios = {}
    for name, got, want, baseline in zip(OUTPUT_NAMES + GRAD_NAMES, fused, truth, plain):
        if want is None and got is None:
            continue
        if want is None:  # an input the loss does not reach: autograd leaves None, the kernel zeros
            want = baseline = torch.zeros_like(got)
        assert got is not None and got.shape == want.shape, f"{name}: shape {None if got is None else got.shape} != {want.shape}"
        infinite = torch.isinf(want)
        assert torch.equal(torch.isinf(got), infinite), f"{name}: +inf rows differ"
        got, want, baseline = (torch.where(infinite, 0.0, t) for t in (got, want, baseline))
        assert not torch.isnan(got).any(), f"{name}: NaN (an element left unwritten?)"
        scale = max(1.0, want.abs().max().item())
        error = (got - want).abs().max().item()
        allowed = 2 * (baseline - want).abs().max().item() + FLOORS[case.dtype] * scale
        ratios[name] = error / allowed
        assert error <= allowed, f"{name}: max error {error:.3e} > allowed {allowed:.3e} ({case})"
    return ratios
