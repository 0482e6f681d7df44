"""`causalattn.attention`: the public op, its backend dispatch and its autograd/torch.compile wiring.

Shapes: see `causalattn.inputs`. Backends:
* "triton"    the fused kernels of `causalattn.kernels` (CUDA tensors; CPU tensors under
              TRITON_INTERPRET=1), fp16/bf16/fp32. Registered as the torch.library ops
              `causalattn::fused_attention` / `causalattn::fused_attention_backward` with
              `register_autograd` and fake (meta) implementations, so torch.compile traces through
              them without graph breaks.
* "composed"  `causalattn.composed.attention_composed`: PyTorch's own attention kernel plus the
              statistics computed apart (adapter and XG over N x M, CAT mass on the supervised rows).
* "reference" `causalattn.reference.attention_chunked` (memory-lean PyTorch, any device/dtype).
* "auto"      CPU: "composed". CUDA: what `causalattn.dispatch` measured fastest for the device,
              dtype, head dim, features and supervised-row density; "triton" where nothing was
              measured (and "composed" for float64 and for adapters of more than 8 segments,
              which the kernels do not take).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from causalattn.autocast import follows_autocast
from causalattn.composed import attention_composed
from causalattn.inputs import Adapter, AttentionOutput
from causalattn.problem import key_validity, xg_row_weights
from causalattn.validation import check_inputs
from causalattn.masks import CausalMask
from causalattn.reference import attention_chunked

BACKENDS = ("auto", "triton", "composed", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    from causalattn.kernels.tiles import interpreting

    return interpreting()


def fused_kernels_take(adapter: Optional[Adapter]) -> bool:
    """Whether the Triton kernels take this adapter: up to MAX_SEGMENTS segments (SPEC §7, unrolled in
    the kernels), any gate shape; more segments run on the composed and reference backends."""
    from causalattn.kernels.jit_helpers import MAX_SEGMENTS

    return adapter is None or adapter.num_segments <= MAX_SEGMENTS


def resolve_backend(backend: str, q: Tensor, features: str = "none", supervised_fraction: float = 0.0,
                    adapter: Optional[Adapter] = None) -> str:
    """The backend `attention` runs for `backend` and a query tensor `q`; `features` ("adapter+cat+xg",
    "none", ...) and the fraction of supervised rows choose between the fused and the composed path
    on CUDA (see `causalattn.dispatch`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not q.is_cuda or q.dtype not in TRITON_DTYPES or not fused_kernels_take(adapter):
            return "composed"
        from causalattn.dispatch import choose_cuda_backend

        return choose_cuda_backend(q.device, q.dtype, q.shape[-1], features, supervised_fraction)
    if backend == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"q: the triton backend takes float16/bfloat16/float32, got {q.dtype} (use backend='reference')")
        if not (q.is_cuda or _interpreting()):
            raise ValueError(f"q: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")
        if not fused_kernels_take(adapter):
            from causalattn.kernels.jit_helpers import MAX_SEGMENTS

            raise ValueError(f"adapter: the triton backend takes at most {MAX_SEGMENTS} segments, got "
                             f"{adapter.num_segments} (use backend='composed' or 'auto')")
    return backend


def feature_label(adapter: Optional[Adapter], supervision: Optional[CausalMask], xg_tokens: int) -> str:
    """"adapter", "cat", "xg" joined by "+" in that order, or "none": the dispatch table's feature key."""
    on = [name for name, used in (("adapter", adapter is not None), ("cat", supervision is not None),
                                  ("xg", bool(xg_tokens))) if used]
    return "+".join(on) or "none"


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


