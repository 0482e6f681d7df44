"""The end of a job: `report.json` (everything measured, machine-readable) and the printed table.

The table puts the runs side by side: accuracy on each evaluation split before adapter training (all
gates 0, so every run starts from the base model's answers) and after the last epoch, next to the
majority-answer baseline and the standard error of an accuracy on that many examples, so a reader can
tell a difference from noise.
"""
from __future__ import annotations

import json
import math
import os
import platform
import uuid
from pathlib import Path
from typing import Optional, Sequence

import torch

from causalattn.lab.training.batching import JobData
from causalattn.lab.training.config import TrainConfig
from causalattn.lab.training.loop import INVARIANT_SUFFIX, RunResult

REPORT_NAME = "report.json"
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def majority_accuracy(results: Sequence[RunResult]) -> dict[str, list[float]]:
    """{split: [majority-answer accuracy on each seed's data]}, one value per seed (from the seed's
    first run: every run of a seed shares its data)."""
    seen: dict[int, dict] = {}
    for result in results:
        seen.setdefault(result.seed, result.majority)
    splits = next(iter(seen.values()), {})
    return {split: [m[split] for m in seen.values() if split in m] for split in splits}


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p measured on n examples."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def toy_note(model_info: dict, data: JobData, results: Sequence[RunResult], config: TrainConfig) -> str:
    """What the embedded default shows, and what it does not (printed under the table)."""
    if not results:
        return "This is a toy (no run finished)."
    if config.task == "dialects":
        return _dialects_note(model_info, data, results, config)
    if config.task != "shortcut":
        return _cancer_risk_note(model_info, data, results)
    steps = results[0].history[-1]["step"] if results[0].history else 0
    trained = "adapter and q/k" if config.train_qk else "adapter"
    bases = model_info.get("bases", [model_info])
    reads = [base.get("reading_accuracy") for base in bases if base.get("reading_accuracy") is not None]
    reading = (f" (on fresh records the base{'s' if len(bases) > 1 else ''} answered that question right "
               f"{', '.join(f'{r:.0%}' for r in reads)})") if reads else ""
    built = (f"{len(bases)} bases, each built here from its own seed ({', '.join(str(b.get('seed')) for b in bases)}), "
             "are" if len(bases) > 1 else "The base is")
    return (
        f"This is a toy. {built} a {model_info.get('parameters', 0):,}-parameter LLaMA pre-trained briefly on the "
        "task's records, asked whether the overall risk (or the cancer risk) is high, answered by the majority of all "
        f"7 fields{reading}: it can read fields, but not which ones the cancer question is about. Each run "
        f"trains {results[0].parameters.get('trainable', 0):,} {trained} parameters for {steps} steps on "
        f"{len(data.train)} examples. In training the one-word cue (Fingers=yellow/clean) agrees with the label on "
        f"{config.cue_agreement:.0%} of examples; the causes (Smoking, Weight, Alcohol: the label is their majority) "
        f"decide it always. A run that reads the cue scores about {config.cue_agreement:.0%} on iid, near 0 on flipped "
        "(the cue always contradicts the label) and 50% on independent; a run that reads the causes scores alike on "
        f"all three. CAT here is the {config.cat_kind} loss{_cat_scope(config)} with weight {config.cat_weight:g} × "
        f"exp(-{config.cat_decay:g} × epoch){_layout(config)}. 'cause attn' shows whether CAT moved the supervised "
        "rows' attention onto the causes, the accuracy columns whether the answers followed; ce+cat-random is the "
        "control (CAT onto as many random fields). A difference counts when the ±2 standard-error intervals do "
        "not overlap. It does not reproduce the CAT or DCA papers' results on real LLMs (use --model with a real "
        "checkpoint for that).")


def _cat_scope(config: TrainConfig) -> str:
    """Which layers and heads CAT scores, as a clause of the note."""
    layers = f"layer {config.cat_layers[0]}" if len(config.cat_layers) == 1 else (
        f"layers {','.join(map(str, config.cat_layers))}" if config.cat_layers else "every layer")
    return f" of {layers}'s every head" if config.cat_heads == "each" else f" on {layers}"


def _layout(config: TrainConfig) -> str:
    """The shortcut task's non-default layout, as a clause of the note."""
    rows = ", on the question's rows as well as the answer rows" if config.cat_rows == "question" else ""
    cue = "; the cue is the record's last field" if config.cue_position == "last" else ""
    return rows + cue


