"""Which annotated (effect, cause) pairs can supervise attention, decided on the tokens, before training.

An annotation `{effect: [cause, ...]}` supervises the rows predicting the effect's tokens only when
one occurrence of the cause ends before one occurrence of the effect starts, with at least one token
between (docs/math.md §2; CAT's own mask builder applies the same rule). CAT's published files name many
pairs that fail it (MAWPS, SVAMP and ARC-E annotate words after their "effect", or text that is not in
the example): CAT's loader skips those pairs silently. `check_annotations` does the same and counts
them (`AnnotationReport.summary()`), or, with `strict=True`, raises the first as a file:line error.

Every example stays in the data: one whose pairs are all skipped still trains the CE loss, exactly as
in CAT. What comes out is the same examples with each `important` cut to the pairs that hold, so that
the batch builders (`causalattn.data.batches.collate`, `causalattn.spans.encode_with_causes`) never
meet a pair they would reject.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence
from causalattn.data.batches import full_text
from causalattn.data.jsonl import DataFile
from causalattn.data.records import Example
from causalattn.spans import find_token_spans

# Texts tokenized per call when finding spans: big enough for the tokenizer's batching to pay off.
_CHUNK = 512


@dataclass
class AnnotationReport:
    """Counts of one file's annotations after `check_annotations`."""

    path: str
    examples: int = 0
    annotated: int = 0        # examples with at least one annotated pair
    supervised: int = 0       # examples keeping at least one pair
    complete: int = 0         # examples keeping a cause for every annotated effect (what strict accepts)
    pairs: int = 0            # annotated (effect, cause) pairs, malformed entries included
    kept: int = 0
    not_found: int = 0        # effect or cause text absent from input + target
    not_before: int = 0       # no occurrence of the cause ends before an occurrence of the effect
    malformed: int = 0        # entries naming no cause text (dropped when the file was read)

    @property
    def skipped(self) -> int:
        return self.not_found + self.not_before + self.malformed

    def summary(self) -> str:
        """One line: how many examples are supervised and why pairs were skipped."""
        line = (f"{self.path}: {self.examples:,} examples, {self.supervised:,} with CAT supervision "
                f"({self.annotated:,} annotated, {self.complete:,} with every effect supervised); {self.pairs:,} (effect, cause) pairs: {self.kept:,} used")
        if self.skipped:
            reasons = [(self.not_before, "cause not before effect"), (self.not_found, "text not found"),
                       (self.malformed, "malformed")]
            line += ", skipped " + ", ".join(f"{count:,} {why}" for count, why in reasons if count)
        return line

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _usable(effect_spans: list, cause_spans: list) -> bool:
    # the row predicting an effect token is e0 - 1, so an effect at position 0 has none
    return any(c1 < e0 and e0 >= 1 for (_, c1) in cause_spans for (e0, _) in effect_spans)


def check_annotations(data: DataFile, tokenizer, *, strict: bool = False) -> tuple[DataFile, AnnotationReport]:
    """`data` with every `important` cut to the pairs that supervise something under `tokenizer`, and the
    counts. `strict=True` raises a ValueError `file:line: ...` at the first pair that would be skipped."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer: expected a fast (Rust-backed) tokenizer, which reports character offsets")
    report = AnnotationReport(data.path, examples=len(data.examples), malformed=data.malformed_pairs,
                              pairs=data.malformed_pairs)
    kept_examples: list[Example] = []
    for start in range(0, len(data.examples), _CHUNK):
        chunk = data.examples[start:start + _CHUNK]
        texts = [full_text(example) for example in chunk]
        annotated = [i for i, example in enumerate(chunk) if example.important]
        offsets = {}
        if annotated:
            encoded = tokenizer([texts[i] for i in annotated], return_offsets_mapping=True)["offset_mapping"]
            offsets = dict(zip(annotated, encoded))
        for i, example in enumerate(chunk):
            if i not in offsets:
                kept_examples.append(example)
                continue
            kept = _kept_pairs(example, texts[i], offsets[i], report, data.where(start + i), strict)
            report.annotated += 1
            report.supervised += bool(kept)
            report.complete += len(kept) == len(example.important)
            kept_examples.append(dataclasses.replace(example, important=kept))
    return dataclasses.replace(data, examples=kept_examples), report


def _kept_pairs(example: Example, text: str, offsets: Sequence[tuple[int, int]], report: AnnotationReport, where: str, strict: bool) -> dict:
    kept: dict[str, list[str]] = {}
    for effect, causes in example.important.items():
        effect_spans = find_token_spans(effect, text, offsets)
        for cause in causes:
            report.pairs += 1
            cause_spans = find_token_spans(cause, text, offsets) if effect_spans else []
            if not effect_spans or not cause_spans:
                if strict:
                    missing = effect if not effect_spans else cause
                    raise ValueError(f"{where}: annotated text {missing!r} does not occur in input + target")
                report.not_found += 1
            elif not _usable(effect_spans, cause_spans):
                if strict:
                    raise ValueError(f"{where}: cause {cause!r} of effect {effect!r} does not end before it "
                                     "(with a token between, docs/math.md §2)")
                report.not_before += 1
            else:
                report.kept += 1
                kept.setdefault(effect, []).append(cause)
    return kept