# ------------------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("causalattn::fused_attention", mutates_args=())
def _fused_attention(
    q: Tensor, k: Tensor, v: Tensor, adapter_keys: Optional[Tensor], adapter_values: Optional[Tensor],
    gamma: Optional[Tensor], key_lengths: Optional[Tensor], key_mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor], mask_bits: Optional[Tensor], xg_weight: Optional[Tensor],
    slot_segment: Optional[Tensor],
    causal: bool, scale: float, max_seqlen: int, xg_tokens: int, xg_pooled: bool, num_samples: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, adapter_lse2, mass, xg); absent statistics are empty tensors."""
    from causalattn.kernels.attention_fwd import attention_forward

    out, lse, adapter_lse2, mass, xg = attention_forward(
        q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen, adapter_keys=adapter_keys, adapter_values=adapter_values, gamma=gamma,
        mask_bits=mask_bits, xg_tokens=xg_tokens, xg_weight=xg_weight, xg_pooled=xg_pooled, num_samples=num_samples,
        slot_segment=slot_segment)
    fill = _empty(q)
    return (out, lse, adapter_lse2 if adapter_lse2 is not None else fill, mass if mass is not None else fill.clone(),
            xg if xg is not None else fill.clone())


@_fused_attention.register_fake
def _fused_attention_fake(q, k, v, adapter_keys, adapter_values, gamma, key_lengths, key_mask, cu_seqlens,
                          mask_bits, xg_weight, slot_segment, causal, scale, max_seqlen, xg_tokens, xg_pooled,
                          num_samples):
    batch, heads_q, n_q, head_dim = q.shape
    stats = q.new_empty(batch, heads_q, n_q, dtype=torch.float32)
    adapter_lse2 = _empty(q)
    if adapter_keys is not None:  # (S, B, Hq, Nq) with S > 1 segments
        adapter_lse2 = torch.empty_like(stats) if gamma.shape[-2] == 1 else stats.new_empty(gamma.shape[-2], *stats.shape)
    mass = torch.empty_like(stats) if mask_bits is not None else _empty(q)
    if not xg_tokens:
        xg = _empty(q)
    elif xg_pooled:
        xg = q.new_empty(num_samples, heads_q, head_dim, dtype=torch.float32)
    else:
        xg = q.new_empty(batch, heads_q, n_q, head_dim, dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats, adapter_lse2, mass, xg


@torch.library.custom_op("causalattn::fused_attention_backward", mutates_args=())
def _fused_attention_backward(
    grad_out: Tensor, grad_lse: Optional[Tensor], grad_mass: Optional[Tensor], grad_xg: Optional[Tensor],
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, adapter_lse2: Optional[Tensor], mass: Optional[Tensor],
    adapter_keys: Optional[Tensor], adapter_values: Optional[Tensor], gamma: Optional[Tensor],
    key_lengths: Optional[Tensor], key_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
    mask_bits: Optional[Tensor], xg_weight: Optional[Tensor], slot_segment: Optional[Tensor],
    causal: bool, scale: float, max_seqlen: int, xg_tokens: int, xg_pooled: bool, num_samples: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_adapter_keys, d_adapter_values, d_gamma); adapter grads empty without adapter."""
    from causalattn.kernels.attention_bwd import attention_backward

    dq, dk, dv, dka, dva, dgamma = attention_backward(
        grad_out, grad_lse, grad_mass, grad_xg, q, k, v, out, lse, adapter_lse2, mass, causal=causal, scale=scale,
        key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        adapter_keys=adapter_keys, adapter_values=adapter_values, gamma=gamma, mask_bits=mask_bits,
        xg_tokens=xg_tokens, xg_weight=xg_weight, xg_pooled=xg_pooled, num_samples=num_samples,
        slot_segment=slot_segment)
    if dka is None:
        dka, dva, dgamma = _empty(q), _empty(q), _empty(q)
    return dq, dk, dv, dka, dva, dgamma


@_fused_attention_backward.register_fake
def _fused_attention_backward_fake(grad_out, grad_lse, grad_mass, grad_xg, q, k, v, out, lse, adapter_lse2, mass,
                                   adapter_keys, adapter_values, gamma, *rest):
    if adapter_keys is None:
        dka = dva = dgamma = _empty(q)
    else:
        dka, dva, dgamma = torch.empty_like(adapter_keys), torch.empty_like(adapter_values), torch.empty_like(gamma)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dka, dva, dgamma


