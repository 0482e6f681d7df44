"""The job's data and which examples each process trains on at each step.

One optimizer step consumes a *global batch* of `batch_size x grad_accum x world_size` examples, taken
in order from a permutation of the training set that depends only on (seed, epoch). The global batch
is cut into `grad_accum x world_size` micro-batches of `batch_size` examples; process `r` runs
micro-batches `a * world_size + r` for `a = 0 .. grad_accum - 1`. So one process with
`--grad-accum K` and K processes with `--grad-accum 1` run the very same micro-batches and, as each
micro-batch's loss is weighted 1 / (number of micro-batches in the step), take the same step. Every
micro-batch is full (the last incomplete global batch of an epoch is dropped), which keeps the XG
variance (taken over each micro-batch, docs/math.md §3) and the step weights alike everywhere.
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from causalattn.data.records import Example
from causalattn.lab.tasks import dialects, make_splits, shortcut, stg
from causalattn.data.annotations import check_annotations
from causalattn.lab.tasks.controls import text_fields, with_random_causes
from causalattn.data.jsonl import DataFile, read_file
from causalattn.lab.tasks.stg import LABELS
from causalattn.lab.training.config import STG, STG_EVAL_EXAMPLES, STG_TRAIN_EXAMPLES, ConfigError, TrainConfig

# Accuracy scores every candidate answer of every example: beyond this many it is not a closed set.
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class JobData:
    """Training examples, named evaluation sets ("iid"/"ood" for STG) and the candidate answers;
    `control_train` is the training set with random causes (generated data only)."""

    train: list[Example]
    evals: dict[str, list[Example]]
    candidates: tuple[str, ...]
    source: str
    annotations: dict = field(default_factory=dict)  # file role -> AnnotationReport.to_dict() (JSONL data)
    control_train: Optional[list[Example]] = None  # the training data with random "causes" (the control run)

    def majority_accuracy(self) -> dict[str, float]:
        """Accuracy of always answering each evaluation split's most common target."""
        return {split: Counter(e.target for e in examples).most_common(1)[0][1] / len(examples)
                for split, examples in self.evals.items()}

    @property
    def closed_answers(self) -> bool:
        """Whether accuracy can be measured by scoring every candidate answer."""
        return 2 <= len(self.candidates) <= MAX_CANDIDATES


@dataclass(frozen=True)
class DataFiles:
    """The parsed JSONL files of a job: --data and each named --eval-data."""

    train: DataFile
    evals: dict[str, DataFile]


def read_data_files(config: TrainConfig) -> Optional[DataFiles]:
    """Parse the JSONL files (None for the STG): cheap, so a format error (file:line) comes before any work.
    --train-examples / --eval-examples cut them to seeded random subsets (`subset`)."""
    if config.data == STG:
        return None
    train = subset(_read(config.data, "--data", config.strict), config.train_examples, config.seed,
                   "--train-examples")
    return DataFiles(train, {name: subset(_read(path, "--eval-data", config.strict), config.eval_examples,
                                          config.seed, "--eval-examples")
                             for name, path in config.eval_files().items()})


def subset(data: DataFile, count: Optional[int], seed: int, flag: str) -> DataFile:
    """`count` records of `data` drawn without replacement by `seed` (kept in file order, with their lines),
    or all of it when `count` is None. Drawn once per job with --seed, so every seed of the job trains and
    is tested on the same records, as the whole files would be."""
    if count is None:
        return data
    if count > len(data.examples):
        raise ConfigError(f"{flag}: {count} records asked for, but {data.path} has {len(data.examples)}")
    chosen = sorted(random.Random(seed).sample(range(len(data.examples)), count))
    return dataclasses.replace(data, examples=[data.examples[i] for i in chosen], lines=[data.lines[i] for i in chosen])


# The generated tasks with a one-word cue: their module (make_splits, record_fields) and description.
_CUE_TASKS = {"shortcut": (shortcut, "Spurious Token Game, shortcut variant"),
              "dialects": (dialects, "two-dialect Spurious Token Game")}


