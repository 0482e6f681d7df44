"""`causalattn train`: train causal adapters (CE, CAT, XG) on a LLaMA-family model and compare runs.

    causalattn train                                   # the embedded default: a tiny LLaMA, the shortcut
                                                       # STG, runs ce, ce+cat, ce+cat+xg, ce+cat-random
                                                       # on 3 seeds; iid/flipped/independent table
    causalattn train --model DIR --data train.jsonl --eval-data test.jsonl --output-dir out
    causalattn train --task dialects --runs ce,ce+routed --domains 2 --route vq   # ICLM's routed adapters
    torchrun --nproc_per_node=4 -m causalattn.lab.cli train --model DIR ...   # data parallel (or --fsdp)

Without `--model` the tiny base is built once and cached (see `causalattn.lab.training.tiny`). Each run
writes `<output-dir>/[seed-K/]<run>/checkpoints/epoch-NNN` every epoch and `.../<run>/adapter` at
the end (the `seed-K` level when `--seeds` > 1); the job writes `<output-dir>/report.json` and plots, and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from causalattn.data.batches import full_text
from causalattn.lab.training import config as config_module
from causalattn.lab.training import lora, tiny, workers
from causalattn.lab.training.batching import DataFiles, JobData, load_data, read_data_files
from causalattn.lab.training.checkpoint import checkpoint_root
from causalattn.lab.training.config import STG, ConfigError, TrainConfig, check_cat_layers, config_from_args
from causalattn.lab.training.distributed import DistContext, setup, teardown
from causalattn.lab.training.loop import Job, RunResult, Trainer
from causalattn.lab.training.report import build_report, format_table, toy_note, write_report
from causalattn.pretrained import resolve_pretrained

ATTENTION_EXAMPLES = 3  # examples drawn in the attention heat maps


class Base(NamedTuple):
    """A base checkpoint of the job: its seed (an embedded base when the job has several, else None), its
    directory and what the report says about it."""

    seed: Optional[int]
    path: Path
    info: dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `causalattn train`."""
    config_module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of `causalattn train` once arguments are parsed; exit status 2 for a bad option."""
    try:
        config = config_from_args(args)
        train(config)
    except ConfigError as error:
        print(f"causalattn train: error: {error}", file=sys.stderr)
        return 2
    return 0


def load_tokenizer(path: Path):
    """The checkpoint's fast tokenizer, padding on the right, with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"--model: {path} has no fast (Rust) tokenizer; causal annotations need character offsets")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"--model: the tokenizer in {path} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out and never labelled
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_bases(config: TrainConfig, context: DistContext, log: Callable[[str], None]) -> list[Base]:
    """The base checkpoints of the job: --model, or the embedded tiny bases (seeds --base-seed, ...), built
    on rank 0 when not cached yet (in --workers processes when there are several)."""
    if config.model is not None:
        if context.is_main:  # a GGUF file is converted once, by one process; the others then find the folder
            resolve_pretrained(config.model, log=log)
        context.barrier()
        path = resolve_pretrained(config.model)
        return [Base(None, path, {"path": str(path), "source": config.model, "embedded": False})]
    settings = [tiny.settings_for(config.task, seed=seed, threads=config.base_threads, onednn=config.base_onednn)
                for seed in range(config.base_seed, config.base_seed + config.bases)]
    if context.is_main:
        show = not config.quiet and sys.stderr.isatty() and config.workers == 1
        missing = [s for s in settings if not (tiny.cached_path(s) / tiny.SETTINGS_NAME).is_file()]
        if config.workers > 1 and len(missing) > 1:
            workers.build_bases(missing, config.workers)
        for each in settings:
            tiny.ensure_tiny_base(each, show_progress=show, log=log)
    context.barrier()
    bases = []
    for each in settings:
        path = tiny.cached_path(each)
        info = tiny.read_record(path)
        bases.append(Base(each.seed if config.bases > 1 else None, path, {
            "path": str(path), "embedded": True, "parameters": info["parameters"], "seed": each.seed,
            "base_lm_loss": info["final_lm_loss"], "reading_accuracy": info.get("reading_accuracy"),
            "reading_by_round": info.get("reading_by_round"),
            "weights_sha256": info.get("weights_sha256"),
            "build_seconds": info["seconds"], "settings": info["settings"]}))
    return bases


