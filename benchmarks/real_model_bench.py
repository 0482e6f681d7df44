"""One adapter training step of the real SmolLM2-135M-Instruct: causalattn against PEFT AdaptionPrompt.

    python -m benchmarks.real_model_bench                                  # N = 256 ... 4096, B N = 4096, fp32
    python -m benchmarks.real_model_bench --rounds 3 --dtype bf16          # CPU bf16 autocast, 3 interleaved rounds
    python -m benchmarks.real_model_bench --seq-lens 64 --tokens-per-step 128 --steps 1 --warmup 0   # smoke run

The model is the pretrained LlamaForCausalLM that `causalattn.pretrained.resolve_pretrained("smollm2-135m")`
gives offline (30 layers, 9 query / 3 KV heads, head dim 64), loaded in fp32; `--dtype bf16` runs the
forward and the loss under CPU bf16 autocast, as `causalattn train --mixed-precision bf16` does. Providers
(prompts of M = 10 tokens on every layer):

    peft-sdpa             PEFT AdaptionPrompt on attn_implementation="sdpa", CE only: the baseline of the ratios
    causalattn-ce         attn_implementation="causalattn" + causalattn.hf.add_adapters (the library's defaults:
                          tanh gate per head, 2 XG tokens), CE only (no supervision passed, nothing collected)
    causalattn-ce+cat     the same, CE + CAT, the mass collected from the attention backend (--backend, default
                          "auto": on CPU the native kernel where it applies, what `causalattn train` runs)
    causalattn-ce+cat+xg  the same, CE + CAT + 0.1 XG (XG is 0 at B = 1; computed and differentiated all the same)
    peft-eager+cat        PEFT AdaptionPrompt on attn_implementation="eager" with output_attentions=True, CE + the
                          CAT loss computed the way CAT's code does: every layer's (B, H, N, N) maps, the mass
                          sum_j P_ij A_ij, the mean over layers and heads

The providers are benchmarks.train_step's (the same loss code, on the pretrained model instead of random
weights). The CAT cause mask is the same for every provider: benchmarks.providers.cat_style_spans, packed
256-token documents each closing with an 8-token effect caused by three earlier spans, so 8 / 256 = 3.1 %
of the rows are supervised (N < 256 holds no whole document: no supervised row). Input ids are random
tokens with a fixed seed per N (the step's cost does not depend on their values).

One step = zero the grads, forward with labels = input ids, the provider's loss, backward, AdamW step on
the adapter parameters. Each (provider, N) case runs in a process of its own (`--worker`) that loads
the model, runs --warmup untimed and --steps timed steps (wall clock) and prints one JSON line; its
peak RSS is therefore that provider's alone. The process runs under an address-space cap
(--memory-cap-gb, default 0.8 x the machine's RAM): an allocation past it fails and the case becomes
status "oom" instead of driving the machine into swap; a provider that went out of memory at some N
is not run again at that N or longer ones ("oom (skipped)"). Any other failure is a row with status
"error: ..." or "timeout"; the parent never crashes on a case.

Rounds interleave the providers: round r runs every provider at one N in an order rotated by r, so a
load that comes and goes on a shared machine hits them all alike. Ratios are taken within a round
(against peft-sdpa and against peft-eager+cat of the same round) and the median over rounds is
reported.

Output, next to each other under --out (default benchmarks/results):
- real_model_bench.csv, one row per case, appended across runs (a run is one `run_id`): `median_s`,
  `min_s`, `max_s` of the timed steps; `peak_rss_mb`, the worker's peak resident set
  (getrusage maxrss: weights, optimizer state, activations, Python and libraries); `time_vs_sdpa`,
  `mem_vs_sdpa`, `time_vs_eager`, `mem_vs_eager`, this round's ratios (time: median_s, memory:
  peak_rss_mb; > 1 means slower / more memory); `load_s`, loading the model in the worker; `case_s`,
  the worker's whole wall time; `load_avg_start`, `load_avg_end`, the machine's 1-minute load average
  around the case; plus the machine (CPU model and torch threads in `device`, `cores`), the torch,
  transformers and peft versions and the git commit;
- real_model_bench.md, this run's table: per N and provider, the status, the median step seconds
  (median over rounds), the peak MB (max over rounds) and the median ratios (`time x sdpa`,
  `mem x sdpa`, `time x eager`, `mem x eager`), then the two lines of the bar below;
- real_model_bench.png, step time and peak memory against N per provider (skipped without matplotlib).

The bar this benchmark checks (it reports, it does not assert): at N = 2048 causalattn-ce+cat+xg takes
<= 0.45x the step time of peft-eager+cat; at N = 4096 peft-eager+cat needs >= 4x the peak memory of
causalattn-ce+cat+xg, or fails where causalattn-ce+cat+xg runs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from benchmarks.harness import DEFAULT_OUT, REPO_ROOT, machine_fields, upsert_rows
from benchmarks.plot import load_pyplot, provider_style, style_axes
from benchmarks.providers import cat_style_spans, spread_rows_mask
from benchmarks.train_step import (LEARNING_RATE, Trainee, add_peft_prompts, causalattn_trainee, failure_fields,
                                   package_version, peft_eager_cat_trainee, peft_sdpa_trainee, random_tokens,
                                   require_peft, time_steps)

MODEL = "smollm2-135m"
ADAPTER_LEN = 10
BASELINE = "peft-sdpa"
EAGER = "peft-eager+cat"
OURS = "causalattn-ce+cat+xg"  # the provider the bar is about
# Run order of round 0: the baseline first, the N x N-materialising provider last (later rounds rotate it).
PROVIDERS = (BASELINE, "causalattn-ce", "causalattn-ce+cat", OURS, EAGER)
DTYPES = ("fp32", "bf16")
SEQ_LENS = (256, 1024, 2048, 4096)
TOKENS_PER_STEP = 4096
SKIPPED = "oom (skipped)"
RESULT_PREFIX = "RESULT "  # the worker's JSON line; transformers may print other lines on stdout
BAR_TIME = (2048, 0.45)    # (N, most time x eager)
BAR_MEMORY = (4096, 4.0)   # (N, least eager's peak x ours)

CSV_NAME, MD_NAME, PNG_NAME = "real_model_bench.csv", "real_model_bench.md", "real_model_bench.png"
KEY_FIELDS = ("run_id", "round", "provider", "seq_len")
RATIO_FIELDS = ("time_vs_sdpa", "mem_vs_sdpa", "time_vs_eager", "mem_vs_eager")
FIELDS = ("run_id", "date", "device", "cores", "torch", "transformers", "peft", "git_commit", "model", "dtype",
          "backend", "provider", "seq_len", "batch", "round", "order", "warmup", "steps", "status", "median_s",
          "min_s", "max_s", "peak_rss_mb", *RATIO_FIELDS, "trainable_params", "load_s", "case_s", "load_avg_start",
          "load_avg_end", "memory_cap_gb", "note")


@dataclass(frozen=True)
class Case:
    """What one worker process measures."""

    provider: str
    model_path: str
    seq_len: int
    batch: int
    steps: int
    warmup: int
    dtype: str = "fp32"
    backend: str = "auto"
    threads: Optional[int] = None
    memory_cap_gb: Optional[float] = None
    supervised: Optional[float] = None  # fraction of rows with causes (spread evenly); None: CAT-style documents


# ------------------------------------------------------------------------------------------ pure parts
def batch_for(tokens_per_step: int, seq_len: int) -> int:
    """B such that B N = tokens_per_step: every N trains on as many tokens per step."""
    if seq_len < 1 or tokens_per_step < seq_len or tokens_per_step % seq_len:
        raise ValueError(f"--tokens-per-step {tokens_per_step} is not a positive multiple of N = {seq_len}")
    return tokens_per_step // seq_len


def round_order(providers: Sequence[str], round_index: int) -> list[str]:
    """The providers rotated by `round_index`: over len(providers) rounds each runs once in each slot."""
    shift = round_index % len(providers) if providers else 0
    return [*providers[shift:], *providers[:shift]]


def skip_status(first_oom: dict[str, int], provider: str, seq_len: int) -> Optional[str]:
    """"oom (skipped)" for a provider that ran out of memory at this N or a shorter one, else None."""
    return SKIPPED if provider in first_oom and seq_len >= first_oom[provider] else None


def is_out_of_memory(status: str) -> bool:
    return status == "oom"


def _ratio(numerator: Any, denominator: Any) -> Optional[float]:
    try:
        return float(numerator) / float(denominator) if float(denominator) > 0 else None
    except (TypeError, ValueError):
        return None


def round_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Fill RATIO_FIELDS of one round's rows at one N (in place): time and memory over peft-sdpa's and
    over peft-eager+cat's of the same round; blank where either side did not run."""
    by_provider = {r["provider"]: r for r in rows if r["status"] == "ok"}
    for row in rows:
        for reference, suffix in ((BASELINE, "sdpa"), (EAGER, "eager")):
            other = by_provider.get(reference)
            ok = row["status"] == "ok" and other is not None
            row[f"time_vs_{suffix}"] = _ratio(row["median_s"], other["median_s"]) if ok else None
            row[f"mem_vs_{suffix}"] = _ratio(row["peak_rss_mb"], other["peak_rss_mb"]) if ok else None


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [float(v) for v in values if v not in (None, "")]
    return statistics.median(present) if present else None


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (N, provider), N ascending, providers in PROVIDERS' order: the median over rounds of
    the step time and of each per-round ratio, the largest peak over rounds, the ok rounds; a provider
    with no ok round keeps the status of its first failure."""
    summary = []
    known = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    for seq_len in sorted({int(r["seq_len"]) for r in rows}):
        for provider in known:
            mine = [r for r in rows if r["provider"] == provider and int(r["seq_len"]) == seq_len]
            if not mine:
                continue
            ok = [r for r in mine if r["status"] == "ok"]
            peaks = [float(r["peak_rss_mb"]) for r in ok if r.get("peak_rss_mb") not in (None, "")]
            summary.append({"seq_len": seq_len, "provider": provider, "batch": mine[0]["batch"],
                            "status": "ok" if ok else mine[0]["status"], "rounds_ok": len(ok),
                            "median_s": _median([r["median_s"] for r in ok]), "peak_mb": max(peaks, default=None),
                            **{f: _median([r.get(f) for r in ok]) for f in RATIO_FIELDS}})
    return summary


def bar_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's bar, read off the summary (reported, not asserted)."""
    at = {(s["seq_len"], s["provider"]): s for s in summary}
    (time_n, most), (memory_n, least) = BAR_TIME, BAR_MEMORY
    lines = []
    ours = at.get((time_n, OURS))
    if ours is None or ours["time_vs_eager"] is None:
        lines.append(f"bar N={time_n}: {OURS} time x {EAGER} <= {most}: not measured")
    else:
        verdict = "met" if ours["time_vs_eager"] <= most else "not met"
        lines.append(f"bar N={time_n}: {OURS} time x {EAGER} = {ours['time_vs_eager']:.2f} (<= {most}: {verdict})")
    ours, eager = at.get((memory_n, OURS)), at.get((memory_n, EAGER))
    if ours is None or eager is None or ours["status"] != "ok":
        lines.append(f"bar N={memory_n}: {EAGER} peak x {OURS} >= {least}: not measured")
    elif eager["status"] != "ok":
        lines.append(f"bar N={memory_n}: {EAGER} {eager['status']} where {OURS} runs (met)")
    else:
        factor = _ratio(eager["peak_mb"], ours["peak_mb"])
        verdict = "met" if factor is not None and factor >= least else "not met"
        lines.append(f"bar N={memory_n}: {EAGER} peak x {OURS} = {factor:.2f} (>= {least}: {verdict})")
    return lines


