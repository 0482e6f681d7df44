"""What the benchmark compares: problems (random inputs of one shape) and providers (ways to compute them).

A `Provider` turns a `Problem` into a forward function returning `(out, extra_loss)`: `out` is the
(B, Hq, N, d) attention output the harness backpropagates `Problem.dout` through, `extra_loss` the
scalar of the causal-training losses when the provider computes CAT mass or the XG statistic (None
otherwise). Each provider declares the features it computes, out of:

    adapter  zero-init gated adapter attention over M prompt tokens (docs/math.md §1)
    cat      CAT attention mass on the cause tokens + `cat_loss` (docs/math.md §2)
    xg       the pooled XG read-out + `xg_variance` (docs/math.md §3; reads the adapter, so implies it)

Every case is causal self-attention (Nq = Nk), q/k/v in (B, H, N, d), GQA with Hq = G * Hkv.
A provider that cannot run on the device or shape raises `Unsupported` from its builder; the
harness records that as a row, as it does out-of-memory and other errors.

Providers
---------
causalattn[+adapter|+cat|+xg|+all]  the fused op (backend "triton" on CUDA, "reference" on CPU)
composed[+adapter|+cat|+xg|+all]    the composed backend on every device: the vendor attention
                                    kernel + adapter/XG over N x M + CAT mass on the supervised rows
native[+adapter|+cat|+all]          the fused C++ CPU kernel (causalattn.native)
sdpa-{flash,efficient,cudnn,math}   plain SDPA pinned to one backend with `sdpa_kernel`
sdpa+adapter-sdpa                   SDPA + a second SDPA call over the M adapter keys, gated, added
sdpa+adapter-peft                   SDPA + PEFT AdaptionPrompt's adapter math (scalar raw gate)
eager+cat, eager+all                CAT's way: the (B, Hq, N, N) attention maps materialised as
                                    `output_attentions` returns them, mass = (maps * A).sum(-1)
flex                                compiled FlexAttention, causal block mask (CUDA only)
flex2pass+cat, flex2pass+all        mass = exp(LSE over causes - LSE over all visible keys) from two
                                    FlexAttention passes with the LSE returned (CUDA only)
flash-attn                          flash_attn.flash_attn_func when importable (CUDA only)
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import causalattn
from causalattn import Adapter, CausalMask

FEATURES = ("adapter", "cat", "xg")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Packed CAT-style documents in every sequence: each one ends with an effect span whose prediction
# rows attend to three cause spans earlier in the same document (the mask is sparse, as in CAT data).
DOCUMENT_LEN = 256
EFFECT_LEN = 8
CAUSE_SPANS = ((4, 8), (40, 44), (100, 106))
CAT_DOCUMENT_DENSITY = EFFECT_LEN / DOCUMENT_LEN  # 3.1 % of the rows have causes
# Other densities of supervised rows (the dispatch sweep): rows spread evenly over the sequence, each
# with three cause spans behind it at these distances (start, end), clipped to the row's past.
SPREAD_CAUSE_OFFSETS = ((200, 194), (100, 96), (24, 18))


class Unsupported(Exception):
    """The provider cannot run this case (device, shape, missing package); the message says why."""


@dataclass(frozen=True)
class Shape:
    """One attention problem size. `dtype` is a key of DTYPES."""

    batch: int
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    adapter_len: int
    xg_tokens: int
    dtype: str
    supervised: float = CAT_DOCUMENT_DENSITY  # fraction of query rows with causes in the CAT mask

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    def label(self) -> str:
        density = "" if self.supervised == CAT_DOCUMENT_DENSITY else f" rows={self.supervised:.1%}"
        return (f"B={self.batch} N={self.seq_len} Hq={self.heads_q} Hkv={self.heads_kv} d={self.head_dim} "
                f"M={self.adapter_len} {self.dtype}{density}")


@dataclass
class Problem:
    """Random inputs of one shape on one device; every tensor a provider differentiates is a leaf."""

    shape: Shape
    device: torch.device
    q: Tensor  # (B, Hq, N, d)
    k: Tensor  # (B, Hkv, N, d)
    v: Tensor
    dout: Tensor  # upstream gradient of the attention output
    adapter_keys: Tensor  # (Hkv, M, d): the layer's frozen k_proj of the prompt
    adapter_values: Tensor
    gate: Tensor  # (Hq,) fp32, LLaMA-Adapter's per-head gate, gamma = tanh(gate)
    gate_scalar: Tensor  # (1,) PEFT's raw scalar gate in the model dtype
    mask: CausalMask

    def leaves(self) -> list[Tensor]:
        return [self.q, self.k, self.v, self.adapter_keys, self.adapter_values, self.gate, self.gate_scalar]


def cat_style_spans(batch: int, seq_len: int) -> list:
    """`CausalMask.from_spans` input: every sample packs N // DOCUMENT_LEN documents, each closing
    with an effect span caused by the CAUSE_SPANS earlier in the same document."""
    pairs = []
    for start in range(0, seq_len - DOCUMENT_LEN + 1, DOCUMENT_LEN):
        end = start + DOCUMENT_LEN
        pairs.append(((end - EFFECT_LEN, end), [(start + a, start + b) for a, b in CAUSE_SPANS]))
    return [pairs] * batch


def spread_rows_mask(batch: int, seq_len: int, fraction: float) -> CausalMask:
    """A mask with round(fraction * N) supervised rows spread evenly over rows >= 32, each caused by
    the SPREAD_CAUSE_OFFSETS spans behind it; the words are written directly (no dense N x N)."""
    count = max(1, min(seq_len - 32, round(fraction * seq_len)))
    rows = torch.linspace(32, seq_len - 1, count).round().long().unique()
    offsets = torch.cat([torch.arange(-start, -end) for start, end in SPREAD_CAUSE_OFFSETS])
    cols = rows[:, None] + offsets  # (R, C) distinct columns per row; negative ones are dropped
    row_index = rows[:, None].expand_as(cols)[cols >= 0]
    cols = cols[cols >= 0]
    words = torch.zeros(seq_len, (seq_len + 31) // 32, dtype=torch.int64)
    # Distinct bits of one word: their sum is their OR.
    words.index_put_((row_index, cols // 32), torch.ones_like(cols) << (cols % 32), accumulate=True)
    bits = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return CausalMask(bits[None].expand(batch, -1, -1).contiguous(), seq_len)


@functools.lru_cache(maxsize=2)
def _cause_mask_cpu(batch: int, seq_len: int, supervised: float) -> CausalMask:
    """Built once per (B, N, density) on the CPU: from_spans takes ~1 s at N = 16k and the mask is the same data."""
    if supervised == CAT_DOCUMENT_DENSITY:
        return CausalMask.from_spans(cat_style_spans(batch, seq_len), seq_len)
    return spread_rows_mask(batch, seq_len, supervised)


def make_problem(shape: Shape, device: torch.device, seed: int = 0) -> Problem:
    """Random bf16/fp16/fp32 inputs for `shape` on `device` (never zeros: the gate is nonzero too)."""
    if shape.heads_q % shape.heads_kv:
        raise ValueError(f"shape: heads_kv ({shape.heads_kv}) must divide heads_q ({shape.heads_q})")
    dtype = DTYPES[shape.dtype]
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0, dtype: torch.dtype = dtype, leaf: bool = True) -> Tensor:
        values = (torch.randn(*size, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)
        return values.requires_grad_(leaf)

    b, n, d = shape.batch, shape.seq_len, shape.head_dim
    return Problem(
        shape=shape, device=device,
        q=randn(b, shape.heads_q, n, d), k=randn(b, shape.heads_kv, n, d), v=randn(b, shape.heads_kv, n, d),
        dout=randn(b, shape.heads_q, n, d, leaf=False),
        adapter_keys=randn(shape.heads_kv, shape.adapter_len, d),
        adapter_values=randn(shape.heads_kv, shape.adapter_len, d),
        gate=randn(shape.heads_q, scale=0.5, dtype=torch.float32), gate_scalar=randn(1, scale=0.5),
        mask=_cause_mask_cpu(b, n, shape.supervised).to(device),
    )


# ---------------------------------------------------------------------------------- building blocks
ForwardResult = tuple[Tensor, Optional[Tensor]]


class Built(NamedTuple):
    forward: Callable[[], ForwardResult]
    note: str = ""  # how the provider ran (backend, GQA handling), recorded with the row


@dataclass(frozen=True)
class Provider:
    name: str
    features: frozenset[str]
    build: Callable[[Problem], Built]
    # Lower runs first, over all shapes: when a sweep's time budget runs out, the baselines that
    # materialise N x N (priority 1) or compile for every shape (2) are left out, not the fused op
    # or SDPA at the largest N.
    priority: int = 0

    @property
    def feature_label(self) -> str:
        return "+".join(f for f in FEATURES if f in self.features) or "none"


def feature_losses(mass: Optional[Tensor], xg: Optional[Tensor], mask: CausalMask) -> Optional[Tensor]:
    """cat_loss(mass) + xg_variance(xg) (head space: the benchmark measures attention, not o_proj)."""
    loss = None
    if mass is not None:
        loss = causalattn.cat_loss(mass, mask)
    if xg is not None:
        with warnings.catch_warnings():
            # B = 1 (N = 16k at 16k tokens) has no batch variance; the kernel work is the same.
            warnings.filterwarnings("ignore", message="xg_variance: a micro-batch of one sample")
            variance = causalattn.xg_variance(xg, space="head")
        loss = variance if loss is None else loss + variance
    return loss


def repeat_kv(x: Tensor, group: int) -> Tensor:
    """(B, Hkv, N, d) -> (B, Hkv * group, N, d), each KV head repeated for its query heads (HF's repeat_kv)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def adapter_branch(q: Tensor, keys: Tensor, values: Tensor, gamma: Tensor,
                   xg_tokens: int) -> tuple[Tensor, Optional[Tensor]]:
    """The adapter attention written out as PEFT's AdaptionPrompt does it: adapter K/V repeated per
    query head, scores = q Ka^T / sqrt(d), softmax in fp32 cast back, times the gate, times Va.
    Returns (gated adapter output (B, Hq, N, d), pooled XG read-out (B, Hq, d) fp32 or None)."""
    group = q.shape[1] // keys.shape[0]
    ka = keys.repeat_interleave(group, dim=0)
    va = values.repeat_interleave(group, dim=0)
    scores = q @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1])
    gated = gamma.to(q.dtype).view(1, -1, 1, 1) * torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    xg = None
    if xg_tokens:
        xg = (gated[..., :xg_tokens] @ va[:, :xg_tokens]).float().mean(dim=2)  # no padding: every row counts
    return gated @ va, xg


