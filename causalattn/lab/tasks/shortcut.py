"""The Spurious Token Game, shortcut variant (the default task): a cheap cue CE prefers over the causes.

Each example lists 7 fused `Name=value` words in random order, then the question:

    Gene=2 Alcohol=4 Fingers=yellow Smoking=5 Room=1 Height=6 Weight=3 . Is the cancer risk high or low? Answer:

  causes      Smoking, Weight, Alcohol ~ U{1..6}; a value reads "high" from 4 up (half the draws) and
              the label is "High Risk" when at least two of the three read high (50 % High)
  shortcut    Fingers=yellow | Fingers=clean, one binary word; in the training and IID splits it
              says "yellow" for High Risk with probability `agreement` (default 0.93), otherwise the
              other value. One word against three, and it agrees with the label on 93 % of examples
              where each cause alone agrees on 75 %, so cross-entropy alone is drawn to the cue.
  irrelevant  Gene, Room, Height       ~ U{1..6}

Three test sets: "iid" (the training distribution), "flipped" (the cue always contradicts the label:
a shortcut model scores ~0 %, a causal one keeps its accuracy) and "independent" (the cue is a coin
flip). Every example carries the causal annotation {label: ["Smoking=s", "Weight=w", "Alcohol=a"]}, and
with `cat_rows="question"` (the default job's) the question as one more effect of the same causes, so the
rows between the record and the answer are supervised too.

The tiny base model learns this format from `base_text`: the same records, mostly with the question
"Is the overall risk high or low?", the rest with the cancer question, both answered by the majority of
all 7 fields (the cue's "yellow" reads high). So the base has one read-out (attend to the fields, add up
how high they read), as a pretrained LLM can read a record, and no reason to prefer any field: which
fields the cancer question is about is left to the adapters, and that is what CE and CAT disagree on.
(An earlier base answered the cancer question at random; whether it then shared the overall read-out
with the cancer question differed from one base build to the next, and so did the CAT gain. A base
asked about *named* fields, "Is the Smoking risk high or low?", would be closer to an LLM, but the tiny
one did not learn to match a name to its field in 3,000 steps.)

Each `Name=value` is one whitespace-delimited word, so the embedded tokenizer (which splits on spaces
only, see `causalattn.lab.training.tiny`) gives it one token: a cause's name and value cannot be split
across positions, where a lower layer could route the cue through the name token.
"""
from __future__ import annotations

import dataclasses
import random

from causalattn.data.records import Example
from causalattn.lab.tasks.stg import LABELS, QUESTION, check_generation

CAUSAL = ("Smoking", "Weight", "Alcohol")
IRRELEVANT = ("Gene", "Room", "Height")
CUE = "Fingers"
CUE_VALUES = ("yellow", "clean")  # "yellow" reads high: it goes with LABELS[0] ("High Risk") when the cue agrees
FIELDS = CAUSAL + IRRELEVANT + (CUE,)
VALUES = range(1, 7)
HIGH_FROM = 4  # 4, 5 and 6 of 1..6 read high: half the draws, so both majorities are balanced
DEFAULT_AGREEMENT = 0.93
OVERALL_QUESTION = "Is the overall risk high or low?"
CUE_MODES = ("train", "flipped", "independent", "random")
CANCER_ANSWERS = ("overall", "random")  # how the base's texts answer the cancer question (see base_text)
# Which rows CAT supervises: the rows predicting the answer ("answer"), or also the question's rows
# after the record ("question"), so no row between the record and the answer reads the cue unsupervised
CAT_ROWS = ("answer", "question")
# Where the cue sits in the record: anywhere ("random"), or after the other fields ("last"), where no
# record token can read it and only the rows after the record can
CUE_POSITIONS = ("random", "last")


def reads_high(value) -> bool:
    """Whether one field's value reads "high": a number from HIGH_FROM up, or the cue's "yellow"."""
    return value == CUE_VALUES[0] if isinstance(value, str) else value >= HIGH_FROM


def majority_label(values: list) -> str:
    """LABELS[0] ("High Risk") when most of `values` read high, else LABELS[1]."""
    return LABELS[0] if 2 * sum(map(reads_high, values)) > len(values) else LABELS[1]


def label_of(values: dict) -> str:
    return majority_label([values[name] for name in CAUSAL])


def cue_value(label: str, mode: str, agreement: float, rng: random.Random) -> str:
    """The shortcut word's value: agreeing with the label with probability `agreement` ("train"),
    always contradicting it ("flipped") or independent of it ("independent" / "random")."""
    agreeing = CUE_VALUES[LABELS.index(label)]
    other = CUE_VALUES[1 - LABELS.index(label)]
    if mode == "train":
        return agreeing if rng.random() < agreement else other
    if mode == "flipped":
        return other
    return rng.choice(CUE_VALUES)


def draw_record(rng: random.Random, mode: str, agreement: float, cue_position: str = "random") -> tuple[dict, str]:
    """One record's values (cue set by `mode`) and the words of its text in a random order (with
    `cue_position` "last", the other fields in a random order and the cue after them)."""
    cue_last = cue_position == "last"
    values = {name: rng.choice(VALUES) for name in CAUSAL + IRRELEVANT}
    values[CUE] = cue_value(label_of(values), mode, agreement, rng)
    order = list(FIELDS[:-1] if cue_last else FIELDS)
    rng.shuffle(order)
    return values, " ".join(f"{name}={values[name]}" for name in order + ([CUE] if cue_last else []))


