"""Reading CAT-style JSONL: one JSON object per line with `input`, `target` and `important`.

`important` maps an effect text to the texts of its causes ({"High Risk": ["Smoking: 7", ...]});
a plain list of cause texts is read as the causes of the target. Every bad record is reported with
its file and line number before anything is trained.
"""
from __future__ import annotations

import json
import os
from typing import Union

from causalattn.data.stg import Example


def _parse_record(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("input", "target") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    text, target = record["input"], record["target"]
    if not isinstance(text, str) or not isinstance(target, str) or not target.strip():
        raise ValueError(f"{where}: 'input' and 'target' must be strings (target non-empty)")
    important = record.get("important", {})
    if isinstance(important, list):
        important = {target: important}
    if not isinstance(important, dict):
        raise ValueError(f"{where}: 'important' must map effect text to a list of cause texts, got {type(important).__name__}")
    for effect, causes in important.items():
        if not isinstance(causes, list) or not all(isinstance(c, str) and c for c in causes):
            raise ValueError(f"{where}: causes of {effect!r} must be a list of non-empty strings")
        full = f"{text} {target}"
        for phrase in [effect, *causes]:
            if phrase not in full:
                raise ValueError(f"{where}: annotated text {phrase!r} does not occur in input + target")
    return Example(input=text, target=target, important=important, values={})


def read_jsonl(path: Union[str, os.PathLike]) -> list[Example]:
    """All records of a CAT-style JSONL file (blank lines skipped)."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
            examples.append(_parse_record(record, where))
    if not examples:
        raise ValueError(f"{os.fspath(path)}: no records")
    return examples


def write_jsonl(path: Union[str, os.PathLike], examples: list[Example]) -> None:
    """Write examples in the same format (atomically: a partial file never replaces a good one)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"input": example.input, "target": example.target,
                                     "important": example.important}) + "\n")
    os.replace(tmp, path)
