"""CE + CAT + XG (+ VQ + MI for routed adapters) through the Hugging Face `Trainer`: a data collator and
a `Trainer` subclass.

    from causalattn.hf import CausalCollator, CausalTrainer
    trainer = CausalTrainer(model=model, args=TrainingArguments("out", bf16=True), train_dataset=records,
                            processing_class=tokenizer, cat_weight=1.0, xg_weight=1.0)
    trainer.train()                   # logs loss, ce, cat, xg; checkpoints hold the adapters only

Routed adapters (ICLM, `AdapterConfig(domains=K)`) add the router's VQ loss and the MI term between the
invariant and domain read-outs with `causalattn train`'s weights (`vq_weight=0.1`, `mi_weight=0.01`,
`mi_kind="code"`; `invariant_ce` for ICLM's CE of the invariant prompts alone, 0 by default) and log
`vq` and `mi`. The collator then also sends each sample's label row (where MI compares the read-outs),
the prompt tokens the router reads (never the answer), and the records' `domain` ids when all have one.

`records` are CAT-format rows (`input`, `target`, optional `important`, which a `datasets.Dataset`
may hold as a JSON string, optional `domain`); the model has causalattn adapters (`causalattn.hf.add_adapters`).
What the plain `Trainer` gets wrong for this, and what the subclass does instead:

* the forward must run inside `causalattn.hf.collect` for the CAT/XG statistics to exist, so
  `compute_loss_func` cannot add them: `compute_loss` is overridden;
* `remove_unused_columns=True` (the default) would drop `input`/`target`/`important` before the
  collator sees them: it is turned off;
* `_prepare_inputs` moves tensors but not a `CausalMask`: it is moved to the batch's device here;
* `save_pretrained` would write the whole frozen base (2.6 MB for the test model, gigabytes for a
  real one) and no adapters: checkpoints and `save_model` write the adapters (`save_adapters`), and
  `resume_from_checkpoint` loads them back;
* a checkpoint cut short or damaged on disk would be resumed from, or crash the resume: each checkpoint
  gets a manifest of its files' sizes and SHA-256 once complete (`causalattn.checkpoint_files`), and
  `train(resume_from_checkpoint=True)` takes the newest checkpoint that verifies, naming the bad file
  of each one skipped (a ValueError when none verifies; a named checkpoint is verified as well).

CE is the model's mean over the micro-batch's answer tokens and CAT/XG are means over it too, so
each micro-batch counts the same under gradient accumulation (`model_accepts_loss_kwargs` off, the
Trainer divides by the accumulation steps), as in `causalattn train`; with several processes the logged
terms are means over them, as the Trainer's `loss` is. `CausalLossMixin` holds all
of it, so other Trainer subclasses get the same (`causalattn.hf.sft.CausalSFTTrainer` for TRL).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from causalattn.checkpoint_files import is_sealed, newest_intact, no_intact_message, seal, verify
from causalattn.data.annotations import check_annotations
from causalattn.data.batches import check_max_length, collate
from causalattn.data.jsonl import DataFile, loads_record, parse_record
from causalattn.data.records import Example
from causalattn.hf.adapter import adapted_layers
from causalattn.hf.contract import (DOMAINS_KWARG, LABEL_ROWS_KWARG, ROUTE_TOKENS_KWARG, SUPERVISION_KWARG,
                                    attention_modules)
from causalattn.hf.io import holds_adapters, load_adapters, save_adapters
from causalattn.hf.routed import find_router, invariant_only
from causalattn.hf.stats import collect
from causalattn.losses import CAT_HEAD_REDUCTIONS, CAT_LOSS_KINDS, MI_KINDS
from causalattn.masks import CausalMask

LOGGED_TERMS = ("ce", "cat", "xg")
ROUTED_TERMS = ("vq", "mi")
logger = logging.getLogger(__name__)


def example_of(feature: Any, where: str = "features", *, strict: bool = False) -> tuple[Example, int]:
    """An `Example` from an Example or a CAT-format mapping (`important` may be a JSON string), read as
    `causalattn.data.jsonl` reads a file's record, and the number of malformed annotation entries dropped
    (with `strict=True` the first is an error instead)."""
    if isinstance(feature, Example):
        return feature, 0
    if not isinstance(feature, Mapping):
        raise TypeError(f"{where}: expected a causalattn Example or a mapping with input/target/important, "
                        f"got {type(feature).__name__}")
    record = dict(feature)
    if isinstance(record.get("important"), str):
        record["important"] = loads_record(record["important"], f"{where}['important']")
    example, malformed = parse_record(record, where, strict=strict)
    domain = record.get("domain")
    return (example if domain is None else dataclasses.replace(example, domain=int(domain))), malformed


class CausalCollator:
    """CAT-format rows -> `{input_ids, attention_mask, labels, supervision}` for the model's forward.

    Labels cover the answer tokens only; `supervision` is the batch's CausalMask. A tokenizer without a
    pad token gets its EOS token as one (an error when it has neither). Annotated pairs that
    cannot supervise (text absent, cause not before effect) are skipped and counted in `self.skipped`,
    as `causalattn train` does; `strict=True` raises instead. `routing=True` (routed adapters; the
    Trainer sets it) adds the label rows, the router's prompt tokens and the domain ids, if known.
    """

    def __init__(self, tokenizer, *, max_length: Optional[int] = None, strict: bool = False, routing: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("tokenizer: expected a fast (Rust-backed) tokenizer, which reports character offsets")
        if tokenizer.pad_token is None:
            # LLaMA-family tokenizers often ship without one; padded positions are masked out and never
            # labelled, so EOS serves. Found here, at construction, not at the first batch.
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer: has neither a pad token nor an EOS token to pad with; set "
                                 "tokenizer.pad_token before building the collator")
            tokenizer.pad_token = tokenizer.eos_token
        check_max_length(max_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.strict = strict
        self.routing = routing
        self.skipped = 0

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        read = [example_of(f, f"features[{i}]", strict=self.strict) for i, f in enumerate(features)]
        examples = [example for example, _ in read]
        malformed = sum(dropped for _, dropped in read)
        checked, report = check_annotations(DataFile("batch", examples, list(range(len(examples))), malformed),
                                            self.tokenizer, strict=self.strict)
        self.skipped += report.skipped
        batch = collate(checked.examples, self.tokenizer, max_length=self.max_length)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                  SUPERVISION_KWARG: batch.causal_mask}
        if self.routing:  # what `causalattn train` hands a routed model (lab.training.loop.routing_inputs)
            inputs.update({LABEL_ROWS_KWARG: batch.label_rows(), ROUTE_TOKENS_KWARG: batch.prompt_tokens()})
            if batch.domains is not None:
                inputs[DOMAINS_KWARG] = batch.domains
        return inputs


class CausalLossMixin:
    """What turns a `transformers.Trainer` (or a subclass such as TRL's SFTTrainer) into one training
    CE + `cat_weight` x CAT + `xg_weight` x XG (docs/math.md §2, §3); see the module docstring. `cat_alpha` /
    `cat_kind` choose the CAT row loss, `cat_heads` whether it scores the head mean or every head alone,
    `cat_layers` which layers' attention it supervises (model layer indices, 0 the first; all by default),
    `xg_layers` the XG layers ("adapted" or "last"); routed adapters add `vq_weight` x VQ + `mi_weight` x MI
    (`mi_kind`) + `invariant_ce` x CE(invariant prompts alone) (docs/math.md §7). Without a `data_collator` a
    `CausalCollator` of `processing_class` is used. Put it first among the bases."""

    def __init__(self, *args, cat_weight: float = 1.0, cat_alpha: float = 2.0, cat_kind: str = "div",
                 cat_heads: str = "mean", cat_layers: Optional[Sequence[int]] = None, xg_weight: float = 0.0,
                 xg_layers: str = "adapted", vq_weight: float = 0.1, mi_weight: float = 0.01, mi_kind: str = "code",
                 invariant_ce: float = 0.0, max_length: Optional[int] = None, **kwargs):
        weights = {"cat_weight": cat_weight, "xg_weight": xg_weight, "vq_weight": vq_weight, "mi_weight": mi_weight,
                   "invariant_ce": invariant_ce}
        for name, value in weights.items():
            if not value >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value}")
        if cat_kind not in CAT_LOSS_KINDS:
            raise ValueError(f"cat_kind: expected one of {CAT_LOSS_KINDS}, got {cat_kind!r}")
        if cat_heads not in CAT_HEAD_REDUCTIONS:
            raise ValueError(f"cat_heads: expected one of {CAT_HEAD_REDUCTIONS}, got {cat_heads!r}")
        if mi_kind not in MI_KINDS:
            raise ValueError(f"mi_kind: expected one of {MI_KINDS}, got {mi_kind!r}")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            training_args.remove_unused_columns = False  # the collator needs input/target/important
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = CausalCollator(kwargs["processing_class"], max_length=max_length)
        super().__init__(*args, **kwargs)
        if not adapted_layers(self.model):
            raise ValueError("model: has no causalattn adapters; call causalattn.hf.add_adapters(model, ...) first")
        self.cat_layers = _checked_layers(cat_layers, len(attention_modules(self.model)))
        self.model_accepts_loss_kwargs = False  # each micro-batch's losses are means (module docstring)
        self.add_callback(SealCheckpoints())
        self.cat_weight, self.cat_alpha, self.cat_kind, self.cat_heads = cat_weight, cat_alpha, cat_kind, cat_heads
        self.xg_weight, self.xg_layers = xg_weight, xg_layers
        self.vq_weight, self.mi_weight, self.mi_kind, self.invariant_ce = vq_weight, mi_weight, mi_kind, invariant_ce
        self.routed = find_router(self.model) is not None
        if self.routed and isinstance(self.data_collator, CausalCollator):
            self.data_collator.routing = True
        self._term_sums: dict[str, Tensor] = {}
        self._term_count = 0

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args, **kwargs):
        """`Trainer.train`, resuming from a verified checkpoint (`resume_point`)."""
        return super().train(resume_point(self.args.output_dir, resume_from_checkpoint), *args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[Tensor] = None):
        inputs = dict(inputs)
        supervision = inputs.pop(SUPERVISION_KWARG, None)
        if isinstance(supervision, CausalMask):
            supervision = supervision.to(inputs["input_ids"].device)
        supervised = supervision is not None and self.cat_weight > 0 and bool(supervision.valid_rows().any())
        with collect(model) as stats:
            outputs = model(**inputs, **({SUPERVISION_KWARG: supervision} if supervised else {}))
        ce = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
        terms = {"ce": ce, "cat": torch.zeros_like(ce), "xg": torch.zeros_like(ce)}
        if supervised:
            terms["cat"] = stats.cat_loss(alpha=self.cat_alpha, kind=self.cat_kind, heads=self.cat_heads,
                                           layers=self.cat_layers)
        if self.xg_weight > 0 and stats.xg:
            terms["xg"] = stats.xg_loss(layers=self.xg_layers)
        loss = ce + self.cat_weight * terms["cat"] + self.xg_weight * terms["xg"]
        if self.routed:
            loss = loss + self._routed_terms(model, inputs, stats, terms)
        if model.training:
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0) + value.detach().float()
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def _routed_terms(self, model: nn.Module, inputs: dict, stats, terms: dict[str, Tensor]) -> Tensor:
        """VQ + MI (+ CE of the invariant prompts alone) as `causalattn train` adds them (lab.training.loop)."""
        if LABEL_ROWS_KWARG not in inputs:
            raise ValueError(f"routed adapters: the batch has no {LABEL_ROWS_KWARG} (the rows the MI term compares); "
                             "use CausalCollator(tokenizer, routing=True) or send them from your collator")
        terms["vq"] = stats.vq_loss()
        terms["mi"] = stats.mi_loss(kind=self.mi_kind)
        extra = self.vq_weight * terms["vq"] + self.mi_weight * terms["mi"]
        if self.invariant_ce:
            # the same batch with the domain prompts off, through the unwrapped module (a second forward of a
            # DDP wrapper would prepare its reducer twice), summed into the one backward
            plain = self.accelerator.unwrap_model(model)
            with invariant_only(plain):
                alone = plain(**inputs)
            extra = extra + self.invariant_ce * (alone["loss"] if isinstance(alone, Mapping) else alone[0])
        return extra

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Training logs gain the mean `ce`, `cat`, `xg` (and `vq`, `mi` when routed) since the last log,
        averaged over processes like the `loss` (their weighted sum; CAT's default "div" loss sits near -1
        by construction, so the total can be negative). Every process logs at the same steps."""
        if "loss" in logs and self._term_count:
            names = LOGGED_TERMS + (ROUTED_TERMS if self.routed else ())
            means = torch.stack([self._term_sums[name] for name in names]) / self._term_count
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(names, means.tolist()):
                logs[name] = round(value, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Checkpoints and `save_model` write the adapters (`causalattn.hf.save_adapters`), not the base;
        from `state_dict` when the Trainer gathered one (FSDP, ZeRO-3: the parameters are shards)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(self.accelerator.unwrap_model(self.model), output_dir, state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if not holds_adapters(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)


class SealCheckpoints(TrainerCallback):
    """Writes each Trainer checkpoint's manifest (`causalattn.checkpoint_files.seal`): `on_save` comes
    after every file of the checkpoint is written, so the manifest is the last file of it."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            seal(folder)
        return control


def _checked_layers(cat_layers: Optional[Sequence[int]], layers: int) -> Optional[tuple[int, ...]]:
    """`cat_layers` as a sorted tuple of distinct layer indices (None: every layer), or a ValueError naming
    what the model (with `layers` attention layers) has; the first training step would fail otherwise."""
    if cat_layers is None:
        return None
    chosen = tuple(cat_layers)
    if not chosen or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in chosen):
        raise ValueError(f"cat_layers: expected layer indices of the model's {layers} layers (0-{layers - 1}), "
                         f"got {list(chosen)}")
    return tuple(sorted(set(chosen)))


def resume_point(output_dir: str, resume_from_checkpoint: Union[str, bool, None]) -> Union[str, bool, None]:
    """What `Trainer.train` should resume from: for True, the newest `checkpoint-N` of `output_dir` that
    verifies (damaged ones are logged with their bad file; a ValueError when none verifies); a named
    checkpoint is verified when it has a manifest (folders saved before manifests load unverified)."""
    if resume_from_checkpoint is True:
        folders = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()
                   and p.name.rpartition("-")[2].isdigit()]
        if not folders:
            return True  # the Trainer's own error: no checkpoint at all
        folders.sort(key=lambda p: int(p.name.rpartition("-")[2]), reverse=True)
        chosen, problems = newest_intact(folders, logger.warning)
        if chosen is None:
            raise ValueError("resume_from_checkpoint: " + no_intact_message(Path(output_dir), problems))
        return str(chosen)
    if resume_from_checkpoint and is_sealed(resume_from_checkpoint):
        verify(resume_from_checkpoint)
    return resume_from_checkpoint


class CausalTrainer(CausalLossMixin, Trainer):
    """`transformers.Trainer` with CE + CAT + XG and adapter checkpoints (`CausalLossMixin`)."""