def _dialects_note(model_info: dict, data: JobData, results: Sequence[RunResult], config: TrainConfig) -> str:
    steps = results[0].history[-1]["step"] if results[0].history else 0
    return (
        f"This is a toy. The base is a {model_info.get('parameters', 0):,}-parameter LLaMA pre-trained briefly on both "
        "dialects' records with another question (the majority of all fields) and the cancer question with random "
        f"answers. Each run trains for {steps} steps on {len(data.train)} examples, half in each dialect; in each "
        f"dialect its own one-word cue (Fingers=yellow/clean, teeth:stained/white) agrees with the label on "
        f"{config.cue_agreement:.0%} of examples, and the causes (smoking, weight, alcohol: their majority) decide it "
        "always. 'flipped' contradicts each dialect's cue; 'recombined' writes one dialect's fields with the other's "
        "question and cue (a coin flip). A +routed run adds a domain prompt per dialect, chosen per sample by the "
        "router from the prompt's hidden states (route NMI: 1 when the routes are the dialects), and the "
        "'invariant' row evaluates it with the domain prompts off. A difference counts when the ±2 standard-error "
        "intervals do not overlap. It does not reproduce the ICLM paper's results on real LLMs (use --model with a "
        "real checkpoint for that).")


def _cancer_risk_note(model_info: dict, data: JobData, results: Sequence[RunResult]) -> str:
    n_eval = min(len(v) for v in data.evals.values())
    se = 100 * standard_error(0.75, n_eval)
    steps = results[0].history[-1]["step"] if results and results[0].history else 0
    return (
        f"This is a toy. The base is a {model_info.get('parameters', 0):,}-parameter LLaMA pre-trained for about a "
        "minute on Spurious Token Game text with random answers: it knows the format, not the rule. Each run then "
        f"trains {results[0].parameters.get('adapter', 0):,} adapter parameters for {steps} steps on "
        f"{len(data.train)} examples. The IID tests keep the training data's spurious features (Yellow fingers, "
        "Clothing size, Hormones follow the causes); the OOD tests draw them independently, so a run that leans on "
        "them loses accuracy from IID to OOD. 'cause attn' shows whether CAT moved the answer rows' attention onto "
        "the causes; the accuracy columns show whether the answers followed. 'Low Risk' is the majority answer. With "
        f"{n_eval} test examples an accuracy near 75% has a standard error of about {se:.1f} points: differences "
        "under ~2 standard errors are noise, and one seed is one sample. It shows the pipeline end to end and how "
        "the losses move attention and accuracy on this toy; it does not reproduce the CAT or DCA papers' results "
        "on real LLMs (use --model with a real checkpoint for that).")


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); the error is NaN for n = 1."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def last_epoch_means(result: RunResult) -> dict[str, float]:
    """Means over the last epoch of the logged CE, CAT, XG and cause attention of one run."""
    if not result.history:
        return {}
    last = [r for r in result.history if r["epoch"] == result.history[-1]["epoch"]]
    names = ("ce", "cat", "xg", "cause_attn") + (("mi", "vq") if "route_fractions" in last[-1] else ())
    means = {name: sum(r[name] for r in last) / len(last) for name in names}
    if "route_nmi" in last[-1]:  # routed runs: the last epoch's NMI between route and true domain
        means["route_nmi"] = last[-1]["route_nmi"]
    return means


def run_metrics(result: RunResult) -> dict[str, float]:
    """One run's numbers of the table: final accuracy per split (routed runs: also invariant-only), last-epoch
    losses (routed runs: also MI, VQ and route NMI), training seconds."""
    return {**{f"acc_{split}": acc for split, acc in result.final_accuracy().items()},
            **last_epoch_means(result), **route_nmi_by_test_set(result), "train_seconds": result.train_seconds}


def route_nmi_by_test_set(result: RunResult) -> dict[str, float]:
    """{"route_nmi_<split>": NMI of the final routes with the true domains} of a routed run's test sets."""
    last = max((row["epoch"] for row in result.accuracy), default=0)
    return {f"route_nmi_{row['split']}": row["route_nmi"] for row in result.accuracy
            if row["epoch"] == last and "route_nmi" in row}


