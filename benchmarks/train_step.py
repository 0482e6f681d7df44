"""End to end: one adapter training step of a LLaMA-7B-shaped model, causalattn vs PEFT AdaptionPrompt.

    python -m benchmarks.train_step                                  # CUDA: LLaMA-7B shapes, N = 512 ... 32k
    python -m benchmarks.train_step --checkpointing                  # gradient checkpointing (7B at 32k needs it)
    python -m benchmarks.train_step --seq-lens 512 2048 8192 32768 --iterations 3 --time-budget-s 150
    python -m benchmarks.train_step --preset cpu                     # tiny LLaMA, fp32, reference backend, seconds

Every provider trains adapter prompts of M tokens on the top L layers of a model with random weights,
built on the device in the benchmark dtype (no download) with its base frozen:

    peft-sdpa       (iii) PEFT AdaptionPrompt on attn_implementation="sdpa", CE only: the baseline of the ratios
    causalattn      (i)   attn_implementation="causalattn" + causalattn.hf.add_adapters (per-head tanh gate,
                          2 XG tokens): CE + CAT + 0.1 XG, the statistics from the fused kernel
                          (backend "triton" on CUDA, "reference" on CPU)
    peft-eager+cat  (ii)  PEFT AdaptionPrompt on attn_implementation="eager" with output_attentions=True, CE + the
                          CAT loss the way CAT computes it: every layer's maps P, mass_i = sum_j P_ij A_ij,
                          then causalattn.cat_loss over the stacked masses

The CAT cause mask is the kernel harness's (`benchmarks.providers.cat_style_spans`): packed 256-token
documents, each closing with an 8-token effect caused by three earlier spans (N < 256: no supervised row).

One step = zero the grads, forward with labels = input ids, the provider's loss, backward, AdamW step
on the adapter parameters. Per N: `warmup` untimed steps, then `iterations` steps, each timed with CUDA
events (wall clock on CPU): median/min/max ms, tokens/s = B N / median. `peak_mb` is the absolute peak
over the timed steps (weights, optimizer state and activations included): CUDA `max_memory_allocated`,
on CPU the process's peak RSS (Python and libraries included, blank where Linux does not provide it).

Providers run one after the other, baseline first and the N x N-materialising one last, each on a model
of its own that is freed before the next is built. A case that runs out of memory gets status "oom" and
the provider's longer N "oom (skipped)"; other failures become "error: ..." (or "unsupported" when PEFT
is missing). Rows are upserted into `<out>/train_step.csv` as they come; cases cut by `--time-budget-s`
are listed but not written. The table printed last gives each provider's time and memory as multiples of
(iii)'s and the longest N each one fits.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

import causalattn
from benchmarks.harness import (DEFAULT_OUT, error_status, is_oom, machine_fields, measure_peak, pick_device,
                                release_memory, upsert_rows)
from benchmarks.providers import DTYPES, Unsupported, cat_style_spans
from causalattn import CausalMask

CSV_NAME = "train_step.csv"
XG_TOKENS = 2      # DCA's XG tokens among the M prompt tokens (causalattn.hf.AdapterConfig's default)
XG_WEIGHT = 0.1    # lambda of the XG term, as in causalattn.hf's example
LEARNING_RATE = 1e-3

MODEL_FIELDS = ("layers", "hidden", "heads", "heads_kv", "intermediate", "vocab", "adapter_layers", "adapter_len")
KEY_FIELDS = ("device", "preset", "provider", *MODEL_FIELDS, "batch", "seq_len", "dtype", "checkpointing")
FIELDS = ("date", "device", "device_type", "torch", "triton", "transformers", "peft", "git_commit", "preset",
          "provider", "features", *MODEL_FIELDS, "batch", "seq_len", "dtype", "checkpointing", "trainable_params",
          "status", "median_ms", "min_ms", "max_ms", "iterations", "tokens_per_s", "peak_mb", "note")


# ------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class ModelPreset:
    """A LLaMA shape, where the adapters go, the dtype, and the sweep over N."""

    name: str
    layers: int
    hidden: int
    heads: int
    heads_kv: int
    intermediate: int
    vocab: int
    adapter_layers: int
    adapter_len: int
    dtype: str
    seq_lens: tuple[int, ...]
    warmup: int
    iterations: int
    # CPU threads (None: torch's default). One for the tiny CPU model, as the harness's CPU presets do:
    # at these sizes OpenMP synchronisation costs more than a second core gains, and on a shared
    # machine the steps became 10-100x slower and noisy.
    cpu_threads: Optional[int] = None

    def label(self) -> str:
        return (f"{self.name}: {self.layers} layers, d_model {self.hidden}, {self.heads}/{self.heads_kv} heads, "
                f"vocab {self.vocab}, adapter M={self.adapter_len} on the top {self.adapter_layers} layers")


PRESETS = {p.name: p for p in (
    ModelPreset("llama-7b", layers=32, hidden=4096, heads=32, heads_kv=32, intermediate=11008, vocab=32000,
                adapter_layers=30, adapter_len=10, dtype="bfloat16",
                seq_lens=(512, 1024, 2048, 4096, 8192, 16384, 32768), warmup=1, iterations=5),
    # N from 256: shorter sequences hold no whole CAT document, so the CAT loss would have no row.
    ModelPreset("cpu", layers=2, hidden=128, heads=4, heads_kv=4, intermediate=256, vocab=512,
                adapter_layers=2, adapter_len=10, dtype="float32", seq_lens=(256, 512, 1024), warmup=1,
                iterations=3, cpu_threads=1),
)}


@dataclass(frozen=True)
class RunSettings:
    preset: ModelPreset
    batch: int
    checkpointing: bool


# ------------------------------------------------------------------------------------------ providers
# The loss of one step for one batch, built once per batch outside the timed steps.
LossFactory = Callable[[Tensor, CausalMask], Callable[[], Tensor]]


@dataclass
class Trainee:
    """A built model and how a step computes its loss."""

    model: nn.Module
    make_loss: LossFactory
    note: str = ""

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class TrainProvider:
    name: str
    label: str     # (i), (ii), (iii): the providers' order in the report
    features: str  # as in the kernel harness: adapter, cat, xg
    build: Callable[[RunSettings, torch.device], Trainee]


def build_model(settings: RunSettings, device: torch.device, implementation: str) -> nn.Module:
    """A LlamaForCausalLM of the preset's shape with random weights, in train mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    preset = settings.preset
    config = LlamaConfig(vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                         num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                         num_key_value_heads=preset.heads_kv, max_position_embeddings=max(preset.seq_lens))
    # Created on the device in the benchmark dtype: a 7B model initialised in fp32 (or on the CPU) first
    # would need 27 GB and a copy.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation,
                                                 dtype=DTYPES[preset.dtype])
    model.train()
    if settings.checkpointing:
        # Non-reentrant: the reentrant kind needs an input that requires grad (the embeddings are frozen)
        # and would run collect()'s statistics without autograd.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def causalattn_trainee(model: nn.Module, adapter_len: int, adapter_layers: Optional[int], backend: str,
                       cat: bool = True, xg: bool = True) -> Trainee:
    """`model` (attn_implementation="causalattn") with the library's gated prompts (M = `adapter_len` on the
    top `adapter_layers` layers, XG_TOKENS of them XG tokens) and a loss of CE [+ CAT] [+ XG_WEIGHT XG],
    the statistics collected from the attention backend `backend` during the forward. CE alone passes no
    supervision and collects nothing: the cost of the prompts alone."""
    import causalattn.hf as cah

    cah.add_adapters(model, cah.AdapterConfig(length=adapter_len, layers=adapter_layers, xg_tokens=XG_TOKENS))
    cah.set_backend(model, backend)

    def make_loss(input_ids: Tensor, mask: CausalMask) -> Callable[[], Tensor]:
        if not (cat or xg):
            return lambda: model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

        def loss() -> Tensor:
            with cah.collect(model) as stats:
                out = model(input_ids=input_ids, labels=input_ids, supervision=mask, use_cache=False)
            total = out.loss + stats.cat_loss() if cat else out.loss
            if xg:
                with warnings.catch_warnings():
                    # B = 1 has no batch variance (XG = 0); the kernels compute and differentiate it all the same.
                    warnings.filterwarnings("ignore", message="xg_variance: a micro-batch of one sample")
                    total = total + XG_WEIGHT * stats.xg_loss()
            return total

        return loss

    return Trainee(model, make_loss, f"backend={backend}")