_SAVED_ARGS = ("key_lengths", "key_mask", "cu_seqlens", "mask_bits", "xg_weight", "slot_segment")
_FLAG_ARGS = ("causal", "scale", "max_seqlen", "xg_tokens", "xg_pooled", "num_samples")


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, adapter_keys, adapter_values, gamma, *rest) = inputs
    out, lse, adapter_lse2, mass, _ = output
    saved = len(_SAVED_ARGS)
    ctx.save_for_backward(q, k, v, out, lse, adapter_lse2, mass, adapter_keys, adapter_values, gamma, *rest[:saved])
    ctx.flags = dict(zip(_FLAG_ARGS, rest[saved:]))
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse, _grad_adapter_lse2, grad_mass, grad_xg):
    q, k, v, out, lse, adapter_lse2, mass, adapter_keys, adapter_values, gamma, *side = ctx.saved_tensors
    has_adapter = adapter_keys is not None
    has_mass = mass.numel() > 0
    if grad_out is None:  # only the statistics feed the loss (e.g. CAT alone)
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dka, dva, dgamma = _fused_attention_backward(
        grad_out, grad_lse, grad_mass if has_mass else None, grad_xg if ctx.flags["xg_tokens"] else None,
        q, k, v, out, lse, adapter_lse2 if has_adapter else None, mass if has_mass else None,
        adapter_keys, adapter_values, gamma, *side, *ctx.flags.values())
    if not has_adapter:
        dka = dva = dgamma = None
    return (dq, dk, dv, dka, dva, dgamma) + (None,) * (len(_SAVED_ARGS) + len(_FLAG_ARGS))


torch.library.register_autograd("causalattn::fused_attention", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public op
@follows_autocast
def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
    key_lengths: Optional[Tensor] = None, key_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None, adapter: Optional[Adapter] = None, supervision: Optional[CausalMask] = None,
    xg_tokens: int = 0, xg_pool: str = "sample", backend: str = "auto",
) -> AttentionOutput:
    """Fused causal attention with the zero-init gated adapter, CAT mass and XG statistic (SPEC §1-§4).

    q (B, Hq, Nq, d); k, v (B, Hkv, Nk, d). Returns AttentionOutput(out, lse, mass, xg): see
    `causalattn.reference` for the exact definitions; every output is differentiable.
    `max_seqlen` (packed sequences) saves a device sync when given.
    """
    check_inputs(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask,
                 cu_seqlens=cu_seqlens, adapter=adapter, supervision=supervision, xg_tokens=xg_tokens, xg_pool=xg_pool,
                 max_seqlen=max_seqlen)
    if backend == "auto" and q.is_cuda and supervision is not None:
        supervised_fraction = supervision.supervised_rows()[1].numel() / max(1, supervision.batch_size * q.shape[2])
    else:
        supervised_fraction = 0.0
    chosen = resolve_backend(backend, q, feature_label(adapter, supervision, xg_tokens), supervised_fraction, adapter)
    if chosen != "triton":
        run = attention_chunked if chosen == "reference" else attention_composed
        return run(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask,
                   cu_seqlens=cu_seqlens, adapter=adapter, supervision=supervision, xg_tokens=xg_tokens, xg_pool=xg_pool)
    batch, heads_q, n_q, head_dim = q.shape
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        num_samples = cu_seqlens.numel() - 1
    else:
        max_seqlen, num_samples = n_q, batch

    def last_dim_contiguous(t: Tensor) -> Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    adapter_keys = adapter_values = gamma = None
    if adapter is not None:
        adapter_keys, adapter_values = adapter.keys.contiguous(), adapter.values.contiguous()
        gamma = adapter.gammas(heads_q).float().contiguous()  # (1 or B, S, Hq)
    slot_segment = None
    if adapter is not None and adapter.num_segments > 1:
        from causalattn.kernels.jit_helpers import slot_segments

        slot_segment = slot_segments(adapter.segment_sizes, q.device)
    xg_weight = None
    if xg_tokens and xg_pool == "sample":
        valid = key_validity(k.shape[2], key_lengths, key_mask)
        xg_weight = xg_row_weights(batch, n_q, valid, cu_seqlens, torch.float32, q.device).contiguous()
    out, lse, _, mass, xg = _fused_attention(
        q, k, v, adapter_keys, adapter_values, gamma,
        key_lengths.to(torch.int32).contiguous() if key_lengths is not None else None,
        key_mask.contiguous().view(torch.uint8) if key_mask is not None else None,
        cu_seqlens, supervision.bits if supervision is not None else None, xg_weight, slot_segment,
        causal, float(scale if scale is not None else 1.0 / math.sqrt(head_dim)), max_seqlen, xg_tokens,
        xg_pool == "sample", num_samples)
    return AttentionOutput(out, lse, mass if supervision is not None else None, xg if xg_tokens else None)
