"""The trainer: one run = adapters on a fresh copy of the base model, trained for `--epochs` epochs.

Each optimizer step runs this process's micro-batches (`batching.micro_batches`) with

    loss = CE + [cat] w * exp(-decay * epoch) * L_cat + [xg] lambda * R        (docs/math.md §2, §3)
               + [routed] vq_lambda * VQ + mi_lambda * MI                 (docs/math.md §7, ICLM)
               + [routed] invariant_ce * CE(invariant prompts alone)     (ICLM's CE(invariant); 0 by default)

per micro-batch, scaled by 1 / grad_accum (data parallelism averages over processes), then one AdamW
step with warm-up + cosine. CAT and XG are computed for every run, also when they are not in the loss,
so the history shows how much attention a plain CE run puts on the causes. After every epoch the run
is evaluated (IID/OOD accuracy for the STG) and checkpointed, and with `--save-steps N` every N optimizer
steps inside an epoch too; a resumed run continues from the newest intact checkpoint (damaged ones are
reported and skipped, `checkpoint.select_checkpoint`) with the same loss trajectory, mid-epoch included.

Routed runs (`+routed`) also log, per epoch on the last step's history row, the share of training
samples routed to each domain (`route_fractions`) and the NMI between route and true domain
(`route_nmi`, when the data has domain ids), the same for each test set on its accuracy row, and are
evaluated twice: with the full adapters and with the invariant mechanism alone (`<split>-invariant`,
domain segments off).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import causalattn.hf as cah
from causalattn.checkpoint_files import seal
from causalattn.data.batches import collate
from causalattn.losses import cat_amp
from causalattn.routing import normalized_mutual_information, route_distribution
from causalattn.lab.training import checkpoint as ckpt
from causalattn.lab.training import lora
from causalattn.lab.training.batching import JobData, epoch_order, global_batch_size, micro_batches, steps_per_epoch
from causalattn.lab.training.config import ConfigError, RunSpec, TrainConfig, check_cat_layers
from causalattn.lab.training.progress import ProgressLines
from causalattn.lab.training.distributed import DistContext, ParallelModel
from causalattn.lab.training.evaluate import accuracy, generation_accuracy, routes_of

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Logged per step; cause_attn is the share of attention the supervised rows (those predicting an annotated
# effect) put on its causes (mass averaged over the layers CAT supervises and the heads, then over those rows):
# what CAT pushes up.
STAT_NAMES = ("loss", "ce", "cat", "xg", "cause_attn", "mi", "vq", "tokens")
LOGGED = STAT_NAMES[:-1]
ADAPTER_DIR = "adapter"
INVARIANT_SUFFIX = "-invariant"  # the evaluation split of a routed run with the domain segments off


@dataclass
class Job:
    """What every run of a job shares."""

    config: TrainConfig
    model_path: Path
    tokenizer: object
    data: JobData
    context: DistContext
    output_dir: Path
    log: Callable[[str], None]
    runs_dir: Optional[Path] = None  # where the runs' folders go (default output_dir)
    base: Optional[int] = None  # the embedded base's seed when the job trains on several bases
    # {split: accuracy} with every gate 0: the base model's answers, the same for every run of the job,
    # so measured by the first run only (on the embedded default it is 9 of the 36 evaluations)
    initial_accuracy: dict = field(default_factory=dict)

    @property
    def show_progress(self) -> bool:
        """tqdm bars: the main process on a terminal."""
        return self.context.is_main and not self.config.quiet and sys.stderr.isatty()

    @property
    def show_progress_lines(self) -> bool:
        """Plain progress lines (`ProgressLines`): the main process writing to a file or a pipe."""
        return self.context.is_main and not self.config.quiet and not sys.stderr.isatty()


@dataclass
class RunResult:
    """One run's numbers, as the report shows them."""

    name: str
    seed: int
    history: list[dict]
    accuracy: list[dict]
    train_seconds: float
    examples_per_second: float
    adapter_dir: Path
    resumed_at_epoch: Optional[int] = None
    parameters: dict = field(default_factory=dict)
    majority: dict = field(default_factory=dict)  # {split: accuracy of the majority answer} on this seed's data
    base: Optional[int] = None  # the seed of the embedded base it was trained on (several bases), else None

    def final_accuracy(self) -> dict[str, float]:
        last = max((row["epoch"] for row in self.accuracy), default=0)
        return {row["split"]: row["accuracy"] for row in self.accuracy if row["epoch"] == last}


