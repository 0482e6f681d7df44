"""The fused CPU backend: one C++ forward pass and one backward pass (csrc/, docs/native.md).

    out  = softmax(tau q k^T) v + gamma softmax(tau q Ka^T) Va     sequence and adapter, one pass
    lse  and the CAT mass m_i = sum_j P_ij A_ij                    in the same pass
    xg   from the adapter probabilities of the first H_g slots     the kernel returns them; pooled here

The extension is compiled on first use with `torch.utils.cpp_extension.load` into a cache directory
(`cache_dir()`), once per source version, torch version and CPU capability, and reused from there.
When it cannot be built (no compiler, a failed build) `available()` is False and `attention_native`
runs the composed backend instead, after one warning. Inputs outside the supported subset (below)
also run the composed backend, with one warning per reason.

Supported: CPU float32, bfloat16 and float16 tensors (computed in fp32: blocks are converted as they are
read), Nk >= 1 keys, causal (bottom-right) or full attention, GQA, no key padding
or packing, an adapter of one segment (shared or per-sample prompt, any gate shape), CAT supervision,
XG pooled per sample or per row.

Shapes
------
q (B, Hq, Nq, d); k, v (B, Hkv, Nk, d); returns `AttentionOutput` as `attention_composed`:
out (B, Hq, Nq, d), lse (B, Hq, Nq), mass (B, Hq, Nq) or None, xg (B, Hq, d) / (B, Hq, Nq, d) or None.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from causalattn.composed import attention_composed
from causalattn.inputs import Adapter, AttentionOutput
from causalattn.masks import CausalMask

_SOURCES = ("forward.cpp", "backward.cpp", "bindings.cpp")
_HEADERS = ("attention.h", "blocks.h", "gemm.h")
# Each capability's flags mirror ATen's per-capability builds of its own kernels (the at::vec
# implementation follows the CPU_CAPABILITY_* macro): the cached build is keyed on the capability
# torch itself detected, so it runs on every CPU of that capability, and one that lacks it gets its
# own build. -march=native would key a shared cache on one machine's exact model instead.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}
_library_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where compiled extensions live: $CAUSALATTN_CACHE/native, else $XDG_CACHE_HOME/causalattn/native,
    else ~/.cache/causalattn/native."""
    if os.environ.get("CAUSALATTN_CACHE"):
        return Path(os.environ["CAUSALATTN_CACHE"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "causalattn" / "native"


def _source_dir() -> Path:
    """csrc/ beside the package in a checkout, or inside it when installed (setup.py maps it there)."""
    here = Path(__file__).resolve().parent
    return here / "csrc" if (here / "csrc" / _SOURCES[0]).exists() else here.parent / "csrc"


def capability() -> str:
    """The at::vec capability the extension is built for: torch's own detected one (AVX512, AVX2), else DEFAULT."""
    detected = torch.backends.cpu.get_cpu_capability().upper()
    return "AVX512" if detected.startswith("AVX512") else "AVX2" if detected.startswith("AVX2") else "DEFAULT"


def _build() -> None:
    from torch.utils import cpp_extension

    sources = [_source_dir() / name for name in _SOURCES]
    headers = [_source_dir() / name for name in _HEADERS]
    level = capability()
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={level}", *_CAPABILITY_FLAGS[level]]
    digest = hashlib.sha256()
    for part in [torch.__version__, *flags, *(path.read_bytes() for path in sources + headers)]:
        digest.update(part if isinstance(part, bytes) else part.encode())
    directory = cache_dir() / f"{level.lower()}-{digest.hexdigest()[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=f"causalattn_native_{level.lower()}", sources=[str(s) for s in sources],
                       extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(directory),
                       is_python_module=False, verbose=False)


def available() -> bool:
    """Whether the extension is built and loaded (builds it on the first call; warns once on failure)."""
    if "ok" not in _library_state:
        try:
            _build()
            _library_state["ok"] = True
        except Exception as error:  # no compiler, a failed build or load: the composed backend runs instead
            _library_state["ok"] = False
            lines = str(error).splitlines()
            detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
            warnings.warn(f"causalattn.native: the C++ extension could not be built ({type(error).__name__}: "
                          f"{detail.strip()}); the composed backend runs instead", RuntimeWarning, stacklevel=3)
    return bool(_library_state["ok"])


def unsupported_reason(q: Tensor, k: Tensor, *, key_lengths: Optional[Tensor] = None,
                       key_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                       adapter: Optional[Adapter] = None) -> Optional[str]:
    """Why the kernel does not take these (already validated) inputs, or None when it does."""
    if q.device.type != "cpu":
        return f"device {q.device.type} (CPU only)"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (float32, bfloat16 and float16 only)"
    if key_lengths is not None or key_mask is not None or cu_seqlens is not None:
        return "key padding or packed sequences"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "no query rows or no keys"
    if adapter is not None and adapter.num_segments > 1:
        return "adapter segments"
    return None


def takes(q: Tensor, k: Tensor, *, key_lengths: Optional[Tensor] = None, key_mask: Optional[Tensor] = None,
          cu_seqlens: Optional[Tensor] = None, adapter: Optional[Adapter] = None) -> bool:
    """Whether `backend="auto"` runs these inputs here: the kernel supports them and its extension is built
    (the first such call builds it; a failed build warns once and leaves every call to the composed path)."""
    return unsupported_reason(q, k, key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens,
                              adapter=adapter) is None and available()


def _fp32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _NativeAttention(torch.autograd.Function):
    """(out, lse, mass, xg_probs) of the C++ forward; every gradient from the one C++ backward.

    The adapter arrives as keys/values (1 or B, Hkv, M, d) and gamma (1 or B, Hq), the gate already
    mapped (tanh or raw) by autograd outside; the kernel returns per-(batch, query head) partials of
    their gradients, summed here over the query group and a shared prompt's batch."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keys: Optional[Tensor], values: Optional[Tensor],
                gamma: Optional[Tensor], bits: Optional[Tensor], counts: Optional[Tensor], scale: float,
                causal: bool, xg_tokens: int):
        out, lse, mass, xg_probs = torch.ops.causalattn_native.forward(q, k, v, keys, values, gamma, bits, counts,
                                                                       scale, causal, xg_tokens)
        ctx.save_for_backward(q, k, v, out, lse, mass if bits is not None else None, bits, keys, values, gamma)
        ctx.scale, ctx.causal = scale, causal
        ctx.set_materialize_grads(False)
        return out, lse, mass if bits is not None else None, xg_probs if xg_tokens else None

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_mass, grad_xg):
        q, k, v, out, lse, mass, bits, keys, values, gamma = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else _last_dim_contiguous(grad_out)
        optional = [g.contiguous() if g is not None else None for g in (grad_lse, grad_mass, grad_xg)]
        grad_lse, grad_mass, grad_xg = optional
        if grad_mass is None:
            mass = None
        dq, dk, dv, d_keys, d_values, d_gamma = torch.ops.causalattn_native.backward(
            grad_out, q, k, v, out, lse, grad_lse, mass, grad_mass, bits if grad_mass is not None else None,
            keys, values, gamma, grad_xg, ctx.scale, ctx.causal)
        if keys is not None:
            batch, heads_q = d_gamma.shape
            heads_kv = keys.shape[1]
            d_keys = d_keys.view(batch, heads_kv, heads_q // heads_kv, *d_keys.shape[2:]).sum(2)
            d_values = d_values.view(batch, heads_kv, heads_q // heads_kv, *d_values.shape[2:]).sum(2)
            if keys.shape[0] == 1:  # a prompt shared by the batch
                d_keys, d_values = d_keys.sum(0, keepdim=True), d_values.sum(0, keepdim=True)
            if gamma.shape[0] == 1:
                d_gamma = d_gamma.sum(0, keepdim=True)
        else:
            d_keys = d_values = d_gamma = None
        return dq, dk, dv, d_keys, d_values, d_gamma, None, None, None, None, None


def attention_native(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
    key_lengths: Optional[Tensor] = None, key_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
    adapter: Optional[Adapter] = None, supervision: Optional[CausalMask] = None,
    xg_tokens: int = 0, xg_pool: str = "sample",
) -> AttentionOutput:
    """docs/math.md §1-§3 with the fused C++ kernel; inputs already checked by `check_inputs`. Same outputs
    (and dtypes) as `attention_composed`, which runs instead where the kernel does not apply."""
    options = dict(causal=causal, scale=scale, key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens,
                   adapter=adapter, supervision=supervision, xg_tokens=xg_tokens, xg_pool=xg_pool)
    reason = unsupported_reason(q, k, key_lengths=key_lengths, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                adapter=adapter)
    if reason is not None:
        warnings.warn(f"causalattn.native: {reason} is not supported by the C++ kernel; the composed backend runs",
                      RuntimeWarning, stacklevel=2)
        return attention_composed(q, k, v, **options)
    if not available():
        return attention_composed(q, k, v, **options)
    tau = scale if scale is not None else q.shape[-1] ** -0.5
    keys = values = gamma = None
    if adapter is not None:
        keys, values = _fp32(adapter.keys), _fp32(adapter.values)
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        gamma = adapter.gammas(q.shape[1])[:, 0].to(torch.float32).contiguous()  # (1 or B, Hq), differentiable
    bits = counts = None
    if supervision is not None:
        bits, counts = supervision.bits, supervision.cause_count
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse, mass, xg_probs = _NativeAttention.apply(q, k, v, keys, values, gamma, bits, counts, float(tau),
                                                      causal, xg_tokens if adapter is not None else 0)
    xg = _xg_statistic(xg_probs, adapter, gamma, xg_tokens, xg_pool) if adapter is not None and xg_tokens else None
    return AttentionOutput(out, lse, mass, xg)


def _xg_statistic(xg_probs: Tensor, adapter: Adapter, gamma: Tensor, xg_tokens: int, xg_pool: str) -> Tensor:
    """z_i = gamma sum_{m < H_g} Pa_im va_m per row, or its mean over each sample's rows (docs/math.md §3):
    the mean is taken on the (B, Hq, N, H_g) probabilities first, then the values read once."""
    values = adapter.values.to(torch.float32)[..., :xg_tokens, :]
    values = values.unsqueeze(0) if values.dim() == 3 else values  # (1 or B, Hkv, H_g, d)
    batch, heads_q = xg_probs.shape[:2]
    group = heads_q // values.shape[1]
    values = values.repeat_interleave(group, dim=1)  # (1 or B, Hq, H_g, d): a few hundred elements
    weights = gamma[:, :, None, None]
    if xg_pool == "position":
        return (weights * xg_probs) @ values
    return ((weights * xg_probs.mean(2, keepdim=True)) @ values).squeeze(2)
