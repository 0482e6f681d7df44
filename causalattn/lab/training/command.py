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
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from causalattn.lab.training import config as config_module
from causalattn.lab.training import lora, tiny
from causalattn.lab.training.batching import JobData, load_data, read_data_files
from causalattn.lab.training.checkpoint import checkpoint_root
from causalattn.lab.training.config import STG, ConfigError, TrainConfig, config_from_args
from causalattn.lab.training.distributed import DistContext, setup, teardown
from causalattn.lab.training.loop import Job, RunResult, Trainer
from causalattn.lab.training.report import build_report, format_table, toy_note, write_report
from causalattn.pretrained import resolve_pretrained

ATTENTION_EXAMPLES = 3  # examples drawn in the attention heat maps


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


def resolve_model(config: TrainConfig, context: DistContext, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The base checkpoint directory (building the tiny one on rank 0 when needed) and a description."""
    if config.model is not None:
        if context.is_main:  # a GGUF file is converted once, by one process; the others then find the folder
            resolve_pretrained(config.model, log=log)
        context.barrier()
        path = resolve_pretrained(config.model)
        return path, {"path": str(path), "source": config.model, "embedded": False}
    settings = tiny.settings_for(config.task)
    if context.is_main:
        tiny.ensure_tiny_base(settings, show_progress=not config.quiet and sys.stderr.isatty(), log=log)
    context.barrier()
    path = tiny.cached_path(settings)
    info = tiny.read_record(path)
    return path, {"path": str(path), "embedded": True, "parameters": info["parameters"],
                  "base_lm_loss": info["final_lm_loss"], "settings": info["settings"]}


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
    """Calls `causalattn.lab.training.plots` when that module is installed; rank 0 only; a failing plot is
    reported and skipped, never the end of a finished training."""

    def __init__(self, job: Job):
        self.job = job
        self.files: dict[str, str] = {}
        self.notes: list[str] = []
        self.module = None
        if not job.context.is_main:
            return
        try:
            from causalattn.lab.training import plots
            self.module = plots
        except ImportError as error:
            self.notes.append(f"plots skipped: causalattn.lab.training.plots is not available ({error})")

    def _call(self, key: str, filename: str, draw: Callable[[str], None]) -> None:
        if self.module is None:
            return
        path = self.job.output_dir / filename
        try:
            draw(str(path))
            self.files[key] = str(path)
        except Exception as error:  # noqa: BLE001 - a plot must not cost the trained adapters
            self.notes.append(f"plot {filename} failed: {type(error).__name__}: {error}")

    def attention(self, model: nn.Module, key: str, title: str) -> None:
        if self.job.config.fsdp and self.job.context.distributed:
            # a sharded model cannot run a forward on rank 0 alone
            note = "attention plots skipped: the model is sharded (--fsdp)"
            self.notes += [note] if note not in self.notes else []
            return
        data = self.job.data
        # annotated examples, so the causes can be marked: test files often have no annotations
        pools = [*data.evals.values(), data.train]
        annotated = next(([e for e in pool if e.important] for pool in pools if any(e.important for e in pool)), [])
        examples = (annotated or pools[0])[:ATTENTION_EXAMPLES]
        self._call(f"attention_{key}", f"attention-{key.replace('+', '-')}.png",
                   lambda path: self.module.plot_attention(model, self.job.tokenizer, examples, path, title))

    def curves(self, results: Sequence[RunResult]) -> None:
        keys = ("run", "seed", "step", "loss", "ce", "cat", "xg")
        history = [{k: row[k] for k in keys} for result in results for row in result.history]
        accuracy = [row for r in results for row in r.accuracy]
        self._call("curves", "curves.png", lambda path: self.module.plot_curves(history, accuracy, path))


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
        log: Callable[[str], None] = print if context.is_main else (lambda message: None)
        quiet_log = (lambda message: None) if config.quiet else log
        model_path, model_info = resolve_model(config, context, log)
        tokenizer = load_tokenizer(model_path)
        results, plotter, data, output_dir = [], None, None, None
        for seed in range(config.seed, config.seed + config.seeds):
            seed_config = dataclasses.replace(config, seed=seed)
            data = load_data(seed_config, files, tokenizer, log)
            if plotter is None:  # the data is checked before the output directory exists
                _check_data(config, data, log)
                output_dir = prepare_output_dir(config, context)
            runs_dir = output_dir / f"seed-{seed}" if config.seeds > 1 else output_dir
            job = Job(seed_config, model_path, tokenizer, data, context, output_dir, quiet_log, runs_dir)
            log(f"causalattn train: {len(config.runs)} run(s) ({', '.join(r.name for r in config.runs)}) on "
                f"{data.source}; {context.world_size} process(es) on {context.device}; output in {output_dir}")
            if plotter is None and config.lora_rank:
                log(f"causalattn train: {lora.describe(config.lora_rank, config.lora_targets)}")
            first_seed = plotter is None
            plotter = plotter or Plotter(job)

            def plot_before(model: nn.Module) -> None:
                plotter.attention(model, "before", "before adapter training (gates 0)")

            for index, spec in enumerate(config.runs):
                before = plot_before if index == 0 and first_seed and context.is_main else None
                result, model = Trainer(job, spec).run(before_training=before)
                if context.is_main and first_seed:
                    plotter.attention(model, spec.name, f"after training: {spec.name} (seed {seed})")
                del model
                results.append(result)
        if not context.is_main:
            return None
        plotter.curves(results)
        note = toy_note(model_info, data, results, config) if model_info["embedded"] and config.data == STG else None
        report = build_report(config, data, results, model_info=model_info, world_size=context.world_size,
                              device=str(context.device), wall_seconds=time.perf_counter() - start,
                              plots={"files": plotter.files, "notes": plotter.notes}, note=note)
        path = write_report(output_dir, report)
        print(_summary(report, results, data, path, note, plotter.notes))
        return report
    finally:
        teardown(context)


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
