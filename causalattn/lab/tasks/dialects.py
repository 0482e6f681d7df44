"""Two dialects of one causal task, each with its own spurious cue: the routed-adapter (ICLM) demo task.

The same rule decides the label in both dialects; only the surface differs. Every field is one
space-delimited word (one token for the embedded tokenizer, see `causalattn.lab.training.tiny`):

  dialect 0   Gene=2 Smoking=4 Alcohol=6 Room=1 Height=5 Weight=3 Fingers=yellow . Is the cancer risk high or low? Answer: High Risk
  dialect 1   smokes:4 gene:2 drinks:6 tall:5 weighs:3 teeth:stained room:1 ; risk high or low ? Answer: High Risk

  causes      smoking, weight, alcohol ~ U{1..6}; a value reads "high" from 4 up, and the label is
              "High Risk" when at least two of the three read high (50 % of the uniform draw)
  cue         one binary word per dialect (Fingers=yellow|clean, teeth:stained|white) agreeing with the
              label on `agreement` of the training examples: a domain-specific shortcut
  irrelevant  gene, room, height ~ U{1..6}

Test sets (each half dialect 0, half dialect 1; `Example.domain` is the dialect of the record's fields):
  iid         the training distribution
  flipped     each dialect's cue always contradicts the label: a cue reader scores ~0, a cause reader
              keeps its accuracy
  recombined  one dialect's fields with the other dialect's question and cue, the cue a coin flip: the
              dialect a router reads from the surface is mixed, and only the causes predict

Every example carries the causal annotation {label: [the smoking, weight and alcohol words]}.
`base_text` is what a base model learns the format from: both dialects and their mixes, with a question
about the whole record ("overall") whose answer is whether most of its fields read high (the cue's
first value reads high), or the cancer question with a random answer: the base can read and weigh the
fields it attends to, but does not know which fields the cancer question is about.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from causalattn.data.records import Example
from causalattn.lab.tasks.stg import LABELS, check_generation


@dataclass(frozen=True)
class Dialect:
    """How one dialect writes the fields, the cue and the question."""

    names: dict  # field -> its word in this dialect
    joiner: str  # between a name and its value
    cue_name: str
    cue_values: tuple[str, str]  # the first goes with LABELS[0] ("High Risk") when the cue agrees
    question: str
    overall_question: str  # about every field of the record (base pre-training only)

    def word(self, field: str, value) -> str:
        return f"{self.names[field]}{self.joiner}{value}"

    def cue_word(self, value: str) -> str:
        return f"{self.cue_name}{self.joiner}{value}"


CAUSES = ("smoking", "weight", "alcohol")
FIELDS = CAUSES + ("gene", "room", "height")  # with the cue 7 fields: the overall majority never ties
DIALECTS = (
    Dialect({"smoking": "Smoking", "weight": "Weight", "alcohol": "Alcohol", "gene": "Gene", "room": "Room",
             "height": "Height"}, "=",
            "Fingers", ("yellow", "clean"), ". Is the cancer risk high or low? Answer:",
            ". Is the overall risk high or low? Answer:"),
    Dialect({"smoking": "smokes", "weight": "weighs", "alcohol": "drinks", "gene": "gene", "room": "room",
             "height": "tall"}, ":",
            "teeth", ("stained", "white"), "; risk high or low ? Answer:", "; overall high or low ? Answer:"),
)
VALUES = range(1, 7)
HIGH_FROM = 4  # 4, 5 and 6 of 1..6 read high: half the draws, so the label is balanced
DEFAULT_AGREEMENT = 0.93
CUE_MODES = ("train", "flipped", "random")


def majority_label(highs: list[bool]) -> str:
    """LABELS[0] ("High Risk") when most of `highs` are true, else LABELS[1]."""
    return LABELS[0] if 2 * sum(highs) > len(highs) else LABELS[1]


def label_of(values: dict) -> str:
    return majority_label([values[field] >= HIGH_FROM for field in CAUSES])


def _cue_value(label: str, dialect: Dialect, mode: str, agreement: float, rng: random.Random) -> str:
    agreeing = dialect.cue_values[LABELS.index(label)]
    other = dialect.cue_values[1 - LABELS.index(label)]
    if mode == "train":
        return agreeing if rng.random() < agreement else other
    if mode == "flipped":
        return other
    return rng.choice(dialect.cue_values)


def make_example(rng: random.Random, domain: int, *, mode: str = "train", agreement: float = DEFAULT_AGREEMENT,
                 surface: int | None = None) -> Example:
    """One record with its fields in dialect `domain`; the question and cue in dialect `surface`
    (default: the same dialect)."""
    body, outer = DIALECTS[domain], DIALECTS[domain if surface is None else surface]
    values = {field: rng.choice(VALUES) for field in FIELDS}
    label = label_of(values)
    words = [body.word(field, values[field]) for field in FIELDS]
    words.append(outer.cue_word(_cue_value(label, outer, mode, agreement, rng)))
    rng.shuffle(words)
    causes = [body.word(field, values[field]) for field in CAUSES]
    return Example(input=f"{' '.join(words)} {outer.question}", target=label, important={label: causes},
                   values=dict(values, dialect=domain), domain=domain)


def generate(n: int, *, seed: int, mode: str = "train", agreement: float = DEFAULT_AGREEMENT,
             recombined: bool = False) -> list[Example]:
    """`n` examples alternating dialects 0 and 1; `mode` sets the cue (see CUE_MODES); `recombined`
    writes the question and cue in the other dialect than the fields."""
    check_generation(n, mode, CUE_MODES, agreement)
    rng = random.Random(seed)
    return [make_example(rng, index % 2, mode=mode, agreement=agreement,
                         surface=(1 - index % 2) if recombined else None) for index in range(n)]


def make_splits(train: int = 4000, test: int = 400, *, seed: int = 0,
                agreement: float = DEFAULT_AGREEMENT) -> tuple[list[Example], dict[str, list[Example]]]:
    """The training set and the test sets "iid", "flipped" and "recombined", each from its own derived
    seed so changing one size does not reshuffle the others."""
    train_set = generate(train, seed=seed * 1000 + 21, agreement=agreement)
    tests = {"iid": generate(test, seed=seed * 1000 + 22, agreement=agreement),
             "flipped": generate(test, seed=seed * 1000 + 23, mode="flipped"),
             "recombined": generate(test, seed=seed * 1000 + 24, mode="random", recombined=True)}
    return train_set, tests


def base_text(rng: random.Random, cancer_share: float) -> str:
    """One text of a base model's pre-training: a record in either dialect or a mix, the cue a coin flip,
    asked the overall question (answer: whether most of the fields, cue included, read high) or, with
    probability `cancer_share`, the cancer question with a random answer (its format, not its rule)."""
    domain, surface = rng.randrange(2), rng.randrange(2)
    example = make_example(rng, domain, mode="random", surface=surface)
    outer = DIALECTS[surface]
    if rng.random() < cancer_share:
        return f"{example.input} {rng.choice(LABELS)}"
    cue = next(word for word in record_fields(example) if word.startswith(outer.cue_name + outer.joiner))
    highs = [example.values[field] >= HIGH_FROM for field in FIELDS] + [cue == outer.cue_word(outer.cue_values[0])]
    record = example.input[: -len(outer.question)]
    return f"{record}{outer.overall_question} {majority_label(highs)}"


def record_fields(example: Example) -> list[str]:
    """The field and cue words of an example's record, in the order they appear."""
    return example.input.split(" ")[: len(FIELDS) + 1]
