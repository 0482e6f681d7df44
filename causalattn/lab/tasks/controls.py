"""The random-cause control: the same examples with each annotation's causes replaced by random fields.

A CAT run trained on these tells whether a gain comes from supervising attention onto the *right*
tokens or from supervising attention at all (an extra loss, another optimisation path). Following
the random-target control of attention-supervision studies (Shrestha et al. 2020), every effect
keeps its number of causes, drawn without replacement among the example's record fields (so the
cue, or a true cause, is drawn as often as any other field), once per example with a seeded
generator: the control supervision is fixed for the whole run, like the real one.

For CAT-format JSONL files the fields are read off the text (`text_fields`): the "Name: value" items
of the input, which is how CAT's STG and STG_H files list a record.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Sequence

from causalattn.data.records import Example


def with_random_causes(examples: Sequence[Example], fields_of: Callable[[Example], list[str]], *,
                       seed: int) -> list[Example]:
    """Copies of `examples` whose causes are as many random fields (`fields_of(example)`) as before."""
    rng = random.Random(seed)
    out = []
    for example in examples:
        fields = fields_of(example)
        drawn: dict[tuple, list[str]] = {}  # effects sharing their causes share the random ones too
        important = {}
        for effect, causes in example.important.items():
            if tuple(causes) not in drawn:
                drawn[tuple(causes)] = rng.sample(fields, min(len(causes), len(fields)))
            important[effect] = drawn[tuple(causes)]
        out.append(dataclasses.replace(example, important=important))
    return out


# "Smoking: 8", "Yellow fingers: 12", "Coal Dependency: 41.9%": a name of words, a colon, a number
_TEXT_FIELD = re.compile(r"[A-Za-z][A-Za-z ]*: -?\d+(?:\.\d+)?%?")


def text_fields(example: Example) -> list[str]:
    """The "Name: value" fields of `example.input`, in order (CAT's STG files list records this way)."""
    return [match.group(0).strip() for match in _TEXT_FIELD.finditer(example.input)]
