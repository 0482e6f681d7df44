"""Compile the fused-attention kernels for sm_90a the way the JIT does, without a GPU, and report them.

The Triton interpreter runs the kernels' arithmetic on the CPU but skips the compiler, so code that
only the compiler rejects (a non-constexpr global, a type that changes across a loop, a dot shape
the target lacks) would otherwise surface first on a GPU machine. This script runs the real launchers
with a recording stand-in for each kernel, specializes every recorded launch with the JIT's own binder
(pointers and ints divisible by 16 get `tt.divisibility`, ints equal to 1 become constants: without
that the loads are not vectorised, nothing is pipelined through shared memory and the shared-memory
figure under-counts by up to 2x), compiles it for sm_90a, and reads what ptxas reports:

    python tests/compile_kernels.py                  # the CI subset; exits 1 on a failure
    python tests/compile_kernels.py --full --csv benchmarks/results/kernel_static_sm90.csv \
        --md benchmarks/results/kernel_static_sm90.md

Per kernel variant: tiles, warps, stages, registers, spill bytes (ptxas -v), shared bytes, and per
innermost loop of the SASS the tensor-core instructions (HGMMA), barriers, shared-memory stores (a
layout conversion or transpose through shared memory shows up as STS inside the loop) and
local-memory accesses (spill traffic where it costs: in the loop). Fails on a compile error, on
shared memory over the sm_90 limit, and on any spill in a plain (no-feature) bf16/fp16 kernel at
d = 64 or 128; spills of the feature variants are reported, not failed.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (the interpreter never compiles)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from causalattn.kernels import attention_bwd, attention_fwd  # noqa: E402
from causalattn.kernels.arguments import OpFlags, OpGrads, OpInputs, OpOutputs  # noqa: E402
from causalattn.kernels.jit_helpers import slot_segments  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
KERNELS = {"fwd": (attention_fwd, "_fwd_kernel"), "rows": (attention_bwd, "_bwd_rows_kernel"),
           "dkdv": (attention_bwd, "_bwd_dkdv_kernel"), "dq": (attention_bwd, "_bwd_dq_kernel")}
_NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS, CUOBJDUMP = os.path.join(_NVIDIA_BIN, "ptxas"), os.path.join(_NVIDIA_BIN, "cuobjdump")


@dataclass(frozen=True)
class Variant:
    """One feature set at one dtype and head dim; `ci` variants run in the default (CI) subset."""
    dtype: torch.dtype
    head_dim: int
    features: dict = field(default_factory=dict)
    ci: bool = False

    @property
    def plain(self) -> bool:
        return not set(self.features) - {"causal"}

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
        flags = "+".join(f"{k}={v}" if not isinstance(v, bool) else (k if v else f"no-{k}")
                         for k, v in self.features.items())
        return f"{dtype} d={self.head_dim} {flags or 'plain'}"


# Every flag appears at least once, across dtypes and head dims; the plain half-precision kernels at
# d = 64/128 (the ones that must not spill) and the all-features bf16 d = 128 set form the CI subset.
VARIANTS = [
    Variant(torch.bfloat16, 128, ci=True),
    Variant(torch.float16, 64, ci=True),
    Variant(torch.bfloat16, 128, dict(adapter=True, mask=True, xg="sample"), ci=True),
    Variant(torch.bfloat16, 64, dict(adapter=True, mask=True, xg="sample", varlen=True), ci=True),
    Variant(torch.bfloat16, 128, dict(causal=False)),
    Variant(torch.float16, 64, dict(adapter=True, causal=False, key_mask=True)),
    Variant(torch.float32, 80, dict(adapter=True, mask=True, xg="position", key_lengths=True)),
    Variant(torch.float16, 256, dict(adapter=True, per_sample=True, xg="sample")),
    Variant(torch.bfloat16, 128, dict(mask=True, key_mask=True)),
    Variant(torch.bfloat16, 128, dict(adapter=True)),
    Variant(torch.bfloat16, 64, dict(adapter=True, mask=True, xg="sample")),
    Variant(torch.bfloat16, 128, dict(adapter=True, segments=2, gate="sample", mask=True, xg="sample"), ci=True),
]


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


def record_launches(variant: Variant) -> list:
    """Run the forward and backward launchers on placeholder tensors, recording each kernel launch.

    Sizes are LLaMA-like (N = 1024, 8 query heads over 2 KV heads), so strides, lengths and the mask's
    word count are multiples of 16 as at real sizes and the JIT specializes them the same way."""
    features, dtype, head_dim = variant.features, variant.dtype, variant.head_dim
    launches: list = []
    originals = {}
    for name, (module, attr) in KERNELS.items():
        originals[name] = getattr(module, attr)
        setattr(module, attr, _Recorder(name, launches))
    try:
        batch, heads_q, heads_kv, n, m = (1 if features.get("varlen") else 2), 8, 2, 1024, 10
        q = torch.empty(batch, heads_q, n, head_dim, dtype=dtype)
        k = v = torch.empty(batch, heads_kv, n, head_dim, dtype=dtype)
        adapter_shape = (batch, heads_kv, m, head_dim) if features.get("per_sample") else (heads_kv, m, head_dim)
        adapter = torch.empty(adapter_shape, dtype=dtype) if features.get("adapter") else None
        segments = features.get("segments", 1)  # 1, or 2: the M = 10 slots as 4 + 6
        stats = torch.empty(batch, heads_q, n)
        xg_tokens = 2 if features.get("xg") else 0
        inputs = OpInputs(
            q=q, k=k, v=v, adapter_keys=adapter, adapter_values=adapter,
            gamma=torch.empty(batch if features.get("gate") == "sample" else 1, segments, heads_q)
            if adapter is not None else None,
            key_lengths=torch.empty(batch, dtype=torch.int32) if features.get("key_lengths") else None,
            key_mask=torch.empty(batch, n, dtype=torch.uint8) if features.get("key_mask") else None,
            cu_seqlens=torch.tensor([0, 400, n], dtype=torch.int32) if features.get("varlen") else None,
            mask_bits=torch.zeros(batch, n, n // 32, dtype=torch.int32) if features.get("mask") else None,
            xg_weight=torch.empty(batch, n) if features.get("xg") == "sample" else None,
            slot_segment=slot_segments((4, m - 4), torch.device("cpu")) if segments == 2 else None)
        flags = OpFlags(causal=features.get("causal", True), scale=head_dim ** -0.5,
                        max_seqlen=n - 400 if features.get("varlen") else n, xg_tokens=xg_tokens,
                        xg_pooled=features.get("xg") == "sample", num_samples=2)
        attention_fwd.attention_forward(inputs, flags)
        grad_xg = (torch.empty(2, heads_q, head_dim) if flags.xg_pooled else torch.empty(batch, heads_q, n, head_dim)) \
            if xg_tokens else None
        mass = stats if features.get("mask") else None
        attention_bwd.attention_backward(
            OpGrads(torch.empty_like(q), None, mass, grad_xg), inputs,
            OpOutputs(q, stats, stats if adapter is not None else None, mass, None), flags)
    finally:
        for name, (module, attr) in KERNELS.items():
            setattr(module, attr, originals[name])
    return launches


def specialize(kernel, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) exactly as `JITFunction.run` derives them for sm_90."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def loop_profile(cubin: bytes) -> list[dict]:
    """Per innermost loop of the SASS, in program order: instructions, tensor-core instructions (HGMMA), barriers
    (BAR.SYNC), shared-memory stores (STS/STSM: a layout conversion or transpose through shared
    memory) and local-memory accesses (STL/LDL: spill traffic inside the loop).

    A loop is a backward branch; innermost means no other loop inside it."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout
    instructions = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    profile = []
    for lo, hi in sorted(innermost):
        body = [text for address, text in instructions if lo <= address <= hi]
        profile.append(dict(instructions=len(body), wgmma=sum("HGMMA" in t for t in body), barriers=sum("BAR.SYNC" in t for t in body),
                            shared_stores=sum(bool(re.search(r"\bSTS(M)?\b", t)) for t in body),
                            local=sum(bool(re.search(r"\b(STL|LDL)\b", t)) for t in body)))
    return profile


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        log = subprocess.run([PTXAS, "-v", f"--gpu-name=sm_{TARGET.arch}a", path, "-o", path + ".o"],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def compile_launch(job: tuple) -> dict:
    variant, (name, args, kwargs) = job
    module, attr = KERNELS[name]
    kernel = getattr(module, attr)
    signature, constexprs, attrs, options = specialize(kernel, args, kwargs)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = ptxas_usage(ptx)
    loops = loop_profile(compiled.asm["cubin"])
    tiles = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}" if "BLOCK_N" in kwargs else f"{kwargs['BLOCK_M']}"
    return dict(kernel=name, variant=variant.name, plain=variant.plain, tiles=tiles, warps=options.num_warps,
                stages=options.num_stages, registers=registers, spill_stores=spill_stores, spill_loads=spill_loads,
                shared=compiled.metadata.shared,
                **{f"{key}_per_loop": "/".join(str(loop[key]) for loop in loops) or "-"
                   for key in ("instructions", "wgmma", "barriers", "shared_stores", "local")})