def _build_causalattn(settings: RunSettings, device: torch.device) -> Trainee:
    import causalattn.hf as cah

    # On CPU the reference backend explicitly: "auto" would pick the Triton interpreter whenever
    # TRITON_INTERPRET=1 is set (as the test suite does).
    backend = "triton" if device.type == "cuda" else "reference"
    return causalattn_trainee(build_model(settings, device, cah.IMPLEMENTATION), settings.preset.adapter_len,
                              settings.preset.adapter_layers, backend)


def require_peft() -> None:
    """Raise Unsupported when PEFT cannot be imported (checked before a model is built)."""
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise Unsupported(f"peft is not importable ({error})") from None


def add_peft_prompts(model: nn.Module, adapter_len: int, adapter_layers: int) -> nn.Module:
    """`model` wrapped in PEFT AdaptionPrompt (M = `adapter_len` on the top `adapter_layers` layers);
    get_peft_model freezes the base and leaves only the prompts and gates trainable."""
    from peft import AdaptionPromptConfig, get_peft_model

    return get_peft_model(model, AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                      task_type="CAUSAL_LM"))


def _peft_model(settings: RunSettings, device: torch.device, implementation: str) -> nn.Module:
    require_peft()
    return add_peft_prompts(build_model(settings, device, implementation), settings.preset.adapter_len,
                            settings.preset.adapter_layers)


