"""CE + CAT + XG through the Hugging Face `Trainer`: a data collator and a `Trainer` subclass.

    from causalattn.hf import CausalCollator, CausalTrainer
    trainer = CausalTrainer(model=model, args=TrainingArguments("out", bf16=True), train_dataset=records,
                            processing_class=tokenizer, cat_weight=1.0, xg_weight=1.0)
    trainer.train()                   # logs loss, ce, cat, xg; checkpoints hold the adapters only

`records` are CAT-format rows (`input`, `target`, optional `important`, which a `datasets.Dataset`
may hold as a JSON string); the model has causalattn adapters (`causalattn.hf.add_adapters`).
What the plain `Trainer` gets wrong for this, and what the subclass does instead:

* the forward must run inside `causalattn.hf.collect` for the CAT/XG statistics to exist, so
  `compute_loss_func` cannot add them: `compute_loss` is overridden;
* `remove_unused_columns=True` (the default) would drop `input`/`target`/`important` before the
  collator sees them: it is turned off;
* `_prepare_inputs` moves tensors but not a `CausalMask`: it is moved to the batch's device here;
* `save_pretrained` would write the whole frozen base (2.6 MB for the test model, gigabytes for a
  real one) and no adapters: checkpoints and `save_model` write the adapters (`save_adapters`), and
  `resume_from_checkpoint` loads them back.

CE is the model's mean over the micro-batch's answer tokens and CAT/XG are means over it too, so
each micro-batch counts the same under gradient accumulation (`model_accepts_loss_kwargs` off, the
Trainer divides by the accumulation steps), as in `causalattn train`. `CausalLossMixin` holds all
of it, so other Trainer subclasses get the same (`causalattn.hf.sft.CausalSFTTrainer` for TRL).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import Trainer

from causalattn.data.annotations import check_annotations
from causalattn.data.batches import collate
from causalattn.data.jsonl import DataFile, parse_record
from causalattn.data.records import Example
from causalattn.hf.adapter import adapted_layers
from causalattn.hf.contract import SUPERVISION_KWARG
from causalattn.hf.io import CONFIG_NAME, WEIGHTS_NAME, load_adapters, save_adapters
from causalattn.hf.stats import collect
from causalattn.losses import CAT_LOSS_KINDS
from causalattn.masks import CausalMask

LOGGED_TERMS = ("ce", "cat", "xg")


def example_of(feature: Any, where: str = "features") -> Example:
    """An `Example` from an Example or a CAT-format mapping (`important` may be a JSON string)."""
    if isinstance(feature, Example):
        return feature
    if not isinstance(feature, Mapping):
        raise TypeError(f"{where}: expected a causalattn Example or a mapping with input/target/important, "
                        f"got {type(feature).__name__}")
    record = dict(feature)
    if isinstance(record.get("important"), str):
        record["important"] = json.loads(record["important"])
    return parse_record(record, where, strict=False)[0]


class CausalCollator:
    """CAT-format rows -> `{input_ids, attention_mask, labels, supervision}` for the model's forward.

    Labels cover the answer tokens only; `supervision` is the batch's CausalMask. A tokenizer without a
    pad token gets its EOS token as one (an error when it has neither). Annotated pairs that
    cannot supervise (text absent, cause not before effect) are skipped and counted in `self.skipped`,
    as `causalattn train` does; `strict=True` raises instead.
    """

    def __init__(self, tokenizer, *, max_length: Optional[int] = None, strict: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("tokenizer: expected a fast (Rust-backed) tokenizer, which reports character offsets")
        if tokenizer.pad_token is None:
            # LLaMA-family tokenizers often ship without one; padded positions are masked out and never
            # labelled, so EOS serves. Found here, at construction, not at the first batch.
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer: has neither a pad token nor an EOS token to pad with; set "
                                 "tokenizer.pad_token before building the collator")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.strict = strict
        self.skipped = 0

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        examples = [example_of(f, f"features[{i}]") for i, f in enumerate(features)]
        checked, report = check_annotations(DataFile("batch", examples, list(range(len(examples)))),
                                            self.tokenizer, strict=self.strict)
        self.skipped += report.skipped
        batch = collate(checked.examples, self.tokenizer, max_length=self.max_length)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                SUPERVISION_KWARG: batch.causal_mask}


class CausalLossMixin:
    """What turns a `transformers.Trainer` (or a subclass such as TRL's SFTTrainer) into one training
    CE + `cat_weight` x CAT + `xg_weight` x XG (SPEC §2, §3); see the module docstring. `cat_alpha` /
    `cat_kind` choose the CAT row loss, `xg_layers` the XG layers ("adapted" or "last"). Without a
    `data_collator` a `CausalCollator` of `processing_class` is used. Put it first among the bases."""

    def __init__(self, *args, cat_weight: float = 1.0, cat_alpha: float = 2.0, cat_kind: str = "div",
                 xg_weight: float = 0.0, xg_layers: str = "adapted", max_length: Optional[int] = None, **kwargs):
        for name, value in {"cat_weight": cat_weight, "xg_weight": xg_weight}.items():
            if not value >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value}")
        if cat_kind not in CAT_LOSS_KINDS:
            raise ValueError(f"cat_kind: expected one of {CAT_LOSS_KINDS}, got {cat_kind!r}")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            training_args.remove_unused_columns = False  # the collator needs input/target/important
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = CausalCollator(kwargs["processing_class"], max_length=max_length)
        super().__init__(*args, **kwargs)
        if not adapted_layers(self.model):
            raise ValueError("model: has no causalattn adapters; call causalattn.hf.add_adapters(model, ...) first")
        self.model_accepts_loss_kwargs = False  # each micro-batch's losses are means (module docstring)
        self.cat_weight, self.cat_alpha, self.cat_kind = cat_weight, cat_alpha, cat_kind
        self.xg_weight, self.xg_layers = xg_weight, xg_layers
        self._term_sums: dict[str, Tensor] = {}
        self._term_count = 0

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
            terms["cat"] = stats.cat_loss(alpha=self.cat_alpha, kind=self.cat_kind)
        if self.xg_weight > 0 and stats.xg:
            terms["xg"] = stats.xg_loss(layers=self.xg_layers)
        loss = ce + self.cat_weight * terms["cat"] + self.xg_weight * terms["xg"]
        if model.training:
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0) + value.detach().float()
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Training logs gain the mean `ce`, `cat` and `xg` since the last log (the `loss` is their
        weighted sum; CAT's default "div" loss sits near -1 by construction, so the total can be negative)."""
        if "loss" in logs and self._term_count:
            for name in LOGGED_TERMS:
                logs[name] = round(float(self._term_sums[name]) / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Checkpoints and `save_model` write the adapters (`causalattn.hf.save_adapters`), not the base."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        has_adapters = all(os.path.isfile(os.path.join(resume_from_checkpoint, name))
                           for name in (CONFIG_NAME, WEIGHTS_NAME))
        if not has_adapters:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)


class CausalTrainer(CausalLossMixin, Trainer):
    """`transformers.Trainer` with CE + CAT + XG and adapter checkpoints (`CausalLossMixin`)."""
