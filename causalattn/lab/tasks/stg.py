"""The Spurious Token Game (CAT's benchmark), cancer-risk variant: a seeded generator.

Each example lists 8 `name: value` pairs in random order:
  causal      Smoking, Weight, Exercise            ~ U{1..10}
  spurious    Yellow fingers = floor(1.5 Smoking), Clothing size = Weight,
              Hormones = floor(0.5 Exercise)       (in the IID splits only)
  irrelevant  Certain gene, Room size              ~ U{1..10}
The label is "High Risk" when v = 1.2 Smoking + 0.7 Weight - Exercise > 7.2, else "Low Risk".
In the OOD split all 8 values are drawn independently, so the spurious features stop predicting
the label and only a model that reads the causes keeps its accuracy. Every example carries the
causal annotation {label: ["Smoking: s", "Weight: w", "Exercise: e"]}.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from causalattn.data.records import Example

CAUSAL = ("Smoking", "Weight", "Exercise")
SPURIOUS = ("Yellow fingers", "Clothing size", "Hormones")
IRRELEVANT = ("Certain gene", "Room size")
FEATURES = CAUSAL + SPURIOUS + IRRELEVANT
LABELS = ("High Risk", "Low Risk")
THRESHOLD = 7.2
QUESTION = "Is the cancer risk high or low?"


def check_generation(n: int, mode: str, modes: tuple[str, ...], agreement: float) -> None:
    """The shared argument checks of the generated tasks' `generate`: each bad value named."""
    if n < 0:
        raise ValueError(f"n: expected a non-negative number of examples, got {n}")
    if mode not in modes:
        raise ValueError(f"mode: expected one of {modes}, got {mode!r}")
    if not 0.5 <= agreement <= 1:
        raise ValueError(f"agreement: expected a probability in [0.5, 1], got {agreement}")


def risk_score(values: dict) -> float:
    return 1.2 * values["Smoking"] + 0.7 * values["Weight"] - values["Exercise"]


def label_of(values: dict) -> str:
    return LABELS[0] if risk_score(values) > THRESHOLD else LABELS[1]


def draw_values(rng: random.Random, ood: bool) -> dict:
    """The 8 feature values of one example; spurious ones follow the causes unless `ood`."""
    values = {name: rng.randint(1, 10) for name in CAUSAL + IRRELEVANT}
    if ood:
        values.update({name: rng.randint(1, 10) for name in SPURIOUS})
    else:
        values["Yellow fingers"] = math.floor(1.5 * values["Smoking"])
        values["Clothing size"] = values["Weight"]
        values["Hormones"] = math.floor(0.5 * values["Exercise"])
    return values


def make_example(values: dict, rng: random.Random) -> Example:
    order = list(FEATURES)
    rng.shuffle(order)
    record = ", ".join(f"{name}: {values[name]}" for name in order)
    label = label_of(values)
    causes = [f"{name}: {values[name]}" for name in CAUSAL]
    return Example(input=f"{record}. {QUESTION} Answer:", target=label, important={label: causes}, values=values)


def generate(n: int, *, seed: int, ood: bool = False) -> list[Example]:
    """`n` examples from a generator seeded with `seed` (IID, or OOD with independent features)."""
    if n < 0:
        raise ValueError(f"n: expected a non-negative number of examples, got {n}")
    rng = random.Random(seed)
    return [make_example(draw_values(rng, ood), rng) for _ in range(n)]


@dataclass(frozen=True)
class Splits:
    train: list
    iid_test: list
    ood_test: list


def make_splits(train: int = 2000, iid_test: int = 400, ood_test: int = 400, *, seed: int = 0) -> Splits:
    """Train and IID test from the spurious distribution, OOD test from the independent one; each
    split has its own derived seed so changing one size does not reshuffle the others."""
    return Splits(
        train=generate(train, seed=seed * 1000 + 1),
        iid_test=generate(iid_test, seed=seed * 1000 + 2),
        ood_test=generate(ood_test, seed=seed * 1000 + 3, ood=True),
    )


def record_fields(example: Example) -> list[str]:
    """The `name: value` pairs of an example's record, in the order they appear."""
    return example.input.split(". ")[0].split(", ")