def peft_sdpa_trainee(model: nn.Module) -> Trainee:
    """A PEFT-wrapped model on sdpa, trained on CE alone."""
    def make_loss(input_ids: Tensor, mask: CausalMask) -> Callable[[], Tensor]:
        return lambda: model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    return Trainee(model, make_loss)


def peft_eager_cat_trainee(model: nn.Module) -> Trainee:
    """A PEFT-wrapped model on eager attention, trained on CE + the CAT loss computed the way CAT's code
    does: every layer's maps P (output_attentions), mass_i = sum_j P_ij A_ij, causalattn.cat_loss over the
    stacked masses (the mean over layers and heads)."""
    def make_loss(input_ids: Tensor, mask: CausalMask) -> Callable[[], Tensor]:
        causes = mask.to_dense()[:, None]  # (B, 1, N, N) bool: CAT's collator builds it once per batch

        def loss() -> Tensor:
            out = model(input_ids=input_ids, labels=input_ids, output_attentions=True, use_cache=False)
            masses = [(maps * causes).sum(-1, dtype=torch.float32) for maps in out.attentions]  # (B, Hq, N) each
            return out.loss + causalattn.cat_loss(masses, mask)

        return loss

    return Trainee(model, make_loss, "output_attentions: every layer's (B, H, N, N) maps kept for the loss")


def _build_peft_sdpa(settings: RunSettings, device: torch.device) -> Trainee:
    return peft_sdpa_trainee(_peft_model(settings, device, "sdpa"))


def _build_peft_eager_cat(settings: RunSettings, device: torch.device) -> Trainee:
    return peft_eager_cat_trainee(_peft_model(settings, device, "eager"))


# Run order: the baseline first (every ratio needs it, also when a time budget cuts the run), the
# N x N-materialising provider last (it runs out of memory first).
PROVIDERS = {p.name: p for p in (
    TrainProvider("peft-sdpa", "(iii)", "adapter", _build_peft_sdpa),
    TrainProvider("causalattn", "(i)", "adapter+cat+xg", _build_causalattn),
    TrainProvider("peft-eager+cat", "(ii)", "adapter+cat", _build_peft_eager_cat),
)}
BASELINE = "peft-sdpa"


