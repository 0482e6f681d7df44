"""Token batches for causal adapter training: ids, padding mask, answer-only labels and the CausalMask.

Shapes
------
input_ids, attention_mask, labels   (B, N) int64; labels are -100 except on the answer tokens
causal_mask                         CausalMask over (B, N, N): rows predicting the answer attend to
                                    the annotated causes (docs/math.md §2)
domains                             (B,) int64 `Example.domain` of each example, None unless all have one
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from causalattn.data.records import Example
from causalattn.masks import CausalMask
from causalattn.spans import encode_with_causes

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    causal_mask: CausalMask
    domains: Optional[Tensor] = None

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.causal_mask.to(device), self.domains.to(device) if self.domains is not None else None)

    def label_rows(self) -> Tensor:
        """(B,) the row predicting each example's first answer token (row t predicts token t + 1): where
        the ICLM MI term compares the invariant and domain read-outs."""
        answer = self.labels != IGNORE_INDEX
        if not bool(answer.any(dim=1).all()):
            raise ValueError("labels: every example needs an answer token to have a label row")
        return answer.int().argmax(dim=1) - 1

    def prompt_tokens(self) -> Tensor:
        """(B, N) bool, the real tokens before the answer: what a router may read without seeing the label."""
        return self.attention_mask.bool() & (self.labels == IGNORE_INDEX)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def full_text(example: Example) -> str:
    """The training text: the prompt, the example's separator (a space, or nothing in CAT's files), the answer."""
    return f"{example.input}{example.separator}{example.target}"


def check_max_length(max_length: Optional[int]) -> None:
    """None (no limit) or a positive int: 0 would read as "no limit" in a truth test, which nobody means."""
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError(f"max_length: expected a positive int or None (no limit), got {max_length!r}")


def collate(examples: Sequence[Example], tokenizer, *, max_length: Optional[int] = None) -> Batch:
    """Tokenize a list of examples into a padded Batch (padding side as the tokenizer is configured).

    Labels cover exactly the answer tokens (found by character offsets), so the loss is on the answer
    only; an example longer than `max_length` raises a ValueError rather than losing its answer.
    """
    if not examples:
        raise ValueError("examples: expected at least one example, got none")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer: expected a fast (Rust-backed) tokenizer, which reports character offsets")
    check_max_length(max_length)
    texts = [full_text(e) for e in examples]
    extra = {}
    if max_length is not None:
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        too_long = [row for row, n in enumerate(lengths) if n > max_length]
        if too_long:
            raise ValueError(f"examples[{too_long[0]}]: {lengths[too_long[0]]} tokens do not fit in max_length={max_length} "
                             "(the answer would be cut)")
        extra = dict(truncation=True, max_length=max_length)
    encoding, mask = encode_with_causes(tokenizer, texts, [e.important for e in examples],
                                        return_offsets_mapping=True, **extra)
    offsets = encoding.pop("offset_mapping")
    starts, ends = offsets[..., 0], offsets[..., 1]
    # A token is part of the answer when it covers one of the answer's characters; a lone space
    # token before the answer is not.
    answer_first_char = torch.tensor([len(e.input) + len(e.separator) for e in examples])[:, None]
    is_answer = (ends > answer_first_char) & (ends > starts)
    labels = torch.where(is_answer, encoding["input_ids"], torch.full_like(encoding["input_ids"], IGNORE_INDEX))
    domains = [e.domain for e in examples]
    known = torch.tensor(domains, dtype=torch.long) if all(d is not None for d in domains) else None
    return Batch(encoding["input_ids"], encoding["attention_mask"], labels, mask, known)