def load_model(path: Path, config: TrainConfig, device: torch.device) -> nn.Module:
    """A fresh copy of the base model on `device` in `--dtype`, attention routed through causalattn."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[config.dtype], local_files_only=True,
                                                 attn_implementation=cah.IMPLEMENTATION)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        # non-reentrant: the CAT/XG statistics need autograd in the first forward (causalattn.hf.stats)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)


def training_precision(config: TrainConfig, device: torch.device) -> torch.autocast:
    """The autocast region of a training forward: bf16 with --mixed-precision bf16, otherwise off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")


def add_job_adapters(model: nn.Module, config: TrainConfig, routed: bool = False) -> cah.AdapterSummary:
    """Zero-init gated prompts as the adapter flags ask (routed ones for a +routed run), LoRA beside them
    with --lora-rank, on the chosen attention backend."""
    layers = len(cah.attention_modules(model))
    if config.adapter_layers is not None and config.adapter_layers > layers:
        raise ConfigError(f"--adapter-layers: the model has {layers} layers, got {config.adapter_layers}")
    check_cat_layers(config.cat_layers, layers)
    routing = dict(domains=config.domains, domain_length=config.domain_len, route=config.route,
                   router_dim=config.router_dim) if routed else {}
    summary = cah.add_adapters(model, cah.AdapterConfig(
        length=config.adapter_len, layers=config.adapter_layers, xg_tokens=config.xg_tokens, gate=config.gate,
        gate_per_head=config.gate_per_head, xg_pool=config.xg_pool, **routing))
    if config.train_qk:
        for weight in query_key_weights(model):
            weight.requires_grad_(True)
    if config.lora_rank:
        lora.add_lora(model, config.lora_rank, config.lora_targets)
    if config.train_qk or config.lora_rank:
        summary = cah.summarize(model)
    cah.set_backend(model, config.backend)
    return summary


def query_key_weights(model: nn.Module) -> list[nn.Parameter]:
    """The q_proj/k_proj parameters of the adapted layers (what `--train-qk` trains)."""
    adapted = cah.adapted_layers(model)
    modules = [m for m in cah.attention_modules(model) if m.layer_idx in adapted]
    return [p for m in modules for proj in (m.q_proj, m.k_proj) for p in proj.parameters()]


def routing_inputs(batch) -> dict:
    """The keywords a routed model's forward takes from a batch: the MI label rows, the prompt tokens the
    router reads (never the answer: a route read from it would carry the label), the domain ids."""
    inputs = {cah.LABEL_ROWS_KWARG: batch.label_rows(), cah.ROUTE_TOKENS_KWARG: batch.prompt_tokens()}
    if batch.domains is not None:
        inputs[cah.DOMAINS_KWARG] = batch.domains
    return inputs


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    """AdamW with weight decay on the prompts only (decaying a gate pulls it back to 0, i.e. off; the
    router is not a prompt either) and a linear warm-up then cosine decay to 0 over `total_steps`."""
    from transformers import get_cosine_schedule_with_warmup

    prompts, gates = [], []
    for layer in cah.adapted_layers(model).values():
        prompts.append(layer.prompt)
        gates.append(layer.gate)
        if layer.routed:
            prompts.append(layer.bank)
            gates.append(layer.domain_gate)
    router = cah.find_router(model)
    gates += list(router.parameters()) if router is not None else []
    groups = [{"params": prompts, "weight_decay": config.weight_decay}, {"params": gates, "weight_decay": 0.0}]
    if config.train_qk:
        groups.append({"params": query_key_weights(model), "weight_decay": 0.0, "lr": config.qk_lr})
    if config.lora_rank:
        groups.append({"params": lora.lora_parameters(model), "weight_decay": 0.0, "lr": config.lora_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps), total_steps)


