"""`causalattn.attention`: validate the inputs, choose a backend, run it.

Shapes: see `causalattn.inputs`. Backends, each a self-contained module:
* "triton"    `causalattn.triton_backend.attention_triton`: the fused kernels of `causalattn.kernels`
              (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), fp16/bf16/fp32, as torch.library
              ops with autograd and fakes, so torch.compile traces through them without graph breaks.
* "composed"  `causalattn.composed.attention_composed`: PyTorch's own attention kernel plus the
              statistics computed apart (adapter and XG over N x M, CAT mass on the supervised rows).
* "reference" `causalattn.reference.attention_chunked` (memory-lean PyTorch, any device/dtype).
* "native"    `causalattn.native.attention_native`: the fused C++ CPU kernel (built on first use) for CPU
              fp32/bf16/fp16 inputs without padding, packing or adapter segments; "composed" for the rest.
* "auto"      CPU: "native" where it takes the inputs and its extension builds (paired against SDPA on
              a quiet 2-core Xeon, fwd+bwd, every feature on: 0.82-0.95x, composed 1.21-2.68x; see
              docs/native.md), else "composed". CUDA: what `causalattn.dispatch` measured fastest for
              the device, dtype, head dim, features and supervised-row density; "triton" where nothing was
              measured (and "composed" for float64 and for adapters of more than 8 segments,
              which the kernels do not take).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from causalattn import native
from causalattn.autocast import follows_autocast
from causalattn.composed import attention_composed
from causalattn.inputs import Adapter, AttentionOutput
from causalattn.masks import CausalMask
from causalattn.reference import attention_chunked
from causalattn.triton_backend import attention_triton
from causalattn.validation import check_inputs

BACKENDS = ("auto", "triton", "composed", "reference", "native")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    from causalattn.kernels.tiles import interpreting

    return interpreting()


def fused_kernels_take(adapter: Optional[Adapter]) -> bool:
    """Whether the Triton kernels take this adapter: up to MAX_SEGMENTS segments (docs/math.md §7, unrolled in
    the kernels), any gate shape; more segments run on the composed and reference backends."""
    from causalattn.kernels.jit_helpers import MAX_SEGMENTS

    return adapter is None or adapter.num_segments <= MAX_SEGMENTS


def resolve_backend(backend: str, q: Tensor, features: str = "none", supervised_fraction: float = 0.0,
                    adapter: Optional[Adapter] = None, native_takes: bool = False) -> str:
    """The backend `attention` runs for `backend` and a query tensor `q`; `features` ("adapter+cat+xg",
    "none", ...) and the fraction of supervised rows choose between the fused and the composed path
    on CUDA (see `causalattn.dispatch`); `native_takes` (`causalattn.native.takes`) says whether the
    native CPU kernel runs these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not q.is_cuda:
            return "native" if native_takes else "composed"
        if q.dtype not in TRITON_DTYPES or not fused_kernels_take(adapter):
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


@follows_autocast
def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
    key_lengths: Optional[Tensor] = None, key_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None, adapter: Optional[Adapter] = None, supervision: Optional[CausalMask] = None,
    xg_tokens: int = 0, xg_pool: str = "sample", backend: str = "auto",
) -> AttentionOutput:
    """Fused causal attention with the zero-init gated adapter, CAT mass and XG statistic (docs/math.md §1-§4).

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
    native_takes = backend == "auto" and q.device.type == "cpu" and native.takes(
        q, k, key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens, adapter=adapter)
    chosen = resolve_backend(backend, q, feature_label(adapter, supervision, xg_tokens), supervised_fraction, adapter,
                             native_takes)
    if chosen == "triton":
        return attention_triton(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask,
                                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, adapter=adapter, supervision=supervision,
                                xg_tokens=xg_tokens, xg_pool=xg_pool)
    run = {"reference": attention_chunked, "native": native.attention_native}.get(chosen, attention_composed)
    return run(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask,
               cu_seqlens=cu_seqlens, adapter=adapter, supervision=supervision, xg_tokens=xg_tokens, xg_pool=xg_pool)