def _cell(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_markdown(summary: Sequence[dict[str, Any]], header: str) -> str:
    """The run's table (see the module docstring for the columns)."""
    lines = [f"# Real-model training step: {header}", "",
             "| N | B | provider | status | step s | peak MB | time x sdpa | mem x sdpa | time x eager | mem x eager |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['seq_len']} | {s['batch']} | {s['provider']} | {s['status']} | "
                     f"{_cell(s['median_s'], 3)} | {_cell(s['peak_mb'], 0)} | "
                     + " | ".join(_cell(s[f]) for f in RATIO_FIELDS) + " |")
    return "\n".join([*lines, "", *(f"- {line}" for line in bar_lines(summary))]) + "\n"


def parse_worker_output(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    """The worker's result: its RESULT line, or a status from how the process ended (SIGKILL, the
    kernel's OOM killer's signal, counts as out of memory; anything else is an error)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if returncode == -signal.SIGKILL:
        return {"status": "oom", "note": "worker killed by SIGKILL (no result line)"}
    how = f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"
    return {"status": f"error: worker {how}: {last[:200]}"}


# ------------------------------------------------------------------------------------------ the worker
def build_trainee(case: Case) -> Trainee:
    """The pretrained model with the provider's adapters (on every layer) and loss."""
    from transformers import AutoModelForCausalLM

    import causalattn.hf as cah

    peft_implementations = {BASELINE: "sdpa", EAGER: "eager"}
    if case.provider in peft_implementations:
        require_peft()
    elif case.provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {case.provider!r}")
    implementation = peft_implementations.get(case.provider, cah.IMPLEMENTATION)
    model = AutoModelForCausalLM.from_pretrained(case.model_path, attn_implementation=implementation,
                                                 dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    model.train()
    layers = model.config.num_hidden_layers
    if case.provider == BASELINE:
        return peft_sdpa_trainee(add_peft_prompts(model, ADAPTER_LEN, layers))
    if case.provider == EAGER:
        return peft_eager_cat_trainee(add_peft_prompts(model, ADAPTER_LEN, layers))
    return causalattn_trainee(model, ADAPTER_LEN, layers, case.backend, cat="+cat" in case.provider,
                              xg="+xg" in case.provider)


def measure(case: Case) -> dict[str, Any]:
    """Load, warm up and time one case in this process (no memory cap, no peak: see worker_main)."""
    from causalattn import CausalMask

    if case.threads:
        torch.set_num_threads(case.threads)
    torch.manual_seed(0)  # PEFT's prompts start random; the same ones in every round
    started = time.perf_counter()
    trainee = build_trainee(case)
    load_s = time.perf_counter() - started
    vocab = trainee.model.get_input_embeddings().num_embeddings
    input_ids = random_tokens(case.batch, case.seq_len, vocab, torch.device("cpu"))
    mask = CausalMask.from_spans(cat_style_spans(case.batch, case.seq_len), case.seq_len) if case.supervised is None \
        else spread_rows_mask(case.batch, case.seq_len, case.supervised)
    loss = trainee.make_loss(input_ids, mask)
    params = trainee.trainable()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # The forward and the loss under autocast, the backward outside it (it runs in the forward's dtypes).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.dtype == "bf16"):
            value = loss()
        value.backward()
        optimizer.step()

    for _ in range(case.warmup):
        step()
    seconds = [ms / 1e3 for ms in time_steps(step, torch.device("cpu"), case.steps)]
    return {"status": "ok", "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "trainable_params": sum(p.numel() for p in params), "load_s": load_s, "note": trainee.note}


def cap_address_space(gigabytes: float) -> None:
    """RLIMIT_AS of this process: an allocation past it raises (torch: "can't allocate memory") and the
    case is recorded as "oom", where an uncapped one could push a shared machine into swap or the
    kernel's OOM killer. Address space exceeds the resident set by the libraries' mappings (a few
    hundred MB here), so the cap is slightly stricter than a resident-set cap would be."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(gigabytes * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def worker_main(case: Case) -> dict[str, Any]:
    """The worker process: capped, measured, its failure turned into a status, its peak RSS added."""
    if case.memory_cap_gb:
        cap_address_space(case.memory_cap_gb)
    try:
        result = measure(case)
    except (Exception, MemoryError) as error:  # every failure is a row, never a traceback
        result = failure_fields(error)
    # ru_maxrss is in KiB on Linux: the whole process's peak, model load and imports included.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ------------------------------------------------------------------------------------------ the parent
def total_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def run_worker(case: Case, timeout_s: Optional[float]) -> dict[str, Any]:
    """One case in a fresh process (this file's --worker); never raises for the case's failures."""
    command = [sys.executable, "-m", "benchmarks.real_model_bench", "--worker", json.dumps(asdict(case))]
    load_start, started = os.getloadavg()[0], time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        result = parse_worker_output(done.stdout, done.stderr, done.returncode)
    except subprocess.TimeoutExpired:
        result = {"status": "timeout", "note": f"over {timeout_s:.0f} s"}
    return {**result, "case_s": time.perf_counter() - started, "load_avg_start": load_start,
            "load_avg_end": os.getloadavg()[0]}


def run(args: argparse.Namespace, model_path: Path) -> list[dict[str, Any]]:
    """Every round of every N, cases interleaved; rows upserted into the CSV as each round completes."""
    csv_path = args.out / CSV_NAME
    machine = machine_fields(torch.device("cpu"), "real-model")
    common = {"run_id": _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "device": machine["device"],
              "cores": os.cpu_count(), "torch": machine["torch"], "transformers": package_version("transformers"),
              "peft": package_version("peft"), "git_commit": machine["git_commit"], "model": args.model,
              "dtype": args.dtype, "backend": args.backend, "warmup": args.warmup, "steps": args.steps,
              "memory_cap_gb": args.memory_cap_gb}
    print(f"real-model step: {args.model} {args.dtype}, N={args.seq_lens}, B N = {args.tokens_per_step}, "
          f"{args.rounds} round(s), providers {', '.join(args.providers)} on {machine['device']} (torch "
          f"{common['torch']}, transformers {common['transformers']}, peft {common['peft']}, commit "
          f"{common['git_commit']}), memory cap {args.memory_cap_gb:.1f} GB -> {csv_path}", flush=True)
    rows: list[dict[str, Any]] = []
    first_oom: dict[str, int] = {}
    total = len(args.seq_lens) * args.rounds * len(args.providers)
    index = 0
    for seq_len in args.seq_lens:
        batch = batch_for(args.tokens_per_step, seq_len)
        for round_index in range(args.rounds):
            this_round = []
            for order, provider in enumerate(round_order(args.providers, round_index)):
                index += 1
                row = {**common, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "provider": provider, "seq_len": seq_len, "batch": batch, "round": round_index, "order": order}
                label = f"[{index}/{total}] round {round_index} N={seq_len} B={batch} {provider}"
                skipped = skip_status(first_oom, provider, seq_len)
                if skipped:
                    row["status"] = skipped
                else:
                    print(f"{label}: start", flush=True)
                    case = Case(provider, str(model_path), seq_len, batch, args.steps, args.warmup, args.dtype,
                                args.backend, args.threads, args.memory_cap_gb, args.supervised)
                    row.update(run_worker(case, args.case_timeout_s))
                    if is_out_of_memory(row["status"]):
                        first_oom.setdefault(provider, seq_len)
                print(f"{label}: {_progress(row)}", flush=True)
                this_round.append(row)
            round_ratios(this_round)
            rows.extend(this_round)
            upsert_rows(csv_path, this_round, FIELDS, KEY_FIELDS)
    return rows


def _progress(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']} {row.get('note') or ''}".rstrip()
    return (f"ok {row['median_s']:.3f} s/step [{row['min_s']:.3f}, {row['max_s']:.3f}], peak "
            f"{row['peak_rss_mb']:.0f} MB, load {row['load_s']:.1f} s, case {row['case_s']:.1f} s, load average "
            f"{row['load_avg_start']:.2f} -> {row['load_avg_end']:.2f}")


def write_plot(summary: Sequence[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    """Step time and peak memory against N, one line per provider (ok cases only)."""
    if not any(s["status"] == "ok" for s in summary):
        print("no case ran: no plot written")
        return None
    plt = load_pyplot()
    if plt is None:
        return None
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for index, provider in enumerate(p for p in PROVIDERS if any(s["provider"] == p for s in summary)):
        points = [s for s in summary if s["provider"] == provider and s["status"] == "ok"]
        style = provider_style(plt, index, provider)
        time_ax.plot([s["seq_len"] for s in points], [s["median_s"] for s in points], **style)
        memory = [s for s in points if s["peak_mb"] is not None]
        memory_ax.plot([s["seq_len"] for s in memory], [s["peak_mb"] for s in memory], **style)
    style_axes(((time_ax, "median step time (s)"), (memory_ax, "peak RSS of the worker (MB)")))
    memory_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_model_bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="what resolve_pretrained takes (default smollm2-135m)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS), metavar="PROVIDER",
                        help=f"a subset of {', '.join(PROVIDERS)}")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=list(SEQ_LENS),
                        help="N (default 256 1024 2048 4096)")
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP, help="B N of every case (default 4096)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per N (default 1)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="fp32, or bf16: fp32 weights, the forward under CPU bf16 autocast")
    parser.add_argument("--backend", default="auto", help="causalattn's attention backend (default auto)")
    parser.add_argument("--supervised", type=float, default=None, metavar="FRACTION",
                        help="rows with causes, spread evenly (default: CAT-style documents, 3.1 %% of rows)")
    parser.add_argument("--threads", type=int, help="torch threads of each worker (default: torch's)")
    parser.add_argument("--memory-cap-gb", type=float, default=round(0.8 * total_memory_gb(), 1),
                        help="address-space cap of each worker (default 0.8 x RAM); 0: none")
    parser.add_argument("--case-timeout-s", type=float, help="kill a case after this many seconds (status timeout)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the CSV, MD and PNG")
    parser.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)  # one case, run by the parent
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker_main(Case(**json.loads(args.worker)))), flush=True)
        return 0
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be positive, --warmup not negative")
    if args.supervised is not None and not 0 < args.supervised <= 1:
        parser.error(f"--supervised: expected a fraction of rows in (0, 1], got {args.supervised}")
    try:
        for n in args.seq_lens:
            batch_for(args.tokens_per_step, n)
    except ValueError as error:
        parser.error(str(error))
    args.seq_lens = sorted(set(args.seq_lens))  # ascending: an out-of-memory N skips the longer ones
    args.providers = [p for p in PROVIDERS if p in args.providers]
    if args.threads:
        torch.set_num_threads(args.threads)  # the `device` column names the workers' thread count
    from causalattn.pretrained import resolve_pretrained

    model_path = resolve_pretrained(args.model, log=lambda message: print(message, flush=True))
    started = time.perf_counter()
    rows = run(args, model_path)
    summary = summarize(rows)
    header = (f"{args.model}, {args.dtype}, B N = {args.tokens_per_step}, {args.rounds} round(s), {args.warmup} + "
              f"{args.steps} steps, {rows[0]['device']}, torch {rows[0]['torch']}, commit {rows[0]['git_commit']}, "
              f"run {rows[0]['run_id']}")
    table = format_markdown(summary, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MD_NAME).write_text(table, encoding="utf-8")
    print(table, end="")
    title = (f"one adapter training step of {args.model}, {args.dtype}, B N = {args.tokens_per_step}\n"
             f"{rows[0]['device']}, run {rows[0]['run_id']}")
    plot = write_plot(summary, args.out / PNG_NAME, title)
    print(f"done in {time.perf_counter() - started:.0f} s: {args.out / CSV_NAME}, {args.out / MD_NAME}"
          + (f", {plot}" if plot else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