def is_missing_kernel(error: RuntimeError) -> bool:
    """SDPA's "no kernel for these inputs" error (CUDA and CPU word it differently)."""
    text = str(error)
    return "No available kernel" in text or "No viable backend" in text


def _sdpa_caller(problem: Problem, backend: Optional[str]) -> tuple[Callable[..., Tensor], str]:
    """`call(q, k, v, causal)` running SDPA (pinned to `backend`, or torch's own choice when None).

    GQA goes through `enable_gqa=True` when the backend takes it; otherwise K/V are repeated per
    query head first, as Hugging Face's SDPA path does when it cannot use enable_gqa. Which one is
    decided by one trial call and reported in the note."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = problem.shape.group

    def context():
        return sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext()

    def native(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        with context():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)

    def repeated(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        with context():
            return F.scaled_dot_product_attention(q, repeat_kv(k, group), repeat_kv(v, group), is_causal=causal)

    if group == 1:
        return native, ""
    try:
        native(problem.q, problem.k, problem.v, True)
        return native, "native GQA"
    except RuntimeError as error:
        if not is_missing_kernel(error):
            raise
    return repeated, "K/V repeated for GQA"


def _expand_adapter(problem: Problem, t: Tensor) -> Tensor:
    """Shared (Hkv, M, d) adapter K/V as the (B, Hkv, M, d) batch SDPA wants (a view, no copy)."""
    return t.unsqueeze(0).expand(problem.shape.batch, *t.shape)


# ---------------------------------------------------------------------------------- the providers
def _causalattn(features: frozenset[str], composed: bool = False, native: bool = False) -> Callable[[Problem], Built]:
    def build(p: Problem) -> Built:
        # The fused op: Triton on CUDA, the chunked reference on CPU (the Triton interpreter is for
        # tests, not timings). The composed backend runs on every device; the native one on CPU only.
        backend = "triton" if p.device.type == "cuda" else "reference"
        backend = "native" if native else "composed" if composed else backend
        adapter = Adapter(p.adapter_keys, p.adapter_values, p.gate) if "adapter" in features else None
        supervision = p.mask if "cat" in features else None
        xg_tokens = p.shape.xg_tokens if "xg" in features else 0
        attend = functools.partial(causalattn.attention, backend=backend)
        if native:
            from causalattn import native as native_backend

            if p.device.type != "cpu" or not native_backend.available():
                raise Unsupported("the native backend runs CPU inputs with a built C++ extension")
            attend = native_backend.attention_native

        def forward() -> ForwardResult:
            result = attend(p.q, p.k, p.v, causal=True, adapter=adapter, supervision=supervision, xg_tokens=xg_tokens)
            return result.out, feature_losses(result.mass, result.xg, p.mask)

        return Built(forward, f"backend={backend}")

    return build


def _sdpa(backend: str) -> Callable[[Problem], Built]:
    def build(p: Problem) -> Built:
        call, note = _sdpa_caller(p, backend)
        return Built(lambda: (call(p.q, p.k, p.v, True), None), note)

    return build


def _build_sdpa_plus_adapter_sdpa(p: Problem) -> Built:
    """Main attention and adapter attention as two SDPA calls (torch picks the backend), each with
    its own softmax; the adapter call sees all M keys (no mask) and is gated per head by tanh(gate)."""
    call, note = _sdpa_caller(p, None)

    def forward() -> ForwardResult:
        out = call(p.q, p.k, p.v, True)
        adapter_out = call(p.q, _expand_adapter(p, p.adapter_keys), _expand_adapter(p, p.adapter_values), False)
        return out + torch.tanh(p.gate).to(out.dtype).view(1, -1, 1, 1) * adapter_out, None

    return Built(forward, note)


def _build_sdpa_plus_peft_adapter(p: Problem) -> Built:
    """PEFT AdaptionPrompt's forward at kernel level: the wrapped attention (SDPA) untouched, then the
    adapter branch with a raw scalar gate added on top. PEFT cannot be called below the HF attention
    module, so its math is written out (`adapter_branch`); its q_proj recompute and the adapter's own
    o_proj are projection work outside attention and left out."""
    call, note = _sdpa_caller(p, None)

    def forward() -> ForwardResult:
        adapter_out, _ = adapter_branch(p.q, p.adapter_keys, p.adapter_values, p.gate_scalar, 0)
        return call(p.q, p.k, p.v, True) + adapter_out, None

    return Built(forward, note)


def _eager(features: frozenset[str]) -> Callable[[Problem], Built]:
    """CAT's way: eager attention as Hugging Face's `eager_attention_forward` computes it with
    `output_attentions=True` (repeated K/V, additive causal mask, fp32 softmax cast to the model
    dtype: the maps it returns), then the loss over the maps with the dense (B, N, N) cause mask."""

    def build(p: Problem) -> Built:
        s = p.shape
        dtype = DTYPES[s.dtype]
        causal_bias = torch.full((s.seq_len, s.seq_len), torch.finfo(dtype).min, dtype=dtype, device=p.device)
        causal_bias = causal_bias.triu(1)[None, None]
        causes = p.mask.to_dense()[:, None]  # (B, 1, N, N) bool
        scale = 1.0 / math.sqrt(s.head_dim)

        def forward() -> ForwardResult:
            keys, values = repeat_kv(p.k, s.group), repeat_kv(p.v, s.group)
            scores = p.q @ keys.transpose(-1, -2) * scale + causal_bias
            maps = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
            out = maps @ values
            mass = (maps * causes).sum(-1, dtype=torch.float32)
            xg = None
            if "adapter" in features:
                adapter_out, xg = adapter_branch(p.q, p.adapter_keys, p.adapter_values, torch.tanh(p.gate),
                                                 s.xg_tokens if "xg" in features else 0)
                out = out + adapter_out
            return out, feature_losses(mass, xg, p.mask)

        return Built(forward, "K/V repeated for GQA" if s.group > 1 else "")

    return build


# FlexAttention is compiled once per process; every shape adds a graph, so the recompile limit is
# raised above the sweep's shape count (dynamic=False keeps each shape's kernels specialised).
_FLEX_RECOMPILE_LIMIT = 256


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> tuple[Callable[..., object], Callable[..., object]]:
    """(compiled flex_attention, compiled create_block_mask): the compiled mask builder never holds
    a dense N x N mask, which matters for the per-step cause mask."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), _FLEX_RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)


