"""Per-kernel GPU time of one fused-attention step, from the torch profiler.

    python -m benchmarks.kernel_profile --seq-lens 4096 16384 --providers causalattn causalattn+all \
        --csv kernel_profile.csv

For each (provider, N, mode) the step runs a few times under torch.profiler and the CUDA kernels are
summed by name: where a step's time goes (the forward kernel, the three backward kernels, and the glue
around them: tile summaries, XG weights, reductions, copies). Shapes follow the kernel-core preset
(B x N = 16k tokens, Hq = 32, Hkv = 8, d = 128, M = 10, bf16). Needs CUDA.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from typing import Optional, Sequence

import torch

from benchmarks.harness import MODES, make_step
from benchmarks.providers import PROVIDERS, Shape, make_problem

FIELDS = ("provider", "mode", "seq_len", "kernel", "calls", "total_us", "share")


def profile_step(provider: str, shape: Shape, mode: str, repeats: int) -> list[dict]:
    """Rows (one per kernel name, largest first) of GPU time per step of `provider` on `shape`."""
    device = torch.device("cuda")
    problem = make_problem(shape, device)
    step = make_step(PROVIDERS[provider].build(problem), problem, mode)
    for _ in range(2):  # compile and autotune outside the profile
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in profiler.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.key][0] += event.count / repeats
            totals[event.key][1] += device_us / repeats
    step_us = sum(us for _, us in totals.values()) or 1.0
    return [dict(provider=provider, mode=mode, seq_len=shape.seq_len, kernel=name[:90], calls=round(calls, 1),
                 total_us=round(us, 1), share=round(us / step_us, 3))
            for name, (calls, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--providers", nargs="+", default=["causalattn", "causalattn+all"], choices=sorted(PROVIDERS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[4096])
    parser.add_argument("--modes", nargs="+", default=["fwd+bwd"], choices=MODES)
    parser.add_argument("--tokens", type=int, default=16384, help="B x N per case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="kernels printed per case")
    parser.add_argument("--csv", help="write every row here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_profile: skipped, no CUDA device")
        return 0
    rows = []
    for provider in args.providers:
        for n in args.seq_lens:
            shape = Shape(batch=max(1, args.tokens // n), seq_len=n, heads_q=32, heads_kv=8, head_dim=128,
                          adapter_len=10, xg_tokens=2, dtype="bfloat16")
            for mode in args.modes:
                case = profile_step(provider, shape, mode, args.repeats)
                rows += case
                step_us = sum(r["total_us"] for r in case)
                print(f"== {provider} N={n} {mode}: {step_us / 1000:.3f} ms of GPU time per step")
                for row in case[:args.top]:
                    print(f"  {row['total_us']:10.1f} us {row['share']:6.1%} x{row['calls']:<5g} {row['kernel']}")
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