# ------------------------------------------------------------------------------------------ one case
def time_steps(step: Callable[[], None], device: torch.device, iterations: int) -> list[float]:
    """Milliseconds of each of `iterations` calls of `step`: CUDA events around each call, read after
    one synchronisation at the end (no host sync between steps beyond the step's own); CPU wall clock."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iterations)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def random_tokens(batch: int, seq_len: int, vocab: int, device: torch.device) -> Tensor:
    """Input ids, the same for every provider (a fixed seed per N)."""
    generator = torch.Generator().manual_seed(seq_len)
    return torch.randint(vocab, (batch, seq_len), generator=generator).to(device)


def measure_case(trainee: Trainee, optimizer: torch.optim.Optimizer, settings: RunSettings, seq_len: int,
                 mask: CausalMask, device: torch.device) -> dict[str, Any]:
    """Time training steps at one N. Everything the case allocates lives in this frame, so it is freed
    when the frame goes, also when a step raises."""
    input_ids = random_tokens(settings.batch, seq_len, settings.preset.vocab, device)
    loss = trainee.make_loss(input_ids, mask.to(device))
    params = trainee.trainable()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    for _ in range(settings.preset.warmup):  # compiles kernels, allocates the optimizer state, settles the allocator
        step()
    times: list[float] = []
    peak = measure_peak(lambda: times.extend(time_steps(step, device, settings.preset.iterations)), params, device,
                        baseline=0)
    median = statistics.median(times)
    return {"status": "ok", "median_ms": median, "min_ms": min(times), "max_ms": max(times),
            "iterations": len(times), "tokens_per_s": settings.batch * seq_len / (median * 1e-3), "peak_mb": peak}


def failure_fields(error: BaseException) -> dict[str, Any]:
    """The status (and note) of a case or model build that raised."""
    if isinstance(error, Unsupported):
        return {"status": "unsupported", "note": str(error)}
    if is_oom(error):
        return {"status": "oom"}
    return {"status": error_status(error)}


# ------------------------------------------------------------------------------------------ the run
def package_version(name: str) -> str:
    """The installed version of `name`, or "" when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


class Recorder:
    """Stamps rows with the machine and the run's settings, upserts them into the CSV as they come,
    prints a progress line, and keeps them for the table."""

    def __init__(self, path: Path, machine: dict[str, Any], settings: RunSettings) -> None:
        preset = settings.preset
        self.path = path
        self.common = {**machine, **{f: getattr(preset, f) for f in MODEL_FIELDS}, "batch": settings.batch,
                       "dtype": preset.dtype, "checkpointing": int(settings.checkpointing)}
        self.rows: list[dict[str, Any]] = []

    def add(self, provider: TrainProvider, seq_len: int, trainable_params: Optional[int],
            fields: dict[str, Any]) -> None:
        row = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **self.common,
               "provider": provider.name, "features": provider.features, "seq_len": seq_len,
               "trainable_params": trainable_params, **fields}
        self.rows.append(row)
        upsert_rows(self.path, [row], FIELDS, KEY_FIELDS)
        if row["status"] == "ok":
            peak = f"{row['peak_mb'] / 1024:.2f} GiB peak" if row["peak_mb"] is not None else "peak n/a"
            result = (f"{row['median_ms']:.1f} ms [{row['min_ms']:.1f}, {row['max_ms']:.1f}] "
                      f"{row['tokens_per_s']:.0f} tokens/s {peak}")
        else:
            result = f"{row['status']} {row.get('note') or ''}"
        print(f"{provider.label:5s} {provider.name:15s} N={seq_len:<6d} {result}", flush=True)


