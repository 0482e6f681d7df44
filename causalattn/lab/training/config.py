"""Options of `causalattn train`: the `TrainConfig` dataclass, its command-line flags and their checks.

Every check raises `ConfigError` naming the flag (`--batch-size: ...`), so a bad command fails before
any model is loaded. The loss terms a run optimises are a `RunSpec`; a job is one or more runs trained
one after the other from the same base model, data and seed, repeated for each of `--seeds` seeds (the
embedded default compares four runs over three seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from causalattn.inputs import GATE_MODES, MAX_ADAPTER_TOKENS, XG_POOLS
from causalattn.losses import CAT_HEAD_REDUCTIONS, CAT_LOSS_KINDS, MI_KINDS
from causalattn.routing import DEFAULT_CODE_DIM, HARD_ROUTES, ROUTE_MODES
from causalattn.ops import BACKENDS
from causalattn.pretrained import SHIPPED_MODELS, is_pretrained_spec, shipped_file
from causalattn.lab.tasks.shortcut import CAT_ROWS, CUE_POSITIONS
from causalattn.lab.training import lora

DTYPES = ("float32", "bfloat16", "float64")
DEVICES = ("auto", "cpu", "cuda")
GATE_SHAPES = ("head", "scalar")
# fp16 autocast would also need a gradient scaler; bf16 has fp32's range and needs none.
MIXED_PRECISION = ("no", "bf16")
STG = "stg"
# The generated Spurious Token Game variants: "shortcut" (a binary cue agrees with the label on most
# training examples; causalattn.lab.tasks.shortcut) and "cancer-risk" (CAT's layout; causalattn.lab.tasks.stg).
TASKS = ("shortcut", "cancer-risk", "dialects")
# The comparison the embedded default runs: plain fine-tuning, the causal losses added, and the control
# (CAT onto random fields instead of the causes).
DEFAULT_COMPARISON = ("ce", "ce+cat", "ce+cat+xg")
CONTROL_RUN = "ce+cat-random"  # added to the default comparison on generated data
DEFAULT_SEEDS = 3  # the embedded default's seeds per run: enough for a standard error
# The generated STG's sizes when --train-examples / --eval-examples are not given (a JSONL file: all of it)
STG_TRAIN_EXAMPLES, STG_EVAL_EXAMPLES = 2000, 300
# The embedded shortcut job trains every seed on this many independently built bases (seeds --base-seed,
# --base-seed + 1, ...): a base build is as much a draw as an adapter seed (the same recipe built on
# another CPU gave another base and lost the effect), so the table pools over both.
DEFAULT_BASES = 3
# The job's first base seed. The recipe was chosen on bases 501-505 and data seeds 100-101
# (benchmarks/recipe_search.py); the job reports neither.
DEFAULT_BASE_SEED = 1234
# Worker processes of the embedded multi-base job: one per core of a 2-core machine, each on one thread.
DEFAULT_WORKERS = 2
# The embedded shortcut job (`causalattn train` with no options): its runs and the options it sets
# apart from the general defaults, chosen on validation bases and data seeds the job does not report
# (docs/default-job.md has the numbers). XG is left out of its runs to keep 3 bases x 3 seeds within
# 10 minutes on 2 cores (--runs ce,ce+cat,ce+cat+xg,ce+cat-random adds it back).
EMBEDDED_SHORTCUT_RUNS = ("ce", "ce+cat", CONTROL_RUN)
EMBEDDED_SHORTCUT = {
    # CAT's `mass` loss (-log of the causes' share, no cut-off) at full weight in both epochs: `div`
    # stops pulling once the causes get alpha times a non-cause's attention, and the cue kept its share
    "cat_kind": "mass",
    "cat_decay": 0.0,
    # a cue right on 97 % of the training examples: CE's pull towards it is strong on every base
    "cue_agreement": 0.97,
    # CAT on the question's rows as well as the answer rows: on the validation bases a gain on every base
    # (+9.4 points on average against +3.9 for the answer rows alone, -16 to +14) and a control without one
    "cat_rows": "question",
    "cat_heads": "mean",
    # CAT on the first layer only, at weight 3: there the record tokens are still their own words, so
    # attention on a cause reads that cause; higher up a token's state mixes the record before it. On the
    # validation bases +23.3 points on flipped (+7 to +38) against +9.4 on every layer at weight 1,
    # iid -2.5 against -3.5. Kept on the new base (fifth round): layers 0-1 gained more on average (+34.5
    # against +22.0 over 10 units) but +4 on one base in five, against +11 or more here (docs/default-job.md)
    "cat_layers": (0,),
    "cat_weight": 3.0,
}


ROUTING_OPTIONS = ("domains", "domain_len", "route", "router_dim", "vq_lambda", "mi_lambda", "mi_kind",
                   "invariant_ce")
# Flags that only matter for some jobs: their parser default is None, so that one given where it would
# change nothing is refused (`_refuse_unused_options`) instead of silently ignored.
CONDITIONAL_OPTIONS = ROUTING_OPTIONS + ("xg_lambda", "qk_lr", "cue_agreement", "cat_rows", "cue_position")
_EVAL_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    """A bad option; the message starts with the flag it is about."""


@dataclass(frozen=True)
class RunSpec:
    """The loss terms one run optimises: CE always, plus CAT and/or XG. `random_causes` is the control:
    CAT supervises attention onto as many random record fields as there are causes. `routed`: ICLM's
    routed adapters (--domains prompts chosen by a router) with their VQ and MI terms, else one adapter."""

    cat: bool
    xg: bool
    random_causes: bool = False
    routed: bool = False

    @property
    def name(self) -> str:
        cat = ["cat-random" if self.random_causes else "cat"] if self.cat else []
        return "+".join(["ce"] + cat + (["xg"] if self.xg else []) + (["routed"] if self.routed else []))

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        terms = text.strip().lower().split("+")
        if (not terms or terms[0] != "ce" or len(set(terms)) != len(terms)
                or not set(terms[1:]) <= {"cat", "cat-random", "xg", "routed"} or {"cat", "cat-random"} <= set(terms)):
            raise ConfigError(f"--runs: {text!r} is not a run; expected ce, ce+cat, ce+xg, ce+cat+xg or "
                              "ce+cat-random (the control: CAT onto random fields), each optionally +routed "
                              "(ICLM's routed adapters, e.g. ce+routed)")
        return cls(cat="cat" in terms or "cat-random" in terms, xg="xg" in terms, random_causes="cat-random" in terms,
                   routed="routed" in terms)


@dataclass
class TrainConfig:
    """Everything a `causalattn train` job depends on (see `add_arguments` for each flag's meaning)."""

    model: Optional[str] = None
    data: str = STG
    eval_data: tuple[str, ...] = ()  # NAME=FILE or FILE, each --eval-data once (see eval_files)
    task: str = "shortcut"
    cue_agreement: float = 0.93
    # shortcut task: where the cue sits and which rows CAT supervises (causalattn.lab.tasks.shortcut)
    cue_position: str = "random"
    cat_rows: str = "answer"
    train_examples: Optional[int] = None  # None: STG_TRAIN_EXAMPLES generated, or every record of --data
    eval_examples: Optional[int] = None   # None: STG_EVAL_EXAMPLES generated, or every record of each file
    max_length: Optional[int] = None
    # adapters (docs/math.md §1, §3)
    adapter_len: int = 10
    adapter_layers: Optional[int] = None
    xg_tokens: int = 2
    gate: str = "tanh"
    gate_shape: Optional[str] = None
    train_qk: bool = False
    qk_lr: float = 2e-3
    lora_rank: int = 0  # 0: no LoRA (causalattn.lab.training.lora)
    lora_targets: str = lora.DEFAULT_TARGETS
    lora_lr: float = lora.DEFAULT_LR
    # losses (docs/math.md §2, §3)
    runs: tuple[RunSpec, ...] = field(default_factory=lambda: tuple(RunSpec.parse(r) for r in DEFAULT_COMPARISON))
    cat_alpha: float = 2.0
    cat_kind: str = "div"
    cat_heads: str = "mean"
    cat_layers: tuple[int, ...] = ()  # () every layer; else the layer indices (0 the first) CAT supervises
    cat_decay: float = 1.0
    cat_weight: float = 1.0
    xg_lambda: float = 1.0
    xg_pool: str = "sample"
    # routed adapters (ICLM, docs/math.md §7), for the +routed runs; defaults are the official code's weights
    domains: int = 2
    domain_len: int = 10
    route: str = "vq"
    router_dim: int = DEFAULT_CODE_DIM
    vq_lambda: float = 0.1
    mi_lambda: float = 0.01
    invariant_ce: float = 0.0  # ICLM adds CE(invariant alone) with weight 1: one more forward per step
    mi_kind: str = "code"
    # optimisation
    lr: float = 2e-2
    weight_decay: float = 0.02
    warmup_steps: int = 10
    epochs: int = 2
    batch_size: int = 16
    grad_accum: int = 1
    eval_batch_size: int = 32
    dtype: str = "float32"
    seed: int = 0
    seeds: int = 1
    # the embedded base (without --model): how many are built and how (a build's conditions are part of it)
    bases: int = 1
    base_seed: int = DEFAULT_BASE_SEED
    base_threads: int = 1
    base_onednn: bool = True
    workers: int = 1
    # where and how it runs
    output_dir: Optional[str] = None
    resume: bool = False
    save_steps: Optional[int] = None  # also checkpoint every N optimizer steps inside an epoch
    backend: str = "auto"
    device: str = "auto"
    fsdp: bool = False
    threads: Optional[int] = None
    quiet: bool = False
    # CAT-format data
    strict: bool = False
    # memory and precision
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        # one file may be given as a plain string, as --eval-data was before it took several
        self.eval_data = (self.eval_data,) if isinstance(self.eval_data, str) else tuple(self.eval_data)
        self.cat_layers = tuple(self.cat_layers)  # a JSON list (a checkpoint's options, a recipe) reads as a tuple

    def validate(self) -> "TrainConfig":
        """Check every option; returns self. Raises ConfigError naming the first bad flag."""
        positive = {"--seeds": self.seeds, "--bases": self.bases, "--base-threads": self.base_threads,
                    "--workers": self.workers, "--adapter-len": self.adapter_len, "--epochs": self.epochs,
                    "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--eval-batch-size": self.eval_batch_size}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag}: expected a positive integer, got {value}")
        for flag, value in {"--train-examples": self.train_examples, "--eval-examples": self.eval_examples,
                            "--adapter-layers": self.adapter_layers, "--max-length": self.max_length,
                            "--threads": self.threads, "--max-steps": self.max_steps,
                            "--save-steps": self.save_steps}.items():
            if value is not None and value < 1:
                raise ConfigError(f"{flag}: expected a positive integer, got {value}")
        if self.adapter_len > MAX_ADAPTER_TOKENS:
            raise ConfigError(f"--adapter-len: at most {MAX_ADAPTER_TOKENS} prompt tokens, got {self.adapter_len}")
        if not 0 <= self.xg_tokens <= self.adapter_len:
            raise ConfigError(f"--xg-tokens: expected 0 to --adapter-len ({self.adapter_len}), got {self.xg_tokens}")
        for flag, value in {"--lr": self.lr, "--qk-lr": self.qk_lr, "--cat-alpha": self.cat_alpha,
                            "--cat-weight": self.cat_weight}.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag}: expected a positive number, got {value}")
        for flag, value in {"--weight-decay": self.weight_decay, "--cat-decay": self.cat_decay,
                            "--xg-lambda": self.xg_lambda, "--warmup-steps": self.warmup_steps}.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag}: expected a non-negative number, got {value}")
        if not self.runs:
            raise ConfigError("--runs: expected at least one run")
        layers = self.cat_layers
        if any(not isinstance(i, int) or i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ConfigError(f"--cat-layers: expected distinct non-negative layer indices, got {list(layers)}")
        try:
            lora.check_options(self.lora_rank, self.lora_targets, self.lora_lr, self.train_qk)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.routed:
            self._check_routing()
        names = [run.name for run in self.runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"--runs: each run once, got {','.join(names)}")
        if any(run.xg for run in self.runs):
            if self.xg_tokens == 0:
                raise ConfigError("--xg-tokens: the XG loss needs at least one XG prompt token (or pass --no-xg)")
            if self.batch_size < 2:
                raise ConfigError("--batch-size: the XG variance is taken over each micro-batch (docs/math.md §3) and needs "
                                  f"at least 2 examples per micro-batch, got {self.batch_size} (or pass --no-xg)")
        if self.model is not None and self.bases > 1:
            raise ConfigError("--bases: builds several embedded bases; --model is one base")
        if self.model is not None:
            _check_model(self.model)
        if self.data != STG and not Path(self.data).is_file():
            raise ConfigError(f"--data: {self.data}: no such file (expected 'stg' or a JSONL file)")
        self.eval_files()
        if self.data == STG and self.eval_data:
            raise ConfigError("--eval-data: goes with a JSONL --data file; the STG data makes its own IID and "
                              "OOD tests")
        if not 0.5 <= self.cue_agreement <= 1:
            raise ConfigError(f"--cue-agreement: expected a probability in [0.5, 1], got {self.cue_agreement}")
        if self.resume and self.output_dir is None:
            raise ConfigError("--resume: needs --output-dir, the directory of the job to continue")
        if self.backend == "triton" and not _cuda_device(self.device) and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"--backend: triton runs on CUDA GPUs, and this job runs on the CPU (--device "
                              f"{self.device}{', no CUDA device visible' if self.device == 'auto' else ''}); use "
                              "--backend auto/native/composed/reference, or TRITON_INTERPRET=1 for Triton's slow interpreter")
        if self.strict and self.data == STG:
            raise ConfigError("--strict: checks the annotations of a JSONL --data file; the generated STG data "
                              "has none to check (pass a JSONL --data file, or drop --strict)")
        if self.mixed_precision == "bf16" and self.dtype == "float64":
            raise ConfigError("--mixed-precision: bf16 autocast would run a --dtype float64 model's forward in "
                              "bfloat16, throwing away the precision float64 was chosen for (use one or the other)")
        if self.output_dir is not None:
            check_output_dir(Path(self.output_dir))
        return self

    def eval_files(self) -> dict[str, str]:
        """{name: path} of the --eval-data files: `NAME=FILE` names a file, a bare FILE is named by its stem."""
        files: dict[str, str] = {}
        for text in self.eval_data:
            name, sep, path = text.partition("=")
            if Path(text).is_file() or not sep:
                name, path = Path(text).stem, text
            if not _EVAL_NAME.fullmatch(name):
                raise ConfigError(f"--eval-data: {text!r}: expected NAME=FILE with NAME made of letters, digits, "
                                  "'_' or '-', or a FILE")
            if not Path(path).is_file():
                raise ConfigError(f"--eval-data: {path}: no such file (expected a JSONL file)")
            if name in files:
                raise ConfigError(f"--eval-data: the name {name!r} is given twice; name each file (iid=FILE ood=FILE)")
            files[name] = path
        return files

    @property
    def routed(self) -> bool:
        """Whether any run trains routed adapters (only then do the routing options matter)."""
        return any(run.routed for run in self.runs)

    def _check_routing(self) -> None:
        if self.domains < 2:
            raise ConfigError(f"--domains: routed runs choose between at least 2 domain prompts, got {self.domains}")
        if self.domain_len < 1:
            raise ConfigError(f"--domain-len: expected a positive integer, got {self.domain_len}")
        if self.router_dim < 1:
            raise ConfigError(f"--router-dim: expected a positive integer, got {self.router_dim}")
        for flag, value in {"--vq-lambda": self.vq_lambda, "--mi-lambda": self.mi_lambda,
                            "--invariant-ce": self.invariant_ce}.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag}: expected a non-negative number, got {value}")
        read = 1 if self.route in HARD_ROUTES else self.domains  # domain prompts one attention call reads
        slots = self.adapter_len + self.domain_len * read
        if slots > MAX_ADAPTER_TOKENS:
            raise ConfigError(f"--domain-len: --route {self.route} reads {slots} adapter slots per layer (--adapter-len "
                              f"{self.adapter_len} + --domain-len {self.domain_len} x "
                              f"{read}); at most {MAX_ADAPTER_TOKENS}")

    @property
    def gate_per_head(self) -> Optional[bool]:
        return None if self.gate_shape is None else self.gate_shape == "head"

    def trajectory_options(self) -> dict:
        """The options a resumed job must share with the one it continues: all that change its numbers."""
        values = dataclasses.asdict(self)
        values["runs"] = [run.name for run in self.runs]
        values["eval_data"] = list(self.eval_data)  # as the JSON of a checkpoint reads it back
        for name in ("output_dir", "resume", "threads", "quiet", "save_steps", "workers"):
            values.pop(name)
        values["cat_layers"] = list(self.cat_layers)  # as the JSON of a checkpoint reads it back
        for name, every in (("cat_heads", "mean"), ("cat_layers", [])):
            if values[name] == every:  # checkpoints from before the option continue
                values.pop(name)
        if not self.routed:  # jobs without routed runs keep the options (and checkpoints) they had before
            for name in ROUTING_OPTIONS:
                values.pop(name)
        if not self.lora_rank:  # and so do jobs without LoRA
            for name in lora.LORA_OPTIONS:
                values.pop(name)
        return values


