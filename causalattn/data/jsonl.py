"""Reading CAT's JSONL files as published: one JSON object per line with `input`, `target` and,
in training files, `important`.

What the official files (CAT's STG, STG_H, MAWPS, SVAMP, ARC-E, ...) contain, and how it is read:

* `input` ends in "Answer: " (or, in MAWPS, the target starts with "Answer: "), and CAT trains on
  `input + target` with nothing between: records read here keep that join (`Example.separator = ""`).
* `target` is a string or, in STG_H, a JSON integer ("target": 8): numbers are read as their text.
* `important` is a list of `{effect: [causes]}` objects (the same effect may appear in several; their
  causes are merged), one `{effect: [causes]}` object, or a plain list of causes of the target.
  A cause given as one string instead of a list counts as one cause. Test files have no
  `important`: their examples train nothing and evaluate as usual.

Format errors (bad JSON, missing or mistyped fields) always raise a ValueError naming the file and
line. Whether an annotated pair can supervise anything is decided later, on the tokens
(`causalattn.data.annotations`); with `strict=True` a pair naming text that does not occur in the
example is an error here already, as it always used to be.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Union

from causalattn.data.records import Example

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class DataFile:
    """The examples of one JSONL file, with the line each came from (for file:line messages)."""

    path: str
    examples: list[Example]
    lines: list[int]
    malformed_pairs: int = 0  # annotation entries that are neither a cause text nor a list of them

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"


def _text_of_target(target: object, where: str) -> str:
    if isinstance(target, bool) or not isinstance(target, (str, int, float)):
        raise ValueError(f"{where}: 'target' must be a string or a number, got {type(target).__name__}")
    text = target if isinstance(target, str) else str(target)
    if not text.strip():
        raise ValueError(f"{where}: 'target' must not be empty")
    return text


def _causes_of(effect: str, causes: object, where: str, strict: bool) -> list[str] | None:
    """The cause texts of one effect, or None (lenient) for an entry that names none."""
    if isinstance(causes, str):
        causes = [causes]
    if isinstance(causes, list) and all(isinstance(c, str) and c for c in causes):
        return causes
    if strict:
        raise ValueError(f"{where}: causes of {effect!r} must be a list of non-empty strings, got {causes!r}")
    return None


def _annotation_of(important: object, target: str, where: str, strict: bool) -> tuple[dict, int]:
    """`important` as one {effect: [causes]} mapping, and the number of malformed entries dropped."""
    if important is None:
        return {}, 0
    if isinstance(important, list) and all(isinstance(item, str) for item in important):
        important = [{target: important}] if important else []
    elif isinstance(important, dict):
        important = [important]
    if not isinstance(important, list) or not all(isinstance(item, dict) for item in important):
        raise ValueError(f"{where}: 'important' must be a list of {{effect: [causes]}} objects, one such object "
                         f"or a list of cause texts, got {type(important).__name__}")
    merged: dict[str, list[str]] = {}
    malformed = 0
    for item in important:
        for effect, causes in item.items():
            kept = _causes_of(effect, causes, where, strict)
            if kept is None or not effect:
                malformed += 1
                continue
            merged.setdefault(effect, [])
            merged[effect] += [c for c in kept if c not in merged[effect]]
    return merged, malformed


def parse_record(record: object, where: str, strict: bool) -> tuple[Example, int]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("input", "target") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    if not isinstance(record["input"], str):
        raise ValueError(f"{where}: 'input' must be a string, got {type(record['input']).__name__}")
    text, target = record["input"], _text_of_target(record["target"], where)
    important, malformed = _annotation_of(record.get("important"), target, where, strict)
    example = Example(input=text, target=target, important=important, values={}, separator="")
    if strict:
        full = text + target
        for effect, causes in important.items():
            for phrase in [effect, *causes]:
                if phrase not in full:
                    raise ValueError(f"{where}: annotated text {phrase!r} does not occur in input + target")
    return example, malformed


def read_file(path: PathLike, *, strict: bool = False) -> DataFile:
    """Every record of a CAT-style JSONL file (blank lines skipped) with its line number."""
    name = os.fspath(path)
    examples, lines, malformed = [], [], 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
            example, dropped = parse_record(record, where, strict)
            examples.append(example)
            lines.append(number)
            malformed += dropped
    if not examples:
        raise ValueError(f"{name}: no records")
    return DataFile(name, examples, lines, malformed)


def read_jsonl(path: PathLike, *, strict: bool = False) -> list[Example]:
    """The examples of a CAT-style JSONL file (see `read_file`)."""
    return read_file(path, strict=strict).examples


def write_jsonl(path: PathLike, examples: list[Example]) -> None:
    """Write examples in CAT's format, the separator folded into `input` so that `input + target` is
    the training text (atomically: a partial file never replaces a good one)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"input": example.input + example.separator, "target": example.target,
                                     "important": [{effect: causes} for effect, causes in example.important.items()]})
                         + "\n")
    os.replace(tmp, path)
