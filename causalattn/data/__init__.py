"""Library-side data: the record type, CAT-style JSONL files, annotation checks and the collator.

The task generators (Spurious Token Game variants, the random-cause control) belong to the lab:
`causalattn.lab.tasks`.
"""
from causalattn.data.jsonl import DataFile, read_file, read_jsonl, write_jsonl
from causalattn.data.records import Example

__all__ = ["DataFile", "Example", "read_file", "read_jsonl", "write_jsonl"]
