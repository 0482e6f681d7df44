"""From CAT-style annotations to a `CausalMask`: find each effect and cause phrase among a tokenizer's
tokens (by character offsets) and mark every (effect row, cause key) pair (docs/math.md §2).

    encoding, mask = encode_with_causes(tokenizer, texts, [{"High Risk": ["Smoking=5"]}, ...])
"""
from __future__ import annotations

from typing import Mapping, Sequence

from causalattn.masks import CausalMask, Span


def find_token_spans(phrase: str, text: str, offsets: Sequence[tuple[int, int]]) -> list[Span]:
    """Token spans covering every occurrence of `phrase` in `text`, from a tokenizer's char offsets.

    A token belongs to the span if its character range overlaps the occurrence; special and padding
    tokens (empty offsets) never do. A leading space folded into a token is therefore harmless.
    """
    spans = []
    start = text.find(phrase)
    while start >= 0 and phrase:
        end = start + len(phrase)
        tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if tokens:
            spans.append((tokens[0], tokens[-1] + 1))
        start = text.find(phrase, start + 1)
    return spans


def _find_id_spans(phrase: str, ids: Sequence[int], tokenizer) -> list[Span]:
    """Fallback without offsets: search the phrase's token ids, with and without a leading space."""
    spans = []
    for variant in (phrase, " " + phrase):
        pattern = tokenizer(variant, add_special_tokens=False)["input_ids"]
        width = len(pattern)
        spans += [(i, i + width) for i in range(len(ids) - width + 1) if width and list(ids[i : i + width]) == pattern]
    return sorted(set(spans))


def _check_annotation(annotation: object, b: int) -> None:
    """`{effect: [cause, ...]}` with str phrases; a bare str as the causes would be read char by char."""
    if not isinstance(annotation, Mapping):
        raise TypeError(f"annotations[{b}]: expected a mapping {{effect: [cause, ...]}}, got {type(annotation).__name__}")
    for effect, causes in annotation.items():
        if not isinstance(effect, str):
            raise TypeError(f"annotations[{b}]: expected str effects, got {effect!r}")
        if isinstance(causes, (str, bytes)) or not isinstance(causes, Sequence) \
                or not all(isinstance(c, str) for c in causes):
            raise TypeError(f"annotations[{b}][{effect!r}]: expected a list of cause phrases (str), got {causes!r}")


def encode_with_causes(
    tokenizer,
    texts: Sequence[str],
    annotations: Sequence[Mapping[str, Sequence[str]]],
    **tokenizer_kwargs,
):
    """Tokenize `texts` and build the CausalMask of CAT-style annotations `{effect: [cause, ...]}`.

    Every occurrence of an effect is paired with every occurrence of each of its causes that ends
    before it (docs/math.md §2). Returns `(encoding, mask)`; `encoding` is the tokenizer's BatchEncoding
    (tensors, padded as the tokenizer is configured; it keeps `offset_mapping` when the caller passes
    `return_offsets_mapping=True`). A phrase that cannot be found, or an effect with no cause before it,
    raises a ValueError naming the example.
    """
    if len(texts) != len(annotations):
        raise ValueError(f"annotations: expected one mapping per text ({len(texts)}), got {len(annotations)}")
    kwargs = dict(padding=True, return_tensors="pt")
    kwargs.update(tokenizer_kwargs)
    keep_offsets = kwargs.pop("return_offsets_mapping", False)
    use_offsets = getattr(tokenizer, "is_fast", False)
    encoding = tokenizer(list(texts), return_offsets_mapping=use_offsets, **kwargs)
    offsets = encoding["offset_mapping"] if keep_offsets else encoding.pop("offset_mapping", None)
    ids = encoding["input_ids"]
    seq_len = ids.shape[1]

    def spans_of(phrase: str, b: int) -> list[Span]:
        if offsets is not None:
            return find_token_spans(phrase, texts[b], offsets[b].tolist())
        return _find_id_spans(phrase, ids[b].tolist(), tokenizer)

    all_pairs = []
    for b, annotation in enumerate(annotations):
        _check_annotation(annotation, b)
        pairs = []
        for effect, causes in annotation.items():
            effect_spans = spans_of(effect, b)
            if not effect_spans:
                raise ValueError(f"annotations[{b}]: effect {effect!r} not found in the tokenized text")
            cause_spans = []
            for cause in causes:
                found = spans_of(cause, b)
                if not found:
                    raise ValueError(f"annotations[{b}]: cause {cause!r} of {effect!r} not found in the tokenized text")
                cause_spans.append(found)
            for e in effect_spans:
                before = [c for spans in cause_spans for c in spans if c[1] < e[0]]
                if before and e[0] >= 1:
                    pairs.append((e, before))
            if not any(p[0] in effect_spans for p in pairs):
                raise ValueError(f"annotations[{b}]: no cause of effect {effect!r} occurs before it")
        all_pairs.append(pairs)
    key_mask = encoding["attention_mask"].bool() if "attention_mask" in encoding else None
    return encoding, CausalMask.from_spans(all_pairs, seq_len, key_mask)