def load_data(config: TrainConfig, files: Optional[DataFiles] = None, tokenizer=None,
              log: Callable[[str], None] = print) -> JobData:
    """The generated STG splits of --task (seeded by --seed), or the JSONL files with every annotation
    checked on the tokens of `tokenizer` (pairs that cannot supervise skipped and counted, one summary
    line per file, or a file:line ConfigError with --strict)."""
    if config.data == STG and config.task in _CUE_TASKS:
        module, name = _CUE_TASKS[config.task]
        layout = {"cat_rows": config.cat_rows, "cue_position": config.cue_position} if module is shortcut else {}
        train, tests = module.make_splits(config.train_examples or STG_TRAIN_EXAMPLES,
                                          config.eval_examples or STG_EVAL_EXAMPLES, seed=config.seed,
                                          agreement=config.cue_agreement, **layout)
        return JobData(train, tests, LABELS, f"{name} (seed {config.seed}, cue agreement {config.cue_agreement})",
                       control_train=with_random_causes(train, module.record_fields, seed=config.seed))
    if config.data == STG:
        tests = config.eval_examples or STG_EVAL_EXAMPLES
        splits = make_splits(config.train_examples or STG_TRAIN_EXAMPLES, tests, tests, seed=config.seed)
        return JobData(splits.train, {"iid": splits.iid_test, "ood": splits.ood_test}, LABELS,
                       f"Spurious Token Game, cancer-risk variant (seed {config.seed})",
                       control_train=with_random_causes(splits.train, stg.record_fields, seed=config.seed))
    if tokenizer is None:
        raise ValueError("tokenizer: JSONL data needs the model's tokenizer to check its annotations")
    files = files if files is not None else read_data_files(config)
    checked, reports = {}, {}
    for role, flag, data_file in [("train", "--data", files.train)] + [
            (name, "--eval-data", f) for name, f in files.evals.items()]:
        try:
            checked[role], report = check_annotations(data_file, tokenizer, strict=config.strict)
        except ValueError as error:
            raise ConfigError(f"{flag}: {error}") from None
        if report.annotated:
            log(f"annotations: {report.summary()}")
        reports[role] = report.to_dict()
    train = checked.pop("train").examples
    # Accuracy is exact match of the best-scoring answer among those the training data uses.
    candidates = tuple(sorted({example.target for example in train}))
    # the control run's causes: as many "Name: value" fields of each input, drawn at random
    control = (with_random_causes(train, text_fields, seed=config.seed)
               if any(run.random_causes for run in config.runs) else None)
    return JobData(train, {name: f.examples for name, f in checked.items()}, candidates, str(config.data), reports,
                   control_train=control)


def _read(path: str, flag: str, strict: bool) -> DataFile:
    try:
        return read_file(path, strict=strict)
    except ValueError as error:  # a bad record, reported with its file and line
        raise ConfigError(f"{flag}: {error}") from None


def global_batch_size(config: TrainConfig, world_size: int) -> int:
    return config.batch_size * config.grad_accum * world_size


def steps_per_epoch(num_examples: int, config: TrainConfig, world_size: int) -> int:
    """Optimizer steps in one epoch; a ConfigError when not even one global batch fits."""
    size = global_batch_size(config, world_size)
    if num_examples < size:
        raise ConfigError(f"--batch-size: one optimizer step takes {size} examples (batch-size {config.batch_size} x "
                          f"grad-accum {config.grad_accum} x {world_size} process(es)); the training set has only "
                          f"{num_examples}")
    return num_examples // size


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The permutation of the training set used in `epoch`: a function of (seed, epoch) only, so a resumed
    job and every process see the same order without sharing any random state."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def micro_batches(order: Sequence[int], step: int, config: TrainConfig, rank: int, world_size: int) -> list[list[int]]:
    """The training-set indices of the `grad_accum` micro-batches process `rank` runs at `step`."""
    size = global_batch_size(config, world_size)
    step_indices = order[step * size:(step + 1) * size]
    b = config.batch_size
    return [list(step_indices[(a * world_size + rank) * b:(a * world_size + rank + 1) * b])
            for a in range(config.grad_accum)]


def evaluation_shard(examples: Sequence[Example], batch_size: int, rank: int,
                     world_size: int) -> list[list[Example]]:
    """This process's share of `examples` for evaluation, in batches. Every process gets the same number
    of batches (a sharded model needs every process in every forward); a process whose share runs out
    early gets empty batches, which the caller runs with a stand-in example and does not count."""
    share = list(examples[rank::world_size])
    largest = -(-len(examples) // world_size)
    count = -(-largest // batch_size)
    return [share[i * batch_size:(i + 1) * batch_size] for i in range(count)]