def run_provider(provider: TrainProvider, settings: RunSettings, seq_lens: Sequence[int], device: torch.device,
                 masks: dict[int, CausalMask], recorder: Recorder, out_of_time: Callable[[], bool]) -> list[str]:
    """Every N of one provider on one model; returns the cases the time budget cut."""
    try:
        trainee = provider.build(settings, device)
    except Exception as error:  # a provider that cannot be built is a row per N, never the end of the run
        failure = failure_fields(error)
        for seq_len in seq_lens:
            recorder.add(provider, seq_len, None, failure)
        return []
    params = trainee.trainable()
    trainable_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    cut, out_of_memory = [], False
    for seq_len in seq_lens:
        if out_of_memory:  # a longer sequence needs more memory still
            recorder.add(provider, seq_len, trainable_params, {"status": "oom (skipped)"})
            continue
        if out_of_time():
            cut.append(f"{provider.name} N={seq_len}")
            continue
        try:
            fields = {**measure_case(trainee, optimizer, settings, seq_len, masks[seq_len], device),
                      "note": trainee.note}
        except Exception as error:  # OOM and other failures are rows
            fields = failure_fields(error)
        release_memory(device, full_collect=fields["status"] != "ok")
        out_of_memory = fields["status"] == "oom"
        recorder.add(provider, seq_len, trainable_params, fields)
    return cut


def run(settings: RunSettings, providers: Sequence[TrainProvider], seq_lens: Sequence[int], device: torch.device,
        out_dir: Path, time_budget_s: Optional[float] = None) -> list[dict[str, Any]]:
    """Run every (provider, N), upserting each row into `<out_dir>/train_step.csv`; returns the rows."""
    machine = {**machine_fields(device, settings.preset.name), "transformers": package_version("transformers"),
               "peft": package_version("peft")}
    recorder = Recorder(out_dir / CSV_NAME, machine, settings)
    print(f"train step: {settings.preset.label()}; B={settings.batch} {settings.preset.dtype}, checkpointing "
          f"{'on' if settings.checkpointing else 'off'}, N={list(seq_lens)} on {machine['device']} (torch "
          f"{machine['torch']}, triton {machine['triton'] or '-'}, transformers {machine['transformers']}, peft "
          f"{machine['peft']}, commit {machine['git_commit']}) -> {recorder.path}", flush=True)
    started = time.perf_counter()

    def out_of_time() -> bool:
        return time_budget_s is not None and time.perf_counter() - started > time_budget_s

    # Built once on the CPU (CausalMask.from_spans takes seconds at 32k) and shared by the providers.
    masks = {n: CausalMask.from_spans(cat_style_spans(settings.batch, n), n) for n in seq_lens}
    cut = []
    for provider in providers:
        if out_of_time():
            cut.extend(f"{provider.name} N={n}" for n in seq_lens)
            continue
        cut.extend(run_provider(provider, settings, seq_lens, device, masks, recorder, out_of_time))
        release_memory(device, full_collect=True)  # the provider's model goes before the next one is built
    if cut:
        print(f"time budget of {time_budget_s:.0f} s reached: {len(cut)} cases not run (not written): "
              + ", ".join(cut))
    print(f"done in {time.perf_counter() - started:.0f} s, rows in {recorder.path}")
    return recorder.rows


# ------------------------------------------------------------------------------------------ table
def longest_fit(rows: Sequence[dict[str, Any]], provider: str) -> str:
    """The longest N `provider` ran, and the first N it ran out of memory at."""
    mine = [r for r in rows if r["provider"] == provider]
    fits = [r["seq_len"] for r in mine if r["status"] == "ok"]
    first_oom = min((r["seq_len"] for r in mine if str(r["status"]).startswith("oom")), default=None)
    text = str(max(fits)) if fits else "none"
    return text + (f" (out of memory from N={first_oom})" if first_oom is not None else "")