def make_example(rng: random.Random, mode: str, agreement: float, cat_rows: str = "answer",
                 cue_position: str = "random") -> Example:
    values, record = draw_record(rng, mode, agreement, cue_position)
    label = label_of(values)
    causes = [f"{name}={values[name]}" for name in CAUSAL]
    # the question as one more effect: the rows predicting its tokens are the "." row and the question's
    important = {f"{QUESTION} Answer:": causes, label: causes} if cat_rows == "question" else {label: causes}
    return Example(input=f"{record} . {QUESTION} Answer:", target=label, important=important, values=values)


def base_text(rng: random.Random, cancer_share: float, cancer_answer: str) -> str:
    """One text of the base model's pre-training: a record with the cue independent of everything and
    the overall question (the answer: whether most of the 7 fields read high), or, with probability
    `cancer_share`, the cancer question, answered the same way (`cancer_answer` "overall", the default
    base: one read-out for both questions) or at random ("random": its format, not its rule)."""
    if cancer_answer not in CANCER_ANSWERS:
        raise ValueError(f"cancer_answer: expected one of {CANCER_ANSWERS}, got {cancer_answer!r}")
    values, record = draw_record(rng, "random", 0.5)
    overall = majority_label(list(values.values()))
    if rng.random() < cancer_share:
        return f"{record} . {QUESTION} Answer: {overall if cancer_answer == 'overall' else rng.choice(LABELS)}"
    return f"{record} . {OVERALL_QUESTION} Answer: {overall}"


def overall_examples(n: int, *, seed: int) -> list[Example]:
    """`n` records (every field independent) with the base's own question, "Is the overall risk high or
    low?", and its answer: what the tiny base must read right before the adapters can redirect it."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        values, record = draw_record(rng, "random", 0.5)
        examples.append(Example(input=f"{record} . {OVERALL_QUESTION} Answer:",
                                target=majority_label(list(values.values())), important={}, values=values))
    return examples


def generate(n: int, *, seed: int, mode: str = "train", agreement: float = DEFAULT_AGREEMENT,
             cat_rows: str = "answer", cue_position: str = "random") -> list[Example]:
    """`n` examples from a generator seeded with `seed`; `mode` sets the shortcut (see CUE_MODES),
    `cat_rows` the rows their annotation supervises (CAT_ROWS), `cue_position` where the cue sits
    (CUE_POSITIONS)."""
    check_generation(n, mode, CUE_MODES, agreement)
    for name, value, allowed in (("cat_rows", cat_rows, CAT_ROWS), ("cue_position", cue_position, CUE_POSITIONS)):
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    rng = random.Random(seed)
    return [make_example(rng, mode, agreement, cat_rows, cue_position) for _ in range(n)]


def make_splits(train: int = 4000, test: int = 400, *, seed: int = 0, agreement: float = DEFAULT_AGREEMENT,
                cat_rows: str = "answer", cue_position: str = "random",
                ) -> tuple[list[Example], dict[str, list[Example]]]:
    """The training set and the three test sets ("iid", "flipped", "independent"), each from its own
    derived seed so changing one size does not reshuffle the others."""
    train_set = generate(train, seed=seed * 1000 + 11, agreement=agreement, cat_rows=cat_rows, cue_position=cue_position)
    tests = {"iid": generate(test, seed=seed * 1000 + 12, agreement=agreement, cue_position=cue_position),
             "flipped": generate(test, seed=seed * 1000 + 13, mode="flipped", cue_position=cue_position),
             "independent": generate(test, seed=seed * 1000 + 14, mode="independent", cue_position=cue_position)}
    return train_set, tests


# Probes of where a model's answer comes from, applied to a test example: "without-cue" drops the cue word
# (what the model reads from the other fields alone: the most a run could score on flipped if it ignored
# the cue), "cue-agrees" sets it to agree with the label (how far the model follows a right cue)
CUE_PROBES = ("without-cue", "cue-agrees")


def probe_cue(example: Example, probe: str) -> Example:
    """`example` with its cue word dropped or made to agree with its label (see CUE_PROBES)."""
    if probe not in CUE_PROBES:
        raise ValueError(f"probe: expected one of {CUE_PROBES}, got {probe!r}")
    record, sep, question = example.input.partition(" . ")
    fields = record.split(" ")
    cue = [i for i, word in enumerate(fields) if word.startswith(f"{CUE}=")]
    if len(cue) != 1 or not sep:
        raise ValueError(f"example: expected a shortcut record with one {CUE}= word, got {example.input!r}")
    if probe == "without-cue":
        del fields[cue[0]]
    else:
        fields[cue[0]] = f"{CUE}={CUE_VALUES[LABELS.index(example.target)]}"
    return dataclasses.replace(example, input=" ".join(fields) + sep + question)


def record_fields(example: Example) -> list[str]:
    """The `Name=value` words of an example's record, in the order they appear."""
    return example.input.split(" . ")[0].split(" ")
