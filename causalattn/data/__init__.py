"""Data for causal adapter training: the Spurious Token Game generator and CAT-style JSONL."""
from causalattn.data.jsonl import DataFile, read_file, read_jsonl, write_jsonl
from causalattn.data.stg import Example, Splits, generate, make_splits

__all__ = ["DataFile", "Example", "Splits", "generate", "make_splits", "read_file", "read_jsonl", "write_jsonl"]
