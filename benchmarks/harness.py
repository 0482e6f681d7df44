"""The benchmark harness: sweeps of (shape x provider x mode), timing, peak memory, CSV rows, tables.

    python -m benchmarks --preset kernel-core              # the kernel sweep (CUDA)
    python -m benchmarks --preset all-features             # adapter + CAT + XG vs baselines (CUDA)
    python -m benchmarks --preset cpu                      # reference backend, tiny shapes, < 1 min
    python -m benchmarks --preset smoke                    # one tiny case per provider
    python -m benchmarks --preset kernel-core --seq-lens 4096 --heads-kv 8 --providers causalattn sdpa-flash
    python -m benchmarks --show benchmarks/results/kernel-core.csv [--compact]
    python -m benchmarks --check-determinism               # 5 backward passes, bit-for-bit

Modes: "fwd" (a training forward: grad enabled, the graph freed on return), "bwd" (one forward in
setup, then the backward with the graph retained), "fwd+bwd". The backward pushes the fixed random
`dout` into the attention output and, when the provider computes CAT/XG, the loss scalar's gradient.

Time: CUDA, `triton.testing.do_bench` (median and 20/80 % quantiles, L2 flushed, grads reset between
runs); CPU, a wall-clock timer after the warm-up call. Peak memory (`peak_mb`): the most memory the
case holds during one step, counted from before its inputs were built (inputs, saved state,
gradients, temporaries): CUDA `max_memory_allocated`, reset before the step; CPU the process's peak
RSS (VmHWM, reset through /proc/self/clear_refs; the first case of each provider and mode runs once
unrecorded so that imports and thread start-up do not count), blank where Linux does not provide it.
TFLOP/s follows FlashAttention: 4 B Hq N^2 d, /2 causal, x2.5 backward, x3.5 fwd+bwd; the adapter's
own 4 B Hq N M d (same factors) is listed apart (`adapter_gflop`) and not counted in TFLOP/s.

Cases run by provider priority over all shapes (the fused op, SDPA and the adapter baselines first,
then the N x N-materialising baselines, then the FlexAttention ones that compile per shape), so a
time budget cuts the slow baselines, not the largest N.
Rows are upserted into `<out>/<preset>.csv` after every case (a killed run keeps what it measured);
out-of-memory, unsupported and failing cases become rows with status "oom", "unsupported" (reason in
`note`) or "error: ..."; cases cut by `--time-budget-s` are listed but not written.
"""
from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import datetime as _dt
import gc
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from benchmarks.providers import (CAT_DOCUMENT_DENSITY, PROVIDERS, SDPA_BACKEND_PROVIDERS, Built, Problem, Provider,
                                  Shape, Unsupported, is_missing_kernel, make_problem)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
MIB = 2**20

SHAPE_FIELDS = ("batch", "seq_len", "heads_q", "heads_kv", "head_dim", "adapter_len", "xg_tokens", "dtype", "supervised")
KEY_FIELDS = ("device", "provider", "mode", *SHAPE_FIELDS)
FIELDS = ("date", "device", "device_type", "torch", "triton", "git_commit", "preset", "provider", "features", "mode",
          *SHAPE_FIELDS, "status", "median_ms", "q20_ms", "q80_ms", "tflops", "attn_gflop", "adapter_gflop", "peak_mb",
          "note")


# ------------------------------------------------------------------------------------------ FLOPs
def attention_flops(batch: int, heads_q: int, seq_len: int, head_dim: int, mode: str, causal: bool = True) -> float:
    """FlashAttention's count: 4 B Hq N^2 d for the forward, halved when causal, x2.5 bwd, x3.5 both."""
    flops = 4.0 * batch * heads_q * seq_len * seq_len * head_dim
    return (flops / 2 if causal else flops) * MODE_FLOP_FACTOR[mode]


def adapter_flops(batch: int, heads_q: int, seq_len: int, adapter_len: int, head_dim: int, mode: str) -> float:
    """The adapter branch's extra work: every query against all M adapter keys, never masked."""
    return 4.0 * batch * heads_q * seq_len * adapter_len * head_dim * MODE_FLOP_FACTOR[mode]