class Trainer:
    """Trains one run of a job; `run()` returns its result and the trained model."""

    def __init__(self, job: Job, spec: RunSpec):
        self.job, self.spec, self.config = job, spec, job.config
        self.context = job.context
        self.run_dir = (job.runs_dir or job.output_dir) / spec.name.replace("+", "-")
        self.train_examples = job.data.control_train if spec.random_causes else job.data.train
        self.monitor_xg = self.config.xg_tokens > 0 and self.config.batch_size > 1
        world = self.context.world_size
        self.steps = steps_per_epoch(len(job.data.train), self.config, world)
        self.total_steps = min(self.steps * self.config.epochs, self.config.max_steps or math.inf)
        self.options = {**self.config.trajectory_options(), "world_size": world, "run": spec.name}
        self._routes: list[Tensor] = []   # this epoch's route index of every training sample (routed runs)
        self._domains: list[Tensor] = []  # and their true domains, when the data has them

    # ------------------------------------------------------------------ one optimizer step
    def _micro_batch(self, parallel: ParallelModel, indices: list[int], amp: float, skip_sync: bool) -> Tensor:
        """Forward + backward of one micro-batch; returns its STAT_NAMES values for logging."""
        examples = [self.train_examples[i] for i in indices]
        batch = collate(examples, self.job.tokenizer, max_length=self.config.max_length).to(self.context.device)
        routing = routing_inputs(batch) if self.spec.routed else {}
        with parallel.no_sync(skip_sync), cah.collect(parallel.module) as stats, \
                training_precision(self.config, self.context.device):
            out = parallel.forward_module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          labels=batch.labels, supervision=batch.causal_mask, use_cache=False,
                                          **routing)
            cat_layers = self.config.cat_layers or None  # the config's () is every layer
            cat = stats.cat_loss(alpha=self.config.cat_alpha, kind=self.config.cat_kind,
                                 heads=self.config.cat_heads, layers=cat_layers)
            xg = stats.xg_loss() if self.monitor_xg else torch.zeros((), device=self.context.device)
            zero = torch.zeros((), device=self.context.device)
            mi = stats.mi_loss(kind=self.config.mi_kind) if self.spec.routed and stats.readouts else zero
            vq = stats.vq_loss() if self.spec.routed else zero
            loss = out.loss
            if self.spec.cat:
                loss = loss + amp * cat
            if self.spec.xg:
                loss = loss + self.config.xg_lambda * xg
            if self.spec.routed:
                loss = loss + self.config.vq_lambda * vq + self.config.mi_lambda * mi
            cause_attention = self._cause_attention(stats, cat_layers)
            route = stats.route.index.detach().cpu() if self.spec.routed else None
            if self.spec.routed and self.config.invariant_ce:
                # ICLM's CE(invariant), after this forward's statistics are read (the next forward records
                # its own): the same batch with the domain prompts off, through the plain module
                # (a second DDP forward would prepare its reducer twice) and summed into the one backward, so
                # each parameter's gradient hook fires once, for the summed gradient
                with cah.invariant_only(parallel.module):
                    alone = parallel.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            labels=batch.labels, use_cache=False, **routing)
                loss = loss + self.config.invariant_ce * alone.loss
            (loss / self.config.grad_accum).backward()
        if self.spec.routed:
            self._routes.append(route)
            if batch.domains is not None:
                self._domains.append(batch.domains.cpu())
        tokens = batch.attention_mask.sum()
        values = (loss, out.loss, cat, xg, cause_attention, mi, vq, tokens)
        return torch.stack([t.detach().double() for t in values]).cpu()

    @staticmethod
    def _cause_attention(stats: cah.Statistics, layers: Optional[tuple[int, ...]]) -> Tensor:
        mass = torch.stack(stats.layer_masses(layers)).float().mean(dim=(0, 2))  # (B, N)
        valid = stats.supervision.valid_rows()
        return (mass * valid).sum() / valid.sum().clamp_min(1)

    def _step(self, parallel: ParallelModel, optimizer, scheduler, order: list[int], step: int, amp: float) -> Tensor:
        """One optimizer step; returns the sums over every process's micro-batches of the logged values."""
        mine = micro_batches(order, step, self.config, self.context.rank, self.context.world_size)
        sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
        for a, indices in enumerate(mine):
            sums += self._micro_batch(parallel, indices, amp, skip_sync=a < len(mine) - 1)
        parallel.finish_gradients()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return self.context.sum(sums).cpu()

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, model: nn.Module, epoch: int) -> list[dict]:
        data = self.job.data

        def measure(examples, split: str) -> float:
            lines = ProgressLines(self.spec.name, f"evaluating {split}", len(examples), "examples",
                                  enabled=self.job.show_progress_lines)
            if not data.closed_answers:  # open answers: exact match of a greedy generation
                return generation_accuracy(model, self.job.tokenizer, examples, context=self.context,
                                           batch_size=self.config.eval_batch_size)
            return accuracy(model, self.job.tokenizer, examples, data.candidates, context=self.context,
                            batch_size=self.config.eval_batch_size, max_length=self.config.max_length,
                            on_batch=lines.update)

        def row(split: str, value: float) -> dict:
            return {"run": self.spec.name, "seed": self.config.seed, "epoch": epoch, "split": split, "accuracy": value}

        rows = [row(split, measure(examples, split)) for split, examples in data.evals.items()]
        if self.spec.routed:
            for entry, examples in zip(rows, data.evals.values()):
                entry.update(self._routes_of_test_set(model, examples))
        if self.spec.routed:  # the invariant mechanism alone, as ICLM evaluates it
            with cah.invariant_only(model):
                rows += [row(split + INVARIANT_SUFFIX, measure(examples, split + INVARIANT_SUFFIX)) for split, examples in data.evals.items()]
        return rows

    def _initial_accuracy(self, model: nn.Module) -> list[dict]:
        """The epoch-0 rows (every gate 0), measured once per job (`Job.initial_accuracy`)."""
        if not self.job.initial_accuracy:
            # the test sets themselves: a routed first run also measures invariant-only splits, which at
            # gates 0 are the same numbers and which an unrouted run does not have
            self.job.initial_accuracy.update({row["split"]: row["accuracy"] for row in self._evaluate(model, 0)
                                              if row["split"] in self.job.data.evals})
        return [{"run": self.spec.name, "seed": self.config.seed, "epoch": 0, "split": split, "accuracy": value}
                for split, value in self.job.initial_accuracy.items()]

    # ------------------------------------------------------------------ the run
    def run(self, before_training: Optional[Callable[[nn.Module], None]] = None) -> tuple[RunResult, nn.Module]:
        config, context, job = self.config, self.context, self.job
        torch.manual_seed(config.seed)  # the same adapter init in every run and on every process
        model = load_model(job.model_path, config, context.device)
        summary = add_job_adapters(model, config, routed=self.spec.routed)
        optimizer, scheduler = make_optimizer(model, config, self.total_steps)
        progress = ckpt.Progress(epoch=0, step=0, history=[], accuracy=[], train_seconds=0.0, options=self.options)
        resumed_at = None
        if context.rank == 0:
            for leftover in ckpt.remove_staging_leftovers(self.run_dir):
                job.log(f"[{self.spec.name}] removed {leftover.name}, left by an interrupted checkpoint write")
        latest = None
        if context.rank == 0:
            latest = ckpt.select_checkpoint(self.run_dir, self.steps, self.total_steps, self._warn)
        latest = context.broadcast(latest)
        if latest is not None:
            progress, extra = ckpt.resume_from(latest, self.options, model, optimizer, scheduler, context.rank)
            # a step checkpoint carries the routes of its epoch so far: the epoch's route statistics need them
            self._routes, self._domains = extra.get("routes", []), extra.get("domains", [])
            resumed_at = progress.epoch
            job.log(f"[{self.spec.name}] resumed from {latest} (epoch {progress.epoch} of {config.epochs}, "
                    f"step {progress.step})")
        elif config.resume:
            job.log(f"[{self.spec.name}] --resume: no checkpoint in {self.run_dir} yet, starting at epoch 0")
        parallel = ParallelModel(model, context, config.fsdp)
        model.train()
        if resumed_at is None:
            progress.accuracy += self._initial_accuracy(model)
            if before_training is not None:
                before_training(model)
        for epoch in range(progress.epoch, config.epochs):
            if progress.step >= self.total_steps:  # --max-steps reached
                break
            self._train_epoch(parallel, optimizer, scheduler, progress, epoch)
            progress.accuracy += self._evaluate(model, epoch + 1)
            progress.epoch = epoch + 1
            self._save(ckpt.epoch_name(progress.epoch), model, optimizer, scheduler, progress)
            if context.is_main:
                ckpt.remove_step_checkpoints_before(self.run_dir, progress.step)
            job.log(self._epoch_line(progress))
        adapter_dir = self.run_dir / ADAPTER_DIR
        if context.is_main:
            try:
                cah.save_adapters(model, adapter_dir)
                ckpt.save_trained_base_weights(model, adapter_dir)
                seal(adapter_dir)  # the manifest then lists the trained base weights too
            except OSError as error:
                raise ConfigError(f"--output-dir: could not write the trained adapters to {adapter_dir} "
                                  f"({error.strerror or error}); the last checkpoint holds them: make room and "
                                  "rerun with --resume") from None
        context.barrier()
        examples = progress.step * global_batch_size(config, context.world_size)
        result = RunResult(self.spec.name, config.seed, progress.history, progress.accuracy, progress.train_seconds,
                           examples / max(progress.train_seconds, 1e-9), adapter_dir, resumed_at,
                           {"adapter": summary.adapter_params, "trainable": summary.trainable_params,
                            "total": summary.total_params}, job.data.majority_accuracy(), job.base)
        return result, model

    def _train_epoch(self, parallel: ParallelModel, optimizer, scheduler, progress: ckpt.Progress, epoch: int) -> None:
        from tqdm.auto import tqdm

        config = self.config
        amp = config.cat_weight * cat_amp(epoch, config.cat_decay)
        order = epoch_order(len(self.job.data.train), config.seed, epoch)
        per_step = global_batch_size(config, self.context.world_size)
        bar = tqdm(total=self.steps, desc=f"{self.spec.name} epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not self.job.show_progress, dynamic_ncols=True, leave=False)
        seconds, tokens = 0.0, 0.0  # in this call's steps (checkpoint writes not counted)
        done = progress.step - epoch * self.steps  # steps of this epoch a step checkpoint already holds
        last = min(self.steps, self.total_steps - epoch * self.steps)
        bar.update(done)
        lines = ProgressLines(self.spec.name, f"epoch {epoch + 1}/{config.epochs}", last, "steps", done=done,
                              enabled=self.job.show_progress_lines)
        for step in range(done, last):
            start = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            sums = self._step(parallel, optimizer, scheduler, order, step, amp)
            progress.step += 1
            means = {name: float(v) / (config.grad_accum * self.context.world_size) for name, v in zip(LOGGED, sums)}
            if not math.isfinite(means["loss"]):
                raise FloatingPointError(f"[{self.spec.name}] loss became {means['loss']} at step {progress.step}; "
                                         "try a lower --lr")
            progress.history.append({"run": self.spec.name, "seed": config.seed, "epoch": epoch + 1, "step": progress.step, **means,
                                     "lr": lr, "cat_weight": amp if self.spec.cat else 0.0})
            elapsed = time.perf_counter() - start
            seconds, tokens = seconds + elapsed, tokens + float(sums[-1])
            progress.train_seconds += elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{means['loss']:.4f}", ce=f"{means['ce']:.4f}", cat=f"{means['cat']:.3f}",
                            ex_s=f"{(step + 1 - done) * per_step / seconds:.0f}", tok_s=f"{tokens / seconds:.0f}",
                            refresh=False)
            lines.update(extra=f"loss {means['loss']:.4f} ce {means['ce']:.4f} cat {means['cat']:.3f}")
            if config.save_steps and progress.step % config.save_steps == 0 and step + 1 < last:
                # (the epoch's last step is followed by the epoch checkpoint itself)
                self._save(ckpt.step_name(progress.step), parallel.module, optimizer, scheduler, progress,
                           {"routes": self._routes, "domains": self._domains} if self.spec.routed else None)
        bar.close()
        if self.spec.routed and progress.history:
            progress.history[-1].update(self._route_statistics())

    def _routes_of_test_set(self, model: nn.Module, examples) -> dict:
        """The routes of a test set (this process's share): fractions per domain, NMI with the true domains."""
        routes = routes_of(model, self.job.tokenizer, examples, context=self.context,
                           batch_size=self.config.eval_batch_size, max_length=self.config.max_length)
        mine = examples[self.context.rank::self.context.world_size]
        values = {"route_fractions": route_distribution(routes, self.config.domains)}
        if mine and all(example.domain is not None for example in mine):
            values["route_nmi"] = normalized_mutual_information(routes, torch.tensor([e.domain for e in mine]))
        return values

    def _route_statistics(self) -> dict:
        """This process's epoch of routes: the share of samples per domain and, with true domains, their NMI
        (with several processes, each logs its own share of the samples)."""
        routes, domains = torch.cat(self._routes), torch.cat(self._domains) if self._domains else None
        self._routes, self._domains = [], []
        values = {"route_fractions": route_distribution(routes, self.config.domains)}
        if domains is not None and domains.numel() == routes.numel():
            values["route_nmi"] = normalized_mutual_information(routes, domains)
        return values

    def _save(self, name: str, model: nn.Module, optimizer, scheduler, progress: ckpt.Progress,
              extra_state: Optional[dict] = None) -> None:
        states = self.context.gather(ckpt.rng_state())
        if self.context.is_main:
            ckpt.save_checkpoint(self.run_dir, name, model, optimizer, scheduler, progress, states, extra_state)
        self.context.barrier()

    def _warn(self, message: str) -> None:
        """A line on stderr, also with --quiet: a damaged checkpoint must not go unnoticed."""
        print(f"causalattn train: warning: [{self.spec.name}] {message}", file=sys.stderr)

    def _epoch_line(self, progress: ckpt.Progress) -> str:
        rows = [r for r in progress.history if r["epoch"] == progress.epoch]
        mean = {name: sum(r[name] for r in rows) / len(rows) for name in LOGGED}
        accs = "  ".join(f"{r['split'].upper()} {r['accuracy']:.3f}" for r in progress.accuracy
                         if r["epoch"] == progress.epoch)
        routing = ""
        if self.spec.routed:
            fractions = "/".join(f"{f:.2f}" for f in rows[-1].get("route_fractions", []))
            nmi = f"  nmi {rows[-1]['route_nmi']:.2f}" if "route_nmi" in rows[-1] else ""
            routing = f"mi {mean['mi']:.2e}  vq {mean['vq']:.3f}  route {fractions}{nmi}  "
        return (f"[{self.spec.name}] epoch {progress.epoch}/{self.config.epochs}  loss {mean['loss']:.4f}  "
                f"ce {mean['ce']:.4f}  cat {mean['cat']:.3f}  xg {mean['xg']:.2e}  "
                f"cause attn {mean['cause_attn']:.3f}  {routing}{accs}  "
                f"({progress.train_seconds:.0f} s training)")