def format_table(rows: Sequence[dict[str, Any]], settings: RunSettings, device_name: str) -> str:
    """One line per (N, provider): step time, tokens/s, peak memory, and time and memory as multiples
    of the baseline (iii)'s at the same N (> 1: slower / more memory); then the longest N per provider."""
    providers = [p for p in PROVIDERS.values() if any(r["provider"] == p.name for r in rows)]
    lines = [f"== train step | {settings.preset.label()} | B={settings.batch} {settings.preset.dtype} | "
             f"checkpointing {'on' if settings.checkpointing else 'off'} | {device_name}",
             f"{'N':>6s}  {'provider':21s} {'status':14s} {'step ms':>9s} {'tokens/s':>9s} {'peak GiB':>8s} "
             f"{'time x(iii)':>11s} {'mem x(iii)':>10s}"]
    for seq_len in sorted({r["seq_len"] for r in rows}):
        at_n = {r["provider"]: r for r in rows if r["seq_len"] == seq_len}
        baseline = at_n.get(BASELINE)
        base_ok = baseline is not None and baseline["status"] == "ok"
        for provider in providers:
            row = at_n.get(provider.name)
            if row is None:
                continue
            name = f"{provider.label} {provider.name}"
            if row["status"] != "ok":
                lines.append(f"{seq_len:6d}  {name:21s} {str(row['status'])[:60]}")
                continue
            peak = row["peak_mb"]
            peak_text = f"{peak / 1024:.2f}" if peak is not None else ""
            time_ratio = f"{row['median_ms'] / baseline['median_ms']:.2f}" if base_ok else ""
            memory_ratio = (f"{peak / baseline['peak_mb']:.2f}"
                            if base_ok and peak is not None and baseline["peak_mb"] else "")
            lines.append(f"{seq_len:6d}  {name:21s} {'ok':14s} {row['median_ms']:9.1f} {row['tokens_per_s']:9.0f} "
                         f"{peak_text:>8s} {time_ratio:>11s} {memory_ratio:>10s}")
    lines.append("longest N that fits: " + "; ".join(
        f"{p.label} {p.name} {longest_fit(rows, p.name)}" for p in providers))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Presets: " + "; ".join(
                                         f"{p.label()}, {p.dtype}, N={list(p.seq_lens)}" for p in PRESETS.values()))
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="model shape and sweep (default: llama-7b on CUDA, cpu otherwise)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="PROVIDER",
                        help=f"a subset of {', '.join(PROVIDERS)} (run in that order)")
    parser.add_argument("--seq-lens", nargs="+", type=int, help="override the preset's N")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, help="untimed steps per N (default: the preset's)")
    parser.add_argument("--iterations", type=int, help="timed steps per N (default: the preset's)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every decoder layer")
    parser.add_argument("--time-budget-s", type=float, help="start no new case (or model) after this many seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory of {CSV_NAME} (default benchmarks/results)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    preset = PRESETS[args.preset or ("llama-7b" if device.type == "cuda" else "cpu")]
    overrides = {name: value for name, value in (("seq_lens", tuple(args.seq_lens) if args.seq_lens else None),
                                                 ("warmup", args.warmup), ("iterations", args.iterations))
                 if value is not None}
    preset = replace(preset, **overrides)
    if args.batch < 1 or preset.iterations < 1 or preset.warmup < 0 or min(preset.seq_lens) < 1:
        parser.error("--batch, --iterations and every --seq-lens value must be positive, --warmup not negative")
    settings = RunSettings(preset, args.batch, args.checkpointing)
    providers = [PROVIDERS[name] for name in PROVIDERS if args.providers is None or name in args.providers]
    seq_lens = sorted(set(preset.seq_lens))  # ascending: an OOM skips the longer ones
    threads = torch.get_num_threads()
    if device.type == "cpu" and preset.cpu_threads:
        torch.set_num_threads(preset.cpu_threads)
    try:
        rows = run(settings, providers, seq_lens, device, args.out, args.time_budget_s)
    finally:
        torch.set_num_threads(threads)  # main() also runs inside test processes
    print(format_table(rows, settings, rows[0]["device"] if rows else str(device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
