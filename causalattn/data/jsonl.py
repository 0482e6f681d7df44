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
line; so does what Python's JSON reader would accept silently or crash on: bytes that are not UTF-8,
a lone surrogate escape (`"\\ud800"`, not text), a key given twice in one object (the last would
win: a second `"important": []` would erase the annotation), NaN / Infinity and numbers beyond the float
range (a target "nan"), and nesting too deep to read. Whether an annotated pair can supervise anything
is decided later, on the tokens (`causalattn.data.annotations`); with `strict=True` a pair naming text
that does not occur in the example is an error here already, as it always used to be.
"""
from __future__ import annotations

import json
import math
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


class _RecordError(ValueError):
    """What `loads_record` reports; its message is completed with the record's file:line."""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise _RecordError(f"the key {twice!r} appears twice in one object (which one is meant?)")
    return dict(pairs)


def _refuse_constant(name: str) -> float:
    raise _RecordError(f"{name} is not a JSON number (expected a string or a finite number)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _RecordError(f"{text} is beyond the float range (expected a string or a finite number)")
    return value


def loads_record(text: str, where: str) -> object:
    """One JSON value, refusing duplicate keys, NaN / Infinity and too deep nesting (ValueError `where: ...`)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant,
                          parse_float=_finite)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    except _RecordError as error:
        raise ValueError(f"{where}: {error}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read (expected a flat record)") from None


def _check_text(value: str, field: str, where: str) -> str:
    """`value`, unless it holds a lone surrogate (a `\\ud800` escape), which is not text: tokenizers fail on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: {field} holds a lone surrogate {value[error.start]!r} at index "
                         f"{error.start}, which is not Unicode text (expected valid UTF-16 pairs)") from None
    return value


def _text_of_target(target: object, where: str) -> str:
    if isinstance(target, bool) or not isinstance(target, (str, int, float)):
        raise ValueError(f"{where}: 'target' must be a string or a number, got {type(target).__name__}")
    text = _check_text(target, "'target'", where) if isinstance(target, str) else str(target)
    if not text.strip():
        raise ValueError(f"{where}: 'target' must not be empty")
    return text


def _causes_of(effect: str, causes: object, where: str, strict: bool) -> list[str] | None:
    """The cause texts of one effect, or None (lenient) for an entry that names none."""
    if isinstance(causes, str):
        causes = [causes]
    if isinstance(causes, list) and all(isinstance(c, str) and c for c in causes):
        return [_check_text(cause, f"a cause of {effect!r}", where) for cause in causes]
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
            kept = _causes_of(_check_text(effect, "an effect in 'important'", where), causes, where, strict)
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
    text, target = _check_text(record["input"], "'input'", where), _text_of_target(record["target"], where)
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
    # undecodable bytes become lone surrogates (U+DC80..U+DCFF), found line by line below
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            bad = next((column for column, char in enumerate(line, start=1) if "\udc80" <= char <= "\udcff"), None)
            if bad is not None:
                raise ValueError(f"{where}: not UTF-8 text (byte 0x{ord(line[bad - 1]) - 0xdc00:02x} at character "
                                 f"{bad}); expected a UTF-8 encoded JSONL file")
            record = loads_record(line, where)
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