def prepare_output_dir(config: TrainConfig, context: DistContext) -> Path:
    """The job's directory: --output-dir or a new timestamped one; refuses to overwrite a job unless resuming."""
    name = config.output_dir or context.broadcast(f"runs/train-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    directory = Path(name)
    existing = [p for p in directory.iterdir() if checkpoint_root(p).is_dir()] if directory.is_dir() else []
    if existing and not config.resume:
        raise ConfigError(f"--output-dir: {directory} already holds checkpoints ({existing[0].name}); pass --resume "
                          "to continue that job, or choose another directory")
    if context.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    context.barrier()
    return directory


class Plotter:
    """Calls `causalattn.lab.training.plots` when that module is installed and `active` (rank 0, and the job's
    first unit for the attention figures); a failing plot is reported and skipped, never the end of a
    finished training."""

    def __init__(self, output_dir: Path, active: bool):
        self.output_dir = output_dir
        self.files: dict[str, str] = {}
        self.notes: list[str] = []
        self.module = None
        if not active:
            return
        try:
            from causalattn.lab.training import plots
            self.module = plots
        except ImportError as error:
            self.notes.append(f"plots skipped: causalattn.lab.training.plots is not available ({error})")

    def _call(self, key: str, filename: str, draw: Callable[[str], None]) -> None:
        if self.module is None:
            return
        path = self.output_dir / filename
        try:
            draw(str(path))
            self.files[key] = str(path)
        except Exception as error:  # noqa: BLE001 - a plot must not cost the trained adapters
            self.notes.append(f"plot {filename} failed: {type(error).__name__}: {error}")

    def attention(self, model: nn.Module, job: Job, key: str, title: str) -> None:
        if job.config.fsdp and job.context.distributed:
            # a sharded model cannot run a forward on rank 0 alone
            note = "attention plots skipped: the model is sharded (--fsdp)"
            self.notes += [note] if note not in self.notes else []
            return
        data = job.data
        # annotated examples, so the causes can be marked: test files often have no annotations
        pools = [*data.evals.values(), data.train]
        annotated = next(([e for e in pool if e.important] for pool in pools if any(e.important for e in pool)), [])
        examples = (annotated or pools[0])[:ATTENTION_EXAMPLES]
        self._call(f"attention_{key}", f"attention-{key.replace('+', '-')}.png",
                   lambda path: self.module.plot_attention(model, job.tokenizer, examples, path, title))

    def curves(self, results: Sequence[RunResult]) -> None:
        keys = ("run", "step", "loss", "ce", "cat", "xg")
        # one line per (base, seed): the same seed on two bases is two trainings
        history = [{**{k: row[k] for k in keys}, "seed": (r.base, r.seed)} for r in results for row in r.history]
        accuracy = [{**row, "seed": (r.base, r.seed)} for r in results for row in r.accuracy]
        self._call("curves", "curves.png", lambda path: self.module.plot_curves(history, accuracy, path))


@dataclass(frozen=True)
class Unit:
    """One (base, seed) of a job: every run of --runs from one base model on one seed's data."""

    base: Base
    seed: int
    first: bool  # the job's first unit draws the attention figures

    def runs_dir(self, config: TrainConfig, output_dir: Path) -> Path:
        """<output-dir>[/base-B][/seed-K]: a level for each of several bases and several seeds."""
        directory = output_dir / f"base-{self.base.seed}" if self.base.seed is not None else output_dir
        return directory / f"seed-{self.seed}" if config.seeds > 1 else directory


@dataclass
class UnitResult:
    results: list[RunResult]
    plot_files: dict[str, str]
    plot_notes: list[str]


def run_unit(config: TrainConfig, unit: Unit, output_dir: Path, files: Optional[DataFiles],
             context: Optional[DistContext] = None) -> UnitResult:
    """Train every run of the job on `unit`; without `context` this is a worker process of its own."""
    if context is None:
        torch.set_num_threads(config.threads or 1)
        context = DistContext(0, 1, 0, torch.device("cpu"))
    where = f"base {unit.base.seed}, " if unit.base.seed is not None else ""
    prefix = f"[{where}seed {unit.seed}] " if unit.base.seed is not None or config.seeds > 1 else ""
    log: Callable[[str], None] = (lambda m: workers.log_line(prefix + m)) if context.is_main else (lambda m: None)
    tokenizer = load_tokenizer(unit.base.path)
    seed_config = dataclasses.replace(config, seed=unit.seed)
    data = load_data(seed_config, files, tokenizer, log)
    job = Job(seed_config, unit.base.path, tokenizer, data, context, output_dir,
              (lambda m: None) if config.quiet else log, unit.runs_dir(config, output_dir), base=unit.base.seed)
    plotter = Plotter(output_dir, context.is_main and unit.first)
    results = []
    for index, spec in enumerate(config.runs):
        log(f"{spec.name}: training ({index + 1}/{len(config.runs)} of this unit)")
        before = ((lambda model: plotter.attention(model, job, "before", "before adapter training (gates 0)"))
                  if index == 0 else None)
        result, model = Trainer(job, spec).run(before_training=before)
        plotter.attention(model, job, spec.name, f"after training: {spec.name} (seed {unit.seed})")
        del model
        results.append(result)
    return UnitResult(results, plotter.files, plotter.notes)


def train(config: TrainConfig) -> Optional[dict]:
    """Run the job; returns the report on rank 0 (None on the other processes)."""
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    hf_logging.disable_progress_bar()  # a loading bar per run's model would bury the training lines
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    files = read_data_files(config)  # a bad record fails here, before any model or directory exists
    context = setup(config.device)
    if config.threads is None and config.model is None and context.device.type == "cpu":
        # The embedded model's matrices are too small to share between threads: on a busy 2-core machine
        # one training step took 0.19 s with 1 thread and 3.8 s with 2 (threads waiting on each other).
        torch.set_num_threads(1)
    try:
        report = _run_job(config, files, context, start)
    except BaseException:
        teardown(context, completed=False)
        raise
    teardown(context, completed=True)
    return report


def _run_job(config: TrainConfig, files: Optional[DataFiles], context: DistContext, start: float) -> Optional[dict]:
    """`train` once its process group is set up: the bases, the data and its checks, every unit, then (rank 0)
    the report."""
    log: Callable[[str], None] = workers.log_line if context.is_main else (lambda message: None)
    bases = resolve_bases(config, context, log)
    tokenizer = load_tokenizer(bases[0].path)
    data = load_data(config, files, tokenizer, lambda message: None)
    _check_data(config, data, log)  # the data is checked before the output directory exists
    _check_lengths(config, data, files, tokenizer)
    _check_cat_layers(config, bases[0].path)
    output_dir = prepare_output_dir(config, context)
    seeds = range(config.seed, config.seed + config.seeds)
    pairs = [(base, seed) for base in bases for seed in seeds]
    units = [Unit(base, seed, first=index == 0) for index, (base, seed) in enumerate(pairs)]
    parallel = config.workers > 1 and len(units) > 1 and not context.distributed
    log(f"causalattn train: {len(config.runs)} run(s) ({', '.join(r.name for r in config.runs)}) x "
        f"{config.seeds} seed(s) x {len(bases)} base(s) on {data.source.split(' (')[0]}; "
        f"{config.workers if parallel else context.world_size} process(es) on {context.device}; "
        f"output in {output_dir}")
    if config.lora_rank:
        log(f"causalattn train: {lora.describe(config.lora_rank, config.lora_targets)}")
    if parallel:
        outcomes = workers.map_units(run_unit, [(config, unit, output_dir, files) for unit in units],
                                     config.workers)
    else:
        outcomes = [run_unit(config, unit, output_dir, files, context) for unit in units]
    if not context.is_main:
        return None
    results = [result for outcome in outcomes for result in outcome.results]
    plotter = Plotter(output_dir, True)
    for outcome in outcomes:
        plotter.files.update(outcome.plot_files)
        plotter.notes += outcome.plot_notes
    plotter.curves(results)
    model_info = bases[0].info if len(bases) == 1 else {
        "embedded": True, "parameters": bases[0].info["parameters"], "bases": [base.info for base in bases]}
    note = toy_note(model_info, data, results, config) if model_info["embedded"] and config.data == STG else None
    report = build_report(config, data, results, model_info=model_info, world_size=context.world_size,
                          device=str(context.device), wall_seconds=time.perf_counter() - start,
                          plots={"files": plotter.files, "notes": plotter.notes}, note=note)
    try:
        path = write_report(output_dir, report)
    except OSError as error:
        raise ConfigError(f"--output-dir: could not write the report in {output_dir} "
                          f"({error.strerror or error}); the runs' checkpoints and adapters are written: make "
                          "room and rerun with --resume") from None
    print(_summary(report, results, data, path, note, plotter.notes), flush=True)
    return report


def _check_data(config: TrainConfig, data: JobData, log: Callable[[str], None]) -> None:
    if config.routed and config.route == "oracle":
        unknown = [split for split, examples in [("train", data.train), *data.evals.items()]
                   if any(example.domain is None for example in examples)]
        if unknown:
            raise ConfigError(f"--route: oracle routing reads each example's domain id, which the {unknown[0]} data "
                              "does not give (use --task dialects, or vq / vq-ste / soft)")
        if data.evals and not data.closed_answers:
            raise ConfigError("--route: oracle routing is evaluated by scoring candidate answers; open answers are "
                              "generated, and generation does not take domain ids (use vq / vq-ste / soft)")
    if any(run.cat for run in config.runs) and not any(example.important for example in data.train):
        log("warning: --cat: no training example has a causal annotation ('important'), so the CAT loss is 0")
    if not data.evals:
        log("note: no --eval-data, so no accuracy is measured")
    elif not data.closed_answers:
        log(f"note: {len(data.candidates)} distinct training targets is not a closed answer set: accuracy is the "
            "exact match of greedily generated answers")


def _check_cat_layers(config: TrainConfig, model: Path) -> None:
    """--cat-layers against the layer count in the model's config.json, before the output directory exists
    (a GGUF model has none: its layers are checked when the adapters are added)."""
    settings = Path(model) / "config.json"
    if config.cat_layers and settings.is_file():
        layers = json.loads(settings.read_text(encoding="utf-8")).get("num_hidden_layers")
        if isinstance(layers, int):
            check_cat_layers(config.cat_layers, layers)


def _check_lengths(config: TrainConfig, data: JobData, files: Optional[DataFiles], tokenizer) -> None:
    """With --max-length, refuse the first example that does not fit (file:line for JSONL data) before any
    model is loaded, rather than in the middle of an epoch."""
    if config.max_length is None:
        return
    splits = [("train", data.train, files.train if files else None)] + [
        (name, examples, files.evals[name] if files else None) for name, examples in data.evals.items()]
    for split, examples, source in splits:
        lengths = [len(ids) for ids in tokenizer([full_text(e) for e in examples])["input_ids"]] if examples else []
        too_long = next((i for i, n in enumerate(lengths) if n > config.max_length), None)
        if too_long is not None:
            where = source.where(too_long) if source else f"the generated {split} example {too_long}"
            raise ConfigError(f"--max-length: {where} has {lengths[too_long]} tokens, more than --max-length "
                              f"{config.max_length} (its answer would be cut); raise --max-length or shorten it")


def _summary(report: dict, results: Sequence[RunResult], data: JobData, path: Path, note: Optional[str],
             plot_notes: Sequence[str]) -> str:
    lines = ["", format_table(results, data), ""]
    if note:
        lines += [note, ""]
    lines += list(plot_notes)
    lines.append(f"report: {path}   wall time {report['wall_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m causalattn.lab.training.command [options]`, the same as `causalattn train [options]`."""
    parser = argparse.ArgumentParser(prog="causalattn train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
