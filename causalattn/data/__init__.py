"""Data for causal adapter training: the Spurious Token Game generators (cancer-risk in `stg`, the
shortcut variant in `shortcut`, two dialects in `dialects`), the random-cause control and CAT-style JSONL."""
from causalattn.data import dialects, shortcut
from causalattn.data.jsonl import DataFile, read_file, read_jsonl, write_jsonl
from causalattn.data.stg import Example, Splits, generate, make_splits

__all__ = ["DataFile", "Example", "Splits", "dialects", "generate", "make_splits", "read_file", "read_jsonl", "shortcut",
           "write_jsonl"]