def _routing_lines(summary: dict) -> list[str]:
    """One line per routed run: its route NMI with the true domain (training, last epoch, and each test
    set), MI and VQ over the last epoch."""
    lines = []
    for name, entry in summary.items():
        if "vq" not in entry:
            continue
        nmi = f"route NMI train {_cell(entry['route_nmi'], '.2f')}, " if "route_nmi" in entry else ""
        tests = [f"{key[len('route_nmi_'):]} {_cell(value, '.2f')}" for key, value in entry.items()
                 if key.startswith("route_nmi_")]
        nmi += f"{', '.join(tests)}, " if tests else ""
        lines.append(f"{name}: {nmi}MI {_cell(entry['mi'], '.1e')}, VQ {_cell(entry['vq'], '.3f')} (last epoch); "
                     f"'{name} invariant' is the same adapters with the domain segments off")
    return lines


def pooled(values: Sequence[float], bases: Sequence[Optional[int]]) -> tuple[float, Optional[float], dict]:
    """Mean and standard error of `values` (one per run), and {base: mean} when they come from several bases.

    With one base the error is over the runs. With several, each base's runs are averaged first and the
    mean and error are over those base means: runs on one base share its draw, so counting them as
    independent would understate the spread a new base build brings (the error is then over B values,
    not B x S)."""
    groups: dict[Optional[int], list[float]] = {}
    for value, base in zip(values, bases):
        groups.setdefault(base, []).append(value)
    if len(groups) < 2:
        mean, error = mean_and_error(values)
        return mean, None if math.isnan(error) else error, {}
    means = {base: sum(group) / len(group) for base, group in groups.items()}
    mean, error = mean_and_error(list(means.values()))
    return mean, None if math.isnan(error) else error, means


def summarize_runs(results: Sequence[RunResult]) -> dict[str, dict]:
    """{run name: {"seeds": [...], "bases": [...], metric: {"mean", "se", "values"[, "base_means"]}}} over the
    seeds (and bases, see `pooled`) of each run."""
    grouped: dict[str, list[RunResult]] = {}
    for result in results:
        grouped.setdefault(result.name, []).append(result)
    summary = {}
    for name, runs in grouped.items():
        metrics = [run_metrics(r) for r in runs]
        entry: dict = {"seeds": [r.seed for r in runs], "bases": [r.base for r in runs]}
        for key in metrics[0]:
            kept = [(m[key], r.base) for m, r in zip(metrics, runs) if key in m]
            values = [value for value, _ in kept]
            mean, error, base_means = pooled(values, [base for _, base in kept])
            entry[key] = {"mean": mean, "se": error, "values": values}
            if base_means:
                entry[key]["base_means"] = {str(base): value for base, value in base_means.items()}
        summary[name] = entry
    return summary


def _cell(entry: Optional[dict], spec: str) -> str:
    if not entry:
        return "-"
    if entry["se"] is None:
        return format(entry["mean"], spec)
    return f"{format(entry['mean'], spec)}±{format(entry['se'], spec)}"


def format_table(results: Sequence[RunResult], data: JobData) -> str:
    """The side-by-side table: accuracy per split before (gates 0) and after training, final losses;
    with several seeds each cell is mean ± standard error over them."""
    splits = list(data.evals)
    if not results:
        return "(no runs)"
    summary = summarize_runs(results)
    first_runs = [r for r in results if r.name == results[0].name]
    bases = sorted({r.base for r in first_runs if r.base is not None})
    seeds = len({r.seed for r in first_runs})
    before_values = {s: [row["accuracy"] for r in first_runs for row in r.accuracy if row["epoch"] == 0
                         and row["split"] == s] for s in splits}
    before_bases = {s: [r.base for r in first_runs for row in r.accuracy if row["epoch"] == 0 and row["split"] == s]
                    for s in splits}
    majority = majority_accuracy(results)
    head = ["run"] + [f"{s} acc" for s in splits] + ["CE", "CAT", "XG var", "cause attn", "train s"]
    blank = [""] * (len(head) - 1 - len(splits))
    rows = [["majority answer"] + [_cell(dict(zip(("mean", "se"), _error_or_none(majority[s]))), ".3f")
                                   if majority.get(s) else "-" for s in splits] + blank]
    if all(before_values.values()):
        # The first step's forward runs with every gate still 0: the base model's attention.
        first = [r.history[0]["cause_attn"] for r in first_runs if r.history]
        first_bases = [r.base for r in first_runs if r.history]
        rows.append(["before (gates 0)"]
                    + [_cell(_pooled_cell(before_values[s], before_bases[s]), ".3f") for s in splits]
                    + blank[:-2] + [_cell(_pooled_cell(first, first_bases), ".3f") if first else "", ""])
    for name, entry in summary.items():
        rows.append([name] + [_cell(entry.get(f"acc_{s}"), ".3f") for s in splits]
                    + [_cell(entry.get("ce"), ".3f"), _cell(entry.get("cat"), ".3f"), _cell(entry.get("xg"), ".1e"),
                       _cell(entry.get("cause_attn"), ".3f"), f"{entry['train_seconds']['mean']:.0f}"])
        if any(f"acc_{s}{INVARIANT_SUFFIX}" in entry for s in splits):
            rows.append([f"{name} invariant"] + [_cell(entry.get(f"acc_{s}{INVARIANT_SUFFIX}"), ".3f") for s in splits]
                        + blank)
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    sizes = ", ".join(f"{s} {len(data.evals[s])}" for s in splits)
    if len(bases) > 1:
        each = f"the mean of its {seeds} seeds" if seeds > 1 else "its one seed"
        spread = (f"mean ± standard error over {len(bases)} independently built bases, each base's value {each} "
                  f"({len(bases) * seeds} runs per row; data, adapter init and order change with the seed); ")
    else:
        spread = (f"mean ± standard error over {seeds} seeds (data, adapter init and order all change with the "
                  "seed); " if seeds > 1 else "one seed; ")
    lines.append(f"({spread}accuracy on {sizes} examples per seed; CE, CAT, XG variance and cause attn (the share "
                 "of the supervised rows' attention on the annotated causes, in the layers CAT supervises) are means "
                 "over the last epoch, logged for every run and in the loss only where the run name says so; "
                 "train s is per run)")
    return "\n".join(lines + _routing_lines(summary) + base_spread_lines(summary, splits))