def problems(row: dict, variant: Variant) -> list[str]:
    found = []
    if row["shared"] > SHARED_MEMORY_LIMIT:  # compiles, but the launch would fail
        found.append(f"needs {row['shared']} B of shared memory (> {SHARED_MEMORY_LIMIT})")
    if (variant.plain and variant.dtype in (torch.bfloat16, torch.float16) and variant.head_dim in (64, 128)
            and (row["spill_stores"] or row["spill_loads"])):
        found.append(f"spills {row['spill_stores']} B / reloads {row['spill_loads']} B in a plain kernel "
                     f"(local-memory accesses per loop {row['local_per_loop']})")
    return found


COLUMNS = ["kernel", "variant", "tiles", "warps", "stages", "registers", "spill_stores", "spill_loads", "shared",
           "instructions_per_loop", "wgmma_per_loop", "barriers_per_loop", "shared_stores_per_loop", "local_per_loop"]


def write_tables(rows: list[dict], csv_path: str | None, md_path: str | None) -> None:
    if csv_path:
        with open(csv_path, "w", newline="") as file:
            writer = csv.DictWriter(file, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    if md_path:
        with open(md_path, "w") as file:
            file.write(f"# Fused-attention kernels compiled for sm_{TARGET.arch}a (Triton {triton.__version__}, "
                       "JIT specialization)\n\n"
                       "Regenerate: `python tests/compile_kernels.py --full --csv <csv> --md <md>`. Registers and "
                       "spill bytes from ptxas -v; shared bytes from the compiled kernel; per innermost loop of the "
                       "SASS (in program order): instructions, HGMMA instructions, barriers, shared-memory stores, local-memory "
                       "(spill) accesses.\n\n")
            file.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
            for row in rows:
                file.write("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every variant (default: the CI subset)")
    parser.add_argument("--csv", help="write the table as CSV here")
    parser.add_argument("--md", help="write the table as Markdown here")
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), help="compile only these kernels")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    options = parser.parse_args(argv)
    jobs = {}
    for variant in VARIANTS:
        if not (options.full or variant.ci):
            continue
        for launch in record_launches(variant):
            name, args, kwargs = launch
            if options.kernels and name not in options.kernels:
                continue
            kernel = getattr(*KERNELS[name])
            signature, constexprs, attrs, compile_options = specialize(kernel, args, kwargs)
            key = (name, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs)),
                   compile_options.num_warps, compile_options.num_stages)
            jobs.setdefault(key, (variant, launch))
    failures, rows = 0, []
    print("  ".join(f"{c:>10.10s}" if i > 1 else f"{c:<{6 if i == 0 else 44}s}" for i, c in enumerate(COLUMNS)))
    with ProcessPoolExecutor(max_workers=options.jobs) as pool:
        futures = [(job[0], pool.submit(compile_launch, job)) for job in jobs.values()]
        for variant, future in futures:
            try:
                row = future.result()
            except Exception as error:  # report every failing variant, not only the first
                failures += 1
                print(f"FAILED {variant.name}: {type(error).__name__}: {error}", flush=True)
                continue
            rows.append(row)
            print("  ".join(f"{row[c]!s:>10s}" if i > 1 else f"{row[c]!s:<{6 if i == 0 else 44}s}"
                            for i, c in enumerate(COLUMNS)), flush=True)
            for problem in problems(row, variant):
                failures += 1
                print(f"FAILED {row['kernel']} {variant.name}: {problem}", flush=True)
    write_tables(rows, options.csv, options.md)
    print(f"{len(jobs)} kernel variants compiled for {TARGET.backend} sm_{TARGET.arch}a, {failures} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