def check_cat_layers(cat_layers: tuple[int, ...], layers: int) -> None:
    """A ConfigError when --cat-layers names a layer the model (with `layers` layers) does not have."""
    if cat_layers and max(cat_layers) >= layers:
        raise ConfigError(f"--cat-layers: the model has {layers} layers (indices 0-{layers - 1}), got "
                          f"{','.join(map(str, cat_layers))}")


def _cuda_device(device: str) -> bool:
    """Whether --device resolves to a GPU (as `distributed.setup` will resolve it)."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def check_output_dir(directory: Path) -> None:
    """Refuse an --output-dir that is a file or cannot be written, before any work: the first checkpoint
    would otherwise fail after the first epoch. Leaves nothing behind (a probe file is created and removed
    at once; the directory itself is made later, once the data has been checked)."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--output-dir: {directory} is a file; expected a directory (new or existing)")
    existing = directory
    while not existing.exists():  # the nearest ancestor that exists is where the directory will be made
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir: {directory} cannot be created: {existing} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".causalattn-write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"--output-dir: {directory} cannot be written ({existing}: "
                          f"{error.strerror or error}); expected a writable directory") from None


def _check_model(model: str) -> None:
    """--model names a folder with config.json, an existing .gguf file, or an installed shipped model."""
    if is_pretrained_spec(model):
        try:
            if model in SHIPPED_MODELS:
                shipped_file(model)
            elif not Path(model).is_file():
                raise FileNotFoundError(f"{model}: no such file")
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"--model: {error}") from None
    elif not (Path(model) / "config.json").is_file():
        raise ConfigError(f"--model: {model} is not a local Hugging Face checkpoint directory (no config.json), "
                          f"a .gguf file or one of {sorted(SHIPPED_MODELS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `causalattn train`."""
    d = TrainConfig()
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", default=None, metavar="DIR|FILE.gguf|NAME",
                      help="a local Hugging Face checkpoint directory of a LLaMA-family causal LM, a .gguf file, or "
                           f"a model a package ships ({', '.join(SHIPPED_MODELS)}); GGUF files are converted once and "
                           "cached (default: the embedded tiny LLaMA, built and cached on first use)")
    data.add_argument("--data", default=d.data, metavar="stg|FILE.jsonl",
                      help="'stg' (the Spurious Token Game, with IID and OOD tests) or a JSONL file in CAT's format "
                           "(input, target, important), read as published (default: stg)")
    data.add_argument("--eval-data", action="append", default=[], metavar="[NAME=]FILE.jsonl",
                      help="an evaluation JSONL file for a JSONL --data, reported under NAME (default: the file's "
                           "name); give it once per file, e.g. --eval-data iid=test.jsonl --eval-data ood=ood.jsonl")
    data.add_argument("--task", choices=TASKS, default=d.task,
                      help="which generated Spurious Token Game: 'shortcut' (a one-word binary cue agrees with "
                           "the label on --cue-agreement of the training examples; tests where it is flipped "
                           "and independent) or 'cancer-risk' (CAT's layout: copies of the causes as spurious "
                           "features) or 'dialects' (two dialects of one task, each with its own cue: the routed-"
                           "adapter demo; tests iid, flipped and recombined) (default shortcut)")
    data.add_argument("--cue-agreement", type=float, default=None, metavar="P",
                      help="shortcut and dialects tasks: how often the cue agrees with the label in training (default "
                           f"{EMBEDDED_SHORTCUT['cue_agreement']} with the embedded model on the shortcut task, "
                           f"otherwise {d.cue_agreement})")
    data.add_argument("--cat-rows", choices=CAT_ROWS, default=None,
                      help="shortcut task: the rows CAT supervises: those predicting the answer, or also the "
                           f"question's rows after the record (default {EMBEDDED_SHORTCUT['cat_rows']} with the "
                           f"embedded model, otherwise {d.cat_rows})")
    data.add_argument("--cue-position", choices=CUE_POSITIONS, default=None,
                      help="shortcut task: where the cue sits in the record: anywhere, or after the other fields, "
                           f"where no record token can read it (default {d.cue_position})")
    data.add_argument("--train-examples", type=int, default=None, metavar="K",
                      help=f"generated STG training examples (default {STG_TRAIN_EXAMPLES}); with a JSONL --data, a "
                           "random subset of K records drawn with --seed, the same for every seed of the job "
                           "(default: every record)")
    data.add_argument("--eval-examples", type=int, default=None, metavar="K",
                      help=f"generated STG examples in each of the IID and OOD tests (default {STG_EVAL_EXAMPLES}); "
                           "with JSONL --eval-data files, a random subset of K records of each, drawn with --seed "
                           "(default: every record)")
    data.add_argument("--max-length", type=int, default=None,
                      help="longest tokenized example allowed; longer ones are an error (default: no limit)")

    adapter = parser.add_argument_group("adapters")
    adapter.add_argument("--adapter-len", type=int, default=d.adapter_len, metavar="M",
                         help=f"prompt tokens per adapted layer (default {d.adapter_len})")
    adapter.add_argument("--adapter-layers", type=int, default=None, metavar="L",
                         help="adapt the top L layers (default: min(30, all layers))")
    adapter.add_argument("--xg-tokens", type=int, default=d.xg_tokens, metavar="H_g",
                         help=f"the first H_g prompt tokens are the XG tokens (default {d.xg_tokens})")
    adapter.add_argument("--gate", choices=GATE_MODES, default=d.gate,
                         help="gamma = tanh(g) or gamma = g (default tanh)")
    adapter.add_argument("--gate-shape", choices=GATE_SHAPES, default=None,
                         help="one gate per query head or one per layer (default: head for tanh, scalar for raw)")
    adapter.add_argument("--train-qk", action=argparse.BooleanOptionalAction, default=None,
                         help="also train the q_proj/k_proj weights of the adapted layers, so the CAT loss moves "
                              "their attention directly (default: on with the embedded model, where the frozen "
                              "tiny base's attention hardly moves otherwise; off with --model)")
    adapter.add_argument("--qk-lr", type=float, default=None,
                         help=f"AdamW peak learning rate of those q/k weights (default {d.qk_lr})")
    lora.add_arguments(parser, d.lora_rank, d.lora_targets, d.lora_lr)

    losses = parser.add_argument_group("losses")
    losses.add_argument("--runs", default=None, metavar="LIST",
                        help="comma-separated runs to train and compare, each ce, ce+cat, ce+xg, ce+cat+xg or "
                             f"{CONTROL_RUN} (CAT onto random record fields) (default: "
                             f"{','.join(EMBEDDED_SHORTCUT_RUNS)} with the embedded model on the shortcut task; "
                             f"{','.join(DEFAULT_COMPARISON)} with the embedded model otherwise, plus the control "
                             f"{CONTROL_RUN} on generated data; the same three with --model; the one run chosen by "
                             "--cat/--xg when either is given)")
    losses.add_argument("--cat", action=argparse.BooleanOptionalAction, default=None,
                        help="add the CAT attention loss (default on; a single run)")
    losses.add_argument("--cat-alpha", type=float, default=d.cat_alpha, help="CAT ratio target alpha (default 2)")
    losses.add_argument("--cat-kind", choices=CAT_LOSS_KINDS, default=None,
                        help=f"CAT row loss (default {EMBEDDED_SHORTCUT['cat_kind']} with the embedded model on "
                             f"generated shortcut data, otherwise {d.cat_kind}, CAT's)")
    losses.add_argument("--cat-heads", choices=CAT_HEAD_REDUCTIONS, default=None,
                        help="score the mass averaged over layers and heads (mean, CAT's) or every layer's every head "
                             f"alone, so that no head keeps reading elsewhere (each) (default "
                             f"{EMBEDDED_SHORTCUT['cat_heads']} with the embedded model on generated "
                             f"shortcut data, otherwise {d.cat_heads})")
    losses.add_argument("--cat-layers", type=layer_list, default=None, metavar="LIST",
                        help="comma-separated indices of the layers (0 the first) whose attention CAT supervises, or "
                             f"'all' (default {_layers_text(EMBEDDED_SHORTCUT['cat_layers'])} with the embedded model "
                             "on generated shortcut data, otherwise all)")
    losses.add_argument("--cat-decay", type=float, default=None, metavar="RATE",
                        help=f"CAT weight exp(-RATE * epoch), epochs counted from 0 (default "
                             f"{EMBEDDED_SHORTCUT['cat_decay']:g} "
                             f"with the embedded model on generated shortcut data, otherwise {d.cat_decay:g}, CAT's)")
    losses.add_argument("--cat-weight", type=float, default=None, metavar="W",
                        help=f"CAT loss weight before the decay (default {EMBEDDED_SHORTCUT['cat_weight']:g} with the "
                             f"embedded model on generated shortcut data, otherwise {d.cat_weight:g})")
    losses.add_argument("--xg", action=argparse.BooleanOptionalAction, default=None,
                        help="add the XG variance regulariser (default on; a single run)")
    losses.add_argument("--xg-lambda", type=float, default=None, help=f"XG weight (default {d.xg_lambda})")
    losses.add_argument("--xg-pool", choices=XG_POOLS, default=d.xg_pool,
                        help="XG read-out pooled per sample or taken per position (default sample)")

    routed = parser.add_argument_group("routed adapters (ICLM; the +routed runs, e.g. --runs ce,ce+routed)")
    routed.add_argument("--domains", type=int, default=None, metavar="K",
                        help=f"domain prompts per adapted layer, one chosen per sample by the router (default {d.domains})")
    routed.add_argument("--domain-len", type=int, default=None, metavar="M",
                        help=f"prompt tokens of each domain prompt (default {d.domain_len}); --adapter-len is the "
                             "invariant prompt's")
    routed.add_argument("--route", choices=ROUTE_MODES, default=None,
                        help="vq (ICLM: argmin of the codeword distances, no gradient through the route), vq-ste "
                             "(straight through a softmax), soft (softmax weights), oracle (the data's domain ids) "
                             "(default vq)")
    routed.add_argument("--router-dim", type=int, default=None,
                        help=f"the router's code dimension (default {d.router_dim}, the official code's)")
    routed.add_argument("--vq-lambda", type=float, default=None,
                        help=f"weight of the router's VQ loss (default {d.vq_lambda}, ICLM's)")
    routed.add_argument("--mi-lambda", type=float, default=None,
                        help=f"weight of the MI term between invariant and domain read-outs (default {d.mi_lambda}, "
                             "ICLM's)")
    routed.add_argument("--invariant-ce", type=float, default=None, metavar="W",
                        help="weight of the cross-entropy of the invariant mechanism alone (domain prompts off), "
                             "ICLM's CE(invariant) term: one more forward per step (default 0; ICLM uses 1)")
    routed.add_argument("--mi-kind", choices=MI_KINDS, default=None,
                        help="code (the official KLDivLoss form) or textbook (KL(P_XY || P_X P_Y)) (default code)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default {d.lr})")
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help=f"AdamW weight decay of the prompts; gates get none (default {d.weight_decay})")
    optim.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                       help=f"linear warm-up steps before the cosine decay (default {d.warmup_steps})")
    optim.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per run (default {d.epochs})")
    optim.add_argument("--batch-size", type=int, default=d.batch_size,
                       help=f"examples per micro-batch and process (default {d.batch_size}); one optimizer step "
                            "sees batch-size x grad-accum x processes examples")
    optim.add_argument("--grad-accum", type=int, default=d.grad_accum,
                       help="micro-batches accumulated per optimizer step and process (default 1)")
    optim.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                       help=f"examples per evaluation forward (default {d.eval_batch_size})")
    optim.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                       help="dtype of the base model; adapters keep fp32 master weights (default float32)")
    optim.add_argument("--seed", type=int, default=d.seed, help="seed of the data, the adapter init and the order")
    optim.add_argument("--seeds", type=int, default=None, metavar="S",
                       help=f"train every run with seeds --seed ... --seed + S - 1 and report mean +- standard "
                            f"error over them (default {DEFAULT_SEEDS} with the embedded model on generated data, "
                            "otherwise 1)")

    base = parser.add_argument_group("the embedded base (without --model)")
    base.add_argument("--bases", type=int, default=None, metavar="B",
                      help="build B tiny bases (seeds --base-seed ... --base-seed + B - 1) and train every run and "
                           "seed on each; the table pools over bases and seeds (default "
                           f"{DEFAULT_BASES} with the embedded model on the generated shortcut task, otherwise 1)")
    base.add_argument("--base-seed", type=int, default=d.base_seed,
                      help=f"seed of the first embedded base (default {d.base_seed})")
    base.add_argument("--base-threads", type=int, default=d.base_threads,
                      help="torch CPU threads while building an embedded base: another thread count sums in "
                           f"another order, a stand-in for another machine (default {d.base_threads})")
    base.add_argument("--base-onednn", action=argparse.BooleanOptionalAction, default=d.base_onednn,
                      help="let torch use oneDNN (mkldnn) kernels while building an embedded base; --no-base-onednn "
                           "builds it with torch's own kernels, another stand-in for another machine (default on)")
    base.add_argument("--workers", type=int, default=None, metavar="W",
                      help="processes sharing the job's (base, seed) units, each on one CPU thread; the numbers do "
                           f"not depend on it (default {DEFAULT_WORKERS} with several embedded bases, otherwise 1)")

    where = parser.add_argument_group("where and how")
    where.add_argument("--output-dir", default=None, metavar="DIR",
                       help="checkpoints, report.json and plots (default: a new runs/train-<time> directory)")
    where.add_argument("--resume", action="store_true",
                       help="continue the job in --output-dir from its last checkpoint (same options)")
    where.add_argument("--save-steps", type=int, default=None, metavar="N",
                       help="also checkpoint every N optimizer steps inside an epoch, for long epochs: --resume then "
                            "continues mid-epoch, bit for bit (default: a checkpoint per epoch only)")
    where.add_argument("--backend", choices=BACKENDS, default=d.backend,
                       help="attention backend (default auto: the native CPU kernel where it applies, else composed; "
                            "the measured choice on GPUs)")
    where.add_argument("--device", choices=DEVICES, default=d.device, help="default: cuda when available")
    where.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the frozen base model with FSDP2, adapters replicated "
                            "(NCCL on GPUs, gloo on CPU; no effect in a single process)")
    where.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    where.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_data_format_arguments(parser)
    add_memory_arguments(parser)


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Mixed precision and gradient checkpointing of the training forward, and a cap on its length."""
    group = parser.add_argument_group("memory, precision and length")
    group.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no",
                       help="bf16: run the training forward under torch.autocast in bfloat16 (adapters keep fp32 "
                            "master weights, the CAT/XG statistics stay fp32); default no")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each layer's activations in the backward (non-reentrant) to save memory")
    group.add_argument("--max-steps", type=int, default=None,
                       help="stop each run after this many optimizer steps (the learning-rate schedule ends there); "
                            "the partial epoch is evaluated and checkpointed (default: --epochs full epochs)")


def add_data_format_arguments(parser: argparse.ArgumentParser) -> None:
    """How CAT-format JSONL files are read (`causalattn.data.jsonl`, `causalattn.data.annotations`)."""
    group = parser.add_argument_group("CAT-format data")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first annotated (effect, cause) pair that cannot supervise attention (text "
                            "not found, or the cause not before the effect), with its file:line; by default such "
                            "pairs are skipped and counted, as CAT's own loader skips them")


def layer_list(text: str) -> tuple[int, ...]:
    """--cat-layers: 'all' -> () (every layer), '0,1' -> (0, 1)."""
    if text.strip().lower() == "all":
        return ()
    try:  # which indices are allowed is TrainConfig.validate's (and the model's) to say
        return tuple(sorted(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layer indices such as 0,1; "
                                         f"got {text!r}") from None


def _layers_text(layers: tuple[int, ...]) -> str:
    return ",".join(map(str, layers)) if layers else "all"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from parsed flags; the runs follow the rule in `--runs`'s help."""
    explicit_losses = args.cat is not None or args.xg is not None
    embedded_shortcut = args.model is None and args.data == STG and args.task == "shortcut"
    if args.runs is not None:
        if explicit_losses:
            raise ConfigError("--runs: choose the losses with --runs or with --cat/--xg, not both")
        runs = tuple(RunSpec.parse(text) for text in args.runs.split(","))
    elif explicit_losses:
        runs = (RunSpec(cat=args.cat is not False, xg=args.xg is not False),)
    else:  # a comparison: the control only where the generated data gives its random fields by default
        control = (CONTROL_RUN,) if args.data == STG and args.model is None else ()
        runs = tuple(RunSpec.parse(text) for text in (
            EMBEDDED_SHORTCUT_RUNS if embedded_shortcut else DEFAULT_COMPARISON + control))
    seeds = args.seeds if args.seeds is not None else (
        DEFAULT_SEEDS if args.model is None and args.data == STG else 1)
    bases = args.bases if args.bases is not None else (DEFAULT_BASES if embedded_shortcut else 1)
    workers = args.workers if args.workers is not None else (DEFAULT_WORKERS if bases > 1 else 1)
    train_qk = args.train_qk if args.train_qk is not None else args.model is None
    chosen = {name: getattr(args, name) if getattr(args, name) is not None else (
        value if embedded_shortcut else getattr(TrainConfig, name)) for name, value in EMBEDDED_SHORTCUT.items()}
    given = {name: getattr(args, name) for name in CONDITIONAL_OPTIONS
             if name not in chosen and getattr(args, name) is not None}
    resolved = {"runs", "eval_data", "seeds", "bases", "workers", "train_qk", *chosen, *CONDITIONAL_OPTIONS}
    names = {f.name for f in dataclasses.fields(TrainConfig)} - resolved
    config = TrainConfig(runs=runs, eval_data=tuple(args.eval_data), seeds=seeds, bases=bases, workers=workers,
                         train_qk=train_qk, **chosen, **given, **{name: getattr(args, name) for name in names})
    _refuse_unused_options(config, set(given) | {name for name in chosen if getattr(args, name) is not None})
    return config.validate()