# ------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    """A sweep: the shapes are the product of the axes; batch = tokens // N unless `batch` is set.
    dtype "auto" is bfloat16 on CUDA and float32 on CPU."""

    name: str
    providers: tuple[str, ...]
    modes: tuple[str, ...]
    seq_lens: tuple[int, ...]
    heads_kv: tuple[int, ...]
    head_dims: tuple[int, ...] = (128,)
    adapter_lens: tuple[int, ...] = (10,)
    heads_q: int = 32
    tokens: int = 16384
    batch: Optional[int] = None
    xg_tokens: int = 2
    dtype: str = "bfloat16"
    supervised: tuple[float, ...] = (CAT_DOCUMENT_DENSITY,)  # fractions of rows with causes
    # CPU threads (None: torch's default). The CPU presets use one: at their tiny shapes OpenMP
    # synchronisation costs more than a second core gains, and on a shared 2-core machine it made
    # the timings 10-100x slower and noisy.
    cpu_threads: Optional[int] = None

    def shapes(self, device: torch.device) -> list[Shape]:
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        return [Shape(batch=self.batch or max(1, self.tokens // n), seq_len=n, heads_q=self.heads_q, heads_kv=hkv,
                      head_dim=d, adapter_len=m, xg_tokens=min(self.xg_tokens, m), dtype=dtype, supervised=rows)
                for hkv, d, m, rows, n in itertools.product(self.heads_kv, self.head_dims, self.adapter_lens,
                                                            self.supervised, self.seq_lens)]


CAUSALATTN_ALL = ("causalattn", "causalattn+adapter", "causalattn+cat", "causalattn+xg", "causalattn+all")
COMPOSED_ALL = ("composed", "composed+adapter", "composed+cat", "composed+xg", "composed+all")
# The dispatch sweep's densities of supervised rows (docs/math.md §8: the composed mass costs O(rows x N)).
DISPATCH_DENSITIES = (0.003, 0.03, 0.1, 0.3, 1.0)
PRESETS = {
    p.name: p for p in (
        # Kernel core: plain and adapter-on fused attention vs SDPA's backends and the usual adapter baselines.
        # SDPA is listed first: every ratio needs it, also in a sweep cut short by its time budget.
        Preset("kernel-core",
               providers=(*SDPA_BACKEND_PROVIDERS, "causalattn", "causalattn+adapter", "sdpa+adapter-sdpa",
                          "sdpa+adapter-peft", "flex", "flash-attn"),
               modes=MODES, seq_lens=(1024, 2048, 4096, 8192, 16384), heads_kv=(8, 32)),
        # All features: every feature on vs off vs SDPA vs the ways users get CAT/XG today. Fewer N: the
        # FlexAttention baselines compile three graphs per shape.
        Preset("all-features",
               providers=("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", *CAUSALATTN_ALL, *COMPOSED_ALL,
                          "sdpa+adapter-sdpa", "sdpa+adapter-peft", "eager+cat", "eager+all", "flex", "flex2pass+cat",
                          "flex2pass+all"),
               modes=("fwd", "fwd+bwd"), seq_lens=(1024, 4096, 16384), heads_kv=(8,)),
        # Fused vs composed over the density of supervised rows: the measurements behind the CUDA
        # dispatch table (`python -m benchmarks.dispatch_table`).
        Preset("dispatch",
               providers=("sdpa-flash", "sdpa-cudnn", "causalattn", "causalattn+adapter", "causalattn+cat",
                          "causalattn+all", "composed", "composed+adapter", "composed+cat", "composed+all"),
               modes=("fwd+bwd",), seq_lens=(4096, 16384), heads_kv=(8,), supervised=DISPATCH_DENSITIES),
        # What a CPU user gets: the composed backend against PyTorch's own SDPA, side by side, at the
        # shapes of one LLaMA-style layer slice (B = 1, 8 heads, d = 64, fp32, the machine's threads).
        Preset("cpu",
               providers=("sdpa-flash", "sdpa-math", *COMPOSED_ALL, "causalattn", "causalattn+all",
                          "sdpa+adapter-sdpa", "eager+all"),
               modes=("fwd", "fwd+bwd"), seq_lens=(1024, 4096), heads_kv=(8,), head_dims=(64,), heads_q=8, batch=1,
               dtype="float32"),
        # Peak memory at long context on CPU (fwd+bwd, one case each: ~1 min per case).
        Preset("cpu-memory", providers=("sdpa-flash", "composed", "composed+all"), modes=("fwd+bwd",),
               seq_lens=(16384,), heads_kv=(8,), head_dims=(64,), heads_q=8, batch=1, dtype="float32"),
        # The density sweep on CPU (composed only: the reference's cost does not depend on it).
        Preset("cpu-dispatch", providers=("sdpa-flash", "composed+cat", "composed+all"), modes=("fwd+bwd",),
               seq_lens=(4096,), heads_kv=(8,), head_dims=(64,), heads_q=8, batch=1, dtype="float32",
               supervised=DISPATCH_DENSITIES),
        Preset("smoke", providers=tuple(PROVIDERS), modes=("fwd+bwd",), seq_lens=(64,), heads_kv=(2,),
               head_dims=(32,), adapter_lens=(4,), heads_q=4, tokens=128, dtype="auto", cpu_threads=1),
    )
}


@dataclass(frozen=True)
class Timing:
    warmup_ms: float = 10.0
    rep_ms: float = 30.0  # per case; CPU runs at least 3 and at most 50 steps within it


# ------------------------------------------------------------------------------------------ one case
def make_step(built: Built, problem: Problem, mode: str) -> Callable[[], None]:
    """The callable a timer repeats for `mode` (see the module docstring)."""

    def backward(result, retain_graph: bool) -> None:
        out, loss = result
        tensors, grads = [out], [problem.dout]
        if loss is not None:
            tensors.append(loss)
            grads.append(None)
        torch.autograd.backward(tensors, grads, retain_graph=retain_graph)

    def forward_only() -> None:
        built.forward()

    if mode == "fwd":
        return forward_only
    if mode == "bwd":
        saved = built.forward()
        return lambda: backward(saved, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: backward(built.forward(), retain_graph=False)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def _reset_grads(leaves: Iterable[Tensor]) -> None:
    for t in leaves:
        t.grad = None


def release_memory(device: torch.device, full_collect: bool = False) -> None:
    """Hand what the last case freed back to the allocator and the OS. A case's tensors go with its
    frame by reference counting; the young-generation collection catches cycles made during the
    case, and after a failure a full one catches exception frames (0.2 s with torch._dynamo loaded)."""
    gc.collect() if full_collect else gc.collect(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed heap pages resident; trimming makes the next case's RSS baseline honest.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_in_use(device: torch.device) -> Optional[int]:
    """Bytes the process holds now: allocated CUDA memory, or the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    rss = _read_status_kib("VmRSS")
    return rss * 1024 if rss is not None else None


