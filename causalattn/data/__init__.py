"""Data for causal adapter training: the Spurious Token Game generator and CAT-style JSONL."""
from causalattn.data.jsonl import read_jsonl, write_jsonl
from causalattn.data.stg import Example, Splits, generate, make_splits

__all__ = ["Example", "Splits", "generate", "make_splits", "read_jsonl", "write_jsonl"]
