"""Paired, interleaved timing of providers against SDPA: ratios that hold on a shared machine.

    python -m benchmarks.paired                                   # the CPU acceptance shapes, composed vs SDPA
    python -m benchmarks.paired --seq-lens 1024 --rounds 30 --providers sdpa-flash composed composed+all
    python -m benchmarks.paired --supervised 0.03 0.3 1.0 --competing-load 2   # densities, a busy machine

The harness times one case after another, so load that comes and goes between two cases moves their
ratio. Here every round runs each provider once (fwd+bwd, in a fresh order per round) and the ratio of
each provider to the baseline is taken within the round; the reported ratio is the median over rounds,
with its 20/80 % quantiles. Rows go to `benchmarks/results/paired-<device>.csv` with the machine,
versions and commit (upserted by device, provider, shape and load).

`--supervised` sets the fraction of query rows with causes (default: CAT-style documents, 3.1 %);
`--competing-load T` runs another process with T threads of matrix products for the whole measurement,
as a shared machine would: SDPA and the provider both run beside it, so the ratio shows what the load
costs the provider beyond what it costs SDPA.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from benchmarks.harness import DEFAULT_OUT, SHAPE_FIELDS, _reset_grads, machine_fields, make_step, pick_device, upsert_rows
from benchmarks.providers import CAT_DOCUMENT_DENSITY, PROVIDERS, Shape, make_problem

FIELDS = ("date", "device", "device_type", "torch", "triton", "git_commit", "provider", "baseline", "mode",
          *SHAPE_FIELDS, "competing_threads", "rounds", "median_ms", "ratio", "ratio_q20", "ratio_q80")
KEY = ("device", "provider", "baseline", "mode", *SHAPE_FIELDS, "competing_threads")
DEFAULT_PROVIDERS = ("sdpa-flash", "composed", "composed+adapter", "composed+all")


def measure(shape: Shape, providers: Sequence[str], device: torch.device, rounds: int,
            seed: int = 0) -> dict[str, list[float]]:
    """{provider: [ms per round]}; each round runs every provider's fwd+bwd once, in a shuffled order."""
    problem = make_problem(shape, device)
    steps = {name: make_step(PROVIDERS[name].build(problem), problem, "fwd+bwd") for name in providers}
    order = list(providers)
    shuffle = random.Random(seed)
    for step in steps.values():  # warm-up: caches, allocator, threads
        _reset_grads(problem.leaves())
        step()
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            _reset_grads(problem.leaves())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def paired_rows(shape: Shape, times: dict[str, list[float]], baseline: str) -> list[dict[str, Any]]:
    rows = []
    for name, values in times.items():
        ratios = [t / b for t, b in zip(values, times[baseline])]
        cuts = statistics.quantiles(ratios, n=5, method="inclusive")
        rows.append({"provider": name, "baseline": baseline, "mode": "fwd+bwd",
                     **{f: getattr(shape, f) for f in SHAPE_FIELDS}, "rounds": len(values),
                     "median_ms": statistics.median(values), "ratio": statistics.median(ratios),
                     "ratio_q20": cuts[0], "ratio_q80": cuts[3]})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cpu")
    parser.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=sorted(PROVIDERS))
    parser.add_argument("--baseline", default="sdpa-flash", choices=sorted(PROVIDERS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=0, help="rounds per shape (default: 25 at N <= 1024, else 9)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--supervised", nargs="+", type=float, default=[CAT_DOCUMENT_DENSITY],
                        help="fractions of query rows with causes (default: CAT-style documents, 3.1 %%)")
    parser.add_argument("--competing-load", type=int, default=0, metavar="THREADS",
                        help="run a competing process with this many threads of matmuls meanwhile")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    providers = list(dict.fromkeys([args.baseline, *args.providers]))
    machine = machine_fields(device, "paired")
    path = args.out / f"paired-{device.type}.csv"
    print(f"paired fwd+bwd on {machine['device']} (torch {machine['torch']}, commit {machine['git_commit']}) -> {path}")
    load = f", beside a {args.competing_load}-thread load" if args.competing_load else ""
    print(f"{'N':>6s} {'rows':>6s} {'provider':18s} {'median ms':>10s} {'x ' + args.baseline:>16s} {'q20-q80':>12s}{load}")
    with competing_load(args.competing_load):
        for n in args.seq_lens:
            for supervised in args.supervised:
                shape = Shape(batch=1, seq_len=n, heads_q=args.heads, heads_kv=args.heads, head_dim=args.head_dim,
                              adapter_len=10, xg_tokens=2, dtype=args.dtype, supervised=supervised)
                rounds = args.rounds or (25 if n <= 1024 else 9)
                rows = paired_rows(shape, measure(shape, providers, device, rounds), args.baseline)
                stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                upsert_rows(path, [{"date": stamp, **machine, **row, "competing_threads": args.competing_load}
                                   for row in rows], FIELDS, KEY)
                for row in rows:
                    print(f"{n:6d} {supervised:6.1%} {row['provider']:18s} {row['median_ms']:10.2f} "
                          f"{row['ratio']:16.3f} {row['ratio_q20']:.3f}-{row['ratio_q80']:.3f}", flush=True)
    return 0


_LOAD_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def competing_load(threads: int) -> Iterator[None]:
    """Another process keeping `threads` cores busy with matrix products while the block runs."""
    if threads <= 0:
        yield
        return
    load = subprocess.Popen([sys.executable, "-c", _LOAD_SCRIPT, str(threads)])
    try:
        time.sleep(1.0)  # let it start before the first round
        yield
    finally:
        load.kill()
        load.wait()


if __name__ == "__main__":
    sys.exit(main())
