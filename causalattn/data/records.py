"""The record type every data path shares: one example in CAT's JSONL shape.

Readers (`causalattn.data.jsonl`), collators (`causalattn.data.batches`), annotation checks and the
lab's task generators all produce or consume `Example`; it lives here so that the library never
depends on a task generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Example:
    """One record in CAT's JSONL shape: `input` (the prompt), `target` (the answer) and
    `important` ({effect text: [cause texts]}). The training text is input + separator + target
    (CAT's own files join with no separator: their inputs end in "Answer: ")."""

    input: str
    target: str
    important: dict = field(hash=False)
    values: dict = field(hash=False, compare=False, repr=False)
    separator: str = " "
    domain: Optional[int] = field(default=None, compare=False)  # which domain (dialect) it comes from, if known
