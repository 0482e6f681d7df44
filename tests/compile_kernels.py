"""Compile every fused-attention kernel variant for a GPU target, without a GPU.

The Triton interpreter runs the kernels' arithmetic on the CPU but skips the compiler, so code that
only the compiler rejects (a non-constexpr global, a type that changes across a loop, a dot shape
the target lacks) would otherwise surface first on a GPU machine. This script runs the real launchers
with a recording stand-in for each kernel, then hands every recorded launch to `triton.compile` for
sm_90 (through PTX and ptxas). Run it without TRITON_INTERPRET:

    python tests/compile_kernels.py            # prints one line per compiled kernel, exits 1 on failure
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (the interpreter never compiles)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from causalattn.kernels import attention_bwd, attention_fwd  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int8: "i8", torch.uint8: "u8", torch.int64: "i64"}
KERNELS = {"fwd": (attention_fwd, "_fwd_kernel"), "rows": (attention_bwd, "_bwd_rows_kernel"),
           "dkdv": (attention_bwd, "_bwd_dkdv_kernel"), "dq": (attention_bwd, "_bwd_dq_kernel")}

# (dtype, head dim, feature set): every flag appears at least once, across dtypes and head dims.
VARIANTS = [
    (torch.bfloat16, 128, dict()),
    (torch.bfloat16, 128, dict(adapter=True, mask=True, xg="sample")),
    (torch.float16, 64, dict(adapter=True, causal=False, key_mask=True)),
    (torch.float32, 80, dict(adapter=True, mask=True, xg="position", key_lengths=True)),
    (torch.bfloat16, 64, dict(adapter=True, mask=True, xg="sample", varlen=True)),
    (torch.float16, 256, dict(adapter=True, per_sample=True, xg="sample")),
    (torch.bfloat16, 128, dict(mask=True, key_mask=True)),
]


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


def record_launches(dtype: torch.dtype, head_dim: int, features: dict) -> list:
    """Run the forward and backward launchers on placeholder tensors, recording each kernel launch."""
    launches: list = []
    originals = {}
    for name, (module, attr) in KERNELS.items():
        originals[name] = getattr(module, attr)
        setattr(module, attr, _Recorder(name, launches))
    try:
        batch, heads_q, heads_kv, n, m = (1 if features.get("varlen") else 2), 8, 2, 256, 10
        q = torch.empty(batch, heads_q, n, head_dim, dtype=dtype)
        k = v = torch.empty(batch, heads_kv, n, head_dim, dtype=dtype)
        adapter_shape = (batch, heads_kv, m, head_dim) if features.get("per_sample") else (heads_kv, m, head_dim)
        adapter = torch.empty(adapter_shape, dtype=dtype) if features.get("adapter") else None
        stats = torch.empty(batch, heads_q, n)
        xg_tokens = 2 if features.get("xg") else 0
        common = dict(
            causal=features.get("causal", True), scale=head_dim ** -0.5,
            key_lengths=torch.empty(batch, dtype=torch.int32) if features.get("key_lengths") else None,
            key_mask=torch.empty(batch, n, dtype=torch.uint8) if features.get("key_mask") else None,
            cu_seqlens=torch.tensor([0, 100, 256], dtype=torch.int32) if features.get("varlen") else None,
            max_seqlen=156 if features.get("varlen") else n, adapter_keys=adapter, adapter_values=adapter,
            gamma=torch.empty(heads_q) if adapter is not None else None,
            mask_bits=torch.zeros(batch, n, n // 32, dtype=torch.int32) if features.get("mask") else None,
            xg_tokens=xg_tokens, xg_weight=torch.empty(batch, n) if features.get("xg") == "sample" else None,
            xg_pooled=features.get("xg") == "sample", num_samples=2)
        attention_fwd.attention_forward(q, k, v, **common)
        grad_xg = (torch.empty(2, heads_q, head_dim) if common["xg_pooled"] else torch.empty(batch, heads_q, n, head_dim)) \
            if xg_tokens else None
        attention_bwd.attention_backward(
            torch.empty_like(q), None, stats if features.get("mask") else None, grad_xg, q, k, v, q, stats,
            stats if adapter is not None else None, stats if features.get("mask") else None, **common)
    finally:
        for name, (module, attr) in KERNELS.items():
            setattr(module, attr, originals[name])
    return launches


def _signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    signature, constants = {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = args[index] if index < len(args) else kwargs[name]
        if param.is_constexpr:
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return signature, constants


def compile_launch(launch: tuple) -> str:
    name, args, kwargs = launch
    module, attr = KERNELS[name]
    kernel = getattr(module, attr)
    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    signature, constants = _signature(kernel, args, kwargs)
    start = time.time()
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=TARGET, options=options)
    flags = ",".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() and v not in (False, 0))
    if compiled.metadata.shared > SHARED_MEMORY_LIMIT:  # compiles, but the launch would fail
        raise RuntimeError(f"{name} needs {compiled.metadata.shared} B of shared memory (> {SHARED_MEMORY_LIMIT}): {flags}")
    return f"{name:5s} {compiled.metadata.shared:6d} B shared  {time.time() - start:4.1f} s  {flags}"


def main() -> int:
    launches = {}
    for dtype, head_dim, features in VARIANTS:
        for launch in record_launches(dtype, head_dim, features):
            name, args, kwargs = launch
            kernel = getattr(*KERNELS[name])
            key = (name, repr(_signature(kernel, args, kwargs)), kwargs.get("num_warps"), kwargs.get("num_stages"))
            launches.setdefault(key, launch)
    failures = 0
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(compile_launch, launch) for launch in launches.values()]
        for future in futures:
            try:
                print(future.result(), flush=True)
            except Exception as error:  # report every failing variant, not only the first
                failures += 1
                print(f"FAILED: {type(error).__name__}: {error}", flush=True)
    print(f"{len(launches) - failures} of {len(launches)} kernel variants compiled for {TARGET.backend} sm_{TARGET.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
