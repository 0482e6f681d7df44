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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from causalattn.inputs import GATE_MODES, MAX_ADAPTER_TOKENS, XG_POOLS
from causalattn.losses import CAT_LOSS_KINDS, MI_KINDS
from causalattn.routing import DEFAULT_CODE_DIM, HARD_ROUTES, ROUTE_MODES
from causalattn.ops import BACKENDS
from causalattn.pretrained import SHIPPED_MODELS, is_pretrained_spec, shipped_file
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
# The CAT weight's decay rate in the embedded default job (the tiny base on the generated shortcut task):
# 0, CAT's `div` loss at full weight in both epochs. Over 3 seeds it kept iid accuracy within 1.5 points
# of CE and raised flipped accuracy by 27 (0.32 -> 0.59); CAT's own decay 1 (weight 0.37 in epoch 2) gave
# +21 at -2.0 on one seed. Elsewhere CAT's own rate 1 stays the default.
EMBEDDED_CAT_DECAY = 0.0


ROUTING_OPTIONS = ("domains", "domain_len", "route", "router_dim", "vq_lambda", "mi_lambda", "mi_kind",
                   "invariant_ce")
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
    train_examples: Optional[int] = None  # None: STG_TRAIN_EXAMPLES generated, or every record of --data
    eval_examples: Optional[int] = None   # None: STG_EVAL_EXAMPLES generated, or every record of each file
    max_length: Optional[int] = None
    # adapters (SPEC §1, §3)
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
    # losses (SPEC §2, §3)
    runs: tuple[RunSpec, ...] = field(default_factory=lambda: tuple(RunSpec.parse(r) for r in DEFAULT_COMPARISON))
    cat_alpha: float = 2.0
    cat_kind: str = "div"
    cat_decay: float = 1.0
    xg_lambda: float = 1.0
    xg_pool: str = "sample"
    # routed adapters (ICLM, SPEC §7), for the +routed runs; defaults are the official code's weights
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
    # where and how it runs
    output_dir: Optional[str] = None
    resume: bool = False
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

    def validate(self) -> "TrainConfig":
        """Check every option; returns self. Raises ConfigError naming the first bad flag."""
        positive = {"--seeds": self.seeds, "--adapter-len": self.adapter_len, "--epochs": self.epochs,
                    "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--eval-batch-size": self.eval_batch_size}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag}: expected a positive integer, got {value}")
        for flag, value in {"--train-examples": self.train_examples, "--eval-examples": self.eval_examples,
                            "--adapter-layers": self.adapter_layers, "--max-length": self.max_length,
                            "--threads": self.threads, "--max-steps": self.max_steps}.items():
            if value is not None and value < 1:
                raise ConfigError(f"{flag}: expected a positive integer, got {value}")
        if self.adapter_len > MAX_ADAPTER_TOKENS:
            raise ConfigError(f"--adapter-len: at most {MAX_ADAPTER_TOKENS} prompt tokens, got {self.adapter_len}")
        if not 0 <= self.xg_tokens <= self.adapter_len:
            raise ConfigError(f"--xg-tokens: expected 0 to --adapter-len ({self.adapter_len}), got {self.xg_tokens}")
        for flag, value in {"--lr": self.lr, "--qk-lr": self.qk_lr, "--cat-alpha": self.cat_alpha}.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag}: expected a positive number, got {value}")
        for flag, value in {"--weight-decay": self.weight_decay, "--cat-decay": self.cat_decay,
                            "--xg-lambda": self.xg_lambda, "--warmup-steps": self.warmup_steps}.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag}: expected a non-negative number, got {value}")
        if not self.runs:
            raise ConfigError("--runs: expected at least one run")
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
                raise ConfigError("--batch-size: the XG variance is taken over each micro-batch (SPEC §3) and needs "
                                  f"at least 2 examples per micro-batch, got {self.batch_size} (or pass --no-xg)")
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
        for name in ("output_dir", "resume", "threads", "quiet"):
            values.pop(name)
        if not self.routed:  # jobs without routed runs keep the options (and checkpoints) they had before
            for name in ROUTING_OPTIONS:
                values.pop(name)
        if not self.lora_rank:  # and so do jobs without LoRA
            for name in lora.LORA_OPTIONS:
                values.pop(name)
        return values


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
    data.add_argument("--cue-agreement", type=float, default=d.cue_agreement, metavar="P",
                      help=f"shortcut and dialects tasks: how often the cue agrees with the label in training (default "
                           f"{d.cue_agreement})")
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
    adapter.add_argument("--qk-lr", type=float, default=d.qk_lr,
                         help=f"AdamW peak learning rate of those q/k weights (default {d.qk_lr})")
    lora.add_arguments(parser, d.lora_rank, d.lora_targets, d.lora_lr)

    losses = parser.add_argument_group("losses")
    losses.add_argument("--runs", default=None, metavar="LIST",
                        help="comma-separated runs to train and compare, each ce, ce+cat, ce+xg, ce+cat+xg or "
                             f"{CONTROL_RUN} (CAT onto random record fields) (default: {','.join(DEFAULT_COMPARISON)} "
                             f"with the embedded model, plus the control {CONTROL_RUN} on generated data; "
                             "the same three with --model; the one run chosen by --cat/--xg when either is given)")
    losses.add_argument("--cat", action=argparse.BooleanOptionalAction, default=None,
                        help="add the CAT attention loss (default on; a single run)")
    losses.add_argument("--cat-alpha", type=float, default=d.cat_alpha, help="CAT ratio target alpha (default 2)")
    losses.add_argument("--cat-kind", choices=CAT_LOSS_KINDS, default=d.cat_kind, help="CAT row loss (default div)")
    losses.add_argument("--cat-decay", type=float, default=None, metavar="RATE",
                        help=f"CAT weight exp(-RATE * epoch), epochs counted from 0 (default {EMBEDDED_CAT_DECAY:g} "
                             f"with the embedded model on generated shortcut data, otherwise {d.cat_decay:g}, CAT's)")
    losses.add_argument("--xg", action=argparse.BooleanOptionalAction, default=None,
                        help="add the XG variance regulariser (default on; a single run)")
    losses.add_argument("--xg-lambda", type=float, default=d.xg_lambda, help=f"XG weight (default {d.xg_lambda})")
    losses.add_argument("--xg-pool", choices=XG_POOLS, default=d.xg_pool,
                        help="XG read-out pooled per sample or taken per position (default sample)")

    routed = parser.add_argument_group("routed adapters (ICLM; the +routed runs, e.g. --runs ce,ce+routed)")
    routed.add_argument("--domains", type=int, default=d.domains, metavar="K",
                        help=f"domain prompts per adapted layer, one chosen per sample by the router (default {d.domains})")
    routed.add_argument("--domain-len", type=int, default=d.domain_len, metavar="M",
                        help=f"prompt tokens of each domain prompt (default {d.domain_len}); --adapter-len is the "
                             "invariant prompt's")
    routed.add_argument("--route", choices=ROUTE_MODES, default=d.route,
                        help="vq (ICLM: argmin of the codeword distances, no gradient through the route), vq-ste "
                             "(straight through a softmax), soft (softmax weights), oracle (the data's domain ids) "
                             "(default vq)")
    routed.add_argument("--router-dim", type=int, default=d.router_dim,
                        help=f"the router's code dimension (default {d.router_dim}, the official code's)")
    routed.add_argument("--vq-lambda", type=float, default=d.vq_lambda,
                        help=f"weight of the router's VQ loss (default {d.vq_lambda}, ICLM's)")
    routed.add_argument("--mi-lambda", type=float, default=d.mi_lambda,
                        help=f"weight of the MI term between invariant and domain read-outs (default {d.mi_lambda}, "
                             "ICLM's)")
    routed.add_argument("--invariant-ce", type=float, default=d.invariant_ce, metavar="W",
                        help="weight of the cross-entropy of the invariant mechanism alone (domain prompts off), "
                             "ICLM's CE(invariant) term: one more forward per step (default 0; ICLM uses 1)")
    routed.add_argument("--mi-kind", choices=MI_KINDS, default=d.mi_kind,
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

    where = parser.add_argument_group("where and how")
    where.add_argument("--output-dir", default=None, metavar="DIR",
                       help="checkpoints, report.json and plots (default: a new runs/train-<time> directory)")
    where.add_argument("--resume", action="store_true",
                       help="continue the job in --output-dir from its last checkpoint (same options)")
    where.add_argument("--backend", choices=BACKENDS, default=d.backend,
                       help="attention backend (default auto: composed on CPU, the measured choice on GPUs)")
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from parsed flags; the runs follow the rule in `--runs`'s help."""
    explicit_losses = args.cat is not None or args.xg is not None
    if args.runs is not None:
        if explicit_losses:
            raise ConfigError("--runs: choose the losses with --runs or with --cat/--xg, not both")
        runs = tuple(RunSpec.parse(text) for text in args.runs.split(","))
    elif explicit_losses:
        runs = (RunSpec(cat=args.cat is not False, xg=args.xg is not False),)
    else:  # a comparison: the control only where the generated data gives its random fields by default
        control = (CONTROL_RUN,) if args.data == STG and args.model is None else ()
        runs = tuple(RunSpec.parse(text) for text in DEFAULT_COMPARISON + control)
    seeds = args.seeds if args.seeds is not None else (
        DEFAULT_SEEDS if args.model is None and args.data == STG else 1)
    train_qk = args.train_qk if args.train_qk is not None else args.model is None
    embedded_shortcut = args.model is None and args.data == STG and args.task == "shortcut"
    cat_decay = args.cat_decay if args.cat_decay is not None else (
        EMBEDDED_CAT_DECAY if embedded_shortcut else TrainConfig.cat_decay)
    resolved = {"runs", "eval_data", "seeds", "train_qk", "cat_decay"}
    names = {f.name for f in dataclasses.fields(TrainConfig)} - resolved
    config = TrainConfig(runs=runs, eval_data=tuple(args.eval_data), seeds=seeds, train_qk=train_qk,
                         cat_decay=cat_decay, **{name: getattr(args, name) for name in names})
    return config.validate()
