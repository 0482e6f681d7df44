"""The Spurious Token Game, shortcut variant (the default task): a cheap cue CE prefers over the causes.

Each example lists 6 fused `Name=value` words in random order, then the question:

    Gene=2 Exercise=4 Fingers=yellow Smoking=5 Room=1 Weight=3 . Is the cancer risk high or low? Answer:

  causes      Smoking, Weight, Exercise    ~ U{1..5}; the label is "High Risk" when
              Smoking + Weight - Exercise >= 4, else "Low Risk" (44 % High over the uniform draw)
  shortcut    Fingers=yellow | Fingers=clean, one binary word; in the training and IID splits it
              says "yellow" for High Risk with probability `agreement` (default 0.93), otherwise the
              other value. It is simpler than the causes (one word, two values, no arithmetic) and
              almost as predictive, so cross-entropy alone can get 93 % by reading it.
  irrelevant  Gene, Room                   ~ U{1..5}

Three test sets: "iid" (the training distribution), "flipped" (the cue always contradicts the label:
a shortcut model scores ~0 %, a causal one keeps its accuracy) and "independent" (the cue is a coin
flip). Every example carries the causal annotation {label: ["Smoking=s", "Weight=w", "Exercise=e"]}.

Each `Name=value` is one whitespace-delimited word, so the embedded tokenizer (which splits on spaces
only, see `causalattn.training.tiny`) gives it one token: a cause's name and value cannot be split
across positions, where a lower layer could route the cue through the name token.
"""
from __future__ import annotations

import random

from causalattn.data.stg import LABELS, QUESTION, Example

CAUSAL = ("Smoking", "Weight", "Exercise")
IRRELEVANT = ("Gene", "Room")
CUE = "Fingers"
CUE_VALUES = ("yellow", "clean")  # "yellow" goes with LABELS[0] ("High Risk") when the cue agrees
VALUES = range(1, 6)
THRESHOLD = 4
DEFAULT_AGREEMENT = 0.93
CUE_MODES = ("train", "flipped", "independent", "random")


def label_of(values: dict) -> str:
    score = values["Smoking"] + values["Weight"] - values["Exercise"]
    return LABELS[0] if score >= THRESHOLD else LABELS[1]


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


def make_example(rng: random.Random, mode: str, agreement: float) -> Example:
    values = {name: rng.choice(VALUES) for name in CAUSAL + IRRELEVANT}
    label = label_of(values)
    values[CUE] = cue_value(label, mode, agreement, rng)
    order = list(CAUSAL + IRRELEVANT + (CUE,))
    rng.shuffle(order)
    record = " ".join(f"{name}={values[name]}" for name in order)
    causes = [f"{name}={values[name]}" for name in CAUSAL]
    return Example(input=f"{record} . {QUESTION} Answer:", target=label, important={label: causes}, values=values)


def generate(n: int, *, seed: int, mode: str = "train", agreement: float = DEFAULT_AGREEMENT) -> list[Example]:
    """`n` examples from a generator seeded with `seed`; `mode` sets the shortcut (see CUE_MODES)."""
    if n < 0:
        raise ValueError(f"n: expected a non-negative number of examples, got {n}")
    if mode not in CUE_MODES:
        raise ValueError(f"mode: expected one of {CUE_MODES}, got {mode!r}")
    if not 0.5 <= agreement <= 1:
        raise ValueError(f"agreement: expected a probability in [0.5, 1], got {agreement}")
    rng = random.Random(seed)
    return [make_example(rng, mode, agreement) for _ in range(n)]


def make_splits(train: int = 4000, test: int = 400, *, seed: int = 0,
                agreement: float = DEFAULT_AGREEMENT) -> tuple[list[Example], dict[str, list[Example]]]:
    """The training set and the three test sets ("iid", "flipped", "independent"), each from its own
    derived seed so changing one size does not reshuffle the others."""
    train_set = generate(train, seed=seed * 1000 + 11, agreement=agreement)
    tests = {"iid": generate(test, seed=seed * 1000 + 12, agreement=agreement),
             "flipped": generate(test, seed=seed * 1000 + 13, mode="flipped"),
             "independent": generate(test, seed=seed * 1000 + 14, mode="independent")}
    return train_set, tests


def record_fields(example: Example) -> list[str]:
    """The `Name=value` words of an example's record, in the order they appear."""
    return example.input.split(" . ")[0].split(" ")
