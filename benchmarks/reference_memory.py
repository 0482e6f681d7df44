"""Wall time and peak memory of the CPU reference paths: `attention_dense` vs `attention_chunked`.

Plain causal attention (no adapter, no supervision), forward + backward, float32, B = 1, Hq = Hkv = 8,
d = 64, over N in {1024, ..., 16384}. Each (provider, N) case runs in a fresh subprocess, so the peak
resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`) is that case's alone; the table reports it
minus the process's RSS after imports (torch, causalattn), so the number covers the inputs, outputs,
gradients and everything the op allocates. Dense cases whose B x H x N x N fp32 score tensor alone
would exceed `--max-dense-gb` are skipped and recorded as such.

Run from the repository root:

    python3 -m benchmarks.reference_memory                      # full sweep, writes benchmarks/results/
    python3 -m benchmarks.reference_memory --seq-lens 1024 2048 --repeats 1

Writes `<out-dir>/reference_memory_<tag>.csv` and `.json` (rows plus machine info: platform, CPU,
core count, memory, torch version, threads, git commit, date) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ("dense", "chunked")
DEFAULT_SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
BATCH, HEADS, HEAD_DIM = 1, 8, 64
BYTES_FP32 = 4
GB = 1e9  # decimal units throughout: MB = 1e6 bytes, GB = 1e9 bytes
MB = 1e6

FIELDS = ("provider", "seq_len", "batch", "heads", "head_dim", "dtype", "causal", "status", "rows_per_block",
          "fwd_bwd_s_median", "fwd_bwd_s_min", "repeats", "peak_rss_delta_mb", "baseline_rss_mb",
          "io_tensors_mb", "dense_scores_gb")


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def dense_scores_gb(seq_len: int) -> float:
    """Size of one B x H x N x N fp32 score tensor (the dense path holds several)."""
    return BATCH * HEADS * seq_len * seq_len * BYTES_FP32 / GB


def io_tensors_mb(seq_len: int) -> float:
    """q, k, v, out, dout, dq, dk, dv: what any implementation holds for one fwd + bwd."""
    return 8 * BATCH * HEADS * seq_len * HEAD_DIM * BYTES_FP32 / MB


# ---------------------------------------------------------------------------------------- one case
def run_case(provider: str, seq_len: int, repeats: int, budget_s: float, seed: int) -> dict[str, Any]:
    """Runs inside the child process: time `repeats` fwd + bwd passes after one warm-up pass."""
    import torch

    from causalattn import attention_chunked, attention_dense
    from causalattn.reference import _SCORES_PER_BLOCK

    baseline = _max_rss_bytes()
    torch.manual_seed(seed)
    shape = (BATCH, HEADS, seq_len, HEAD_DIM)
    q, k, v = (torch.randn(shape, dtype=torch.float32, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, dtype=torch.float32)
    op = attention_dense if provider == "dense" else attention_chunked

    def step() -> float:
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        out = op(q, k, v, causal=True).out
        out.backward(dout)
        return time.perf_counter() - start

    warm = step()
    # Long cases are timed once after the warm-up: their run-to-run spread is small next to their length.
    n_runs = repeats if warm * repeats <= budget_s else 1
    times = [step() for _ in range(n_runs)]
    rows = None
    if provider == "chunked":  # mirror attention_chunked's default block choice
        per_row = max(1, BATCH * HEADS * seq_len)
        rows = min(seq_len, 1 << max(4, min(10, (_SCORES_PER_BLOCK // per_row).bit_length() - 1)))
    return {
        "status": "ok",
        "rows_per_block": rows,
        "fwd_bwd_s_median": statistics.median(times),
        "fwd_bwd_s_min": min(times),
        "repeats": n_runs,
        "peak_rss_delta_mb": (_max_rss_bytes() - baseline) / MB,
        "baseline_rss_mb": baseline / MB,
        "threads": torch.get_num_threads(),
    }


def _spawn_case(provider: str, seq_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one case in a fresh interpreter and parse its one-line JSON answer."""
    command = [sys.executable, "-m", "benchmarks.reference_memory", "--case", provider, str(seq_len),
               "--repeats", str(args.repeats), "--budget-s", str(args.budget_s), "--seed", str(args.seed)]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.case_timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timeout after {args.case_timeout_s:.0f} s)"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        why = "killed, out of memory?" if done.returncode in (-9, 137) else f"rc={done.returncode}: {tail}"
        return {"status": f"failed ({why})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- the sweep
def machine_info() -> dict[str, Any]:
    import torch

    def git(*cmd: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| N | provider | fwd+bwd (s) | peak RSS over baseline (MB) | q,k,v,out + grads (MB) | "
             "one dense N×N fp32 score tensor (GB) | status |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {r['provider']} | {_fmt(r.get('fwd_bwd_s_median'), 2)} | "
                     f"{_fmt(r.get('peak_rss_delta_mb'), 0)} | {r['io_tensors_mb']:.0f} | "
                     f"{r['dense_scores_gb']:.2f} | {r['status']} |")
    return "\n".join(lines)


def sweep(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for seq_len in args.seq_lens:
        for provider in args.providers:
            row: dict[str, Any] = {
                "provider": provider, "seq_len": seq_len, "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM,
                "dtype": "float32", "causal": True, "io_tensors_mb": round(io_tensors_mb(seq_len), 1),
                "dense_scores_gb": round(dense_scores_gb(seq_len), 3),
            }
            predicted = dense_scores_gb(seq_len)
            if provider == "dense" and predicted > args.max_dense_gb:
                row["status"] = f"skipped (would need {predicted:.1f} GB for one score tensor)"
            else:
                started = time.perf_counter()
                row.update(_spawn_case(provider, seq_len, args))
                row["case_wall_s"] = round(time.perf_counter() - started, 1)
            for key in ("fwd_bwd_s_median", "fwd_bwd_s_min", "peak_rss_delta_mb", "baseline_rss_mb"):
                if isinstance(row.get(key), float):
                    row[key] = round(row[key], 4 if key.startswith("fwd") else 1)
            rows.append(row)
            result = (f"fwd+bwd {row['fwd_bwd_s_median']:.3f} s, peak {row['peak_rss_delta_mb']:.0f} MB"
                      if row["status"] == "ok" else row["status"])
            print(f"N={seq_len:6d} {provider:8s} {result}", flush=True)

    info = machine_info()
    threads = next((r["threads"] for r in rows if "threads" in r), info["torch_threads"])
    config = {"batch": BATCH, "heads_q": HEADS, "heads_kv": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
              "causal": True, "pass": "forward + backward (out.backward(random dout))",
              "timing": "median of repeats after one warm-up pass (one repeat when a pass is long)",
              "memory": "peak RSS of the case's own process minus its RSS after imports", "threads": threads,
              "max_dense_gb": args.max_dense_gb}
    stem = out_dir / f"reference_memory_{args.tag}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"benchmark": "reference_memory", "machine": info, "config": config, "results": rows}, f, indent=2)
        f.write("\n")
    print()
    print(f"{info['cpu']} ({info['cpu_count']} cores, {info['memory_gb']} GB), torch {info['torch']}, "
          f"{threads} threads; B={BATCH} H={HEADS} d={HEAD_DIM} causal fp32 fwd+bwd")
    print(markdown_table(rows))
    print(f"\nwrote {stem.with_suffix('.csv').name} and {stem.with_suffix('.json').name} in {out_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--max-dense-gb", type=float, default=8.0,
                        help="skip dense cases whose B*H*N*N fp32 scores exceed this many GB (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up (default 3)")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="time one pass only when repeats x (warm-up time) exceeds this (default 60)")
    parser.add_argument("--case-timeout-s", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="cpu", help="suffix of the result files (default cpu)")
    parser.add_argument("--case", nargs=2, metavar=("PROVIDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        provider, seq_len = args.case[0], int(args.case[1])
        if provider not in PROVIDERS:
            parser.error(f"--case: provider must be one of {PROVIDERS}, got {provider!r}")
        print(json.dumps(run_case(provider, seq_len, args.repeats, args.budget_s, args.seed)))
        return 0
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