def measure_peak(step: Callable[[], None], leaves: list[Tensor], device: torch.device,
                 baseline: Optional[int]) -> Optional[float]:
    """Peak MiB over `baseline` during one step (grads reset first, so the step allocates them)."""
    _reset_grads(leaves)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / MIB
    if baseline is None or not _reset_peak_rss():
        return None
    step()
    peak = _read_status_kib("VmHWM")
    return (peak * 1024 - baseline) / MIB if peak is not None else None


def measure_time(step: Callable[[], None], leaves: list[Tensor], device: torch.device,
                 timing: Timing) -> tuple[float, float, float]:
    """(median, q20, q80) in ms."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, q20, q80 = do_bench(step, warmup=timing.warmup_ms, rep=timing.rep_ms, grad_to_none=leaves,
                                    quantiles=[0.5, 0.2, 0.8])
        return median, q20, q80
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (len(times) < 50 and (time.perf_counter() - started) * 1e3 < timing.rep_ms):
        _reset_grads(leaves)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    cuts = statistics.quantiles(times, n=5, method="inclusive")  # 20/40/60/80 % cut points
    return statistics.median(times), cuts[0], cuts[3]


def is_oom(error: BaseException) -> bool:
    # MemoryError: Python's own allocations failing, e.g. under a child's RLIMIT_AS cap.
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    # "cannot allocate memory": ENOMEM's strerror, e.g. an mmap refused under an RLIMIT_AS cap.
    return any(words in text for words in ("out of memory", "can't allocate memory", "cannot allocate memory"))


def error_status(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"error: {type(error).__name__}: {first_line[:200]}"


def _sdpa_reasons(caught: Sequence[warnings.WarningMessage]) -> str:
    """Why SDPA declined, from the warnings it emits before raising: one "<backend> kernel not used
    because:" header per backend, followed by warnings that say why (headers and "runtime disabled"
    lines for the backends switched off by sdpa_kernel are dropped)."""
    reasons: list[str] = []
    for w in caught:
        text = str(w.message).split("(Triggered internally")[0].strip()
        if text and "not used because" not in text and "runtime disabled" not in text and text not in reasons:
            reasons.append(text)
    return "; ".join(reasons)[:300]


def run_case(provider: Provider, shape: Shape, mode: str, device: torch.device, timing: Timing) -> dict[str, Any]:
    """Measure one (provider, shape, mode); never raises for the provider's failures."""
    row: dict[str, Any] = {"provider": provider.name, "features": provider.feature_label, "mode": mode,
                           **{f: getattr(shape, f) for f in SHAPE_FIELDS}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            release_memory(device)
            row.update(_measure(provider, shape, mode, device, timing, memory_in_use(device)))
        except Unsupported as reason:
            row.update(status="unsupported", note=str(reason))
        except Exception as error:  # every failure of a provider is a row, never the end of the sweep
            if is_oom(error):
                row.update(status="oom")
            elif isinstance(error, RuntimeError) and is_missing_kernel(error):
                row.update(status="unsupported", note=_sdpa_reasons(caught) or str(error).splitlines()[0])
            else:
                row.update(status=error_status(error))
    try:
        release_memory(device, full_collect=row["status"] != "ok")
    except RuntimeError:
        pass  # a sticky CUDA error (e.g. an illegal access): every later case records it as its error
    flops = attention_flops(shape.batch, shape.heads_q, shape.seq_len, shape.head_dim, mode)
    if row["status"] == "ok":
        row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
    row["attn_gflop"] = flops / 1e9
    row["adapter_gflop"] = (adapter_flops(shape.batch, shape.heads_q, shape.seq_len, shape.adapter_len, shape.head_dim,
                                          mode) / 1e9 if "adapter" in provider.features else 0.0)
    return row


def _measure(provider: Provider, shape: Shape, mode: str, device: torch.device, timing: Timing,
             baseline: Optional[int]) -> dict[str, Any]:
    # Everything the case allocates lives in this frame, so it is freed once the frame is gone, also
    # when it raises (the harness drops the exception and collects).
    problem = make_problem(shape, device)
    built = provider.build(problem)
    step = make_step(built, problem, mode)
    leaves = problem.leaves()
    step()  # warm-up: compiles kernels, settles the allocator
    peak = measure_peak(step, leaves, device, baseline)
    median, q20, q80 = measure_time(step, leaves, device, timing)
    return {"status": "ok", "median_ms": median, "q20_ms": q20, "q80_ms": q80, "peak_mb": peak, "note": built.note}


# ------------------------------------------------------------------------------------------ machine
def device_name(device: torch.device) -> str:
    """The GPU's name; for CPUs the model and torch's thread count (results differ by both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads > 1 else ''})"


def git_commit() -> str:
    """HEAD (+dirty); CAUSALATTN_GIT_COMMIT wins, for copies of the tree without .git (GPU machine)."""
    if os.environ.get("CAUSALATTN_GIT_COMMIT"):
        return os.environ["CAUSALATTN_GIT_COMMIT"]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_fields(device: torch.device, preset: str) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "git_commit": git_commit(), "preset": preset}


# ------------------------------------------------------------------------------------------ CSV
def row_key(row: dict[str, Any], key_fields: Sequence[str] = KEY_FIELDS) -> tuple[str, ...]:
    return tuple(str(row.get(f, "")) for f in key_fields)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def upsert_rows(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] = FIELDS,
                key_fields: Sequence[str] = KEY_FIELDS) -> None:
    """Write `rows` into the CSV at `path`, replacing rows with the same key (by default the harness's
    (device, provider, mode, shape)); `fields` are the columns, in order."""
    new_keys = {row_key(r, key_fields) for r in rows}
    kept = [r for r in read_rows(path) if row_key(r, key_fields) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    with open(scratch, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in [*kept, *rows]:
            writer.writerow({k: _cell(row.get(k)) for k in fields})
    os.replace(scratch, path)  # a run killed mid-write leaves the previous file intact


# ------------------------------------------------------------------------------------------ tables
def _float(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# Table order within a device and mode: the sweep axes, N last so a block reads as a scan over N.
_TABLE_ORDER = ("heads_q", "heads_kv", "head_dim", "adapter_len", "xg_tokens", "dtype", "supervised", "seq_len", "batch")


def _shape_key(row: dict[str, Any]) -> tuple[str, ...]:
    return (str(row["device"]), str(row["mode"]), *(str(row.get(f, "")) for f in _TABLE_ORDER))


def _shape_label(row: dict[str, Any]) -> str:
    return Shape(**_shape_fields(row)).label()


def _shape_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The Shape of a CSV row (rows written before the density column count as CAT documents)."""
    fields = {f: int(row[f]) for f in SHAPE_FIELDS if f not in ("dtype", "supervised")}
    supervised = _float(row.get("supervised"))
    return {**fields, "dtype": row["dtype"], "supervised": CAT_DOCUMENT_DENSITY if supervised is None else supervised}


def best_sdpa(rows: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The fastest successful plain-SDPA backend row among `rows` (one shape and mode)."""
    candidates = [r for r in rows if r["provider"] in SDPA_BACKEND_PROVIDERS and r["status"] == "ok"]
    return min(candidates, key=lambda r: float(r["median_ms"]), default=None)


def _group_by_shape(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_shape_key(row), []).append(row)
    order = {m: i for i, m in enumerate(MODES)}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), *map(_sort_number, kv[0][2:]))))


def _sort_number(text: str) -> Any:
    number = _float(text)
    return (0, number, "") if number is not None else (1, 0.0, text)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Side-by-side table per (device, mode, shape): time, quantiles, TFLOP/s, memory, ratios vs the
    best SDPA backend (time ratio > 1: slower than SDPA)."""
    lines = []
    for (device, mode, *_), group in _group_by_shape(rows).items():
        sdpa = best_sdpa(group)
        sdpa_ms = float(sdpa["median_ms"]) if sdpa else None
        sdpa_mb = _float(sdpa["peak_mb"]) if sdpa else None
        reference = f"best SDPA: {sdpa['provider']} {sdpa_ms:.3f} ms" if sdpa else "no SDPA result"
        lines.append(f"\n== {mode} | {_shape_label(group[0])} | {device} | {reference}")
        lines.append(f"{'provider':20s} {'status':12s} {'median ms':>10s} {'q20-q80 ms':>19s} {'TFLOP/s':>8s} "
                     f"{'xSDPA':>6s} {'peak MB':>9s} {'mem xSDPA':>9s}  note")
        for row in sorted(group, key=lambda r: r["provider"]):
            median, peak = _float(row.get("median_ms")), _float(row.get("peak_mb"))
            if row["status"] != "ok" or median is None:
                lines.append(f"{row['provider']:20s} {str(row['status'])[:60]:12s}  {row.get('note') or ''}")
                continue
            quantiles = f"{float(row['q20_ms']):.3f}-{float(row['q80_ms']):.3f}"
            ratio = f"{median / sdpa_ms:.2f}" if sdpa_ms else ""
            memory = f"{peak:.0f}" if peak is not None else ""
            memory_ratio = f"{peak / sdpa_mb:.2f}" if peak is not None and sdpa_mb else ""
            lines.append(f"{row['provider']:20s} {'ok':12s} {median:10.3f} {quantiles:>19s} {float(row['tflops']):8.1f} "
                         f"{ratio:>6s} {memory:>9s} {memory_ratio:>9s}  {row.get('note') or ''}")
    return "\n".join(lines)


def format_compact(rows: Sequence[dict[str, Any]]) -> str:
    """Two small tables with one line per (device, mode, shape): every provider's time as a multiple
    of the best SDPA backend's, then every provider's peak MB (a failed case shows its status)."""
    providers = sorted({r["provider"] for r in rows if r["provider"] not in SDPA_BACKEND_PROVIDERS},
                       key=lambda name: list(PROVIDERS).index(name) if name in PROVIDERS else len(PROVIDERS))
    lines_by_shape = []
    for (_, mode, *_), group in _group_by_shape(rows).items():
        sdpa = best_sdpa(group)
        by_provider = {r["provider"]: r for r in group}
        times, memories = [], []
        for name in providers:
            row = by_provider.get(name)
            if row is None or row["status"] != "ok":
                status = "-" if row is None else str(row["status"]).split(":")[0]
                times.append(status)
                memories.append(status)
                continue
            median, peak = float(row["median_ms"]), _float(row.get("peak_mb"))
            times.append(f"{median / float(sdpa['median_ms']):.2f}x" if sdpa else f"{median:.2f}ms")
            memories.append(f"{peak:.0f}" if peak is not None else "")
        sdpa_ms = f"{float(sdpa['median_ms']):.3f}" if sdpa else "-"
        sdpa_mb = f"{float(sdpa['peak_mb']):.0f}" if sdpa and _float(sdpa.get("peak_mb")) is not None else "-"
        lines_by_shape.append((mode, _shape_label(group[0]), sdpa_ms, times, sdpa_mb, memories))
    widths = [max([len(name)] + [len(line[3][i]) for line in lines_by_shape]) for i, name in enumerate(providers)]

    def table(title: str, sdpa_column: str, pick: Callable[[tuple], tuple[str, list[str]]]) -> list[str]:
        out = [title, f"{'mode':8s} {'shape':42s} {sdpa_column:>9s}  " + " ".join(
            f"{p:>{w}s}" for p, w in zip(providers, widths))]
        for line in lines_by_shape:
            reference, cells = pick(line)
            out.append(f"{line[0]:8s} {line[1]:42s} {reference:>9s}  " + " ".join(
                f"{c:>{w}s}" for c, w in zip(cells, widths)))
        return out

    return "\n".join(
        table("time as a multiple of the best SDPA backend's (lower is faster)", "SDPA ms",
              lambda line: (line[2], line[3]))
        + [""] + table("peak memory (MB)", "SDPA MB", lambda line: (line[4], line[5])))


# ------------------------------------------------------------------------------------------ sweeps
def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def plan_cases(preset: Preset, device: torch.device) -> list[tuple[Provider, Shape, str]]:
    """Cases in run order: by provider priority, then shape (small N first), provider, mode."""
    providers = [PROVIDERS[name] for name in preset.providers]
    shapes = preset.shapes(device)
    return [(provider, shape, mode)
            for priority in sorted({p.priority for p in providers})
            for shape in shapes
            for provider in providers if provider.priority == priority
            for mode in preset.modes]


def run_sweep(preset: Preset, device: torch.device, out_dir: Path, timing: Timing,
              time_budget_s: Optional[float] = None) -> list[dict[str, Any]]:
    """Run every case of `preset`, upserting each row into `<out_dir>/<preset>.csv` as it comes."""
    cases = plan_cases(preset, device)
    machine = machine_fields(device, preset.name)
    path = out_dir / f"{preset.name}.csv"
    print(f"{preset.name}: {len(cases)} cases on {machine['device']} (torch {machine['torch']}, "
          f"triton {machine['triton'] or '-'}, commit {machine['git_commit']}) -> {path}", flush=True)
    started = time.perf_counter()
    rows, skipped = [], []
    warmed_up: set[tuple[str, str]] = set()
    for index, (provider, shape, mode) in enumerate(cases, 1):
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            skipped.append(f"{provider.name} {mode} {shape.label()}")
            continue
        if device.type == "cpu" and (provider.name, mode) not in warmed_up:
            # A provider's first forward (or backward: autograd starts its threads) imports modules
            # and fills caches for good; on CPU that would land in the first case's RSS, so the first
            # case of each (provider, mode) runs once unrecorded.
            run_case(provider, shape, mode, device, replace(timing, rep_ms=0.0))
            warmed_up.add((provider.name, mode))
        row = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **machine,
               **run_case(provider, shape, mode, device, timing)}
        rows.append(row)
        upsert_rows(path, [row])
        if row["status"] == "ok":
            peak = f"{row['peak_mb']:.0f} MB" if row["peak_mb"] is not None else "peak n/a"
            result = (f"{row['median_ms']:.3f} ms [{row['q20_ms']:.3f}, {row['q80_ms']:.3f}] "
                      f"{row['tflops']:.2f} TFLOP/s {peak}")
        else:
            result = f"{row['status']} {row.get('note') or ''}"
        print(f"[{index:4d}/{len(cases)}] {provider.name:20s} {mode:7s} {shape.label():44s} {result}", flush=True)
    if skipped:
        print(f"time budget of {time_budget_s:.0f} s reached: {len(skipped)} cases not run (not written), e.g. "
              + "; ".join(skipped[:5]))
    tally = collections.Counter(str(row["status"]).split(":")[0] for row in rows)
    print(f"done: {len(rows)} of {len(cases)} cases in {time.perf_counter() - started:.0f} s ("
          + ", ".join(f"{status} {count}" for status, count in sorted(tally.items())) + f"), rows in {path}")
    return rows


def check_deterministic_backward(device: torch.device, repeats: int = 5) -> bool:
    """Run causalattn+all forward + backward `repeats` times on one realistic problem and compare
    every gradient bit for bit with the first run (the kernels use no atomics, docs/math.md §4)."""
    if device.type == "cuda":
        shape = Shape(batch=2, seq_len=4096, heads_q=32, heads_kv=8, head_dim=128, adapter_len=10, xg_tokens=2,
                      dtype="bfloat16")
    else:
        shape = Shape(batch=2, seq_len=256, heads_q=4, heads_kv=2, head_dim=64, adapter_len=10, xg_tokens=2,
                      dtype="float32")
    problem = make_problem(shape, device)
    step = make_step(PROVIDERS["causalattn+all"].build(problem), problem, "fwd+bwd")
    names = ("q", "k", "v", "adapter_keys", "adapter_values", "gate")
    first: Optional[list[Tensor]] = None
    identical = True
    for run in range(repeats):
        _reset_grads(problem.leaves())
        step()
        grads = [getattr(problem, name).grad.clone() for name in names]
        if first is None:
            first = grads
            continue
        for name, a, b in zip(names, first, grads):
            if not torch.equal(a, b):
                identical = False
                print(f"run {run + 1}: d{name} differs from run 1, max |diff| = {(a.float() - b.float()).abs().max().item():.3e}")
    verdict = "bit-identical" if identical else "NOT bit-identical"
    print(f"deterministic backward: {repeats} fwd+bwd runs of causalattn+all at {shape.label()} on "
          f"{device_name(device)}: gradients of {', '.join(names)} {verdict}")
    return identical


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Presets: " + "; ".join(
                                         f"{p.name} ({len(p.providers)} providers, N={list(p.seq_lens)}, "
                                         f"Hkv={list(p.heads_kv)}, modes {list(p.modes)})" for p in PRESETS.values()))
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--preset", choices=sorted(PRESETS), help="run this sweep (axes can be overridden below)")
    action.add_argument("--show", nargs="+", type=Path, metavar="CSV", help="print the tables of result files")
    action.add_argument("--check-determinism", action="store_true",
                        help="repeat causalattn+all fwd+bwd and compare gradients bit for bit")
    action.add_argument("--list", action="store_true", help="list the providers and their features")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of <preset>.csv (default benchmarks/results)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), metavar="PROVIDER",
                        help="see --list; override the preset's providers (with --show: the providers shown beside SDPA)")
    parser.add_argument("--modes", nargs="+", choices=MODES, metavar="MODE",
                        help="fwd, bwd, fwd+bwd; override the preset's modes (with --show: a filter)")
    parser.add_argument("--seq-lens", nargs="+", type=int)
    parser.add_argument("--heads-kv", nargs="+", type=int)
    parser.add_argument("--head-dims", nargs="+", type=int)
    parser.add_argument("--adapter-lens", nargs="+", type=int)
    parser.add_argument("--supervised", nargs="+", type=float, metavar="FRACTION",
                        help="fractions of query rows with causes in the CAT mask (default: CAT-style documents, 3.1 %%)")
    parser.add_argument("--heads-q", type=int)
    parser.add_argument("--tokens", type=int, help="B x N per case (batch = tokens // N)")
    parser.add_argument("--batch", type=int, help="fixed batch instead of tokens // N")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--threads", type=int, dest="cpu_threads", metavar="N", help="torch CPU threads (CPU runs)")
    parser.add_argument("--warmup-ms", type=float, default=Timing.warmup_ms)
    parser.add_argument("--rep-ms", type=float, default=Timing.rep_ms, help="timed repetitions per case, in ms")
    parser.add_argument("--time-budget-s", type=float, help="start no new case after this many seconds")
    parser.add_argument("--compact", action="store_true", help="one line per shape instead of one block")
    parser.add_argument("--repeats", type=int, default=5, help="runs for --check-determinism")
    return parser