def base_spread_lines(summary: dict, splits: Sequence[str]) -> list[str]:
    """With several bases: each run's accuracy per base (the mean over that base's seeds), one column per
    base, so the spread over base builds is visible and not only its standard error."""
    if not splits:  # a job without evaluation files has no accuracy to spread
        return []
    entries = [(name, entry) for name, entry in summary.items() if "base_means" in entry.get(f"acc_{splits[0]}", {})]
    if not entries:
        return []
    bases = list(entries[0][1][f"acc_{splits[0]}"]["base_means"])
    head = ["run"] + [f"base {base}" for base in bases]
    rows = [[name] + ["/".join(format(entry[f"acc_{s}"]["base_means"][base], ".2f") for s in splits)
                      for base in bases] for name, entry in entries]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    return ["", f"accuracy per base ({' / '.join(splits)}; each the mean over the base's seeds):", *lines]


def _pooled_cell(values: Sequence[float], bases: Sequence[Optional[int]]) -> dict:
    mean, error, _ = pooled(values, bases)
    return {"mean": mean, "se": error}


def _error_or_none(values: Sequence[float]) -> tuple[float, Optional[float]]:
    mean, error = mean_and_error(values)
    return mean, None if math.isnan(error) else error


def build_report(config: TrainConfig, data: JobData, results: Sequence[RunResult], *, model_info: dict,
                 world_size: int, device: str, wall_seconds: float, plots: dict, note: Optional[str]) -> dict:
    import transformers

    return {
        "format": "causalattn-train-report",
        "version": 1,
        "config": {**config.trajectory_options(), "output_dir": config.output_dir},
        "model": model_info,
        "data": {"source": data.source, "train": len(data.train),
                 "eval": {k: len(v) for k, v in data.evals.items()}, "candidates": list(data.candidates),
                 "majority_accuracy": {split: {"mean": mean_and_error(values)[0], "values": values}
                                       for split, values in majority_accuracy(results).items()}},
        "summary": summarize_runs(results),
        "runs": [{"name": r.name, "seed": r.seed, "base": r.base, "final_accuracy": r.final_accuracy(), "accuracy": r.accuracy,
                  "history": r.history, "train_seconds": r.train_seconds,
                  "examples_per_second": r.examples_per_second, "adapter_dir": str(r.adapter_dir),
                  "resumed_at_epoch": r.resumed_at_epoch, "parameters": r.parameters,
                  "majority_accuracy": r.majority} for r in results],
        "plots": plots,
        "note": note,
        "environment": {"world_size": world_size, "device": device, "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "cpu": cpu_model(), "onednn": torch.backends.mkldnn.enabled,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        # the switches that change which CPU kernels run (and so the bits of a base build)
                        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
                        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "wall_seconds": wall_seconds,
    }


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(directory: Path, report: dict) -> Path:
    """Write `report.json` atomically; returns its path."""
    path = Path(directory) / REPORT_NAME
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