def _refuse_unused_options(config: TrainConfig, given: set[str]) -> None:
    """A ConfigError for a flag given where it changes nothing (the user meant something else)."""
    runs = ",".join(run.name for run in config.runs)
    routing = [name for name in ROUTING_OPTIONS if name in given]
    if routing and not config.routed:
        raise ConfigError(f"--{routing[0].replace('_', '-')}: configures routed adapters, but no run is routed "
                          f"(--runs {runs}); add +routed to a run (e.g. --runs ce,ce+routed) or drop the flag")
    if "xg_lambda" in given and not any(run.xg for run in config.runs):
        raise ConfigError(f"--xg-lambda: weighs the XG loss, which no run has (--runs {runs}, or --no-xg); "
                          "add +xg to a run or drop the flag")
    if "cat_decay" in given and not any(run.cat for run in config.runs):
        raise ConfigError(f"--cat-decay: decays the CAT loss, which no run has (--runs {runs}, or --no-cat); "
                          "add +cat to a run or drop the flag")
    if "qk_lr" in given and not config.train_qk:
        raise ConfigError("--qk-lr: the learning rate of the q/k weights --train-qk trains, which are not trained "
                          "here (--no-train-qk, the default with --model); pass --train-qk or drop the flag")
    data = f"--task {config.task}" if config.data == STG else "a JSONL --data file"
    for name in ("cat_rows", "cue_position"):
        if name in given and (config.data != STG or config.task != "shortcut"):
            raise ConfigError(f"--{name.replace('_', '-')}: shapes the generated shortcut task, not {data}; "
                              "drop the flag")
    if "cue_agreement" in given and (config.data != STG or config.task not in ("shortcut", "dialects")):
        raise ConfigError(f"--cue-agreement: sets the cue of the generated shortcut and dialects tasks, not of "
                          f"{data}; drop the flag")