def _apply_overrides(preset: Preset, args: argparse.Namespace) -> Preset:
    overrides = {field: tuple(value) if isinstance(value, list) else value
                 for field, value in (("providers", args.providers), ("modes", args.modes), ("seq_lens", args.seq_lens),
                                      ("heads_kv", args.heads_kv), ("head_dims", args.head_dims),
                                      ("adapter_lens", args.adapter_lens), ("supervised", args.supervised), ("heads_q", args.heads_q),
                                      ("tokens", args.tokens), ("batch", args.batch), ("dtype", args.dtype),
                                      ("cpu_threads", args.cpu_threads))
                 if value is not None}
    return replace(preset, **overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for provider in PROVIDERS.values():
            print(f"{provider.name:20s} features: {provider.feature_label}")
        return 0
    if args.show:
        rows = [row for path in args.show for row in read_rows(path)
                if (not args.modes or row["mode"] in args.modes)
                and (not args.providers or row["provider"] in args.providers or row["provider"] in SDPA_BACKEND_PROVIDERS)]
        print(format_compact(rows) if args.compact else format_table(rows))
        return 0
    device = pick_device(args.device)
    if args.check_determinism:
        return 0 if check_deterministic_backward(device, args.repeats) else 1
    preset = _apply_overrides(PRESETS[args.preset], args)
    if any(preset.heads_q % hkv for hkv in preset.heads_kv):
        parser.error(f"--heads-kv: every value must divide heads_q={preset.heads_q}, got {list(preset.heads_kv)}")
    threads = torch.get_num_threads()
    if device.type == "cpu" and preset.cpu_threads:
        torch.set_num_threads(preset.cpu_threads)
    try:
        rows = run_sweep(preset, device, args.out, Timing(args.warmup_ms, args.rep_ms), args.time_budget_s)
    finally:
        torch.set_num_threads(threads)  # main() also runs inside test processes
    print(format_compact(rows) if args.compact else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
