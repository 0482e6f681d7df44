"""CE + CAT + XG through TRL's `SFTTrainer` (the `trl` extra: `pip install "causalattn[trl]"`).

    from trl import SFTConfig
    from causalattn.hf.sft import CausalSFTTrainer
    trainer = CausalSFTTrainer(model=model, args=SFTConfig("out", bf16=True), train_dataset=dataset,
                               processing_class=tokenizer, cat_weight=1.0, xg_weight=1.0)

`dataset` holds CAT-format rows (a `datasets.Dataset` stores `important` as a JSON string: its
`{effect: [causes]}` keys differ from row to row, which Arrow columns cannot hold). SFTTrainer's own
dataset preparation (chat templates, tokenizing a text column) would replace those rows by token ids
without the annotations, so it is skipped (`dataset_kwargs={"skip_prepare_dataset": True}`) and the
`CausalCollator` tokenizes and builds the CausalMask instead; everything else is `CausalLossMixin`'s.
"""
from __future__ import annotations

from trl import SFTTrainer

from causalattn.hf.trainer import CausalLossMixin


class CausalSFTTrainer(CausalLossMixin, SFTTrainer):
    """TRL's SFTTrainer with CE + CAT + XG and adapter checkpoints (module docstring)."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is None:
            raise ValueError("args: expected a trl.SFTConfig (its dataset preparation has to be turned off)")
        config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
        super().__init__(*args, **kwargs)