def _require_cuda(p: Problem, what: str) -> None:
    if p.device.type != "cuda":
        raise Unsupported(f"{what} is benchmarked on CUDA only (its CPU compile takes minutes)")


def _causal_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return kv_idx <= q_idx


def _causal_block_mask(seq_len: int, device: torch.device):
    """The static causal BlockMask, built once per case outside the timed step (eagerly: no compile)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal_mod, None, None, seq_len, seq_len, device=device)


def _flex_with_lse(flex: Callable[..., object], q: Tensor, k: Tensor, v: Tensor, block_mask,
                   group: int) -> tuple[Tensor, Tensor]:
    """(out, natural-log LSE) through whichever API this torch has (return_aux from 2.9, return_lse before)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1, return_lse=True)
    out, aux = flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _build_flex(p: Problem) -> Built:
    _require_cuda(p, "FlexAttention")
    flex, _ = _compiled_flex()
    causal, group = _causal_block_mask(p.shape.seq_len, p.device), p.shape.group
    return Built(lambda: (flex(p.q, p.k, p.v, block_mask=causal, enable_gqa=group > 1), None), "compiled")


def _flex_two_pass(features: frozenset[str]) -> Callable[[Problem], Built]:
    """The CAT mass without a new kernel: pass 1 is causal attention with its LSE, pass 2 attends only
    to the causes with its LSE, and m = exp(LSE_causes - LSE_all) (rows without causes: LSE = -inf,
    m = 0). The causal block mask is built once; the cause block mask depends on the batch, so it is
    rebuilt (compiled, no dense mask) inside every step, as training would."""

    def build(p: Problem) -> Built:
        _require_cuda(p, "FlexAttention")
        flex, make_block_mask = _compiled_flex()
        s = p.shape
        bits = p.mask.bits  # (B, N, ceil(N/32)) int32

        def cause_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            word = bits[b, q_idx, kv_idx // 32]
            return (kv_idx <= q_idx) & (((word >> (kv_idx % 32)) & 1) == 1)

        causal = _causal_block_mask(s.seq_len, p.device)

        def forward() -> ForwardResult:
            causes = make_block_mask(cause_mod, s.batch, None, s.seq_len, s.seq_len, device=p.device)
            out, lse_all = _flex_with_lse(flex, p.q, p.k, p.v, causal, s.group)
            _, lse_causes = _flex_with_lse(flex, p.q, p.k, p.v, causes, s.group)
            mass = torch.exp(lse_causes - lse_all)
            xg = None
            if "adapter" in features:
                adapter_out, xg = adapter_branch(p.q, p.adapter_keys, p.adapter_values, torch.tanh(p.gate),
                                                 s.xg_tokens if "xg" in features else 0)
                out = out + adapter_out
            return out, feature_losses(mass, xg, p.mask)

        return Built(forward, "compiled, cause block mask rebuilt per step")

    return build


def _build_flash_attn(p: Problem) -> Built:
    if p.device.type != "cuda":
        raise Unsupported("flash-attn runs on CUDA only")
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise Unsupported(f"flash_attn is not importable ({error})") from None

    def forward() -> ForwardResult:
        # flash-attn takes (B, N, H, d): transposed views, no copies (only the last dim must be contiguous).
        out = flash_attn_func(p.q.transpose(1, 2), p.k.transpose(1, 2), p.v.transpose(1, 2), causal=True)
        return out.transpose(1, 2), None

    return Built(forward, "")


def _all_providers() -> dict[str, Provider]:
    adapter, cat, xg = (frozenset({f}) for f in FEATURES)
    every = adapter | cat | xg
    providers = [
        Provider("causalattn", frozenset(), _causalattn(frozenset())),
        Provider("causalattn+adapter", adapter, _causalattn(adapter)),
        Provider("causalattn+cat", cat, _causalattn(cat)),
        Provider("causalattn+xg", adapter | xg, _causalattn(adapter | xg)),
        Provider("causalattn+all", every, _causalattn(every)),
        Provider("composed", frozenset(), _causalattn(frozenset(), composed=True)),
        Provider("composed+adapter", adapter, _causalattn(adapter, composed=True)),
        Provider("composed+cat", cat, _causalattn(cat, composed=True)),
        Provider("composed+xg", adapter | xg, _causalattn(adapter | xg, composed=True)),
        Provider("composed+all", every, _causalattn(every, composed=True)),
        Provider("native", frozenset(), _causalattn(frozenset(), native=True)),
        Provider("native+adapter", adapter, _causalattn(adapter, native=True)),
        Provider("native+cat", cat, _causalattn(cat, native=True)),
        Provider("native+all", every, _causalattn(every, native=True)),
        Provider("sdpa-flash", frozenset(), _sdpa("FLASH_ATTENTION")),
        Provider("sdpa-efficient", frozenset(), _sdpa("EFFICIENT_ATTENTION")),
        Provider("sdpa-cudnn", frozenset(), _sdpa("CUDNN_ATTENTION")),
        Provider("sdpa-math", frozenset(), _sdpa("MATH"), priority=1),
        Provider("sdpa+adapter-sdpa", adapter, _build_sdpa_plus_adapter_sdpa),
        Provider("sdpa+adapter-peft", adapter, _build_sdpa_plus_peft_adapter),
        Provider("eager+cat", cat, _eager(cat), priority=1),
        Provider("eager+all", every, _eager(every), priority=1),
        Provider("flex", frozenset(), _build_flex, priority=2),
        Provider("flex2pass+cat", cat, _flex_two_pass(cat), priority=2),
        Provider("flex2pass+all", every, _flex_two_pass(every), priority=2),
        Provider("flash-attn", frozenset(), _build_flash_attn),
    ]
    return {p.name: p for p in providers}


PROVIDERS: dict[str, Provider] = _all_providers()
SDPA_BACKEND_PROVIDERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
