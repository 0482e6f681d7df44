"""`causalattn demo`: one real forward + backward pass of the reference op, with every feature on.

The demo builds a random causal attention problem with grouped-query heads, a zero-init gated adapter,
a CAT causal mask made from token spans and the XG statistic, then

* runs the memory-lean `attention_chunked` path forward and backward with
  `loss = sum(out * w) + cat_loss(mass) + xg_variance(xg)`,
* runs the same thing through the dense formula and prints the largest differences of the outputs and
  of every gradient,
* repeats the chunked pass with the gate at 0 to show the zero-init property: the adapter keys and
  values get exactly zero gradient while the gate's gradient is not zero.

Everything runs on the CPU; the default size (N = 512) takes a few seconds.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from causalattn.inputs import Adapter, AttentionOutput
from causalattn.losses import cat_loss, xg_variance
from causalattn.masks import CausalMask, EffectCauses
from causalattn.reference import attention_chunked, attention_dense

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# The problem the demo solves (all but N fixed, so runs are comparable).
BATCH, HEADS_Q, HEADS_KV, HEAD_DIM = 2, 8, 2, 64
ADAPTER_TOKENS, XG_TOKENS = 10, 2

GRAD_NAMES = ("q", "k", "v", "Ka", "Va", "gate")  # Ka, Va, gate: the adapter's keys, values, gate


@dataclass
class DemoProblem:
    """Random inputs of one demo run (leaf tensors; gradients land in `.grad`)."""

    q: Tensor
    k: Tensor
    v: Tensor
    adapter_keys: Tensor
    adapter_values: Tensor
    gate: Tensor
    out_weight: Tensor  # w in sum(out * w): a random upstream gradient for `out`
    o_proj_weight: Tensor  # (C, Hq * d) output projection for the XG variance
    mask: CausalMask

    def leaves(self) -> tuple[Tensor, ...]:
        return (self.q, self.k, self.v, self.adapter_keys, self.adapter_values, self.gate)


@dataclass
class PassResult:
    """Outputs, loss terms and gradients of one forward + backward pass."""

    outputs: AttentionOutput
    cat: float
    xg_var: float
    grads: dict[str, Tensor]
    seconds: float


@dataclass
class DemoReport:
    """Everything the demo prints, as numbers (used by tests)."""

    seq_len: int
    dtype: str
    rows_per_block: int
    shapes: dict[str, tuple[int, ...]]
    supervised_rows: int
    cat_loss: float
    xg_variance: float
    max_diff: dict[str, float]
    max_abs: dict[str, float]
    gate_grad: list[float]
    chunked_seconds: float
    dense_seconds: float
    peak_rss_mb: float
    zero_init: dict[str, float] = field(default_factory=dict)


def random_spans(seq_len: int, batch: int, generator: torch.Generator,
                 effects: Optional[int] = None) -> list[list[EffectCauses]]:
    """Random CAT annotations in token space: per sample, `effects` (default N / 32) effect spans of
    1-4 tokens, each caused by 1-3 spans of 1-6 tokens that end at least one token before the effect."""
    effects = max(4, seq_len // 32) if effects is None else effects

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    spans: list[list[EffectCauses]] = []
    for _ in range(batch):
        pairs: list[EffectCauses] = []
        for _ in range(effects):
            length = randint(1, min(4, max(1, seq_len // 16)))
            e0 = randint(max(8, seq_len // 4), seq_len - length)
            causes = []
            for _ in range(randint(1, 3)):
                c_len = randint(1, min(6, e0 - 2))
                c0 = randint(0, e0 - 1 - c_len)  # c1 = c0 + c_len <= e0 - 1 < e0
                causes.append((c0, c0 + c_len))
            pairs.append(((e0, e0 + length), causes))
        spans.append(pairs)
    return spans


def make_problem(seq_len: int, seed: int, dtype: torch.dtype, gate: Optional[float] = None) -> DemoProblem:
    """Random problem of the demo's shape; `gate=None` draws a random gate per query head."""
    if seq_len < 32:
        raise ValueError(f"seq_len: expected at least 32 (room for cause and effect spans), got {seq_len}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).requires_grad_()

    q = randn(BATCH, HEADS_Q, seq_len, HEAD_DIM)
    k = randn(BATCH, HEADS_KV, seq_len, HEAD_DIM)
    v = randn(BATCH, HEADS_KV, seq_len, HEAD_DIM)
    adapter_keys = randn(HEADS_KV, ADAPTER_TOKENS, HEAD_DIM)
    adapter_values = randn(HEADS_KV, ADAPTER_TOKENS, HEAD_DIM)
    if gate is None:
        gate_t = randn(HEADS_Q, std=0.5)
    else:
        gate_t = torch.full((HEADS_Q,), float(gate), dtype=dtype, requires_grad=True)
    out_weight = torch.randn(BATCH, HEADS_Q, seq_len, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype)
    width = HEADS_Q * HEAD_DIM
    o_proj_weight = (torch.randn(width, width, generator=g, dtype=torch.float64) / math.sqrt(width)).to(dtype)
    mask = CausalMask.from_spans(random_spans(seq_len, BATCH, g), seq_len)
    return DemoProblem(q, k, v, adapter_keys, adapter_values, gate_t, out_weight, o_proj_weight, mask)


def run_pass(problem: DemoProblem, attention: Callable[..., AttentionOutput], **kwargs: object) -> PassResult:
    """One forward + backward pass of `attention` with loss = sum(out * w) + CAT loss + XG variance."""
    for leaf in problem.leaves():
        leaf.grad = None
    start = time.perf_counter()
    adapter = Adapter(problem.adapter_keys, problem.adapter_values, problem.gate)
    res = attention(problem.q, problem.k, problem.v, causal=True, adapter=adapter,
                    supervision=problem.mask, xg_tokens=XG_TOKENS, **kwargs)
    cat = cat_loss(res.mass, problem.mask)
    xg_var = xg_variance(res.xg, problem.o_proj_weight)
    acc = torch.promote_types(res.out.dtype, torch.float32)  # fp32, or fp64 for float64 inputs
    loss = (res.out.to(acc) * problem.out_weight.to(acc)).sum() + cat + xg_var
    loss.backward()
    seconds = time.perf_counter() - start
    grads = {name: leaf.grad.detach().clone() for name, leaf in zip(GRAD_NAMES, problem.leaves())}
    detached = AttentionOutput(*(t.detach() if t is not None else None for t in res))
    return PassResult(detached, cat.item(), xg_var.item(), grads, seconds)


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def default_rows_per_block(seq_len: int) -> int:
    """Blocks of N/4 rows (16 to 128), so even a short demo splits the rows into several blocks."""
    return min(128, max(16, seq_len // 4))


def run_demo(seq_len: int = 512, seed: int = 0, dtype: str = "float32",
             rows_per_block: Optional[int] = None) -> DemoReport:
    """Run the demo and return its numbers (no printing)."""
    if rows_per_block is None:
        rows_per_block = default_rows_per_block(seq_len)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block: expected a positive int, got {rows_per_block}")
    torch_dtype = DTYPES[dtype]
    problem = make_problem(seq_len, seed, torch_dtype)
    run_pass(problem, attention_dense)  # warm-up (first-touch allocations), so the timings compare
    run_pass(problem, attention_chunked, rows_per_block=rows_per_block)
    chunked = run_pass(problem, attention_chunked, rows_per_block=rows_per_block)
    dense = run_pass(problem, attention_dense)

    pairs = {"out": (chunked.outputs.out, dense.outputs.out),
             "mass": (chunked.outputs.mass, dense.outputs.mass),
             "xg": (chunked.outputs.xg, dense.outputs.xg)}
    pairs.update({"d" + name: (chunked.grads[name], dense.grads[name]) for name in GRAD_NAMES})
    max_diff = {name: _max_abs_diff(a, b) for name, (a, b) in pairs.items()}
    max_abs = {name: float(b.double().abs().max()) for name, (_, b) in pairs.items()}

    zero = make_problem(seq_len, seed, torch_dtype, gate=0.0)
    at_zero = run_pass(zero, attention_chunked, rows_per_block=rows_per_block)
    zero_init = {
        "max|dKa|": float(at_zero.grads["Ka"].abs().max()),
        "max|dVa|": float(at_zero.grads["Va"].abs().max()),
        "min|dgate|": float(at_zero.grads["gate"].abs().min()),
        "xg_variance": at_zero.xg_var,
    }
    res = chunked.outputs
    return DemoReport(
        seq_len=seq_len, dtype=dtype, rows_per_block=min(rows_per_block, seq_len),
        shapes={"out": tuple(res.out.shape), "lse": tuple(res.lse.shape), "mass": tuple(res.mass.shape),
                "xg": tuple(res.xg.shape)},
        supervised_rows=int(problem.mask.valid_rows().sum()),
        cat_loss=chunked.cat, xg_variance=chunked.xg_var, max_diff=max_diff, max_abs=max_abs,
        gate_grad=[float(x) for x in chunked.grads["gate"].double()],
        chunked_seconds=chunked.seconds, dense_seconds=dense.seconds, peak_rss_mb=peak_rss_mb(),
        zero_init=zero_init,
    )


def format_report(report: DemoReport) -> str:
    """The demo's printed table."""
    def shape(s: Sequence[int]) -> str:
        return "(" + ", ".join(str(x) for x in s) + ")"

    n = report.seq_len
    item = 8 if report.dtype == "float64" else 4  # scores are computed in fp64 or fp32
    scores_mb = BATCH * HEADS_Q * n * n * item / 2**20
    block_mb = BATCH * HEADS_Q * report.rows_per_block * n * item / 2**20
    rows: list[tuple[str, str]] = [
        ("out / lse shape", f"{shape(report.shapes['out'])} / {shape(report.shapes['lse'])}"),
        ("mass / xg shape", f"{shape(report.shapes['mass'])} / {shape(report.shapes['xg'])}"),
        ("supervised rows (valid)", f"{report.supervised_rows} of {BATCH * n}"),
        ("CAT loss (div, alpha=2)", f"{report.cat_loss:.6f}"),
        ("XG variance (output space)", f"{report.xg_variance:.6e}"),
    ]
    for name, value in report.max_diff.items():
        rows.append((f"max |dense - chunked| {name}", f"{value:.3e}  (max |dense| {report.max_abs[name]:.3e})"))
    rows += [
        ("gate gradient (per query head)", " ".join(f"{g:+.3f}" for g in report.gate_grad)),
        ("time fwd+bwd chunked / dense", f"{report.chunked_seconds:.3f} s / {report.dense_seconds:.3f} s"),
        ("scores held: dense / chunked", f"{scores_mb:.1f} MiB / {block_mb:.1f} MiB (one block)"),
        ("process peak RSS", f"{report.peak_rss_mb:.0f} MiB (whole process, both paths)"),
    ]
    width = max(len(k) for k, _ in rows)
    head = (f"causalattn demo: reference backend (CPU), {report.dtype}\n"
            f"problem: B={BATCH} Hq={HEADS_Q} Hkv={HEADS_KV} N={n} d={HEAD_DIM} adapter M={ADAPTER_TOKENS} "
            f"xg_tokens={XG_TOKENS} rows_per_block={report.rows_per_block}\n"
            f"loss = sum(out * w) + cat_loss(mass) + xg_variance(xg)\n")
    table = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
    z = report.zero_init
    zero = (f"zero-init (gate = 0): max|dKa| = {z['max|dKa|']:.3g}  max|dVa| = {z['max|dVa|']:.3g}  "
            f"min|dgate| = {z['min|dgate|']:.3e}  XG variance = {z['xg_variance']:.3g}")
    return head + table + "\n" + zero


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `causalattn demo`."""
    parser.add_argument("--seq-len", type=int, default=512, help="sequence length N (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="input dtype; softmax statistics are fp32 (fp64 for float64) (default float32)")
    parser.add_argument("--rows-per-block", type=int, default=None,
                        help="query rows per block of the chunked path (default N/4, clamped to 16..128)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    """Entry point of `causalattn demo` once arguments are parsed."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run_demo(seq_len=args.seq_len, seed=args.seed, dtype=args.dtype, rows_per_block=args.rows_per_block)
    print(format_report(report))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m causalattn.lab.demo [options]`, the same as `causalattn demo [options]`."""
    parser = argparse.ArgumentParser(prog="causalattn demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
